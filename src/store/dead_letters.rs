//! Owner of `ops_step_dead_letters`: a step out of attempts, kept with its spec for a
//! person to look at. `record` once per step (a second time does nothing); rows go with
//! their step (cascade) when retention deletes its mission.

use sqlx::PgConnection;

use crate::domain::error::OpsResult;

/// Dead-letter a step that failed for good, with its last error.
pub async fn record(conn: &mut PgConnection, step_id: i64, last_error: &str) -> OpsResult<()> {
    sqlx::query(
        "INSERT INTO ops_step_dead_letters (step_id, mission_id, template, name, spec, attempts, last_error)
         SELECT s.id, s.mission_id, m.template, s.name, s.spec, s.attempts, $2
         FROM ops_mission_steps s JOIN ops_missions m ON m.id = s.mission_id
         WHERE s.id = $1
         ON CONFLICT (step_id) DO NOTHING",
    )
    .bind(step_id)
    .bind(last_error)
    .execute(conn)
    .await?;
    Ok(())
}
