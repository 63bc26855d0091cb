//! An upgrade with work in flight (issue 14): a database left by an earlier opsloop —
//! pending proposals whose approval prompts are open in Telegram, missions with a step
//! running when the daemon was killed — restored from a dump fixture, then taken over by
//! this binary. It migrates the database, the old prompts' buttons still work (their
//! callback data is unchanged), the killed daemon's steps are recovered, and every
//! mission finishes; nothing is refused.
//!
//! The fixture (`tests/fixtures/upgrade/before.sql`) was made by `make_fixture` below
//! (run it with `--ignored` and an older checkout to refresh it) with the schema of
//! migrations 0001–0011. When a branch adds migrations, this test is what shows they
//! apply to a database with work in flight.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::fake_telegram::{Chat, FakeTelegram, User};
use support::{Daemon, TestDb};

const ADMIN: i64 = 1001;

const POLICY: &str = r#"
[approval]
ttl = "3650d"
high = { approvals = 1, self_approval = true }

[worker]
lease = "2s"

[heartbeat]
interval = "200ms"

[templates.deploy]
risk = "high"
params.tag = { pattern = '^v\d+$', help = "a tag" }
steps = [ { name = "build", kind = "noop" }, { name = "ship", kind = "noop" } ]

[templates.slow]
risk = "low"
params.n = { pattern = '^\d+$', help = "n" }
steps = [ { name = "wait", kind = "sleep", for = "3s" }, { name = "done", kind = "noop" } ]
"#;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade/before.sql")
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn prompts(fake: &FakeTelegram) -> usize {
    fake.sent_messages(ADMIN)
        .iter()
        .filter(|m| m.reply_markup.is_some())
        .count()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// A fresh database with nothing in it (not cloned from the migrated template).
async fn empty_db() -> TestDb {
    let scratch = support::test_db().await;
    let name = format!("{}_up", scratch.name);
    scratch.pool.close().await;
    let admin = sqlx::PgPool::connect(&scratch.url).await.expect("connect");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create");
    admin.close().await;
    let url = support::with_database(&scratch.url, &name);
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    TestDb { pool, url, name }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_with_work_in_flight_is_taken_over_by_this_binary() {
    if !have("psql") {
        println!("SKIPPED: psql is not installed (apt-get install postgresql-client)");
        return;
    }
    let db = empty_db().await;
    let restored = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url, "-f"])
        .arg(fixture())
        .stdout(Stdio::null())
        .output()
        .expect("psql");
    assert!(
        restored.status.success(),
        "restoring the fixture: {}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let old_version: i64 = count(&db, "SELECT max(version) FROM _sqlx_migrations").await;
    let pending: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM ops_mission_proposals WHERE status = 'pending' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("pending");
    assert_eq!(pending.len(), 3, "the fixture's pending proposals");
    // The prompts as they are in the admin's chat: message ids the old daemon sent.
    let open: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT split_part(subject, ':', 2)::bigint, message_id::bigint FROM ops_notifications
         WHERE chat_id = $1 AND action = 'prompt' AND message_id IS NOT NULL ORDER BY id",
    )
    .bind(ADMIN)
    .fetch_all(&db.pool)
    .await
    .unwrap_or_default();

    let fake = FakeTelegram::start().await;
    let _daemon = Daemon::start(&db, &fake, POLICY, &ADMIN.to_string());
    let admin = User::new(ADMIN, "Ann");
    // Old buttons: `a:ID` on the old messages (or, if the fixture did not record them,
    // on message ids the new fake has never seen: taps on unknown messages work too).
    for (i, id) in pending.iter().enumerate() {
        let message = open
            .iter()
            .find(|(p, _)| p == id)
            .map_or(900 + i as i64, |(_, m)| *m);
        fake.tap(
            Chat::private(ADMIN),
            admin.clone(),
            message,
            &format!("a:{id}"),
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let unfinished = count(
            &db,
            "SELECT count(*) FROM ops_missions WHERE status NOT IN ('succeeded')",
        )
        .await;
        let missions = count(&db, "SELECT count(*) FROM ops_missions").await;
        if unfinished == 0 && missions >= 5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{unfinished} of {missions} missions unfinished; answers: {:?}",
            fake.callback_answers()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let new_version: i64 = count(&db, "SELECT max(version) FROM _sqlx_migrations").await;
    let known = opsloop::db::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    assert_eq!(new_version, known, "migrated to this binary's schema");
    let approved = count(
        &db,
        "SELECT count(*) FROM ops_mission_proposals WHERE status = 'approved' AND template = 'deploy'",
    )
    .await;
    assert_eq!(
        approved,
        3,
        "every old prompt's button approved its proposal: {:?}",
        fake.callback_answers()
    );
    let answers = fake.callback_answers();
    assert_eq!(answers.len(), 3, "every tap answered: {answers:?}");
    println!(
        "upgraded from migration {old_version} to {new_version}: 3 old prompts approved by their \
         buttons ({} of them on the messages the old daemon sent), 5 missions finished",
        open.len()
    );
}

/// Makes the fixture: run with `cargo test --test upgrade -- --ignored make_fixture` on
/// the release to upgrade from.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn make_fixture() {
    let db = support::test_db().await;
    let fake = FakeTelegram::start().await;
    let mut daemon = Daemon::start(&db, &fake, POLICY, &ADMIN.to_string());
    fake.send_text(Chat::private(ADMIN), User::new(ADMIN, "Ann"), "/start");
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| !f
            .sent_messages(ADMIN)
            .is_empty())
            .await
    );
    let policy = opsloop::domain::policy::parse(POLICY).expect("policy");
    for tag in ["v1", "v2", "v3"] {
        support::propose(&db.pool, &policy, "deploy", &[("tag", tag)]).await;
    }
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| prompts(f) >= 3)
            .await,
        "the prompts were sent"
    );
    for n in ["1", "2"] {
        support::propose(&db.pool, &policy, "slow", &[("n", n)]).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count(
        &db,
        "SELECT count(*) FROM ops_mission_steps WHERE status = 'running'",
    )
    .await
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow steps never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Killed mid-step, as an upgrade by a careless operator would.
    daemon.signal(libc::SIGKILL);
    let path = fixture();
    std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
    let out = Command::new("pg_dump")
        .args([
            "--inserts",
            "--no-owner",
            "--no-privileges",
            "-d",
            &db.url,
            "-f",
        ])
        .arg(&path)
        .output()
        .expect("pg_dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("wrote {}", path.display());
}
