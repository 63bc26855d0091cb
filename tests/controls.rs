//! Operator controls against the real binary (issue 13, "Done when" 1): retry from the
//! step that stopped a mission, the kill switch across worker processes, priorities.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{TestDb, opsloop, opsloop_cmd, path_str, stderr, stdout, test_db, write_temp};

/// A scratch folder for one test's step side effects.
fn scratch(db: &TestDb) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("opsloop-controls-{}", db.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn policy(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"
[gates]
max_pending = 100

[gates.templates.single]
max_running = 1

[worker]
lease = "30s"
max_attempts = 2
backoff = {{ base = "50ms", max = "100ms" }}

[templates.three]
risk = "low"
steps = [
  {{ name = "first", kind = "shell", run = ["sh", "-c", "echo run >> {d}/first"] }},
  {{ name = "boom", kind = "shell", run = ["sh", "-c", "echo run >> {d}/boom; test -f {d}/fixed && exit 0; echo 'disk full: /var/lib/thing' >&2; exit 3"] }},
  {{ name = "last", kind = "shell", run = ["sh", "-c", "echo run >> {d}/last"] }},
]

[templates.slow]
risk = "low"
steps = [ {{ name = "nap", kind = "sleep", for = "1h" }} ]

[templates.nap]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "n" }}
steps = [ {{ name = "sleep", kind = "shell", run = ["sh", "-c", "echo $$ > {d}/pid-$OPSLOOP_PARAM_N; exec sleep 60"] }} ]

[templates.single]
risk = "low"
steps = [ {{ name = "fail", kind = "shell", run = ["false"], max_attempts = 1 }} ]

[templates.order]
risk = "low"
params.n = {{ pattern = '^[a-z0-9]+$', help = "n" }}
steps = [ {{ name = "note", kind = "shell", run = ["sh", "-c", "echo {{n}} >> {d}/order"] }} ]

[templates.urgent]
risk = "low"
priority = 20
params.n = {{ pattern = '^\d+$', help = "n" }}
steps = [ {{ name = "s", kind = "noop" }} ]
"#
    )
}

fn apply(db: &TestDb, dir: &Path) {
    let file = write_temp(&format!("controls-{}.toml", db.name), &policy(dir));
    let out = opsloop(&db.url, &["policy", "apply", path_str(&file)]);
    assert!(out.status.success(), "{}", stderr(&out));
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

async fn scalar<T>(db: &TestDb, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect(sql)
}

async fn mission_status(db: &TestDb, id: i64) -> String {
    sqlx::query_scalar("SELECT status FROM ops_missions WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("mission")
}

/// Wait (generously) until mission `id` has `status`.
async fn wait_status(db: &TestDb, id: i64, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if mission_status(db, id).await == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "mission #{id} is {}, not {status}",
        mission_status(db, id).await
    );
}

fn runs(dir: &Path, name: &str) -> usize {
    std::fs::read_to_string(dir.join(name))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn propose(db: &TestDb, args: &[&str]) -> Value {
    let mut all = vec!["propose"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = opsloop(&db.url, &all);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("propose --json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reruns_the_failed_step_and_those_after_it_only() {
    let db = test_db().await;
    let dir = scratch(&db);
    apply(&db, &dir);
    let _workers = Workers::start(&db.url, 1, 2);
    let mission = propose(&db, &["three"])["mission_id"]
        .as_i64()
        .expect("mission");
    wait_status(&db, mission, "failed").await;
    assert_eq!(
        (runs(&dir, "first"), runs(&dir, "boom"), runs(&dir, "last")),
        (1, 2, 0)
    );
    // The failure names the step, its attempts and the tail of its stderr.
    let failed: Value = scalar(
        &db,
        "SELECT payload FROM ops_agent_events WHERE kind = 'mission.failed'",
    )
    .await;
    assert_eq!(failed["step"], "boom");
    assert_eq!(failed["attempts"], 2);
    assert!(
        failed["stderr"]
            .as_str()
            .is_some_and(|s| s.contains("disk full: /var/lib/thing")),
        "{failed}"
    );

    std::fs::write(dir.join("fixed"), "").expect("fix");
    let out = opsloop(
        &db.url,
        &["retry", &mission.to_string(), "--as", "ann", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let retried: Value = serde_json::from_str(&stdout(&out)).expect("retry --json");
    assert_eq!(retried["step"], "boom");
    assert_eq!(retried["attempt"], 3, "attempt numbers go on counting");
    wait_status(&db, mission, "succeeded").await;
    assert_eq!(
        (runs(&dir, "first"), runs(&dir, "boom"), runs(&dir, "last")),
        (1, 3, 1),
        "only the failed step and those after it ran again"
    );
    let (attempts, max): (i32, i32) = sqlx::query_as(
        "SELECT attempts, max_attempts FROM ops_mission_steps WHERE mission_id = $1 AND name = 'boom'",
    )
    .bind(mission)
    .fetch_one(&db.pool)
    .await
    .expect("step");
    assert_eq!((attempts, max), (3, 4), "a fresh allowance of max_attempts");
    // The dead letter stays, marked; the retry's event names who.
    let (dead, by): (i64, Option<String>) =
        sqlx::query_as("SELECT count(*), max(retried_by) FROM ops_step_dead_letters")
            .fetch_one(&db.pool)
            .await
            .expect("dead letters");
    assert_eq!((dead, by.as_deref()), (1, Some("ann")));
    let event: Value = scalar(
        &db,
        "SELECT payload FROM ops_agent_events WHERE kind = 'mission.retried'",
    )
    .await;
    assert_eq!(event["by"], "ann");
    assert_eq!(event["was"], "failed");

    // Succeeded, running and unknown missions are refused with 3, 3 and 2.
    let out = opsloop(&db.url, &["retry", &mission.to_string()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("is succeeded"), "{}", stderr(&out));
    let slow = propose(&db, &["slow"])["mission_id"]
        .as_i64()
        .expect("mission");
    let out = opsloop(&db.url, &["retry", &slow.to_string()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("is running"), "{}", stderr(&out));
    for bad in ["999", "abc", "0"] {
        let out = opsloop(&db.url, &["retry", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_make_one_and_gates_refuse_with_their_reason() {
    let db = test_db().await;
    let dir = scratch(&db);
    apply(&db, &dir);
    let mission = {
        let _workers = Workers::start(&db.url, 1, 1);
        let id = propose(&db, &["single"])["mission_id"]
            .as_i64()
            .expect("mission");
        wait_status(&db, id, "failed").await;
        id
    };
    // No worker now: the retried mission stays running.
    let retries: Vec<Child> = (0..4)
        .map(|i| {
            opsloop_cmd(Some(&db.url))
                .args(["retry", &mission.to_string(), "--as", &format!("p{i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn retry")
        })
        .collect();
    let codes: Vec<Option<i32>> = retries
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait").status.code())
        .collect();
    assert_eq!(
        codes.iter().filter(|c| **c == Some(0)).count(),
        1,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == Some(3)).count(),
        3,
        "{codes:?}"
    );
    let retried: i64 = scalar(
        &db,
        "SELECT count(*) FROM ops_agent_events WHERE kind = 'mission.retried'",
    )
    .await;
    assert_eq!(retried, 1);
    assert_eq!(mission_status(&db, mission).await, "running");

    // max_running = 1: with one running, a second failed mission cannot be retried.
    let out = opsloop(&db.url, &["cancel", &mission.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = propose(&db, &["single"]);
    let out = opsloop(&db.url, &["retry", &mission.to_string()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("max_running"), "{}", stderr(&out));
    // A paused template refuses a retry with the reason.
    sqlx::query(
        "INSERT INTO ops_policy (key, value) VALUES ('paused_templates', '{\"single\": {\"failures\": 2}}')
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
    )
    .execute(&db.pool)
    .await
    .expect("pause template");
    let out = opsloop(&db.url, &["retry", &mission.to_string()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("is paused"), "{}", stderr(&out));
}

fn alive(pid: i32) -> bool {
    // A zombie is as good as gone; ESRCH means reaped.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_cancels_every_running_mission_and_its_processes_on_every_worker() {
    let db = test_db().await;
    let dir = scratch(&db);
    apply(&db, &dir);
    let _workers = Workers::start(&db.url, 2, 2);
    let missions: Vec<i64> = (1..=3)
        .map(|n| {
            propose(&db, &["nap", &format!("n={n}")])["mission_id"]
                .as_i64()
                .expect("mission")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let pids: Vec<i32> = loop {
        let pids: Vec<i32> = (1..=3)
            .filter_map(|n| std::fs::read_to_string(dir.join(format!("pid-{n}"))).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if pids.len() == 3 {
            break pids;
        }
        assert!(Instant::now() < deadline, "the three steps did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let hosts: i64 = scalar(
        &db,
        "SELECT count(DISTINCT lease_owner) FROM ops_mission_steps WHERE status = 'running'",
    )
    .await;
    assert_eq!(hosts, 2, "the steps run on both worker processes");

    let out = opsloop(&db.url, &["kill", "--reason", "runaway agent", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let killed: Value = serde_json::from_str(&stdout(&out)).expect("kill --json");
    assert_eq!(killed["missions"], serde_json::json!(missions));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) && pids.iter().any(|p| alive(*p)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "processes left alive 10 s after kill"
    );
    for m in &missions {
        assert_eq!(mission_status(&db, *m).await, "cancelled");
    }
    let event: Value = scalar(
        &db,
        "SELECT payload FROM ops_agent_events WHERE kind = 'system.killed'",
    )
    .await;
    assert_eq!(event["cancelled"], 3);
    assert_eq!(event["missions"], serde_json::json!(missions));
    assert_eq!(event["reason"], "runaway agent");
    let status = opsloop(&db.url, &["status", "--json"]);
    let status: Value = serde_json::from_str(&stdout(&status)).expect("status");
    assert_eq!(status["paused"], true);

    // People's proposals are still accepted; nothing runs until resume.
    let later = propose(&db, &["urgent", "n=1"]);
    assert_eq!(later["status"], "approved");
    let later = later["mission_id"].as_i64().expect("mission");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mission_status(&db, later).await, "running");
    let out = opsloop(&db.url, &["resume"]);
    assert!(out.status.success());
    wait_status(&db, later, "succeeded").await;
    // A killed mission can be retried.
    let out = opsloop(&db.url, &["retry", &missions[0].to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Kill again (the retried mission goes too), and let the workers record it.
    let out = opsloop(&db.url, &["kill"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("paused"), "{}", stdout(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    while scalar::<i64>(
        &db,
        "SELECT count(*) FROM ops_mission_steps WHERE status = 'running'",
    )
    .await
        > 0
    {
        assert!(Instant::now() < deadline, "a step is still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_steps_are_claimed_first() {
    let db = test_db().await;
    let dir = scratch(&db);
    apply(&db, &dir);
    // Queued while no worker runs: five low, then five high.
    for n in 1..=5 {
        propose(&db, &["order", &format!("n=low{n}")]);
    }
    for n in 1..=5 {
        let p = propose(&db, &["order", &format!("n=high{n}"), "--priority", "50"]);
        assert_eq!(p["priority"], 50);
    }
    let _workers = Workers::start(&db.url, 1, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while runs(&dir, "order") < 10 {
        assert!(Instant::now() < deadline, "not all ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let order = std::fs::read_to_string(dir.join("order")).expect("order");
    let lines: Vec<&str> = order.lines().collect();
    assert!(
        lines[..5].iter().all(|l| l.starts_with("high")),
        "{lines:?}"
    );
    assert!(lines[5..].iter().all(|l| l.starts_with("low")), "{lines:?}");
    // Missions and steps carry it.
    let high: i64 = scalar(
        &db,
        "SELECT count(*) FROM ops_missions m JOIN ops_mission_steps s ON s.mission_id = m.id
         WHERE m.priority = 50 AND s.priority = 50",
    )
    .await;
    assert_eq!(high, 5);

    // The template's priority is the default; the CLI may set any value in range.
    let p = propose(&db, &["urgent", "n=1"]);
    assert_eq!(p["priority"], 20);
    let p = propose(&db, &["urgent", "n=2", "--priority", "-100"]);
    assert_eq!(p["priority"], -100);
    for bad in ["101", "-101", "abc", "99999999999"] {
        let out = opsloop(&db.url, &["propose", "urgent", "n=3", "--priority", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }
    // `priority` is no param name.
    let out = opsloop(&db.url, &["propose", "urgent", "n=3", "priority=5"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
