//! The step worker with real child processes and a real HTTP server (issue 3, "Done when" 1).

mod support;

use std::time::{Duration, Instant};

use opsloop::domain::vocab::Source;
use opsloop::engine::missions::progress::{self, Ending, Lease};
use opsloop::engine::worker::Worker;
use opsloop::engine::{gates, heartbeat};
use opsloop::store::policy::PolicyCache;
use opsloop::store::steps;
use support::{TestDb, test_db};
use tokio_util::sync::CancellationToken;

const POLICY: &str = r#"
[worker]
concurrency = 4
lease = "1s"
max_attempts = 3
backoff = { base = "200ms", max = "2s" }

[templates.three]
risk = "low"
params.file = { pattern = '^/[A-Za-z0-9/_.-]+$', help = "a file" }
steps = [
  { name = "one",   kind = "shell", run = ["sh", "-c", "echo one >> \"$OPSLOOP_PARAM_FILE\""] },
  { name = "two",   kind = "shell", run = ["sh", "-c", "echo two >> \"$OPSLOOP_PARAM_FILE\""] },
  { name = "three", kind = "shell", run = ["sh", "-c", "echo three-$OPSLOOP_ATTEMPT >> \"$OPSLOOP_PARAM_FILE\""] },
]

[templates.announce]
risk = "low"
params.file = { pattern = '^/[A-Za-z0-9/_.-]+$', help = "a file" }
steps = [
  { name = "work", kind = "noop" },
  { name = "tell", kind = "emit", event = "work.done", payload = { file = "{file}" } },
]

# Only so that mission.succeeded has a listener (no test here ticks an announce event).
[[reactions]]
name = "after-announce"
on = "mission.succeeded"
where = { template = "announce" }
propose = "long"

[templates.flaky]
risk = "low"
steps = [
  { name = "fails", kind = "shell", run = ["sh", "-c", "echo boom >&2; exit 3"] },
  { name = "never", kind = "noop" },
]

[templates.slow]
risk = "low"
params.file = { pattern = '^/[A-Za-z0-9/_.-]+$', help = "a file" }
steps = [ { name = "hang", kind = "shell", max_attempts = 1, timeout = "1s",
            run = ["sh", "-c", "sleep 60 & echo $! > \"$OPSLOOP_PARAM_FILE\"; wait"] } ]

[templates.sleeper]
risk = "low"
params.file = { pattern = '^/[A-Za-z0-9/_.-]+$', help = "a file" }
steps = [ { name = "sleep", kind = "shell", run = ["sh", "-c", "echo $$ > \"$OPSLOOP_PARAM_FILE\"; exec sleep 60"] } ]

# Fails after 1s, leaving a child that holds its pipes; writes a marker just before.
[templates.late]
risk = "low"
params.file = { pattern = '^/[A-Za-z0-9/_.-]+$', help = "a file" }
steps = [ { name = "late", kind = "shell",
            run = ["sh", "-c", "echo run $OPSLOOP_ATTEMPT >> \"$OPSLOOP_PARAM_FILE\"; sleep 30 & sleep 1; echo exiting > \"$OPSLOOP_PARAM_FILE.exit\"; exit 1"] } ]

[templates.nul]
risk = "low"
steps = [ { name = "nul", kind = "shell", run = ["printf", "a\\000b"] }, { name = "after", kind = "noop" } ]

[templates.long]
risk = "low"
steps = [ { name = "long", kind = "shell", run = ["sleep", "3.5"] } ]

[templates.call]
risk = "low"
params.path = { pattern = '^/[a-z0-9/]*$', help = "a path" }
params.port = { pattern = '^\d+$', help = "a port" }
steps = [ { name = "call", kind = "http", method = "POST", url = "http://127.0.0.1:{port}{path}",
            json = { hello = "world" }, expect = [200], timeout = "500ms", max_attempts = 1 } ]
"#;

struct Loop {
    db: TestDb,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

async fn start() -> Loop {
    let db = test_db().await;
    opsloop::store::policy::apply(&db.pool, POLICY, "test")
        .await
        .expect("apply");
    let cache = PolicyCache::default();
    cache.refresh(&db.pool).await.expect("refresh");
    let stop = CancellationToken::new();
    let worker = Worker::new(db.pool.clone(), cache, 4);
    let token = stop.clone();
    let worker = tokio::spawn(async move {
        worker
            .run(token, Duration::from_secs(5))
            .await
            .expect("worker");
    });
    Loop { db, stop, worker }
}

impl Loop {
    async fn propose(&self, template: &str, params: &[(&str, &str)]) -> i64 {
        let policy = opsloop::domain::policy::parse(POLICY).expect("policy");
        let p = support::propose(&self.db.pool, &policy, template, params).await;
        p.mission_id.expect("low risk starts a mission")
    }

    async fn mission_status(&self, id: i64) -> String {
        sqlx::query_scalar("SELECT status FROM ops_missions WHERE id = $1")
            .bind(id)
            .fetch_one(&self.db.pool)
            .await
            .expect("status")
    }

    async fn wait_mission(&self, id: i64, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.mission_status(id).await;
            if status != "running" || Instant::now() > deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn wait_step_status(&self, mission: i64, want: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let s: Option<String> = sqlx::query_scalar(
                "SELECT status FROM ops_mission_steps WHERE mission_id = $1 AND seq = 1",
            )
            .bind(mission)
            .fetch_optional(&self.db.pool)
            .await
            .expect("step");
            if s.as_deref() == Some(want) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    async fn kinds(&self, mission: i64) -> Vec<String> {
        sqlx::query_scalar("SELECT kind FROM ops_agent_events WHERE mission_id = $1 ORDER BY id")
            .bind(mission)
            .fetch_all(&self.db.pool)
            .await
            .expect("events")
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.worker.await;
    }
}

fn temp_file(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("opsloop-worker-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path.to_string_lossy().into_owned()
}

fn alive(pid: i32) -> bool {
    // A zombie (killed, not yet reaped by an init that does not reap) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_step_mission_runs_in_order_and_succeeds() {
    let l = start().await;
    let file = temp_file("three.txt");
    let mission = l.propose("three", &[("file", &file)]).await;
    assert_eq!(
        l.wait_mission(mission, Duration::from_secs(10)).await,
        "succeeded"
    );
    assert_eq!(
        std::fs::read_to_string(&file).expect("file"),
        "one\ntwo\nthree-1\n"
    );
    assert_eq!(
        l.kinds(mission).await,
        [
            "mission.started",
            "step.started",
            "step.succeeded",
            "step.started",
            "step.succeeded",
            "step.started",
            "step.succeeded",
            "mission.succeeded"
        ]
    );
    let result: serde_json::Value = sqlx::query_scalar(
        "SELECT result FROM ops_mission_steps WHERE mission_id = $1 AND seq = 1",
    )
    .bind(mission)
    .fetch_one(&l.db.pool)
    .await
    .expect("result");
    assert_eq!(result["exit_code"], 0);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_action_runs WHERE kind = 'step'")
        .fetch_one(&l.db.pool)
        .await
        .expect("runs");
    assert_eq!(runs, 3);
    l.stop().await;
}

/// An `emit` step's event is part of its step: it comes before `mission.succeeded`,
/// and carries the substituted payload. Of the events the worker writes, only the one a
/// reaction rule listens to (`mission.succeeded`) waits for the tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emit_steps_event_comes_before_its_mission_succeeds() {
    let l = start().await;
    let mission = l.propose("announce", &[("file", "/tmp/x")]).await;
    assert_eq!(
        l.wait_mission(mission, Duration::from_secs(10)).await,
        "succeeded"
    );
    assert_eq!(
        l.kinds(mission).await,
        [
            "mission.started",
            "step.started",
            "step.succeeded",
            "step.started",
            "step.succeeded",
            "work.done",
            "mission.succeeded"
        ]
    );
    let payload: serde_json::Value = sqlx::query_scalar(
        "SELECT payload FROM ops_agent_events WHERE kind = 'work.done' AND mission_id = $1",
    )
    .bind(mission)
    .fetch_one(&l.db.pool)
    .await
    .expect("payload");
    assert_eq!(payload["file"], "/tmp/x");
    let waiting: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM ops_agent_events WHERE mission_id = $1 AND processed_at IS NULL",
    )
    .bind(mission)
    .fetch_all(&l.db.pool)
    .await
    .expect("unprocessed");
    assert_eq!(waiting, ["mission.succeeded"]);
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_retries_with_growing_delays_then_dead_letters() {
    let l = start().await;
    let mission = l.propose("flaky", &[]).await;
    assert_eq!(
        l.wait_mission(mission, Duration::from_secs(15)).await,
        "failed"
    );
    let steps: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT status, attempts, error FROM ops_mission_steps WHERE mission_id = $1 ORDER BY seq",
    )
    .bind(mission)
    .fetch_all(&l.db.pool)
    .await
    .expect("steps");
    assert_eq!((steps[0].0.as_str(), steps[0].1), ("failed", 3));
    assert!(
        steps[0]
            .2
            .as_deref()
            .unwrap_or("")
            .contains("exit status 3"),
        "{:?}",
        steps[0].2
    );
    assert_eq!(steps[1].0, "cancelled");
    let dead: (String, i32, String) = sqlx::query_as(
        "SELECT name, attempts, last_error FROM ops_step_dead_letters WHERE mission_id = $1",
    )
    .bind(mission)
    .fetch_one(&l.db.pool)
    .await
    .expect("dead letter");
    assert_eq!((dead.0.as_str(), dead.1), ("fails", 3));
    let kinds = l.kinds(mission).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "step.retrying").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(kinds.last().map(String::as_str), Some("mission.failed"));
    assert!(kinds.contains(&"step.failed".to_string()));
    // Delays grow: base 200ms, then 400ms (plus jitter).
    let starts: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT created_at FROM ops_agent_events WHERE mission_id = $1 AND kind = 'step.started' ORDER BY id",
    )
    .bind(mission)
    .fetch_all(&l.db.pool)
    .await
    .expect("starts");
    let gap1 = (starts[1] - starts[0]).num_milliseconds();
    let gap2 = (starts[2] - starts[1]).num_milliseconds();
    assert!(gap1 >= 200 && gap2 >= 400, "gaps {gap1}ms, {gap2}ms");
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_timeout_is_killed_with_its_children() {
    let l = start().await;
    let pidfile = temp_file("grandchild.pid");
    let started = Instant::now();
    let mission = l.propose("slow", &[("file", &pidfile)]).await;
    assert_eq!(
        l.wait_mission(mission, Duration::from_secs(10)).await,
        "failed"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    let error: String =
        sqlx::query_scalar("SELECT error FROM ops_mission_steps WHERE mission_id = $1")
            .bind(mission)
            .fetch_one(&l.db.pool)
            .await
            .expect("error");
    assert!(error.contains("timed out"), "{error}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("number");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !alive(pid),
        "the grandchild sleep {pid} survived the timeout"
    );
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_a_running_sleep() {
    let l = start().await;
    let pidfile = temp_file("sleeper.pid");
    let mission = l.propose("sleeper", &[("file", &pidfile)]).await;
    assert!(
        l.wait_step_status(mission, "running", Duration::from_secs(5))
            .await
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&pidfile)
        .map(|s| s.trim().is_empty())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "the step never wrote its pid");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("number");
    assert!(alive(pid));
    opsloop::engine::missions::cancel(&l.db.pool, mission, "test", "cli")
        .await
        .expect("cancel");
    assert!(
        l.wait_step_status(mission, "cancelled", Duration::from_secs(5))
            .await,
        "step not cancelled"
    );
    assert!(!alive(pid), "sleep {pid} still runs after cancel");
    assert_eq!(l.mission_status(mission).await, "cancelled");
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_step_keeps_its_lease_by_renewal() {
    let l = start().await;
    let mission = l.propose("long", &[]).await;
    // Tick all along: an unrenewed 1s lease would be recovered by these.
    let policy = opsloop::domain::policy::parse(POLICY).expect("policy");
    let deadline = Instant::now() + Duration::from_secs(10);
    while l.mission_status(mission).await == "running" && Instant::now() < deadline {
        heartbeat::tick(&l.db.pool, &policy).await.expect("tick");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(l.mission_status(mission).await, "succeeded");
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM ops_mission_steps WHERE mission_id = $1")
            .bind(mission)
            .fetch_one(&l.db.pool)
            .await
            .expect("attempts");
    assert_eq!(attempts, 1, "the step was never recovered or retried");
    assert!(
        !l.kinds(mission)
            .await
            .contains(&"step.recovered".to_string())
    );
    l.stop().await;
}

async fn http_server() -> u16 {
    use axum::routing::post;
    let app = axum::Router::new()
        .route(
            "/ok",
            post(|body: axum::Json<serde_json::Value>| async move { axum::Json(body.0) }),
        )
        .route(
            "/broken",
            post(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down") }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_steps_succeed_fail_on_status_and_time_out() {
    let l = start().await;
    let port = http_server().await.to_string();
    let ok = l.propose("call", &[("port", &port), ("path", "/ok")]).await;
    let broken = l
        .propose("call", &[("port", &port), ("path", "/broken")])
        .await;
    let slow = l
        .propose("call", &[("port", &port), ("path", "/slow")])
        .await;
    assert_eq!(
        l.wait_mission(ok, Duration::from_secs(10)).await,
        "succeeded"
    );
    assert_eq!(
        l.wait_mission(broken, Duration::from_secs(10)).await,
        "failed"
    );
    assert_eq!(
        l.wait_mission(slow, Duration::from_secs(10)).await,
        "failed"
    );
    let result: serde_json::Value =
        sqlx::query_scalar("SELECT result FROM ops_mission_steps WHERE mission_id = $1")
            .bind(ok)
            .fetch_one(&l.db.pool)
            .await
            .expect("result");
    assert_eq!(result["status"], 200);
    assert!(
        result["body"].as_str().unwrap_or("").contains("world"),
        "{result}"
    );
    for (mission, words) in [(broken, "500"), (slow, "timed out")] {
        let error: String =
            sqlx::query_scalar("SELECT error FROM ops_mission_steps WHERE mission_id = $1")
                .bind(mission)
                .fetch_one(&l.db.pool)
                .await
                .expect("error");
        assert!(error.contains(words), "{error}");
    }
    l.stop().await;
}

/// The issue's repro: the attempt fails (exit 1) after the cancel, while a child it left
/// still holds its pipes. The cancel wins: no retry, no second run, no dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_an_attempt_ends_in_failure_is_final() {
    let l = start().await;
    let runs = temp_file("late-runs.txt");
    let exited = format!("{runs}.exit");
    let _ = std::fs::remove_file(&exited);
    let mission = l.propose("late", &[("file", &runs)]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::path::Path::new(&exited).exists() {
        assert!(Instant::now() < deadline, "the step never got to its exit");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    opsloop::engine::missions::cancel(&l.db.pool, mission, "test", "cli")
        .await
        .expect("cancel");
    assert!(
        l.wait_step_status(mission, "cancelled", Duration::from_secs(15))
            .await,
        "step not cancelled"
    );
    // Longer than the retry backoff (200ms + jitter): a wrongful retry would show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(std::fs::read_to_string(&runs).expect("runs"), "run 1\n");
    assert_eq!(
        l.kinds(mission).await,
        ["mission.started", "step.started", "mission.cancelled"]
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_step_dead_letters")
        .fetch_one(&l.db.pool)
        .await
        .expect("dead letters");
    assert_eq!(dead, 0);
    assert_eq!(l.mission_status(mission).await, "cancelled");
    l.stop().await;
}

/// The database alone, no worker: a test claims and reports as a worker would.
async fn bare() -> (support::TestDb, opsloop::domain::policy::Policy) {
    let db = test_db().await;
    opsloop::store::policy::apply(&db.pool, POLICY, "test")
        .await
        .expect("apply");
    (db, opsloop::domain::policy::parse(POLICY).expect("policy"))
}

/// A mission of `flaky` (its first step fails), started.
async fn flaky_mission(db: &TestDb, policy: &opsloop::domain::policy::Policy) -> i64 {
    support::propose(&db.pool, policy, "flaky", &[])
        .await
        .mission_id
        .expect("mission")
}

async fn claim_one(db: &TestDb) -> steps::Claimed {
    let mut claimed = steps::claim_ready(&db.pool, "test-worker", 10, Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    claimed.remove(0)
}

async fn report(db: &TestDb, step: &steps::Claimed, ending: Ending) -> bool {
    let lease = Lease {
        step_id: step.id,
        owner: "test-worker".into(),
        attempt: step.attempts,
    };
    let mut tx = db.pool.begin().await.expect("begin");
    let stored = progress::finish(&mut tx, &lease, &ending, &support::policy())
        .await
        .expect("finish");
    tx.commit().await.expect("commit");
    stored
}

fn failure() -> Ending {
    Ending::Failed {
        error: "exit status 1".into(),
        result: serde_json::json!({ "exit_code": 1 }),
        retry_in: Duration::ZERO,
    }
}

async fn step_row(db: &TestDb, id: i64) -> (String, i32) {
    sqlx::query_as("SELECT status, attempts FROM ops_mission_steps WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("step")
}

async fn event_kinds(db: &TestDb, mission: i64) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM ops_agent_events WHERE mission_id = $1 ORDER BY id")
        .bind(mission)
        .fetch_all(&db.pool)
        .await
        .expect("events")
}

/// An attempt that fails (or would emit its event) after its mission was cancelled ends
/// the step cancelled: not queued for a retry, not dead-lettered, no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_ending_after_the_cancel_ends_the_step_cancelled() {
    let (db, policy) = bare().await;
    let flaky = flaky_mission(&db, &policy).await;
    let step = claim_one(&db).await;
    opsloop::engine::missions::cancel(&db.pool, flaky, "test", "cli")
        .await
        .expect("cancel");
    assert!(report(&db, &step, failure()).await, "the lease still holds");
    assert_eq!(step_row(&db, step.id).await, ("cancelled".into(), 1));
    assert_eq!(
        event_kinds(&db, flaky).await,
        ["mission.started", "step.started", "mission.cancelled"]
    );

    // An `emit` step's event is its work: after the cancel it is not written.
    let announce = support::propose(&db.pool, &policy, "announce", &[("file", "/tmp/x")])
        .await
        .mission_id
        .expect("mission");
    let work = claim_one(&db).await;
    let done = Ending::Succeeded {
        result: serde_json::json!({}),
        output: serde_json::json!({}),
    };
    assert!(report(&db, &work, done).await);
    let tell = claim_one(&db).await;
    opsloop::engine::missions::cancel(&db.pool, announce, "test", "cli")
        .await
        .expect("cancel");
    let emitted = Ending::Succeeded {
        result: serde_json::json!({ "event": "work.done", "payload": { "file": "/tmp/x" } }),
        output: serde_json::json!({}),
    };
    assert!(report(&db, &tell, emitted).await);
    assert_eq!(step_row(&db, tell.id).await, ("cancelled".into(), 1));
    let kinds = event_kinds(&db, announce).await;
    assert!(!kinds.contains(&"work.done".to_string()), "{kinds:?}");
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_step_dead_letters")
        .fetch_one(&db.pool)
        .await
        .expect("dead letters");
    assert_eq!(dead, 0);
}

/// A queued step of a mission that is no longer running is never claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_of_a_mission_that_is_not_running_is_not_claimed() {
    let (db, policy) = bare().await;
    let mission = flaky_mission(&db, &policy).await;
    // What a lost race used to leave behind: the mission cancelled, its step queued.
    sqlx::query("UPDATE ops_missions SET status = 'cancelled', finished_at = now() WHERE id = $1")
        .bind(mission)
        .execute(&db.pool)
        .await
        .expect("cancel by hand");
    let claimed = steps::claim_ready(&db.pool, "test-worker", 10, Duration::from_secs(60))
        .await
        .expect("claim");
    assert!(claimed.is_empty(), "{claimed:?}");
}

/// Paused, nothing is claimed (`ops_paused()`, the switch the gates read); resumed, the
/// step that waited is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_steps_wait_and_run_after_resume() {
    let (db, policy) = bare().await;
    let mission = flaky_mission(&db, &policy).await;
    let mut conn = db.pool.acquire().await.expect("conn");
    assert!(
        gates::set_paused(&mut conn, true, Source::Cli, "test")
            .await
            .expect("pause")
    );
    let claimed = steps::claim_ready(&db.pool, "test-worker", 10, Duration::from_secs(60))
        .await
        .expect("claim");
    assert!(claimed.is_empty(), "{claimed:?}");
    assert!(
        gates::set_paused(&mut conn, false, Source::Cli, "test")
            .await
            .expect("resume")
    );
    assert_eq!(claim_one(&db).await.mission_id, mission);
}

/// Run `work` while a cancel of `mission` is in progress: `missions::cancel`'s
/// statements (mission locked and cancelled, its queued steps cancelled) done but not
/// committed. The cancel commits once `work` has finished or waits for a lock.
async fn racing_a_cancel<T: Send + 'static>(
    db: &TestDb,
    mission: i64,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let mut cancel = db.pool.begin().await.expect("begin");
    sqlx::query("SELECT status FROM ops_missions WHERE id = $1 FOR UPDATE")
        .bind(mission)
        .execute(&mut *cancel)
        .await
        .expect("lock");
    sqlx::query("UPDATE ops_missions SET status = 'cancelled', finished_at = now() WHERE id = $1")
        .bind(mission)
        .execute(&mut *cancel)
        .await
        .expect("cancel");
    sqlx::query(
        "UPDATE ops_mission_steps SET status = 'cancelled', finished_at = now()
         WHERE mission_id = $1 AND status IN ('queued', 'waiting')",
    )
    .bind(mission)
    .execute(&mut *cancel)
    .await
    .expect("cancel steps");
    let work = tokio::spawn(work);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("activity");
        if work.is_finished() || waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the work neither ended nor waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.commit().await.expect("commit the cancel");
    work.await.expect("work")
}

/// A failed attempt stored while a cancel of its mission is in progress waits for it,
/// then ends the step cancelled (no retry queued behind the cancel's back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ending_racing_a_cancel_sees_it() {
    let (db, policy) = bare().await;
    let mission = flaky_mission(&db, &policy).await;
    let step = claim_one(&db).await;
    let lease = Lease {
        step_id: step.id,
        owner: "test-worker".into(),
        attempt: step.attempts,
    };
    let pool = db.pool.clone();
    let stored = racing_a_cancel(&db, mission, async move {
        let mut tx = pool.begin().await.expect("begin");
        let stored = progress::finish(&mut tx, &lease, &failure(), &support::policy())
            .await
            .expect("finish");
        tx.commit().await.expect("commit");
        stored
    })
    .await;
    assert!(stored);
    assert_eq!(step_row(&db, step.id).await, ("cancelled".into(), 1));
    let kinds = event_kinds(&db, mission).await;
    assert!(!kinds.contains(&"step.retrying".to_string()), "{kinds:?}");
}

/// Lease recovery racing a cancel: the expired step of the cancelled mission ends
/// cancelled, it is not queued again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_recovery_racing_a_cancel_sees_it() {
    let (db, policy) = bare().await;
    let mission = flaky_mission(&db, &policy).await;
    let step = claim_one(&db).await;
    sqlx::query(
        "UPDATE ops_mission_steps SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(step.id)
    .execute(&db.pool)
    .await
    .expect("expire the lease");
    let pool = db.pool.clone();
    racing_a_cancel(&db, mission, async move {
        heartbeat::tick(&pool, &policy).await.expect("tick")
    })
    .await;
    assert_eq!(step_row(&db, step.id).await, ("cancelled".into(), 1));
    let kinds = event_kinds(&db, mission).await;
    assert!(!kinds.contains(&"step.recovered".to_string()), "{kinds:?}");
}

/// A step given back (at shutdown, or held too long to start) while a cancel of its
/// mission is in progress waits for it, then ends cancelled: not queued behind the
/// cancel's back, where no worker would ever claim it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_racing_a_cancel_sees_it() {
    let (db, policy) = bare().await;
    let mission = flaky_mission(&db, &policy).await;
    let step = claim_one(&db).await;
    let (pool, id, attempt) = (db.pool.clone(), step.id, step.attempts);
    let released = racing_a_cancel(&db, mission, async move {
        steps::release(&pool, "test-worker", id, attempt)
            .await
            .expect("release")
    })
    .await;
    assert!(released, "the lease was held");
    assert_eq!(step_row(&db, step.id).await, ("cancelled".into(), 0));

    // Without a cancel, it is queued again, its attempt not counted.
    let running = flaky_mission(&db, &policy).await;
    let step = claim_one(&db).await;
    assert_eq!(step.mission_id, running);
    assert!(
        steps::release(&db.pool, "test-worker", step.id, step.attempts)
            .await
            .expect("release")
    );
    assert_eq!(step_row(&db, step.id).await, ("queued".into(), 0));
}

/// A NUL byte in a step's output once made its result unstorable (PostgreSQL refuses
/// NUL in text): the batch was retried, then dropped, and the step ran again.
#[tokio::test]
async fn a_nul_byte_in_output_is_stored_as_a_replacement_character() {
    let l = start().await;
    let mission = l.propose("nul", &[]).await;
    assert_eq!(
        l.wait_mission(mission, Duration::from_secs(20)).await,
        "succeeded"
    );
    let (stdout, attempts): (String, i32) = sqlx::query_as(
        "SELECT result->>'stdout', attempts FROM ops_mission_steps WHERE mission_id = $1 AND seq = 1",
    )
    .bind(mission)
    .fetch_one(&l.db.pool)
    .await
    .expect("step");
    assert_eq!(stdout, "a\u{FFFD}b");
    assert_eq!(attempts, 1);
    l.stop.cancel();
}
