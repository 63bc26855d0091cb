//! Owner of `ops_action_runs`: the record of what ran, one row per heartbeat tick
//! (`record_tick`) and per step attempt (written with the attempt's ending through
//! `insert_runs!`, see `steps::store_endings`), deleted by retention (`delete_expired`).
//! Rows are written once and never changed.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use crate::domain::error::OpsResult;

/// The one `ops_action_runs` insert, as SQL text: `insert_runs!("<rows>")` inserts
/// `<rows>`, a query (or `VALUES`) giving, in order, `kind, step_id, attempt, worker,
/// outcome, summary, started_at, finished_at`. Other owners' set-based statements put
/// it in a CTE.
macro_rules! insert_runs {
    ($rows:expr) => {
        concat!(
            "INSERT INTO ops_action_runs (kind, step_id, attempt, worker, outcome, summary, started_at, finished_at) ",
            $rows
        )
    };
}
pub(crate) use insert_runs;

/// A heartbeat tick ran (`summary`: what it did).
pub async fn record_tick(
    pool: &PgPool,
    summary: &Value,
    started_at: DateTime<Utc>,
) -> OpsResult<()> {
    sqlx::query(insert_runs!(
        "VALUES ('tick', NULL, NULL, NULL, 'ok', $1, $2, now())"
    ))
    .bind(summary)
    .bind(started_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Retention: up to `limit` runs started before `cutoff`, oldest first. Walks ids (they
/// grow with time), so no index on `started_at` is needed.
pub async fn delete_expired(pool: &PgPool, cutoff: DateTime<Utc>, limit: i64) -> OpsResult<u64> {
    super::delete_older(
        pool,
        "DELETE FROM ops_action_runs WHERE id IN (
            SELECT id FROM ops_action_runs WHERE started_at < $1 ORDER BY id LIMIT $2)",
        cutoff,
        limit,
    )
    .await
}
