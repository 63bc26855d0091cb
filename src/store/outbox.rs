//! Owner of `ops_notifications`, the Telegram outbox. A row is queued pending: by the
//! events trigger (migrations/0002_outbox.sql) in the event's own transaction, or here
//! (`enqueue_replies`, `enqueue_prompt_refreshes`, `enqueue_failure_edits`, `enqueue_budget_edits`, `enqueue_for_admins`,
//! `adopt_prompt`; a command's reply is reserved before the command runs,
//! `reserve_reply`, and filled after, `fill_reply`). The sender takes each
//! chat's oldest pending row (`heads`), marks it in flight before calling Telegram
//! (`mark_in_flight`), then: `mark_sent` (with the refreshes of the same prompt or card
//! it covered), `retry_later` (backoff), `slow_down_chat` (a 429: the whole chat
//! waits) or `mark_failed`. A sent message deleted in Telegram is no longer edited
//! (`forget_message`). Retention deletes rows that are done (`delete_done_before`).
//!
//! Every statement that queues rows wakes the sender (`db::channels::OUTBOX`) on commit.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::db::channels;
use crate::domain::error::OpsResult;

/// What a row says while Telegram is being called. Left there, it tells that the sender
/// stopped mid-call, and the message may be in the chat already.
pub const IN_FLIGHT: &str = "in flight: Telegram was called, its answer is not recorded yet";

/// A pending row, as the sender sees it.
#[derive(Debug, sqlx::FromRow)]
pub struct Pending {
    pub id: i64,
    pub chat_id: i64,
    pub subject: String,
    pub action: String,
    pub event_id: Option<i64>,
    pub body: Value,
    /// For a `send` row: the message it edits (a failure message after a retry); else
    /// None until it is sent.
    pub message_id: Option<i64>,
    pub attempts: i32,
    pub error: Option<String>,
    /// Its `run_after` has come.
    pub due: bool,
}

impl Pending {
    /// The last attempt stopped between calling Telegram and recording its answer.
    pub fn was_in_flight(&self) -> bool {
        self.error.as_deref() == Some(IN_FLIGHT)
    }
}

/// Queue messages for `chat_id`, one per body (`{"text": ...}`), in this order.
pub async fn enqueue_replies(
    conn: &mut PgConnection,
    chat_id: i64,
    bodies: Vec<Value>,
) -> OpsResult<()> {
    sqlx::query(
        "WITH n AS (
            INSERT INTO ops_notifications (chat_id, subject, action, body)
            SELECT $1, 'reply', 'send', body FROM unnest($2::jsonb[]) WITH ORDINALITY AS t(body, n)
            ORDER BY n RETURNING id)
         SELECT pg_notify($3, '') FROM n LIMIT 1",
    )
    .bind(chat_id)
    .bind(bodies)
    .bind(channels::OUTBOX)
    .execute(conn)
    .await?;
    Ok(())
}

/// How long a reserved reply holds its chat's queue at most: past it, a reply never
/// filled (the bot stopped mid-command) is given up and the chat goes on.
const RESERVED_FOR: &str = "60 seconds";
/// What a reserved reply's row says until it is filled.
pub const RESERVED: &str = "reserved for the reply to a command";

/// Reserve the next message of `chat_id` for the reply to a command that is about to
/// run: the row holds the chat's queue (the sender sends each chat's rows in order), so
/// whatever the command causes there (a mission card, a prompt) comes after its reply.
/// Committed at once; returns its id for [`fill_reply`].
pub async fn reserve_reply(pool: &PgPool, chat_id: i64) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(&format!(
        "INSERT INTO ops_notifications (chat_id, subject, action, run_after, error)
         VALUES ($1, 'reply', 'send', now() + interval '{RESERVED_FOR}', $2) RETURNING id"
    ))
    .bind(chat_id)
    .bind(RESERVED)
    .fetch_one(pool)
    .await?)
}

/// Fill reserved reply `id` with the first of `bodies` (`{"text": ...}`) and queue the
/// rest after it; when the reservation was given up meanwhile, queue them all anew.
pub async fn fill_reply(
    conn: &mut PgConnection,
    id: i64,
    chat_id: i64,
    mut bodies: Vec<Value>,
) -> OpsResult<()> {
    if bodies.is_empty() {
        bodies.push(serde_json::json!({ "text": "✔️" }));
    }
    let filled = sqlx::query(
        "UPDATE ops_notifications SET body = $2, run_after = now(), error = NULL
         WHERE id = $1 AND status = 'pending' AND error = $3",
    )
    .bind(id)
    .bind(&bodies[0])
    .bind(RESERVED)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let rest = if filled > 0 {
        bodies.split_off(1)
    } else {
        bodies
    };
    if rest.is_empty() {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(channels::OUTBOX)
            .execute(conn)
            .await?;
        return Ok(());
    }
    enqueue_replies(conn, chat_id, rest).await
}

/// Queue a message about event `event_id` (the kill switch's) to every admin who started
/// the bot, whatever `notify.events` says, except those the events trigger already
/// tells (subscribers, when `notify.events` names the kind). Written by the engine in
/// the event's transaction: a trigger of its own would cost every event insert, the
/// worker's hot path included, for an event that is rare.
pub async fn enqueue_for_admins(conn: &mut PgConnection, event_id: i64) -> OpsResult<()> {
    sqlx::query(
        "WITH e AS (SELECT id, kind FROM ops_agent_events WHERE id = $1),
         patterns AS (
            SELECT jsonb_array_elements_text(value->'like') AS p FROM ops_policy WHERE key = 'notify'),
         n AS (
            INSERT INTO ops_notifications (chat_id, subject, action, event_id)
            SELECT u.telegram_id, 'event:' || e.id, 'send', e.id
            FROM e CROSS JOIN ops_users u
            WHERE u.started AND u.role = 'admin'
              AND NOT (u.subscribed AND EXISTS (SELECT 1 FROM patterns WHERE e.kind LIKE patterns.p))
            RETURNING id)
         SELECT pg_notify($2, '') FROM n LIMIT 1",
    )
    .bind(event_id)
    .bind(channels::OUTBOX)
    .execute(conn)
    .await?;
    Ok(())
}

/// Queue an edit of every failure message of mission `mission_id` that was sent (a
/// retry: they show who retried it, without their button). Rendered when sent.
pub async fn enqueue_failure_edits(
    conn: &mut PgConnection,
    mission_id: i64,
    failed_kind: &str,
) -> OpsResult<()> {
    sqlx::query(
        "WITH n AS (
            INSERT INTO ops_notifications (chat_id, subject, action, event_id, message_id)
            SELECT DISTINCT ON (n.chat_id, n.message_id) n.chat_id, n.subject, 'send', n.event_id, n.message_id
            FROM ops_notifications n JOIN ops_agent_events e ON e.id = n.event_id
            WHERE n.action = 'send' AND n.status = 'sent' AND n.message_id IS NOT NULL
              AND e.mission_id = $1 AND e.kind = $2
            RETURNING id)
         SELECT pg_notify($3, '') FROM n LIMIT 1",
    )
    .bind(mission_id)
    .bind(failed_kind)
    .bind(channels::OUTBOX)
    .execute(conn)
    .await?;
    Ok(())
}

/// Queue an edit of every sent message about a `kind` event (`budget.exhausted`) of
/// budget `budget`'s period starting `starts` (a raise: they lose their button and say
/// who raised it). Rendered when sent.
pub async fn enqueue_budget_edits(
    conn: &mut PgConnection,
    kind: &str,
    budget: &str,
    starts: &str,
) -> OpsResult<()> {
    sqlx::query(
        "WITH n AS (
            INSERT INTO ops_notifications (chat_id, subject, action, event_id, message_id)
            SELECT DISTINCT ON (n.chat_id, n.message_id) n.chat_id, n.subject, 'send', n.event_id, n.message_id
            FROM ops_agent_events e
            JOIN ops_notifications n ON n.subject = 'event:' || e.id AND n.event_id = e.id
            WHERE e.kind = $1 AND e.payload->>'budget' = $2 AND e.payload->>'starts' = $3
              AND n.action = 'send' AND n.status = 'sent' AND n.message_id IS NOT NULL
            RETURNING id)
         SELECT pg_notify($4, '') FROM n LIMIT 1",
    )
    .bind(kind)
    .bind(budget)
    .bind(starts)
    .bind(channels::OUTBOX)
    .execute(conn)
    .await?;
    Ok(())
}

/// Queue a re-render of every prompt of proposal `proposal_id`, in every chat it went
/// to (a partial approval: `1/2 approvals`).
pub async fn enqueue_prompt_refreshes(conn: &mut PgConnection, proposal_id: i64) -> OpsResult<()> {
    sqlx::query(
        "WITH n AS (
            INSERT INTO ops_notifications (chat_id, subject, action)
            SELECT DISTINCT chat_id, subject, 'prompt' FROM ops_notifications
            WHERE subject = 'proposal:' || $1 AND action = 'prompt'
            RETURNING id)
         SELECT pg_notify($2, '') FROM n LIMIT 1",
    )
    .bind(proposal_id)
    .bind(channels::OUTBOX)
    .execute(conn)
    .await?;
    Ok(())
}

/// Someone tapped a button of prompt `message_id` in `chat_id`, a message of ours we
/// have no record of: a prompt sent twice because Telegram's answer to the first send
/// was lost. Record it, so the proposal's edits reach it like the others, and queue its
/// refresh. Only for chats that were sent this proposal's prompt.
pub async fn adopt_prompt(
    pool: &PgPool,
    chat_id: i64,
    message_id: i32,
    proposal_id: i64,
) -> OpsResult<()> {
    sqlx::query(
        "WITH adopted AS (
            INSERT INTO ops_notifications (chat_id, subject, action, status, message_id, sent_at)
            SELECT $1, 'proposal:' || $3, 'prompt', 'sent', $2, now()
            WHERE EXISTS (SELECT 1 FROM ops_notifications
                          WHERE chat_id = $1 AND subject = 'proposal:' || $3 AND action = 'prompt')
              AND NOT EXISTS (SELECT 1 FROM ops_notifications
                              WHERE chat_id = $1 AND subject = 'proposal:' || $3 AND action = 'prompt'
                                AND message_id = $2)
            RETURNING chat_id, subject),
         refresh AS (
            INSERT INTO ops_notifications (chat_id, subject, action)
            SELECT chat_id, subject, 'prompt' FROM adopted RETURNING id)
         SELECT pg_notify($4, '') FROM refresh",
    )
    .bind(chat_id)
    .bind(i64::from(message_id))
    .bind(proposal_id)
    .bind(channels::OUTBOX)
    .execute(pool)
    .await?;
    Ok(())
}

/// The question whose message `message_id` in `chat_id` is (a reply to it answers it).
pub async fn question_of_message(
    pool: &PgPool,
    chat_id: i64,
    message_id: i32,
) -> OpsResult<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT substr(subject, 10)::bigint FROM ops_notifications
         WHERE chat_id = $1 AND message_id = $2 AND action = 'question' AND subject LIKE 'question:%'
         LIMIT 1",
    )
    .bind(chat_id)
    .bind(i64::from(message_id))
    .fetch_optional(pool)
    .await?)
}

/// Queue a new copy of each of these questions in `chat_id` (`/pending`): sent as a new
/// message, then edited with the others.
pub async fn enqueue_question_copies(
    conn: &mut PgConnection,
    chat_id: i64,
    question_ids: &[i64],
) -> OpsResult<()> {
    sqlx::query(
        "WITH n AS (
            INSERT INTO ops_notifications (chat_id, subject, action, body)
            SELECT $1, 'question:' || q, 'question', '{\"copy\": true}'
            FROM unnest($2::bigint[]) WITH ORDINALITY AS t(q, n) ORDER BY n
            RETURNING id)
         SELECT pg_notify($3, '') FROM n LIMIT 1",
    )
    .bind(chat_id)
    .bind(question_ids)
    .bind(channels::OUTBOX)
    .execute(conn)
    .await?;
    Ok(())
}

/// Queue a new copy of each of these prompts or questions (`subjects`, e.g.
/// `proposal:12`) in every chat that was sent it: a reminder, which rings where an edit
/// would not. Later edits reach the copies too.
pub async fn enqueue_reminders(conn: &mut PgConnection, subjects: &[String]) -> OpsResult<u64> {
    let n = sqlx::query(
        "WITH n AS (
            INSERT INTO ops_notifications (chat_id, subject, action, body)
            SELECT DISTINCT chat_id, subject, action, '{\"copy\": true}'::jsonb FROM ops_notifications
            WHERE subject = ANY($1) AND action IN ('prompt', 'question')
            RETURNING id)
         SELECT pg_notify($2, '') FROM n",
    )
    .bind(subjects)
    .bind(channels::OUTBOX)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n)
}

/// Each chat's oldest pending row (at most `limit` chats): only it may be sent, so
/// order per chat holds.
pub async fn heads(pool: &PgPool, limit: i64) -> OpsResult<Vec<Pending>> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT ON (chat_id) id, chat_id, subject, action, event_id, body, message_id, attempts,
                error, run_after <= now() AS due
         FROM ops_notifications WHERE status = 'pending'
         ORDER BY chat_id, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The newest pending refresh of `row`'s prompt or card in its chat (`row.id` for plain
/// messages, or when there is none newer): a render now covers them all.
pub async fn latest_refresh(pool: &PgPool, row: &Pending) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(max(id), $4) FROM ops_notifications
         WHERE status = 'pending' AND chat_id = $1 AND subject = $2 AND action = $3 AND action <> 'send'",
    )
    .bind(row.chat_id)
    .bind(&row.subject)
    .bind(&row.action)
    .bind(row.id)
    .fetch_one(pool)
    .await?)
}

/// Telegram is about to be called for row `id`, attempt `attempt`.
pub async fn mark_in_flight(pool: &PgPool, id: i64, attempt: i32) -> OpsResult<()> {
    sqlx::query("UPDATE ops_notifications SET attempts = $2, error = $3 WHERE id = $1")
        .bind(id)
        .bind(attempt)
        .bind(IN_FLIGHT)
        .execute(pool)
        .await?;
    Ok(())
}

/// pending → sent: `row`, with the message Telegram made or edited, and the pending
/// refreshes of the same prompt or card up to `covered`.
pub async fn mark_sent(
    pool: &PgPool,
    row: &Pending,
    message_id: Option<i32>,
    covered: i64,
) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_notifications
         SET status = 'sent', sent_at = now(), error = NULL,
             message_id = CASE WHEN id = $1 THEN $5 ELSE message_id END
         WHERE status = 'pending' AND chat_id = $2
           AND (id = $1 OR (subject = $3 AND action = $4 AND action <> 'send' AND id <= $6))",
    )
    .bind(row.id)
    .bind(row.chat_id)
    .bind(&row.subject)
    .bind(&row.action)
    .bind(message_id.map(i64::from))
    .bind(covered)
    .execute(pool)
    .await?;
    Ok(())
}

/// Telegram asked to retry after `after`: every pending row of `row`'s chat waits that
/// long, so the chat's order holds. Its attempt is given back (pacing is no failure).
pub async fn slow_down_chat(
    pool: &PgPool,
    row: &Pending,
    after: chrono::Duration,
    error: &str,
) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_notifications
         SET run_after = now() + $2,
             attempts = CASE WHEN id = $3 THEN $4 ELSE attempts END,
             error = CASE WHEN id = $3 THEN $5 ELSE error END
         WHERE status = 'pending' AND chat_id = $1",
    )
    .bind(row.chat_id)
    .bind(after)
    .bind(row.id)
    .bind(row.attempts)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Row `id` failed for now: try again after `delay`.
pub async fn retry_later(
    pool: &PgPool,
    id: i64,
    error: &str,
    delay: chrono::Duration,
) -> OpsResult<()> {
    sqlx::query("UPDATE ops_notifications SET error = $2, run_after = now() + $3 WHERE id = $1")
        .bind(id)
        .bind(error)
        .bind(delay)
        .execute(pool)
        .await?;
    Ok(())
}

/// pending → failed: row `id` is given up.
pub async fn mark_failed(pool: &PgPool, id: i64, error: &str) -> OpsResult<()> {
    sqlx::query("UPDATE ops_notifications SET status = 'failed', error = $2 WHERE id = $1")
        .bind(id)
        .bind(error)
        .execute(pool)
        .await?;
    Ok(())
}

/// The messages showing `row`'s prompt or card in its chat, oldest first.
pub async fn messages_of(pool: &PgPool, row: &Pending) -> OpsResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT message_id FROM ops_notifications
         WHERE chat_id = $1 AND subject = $2 AND action = $3 AND status = 'sent' AND message_id IS NOT NULL
         ORDER BY message_id",
    )
    .bind(row.chat_id)
    .bind(&row.subject)
    .bind(&row.action)
    .fetch_all(pool)
    .await?)
}

/// Message `message_id`, one of `row`'s prompt or card, is gone: it is not edited again.
pub async fn forget_message(pool: &PgPool, row: &Pending, message_id: i32) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_notifications SET message_id = NULL
         WHERE chat_id = $1 AND subject = $2 AND action = $3 AND message_id = $4",
    )
    .bind(row.chat_id)
    .bind(&row.subject)
    .bind(&row.action)
    .bind(i64::from(message_id))
    .execute(pool)
    .await?;
    Ok(())
}

/// Delete up to `limit` rows that are done (sent or failed) and older than `cutoff`,
/// oldest first, except the sent messages of a running mission's card or a pending
/// proposal's prompt (their edits go through them). Returns how many went.
pub async fn delete_done_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> OpsResult<u64> {
    super::delete_older(
        pool,
        "DELETE FROM ops_notifications WHERE id IN (
            SELECT n.id FROM ops_notifications n
            WHERE n.status <> 'pending' AND n.created_at < $1
              AND NOT (n.subject LIKE 'mission:%' AND EXISTS (
                    SELECT 1 FROM ops_missions m WHERE 'mission:' || m.id = n.subject AND m.status = 'running'))
              AND NOT (n.subject LIKE 'question:%' AND EXISTS (
                    SELECT 1 FROM ops_questions q WHERE 'question:' || q.id = n.subject AND q.status = 'open'))
              AND NOT (n.subject LIKE 'proposal:%' AND EXISTS (
                    SELECT 1 FROM ops_mission_proposals p WHERE 'proposal:' || p.id = n.subject AND p.status = 'pending'))
            ORDER BY n.created_at LIMIT $2)",
        cutoff,
        limit,
    )
    .await
}
