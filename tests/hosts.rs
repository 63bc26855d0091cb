//! Several hosts on one database, and a PostgreSQL restart in the middle of a run
//! (issue 5, "Done when" 1): real processes, nothing lost, nothing doubled.

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use opsloop::db::embedded::EmbeddedPostgres;
use support::{Effects, opsloop_cmd, path_str, test_db, write_temp};

fn policy(effects: &Effects, interval: &str) -> String {
    format!(
        r#"
[gates]
max_pending = 100000

[worker]
concurrency = 8
lease = "30s"
backoff = {{ base = "200ms", max = "2s" }}

[heartbeat]
interval = "{interval}"
event_batch = 50

[templates.fan]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "n" }}
steps = [ {} ]

[templates.react]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "n" }}
steps = [ {{ name = "r", kind = "noop" }} ]

[[reactions]]
name = "each-ping"
on = "ping"
propose = "react"
params = {{ n = "{{payload.n}}" }}
"#,
        effects.steps(5)
    )
}

struct Procs(Vec<Child>);

impl Procs {
    fn spawn(&mut self, url: &str, args: &[&str]) {
        self.0.push(
            opsloop_cmd(Some(url))
                .args(args)
                .env("OPSLOOP_HTTP_ADDR", "127.0.0.1:0")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn"),
        );
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_all_done(pool: &sqlx::PgPool, missions: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let done: Result<i64, _> =
            sqlx::query_scalar("SELECT count(*) FROM ops_missions WHERE status <> 'running'")
                .fetch_one(pool)
                .await;
        if done.as_ref().is_ok_and(|d| *d >= missions) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "missions unfinished: {done:?} of {missions}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_and_two_workers_share_the_work_exactly_once() {
    let db = test_db().await;
    let effects = Effects::start().await;
    let source = policy(&effects, "200ms");
    let file = write_temp(&format!("hosts-{}.toml", db.name), &source);
    let mut procs = Procs(Vec::new());
    for _ in 0..2 {
        procs.spawn(&db.url, &["run", "--policy", path_str(&file)]);
    }
    for _ in 0..2 {
        procs.spawn(&db.url, &["worker", "--concurrency", "8"]);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let policy = opsloop::domain::policy::parse(&source).expect("policy");
    for n in 0..200 {
        support::propose(&db.pool, &policy, "fan", &[("n", &n.to_string())]).await;
    }
    for n in 0..100 {
        opsloop::store::events::emit_user(
            &db.pool,
            "ping",
            "test",
            serde_json::json!({ "n": n.to_string() }),
        )
        .await
        .expect("emit");
    }
    wait_all_done(&db.pool, 300, Duration::from_secs(240)).await;
    assert_eq!(
        effects.counts(),
        (1000, 1000),
        "every step's side effect exactly once"
    );
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops_missions WHERE status <> 'succeeded'")
            .fetch_one(&db.pool)
            .await
            .expect("count");
    assert_eq!(failed, 0);
    let reactions: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT e.id, count(r.id) FROM ops_agent_events e
         LEFT JOIN ops_agent_reactions r ON r.event_id = e.id
         WHERE e.kind = 'ping' GROUP BY e.id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("reactions");
    assert_eq!(reactions.len(), 100);
    assert!(
        reactions.iter().all(|(_, n)| *n == 1),
        "every event reacted to exactly once"
    );
    let workers: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT payload->>'worker') FROM ops_agent_events WHERE kind = 'step.started'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("workers");
    assert!(workers >= 3, "steps spread over the processes ({workers})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_mid_run_loses_nothing_and_doubles_nothing() {
    // A private server, so this test may stop and start it.
    let dir = std::env::temp_dir().join(format!("opsloop-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut server = EmbeddedPostgres::start(&dir).expect("start server");
    opsloop::db::create_database_if_missing(&server.url("postgres"), "opsloop")
        .await
        .expect("db");
    let url = server.url("opsloop");
    let pool = opsloop::db::connect(&url, 4).await.expect("connect");
    opsloop::db::migrate(&pool).await.expect("migrate");
    let effects = Effects::start().await;
    let source = policy(&effects, "500ms");
    let file = write_temp("restart-policy.toml", &source);
    let mut procs = Procs(Vec::new());
    procs.spawn(&url, &["run", "--policy", path_str(&file)]);
    procs.spawn(&url, &["worker", "--concurrency", "4"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let policy = opsloop::domain::policy::parse(&source).expect("policy");
    for n in 0..100 {
        support::propose(&pool, &policy, "fan", &[("n", &n.to_string())]).await;
    }
    // Restart the server while the work is under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    while effects.counts().0 < 100 {
        assert!(Instant::now() < deadline, "no progress before the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pool.close().await;
    server.stop();
    let at_restart = effects.counts().0;
    assert!(
        at_restart < 500,
        "the restart came too late to matter ({at_restart} of 500 done)"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server = EmbeddedPostgres::start(&dir).expect("restart server");
    assert!(server.started_here());
    let pool = opsloop::db::connect(&url, 4).await.expect("reconnect");
    wait_all_done(&pool, 100, Duration::from_secs(180)).await;
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops_missions WHERE status = 'succeeded'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(succeeded, 100);
    let (total, distinct) = effects.counts();
    assert_eq!(distinct, 500, "every step ran");
    // A step whose result could not be stored while the server was down is retried
    // only if its lease ran out; with a 30 s lease and a 2 s outage, none is.
    assert_eq!(total, 500, "no step ran twice");
    drop(procs);
    pool.close().await;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
