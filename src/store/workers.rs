//! Owner of `ops_workers`: the worker processes, for `status` and the metrics.
//! `register` (at start, or again after a restart with the same id) → `seen` (every
//! lease renewal) → `stopped` (at a clean shutdown; a crashed worker just stops being seen).

use sqlx::PgExecutor;

use crate::domain::error::OpsResult;

pub async fn register(
    db: impl PgExecutor<'_>,
    id: &str,
    host: &str,
    concurrency: usize,
) -> OpsResult<()> {
    sqlx::query(
        "INSERT INTO ops_workers (id, host, pid, concurrency) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET last_seen = now(), stopped_at = NULL",
    )
    .bind(id)
    .bind(host)
    .bind(std::process::id() as i32)
    .bind(i32::try_from(concurrency).unwrap_or(i32::MAX))
    .execute(db)
    .await?;
    Ok(())
}

/// The worker is alive (and running, should it have been marked stopped).
pub async fn seen(db: impl PgExecutor<'_>, id: &str) -> OpsResult<()> {
    sqlx::query("UPDATE ops_workers SET last_seen = now(), stopped_at = NULL WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// The worker shut down cleanly.
pub async fn stopped(db: impl PgExecutor<'_>, id: &str) -> OpsResult<()> {
    sqlx::query("UPDATE ops_workers SET last_seen = now(), stopped_at = now() WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}
