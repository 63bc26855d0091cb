//! Owner of `ops_questions`: what a step or an agent asks people while a mission runs.
//!
//! ```text
//! insert ─▶ open ──answer──▶ answered    (the first valid answer; or the default at the timeout)
//!           open ──expire──▶ expired     (the timeout, no default)
//!           open ──cancel_of_mission / cancel_of_attempt / cancel──▶ cancelled
//! closed, outside a mission ──delete_closed_before──▶ gone   (retention)
//! ```
//!
//! Every transition out of `open` is conditional on `status = 'open'`, so the first one
//! wins and the others change nothing, and it wakes the waiters (`db::channels::QUESTIONS`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::db::{channels, interval};
use crate::domain::error::OpsResult;
use crate::domain::vocab::{Audience, QuestionStatus};

/// A question as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Question {
    pub id: i64,
    pub mission_id: Option<i64>,
    pub step_id: Option<i64>,
    #[serde(skip)]
    pub attempt: Option<i32>,
    pub asked_by: String,
    pub question: String,
    /// The allowed answers; None for free text.
    pub choices: Option<Value>,
    pub pattern: Option<String>,
    pub help: Option<String>,
    #[serde(rename = "to")]
    pub audience: Audience,
    #[serde(rename = "default")]
    pub default_answer: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub status: QuestionStatus,
    pub answer: Option<String>,
    pub answered_by: Option<String>,
    pub answered_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "id, mission_id, step_id, attempt, asked_by, question, choices, pattern, help,
     audience, default_answer, expires_at, status, answer, answered_by, answered_at, created_at";

/// A question to store.
#[derive(Debug)]
pub struct Insert<'a> {
    pub mission_id: Option<i64>,
    pub step_id: Option<i64>,
    pub attempt: Option<i32>,
    pub asked_by: &'a str,
    pub question: &'a str,
    pub choices: Option<Value>,
    pub pattern: Option<&'a str>,
    pub help: Option<&'a str>,
    pub audience: Audience,
    pub default_answer: Option<&'a str>,
    pub timeout: Option<std::time::Duration>,
}

/// A new open question; its proposer (for `to = "proposer"`) is the Telegram user who
/// proposed its mission, if one did.
pub async fn insert(conn: &mut PgConnection, q: &Insert<'_>) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO ops_questions (mission_id, step_id, attempt, asked_by, question, choices, pattern, help,
                                    audience, proposer, default_answer, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                 (SELECT CASE WHEN p.proposed_by ~ '^tg:[0-9]{1,19}$' THEN substr(p.proposed_by, 4)::bigint END
                  FROM ops_missions m JOIN ops_mission_proposals p ON p.id = m.proposal_id WHERE m.id = $1),
                 $10, now() + $11)
         RETURNING id",
    )
    .bind(q.mission_id)
    .bind(q.step_id)
    .bind(q.attempt)
    .bind(q.asked_by)
    .bind(q.question)
    .bind(&q.choices)
    .bind(q.pattern)
    .bind(q.help)
    .bind(q.audience)
    .bind(q.default_answer)
    .bind(q.timeout.map(interval))
    .fetch_one(conn)
    .await?)
}

pub async fn get(pool: &PgPool, id: i64) -> OpsResult<Option<Question>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM ops_questions WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// A question locked until the caller's transaction ends (the answer's first read).
pub async fn lock(conn: &mut PgConnection, id: i64) -> OpsResult<Option<Question>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM ops_questions WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Open questions, oldest first.
pub async fn open(pool: &PgPool, limit: i64) -> OpsResult<Vec<Question>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM ops_questions WHERE status = 'open' ORDER BY id LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub async fn count_open(pool: &PgPool) -> OpsResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM ops_questions WHERE status = 'open'")
            .fetch_one(pool)
            .await?,
    )
}

/// open → answered. False when it was no longer open.
pub async fn answer(
    conn: &mut PgConnection,
    id: i64,
    answer: &str,
    answered_by: &str,
) -> OpsResult<bool> {
    let done = sqlx::query(
        "WITH a AS (
            UPDATE ops_questions SET status = 'answered', answer = $2, answered_by = $3, answered_at = now()
            WHERE id = $1 AND status = 'open' RETURNING id)
         SELECT pg_notify($4, id::text) FROM a",
    )
    .bind(id)
    .bind(answer)
    .bind(answered_by)
    .bind(channels::QUESTIONS)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(done > 0)
}

/// open → expired. False when it was no longer open.
pub async fn expire(conn: &mut PgConnection, id: i64) -> OpsResult<bool> {
    close(conn, id, QuestionStatus::Expired).await
}

/// open → cancelled, for one question. False when it was no longer open.
pub async fn cancel(conn: &mut PgConnection, id: i64) -> OpsResult<bool> {
    close(conn, id, QuestionStatus::Cancelled).await
}

/// open → `to` (expired, cancelled), waking the waiters.
async fn close(conn: &mut PgConnection, id: i64, to: QuestionStatus) -> OpsResult<bool> {
    let done = sqlx::query(
        "WITH c AS (
            UPDATE ops_questions SET status = $2, answered_at = now()
            WHERE id = $1 AND status = 'open' RETURNING id)
         SELECT pg_notify($3, id::text) FROM c",
    )
    .bind(id)
    .bind(to)
    .bind(channels::QUESTIONS)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(done > 0)
}

/// open → cancelled, for every open question of a mission. Returns their ids.
pub async fn cancel_of_mission(conn: &mut PgConnection, mission_id: i64) -> OpsResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "WITH c AS (
            UPDATE ops_questions SET status = 'cancelled', answered_at = now()
            WHERE mission_id = $1 AND status = 'open' RETURNING id)
         SELECT id FROM c, LATERAL (SELECT pg_notify($2, c.id::text)) n",
    )
    .bind(mission_id)
    .bind(channels::QUESTIONS)
    .fetch_all(conn)
    .await?)
}

/// The questions past their timeout, oldest first, locked (SKIP LOCKED) until the
/// caller's transaction ends.
pub async fn lock_due(conn: &mut PgConnection, limit: i64) -> OpsResult<Vec<Question>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM ops_questions
         WHERE status = 'open' AND expires_at <= now()
         ORDER BY expires_at, id LIMIT $1 FOR UPDATE SKIP LOCKED"
    ))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// The open questions an attempt of a shell step asked (`opsloop ask`): they end with it.
pub async fn open_of_attempt(
    conn: &mut PgConnection,
    step_id: i64,
    attempt: i32,
) -> OpsResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM ops_questions
         WHERE step_id = $1 AND attempt = $2 AND status = 'open' FOR UPDATE",
    )
    .bind(step_id)
    .bind(attempt)
    .fetch_all(conn)
    .await?)
}

/// The open question of an ask step (at most one).
pub async fn open_of_step(conn: &mut PgConnection, step_id: i64) -> OpsResult<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM ops_questions WHERE step_id = $1 AND attempt IS NULL AND status = 'open'",
    )
    .bind(step_id)
    .fetch_optional(conn)
    .await?)
}

/// Open questions older than `after` not reminded yet: marked reminded now (once each).
pub async fn take_due_reminders(
    conn: &mut PgConnection,
    after: std::time::Duration,
    limit: i64,
) -> OpsResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "UPDATE ops_questions SET reminded_at = now()
         WHERE id IN (SELECT id FROM ops_questions
                      WHERE status = 'open' AND reminded_at IS NULL AND created_at <= now() - $1
                      ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(interval(after))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Delete up to `limit` closed questions asked outside a mission (`POST /api/questions`)
/// that closed before `cutoff`, oldest first. A mission's questions go with it.
pub async fn delete_closed_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> OpsResult<u64> {
    Ok(sqlx::query(
        "DELETE FROM ops_questions WHERE id = ANY(ARRAY(
            SELECT id FROM ops_questions
            WHERE mission_id IS NULL AND status <> 'open' AND answered_at < $1
            ORDER BY id LIMIT $2))",
    )
    .bind(cutoff)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected())
}
