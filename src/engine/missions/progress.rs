//! What a step attempt's end does to its mission. One named statement per transition,
//! River/Oban style; all fenced on (step, lease owner, attempt) so a worker presumed
//! dead can never overwrite the result of the retry that replaced it.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::error::OpsResult;
use crate::events::{self, NewEvent, sources};
use crate::gates;
use crate::telemetry;

/// The attempt a worker holds: its fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub step_id: i64,
    pub owner: String,
    pub attempt: i32,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Ending {
    Succeeded {
        result: Value,
    },
    Failed {
        error: String,
        result: Value,
        retry_in: Duration,
    },
    Cancelled {
        result: Value,
    },
}

/// Store one attempt's ending if `lease` still holds, and move the mission along.
/// Returns false when the lease was lost: the result is refused.
pub async fn finish(
    conn: &mut PgConnection,
    lease: &Lease,
    ending: &Ending,
    pause_after_failures: u32,
) -> OpsResult<bool> {
    let stored = finish_batch(
        conn,
        &[(lease.clone(), ending.clone())],
        pause_after_failures,
    )
    .await?;
    Ok(stored.first().copied().unwrap_or(false))
}

/// A stored attempt, as the fenced update returned it.
#[derive(Debug, sqlx::FromRow)]
struct Stored {
    id: i64,
    mission_id: i64,
    seq: i32,
    name: String,
    attempts: i32,
    max_attempts: i32,
    outcome: String,
}

/// Store many attempts' endings in a few set-based statements (the worker's hot path):
/// the fenced update with its action runs and step events, then next steps queued and
/// finished missions finalized. Final failures and `emit` events go one by one (rare).
/// Returns, per item, whether it was stored (false: its lease was lost).
pub async fn finish_batch(
    conn: &mut PgConnection,
    items: &[(Lease, Ending)],
    pause_after_failures: u32,
) -> OpsResult<Vec<bool>> {
    let stopped = stopped_missions(conn, items).await?;
    let mut ids = Vec::with_capacity(items.len());
    let mut owners = Vec::with_capacity(items.len());
    let mut attempts = Vec::with_capacity(items.len());
    let mut outcomes = Vec::with_capacity(items.len());
    let mut results = Vec::with_capacity(items.len());
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(items.len());
    let mut retry_ms = Vec::with_capacity(items.len());
    for (lease, ending) in items {
        ids.push(lease.step_id);
        owners.push(lease.owner.as_str());
        attempts.push(lease.attempt);
        let (outcome, result, error, retry) = match ending {
            // The mission was cancelled: this attempt's failure (or event) ends the
            // step cancelled, never a retry or a dead letter.
            Ending::Failed { result, .. } | Ending::Succeeded { result }
                if stopped.contains(&lease.step_id) =>
            {
                ("cancelled", result, Some("cancelled"), Duration::ZERO)
            }
            Ending::Succeeded { result } => ("succeeded", result, None, Duration::ZERO),
            Ending::Cancelled { result } => {
                ("cancelled", result, Some("cancelled"), Duration::ZERO)
            }
            Ending::Failed {
                error,
                result,
                retry_in,
            } => ("failed", result, Some(error.as_str()), *retry_in),
        };
        outcomes.push(outcome);
        results.push(result.clone());
        errors.push(error);
        retry_ms.push(i64::try_from(retry.as_millis()).unwrap_or(i64::MAX));
    }
    // A failure with attempts left goes back to the queue, due after its backoff.
    let stored: Vec<Stored> = sqlx::query_as(
        "WITH input AS (
            SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::jsonb[], $6::text[], $7::bigint[])
              AS i(id, owner, attempt, outcome, result, error, retry_ms)
         ), stored AS (
            UPDATE ops_mission_steps s SET
                status = CASE WHEN i.outcome = 'failed' AND s.attempts < s.max_attempts THEN 'queued' ELSE i.outcome END,
                run_after = CASE WHEN i.outcome = 'failed' AND s.attempts < s.max_attempts
                                 THEN now() + i.retry_ms * interval '1 millisecond' ELSE s.run_after END,
                finished_at = CASE WHEN i.outcome = 'failed' AND s.attempts < s.max_attempts THEN NULL ELSE now() END,
                result = i.result, error = i.error, lease_owner = NULL, lease_expires_at = NULL
            FROM input i
            -- s.id = ANY($1) offers the planner the key; with lagging statistics it may
            -- still walk the lease index, whose rows are only the running steps.
            WHERE s.id = ANY($1) AND s.id = i.id AND s.lease_owner = i.owner AND s.attempts = i.attempt AND s.status = 'running'
            RETURNING s.id, s.mission_id, s.seq, s.name, s.attempts, s.max_attempts, s.started_at,
                      i.outcome, i.error, i.retry_ms, i.owner
         ), runs AS (
            INSERT INTO ops_action_runs (kind, step_id, attempt, worker, outcome, summary, started_at, finished_at)
            SELECT 'step', id, attempts, owner, outcome, jsonb_build_object('error', error),
                   coalesce(started_at, now()), now()
            FROM stored
         ), events AS (
            INSERT INTO ops_agent_events (kind, source, mission_id, step_id, payload, processed_at)
            SELECT CASE WHEN outcome = 'succeeded' THEN 'step.succeeded' ELSE 'step.retrying' END,
                   'worker', mission_id, id,
                   CASE WHEN outcome = 'succeeded' THEN jsonb_build_object('name', name, 'attempt', attempts)
                        ELSE jsonb_build_object('name', name, 'attempt', attempts, 'max_attempts', max_attempts,
                                                'error', error, 'retry_in_ms', retry_ms) END,
                   -- scalar subqueries: evaluated once per statement, not per row
                   CASE WHEN outcome = 'succeeded' THEN (SELECT ops_processed_at('step.succeeded'))
                        ELSE (SELECT ops_processed_at('step.retrying')) END
            FROM stored
            WHERE outcome = 'succeeded' OR (outcome = 'failed' AND attempts < max_attempts)
            ORDER BY id
         )
         SELECT id, mission_id, seq, name, attempts, max_attempts, outcome FROM stored",
    )
    .bind(&ids)
    .bind(&owners)
    .bind(&attempts)
    .bind(&outcomes)
    .bind(&results)
    .bind(&errors)
    .bind(&retry_ms)
    .fetch_all(&mut *conn)
    .await?;

    for outcome in ["succeeded", "cancelled"] {
        telemetry::step_outcome(
            outcome,
            stored.iter().filter(|s| s.outcome == outcome).count() as u64,
        );
    }
    let failed = |last: bool| {
        stored
            .iter()
            .filter(|s| s.outcome == "failed" && (s.attempts >= s.max_attempts) == last)
            .count()
    };
    telemetry::step_outcome("retrying", failed(false) as u64);
    telemetry::step_outcome("failed", failed(true) as u64);
    // An `emit` step's event belongs to its step, so it comes before `mission.succeeded`.
    for s in stored.iter().filter(|s| s.outcome == "succeeded") {
        if let Some((_, Ending::Succeeded { result })) =
            items.iter().find(|(lease, _)| lease.step_id == s.id)
            && let Some((event, payload)) = emitted_event(result)
        {
            let event = NewEvent::new(event, sources::WORKER)
                .mission(s.mission_id)
                .step(s.id)
                .payload(payload);
            events::emit(conn, event).await?;
        }
    }
    let succeeded: Vec<&Stored> = stored.iter().filter(|s| s.outcome == "succeeded").collect();
    if !succeeded.is_empty() {
        advance(conn, &succeeded).await?;
    }
    for s in stored
        .iter()
        .filter(|s| s.outcome == "failed" && s.attempts >= s.max_attempts)
    {
        if let Some((_, Ending::Failed { error, .. })) =
            items.iter().find(|(lease, _)| lease.step_id == s.id)
        {
            fail_for_good(
                conn,
                s.id,
                s.mission_id,
                &s.name,
                s.attempts,
                error,
                pause_after_failures,
            )
            .await?;
        }
    }
    Ok(items
        .iter()
        .map(|(lease, _)| stored.iter().any(|s| s.id == lease.step_id))
        .collect())
}

/// Of the steps whose ending depends on their mission still running (a failure would
/// retry or dead-letter, an `emit` would write its event), those whose mission is no
/// longer running. Their missions are locked `FOR KEY SHARE` until commit: a cancel
/// (which takes its mission `FOR UPDATE`) either committed before, and is seen here, or
/// waits for this transaction and then finds the step's final state. Plain successes
/// and cancels (the hot path) need no lock and skip this statement.
async fn stopped_missions(
    conn: &mut PgConnection,
    items: &[(Lease, Ending)],
) -> OpsResult<Vec<i64>> {
    let checked: Vec<i64> = items
        .iter()
        .filter(|(_, ending)| match ending {
            Ending::Failed { .. } => true,
            Ending::Succeeded { result } => emitted_event(result).is_some(),
            Ending::Cancelled { .. } => false,
        })
        .map(|(lease, _)| lease.step_id)
        .collect();
    if checked.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "WITH locked AS MATERIALIZED (
            SELECT m.id, m.status FROM ops_missions m
            WHERE m.id = ANY(ARRAY(SELECT s.mission_id FROM ops_mission_steps s WHERE s.id = ANY($1)))
            FOR KEY SHARE
         )
         SELECT s.id FROM ops_mission_steps s
         WHERE s.id = ANY($1)
           AND s.mission_id = ANY(ARRAY(SELECT id FROM locked WHERE status <> 'running'))",
    )
    .bind(&checked)
    .fetch_all(&mut *conn)
    .await?)
}

/// After steps succeeded: queue each mission's next step, or finalize the mission when
/// it has none left (one statement; idempotent).
async fn advance(conn: &mut PgConnection, done: &[&Stored]) -> OpsResult<()> {
    let missions: Vec<i64> = done.iter().map(|s| s.mission_id).collect();
    let seqs: Vec<i32> = done.iter().map(|s| s.seq).collect();
    let (_, finished): (i64, i64) = sqlx::query_as(
        // Every row is found by key (a correlated probe, then = ANY): the statistics
        // on status lag behind a burst of work, and joins planned from them scan whole
        // tables. Steps run in order, so a mission whose succeeded step has no next
        // one has succeeded in full.
        "WITH done AS MATERIALIZED (
            SELECT d.mission_id,
                   (SELECT s.id FROM ops_mission_steps s
                    WHERE s.mission_id = d.mission_id AND s.seq = d.seq + 1) AS next_id
            FROM unnest($1::bigint[], $2::int[]) AS d(mission_id, seq)
         ), next AS (
            UPDATE ops_mission_steps n SET status = 'queued', run_after = now()
            WHERE n.id = ANY(ARRAY(SELECT next_id FROM done WHERE next_id IS NOT NULL))
              AND n.status = 'waiting'
            RETURNING n.mission_id
         ), finished AS (
            UPDATE ops_missions m SET status = 'succeeded', finished_at = now()
            WHERE m.id = ANY(ARRAY(SELECT mission_id FROM done WHERE next_id IS NULL))
              AND m.status = 'running'
            RETURNING m.id, m.template, m.proposal_id
         ), events AS (
            INSERT INTO ops_agent_events (kind, source, proposal_id, mission_id, payload, processed_at)
            SELECT 'mission.succeeded', 'worker', proposal_id, id, jsonb_build_object('template', template),
                   (SELECT ops_processed_at('mission.succeeded'))
            FROM finished ORDER BY id
         )
         SELECT (SELECT count(*) FROM (SELECT pg_notify('ops_steps_ready', '')
                                       FROM (SELECT 1 FROM next LIMIT 1) one) woken),
                (SELECT count(*) FROM finished)",
    )
    .bind(&missions)
    .bind(&seqs)
    .fetch_one(conn)
    .await?;
    for _ in 0..finished {
        telemetry::mission_finished("succeeded");
    }
    Ok(())
}

/// An `emit` step's event, from its result.
fn emitted_event(result: &Value) -> Option<(String, Value)> {
    let event = result.get("event")?.as_str()?.to_string();
    let payload = result.get("payload").cloned().unwrap_or_else(|| json!({}));
    Some((event, payload))
}

/// A step out of attempts: dead-letter it, fail its mission, cancel what follows.
pub(crate) async fn fail_for_good(
    conn: &mut PgConnection,
    step_id: i64,
    mission_id: i64,
    name: &str,
    attempts: i32,
    error: &str,
    pause_after_failures: u32,
) -> OpsResult<()> {
    sqlx::query(
        "INSERT INTO ops_step_dead_letters (step_id, mission_id, template, name, spec, attempts, last_error)
         SELECT s.id, s.mission_id, m.template, s.name, s.spec, s.attempts, $2
         FROM ops_mission_steps s JOIN ops_missions m ON m.id = s.mission_id
         WHERE s.id = $1
         ON CONFLICT (step_id) DO NOTHING",
    )
    .bind(step_id)
    .bind(error)
    .execute(&mut *conn)
    .await?;
    events::emit(
        conn,
        NewEvent::new("step.failed", sources::WORKER)
            .mission(mission_id)
            .step(step_id)
            .payload(json!({ "name": name, "attempts": attempts, "error": error })),
    )
    .await?;
    sqlx::query(
        "UPDATE ops_mission_steps SET status = 'cancelled', finished_at = now()
         WHERE mission_id = $1 AND status IN ('waiting', 'queued')",
    )
    .bind(mission_id)
    .execute(&mut *conn)
    .await?;
    let failed: Option<(String, i64, Value)> = sqlx::query_as(
        "UPDATE ops_missions m SET status = 'failed', finished_at = now(), error = $2
         FROM ops_mission_proposals p
         WHERE m.id = $1 AND m.status = 'running' AND p.id = m.proposal_id
         RETURNING m.template, m.proposal_id, p.params",
    )
    .bind(mission_id)
    .bind(format!("step {name} failed: {error}"))
    .fetch_optional(&mut *conn)
    .await?;
    let Some((template, proposal_id, params)) = failed else {
        return Ok(()); // already final (cancelled meanwhile): finalization is idempotent
    };
    telemetry::mission_finished("failed");
    events::emit(
        conn,
        NewEvent::new("mission.failed", sources::WORKER)
            .proposal(proposal_id)
            .mission(mission_id)
            .payload(json!({
                "template": template, "params": params, "step": name, "error": error,
            })),
    )
    .await?;
    if pause_after_failures > 0 {
        pause_after_repeated_failures(conn, &template, pause_after_failures).await?;
    }
    Ok(())
}

/// `gates.pause_after_failures`: the template's last N finished missions all failed.
async fn pause_after_repeated_failures(
    conn: &mut PgConnection,
    template: &str,
    threshold: u32,
) -> OpsResult<()> {
    let failed_in_a_row: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
            SELECT status FROM ops_missions WHERE template = $1 AND status <> 'running'
            ORDER BY finished_at DESC, id DESC LIMIT $2) last
         WHERE status = 'failed'",
    )
    .bind(template)
    .bind(i64::from(threshold))
    .fetch_one(&mut *conn)
    .await?;
    if failed_in_a_row >= i64::from(threshold) {
        gates::pause_template(conn, template, failed_in_a_row).await?;
    }
    Ok(())
}

/// Mark a running mission succeeded when all its steps have. Idempotent.
pub async fn finalize(conn: &mut PgConnection, mission_id: i64) -> OpsResult<bool> {
    let done: Option<(String, i64)> = sqlx::query_as(
        "UPDATE ops_missions SET status = 'succeeded', finished_at = now()
         WHERE id = $1 AND status = 'running'
           AND NOT EXISTS (SELECT 1 FROM ops_mission_steps
                           WHERE mission_id = $1 AND status <> 'succeeded')
         RETURNING template, proposal_id",
    )
    .bind(mission_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((template, proposal_id)) = done else {
        return Ok(false);
    };
    telemetry::mission_finished("succeeded");
    events::emit(
        conn,
        NewEvent::new("mission.succeeded", sources::WORKER)
            .proposal(proposal_id)
            .mission(mission_id)
            .payload(json!({ "template": template })),
    )
    .await?;
    Ok(true)
}
