//! Real worker processes: exactly-once, crash recovery (issue 3, "Done when" 2 and 3),
//! a worker cut off from the database, and what a step's process can see of the daemon.

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use opsloop::domain::policy::Policy;
use opsloop::engine::missions::progress::{self, Ending, Lease};
use support::{Daemon, Effects, TestDb, opsloop_cmd, test_db};

fn exactly_once_policy(effects: &Effects) -> String {
    format!(
        r#"
[gates]
max_pending = 10000

[worker]
lease = "30s"

[templates.fan]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "n" }}
steps = [ {} ]
"#,
        effects.steps(5)
    )
}

struct Workers(Vec<Child>);

impl Workers {
    fn start(url: &str, n: usize, concurrency: u32) -> Workers {
        Workers(
            (0..n)
                .map(|_| {
                    opsloop_cmd(Some(url))
                        .args(["worker", "--concurrency", &concurrency.to_string()])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("spawn worker")
                })
                .collect(),
        )
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn propose(db: &TestDb, policy: &Policy, template: &str, params: &[(&str, &str)]) -> i64 {
    support::propose(&db.pool, policy, template, params)
        .await
        .mission_id
        .expect("mission")
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_worker_processes_run_2000_steps_exactly_once() {
    let db = test_db().await;
    let effects = Effects::start().await;
    let source = exactly_once_policy(&effects);
    opsloop::store::policy::apply(&db.pool, &source, "test")
        .await
        .expect("apply");
    let policy = opsloop::domain::policy::parse(&source).expect("policy");
    let workers = Workers::start(&db.url, 4, 8);
    for n in 0..400 {
        propose(&db, &policy, "fan", &[("n", &n.to_string())]).await;
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    while scalar(
        &db,
        "SELECT count(*) FROM ops_missions WHERE status = 'running'",
    )
    .await
        > 0
    {
        assert!(Instant::now() < deadline, "missions did not finish in time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(workers);
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM ops_missions WHERE status = 'succeeded'"
        )
        .await,
        400
    );
    assert_eq!(
        effects.counts(),
        (2000, 2000),
        "every step's side effect exactly once"
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM ops_mission_steps WHERE attempts <> 1"
        )
        .await,
        0
    );
    // Steps of one mission ran in order: each (n, seq) arrived after (n, seq - 1).
    let seen = effects.seen.lock().map(|s| s.clone()).unwrap_or_default();
    let position: std::collections::HashMap<(i64, i64), usize> =
        seen.iter().enumerate().map(|(i, k)| (*k, i)).collect();
    let out_of_order = seen
        .iter()
        .filter(|(n, seq)| {
            *seq > 1
                && position
                    .get(&(*n, seq - 1))
                    .is_none_or(|before| *before > position[&(*n, *seq)])
        })
        .count();
    assert_eq!(out_of_order, 0);
    // The work was spread over the processes.
    let owners = scalar(
        &db,
        "SELECT count(DISTINCT payload->>'worker') FROM ops_agent_events WHERE kind = 'step.started'",
    )
    .await;
    assert_eq!(owners, 4, "every worker process took steps");
}

const CRASH_POLICY: &str = r#"
[worker]
lease = "2s"
max_attempts = 3

[templates.crashy]
risk = "low"
params.file = { pattern = '^/[A-Za-z0-9/_.-]+$', help = "a file" }
steps = [
  { name = "slow", kind = "shell", run = ["sh", "-c", "sleep 3; echo done-$OPSLOOP_ATTEMPT >> \"$OPSLOOP_PARAM_FILE\""] },
  { name = "after", kind = "noop" },
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_s_step_is_recovered_and_its_late_result_refused() {
    let db = test_db().await;
    opsloop::store::policy::apply(&db.pool, CRASH_POLICY, "test")
        .await
        .expect("apply");
    let policy = opsloop::domain::policy::parse(CRASH_POLICY).expect("policy");
    let file = std::env::temp_dir().join(format!("opsloop-crash-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let mut first = Workers::start(&db.url, 1, 1);
    let mission = propose(
        &db,
        &policy,
        "crashy",
        &[("file", file.to_str().expect("utf-8"))],
    )
    .await;

    // Wait until the first worker holds the step, then kill it mid-step.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (step_id, owner): (i64, String) = loop {
        let held: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT id, lease_owner FROM ops_mission_steps WHERE mission_id = $1 AND seq = 1 AND status = 'running'",
        )
        .bind(mission)
        .fetch_optional(&db.pool)
        .await
        .expect("step");
        if let Some((id, Some(owner))) = held {
            break (id, owner);
        }
        assert!(Instant::now() < deadline, "the step was never claimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pid = first.0[0].id() as i32;
    // SAFETY: sending SIGKILL to our own child process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = first.0[0].wait();
    first.0.clear();

    // Another worker is around; the heartbeat recovers the step once the lease expires.
    let _second = Workers::start(&db.url, 1, 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        opsloop::engine::heartbeat::tick(&db.pool, &policy)
            .await
            .expect("tick");
        let status: String = sqlx::query_scalar("SELECT status FROM ops_missions WHERE id = $1")
            .bind(mission)
            .fetch_one(&db.pool)
            .await
            .expect("status");
        if status != "running" {
            assert_eq!(status, "succeeded");
            break;
        }
        assert!(Instant::now() < deadline, "mission did not recover");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM ops_agent_events WHERE step_id = $1 ORDER BY id")
            .bind(step_id)
            .fetch_all(&db.pool)
            .await
            .expect("events");
    assert_eq!(
        kinds,
        [
            "step.started",
            "step.recovered",
            "step.started",
            "step.succeeded"
        ]
    );
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM ops_mission_steps WHERE id = $1")
        .bind(step_id)
        .fetch_one(&db.pool)
        .await
        .expect("attempts");
    assert_eq!(attempts, 2);
    let written = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(written.contains("done-2"), "{written}");

    // The presumed-dead holder of attempt 1 reports late: fencing refuses it.
    let stale = Lease {
        step_id,
        owner,
        attempt: 1,
    };
    let mut tx = db.pool.begin().await.expect("begin");
    let stored = progress::finish(
        &mut tx,
        &stale,
        &Ending::Failed {
            error: "late".into(),
            result: serde_json::json!({}),
            retry_in: Duration::ZERO,
        },
        &opsloop::domain::policy::Policy::default(),
    )
    .await
    .expect("finish");
    tx.commit().await.expect("commit");
    assert!(!stored, "a stale lease must not store a result");
    let status: String = sqlx::query_scalar("SELECT status FROM ops_mission_steps WHERE id = $1")
        .bind(step_id)
        .fetch_one(&db.pool)
        .await
        .expect("status");
    assert_eq!(status, "succeeded");
}

/// Process groups whose leaders' pids a step wrote to `file`, one a line: killed on drop,
/// so a failing test leaves no `sleep 300` behind.
struct Groups(std::path::PathBuf);

impl Groups {
    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids();
            if pids.len() >= n {
                return pids;
            }
            assert!(
                Instant::now() < deadline,
                "attempt {n} never started: {pids:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        for pid in self.pids() {
            // SAFETY: kill(2) on a process group our test's step started.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

/// Gone, or a zombie: no longer running.
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Connections to `db` refused, and every open one terminated (the test's own too).
async fn cut_off(admin: &sqlx::PgPool, db: &TestDb, allowed: bool) {
    sqlx::query(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS {allowed}",
        db.name
    ))
    .execute(admin)
    .await
    .expect("alter database");
    if !allowed {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&db.name)
        .execute(admin)
        .await
        .expect("terminate");
    }
}

const CUT_POLICY: &str = r#"
[worker]
lease = "2s"
max_attempts = 3

[templates.hold]
risk = "low"
params.file = { pattern = '^/[A-Za-z0-9/_.-]+$', help = "a file" }
steps = [ { name = "hold", kind = "shell", run = ["sh", "-c", "echo $$ >> \"$OPSLOOP_PARAM_FILE\"; exec sleep 300"] } ]
"#;

/// A worker that cannot renew its leases kills its steps within about a lease, before
/// the heartbeat can give them to another worker: never two attempts at once. Once the
/// database is back, the step is recovered and run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_cut_off_from_the_database_kills_its_steps() {
    let db = test_db().await;
    opsloop::store::policy::apply(&db.pool, CUT_POLICY, "test")
        .await
        .expect("apply");
    let policy = opsloop::domain::policy::parse(CUT_POLICY).expect("policy");
    let file = std::env::temp_dir().join(format!("opsloop-cut-{}.pids", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let groups = Groups(file.clone());
    let _worker = Workers::start(&db.url, 1, 1);
    let mission = propose(
        &db,
        &policy,
        "hold",
        &[("file", file.to_str().expect("utf-8"))],
    )
    .await;
    let first = groups.wait_for(1, Duration::from_secs(15)).await[0];
    assert!(running(first));

    let admin = opsloop::db::connect(&opsloop::db::with_database(&db.url, "postgres"), 1)
        .await
        .expect("admin");
    cut_off(&admin, &db, false).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(first) {
        assert!(
            Instant::now() < deadline,
            "the step {first} still runs though its worker has not renewed its lease for 30s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cut_off(&admin, &db, true).await;

    // Back: the heartbeat recovers the expired lease and the worker runs attempt 2.
    let deadline = Instant::now() + Duration::from_secs(60);
    while groups.pids().len() < 2 {
        assert!(Instant::now() < deadline, "the step was never run again");
        let _ = opsloop::engine::heartbeat::tick(&db.pool, &policy).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM ops_agent_events WHERE mission_id = $1 ORDER BY id")
            .bind(mission)
            .fetch_all(&db.pool)
            .await
            .expect("events");
    assert_eq!(
        kinds,
        [
            "mission.started",
            "step.started",
            "step.recovered",
            "step.started"
        ]
    );
    admin.close().await;
}

/// A step sees neither the daemon's secrets (from its environment or its `.env`) nor
/// its working directory; it gets a short allowlist, its own `env` and `OPSLOOP_*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_sees_nothing_of_the_daemon_s_secrets_or_directory() {
    let db = test_db().await;
    let home = std::env::temp_dir().join(format!("opsloop-daemon-home-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).expect("daemon dir");
    std::fs::write(
        home.join(".env"),
        "AWS_SECRET_ACCESS_KEY=aws-secret-from-dotenv\nOPS_KEY=ops-key-from-dotenv\n",
    )
    .expect(".env");
    let source = r#"
[templates.peek]
risk = "low"
steps = [ { name = "peek", kind = "shell", env = { STEP_OWN = "mine" },
            run = ["sh", "-c", "env; echo cwd=$(pwd); cat .env 2>&1; true"] } ]
"#;
    let policy_file = home.join("policy.toml");
    std::fs::write(&policy_file, source).expect("policy");
    let _daemon = Daemon(
        opsloop_cmd(Some(&db.url))
            .args(["run", "--policy", policy_file.to_str().expect("utf-8")])
            .current_dir(&home)
            .env("OPSLOOP_HTTP_ADDR", "127.0.0.1:0")
            .env("PGPASSWORD", "pg-password-from-env")
            .env("TZ", "Europe/Paris")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn opsloop run"),
    );
    // The daemon applies its policy at start; propose once it is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let policy = loop {
        let applied: Option<String> =
            sqlx::query_scalar("SELECT value->>'source' FROM ops_policy WHERE key = 'policy'")
                .fetch_optional(&db.pool)
                .await
                .ok()
                .flatten();
        if applied.is_some_and(|s| s.contains("peek")) {
            break opsloop::domain::policy::parse(source).expect("policy");
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never applied its policy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mission = propose(&db, &policy, "peek", &[]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let stdout = loop {
        let done: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT status, result->>'stdout' FROM ops_mission_steps
             WHERE mission_id = $1 AND status NOT IN ('queued', 'running')",
        )
        .bind(mission)
        .fetch_optional(&db.pool)
        .await
        .expect("step");
        if let Some((status, stdout)) = done {
            assert_eq!(status, "succeeded");
            break stdout.unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "the step never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for secret in [
        "aws-secret-from-dotenv",
        "AWS_SECRET_ACCESS_KEY",
        "ops-key-from-dotenv",
        "OPS_KEY",
        "pg-password-from-env",
        "PGPASSWORD",
        "DATABASE_URL",
        "OPSLOOP_HTTP_ADDR",
        "OPSLOOP_LOG",
    ] {
        assert!(!stdout.contains(secret), "the step saw {secret}:\n{stdout}");
    }
    for wanted in [
        "STEP_OWN=mine",
        "TZ=Europe/Paris",
        &format!("OPSLOOP_MISSION_ID={mission}"),
        "OPSLOOP_ATTEMPT=1",
        "PATH=",
    ] {
        assert!(
            stdout.contains(wanted),
            "the step lacks {wanted}:\n{stdout}"
        );
    }
    let cwd = stdout
        .lines()
        .find_map(|l| l.strip_prefix("cwd="))
        .expect("cwd line");
    let home = std::fs::canonicalize(&home).expect("canonical");
    assert_ne!(std::path::Path::new(cwd), home, "{stdout}");
    assert!(!std::path::Path::new(cwd).exists(), "{cwd} was left behind");
}
