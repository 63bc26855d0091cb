//! Owner of `ops_agent_events`, the append-only event log. Every state change writes its
//! event through here, in the same transaction as the change; NOTIFY is delivered on
//! commit, so listeners never see an event whose change was rolled back.
//!
//! An event's life: written (`emit`, or `insert_events!` inside a set-based statement of
//! another owner) → processed (already at insert when no reaction rule can match its
//! kind, else `lock_unprocessed` → `mark_processed` by the heartbeat) → `delete_expired`
//! by retention.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::domain::error::{OpsError, OpsResult};

/// The one event insert, as SQL text: `insert_events!(kinds: ["$4"], rows: "<rows>")`
/// is an `INSERT INTO ops_agent_events` of `<rows>`, a query (or `VALUES`) giving, in
/// order, `kind, source, proposal_id, mission_id, step_id, payload` (NULL ids typed
/// `::bigint`). Other owners put it in their set-based statements as a CTE, so a batch
/// writes its events in the same statement, in `<rows>`' order (ids follow it).
/// `kinds` are the kinds the rows have (bound parameters): `ops_processed_at` (a query)
/// then runs once per statement and kind, only for kinds present, never per row. A row
/// of another kind is still right, only slower.
macro_rules! insert_events {
    (kinds: [$($kind:literal),+ $(,)?], rows: $rows:expr $(,)?) => {
        concat!(
            "INSERT INTO ops_agent_events (kind, source, proposal_id, mission_id, step_id, payload, processed_at)
             SELECT e.kind, e.source, e.proposal_id, e.mission_id, e.step_id, e.payload,
                    CASE e.kind",
            $(" WHEN ", $kind, "::text THEN (SELECT ops_processed_at(", $kind, "::text))",)+
            " ELSE ops_processed_at(e.kind) END
             FROM (", $rows, ") AS e (kind, source, proposal_id, mission_id, step_id, payload)"
        )
    };
}
pub(crate) use insert_events;

/// An event about to be written. Ids tie it to what it is about.
#[derive(Debug, Clone, Default)]
pub struct NewEvent {
    pub kind: Cow<'static, str>,
    pub source: String,
    pub proposal_id: Option<i64>,
    pub mission_id: Option<i64>,
    pub step_id: Option<i64>,
    pub payload: Value,
}

impl NewEvent {
    pub fn new(kind: impl Into<Cow<'static, str>>, source: impl Into<String>) -> NewEvent {
        NewEvent {
            kind: kind.into(),
            source: source.into(),
            payload: Value::Object(Default::default()),
            ..NewEvent::default()
        }
    }
    pub fn proposal(mut self, id: i64) -> Self {
        self.proposal_id = Some(id);
        self
    }
    pub fn mission(mut self, id: i64) -> Self {
        self.mission_id = Some(id);
        self
    }
    pub fn step(mut self, id: i64) -> Self {
        self.step_id = Some(id);
        self
    }
    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }
}

/// Append one event (and wake `events --follow` and the heartbeat) in the caller's transaction.
pub async fn emit(conn: &mut PgConnection, event: NewEvent) -> OpsResult<i64> {
    append(conn, &event.kind, &event.source, &event).await
}

/// A user's own event kind (CLI `emit`, HTTP `/api/events`), validated.
pub async fn emit_user(pool: &PgPool, kind: &str, source: &str, payload: Value) -> OpsResult<i64> {
    validate_user_kind(kind)?;
    if !payload.is_object() {
        return Err(OpsError::bad_input(
            "the payload must be a JSON object, like {\"key\": \"value\"}",
        ));
    }
    let mut tx = pool.begin().await?;
    let event = NewEvent {
        payload,
        ..NewEvent::default()
    };
    let id = append(&mut tx, kind, source, &event).await?;
    tx.commit().await?;
    Ok(id)
}

async fn append(
    conn: &mut PgConnection,
    kind: &str,
    source: &str,
    event: &NewEvent,
) -> OpsResult<i64> {
    // The insert trigger sends the NOTIFY (see the migration).
    let id: i64 = sqlx::query_scalar(concat!(
        insert_events!(
            kinds: ["$1"],
            rows: "VALUES ($1::text, $2::text, $3::bigint, $4::bigint, $5::bigint, $6::jsonb)",
        ),
        " RETURNING id"
    ))
    .bind(kind)
    .bind(source)
    .bind(event.proposal_id)
    .bind(event.mission_id)
    .bind(event.step_id)
    .bind(&event.payload)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// An event waiting for the reactions, as the heartbeat reads it.
#[derive(Debug, sqlx::FromRow)]
pub struct PendingEvent {
    pub id: i64,
    pub kind: String,
    pub source: String,
    pub payload: Value,
}

/// The oldest `limit` unprocessed events, locked until the caller's transaction ends
/// (SKIP LOCKED: a second tick never takes the same ones).
pub async fn lock_unprocessed(conn: &mut PgConnection, limit: i64) -> OpsResult<Vec<PendingEvent>> {
    Ok(sqlx::query_as(
        "SELECT id, kind, source, payload FROM ops_agent_events
         WHERE processed_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// The reactions have decided on these events.
pub async fn mark_processed(conn: &mut PgConnection, ids: &[i64]) -> OpsResult<()> {
    sqlx::query("UPDATE ops_agent_events SET processed_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Retention: up to `limit` processed events older than `cutoff`, oldest first, except
/// those a pending notification will still render and those of a running mission.
/// Walks ids (they grow with time), so no index on `created_at` is needed.
pub async fn delete_expired(pool: &PgPool, cutoff: DateTime<Utc>, limit: i64) -> OpsResult<u64> {
    super::delete_older(
        pool,
        "DELETE FROM ops_agent_events WHERE id IN (
            SELECT e.id FROM ops_agent_events e
            WHERE e.created_at < $1 AND e.processed_at IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM ops_notifications n WHERE n.event_id = e.id AND n.status = 'pending')
              AND NOT EXISTS (SELECT 1 FROM ops_missions m WHERE m.id = e.mission_id AND m.status = 'running')
            ORDER BY e.id LIMIT $2)",
        cutoff,
        limit,
    )
    .await
}

/// Event kinds users may emit: `^[a-z][a-z0-9_.-]{0,63}$` (design §4).
pub fn validate_user_kind(kind: &str) -> OpsResult<()> {
    let ok = !kind.is_empty()
        && kind.len() <= 64
        && kind.as_bytes()[0].is_ascii_lowercase()
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if !ok {
        return Err(OpsError::bad_input(format!(
            "event kind {kind:?} is not valid: lowercase letters, digits and _ . - (at most 64, starting with a letter)"
        )));
    }
    // opsloop's own kinds drive reactions (a rollback on `mission.failed`) and
    // notifications: nobody may forge one.
    let namespace = kind.split('.').next().unwrap_or(kind);
    if RESERVED_NAMESPACES.contains(&namespace) {
        return Err(OpsError::bad_input(format!(
            "event kind {kind:?} is reserved: kinds starting with {} are opsloop's own; choose another first word, e.g. \"myapp.{}\"",
            RESERVED_NAMESPACES
                .iter()
                .map(|n| format!("{n}."))
                .collect::<Vec<_>>()
                .join(" "),
            kind.split_once('.').map_or(kind, |(_, rest)| rest),
        )));
    }
    Ok(())
}

/// The first words of opsloop's own event kinds (`domain::vocab::EventKind`).
pub const RESERVED_NAMESPACES: &[&str] = &[
    "proposal", "mission", "step", "question", "template", "system", "budget", "policy", "user",
    "key",
];

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Event {
    pub id: i64,
    pub kind: String,
    pub source: String,
    pub proposal_id: Option<i64>,
    pub mission_id: Option<i64>,
    pub step_id: Option<i64>,
    pub payload: Value,
    pub created_at: DateTime<Utc>,
}

const EVENT_COLUMNS: &str =
    "id, kind, source, proposal_id, mission_id, step_id, payload, created_at";

/// A position in the event stream that never skips an event. Ids are taken at insert
/// but transactions commit in any order, so reading `id > last` can pass over an event
/// that commits late. Instead a follower reads transaction windows: every transaction
/// below the snapshot's xmin has finished, so `[previous xmin, current xmin)` is complete.
#[derive(Debug, Clone, Copy)]
pub struct Cursor {
    horizon: i64,
}

async fn horizon(pool: &PgPool) -> OpsResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(pool)
            .await?,
    )
}

/// The newest `limit` finished events (oldest first), and a cursor just after them.
pub async fn recent(pool: &PgPool, limit: i64) -> OpsResult<(Vec<Event>, Cursor)> {
    let horizon = horizon(pool).await?;
    let sql = format!(
        "SELECT * FROM (SELECT {EVENT_COLUMNS} FROM ops_agent_events
                        WHERE xid < $2 ORDER BY id DESC LIMIT $1) e
         ORDER BY id"
    );
    let events = sqlx::query_as(&sql)
        .bind(limit)
        .bind(horizon)
        .fetch_all(pool)
        .await?;
    Ok((events, Cursor { horizon }))
}

/// Events that finished since `cursor`, oldest id first; advances the cursor.
pub async fn next(pool: &PgPool, cursor: &mut Cursor) -> OpsResult<Vec<Event>> {
    let horizon = horizon(pool).await?;
    if horizon <= cursor.horizon {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM ops_agent_events
         WHERE xid >= $1 AND xid < $2 ORDER BY id"
    );
    let events = sqlx::query_as(&sql)
        .bind(cursor.horizon)
        .bind(horizon)
        .fetch_all(pool)
        .await?;
    cursor.horizon = horizon;
    Ok(events)
}

/// One line for people: `12:03:04 mission.started mission #7 deploy {..}`.
pub fn describe(event: &Event) -> String {
    let mut line = format!(
        "{} #{} {}",
        event.created_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        event.id,
        event.kind
    );
    if let Some(id) = event.proposal_id {
        line.push_str(&format!(" proposal #{id}"));
    }
    if let Some(id) = event.mission_id {
        line.push_str(&format!(" mission #{id}"));
    }
    if let Some(id) = event.step_id {
        line.push_str(&format!(" step #{id}"));
    }
    line.push_str(&format!(" ({})", event.source));
    if event.payload.as_object().is_some_and(|m| !m.is_empty()) {
        line.push(' ');
        line.push_str(&event.payload.to_string());
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn opsloops_own_kinds_are_reserved() {
        for kind in crate::domain::vocab::EventKind::ALL {
            let err = super::validate_user_kind(kind.as_str()).expect_err(kind.as_str());
            assert!(err.to_string().contains("reserved"), "{err}");
        }
        assert!(super::validate_user_kind("missions.failed").is_ok());
        assert!(super::validate_user_kind("deploy.done").is_ok());
    }
}
