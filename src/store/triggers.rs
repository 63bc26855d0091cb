//! Owner of `ops_trigger_state`: per cron trigger, the last slot it handled. A trigger
//! seen for the first time starts counting from then (`start`); each handled slot moves
//! it on (`record_slot`). `lock_last_slot` holds the trigger's row for the caller's
//! transaction, so a slot is handled once.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::error::OpsResult;

/// The last slot trigger `name` handled, its row locked; `None` when never seen.
pub async fn lock_last_slot(
    conn: &mut PgConnection,
    name: &str,
) -> OpsResult<Option<DateTime<Utc>>> {
    Ok(
        sqlx::query_scalar("SELECT last_slot FROM ops_trigger_state WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(conn)
            .await?,
    )
}

/// First sight of trigger `name`: nothing before `now` was missed.
pub async fn start(conn: &mut PgConnection, name: &str, now: DateTime<Utc>) -> OpsResult<()> {
    sqlx::query(
        "INSERT INTO ops_trigger_state (name, last_slot) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Trigger `name` handled every slot up to `slot` (fired or, while paused, passed over).
pub async fn record_slot(
    conn: &mut PgConnection,
    name: &str,
    slot: DateTime<Utc>,
) -> OpsResult<()> {
    sqlx::query("UPDATE ops_trigger_state SET last_slot = $2, fired_at = now() WHERE name = $1")
        .bind(name)
        .bind(slot)
        .execute(conn)
        .await?;
    Ok(())
}
