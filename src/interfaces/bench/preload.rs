//! Work already in the tables while a bench runs (cost growth): finished history, open
//! questions, steps waiting behind others. Written straight into the scratch database.

use sqlx::PgPool;

/// The preloads of a case: finished history, open questions, waiting steps.
pub(super) async fn preload(
    pool: &PgPool,
    history: u32,
    open_questions: u32,
    waiting: u32,
) -> anyhow::Result<()> {
    if waiting > 0 {
        preload_waiting(pool, waiting).await?;
    }
    if open_questions > 0 {
        preload_questions(pool, open_questions).await?;
    }
    // Last: its VACUUM ANALYZE covers the others' rows too.
    if history > 0 {
        preload_history(pool, history).await?;
    }
    Ok(())
}

/// Missions waiting on people: `n` missions whose one step is `asking`, each with its
/// open question (they hold no lease and no slot; the bench shows what they cost).
async fn preload_questions(pool: &PgPool, n: u32) -> anyhow::Result<()> {
    sqlx::query(
        "WITH p AS (
            INSERT INTO ops_mission_proposals (template, params, risk, proposed_by, source, status, decided_at)
            SELECT 'bench', jsonb_build_object('n', 'q' || g), 'low', 'bench', 'cli', 'approved', now()
            FROM generate_series(1, $1) g RETURNING id),
         m AS (
            INSERT INTO ops_missions (proposal_id, template, status, started_at)
            SELECT id, 'held', 'running', now() FROM p RETURNING id),
         s AS (
            INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, status, attempts)
            SELECT m.id, 1, 'go', 'ask', '{\"kind\":\"ask\",\"question\":\"Go?\",\"choices\":[\"yes\",\"no\"]}', 'asking', 1
            FROM m RETURNING id, mission_id)
         INSERT INTO ops_questions (mission_id, step_id, asked_by, question, choices, audience)
         SELECT mission_id, id, 'step:' || id, 'Go?', '[\"yes\", \"no\"]', 'approvers' FROM s",
    )
    .bind(n as i32)
    .execute(pool)
    .await?;
    Ok(())
}

/// Work waiting behind other work: `n` waiting steps, 100 per mission, behind a first
/// step that runs elsewhere (another worker's lease, a day long): rows the claim must
/// never look at.
async fn preload_waiting(pool: &PgPool, n: u32) -> anyhow::Result<()> {
    sqlx::query(
        "WITH p AS (
            INSERT INTO ops_mission_proposals (template, params, risk, proposed_by, source, status, decided_at)
            SELECT 'bench', jsonb_build_object('n', 'w' || g), 'low', 'bench', 'cli', 'approved', now()
            FROM generate_series(1, $1) g RETURNING id),
         m AS (
            INSERT INTO ops_missions (proposal_id, template, status, started_at)
            SELECT id, 'held', 'running', now() FROM p RETURNING id)
         INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, status, attempts,
                                        lease_owner, lease_expires_at, started_at)
         SELECT m.id, s, 's' || s, 'sleep', '{\"kind\":\"sleep\",\"for_ms\":86400000}',
                CASE WHEN s = 1 THEN 'running' ELSE 'waiting' END,
                CASE WHEN s = 1 THEN 1 ELSE 0 END,
                CASE WHEN s = 1 THEN 'bench:elsewhere' END,
                CASE WHEN s = 1 THEN now() + interval '1 day' END,
                CASE WHEN s = 1 THEN now() END
         FROM m, generate_series(1, 101) s",
    )
    .bind(n.div_ceil(100) as i32)
    .execute(pool)
    .await?;
    Ok(())
}

/// Finished work already in the tables (cost growth): `steps` succeeded steps, 100
/// per mission, each with its `step.succeeded` event, then VACUUM ANALYZE as a
/// long-running database would have had.
async fn preload_history(pool: &PgPool, steps: u32) -> anyhow::Result<()> {
    let missions = steps.div_ceil(100) as i32;
    sqlx::query(
        "WITH p AS (
            INSERT INTO ops_mission_proposals (template, params, risk, proposed_by, source, status, decided_at)
            SELECT 'bench', jsonb_build_object('n', 'old' || g), 'low', 'bench', 'cli', 'approved', now()
            FROM generate_series(1, $1) g RETURNING id)
         INSERT INTO ops_missions (proposal_id, template, status, started_at, finished_at)
         SELECT id, 'bench', 'succeeded', now(), now() FROM p",
    )
    .bind(missions)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, status, attempts, started_at, finished_at)
         SELECT m.id, s, 's' || s, 'noop', '{\"kind\":\"noop\"}', 'succeeded', 1, now(), now()
         FROM ops_missions m, generate_series(1, 100) s WHERE m.status = 'succeeded'",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO ops_agent_events (kind, source, mission_id, step_id, payload, processed_at)
         SELECT 'step.succeeded', 'worker', mission_id, id, jsonb_build_object('name', name), now()
         FROM ops_mission_steps WHERE status = 'succeeded'",
    )
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE").execute(pool).await?;
    Ok(())
}
