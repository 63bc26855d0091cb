//! Owner of `ops_agent_reactions`: each (event, rule) decision of the reactions, made
//! once (unique per pair). `record` (proposed or skipped, with why) → `delete_expired`
//! by retention. `last_proposed` is the rule's cooldown clock.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::domain::error::OpsResult;

/// Record what `reaction` decided for `event_id` (`status`: proposed or skipped). A
/// decision already recorded stays as it was.
pub async fn record(
    conn: &mut PgConnection,
    event_id: i64,
    reaction: &str,
    status: &str,
    proposal_id: Option<i64>,
    reason: &str,
) -> OpsResult<()> {
    sqlx::query(
        "INSERT INTO ops_agent_reactions (event_id, reaction, status, proposal_id, reason)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id, reaction) DO NOTHING",
    )
    .bind(event_id)
    .bind(reaction)
    .bind(status)
    .bind(proposal_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// When `reaction` last proposed something.
pub async fn last_proposed(
    conn: &mut PgConnection,
    reaction: &str,
) -> OpsResult<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "SELECT max(created_at) FROM ops_agent_reactions WHERE reaction = $1 AND status = 'proposed'",
    )
    .bind(reaction)
    .fetch_one(conn)
    .await?)
}

/// Retention: up to `limit` decisions made before `cutoff`, oldest first.
pub async fn delete_expired(pool: &PgPool, cutoff: DateTime<Utc>, limit: i64) -> OpsResult<u64> {
    super::delete_older(
        pool,
        "DELETE FROM ops_agent_reactions WHERE id IN (
            SELECT id FROM ops_agent_reactions WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
        cutoff,
        limit,
    )
    .await
}
