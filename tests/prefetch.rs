//! What a worker holds beyond its slots. After tiny steps it prefetches (holds more
//! leased steps than it has slots, so claims batch); long steps that arrive then must
//! not wait in its hands while another worker is free: a held step that waited a
//! second for a slot goes back to the queue.

mod support;

use std::time::{Duration, Instant};

use opsloop::engine::worker::Worker;
use opsloop::store::policy::PolicyCache;
use support::{TestDb, test_db};
use tokio_util::sync::CancellationToken;

const POLICY: &str = r#"
[worker]
lease = "10s"

[templates.tiny]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "n", kind = "noop" } ]

[templates.long]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "nap", kind = "sleep", for = "3s" } ]
"#;

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start_worker(db: &TestDb, concurrency: usize) -> Running {
    let cache = PolicyCache::default();
    cache.refresh(&db.pool).await.expect("refresh");
    let stop = CancellationToken::new();
    let worker = Worker::new(db.pool.clone(), cache, concurrency);
    let token = stop.clone();
    let task = tokio::spawn(async move {
        worker
            .run(token, Duration::from_secs(5))
            .await
            .expect("worker");
    });
    Running { stop, task }
}

async fn propose(db: &TestDb, template: &str, n: usize) -> i64 {
    let policy = opsloop::domain::policy::parse(POLICY).expect("policy");
    let p = support::propose(&db.pool, &policy, template, &[("n", &n.to_string())]).await;
    p.mission_id.expect("low risk starts a mission")
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect("query")
}

async fn wait_until(db: &TestDb, sql: &str, want: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while scalar(db, sql).await != want {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_steps_held_after_tiny_ones_go_back_to_a_free_worker() {
    let db = test_db().await;
    opsloop::store::policy::apply(&db.pool, POLICY, "test")
        .await
        .expect("apply");
    // One slot, warmed up on tiny steps: it now holds up to 64 steps.
    let first = start_worker(&db, 1).await;
    for n in 0..40 {
        propose(&db, "tiny", n).await;
    }
    wait_until(
        &db,
        "SELECT count(*) FROM ops_missions WHERE status = 'succeeded'",
        40,
        "the tiny missions did not finish",
    )
    .await;
    let long = 4;
    for n in 0..long {
        propose(&db, "long", n).await;
    }
    // It took them all: one asleep, the rest held for its one slot.
    wait_until(
        &db,
        "SELECT count(*) FROM ops_mission_steps WHERE name = 'nap' AND status = 'running'",
        long as i64,
        "the first worker did not take the long steps",
    )
    .await;
    let holder: String = sqlx::query_scalar(
        "SELECT min(lease_owner) FROM ops_mission_steps WHERE name = 'nap' AND status = 'running'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("owner");
    let second = start_worker(&db, 4).await;
    wait_until(
        &db,
        "SELECT count(*) FROM ops_missions WHERE status = 'succeeded'",
        40 + long as i64,
        "the long missions did not finish",
    )
    .await;
    // Each nap ran once (one attempt record each), not all of them on the first worker.
    let ran: Vec<(String, i32)> = sqlx::query_as(
        "SELECT r.worker, r.attempt FROM ops_action_runs r
         JOIN ops_mission_steps s ON s.id = r.step_id
         WHERE r.kind = 'step' AND s.name = 'nap'",
    )
    .fetch_all(&db.pool)
    .await
    .expect("ran");
    assert_eq!(ran.len(), long, "{ran:?}");
    assert!(ran.iter().all(|(_, attempts)| *attempts == 1), "{ran:?}");
    let by_first = ran.iter().filter(|(w, _)| *w == holder).count();
    assert!(
        by_first < long,
        "the first worker ran all {long} long steps one after another ({ran:?})"
    );
    for w in [first, second] {
        w.stop.cancel();
        let _ = w.task.await;
    }
}
