//! `bench floor`: the rows `bench worker` writes per step (claim, `step.started`,
//! result, action run, `step.succeeded`, mission, `mission.succeeded`), written by plain
//! batched SQL with none of opsloop's logic (no fencing, no pause check, no reaction
//! lookup, no NOTIFY, no executor, no leases kept): the floor of this design on this
//! machine, at the same N and concurrency. The schema is opsloop's own, triggers and
//! indexes included, so `bench worker` divided by this is what opsloop's logic costs.

use std::time::Instant;

use serde_json::{Value, json};
use sqlx::PgPool;

use super::{Scratch, bench_policy, line, round2, seed_missions};
use crate::db::Database;
use crate::domain::error::OpsError;
use crate::store::policy as policy_store;

/// Claim a batch: the steps' update and their `step.started` events, one statement.
const CLAIM: &str = "WITH claimed AS (
        UPDATE ops_mission_steps s
        SET status = 'running', attempts = s.attempts + 1, lease_owner = $1,
            lease_expires_at = now() + interval '5 minutes', started_at = now()
        WHERE s.id = ANY(ARRAY(
            SELECT id FROM ops_mission_steps WHERE status = 'queued' AND run_after <= now()
            ORDER BY priority DESC, run_after, id LIMIT $2 FOR UPDATE SKIP LOCKED))
        RETURNING s.id, s.mission_id, s.name, s.attempts
     ), started AS (
        INSERT INTO ops_agent_events (kind, source, mission_id, step_id, payload, processed_at)
        SELECT 'step.started', 'worker', mission_id, id,
               jsonb_build_object('name', name, 'attempt', attempts, 'worker', $1::text), now()
        FROM claimed
     )
     SELECT id, mission_id FROM claimed";

/// End a batch: results, action runs, `step.succeeded`, missions and
/// `mission.succeeded`, one statement (its own transaction).
const END: &str = "WITH stored AS (
        UPDATE ops_mission_steps s
        SET status = 'succeeded', finished_at = now(), result = '{}', output = '{}',
            lease_owner = NULL, lease_expires_at = NULL
        WHERE s.id = ANY($1)
        RETURNING s.id, s.mission_id, s.name, s.attempts, s.started_at
     ), runs AS (
        INSERT INTO ops_action_runs (kind, step_id, attempt, worker, outcome, summary, started_at, finished_at)
        SELECT 'step', id, attempts, $3::text, 'succeeded', jsonb_build_object('error', NULL::text),
               coalesce(started_at, now()), now()
        FROM stored
     ), events AS (
        INSERT INTO ops_agent_events (kind, source, mission_id, step_id, payload, processed_at)
        SELECT 'step.succeeded', 'worker', mission_id, id,
               jsonb_build_object('name', name, 'attempt', attempts), now()
        FROM stored ORDER BY id
     ), finished AS (
        UPDATE ops_missions m SET status = 'succeeded', finished_at = now()
        WHERE m.id = ANY($2)
        RETURNING m.id, m.template, m.proposal_id
     ), mission_events AS (
        INSERT INTO ops_agent_events (kind, source, proposal_id, mission_id, payload, processed_at)
        SELECT 'mission.succeeded', 'worker', proposal_id, id, jsonb_build_object('template', template), now()
        FROM finished ORDER BY id
     )
     SELECT count(*) FROM stored";

/// `bench floor --steps N --workers W --batch B`: W connections, each claiming up to B
/// steps and ending them, until none is left (one step per mission, as the peer case).
pub async fn floor(db: &Database, steps: u32, workers: u32, batch: u32) -> anyhow::Result<Value> {
    if steps == 0 || workers == 0 || batch == 0 {
        return Err(
            OpsError::bad_input("--steps, --workers and --batch must be at least 1").into(),
        );
    }
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    policy_store::apply(&pool, &bench_policy(workers, 1, 0), "bench").await?;
    seed_missions(&pool, steps, 1, "noop", "{\"kind\":\"noop\"}").await?;
    let started = Instant::now();
    let mut loops = tokio::task::JoinSet::new();
    for w in 0..workers {
        loops.spawn(drain(pool.clone(), format!("floor:{w}"), i64::from(batch)));
    }
    let mut done = 0u64;
    while let Some(ended) = loops.join_next().await {
        done += ended??;
    }
    let elapsed = started.elapsed();
    let out = line(
        &pool,
        json!({
            "bench": "floor",
            "steps": steps,
            "steps_succeeded": done,
            "workers": workers,
            "batch": batch,
            "rows_per_step": 7,
            "elapsed_ms": elapsed.as_millis() as u64,
            "steps_per_s": round2(done as f64 / elapsed.as_secs_f64().max(1e-9)),
        }),
    )
    .await;
    scratch.drop().await;
    Ok(out)
}

/// One connection's loop: claim, end, until a claim finds nothing.
async fn drain(pool: PgPool, owner: String, batch: i64) -> anyhow::Result<u64> {
    let mut conn = pool.acquire().await?;
    let mut done = 0u64;
    loop {
        let claimed: Vec<(i64, i64)> = sqlx::query_as(CLAIM)
            .bind(&owner)
            .bind(batch)
            .fetch_all(&mut *conn)
            .await?;
        if claimed.is_empty() {
            // Another loop may still hold the last steps; they are its to end.
            return Ok(done);
        }
        let (ids, missions): (Vec<i64>, Vec<i64>) = claimed.into_iter().unzip();
        let ended: i64 = sqlx::query_scalar(END)
            .bind(&ids)
            .bind(&missions)
            .bind(&owner)
            .fetch_one(&mut *conn)
            .await?;
        done += ended as u64;
    }
}
