//! A held snapshot (issue 14): a `REPEATABLE READ` transaction kept open, like a long
//! `pg_dump`, while the worker drains a steady queue. The worker keeps going (steps/s
//! before, during and after are printed, never asserted), nothing is lost or doubled,
//! `opsloop doctor` warns about the old transaction and the dead rows on the queue
//! tables while it is open, and once it ends VACUUM (what autovacuum runs) clears them.
//!
//! The hold is `OPSLOOP_TEST_HOLD_SECS` seconds (default 8 in CI; the README's figures
//! are from 60).

mod support;

use std::time::{Duration, Instant};

use opsloop::engine::worker::Worker;
use opsloop::store::policy::PolicyCache;
use sqlx::{Connection, PgPool};
use support::{TestDb, opsloop_cmd, stdout, test_db};
use tokio_util::sync::CancellationToken;

const POLICY: &str = r#"
[gates]
max_pending = 1000000

[worker]
concurrency = 16
lease = "5m"

[heartbeat]
interval = "1h"

[templates.q]
risk = "low"
params.n = { pattern = '^\d+$', help = "n" }
steps = [ { name = "a", kind = "noop" }, { name = "b", kind = "noop" } ]
"#;

const TABLES: &str =
    "'ops_mission_steps', 'ops_missions', 'ops_agent_events', 'ops_mission_proposals'";

/// `missions` running missions with their queued first step, as `bench worker` seeds
/// them (bulk, not timed; the scratch database is this test's own).
async fn seed(pool: &PgPool, missions: i32) {
    sqlx::query(
        "WITH p AS (
            INSERT INTO ops_mission_proposals (template, params, risk, proposed_by, source, status, decided_at)
            SELECT 'q', jsonb_build_object('n', g::text), 'low', 'test', 'cli', 'approved', now()
            FROM generate_series(1, $1) g RETURNING id),
         m AS (
            INSERT INTO ops_missions (proposal_id, template, status, started_at)
            SELECT id, 'q', 'running', now() FROM p RETURNING id)
         INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, status)
         SELECT m.id, s, CASE WHEN s = 1 THEN 'a' ELSE 'b' END, 'noop', '{\"kind\":\"noop\"}',
                CASE WHEN s = 1 THEN 'queued' ELSE 'waiting' END
         FROM m, generate_series(1, 2) s",
    )
    .bind(missions)
    .execute(pool)
    .await
    .expect("seed");
    sqlx::query("SELECT pg_notify('ops_steps_ready', '')")
        .execute(pool)
        .await
        .expect("notify");
}

async fn succeeded(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ops_mission_steps WHERE status = 'succeeded'")
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn queued(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM ops_mission_steps WHERE status IN ('queued', 'waiting')",
    )
    .fetch_one(pool)
    .await
    .expect("count")
}

/// (dead rows, total bytes) over the queue tables.
async fn dead_and_size(pool: &PgPool) -> (i64, i64) {
    let _ = sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(pool)
        .await;
    sqlx::query_as(&format!(
        "SELECT coalesce(sum(n_dead_tup), 0)::bigint,
                coalesce(sum(pg_total_relation_size(relid)), 0)::bigint
         FROM pg_stat_user_tables WHERE relname IN ({TABLES})"
    ))
    .fetch_one(pool)
    .await
    .expect("stats")
}

/// Steps/s over `window` while a feeder keeps the queue from running dry.
async fn rate(pool: &PgPool, window: Duration) -> f64 {
    let (start, t0) = (succeeded(pool).await, Instant::now());
    while t0.elapsed() < window {
        if queued(pool).await < 8_000 {
            seed(pool, 5_000).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (succeeded(pool).await - start) as f64 / t0.elapsed().as_secs_f64()
}

async fn doctor(db: &TestDb) -> String {
    let url = db.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        opsloop_cmd(Some(&url))
            .args(["doctor", "--max-transaction-age", "2s"])
            .env("OPSLOOP_HTTP_ADDR", "127.0.0.1:0")
            .output()
            .expect("doctor")
    })
    .await
    .expect("join");
    stdout(&out)
}

fn line<'a>(text: &'a str, check: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(&format!("{check}:")))
        .unwrap_or_else(|| panic!("no {check} line in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_snapshot_slows_nothing_to_a_stop_loses_nothing_and_doctor_warns() {
    let hold: u64 = std::env::var("OPSLOOP_TEST_HOLD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let window = Duration::from_secs(hold.clamp(3, 10));
    let db = test_db().await;
    opsloop::store::policy::apply(&db.pool, POLICY, "test")
        .await
        .expect("policy");
    let cache = PolicyCache::default();
    cache.refresh(&db.pool).await.expect("policy");
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(db.pool.clone(), cache, 16).run(stop.clone(), Duration::from_secs(5)),
    );
    seed(&db.pool, 5_000).await;
    let before = rate(&db.pool, window).await;

    // The snapshot: like pg_dump, one REPEATABLE READ transaction that has read.
    let mut dump = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM ops_mission_steps")
        .execute(&mut dump)
        .await
        .expect("snapshot");
    let (dead_at_start, size_at_start) = dead_and_size(&db.pool).await;
    let held = Instant::now();
    let done_at_hold = succeeded(&db.pool).await;
    let during = rate(&db.pool, Duration::from_secs(hold)).await;
    let (dead_held, size_held) = dead_and_size(&db.pool).await;
    let done_held = succeeded(&db.pool).await;
    let text = doctor(&db).await;
    assert!(line(&text, "transactions").starts_with("warn"), "{text}");
    assert!(line(&text, "transactions").contains("pid "), "{text}");
    // VACUUM now cannot remove what the snapshot may still see.
    sqlx::query("VACUUM ops_mission_steps")
        .execute(&db.pool)
        .await
        .expect("vacuum");
    let (dead_vacuumed_held, _) = dead_and_size(&db.pool).await;
    // Doctor's rule: a queue table with at least 10,000 dead rows, more than its live ones.
    let bloated: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_user_tables WHERE relname IN ({TABLES})
                          AND n_dead_tup >= 10000 AND n_dead_tup > n_live_tup)"
    ))
    .fetch_one(&db.pool)
    .await
    .expect("stats");
    if bloated {
        assert!(line(&text, "bloat").starts_with("warn"), "{text}");
    } else {
        println!("(the load made too few dead rows for doctor's bloat warning)");
    }
    sqlx::raw_sql("COMMIT")
        .execute(&mut dump)
        .await
        .expect("commit");
    let held_for = held.elapsed();
    dump.close().await.expect("close");

    // What autovacuum does once the snapshot is gone (the test does not wait for it).
    sqlx::query(&format!("VACUUM {}", TABLES.replace('\'', "")))
        .execute(&db.pool)
        .await
        .expect("vacuum");
    let (dead_vacuumed, size_vacuumed) = dead_and_size(&db.pool).await;
    let done_vacuumed = succeeded(&db.pool).await;
    let after = rate(&db.pool, window).await;
    let (_, size_after) = dead_and_size(&db.pool).await;
    let done_after = succeeded(&db.pool).await;
    // Stop feeding; the queue drains.
    let deadline = Instant::now() + Duration::from_secs(300);
    while queued(&db.pool).await > 0 {
        assert!(Instant::now() < deadline, "the queue did not drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ops_mission_steps WHERE status <> 'succeeded'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("count");
        if running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{running} steps never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    let _ = worker.await;
    // Nothing lost, nothing doubled: every step succeeded in one attempt.
    let (steps, retried): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE attempts <> 1) FROM ops_mission_steps",
    )
    .fetch_one(&db.pool)
    .await
    .expect("steps");
    assert_eq!(retried, 0, "a step ran more than once");
    let missions: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_missions")
        .fetch_one(&db.pool)
        .await
        .expect("missions");
    assert_eq!(steps, missions * 2, "every mission has both its steps");

    // Vacuumed again, as autovacuum would by now: the draining made dead rows of its own
    // (a fast worker makes more than the live rows before autovacuum's next turn).
    sqlx::query(&format!("VACUUM {}", TABLES.replace('\'', "")))
        .execute(&db.pool)
        .await
        .expect("vacuum");
    let text = doctor(&db).await;
    assert!(line(&text, "transactions").starts_with("ok"), "{text}");
    assert!(line(&text, "bloat").starts_with("ok"), "{text}");
    assert!(
        dead_vacuumed < dead_vacuumed_held.max(1),
        "VACUUM after the snapshot cleared nothing: {dead_vacuumed} dead rows (held: {dead_vacuumed_held})"
    );
    // Growth per 1000 steps: under the snapshot every update's old version stays; after
    // VACUUM updates reuse the space it freed, so the tables grow by the new rows only.
    let per_k = |bytes: i64, steps: i64| bytes as f64 / 1024.0 / (steps.max(1) as f64 / 1000.0);
    println!(
        "held snapshot {:.0}s: steps/s before {before:.0}, during {during:.0}, after {after:.0} \
         (during/before {:.2}, after/before {:.2}); queue tables dead rows {dead_at_start} at the \
         start → {dead_held} held (VACUUM while held left {dead_vacuumed_held}) → {dead_vacuumed} \
         after VACUUM; size {} kB → {} kB held → {} kB after; growth {:.0} kB per 1000 steps held, \
         {:.0} after VACUUM; {steps} steps, none lost or retried",
        held_for.as_secs_f64(),
        during / before.max(1.0),
        after / before.max(1.0),
        size_at_start / 1024,
        size_held / 1024,
        size_after / 1024,
        per_k(size_held - size_at_start, done_held - done_at_hold),
        per_k(size_after - size_vacuumed, done_after - done_vacuumed),
    );
}
