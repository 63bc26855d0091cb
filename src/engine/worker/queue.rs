//! The worker's queries: claim, renew, release, register. Each is one statement.

use std::time::Duration;

use serde_json::Value;
use sqlx::{PgExecutor, PgPool};

use crate::db::interval;
use crate::error::OpsResult;

/// A step this worker now holds under a lease.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: i64,
    pub mission_id: i64,
    pub name: String,
    pub spec: Value,
    pub attempts: i32,
    pub params: Value,
}

/// Claim up to `limit` ready steps (oldest first) unless paused, starting a new
/// attempt of each and writing their `step.started` events, in one statement. A step
/// whose mission is no longer running (cancelled, failed) is never claimed.
pub async fn claim(
    pool: &PgPool,
    owner: &str,
    limit: i64,
    lease: Duration,
) -> OpsResult<Vec<Claimed>> {
    Ok(sqlx::query_as(
        "WITH ready AS (
            SELECT id FROM ops_mission_steps
            WHERE status = 'queued' AND run_after <= now()
              AND (SELECT m.status FROM ops_missions m WHERE m.id = ops_mission_steps.mission_id) = 'running'
              AND NOT coalesce((SELECT (value->>'paused')::boolean FROM ops_policy WHERE key = 'paused'), false)
            ORDER BY run_after, id
            LIMIT $2
            FOR UPDATE SKIP LOCKED
         ), claimed AS (
            UPDATE ops_mission_steps s
            SET status = 'running', attempts = s.attempts + 1, lease_owner = $1,
                lease_expires_at = now() + $3, started_at = now(), finished_at = NULL
            -- = ANY(ARRAY(..)): look the rows up by key; a join here seq-scans the table.
            WHERE s.id = ANY(ARRAY(SELECT id FROM ready))
            RETURNING s.id, s.mission_id, s.name, s.spec, s.attempts
         ), started AS (
            INSERT INTO ops_agent_events (kind, source, mission_id, step_id, payload, processed_at)
            SELECT 'step.started', 'worker', c.mission_id, c.id,
                   jsonb_build_object('name', c.name, 'attempt', c.attempts, 'worker', $1::text),
                   (SELECT ops_processed_at('step.started'))
            FROM claimed c
         )
         SELECT c.id, c.mission_id, c.name, c.spec, c.attempts, x.params
         FROM claimed c
         CROSS JOIN LATERAL (
            SELECT p.params FROM ops_missions m JOIN ops_mission_proposals p ON p.id = m.proposal_id
            WHERE m.id = c.mission_id) x
         ORDER BY c.id",
    )
    .bind(owner)
    .bind(limit)
    .bind(interval(lease))
    .fetch_all(pool)
    .await?)
}

/// Extend the leases this worker holds. Returns the steps it still holds and whether
/// their mission was cancelled meanwhile; a step missing from the answer was lost.
pub async fn renew(
    pool: &PgPool,
    owner: &str,
    steps: &[(i64, i32)],
    lease: Duration,
) -> OpsResult<Vec<(i64, bool)>> {
    let ids: Vec<i64> = steps.iter().map(|s| s.0).collect();
    let attempts: Vec<i32> = steps.iter().map(|s| s.1).collect();
    Ok(sqlx::query_as(
        "UPDATE ops_mission_steps s SET lease_expires_at = now() + $4
         FROM unnest($2::bigint[], $3::int[]) AS held(id, attempt)
         WHERE s.id = ANY($2) AND s.id = held.id AND s.attempts = held.attempt
           AND s.lease_owner = $1 AND s.status = 'running'
         RETURNING s.id, (SELECT m.status = 'cancelled' FROM ops_missions m WHERE m.id = s.mission_id)",
    )
    .bind(owner)
    .bind(&ids)
    .bind(&attempts)
    .bind(interval(lease))
    .fetch_all(pool)
    .await?)
}

/// Give a step back to the queue at shutdown: the interrupted attempt does not count.
pub async fn release(pool: &PgPool, owner: &str, step_id: i64, attempt: i32) -> OpsResult<bool> {
    let released = sqlx::query(
        "WITH r AS (
            UPDATE ops_mission_steps
            SET status = 'queued', attempts = greatest(attempts - 1, 0), run_after = now(),
                lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
            WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND status = 'running'
            RETURNING id)
         SELECT pg_notify('ops_steps_ready', '') FROM r",
    )
    .bind(step_id)
    .bind(owner)
    .bind(attempt)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(released > 0)
}

pub async fn register(pool: &PgPool, id: &str, host: &str, concurrency: usize) -> OpsResult<()> {
    sqlx::query(
        "INSERT INTO ops_workers (id, host, pid, concurrency) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET last_seen = now(), stopped_at = NULL",
    )
    .bind(id)
    .bind(host)
    .bind(std::process::id() as i32)
    .bind(concurrency as i32)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn seen(db: impl PgExecutor<'_>, id: &str, stopped: bool) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_workers SET last_seen = now(), stopped_at = CASE WHEN $2 THEN now() END WHERE id = $1",
    )
    .bind(id)
    .bind(stopped)
    .execute(db)
    .await?;
    Ok(())
}

/// This machine's name, for `ops_workers.host`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
