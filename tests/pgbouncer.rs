//! opsloop behind Debian's PgBouncer (issue 14), started by the test on loopback with a
//! default configuration:
//! - session pooling: everything works (two daemons, missions, one tick at a time, one
//!   Telegram poller, takeover after a daemon is killed);
//! - transaction pooling: both daemons refuse to start with one line saying what to
//!   set, nothing runs, and `opsloop doctor` names the pooler (not "privileges").

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::fake_telegram::FakeTelegram;
use support::pgbouncer::PgBouncer;
use support::{TestDb, opsloop_cmd, path_str, stderr, stdout, test_db, write_temp};

const POLICY: &str = r#"
[gates]
max_pending = 1000

[worker]
concurrency = 4
lease = "30s"

[heartbeat]
interval = "200ms"

[templates.fan]
risk = "low"
params.n = { pattern = '^\d+$', help = "n" }
steps = [ { name = "a", kind = "noop" }, { name = "b", kind = "shell", run = ["true"] } ]
"#;

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn daemon(url: &str, db: &TestDb, fake: &FakeTelegram) -> Child {
    let file = write_temp(&format!("pgbouncer-{}.toml", db.name), POLICY);
    opsloop_cmd(Some(url))
        .args(["run", "--policy", path_str(&file)])
        .env("TELEGRAM_BOT_TOKEN", fake.token())
        .env("TELEGRAM_API_URL", fake.url().as_str())
        .env("OPSLOOP_ADMINS", "1001")
        .env("OPSLOOP_HTTP_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn opsloop run")
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// Tick rows whose time spans overlap: two ticks at once.
async fn overlapping_ticks(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM ops_action_runs a JOIN ops_action_runs b
           ON a.id < b.id AND a.kind = 'tick' AND b.kind = 'tick'
          AND a.started_at < b.finished_at AND b.started_at < a.finished_at",
    )
    .fetch_one(&db.pool)
    .await
    .expect("ticks")
}

fn polls_since(fake: &FakeTelegram, since: Instant) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.method == "getupdates" && r.at > since)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pooling_runs_everything_and_one_of_each_singleton() {
    let Some(bouncer) = PgBouncer::start(&admin_url(), "session") else {
        return;
    };
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let url = bouncer.url(&db.url);
    let mut procs = Procs(vec![daemon(&url, &db, &fake)]);
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| polls_since(
            f,
            Instant::now() - Duration::from_secs(60)
        ) > 0)
            .await,
        "the first daemon never polled through PgBouncer: {}",
        bouncer.log_text()
    );
    procs.0.push(daemon(&url, &db, &fake));
    let policy = opsloop::domain::policy::parse(POLICY).expect("policy");
    for n in 0..50 {
        support::propose(&db.pool, &policy, "fan", &[("n", &n.to_string())]).await;
    }
    wait_succeeded(&db, 50, Duration::from_secs(120)).await;

    // The first daemon (the poller) dies; the second takes over.
    let killed = Instant::now();
    let _ = procs.0[0].kill();
    let _ = procs.0[0].wait();
    let took_over = fake
        .wait_for(Duration::from_secs(30), |f| {
            polls_since(f, killed + Duration::from_millis(100)) > 0
        })
        .await;
    assert!(took_over, "no poller after the first daemon died");
    println!("poller takeover after a kill: {:?}", killed.elapsed());
    for n in 50..60 {
        support::propose(&db.pool, &policy, "fan", &[("n", &n.to_string())]).await;
    }
    wait_succeeded(&db, 60, Duration::from_secs(60)).await;

    assert_eq!(overlapping_ticks(&db).await, 0, "two ticks at once");
    let ticks: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_action_runs WHERE kind = 'tick'")
        .fetch_one(&db.pool)
        .await
        .expect("ticks");
    assert!(ticks > 0, "no tick ran through PgBouncer");
    let conflicts: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "getupdates" && r.status == 409)
        .collect();
    assert!(conflicts.is_empty(), "two pollers at once: {conflicts:?}");
}

async fn wait_succeeded(db: &TestDb, n: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ops_missions WHERE status = 'succeeded'")
                .fetch_one(&db.pool)
                .await
                .expect("count");
        if done >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {n} missions succeeded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pooling_is_refused_with_one_line_and_doctor_names_it() {
    let Some(bouncer) = PgBouncer::start(&admin_url(), "transaction") else {
        return;
    };
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let url = bouncer.url(&db.url);
    let mut procs = Procs(vec![daemon(&url, &db, &fake), daemon(&url, &db, &fake)]);
    let mut outcomes = Vec::new();
    for mut child in std::mem::take(&mut procs.0) {
        let waited = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    let mut err = String::new();
                    if let Some(mut pipe) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut pipe, &mut err);
                    }
                    return Some((status.code(), err));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
        .expect("join");
        outcomes.push(waited);
    }
    for outcome in outcomes {
        let (code, err) = outcome.expect("opsloop run kept running behind a transaction pooler");
        assert_eq!(code, Some(3), "refused (exit 3): {err}");
        let refusal: Vec<&str> = err.lines().filter(|l| l.starts_with("opsloop: ")).collect();
        assert_eq!(refusal.len(), 1, "one line: {err}");
        assert!(
            refusal[0].contains("transaction") && refusal[0].contains("pool_mode = session"),
            "says why and what to set: {err}"
        );
    }
    let ran: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_action_runs")
        .fetch_one(&db.pool)
        .await
        .expect("runs");
    assert_eq!(ran, 0, "nothing ran");
    assert!(
        fake.requests().iter().all(|r| r.method != "getupdates"),
        "nobody polled"
    );

    // Doctor: the pooler, named, with its fix; not the user's privileges.
    let out = opsloop_cmd(Some(&url))
        .arg("doctor")
        .env("OPSLOOP_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .expect("doctor");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", stderr(&out));
    let line = text
        .lines()
        .find(|l| l.starts_with("FAIL  pooler:"))
        .unwrap_or_else(|| panic!("no pooler failure in:\n{text}"));
    assert!(line.contains("pool_mode = session"), "{line}");
    assert!(!text.contains("privileges"), "{text}");
}
