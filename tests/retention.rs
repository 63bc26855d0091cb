//! Retention deletes what the policy no longer keeps, and nothing else (issue 6).

mod support;

use opsloop::engine::heartbeat;
use support::{TestDb, test_db};

const POLICY: &str = r#"
[retention]
missions = "1h"
events = "1h"
reactions = "1h"
action_runs = "1h"
notifications = "1h"
batch = 2

[templates.job]
risk = "low"
params.n = { pattern = '^\d+$', help = "n" }
steps = [ { name = "a", kind = "noop" }, { name = "b", kind = "noop" } ]

[templates.ask]
risk = "high"
params.n = { pattern = '^\d+$', help = "n" }
steps = [ { name = "a", kind = "noop" } ]
"#;

async fn propose(db: &TestDb, template: &str, n: u32) -> opsloop::engine::proposals::Proposed {
    let policy = opsloop::domain::policy::parse(POLICY).expect("policy");
    support::propose(&db.pool, &policy, template, &[("n", &n.to_string())]).await
}

async fn exec(db: &TestDb, sql: &str) {
    sqlx::query(sql).execute(&db.pool).await.expect(sql);
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect(sql)
}

#[tokio::test]
async fn old_finished_rows_go_and_live_ones_stay() {
    let db = test_db().await;
    let policy = opsloop::domain::policy::parse(POLICY).expect("policy");
    // Five old finished missions, one old running mission, one recent finished one,
    // an old pending proposal.
    let mut finished = Vec::new();
    for n in 0..5 {
        finished.push(propose(&db, "job", n).await.mission_id.expect("mission"));
    }
    let running = propose(&db, "job", 100).await.mission_id.expect("mission");
    let recent = propose(&db, "job", 200).await.mission_id.expect("mission");
    let pending = propose(&db, "ask", 300).await.id;
    exec(&db, "UPDATE ops_mission_steps SET status = 'succeeded'").await;
    exec(&db, "UPDATE ops_mission_steps SET status = 'queued' WHERE seq = 2 AND mission_id = (SELECT max(id) - 1 FROM ops_missions)").await;
    exec(
        &db,
        "UPDATE ops_missions SET status = 'succeeded', finished_at = now() - interval '2 hours'",
    )
    .await;
    sqlx::query("UPDATE ops_missions SET status = 'running', finished_at = NULL WHERE id = $1")
        .bind(running)
        .execute(&db.pool)
        .await
        .expect("running");
    sqlx::query("UPDATE ops_missions SET finished_at = now() WHERE id = $1")
        .bind(recent)
        .execute(&db.pool)
        .await
        .expect("recent");
    exec(&db, "UPDATE ops_mission_proposals SET created_at = now() - interval '3 hours', decided_at = now() - interval '3 hours'").await;
    // Events: all old; one unprocessed; the running mission's stay too.
    exec(
        &db,
        "UPDATE ops_agent_events SET created_at = now() - interval '3 hours', processed_at = now()",
    )
    .await;
    let unprocessed =
        opsloop::store::events::emit_user(&db.pool, "note.x", "test", serde_json::json!({}))
            .await
            .expect("emit");
    exec(&db, "UPDATE ops_agent_events SET created_at = now() - interval '3 hours' WHERE processed_at IS NULL").await;
    // Old and new action runs.
    exec(&db, "INSERT INTO ops_action_runs (kind, outcome, started_at) SELECT 'tick', 'ok', now() - interval '2 hours' FROM generate_series(1, 7)").await;

    let summary = heartbeat::tick(&db.pool, &policy).await.expect("tick");
    assert!(summary.ran);

    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM ops_missions ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("missions");
    assert_eq!(
        left,
        vec![running, recent],
        "old finished missions go, running and recent stay"
    );
    for m in &finished {
        let steps: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ops_mission_steps WHERE mission_id = $1")
                .bind(m)
                .fetch_one(&db.pool)
                .await
                .expect("steps");
        assert_eq!(steps, 0, "steps go with their mission");
    }
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM ops_mission_steps WHERE mission_id = {running}")
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM ops_mission_proposals WHERE id = {pending}")
        )
        .await,
        1,
        "pending proposals stay"
    );
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM ops_agent_events WHERE id = {unprocessed}")
        )
        .await,
        1,
        "unprocessed events stay"
    );
    assert!(
        count(
            &db,
            &format!("SELECT count(*) FROM ops_agent_events WHERE mission_id = {running}")
        )
        .await
            > 0,
        "a running mission's events stay"
    );
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM ops_agent_events WHERE mission_id = ANY(ARRAY{finished:?})"
            )
        )
        .await,
        0,
        "finished missions' old events go"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops_action_runs WHERE started_at < now() - interval '1 hour'"
        )
        .await,
        0
    );
    assert!(
        count(&db, "SELECT count(*) FROM ops_action_runs").await >= 1,
        "this tick's own row stays"
    );
    // Bounded: batch = 2 rows per statement, 10 statements per kind and tick.
    assert!(
        summary.deleted.proposals <= 20 && summary.deleted.proposals >= 5,
        "{:?}",
        summary.deleted
    );
}

/// Questions asked outside a mission (`POST /api/questions`) have no mission to go with:
/// retention deletes them once closed for longer than `missions`; open ones, recent
/// ones and a running mission's stay.
#[tokio::test]
async fn old_closed_questions_outside_missions_go() {
    let db = test_db().await;
    let policy = opsloop::domain::policy::parse(POLICY).expect("policy");
    let running = propose(&db, "job", 1).await.mission_id.expect("mission");
    exec(
        &db,
        &format!(
            "INSERT INTO ops_questions (mission_id, asked_by, question, audience, status, answered_at, created_at) VALUES
               (NULL, 'agent:a', 'old answered', 'operators', 'answered', now() - interval '2 hours', now() - interval '3 hours'),
               (NULL, 'agent:a', 'old expired', 'operators', 'expired', now() - interval '2 hours', now() - interval '3 hours'),
               (NULL, 'agent:a', 'old cancelled', 'operators', 'cancelled', now() - interval '2 hours', now() - interval '3 hours'),
               (NULL, 'agent:a', 'recent', 'operators', 'answered', now(), now() - interval '3 hours'),
               (NULL, 'agent:a', 'still open', 'operators', 'open', NULL, now() - interval '3 hours'),
               ({running}, 'step', 'of a running mission', 'operators', 'answered', now() - interval '2 hours', now() - interval '3 hours')"
        ),
    )
    .await;
    let summary = heartbeat::tick(&db.pool, &policy).await.expect("tick");
    assert_eq!(summary.deleted.questions, 3, "{:?}", summary.deleted);
    let left: Vec<String> = sqlx::query_scalar("SELECT question FROM ops_questions ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("questions");
    assert_eq!(left, ["recent", "still open", "of a running mission"]);
}

#[tokio::test]
async fn nothing_is_deleted_without_a_retention_policy() {
    let db = test_db().await;
    let policy = opsloop::domain::policy::parse(
        &POLICY
            .replace("[retention]", "[x]")
            .replace("missions = \"1h\"\n", "")
            .replace("events = \"1h\"\n", "")
            .replace("reactions = \"1h\"\n", "")
            .replace("action_runs = \"1h\"\n", "")
            .replace("notifications = \"1h\"\n", "")
            .replace("batch = 2\n", "")
            .replace("[x]\n", ""),
    )
    .expect("policy");
    propose(&db, "job", 1).await;
    exec(
        &db,
        "UPDATE ops_missions SET status = 'succeeded', finished_at = now() - interval '300 days'",
    )
    .await;
    exec(
        &db,
        "UPDATE ops_mission_proposals SET decided_at = now() - interval '300 days'",
    )
    .await;
    exec(&db, "UPDATE ops_agent_events SET created_at = now() - interval '300 days', processed_at = now()").await;
    let summary = heartbeat::tick(&db.pool, &policy).await.expect("tick");
    assert_eq!(summary.deleted.proposals + summary.deleted.events, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM ops_missions").await, 1);
}

/// With the server's autovacuum off (as on the machines these tests run on), the
/// heartbeat vacuums the queue tables itself once they hold enough dead rows; with it
/// on, it leaves them to autovacuum.
#[tokio::test]
async fn the_heartbeat_vacuums_the_queue_tables_when_autovacuum_is_off() {
    let db = test_db().await;
    // No retention: nothing in a tick reads `ops_action_runs` (a read would prune the
    // dead rows on its pages and take them off the statistics before any vacuum).
    let policy = opsloop::domain::policy::parse("").expect("policy");
    exec(
        &db,
        "INSERT INTO ops_action_runs (kind, outcome) SELECT 'tick', 'succeeded' FROM generate_series(1, 3000)",
    )
    .await;
    exec(&db, "DELETE FROM ops_action_runs").await;
    let autovacuum: bool = sqlx::query_scalar("SELECT current_setting('autovacuum')::bool")
        .fetch_one(&db.pool)
        .await
        .expect("autovacuum");
    let summary = heartbeat::tick(&db.pool, &policy).await.expect("tick");
    if autovacuum {
        assert!(summary.vacuumed.is_empty(), "{:?}", summary.vacuumed);
        return;
    }
    // The dead rows reach the statistics within the backend's flush interval (≤ 10 s).
    let mut vacuumed = summary.vacuumed;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !vacuumed.iter().any(|t| t == "ops_action_runs") {
        let dead: i64 = sqlx::query_scalar(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'ops_action_runs'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("stats");
        assert!(
            std::time::Instant::now() < deadline,
            "ops_action_runs never vacuumed ({dead} dead rows)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        vacuumed = heartbeat::tick(&db.pool, &policy)
            .await
            .expect("tick")
            .vacuumed;
    }
    let (dead, vacuums): (i64, i64) = sqlx::query_as(
        "SELECT n_dead_tup, vacuum_count FROM pg_stat_user_tables WHERE relname = 'ops_action_runs'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("stats");
    assert!(
        vacuums >= 1 && dead < 1000,
        "dead {dead}, vacuums {vacuums}"
    );
    // Vacuumed, the table is not vacuumed again on the next tick.
    let again = heartbeat::tick(&db.pool, &policy).await.expect("tick");
    assert!(
        !again.vacuumed.iter().any(|t| t == "ops_action_runs"),
        "{:?}",
        again.vacuumed
    );
}
