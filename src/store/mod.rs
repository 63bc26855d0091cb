//! The tables' owners: each table's statements live in exactly one module here, one
//! small named statement per state transition. A set-based statement that changes
//! several tables at once (a batch and its events) is written by the owner of its main
//! table and takes the other tables' inserts from their owners (`insert_events!`,
//! `insert_runs!`). Exception: `interfaces::bench` seeds scratch databases with raw
//! inserts.

pub mod approvals;
pub mod budgets;
pub mod dead_letters;
pub mod events;
pub mod keys;
pub mod missions;
pub mod outbox;
pub mod policy;
pub mod proposals;
pub mod questions;
pub mod reactions;
pub mod runs;
pub mod steps;
pub mod triggers;
pub mod users;
pub mod workers;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::domain::error::OpsResult;

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
