//! The heartbeat: reactions and triggers (issue 3, "Done when" 4), and the event stream.

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use opsloop::domain::policy::Policy;
use opsloop::engine::heartbeat;
use opsloop::store::events;
use support::{TestDb, opsloop_cmd, test_db};

const POLICY: &str = r#"
[heartbeat]
interval = "1s"
event_batch = 7

[templates.rollback]
risk = "low"
params.tag = { pattern = '^v\d+\.\d+\.\d+$', help = "a tag" }
steps = [ { name = "undo", kind = "noop" } ]

[templates.digest]
risk = "low"
steps = [ { name = "send", kind = "noop" } ]

[templates.never]
risk = "low"
params.n = { pattern = '^\d+$', help = "n" }
steps = [ { name = "x", kind = "noop" } ]

[[reactions]]
name = "rollback-failed-deploy"
on = "deploy.*"
where = { outcome = "failed", env = { region = "eu" } }
propose = "rollback"
params = { tag = "{payload.tag}" }

[[reactions]]
name = "cooled"
on = "ping"
propose = "digest"
cooldown = "1h"

[[reactions]]
name = "coin-zero"
on = "coin"
propose = "never"
params = { n = "{id}" }
probability = 0.0

[[reactions]]
name = "coin-one"
on = "coin"
propose = "never"
params = { n = "{id}" }
probability = 1.0

[[triggers]]
name = "every-minute"
cron = "* * * * *"
propose = "digest"
"#;

fn policy() -> Policy {
    opsloop::domain::policy::parse(POLICY).expect("policy")
}

async fn setup() -> TestDb {
    let db = test_db().await;
    opsloop::store::policy::apply(&db.pool, POLICY, "test")
        .await
        .expect("apply");
    db
}

async fn emit(db: &TestDb, kind: &str, payload: serde_json::Value) -> i64 {
    events::emit_user(&db.pool, kind, "test", payload)
        .await
        .expect("emit")
}

async fn proposals_by(db: &TestDb, who: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ops_mission_proposals WHERE proposed_by = $1")
        .bind(who)
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_matching_event_makes_exactly_one_proposal_even_with_two_daemons_ticking() {
    let db = setup().await;
    let second = opsloop::db::connect(&db.url, 4)
        .await
        .expect("second daemon's pool");
    let pol = policy();
    let mut ids = Vec::new();
    for i in 0..20 {
        let tag = format!("v1.0.{i}");
        ids.push(emit(&db, "deploy.done", serde_json::json!({"outcome": "failed", "tag": tag, "env": {"region": "eu", "az": "b"}})).await);
        // Non-matching: wrong outcome, wrong nested region, wrong kind.
        emit(
            &db,
            "deploy.done",
            serde_json::json!({"outcome": "ok", "tag": tag, "env": {"region": "eu"}}),
        )
        .await;
        emit(
            &db,
            "deploy.done",
            serde_json::json!({"outcome": "failed", "tag": tag, "env": {"region": "us"}}),
        )
        .await;
        emit(
            &db,
            "build.done",
            serde_json::json!({"outcome": "failed", "tag": tag, "env": {"region": "eu"}}),
        )
        .await;
    }
    // Two "daemons" tick at once, repeatedly, while the events are processed in batches of 7.
    for _ in 0..6 {
        let (a, b) = tokio::join!(
            heartbeat::tick(&db.pool, &pol),
            heartbeat::tick(&second, &pol)
        );
        a.expect("tick a");
        b.expect("tick b");
    }
    assert_eq!(
        proposals_by(&db, "reaction:rollback-failed-deploy").await,
        20
    );
    let params: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT params FROM ops_mission_proposals WHERE proposed_by = 'reaction:rollback-failed-deploy' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("params");
    assert_eq!(params[3], serde_json::json!({"tag": "v1.0.3"}));
    let decisions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ops_agent_reactions WHERE reaction = 'rollback-failed-deploy' AND status = 'proposed' AND event_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&db.pool)
    .await
    .expect("decisions");
    assert_eq!(decisions, 20);
    // Every emitted event was processed; only events written by the last tick's own
    // proposals (proposal.*, mission.*) may still wait for the next tick.
    let unprocessed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ops_agent_events WHERE processed_at IS NULL AND source = 'test'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("unprocessed");
    assert_eq!(unprocessed, 0);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_action_runs WHERE kind = 'tick'")
        .fetch_one(&db.pool)
        .await
        .expect("runs");
    assert!(runs >= 6, "every tick that ran left a row ({runs})");
}

/// Events no rule can match are written already processed, so the worker's own events
/// never wait for (or cost) the tick; matching ones wait for it. The rules in force at
/// write time decide, and a `policy apply` moves that line for later events.
#[tokio::test]
async fn only_events_a_rule_can_match_wait_for_the_tick() {
    let db = setup().await;
    let unprocessed = |kind: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM ops_agent_events WHERE kind = $1 AND processed_at IS NULL",
            )
            .bind(kind)
            .fetch_one(&pool)
            .await
            .expect("count")
        }
    };
    emit(&db, "deploy.done", serde_json::json!({})).await; // `deploy.*` may match
    emit(&db, "ping", serde_json::json!({})).await; // `ping`
    emit(&db, "pong", serde_json::json!({})).await; // nothing listens
    emit(&db, "deployed", serde_json::json!({})).await; // `deploy.*` needs the dot
    assert_eq!(unprocessed("deploy.done").await, 1);
    assert_eq!(unprocessed("ping").await, 1);
    assert_eq!(unprocessed("pong").await, 0);
    assert_eq!(unprocessed("deployed").await, 0);

    // LIKE's own wildcards in a kind are literal characters of the pattern.
    let listening =
        format!("{POLICY}\n[[reactions]]\nname = \"pong\"\non = \"po_g\"\npropose = \"digest\"\n");
    opsloop::store::policy::apply(&db.pool, &listening, "test")
        .await
        .expect("apply");
    emit(&db, "pong", serde_json::json!({})).await;
    emit(&db, "po_g", serde_json::json!({})).await;
    assert_eq!(unprocessed("pong").await, 0);
    assert_eq!(unprocessed("po_g").await, 1);

    heartbeat::tick(&db.pool, &policy()).await.expect("tick");
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops_agent_events WHERE processed_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .expect("count");
    assert_eq!(left, 0);
}

#[tokio::test]
async fn cooldown_and_probability_decide_and_are_recorded() {
    let db = setup().await;
    let pol = policy();
    emit(&db, "ping", serde_json::json!({})).await;
    emit(&db, "ping", serde_json::json!({})).await;
    for _ in 0..5 {
        emit(&db, "coin", serde_json::json!({})).await;
    }
    heartbeat::tick(&db.pool, &pol).await.expect("tick");
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT reaction, status, reason FROM ops_agent_reactions ORDER BY event_id, reaction",
    )
    .fetch_all(&db.pool)
    .await
    .expect("rows");
    let of =
        |name: &str, status: &str| rows.iter().filter(|r| r.0 == name && r.1 == status).count();
    assert_eq!((of("cooled", "proposed"), of("cooled", "skipped")), (1, 1));
    assert!(
        rows.iter()
            .any(|r| r.0 == "cooled" && r.2.as_deref() == Some("cooldown"))
    );
    assert_eq!(
        (of("coin-zero", "proposed"), of("coin-zero", "skipped")),
        (0, 5)
    );
    assert_eq!(
        (of("coin-one", "proposed"), of("coin-one", "skipped")),
        (5, 0)
    );
}

#[tokio::test]
async fn pause_skips_reactions_and_triggers() {
    let db = setup().await;
    let pol = policy();
    let mut conn = db.pool.acquire().await.expect("conn");
    opsloop::engine::gates::set_paused(
        &mut conn,
        true,
        opsloop::domain::vocab::Source::Cli,
        "test",
    )
    .await
    .expect("pause");
    drop(conn);
    emit(&db, "ping", serde_json::json!({})).await;
    heartbeat::tick(&db.pool, &pol).await.expect("tick");
    let status: String =
        sqlx::query_scalar("SELECT status || ':' || reason FROM ops_agent_reactions")
            .fetch_one(&db.pool)
            .await
            .expect("decision");
    assert_eq!(status, "skipped:paused");
    assert_eq!(proposals_by(&db, "reaction:cooled").await, 0);
}

#[tokio::test]
async fn a_cron_trigger_fires_at_its_time_and_once_after_downtime() {
    let db = setup().await;
    let pol = policy();
    // First sight: nothing missed yet.
    heartbeat::tick(&db.pool, &pol).await.expect("tick");
    assert_eq!(proposals_by(&db, "trigger:every-minute").await, 0);
    // One slot passed.
    sqlx::query("UPDATE ops_trigger_state SET last_slot = now() - interval '61 seconds'")
        .execute(&db.pool)
        .await
        .expect("rewind");
    heartbeat::tick(&db.pool, &pol).await.expect("tick");
    assert_eq!(proposals_by(&db, "trigger:every-minute").await, 1);
    // Not again within the same minute.
    heartbeat::tick(&db.pool, &pol).await.expect("tick");
    assert_eq!(proposals_by(&db, "trigger:every-minute").await, 1);
    // Down for 30 minutes: 30 missed slots fire once.
    sqlx::query("UPDATE ops_trigger_state SET last_slot = now() - interval '30 minutes'")
        .execute(&db.pool)
        .await
        .expect("rewind");
    sqlx::query("UPDATE ops_missions SET status = 'succeeded'")
        .execute(&db.pool)
        .await
        .expect("finish");
    heartbeat::tick(&db.pool, &pol).await.expect("tick");
    heartbeat::tick(&db.pool, &pol).await.expect("tick");
    assert_eq!(proposals_by(&db, "trigger:every-minute").await, 2);
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT e.kind FROM ops_agent_events e JOIN ops_mission_proposals p ON p.id = e.proposal_id
         WHERE p.proposed_by = 'trigger:every-minute' ORDER BY e.id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("events");
    assert_eq!(kinds.iter().filter(|k| *k == "proposal.created").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_never_skips_an_event_that_commits_late() {
    let db = setup().await;
    let mut child = opsloop_cmd(Some(&db.url))
        .args(["events", "--follow", "--json", "--limit", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Wait until the follower is reading: emit markers until one is printed.
    let ready = Instant::now() + Duration::from_secs(30);
    'ready: loop {
        assert!(Instant::now() < ready, "`events --follow` printed nothing");
        emit(&db, "ready.marker", serde_json::json!({})).await;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(50))
                && line.contains("ready.marker")
            {
                break 'ready;
            }
        }
    }
    // `late` takes the lower id first but commits after `early` is visible.
    let mut late = db.pool.begin().await.expect("begin");
    let late_id: i64 = sqlx::query_scalar(
        "INSERT INTO ops_agent_events (kind, source) VALUES ('late.one', 'test') RETURNING id",
    )
    .fetch_one(&mut *late)
    .await
    .expect("late");
    let early_id = emit(&db, "early.one", serde_json::json!({})).await;
    assert!(late_id < early_id);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    late.commit().await.expect("commit");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let e: serde_json::Value = serde_json::from_str(&line).expect("json line");
            let kind = e["kind"].as_str().unwrap_or("").to_string();
            if kind != "ready.marker" {
                seen.push(kind);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // Both arrive: the early one waits for the older transaction, then both in id order.
    assert_eq!(seen, ["late.one", "early.one"]);
}

/// A reaction's cooldown holds even when two processes handle reactions at the same
/// time (a heartbeat that lost its lock mid-tick, another host's tick): batches that
/// may propose are serialized, so the second sees the first's reaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cooldown_holds_when_two_processes_react_at_once() {
    let policy_text = POLICY.replace("event_batch = 7", "event_batch = 1");
    for round in 0..5 {
        let db = test_db().await;
        opsloop::store::policy::apply(&db.pool, &policy_text, "test")
            .await
            .expect("apply");
        let pol = opsloop::domain::policy::parse(&policy_text).expect("policy");
        for _ in 0..4 {
            emit(&db, "ping", serde_json::json!({})).await;
        }
        let second = opsloop::db::connect(&db.url, 4).await.expect("pool");
        let (a, b) = tokio::join!(
            opsloop::engine::reactions::process(&db.pool, &pol, false),
            opsloop::engine::reactions::process(&second, &pol, false),
        );
        a.expect("first");
        b.expect("second");
        assert_eq!(
            proposals_by(&db, "reaction:cooled").await,
            1,
            "round {round}: one proposal within the cooldown"
        );
    }
}
