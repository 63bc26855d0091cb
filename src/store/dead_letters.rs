//! Owner of `ops_step_dead_letters`: a step out of attempts, kept with its spec for a
//! person to look at. `record` once per step and attempt count (a second time does
//! nothing; a retried step that fails for good again is a new row); `mark_retried`
//! when a person retries its mission (the row stays). Rows go with their step
//! (cascade) when retention deletes its mission.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::domain::error::OpsResult;

/// Dead-letter a step that failed for good, with its last error.
pub async fn record(conn: &mut PgConnection, step_id: i64, last_error: &str) -> OpsResult<()> {
    sqlx::query(
        "INSERT INTO ops_step_dead_letters (step_id, mission_id, template, name, spec, attempts, last_error)
         SELECT s.id, s.mission_id, m.template, s.name, s.spec, s.attempts, $2
         FROM ops_mission_steps s JOIN ops_missions m ON m.id = s.mission_id
         WHERE s.id = $1
         ON CONFLICT (step_id, attempts) DO NOTHING",
    )
    .bind(step_id)
    .bind(last_error)
    .execute(conn)
    .await?;
    Ok(())
}

/// A step's dead letters are being retried by `by`: marked, kept.
pub async fn mark_retried(conn: &mut PgConnection, step_id: i64, by: &str) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_step_dead_letters SET retried_at = now(), retried_by = $2
         WHERE step_id = $1 AND retried_at IS NULL",
    )
    .bind(step_id)
    .bind(by)
    .execute(conn)
    .await?;
    Ok(())
}

/// Who retried a step's failure after `attempts` attempts, and when (None: not yet).
pub async fn retried(
    pool: &PgPool,
    step_id: i64,
    attempts: i32,
) -> OpsResult<Option<(String, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT retried_by, retried_at FROM ops_step_dead_letters
         WHERE step_id = $1 AND attempts = $2 AND retried_at IS NOT NULL",
    )
    .bind(step_id)
    .bind(attempts)
    .fetch_optional(pool)
    .await?)
}
