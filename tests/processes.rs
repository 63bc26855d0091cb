//! Real worker processes: exactly-once and crash recovery (issue 3, "Done when" 2 and 3).

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use opsloop::missions::progress::{self, Ending, Lease};
use opsloop::policy::Policy;
use support::{Effects, TestDb, opsloop_cmd, test_db};

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
    opsloop::policy::store::apply(&db.pool, &source, "test")
        .await
        .expect("apply");
    let policy = opsloop::policy::parse(&source).expect("policy");
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
    opsloop::policy::store::apply(&db.pool, CRASH_POLICY, "test")
        .await
        .expect("apply");
    let policy = opsloop::policy::parse(CRASH_POLICY).expect("policy");
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
        opsloop::heartbeat::tick(&db.pool, &policy)
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
        0,
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
