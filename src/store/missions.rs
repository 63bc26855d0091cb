//! Owner of `ops_missions`: every statement that changes a mission, one per transition.
//!
//! ```text
//! create ─▶ running ──finalize_succeeded──▶ succeeded   (every step succeeded)
//!           running ──fail──▶ failed                      (a step out of attempts)
//!           running ──cancel──▶ cancelled                 (a person; taken `lock` FOR UPDATE first)
//! failed, cancelled ──reopen──▶ running                  (a retry, under `lock`)
//! ```
//!
//! The kill switch takes every running mission `lock_running` and cancels each.
//! A step's reported cost is added to its mission's `cost` by `add_cost` (any status).
//!
//! An ending that depends on its mission still running takes it `FOR KEY SHARE`
//! (`lock_stopped`), so it and a cancel are ordered: one sees the other.

use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::db::channels;
use crate::domain::error::OpsResult;
use crate::domain::vocab::{EventKind, MissionStatus, Source};
use crate::store::events::insert_events;

/// A new running mission of an approved proposal, at the proposal's priority.
pub async fn create(conn: &mut PgConnection, proposal_id: i64, template: &str) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO ops_missions (proposal_id, template, status, started_at, priority)
         SELECT $1, $2, 'running', now(), p.priority FROM ops_mission_proposals p WHERE p.id = $1
         RETURNING id",
    )
    .bind(proposal_id)
    .bind(template)
    .fetch_one(conn)
    .await?)
}

/// A mission's status, its row locked `FOR UPDATE` until the caller's transaction
/// ends; None when there is no such mission.
pub async fn lock(conn: &mut PgConnection, mission_id: i64) -> OpsResult<Option<MissionStatus>> {
    Ok(
        sqlx::query_scalar("SELECT status FROM ops_missions WHERE id = $1 FOR UPDATE")
            .bind(mission_id)
            .fetch_optional(conn)
            .await?,
    )
}

/// Every running mission's id, oldest first, each row locked `FOR UPDATE` until the
/// caller's transaction ends (the kill switch cancels them all at once).
pub async fn lock_running(conn: &mut PgConnection) -> OpsResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM ops_missions WHERE status = 'running' ORDER BY id FOR UPDATE",
    )
    .fetch_all(conn)
    .await?)
}

/// What a retry needs to know of a mission it holds (`lock`).
#[derive(Debug, sqlx::FromRow)]
pub struct Retryable {
    pub template: String,
    pub proposal_id: i64,
    pub risk: String,
    /// For the budget gate: whose proposal it was (`agent:NAME` for an agent's).
    pub proposed_by: String,
}

/// A mission's template, proposal and risk (for a retry's checks).
pub async fn retryable(conn: &mut PgConnection, mission_id: i64) -> OpsResult<Retryable> {
    Ok(sqlx::query_as(
        "SELECT m.template, m.proposal_id, p.risk, p.proposed_by
         FROM ops_missions m JOIN ops_mission_proposals p ON p.id = m.proposal_id
         WHERE m.id = $1",
    )
    .bind(mission_id)
    .fetch_one(conn)
    .await?)
}

/// A mission that was charged: which budgets it falls in depends on these.
#[derive(Debug, sqlx::FromRow)]
pub struct Charged {
    pub id: i64,
    pub template: String,
    pub proposed_by: String,
    /// What this statement added (the sum of the given costs of this mission).
    pub added: String,
}

/// Add steps' reported costs (decimal text, one per mission id; a mission may repeat)
/// to their missions' `cost`, in one statement, missions in id order.
pub async fn add_cost(
    conn: &mut PgConnection,
    mission_ids: &[i64],
    costs: &[&str],
) -> OpsResult<Vec<Charged>> {
    Ok(sqlx::query_as(
        "WITH c AS (
            SELECT id, sum(cost::numeric) AS added FROM unnest($1::bigint[], $2::text[]) AS t(id, cost)
            GROUP BY id ORDER BY id)
         UPDATE ops_missions m SET cost = m.cost + c.added
         FROM c, ops_mission_proposals p
         WHERE m.id = c.id AND p.id = m.proposal_id
         RETURNING m.id, m.template, p.proposed_by, trim_scale(c.added)::text AS added",
    )
    .bind(mission_ids)
    .bind(costs)
    .fetch_all(conn)
    .await?)
}

/// A failed or cancelled mission is running again (a retry). False when it was in
/// another state. The caller holds its `lock`.
pub async fn reopen(conn: &mut PgConnection, mission_id: i64) -> OpsResult<bool> {
    let reopened = sqlx::query(
        "UPDATE ops_missions SET status = 'running', error = NULL, finished_at = NULL
         WHERE id = $1 AND status IN ('failed', 'cancelled')",
    )
    .bind(mission_id)
    .execute(conn)
    .await?;
    Ok(reopened.rows_affected() > 0)
}

/// Mark a running mission cancelled (`error` says by whom). Returns its template, or
/// None when it was not running.
pub async fn cancel(
    conn: &mut PgConnection,
    mission_id: i64,
    error: &str,
) -> OpsResult<Option<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE ops_missions SET status = 'cancelled', finished_at = now(), error = $2
         WHERE id = $1 AND status = 'running' RETURNING template",
    )
    .bind(mission_id)
    .bind(error)
    .fetch_optional(conn)
    .await?)
}

/// Tell the workers (on commit) that a mission was cancelled: they kill its running step.
pub async fn announce_cancel(conn: &mut PgConnection, mission_id: i64) -> OpsResult<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channels::CANCEL)
        .bind(mission_id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// Of these steps, those whose mission is no longer running. Their missions are locked
/// `FOR KEY SHARE` until commit: a cancel (which takes its mission `FOR UPDATE`) either
/// committed before, and is seen here, or waits for this transaction.
pub async fn lock_stopped(conn: &mut PgConnection, step_ids: &[i64]) -> OpsResult<Vec<i64>> {
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
    .bind(step_ids)
    .fetch_all(conn)
    .await?)
}

/// Mark these missions succeeded, each with its `mission.succeeded` event, in one
/// statement; those no longer running are left as they are (idempotent). The caller
/// has seen all their steps succeed (steps run in order: the last one did), and a
/// succeeded step never changes again. Returns how many it finalized.
pub async fn finalize_succeeded(conn: &mut PgConnection, mission_ids: &[i64]) -> OpsResult<u64> {
    let finished: i64 = sqlx::query_scalar(concat!(
        "WITH finished AS (
            UPDATE ops_missions m SET status = 'succeeded', finished_at = now()
            WHERE m.id = ANY($1) AND m.status = 'running'
            RETURNING m.id, m.template, m.proposal_id
         ), events AS (",
        insert_events!(
            kinds: ["$2"],
            rows: "SELECT $2::text, $3::text, proposal_id, id, NULL::bigint, jsonb_build_object('template', template)
             FROM finished ORDER BY id",
        ),
        ")
         SELECT count(*) FROM finished"
    ))
    .bind(mission_ids)
    .bind(EventKind::MissionSucceeded.as_str())
    .bind(Source::Worker.as_str())
    .fetch_one(conn)
    .await?;
    Ok(finished as u64)
}

/// What a failed mission was: for its `mission.failed` event.
#[derive(Debug, sqlx::FromRow)]
pub struct Failed {
    pub template: String,
    pub proposal_id: i64,
    pub params: Value,
}

/// Mark a running mission failed (`error` says why). None when it was no longer
/// running (cancelled meanwhile).
pub async fn fail(
    conn: &mut PgConnection,
    mission_id: i64,
    error: &str,
) -> OpsResult<Option<Failed>> {
    Ok(sqlx::query_as(
        "UPDATE ops_missions m SET status = 'failed', finished_at = now(), error = $2
         FROM ops_mission_proposals p
         WHERE m.id = $1 AND m.status = 'running' AND p.id = m.proposal_id
         RETURNING m.template, m.proposal_id, p.params",
    )
    .bind(mission_id)
    .bind(error)
    .fetch_optional(conn)
    .await?)
}

/// How many of the template's last `n` finished missions failed.
pub async fn failed_of_last(conn: &mut PgConnection, template: &str, n: u32) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM (
            SELECT status FROM ops_missions WHERE template = $1 AND status <> 'running'
            ORDER BY finished_at DESC, id DESC LIMIT $2) last
         WHERE status = 'failed'",
    )
    .bind(template)
    .bind(i64::from(n))
    .fetch_one(conn)
    .await?)
}

/// Up to `limit` running missions whose steps have all succeeded or were skipped (for the heartbeat's
/// safety net; the worker finalizes as the last step ends).
pub async fn awaiting_finalization(pool: &PgPool, limit: i64) -> OpsResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT m.id FROM ops_missions m
         WHERE m.status = 'running'
           AND NOT EXISTS (SELECT 1 FROM ops_mission_steps s WHERE s.mission_id = m.id AND s.status NOT IN ('succeeded', 'skipped'))
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
