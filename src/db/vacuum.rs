//! The queue tables' own vacuum, for servers whose autovacuum is off. Every step, event
//! and message leaves old row versions behind; autovacuum reclaims them. Some servers
//! run with `autovacuum = off` (CI images, hand-tuned boxes), and there nothing ever
//! does: retention deletes the rows, yet the files grow by the minute and the claims
//! walk ever more dead index entries. Then the heartbeat vacuums these tables itself,
//! each once it has as many dead rows as autovacuum's defaults would have waited for.
//! With autovacuum on, this does nothing: it is autovacuum's job.

use sqlx::PgPool;

/// The tables every step, event and message updates or deletes from.
pub const QUEUE_TABLES: &[&str] = &[
    "ops_mission_steps",
    "ops_missions",
    "ops_agent_events",
    "ops_notifications",
    "ops_mission_proposals",
    "ops_action_runs",
    "ops_questions",
];

/// A table is vacuumed once it has this many dead rows and more than
/// [`DEAD_FRACTION`] of its live ones (autovacuum's defaults are 50 and 0.2; the
/// floor is higher so a quiet host does not vacuum every tick for a handful).
const DEAD_ROWS: i64 = 1000;
const DEAD_FRACTION: f64 = 0.2;

/// Vacuum the queue tables that need it when the server's autovacuum is off; returns
/// the tables vacuumed. A table another session holds a conflicting lock on is skipped
/// this time (`SKIP_LOCKED`), never waited for.
pub async fn queue_tables_if_autovacuum_is_off(pool: &PgPool) -> sqlx::Result<Vec<String>> {
    let due: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_stat_user_tables
         WHERE NOT current_setting('autovacuum')::bool
           AND schemaname = current_schema() AND relname = ANY($1)
           AND n_dead_tup >= $2 AND n_dead_tup > n_live_tup * $3
         ORDER BY n_dead_tup DESC",
    )
    .bind(QUEUE_TABLES)
    .bind(DEAD_ROWS)
    .bind(DEAD_FRACTION)
    .fetch_all(pool)
    .await?;
    if due.is_empty() {
        return Ok(due);
    }
    // The names come from QUEUE_TABLES (through the catalog), never from input.
    let statement = format!("VACUUM (SKIP_LOCKED) {}", due.join(", "));
    sqlx::raw_sql(&statement).execute(pool).await?;
    Ok(due)
}
