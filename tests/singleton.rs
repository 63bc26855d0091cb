//! Singletons by advisory lock (`db::singleton`): two holders never work at once, a
//! holder whose connection is killed steps down and another takes over, and a
//! heartbeat tick that loses its lock stops before its next phase.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opsloop::db::locks::LockKey;
use opsloop::db::singleton::{self, Singleton};
use sqlx::PgPool;
use support::test_db;
use tokio_util::sync::CancellationToken;

const KEY: LockKey = LockKey::Two(0x6f70_7e57, -42);

#[derive(Default)]
struct Log {
    inside: Option<&'static str>,
    /// Who started working, in order.
    turns: Vec<&'static str>,
    /// Anything that shows two at once.
    overlaps: Vec<String>,
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// Leaves on drop, so a holder cut off mid-work leaves too.
struct Inside(Arc<Mutex<Log>>, &'static str);

impl Drop for Inside {
    fn drop(&mut self) {
        let mut log = lock(&self.0);
        if log.inside == Some(self.1) {
            log.inside = None;
        }
    }
}

/// A holder that works until told to stop, marking when it is inside.
fn holder(
    pool: &PgPool,
    name: &'static str,
    retry: Duration,
    log: Arc<Mutex<Log>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let singleton = Singleton::new(pool, KEY, name)
        .ping_every(Duration::from_millis(200))
        .lease(Duration::from_secs(1))
        .retry_every(retry);
    tokio::spawn(async move {
        singleton
            .run(&shutdown, |stop: CancellationToken| {
                let log = log.clone();
                async move {
                    let _inside = {
                        let mut l = lock(&log);
                        if let Some(other) = l.inside {
                            let seen = format!("{name} started while {other} was working");
                            l.overlaps.push(seen);
                        }
                        l.inside = Some(name);
                        l.turns.push(name);
                        Inside(log.clone(), name)
                    };
                    stop.cancelled().await;
                    Ok::<(), String>(())
                }
            })
            .await
    })
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn terminate(pool: &PgPool, pid: i32) {
    let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(pid)
        .fetch_one(pool)
        .await
        .expect("terminate");
    assert!(done, "backend {pid} did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_holders_never_work_at_once_and_a_killed_holder_steps_down() {
    let db = test_db().await;
    let log = Arc::new(Mutex::new(Log::default()));
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    // a tries again only after a minute, so once it has stepped down b is the one to take over.
    let a = holder(
        &db.pool,
        "a",
        Duration::from_secs(60),
        log.clone(),
        stop_a.clone(),
    );
    wait_for("a works", || lock(&log).inside == Some("a")).await;
    let b = holder(
        &db.pool,
        "b",
        Duration::from_millis(50),
        log.clone(),
        stop_b.clone(),
    );
    // b keeps trying while a holds the lock: for a while, a is the only one working.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lock(&log).turns, vec!["a"]);

    let pid = singleton::holder(&db.pool, KEY)
        .await
        .expect("pg_locks")
        .expect("a holds the lock");
    terminate(&db.pool, pid).await;
    wait_for("b takes over", || lock(&log).inside == Some("b")).await;
    assert_eq!(lock(&log).turns, vec!["a", "b"]);
    let new_pid = singleton::holder(&db.pool, KEY)
        .await
        .expect("pg_locks")
        .expect("b holds the lock");
    assert_ne!(new_pid, pid);
    // The lock's session is its own: no pooled connection holds it.
    let pooled: bool = sqlx::query_scalar("SELECT pg_backend_pid() = $1")
        .bind(new_pid)
        .fetch_one(&db.pool)
        .await
        .expect("pid");
    assert!(!pooled);

    // Shutdown: each stops working and releases the lock.
    stop_b.cancel();
    stop_a.cancel();
    for task in [a, b] {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("holders stop on shutdown")
            .expect("holder task");
    }
    assert_eq!(lock(&log).inside, None);
    assert_eq!(
        singleton::holder(&db.pool, KEY).await.expect("pg_locks"),
        None
    );
    assert_eq!(lock(&log).overlaps, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_take_turns_without_overlapping() {
    let db = test_db().await;
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = CancellationToken::new();
    let holders: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|name| {
            holder(
                &db.pool,
                name,
                Duration::from_millis(50),
                log.clone(),
                stop.clone(),
            )
        })
        .collect();
    // Kill whoever holds the lock, a few times: every time someone else (or the same
    // one, later) takes over, and never while the previous one still works.
    for turn in 1..=4 {
        wait_for("someone works", || lock(&log).turns.len() == turn).await;
        let pid = singleton::holder(&db.pool, KEY)
            .await
            .expect("pg_locks")
            .expect("a holder");
        terminate(&db.pool, pid).await;
    }
    wait_for("someone works again", || lock(&log).turns.len() == 5).await;
    stop.cancel();
    for task in holders {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("holders stop on shutdown")
            .expect("holder task");
    }
    assert_eq!(lock(&log).overlaps, Vec::<String>::new());
}

#[tokio::test]
async fn a_held_lock_is_exclusive_checked_and_released_with_its_connection() {
    let db = test_db().await;
    let one = Singleton::new(&db.pool, KEY, "one");
    let held = one.try_acquire().await.expect("try").expect("free");
    assert!(
        one.try_acquire().await.expect("try").is_none(),
        "taken twice"
    );
    held.ensure().await.expect("still held");
    terminate(&db.pool, held.pid()).await;
    assert!(
        held.ensure().await.is_err(),
        "a killed session still counts"
    );
    assert!(held.is_lost());
    let again = one.try_acquire().await.expect("try").expect("free again");
    again.release().await;
    let third = one.try_acquire().await.expect("try");
    assert!(third.is_some(), "release did not free the lock");
}

const POLICY: &str = r#"
[templates.react]
risk = "low"
steps = [ { name = "s", kind = "noop" } ]

[templates.tock]
risk = "high"
steps = [ { name = "s", kind = "noop" } ]

[[reactions]]
name = "on-test"
on = "lock.test"
propose = "react"

[[triggers]]
name = "every-minute"
cron = "* * * * *"
propose = "tock"
"#;

/// A heartbeat tick whose lock's session is killed during its first phase (by a
/// database trigger on the table that phase writes) does not go on to the reactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_that_loses_its_lock_stops_before_the_next_phase() {
    let db = test_db().await;
    opsloop::store::policy::apply(&db.pool, POLICY, "test")
        .await
        .expect("apply");
    let policy = opsloop::domain::policy::parse(POLICY).expect("policy");
    opsloop::store::events::emit_user(&db.pool, "lock.test", "test", serde_json::json!({}))
        .await
        .expect("emit");
    // The heartbeat key is `pg_advisory_lock(0x6f700002)`: classid 0, objid 1869611010.
    for sql in [
        r"CREATE FUNCTION kill_heartbeat_holder() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN
            PERFORM pg_terminate_backend(pid, 10000) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND classid = 0 AND objid = 1869611010
               AND objsubid = 1
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database());
            RETURN NEW;
          END $$",
        "CREATE TRIGGER kill_heartbeat_holder AFTER INSERT ON ops_trigger_state
         FOR EACH ROW EXECUTE FUNCTION kill_heartbeat_holder()",
    ] {
        sqlx::query(sql).execute(&db.pool).await.expect("setup");
    }
    let outcome = opsloop::engine::heartbeat::tick(&db.pool, &policy).await;
    let unprocessed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ops_agent_events WHERE kind = 'lock.test' AND processed_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .expect("events");
    let ticks: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_action_runs WHERE kind = 'tick'")
        .fetch_one(&db.pool)
        .await
        .expect("runs");
    assert_eq!(
        (unprocessed, ticks),
        (1, 0),
        "the tick went on without its lock: {outcome:?}"
    );
    let error = outcome.expect_err("a tick that lost its lock reports it");
    assert!(error.to_string().contains("before reactions"), "{error}");

    // The next tick takes the lock afresh and does the work.
    sqlx::query("DROP TRIGGER kill_heartbeat_holder ON ops_trigger_state")
        .execute(&db.pool)
        .await
        .expect("drop trigger");
    let summary = opsloop::engine::heartbeat::tick(&db.pool, &policy)
        .await
        .expect("tick");
    assert!(summary.ran);
    assert_eq!(summary.events_processed, 1);
}
