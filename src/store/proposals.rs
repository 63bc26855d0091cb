//! Owner of `ops_mission_proposals`. A proposal is created pending
//! (`insert_pending`), or rejected at once when a gate refused it (`insert_refused`),
//! and is decided once: pending → approved (`approve`), → rejected (`reject`),
//! → expired (`expire`). Decided proposals whose missions are over go by retention
//! (`delete_decided_before`; their missions, steps and approvals go with them by cascade).
//!
//! The engine (`engine::proposals`, `engine::approvals`) decides which transition
//! happens and writes its event in the same transaction.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::domain::error::OpsResult;
use crate::domain::policy::Risk;
use crate::domain::vocab::{ProposalStatus, Source};

/// A proposal about to be recorded.
#[derive(Debug, Clone)]
pub struct NewRow<'a> {
    pub template: &'a str,
    pub params: &'a Value,
    pub risk: Risk,
    pub proposed_by: &'a str,
    pub source: Source,
    /// The steps the mission will run (`Vec<PlannedStep>` as JSON).
    pub plan: Value,
    pub approvals_needed: i32,
    pub self_approval: bool,
    /// How long it waits for a decision.
    pub ttl: chrono::Duration,
    /// Its mission's steps are claimed in this order (-100..=100, higher first).
    pub priority: i32,
}

/// Record a proposal waiting for approval. Returns its id.
pub async fn insert_pending(conn: &mut PgConnection, row: &NewRow<'_>) -> OpsResult<i64> {
    insert(conn, row, ProposalStatus::Pending, None, None).await
}

/// Record a proposal the gate `gate` refused: rejected at once, decided by `gate:NAME`.
pub async fn insert_refused(
    conn: &mut PgConnection,
    row: &NewRow<'_>,
    gate: &str,
    reason: &str,
) -> OpsResult<i64> {
    let decided_by = format!("gate:{gate}");
    insert(
        conn,
        row,
        ProposalStatus::Rejected,
        Some(reason),
        Some(&decided_by),
    )
    .await
}

async fn insert(
    conn: &mut PgConnection,
    row: &NewRow<'_>,
    status: ProposalStatus,
    reason: Option<&str>,
    decided_by: Option<&str>,
) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO ops_mission_proposals
            (template, params, risk, proposed_by, source, reason, status, plan,
             approvals_needed, self_approval, expires_at, decided_by, decided_at, priority)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + $11, $12,
                 CASE WHEN $7 = 'rejected' THEN now() END, $13)
         RETURNING id",
    )
    .bind(row.template)
    .bind(row.params)
    .bind(row.risk.as_str())
    .bind(row.proposed_by)
    .bind(row.source)
    .bind(reason)
    .bind(status)
    .bind(&row.plan)
    .bind(row.approvals_needed)
    .bind(row.self_approval)
    .bind(row.ttl)
    .bind(decided_by)
    .bind(row.priority)
    .fetch_one(conn)
    .await?)
}

/// A proposal held for a decision (`lock`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Locked {
    pub template: String,
    pub status: ProposalStatus,
    pub proposed_by: String,
    pub approvals_needed: i32,
    pub self_approval: bool,
    pub decided_by: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    /// Pending, but past its time to live.
    pub expired: bool,
}

/// Take proposal `id`'s row lock for the caller's transaction: two deciders at once
/// see each other's decisions.
pub async fn lock(conn: &mut PgConnection, id: i64) -> OpsResult<Option<Locked>> {
    Ok(sqlx::query_as(
        "SELECT template, status, proposed_by, approvals_needed, self_approval, decided_by, decided_at,
                (status = 'pending' AND expires_at <= now()) AS expired
         FROM ops_mission_proposals WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// pending → approved. The caller holds the row lock (or just inserted the row).
/// Returns the template and the plan the mission is made of.
pub async fn approve(
    conn: &mut PgConnection,
    id: i64,
    decided_by: &str,
) -> OpsResult<(String, Value)> {
    Ok(sqlx::query_as(
        "UPDATE ops_mission_proposals
         SET status = 'approved', decided_by = $2, decided_at = now()
         WHERE id = $1 AND status = 'pending'
         RETURNING template, plan",
    )
    .bind(id)
    .bind(decided_by)
    .fetch_one(conn)
    .await?)
}

/// pending → rejected by a person; their reason, if any, replaces the stored one.
/// The caller holds the row lock and saw it pending.
pub async fn reject(
    conn: &mut PgConnection,
    id: i64,
    decided_by: &str,
    reason: Option<&str>,
) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_mission_proposals
         SET status = 'rejected', decided_by = $2, decided_at = now(), reason = coalesce($3, reason)
         WHERE id = $1",
    )
    .bind(id)
    .bind(decided_by)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// pending → expired, decided by `ttl`. Returns false when it was no longer pending.
pub async fn expire(conn: &mut PgConnection, id: i64) -> OpsResult<bool> {
    let done = sqlx::query(
        "UPDATE ops_mission_proposals SET status = 'expired', decided_at = now(), decided_by = 'ttl'
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Pending proposals past their time to live, oldest first, at most `limit`, locked for
/// the caller's transaction (rows someone is deciding right now are skipped). Returns
/// `(id, template)`.
pub async fn lock_due_to_expire(
    conn: &mut PgConnection,
    limit: i64,
) -> OpsResult<Vec<(i64, String)>> {
    Ok(sqlx::query_as(
        "SELECT id, template FROM ops_mission_proposals
         WHERE status = 'pending' AND expires_at <= now()
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Delete up to `limit` proposals decided before `cutoff` whose mission, if any,
/// finished before it too. Returns how many went.
pub async fn delete_decided_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> OpsResult<u64> {
    super::delete_older(
        pool,
        "DELETE FROM ops_mission_proposals WHERE id IN (
            SELECT p.id FROM ops_mission_proposals p
            LEFT JOIN ops_missions m ON m.proposal_id = p.id
            WHERE p.status <> 'pending' AND p.decided_at < $1
              AND (m.id IS NULL OR (m.status <> 'running' AND m.finished_at < $1))
            LIMIT $2)",
        cutoff,
        limit,
    )
    .await
}

/// Pending proposals older than `after` not reminded yet: marked reminded now (once
/// each). Returns their ids.
pub async fn take_due_reminders(
    conn: &mut PgConnection,
    after: std::time::Duration,
    limit: i64,
) -> OpsResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "UPDATE ops_mission_proposals SET reminded_at = now()
         WHERE id IN (SELECT id FROM ops_mission_proposals
                      WHERE status = 'pending' AND reminded_at IS NULL
                        AND created_at <= now() - $1 AND expires_at > now()
                      ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(crate::db::interval(after))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}
