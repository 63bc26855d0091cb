//! The tables' owners: each table's statements live in exactly one module here, one
//! small named statement per state transition.

pub mod approvals;
pub mod events;
pub mod outbox;
pub mod policy;
pub mod proposals;
pub mod triggers;
pub mod users;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::error::OpsResult;

/// Retention's statement shape: a bounded `DELETE` of rows older than `$1` (`cutoff`),
/// at most `$2` (`limit`) of them. Returns how many went.
pub(crate) async fn delete_older(
    pool: &PgPool,
    sql: &'static str,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> OpsResult<u64> {
    Ok(sqlx::query(sql)
        .bind(cutoff)
        .bind(limit)
        .execute(pool)
        .await?
        .rows_affected())
}
