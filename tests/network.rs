//! Network faults between opsloop and PostgreSQL (issue 14): `opsloop run` talks to the
//! database through a TCP proxy the test controls (tests/support/proxy.rs), which resets
//! every connection, stalls all traffic for a while, and blackholes the open connections
//! for good, each while missions run. After each fault the work resumes within a bounded
//! time (printed; the limits here are generous timeouts, not measurements), and every
//! step's side effect happens exactly once.

mod support;

use std::net::ToSocketAddrs;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::proxy::Proxy;
use support::{Effects, TestDb, opsloop_cmd, path_str, test_db, write_temp};

fn policy(effects: &Effects) -> String {
    format!(
        r#"
[gates]
max_pending = 100000

[worker]
concurrency = 8
lease = "60s"
backoff = {{ base = "200ms", max = "2s" }}

[heartbeat]
interval = "500ms"

[templates.fan]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "n" }}
steps = [ {} ]
"#,
        effects.steps(3)
    )
}

/// The daemon's log, kept for a failing run.
fn log_file(db: &TestDb) -> Stdio {
    let path = std::env::temp_dir().join(format!("opsloop-network-{}.log", db.name));
    println!("daemon log: {}", path.display());
    std::fs::File::create(&path).map_or(Stdio::null(), Stdio::from)
}

struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn succeeded(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ops_missions WHERE status = 'succeeded'")
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// Wait until `n` missions succeeded; how long it took.
async fn until_succeeded(db: &TestDb, n: i64, what: &str) -> Duration {
    let started = Instant::now();
    let limit = Duration::from_secs(180);
    loop {
        let done = succeeded(db).await;
        if done >= n {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: only {done} of {n} missions succeeded after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn propose_batch(
    db: &TestDb,
    policy: &opsloop::domain::policy::Policy,
    from: i64,
    count: i64,
) {
    for n in from..from + count {
        support::propose(&db.pool, policy, "fan", &[("n", &n.to_string())]).await;
    }
}

/// Wait until some of the latest batch's effects happened, so the fault hits mid-work.
async fn mid_work(effects: &Effects, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while effects.counts().0 < at_least {
        assert!(Instant::now() < deadline, "no progress before the fault");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resets_stalls_and_blackholes_lose_nothing_double_nothing_and_end() {
    let admin = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let opts: sqlx::postgres::PgConnectOptions = admin.parse().expect("DATABASE_URL");
    if opts.get_socket().is_some() {
        println!("SKIPPED: the test server is on a unix socket; the proxy needs TCP");
        return;
    }
    let upstream = (opts.get_host(), opts.get_port())
        .to_socket_addrs()
        .expect("resolve")
        .next()
        .expect("an address");
    let db = test_db().await;
    let effects = Effects::start().await;
    let source = policy(&effects);
    let file = write_temp(&format!("network-{}.toml", db.name), &source);
    let proxy = Proxy::start(upstream).await;
    let _run = Run(opsloop_cmd(Some(&proxy.url(&db.url)))
        .args(["run", "--policy", path_str(&file)])
        .env("OPSLOOP_HTTP_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(log_file(&db))
        .spawn()
        .expect("spawn"));
    let policy = opsloop::domain::policy::parse(&source).expect("policy");
    let batch = 40;
    propose_batch(&db, &policy, 0, batch).await;
    until_succeeded(&db, batch, "before any fault").await;

    // 1. Every connection reset mid-work.
    propose_batch(&db, &policy, batch, batch).await;
    mid_work(&effects, (batch * 3 + 10) as usize).await;
    proxy.reset_all();
    let took = until_succeeded(&db, 2 * batch, "after the reset").await;
    println!("all connections reset: the batch finished {took:?} later");

    // 2. All traffic stalled for 8 s (shorter than the step lease), then let through.
    propose_batch(&db, &policy, 2 * batch, batch).await;
    mid_work(&effects, (2 * batch * 3 + 10) as usize).await;
    proxy.stall();
    tokio::time::sleep(Duration::from_secs(8)).await;
    proxy.resume();
    let took = until_succeeded(&db, 3 * batch, "after the stall").await;
    println!("all traffic stalled 8 s: the batch finished {took:?} after it ended");

    // 3. The open connections blackholed for good (a firewall forgot them).
    propose_batch(&db, &policy, 3 * batch, batch).await;
    mid_work(&effects, (3 * batch * 3 + 10) as usize).await;
    let before = proxy.accepted();
    proxy.blackhole_open_connections();
    let took = until_succeeded(&db, 4 * batch, "after the blackhole").await;
    println!(
        "open connections blackholed: the batch finished {took:?} later, on {} new connections",
        proxy.accepted() - before
    );

    let (total, distinct) = effects.counts();
    assert_eq!(distinct, (4 * batch * 3) as usize, "every step ran");
    assert_eq!(total, distinct, "no step ran twice");
}
