//! Owner of `ops_mission_steps`: every statement that changes a step, one per transition.
//! Long because a step has many transitions and the owner rule keeps them all here.
//!
//! ```text
//! create ─▶ queued (the first step) / waiting (the rest)
//! waiting ──queue_next──▶ queued ──claim_ready──▶ running   (renew_leases keeps it ours)
//! running ──store_endings──▶ succeeded | cancelled | failed | queued (a retry, after its backoff)
//! running ──recover_expired──▶ queued | failed | cancelled   (the lease ran out: the heartbeat)
//! running ──release──▶ queued | cancelled   (given back at shutdown or held too long; the
//!                                           attempt does not count)
//! running ──store_endings──▶ skipped (its `when` did not hold) | asking (an ask step)
//! asking ──answer_asking──▶ succeeded | ──fail_asking──▶ failed   (its question expired)
//! waiting, queued, asking ──cancel_remaining──▶ cancelled   (the mission failed or was cancelled)
//! failed, cancelled ──requeue_from──▶ queued, and the steps after it ▶ waiting   (a retry)
//! running: record_progress keeps the latest `::progress` line (fenced like the rest)
//! ```
//!
//! Every change of a running step is fenced on (id, lease owner, attempt), so a worker
//! presumed dead can never overwrite the attempt that replaced it.

use std::time::Duration;

use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::db::{channels, interval};
use crate::domain::error::OpsResult;
use crate::domain::vocab::{EventKind, MissionStatus, Source, StepStatus};
use crate::store::events::insert_events;
use crate::store::runs::insert_runs;

/// Insert a mission's steps in order: the first `queued`, the rest `waiting`, each at
/// its mission's priority. The insert trigger wakes the workers. The slices are the
/// steps' columns, in order.
pub async fn create(
    conn: &mut PgConnection,
    mission_id: i64,
    names: &[&str],
    kinds: &[&str],
    specs: &[Value],
    max_attempts: &[i32],
    conditions: &[Option<Value>],
) -> OpsResult<()> {
    sqlx::query(
        "INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, max_attempts, condition, status, priority)
         SELECT $1, s.seq, s.name, s.kind, s.spec, s.max_attempts, s.condition,
                CASE WHEN s.seq = 1 THEN 'queued' ELSE 'waiting' END,
                (SELECT m.priority FROM ops_missions m WHERE m.id = $1)
         FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::int[], $6::jsonb[])
              WITH ORDINALITY AS s(name, kind, spec, max_attempts, condition, seq)",
    )
    .bind(mission_id)
    .bind(names)
    .bind(kinds)
    .bind(specs)
    .bind(max_attempts)
    .bind(conditions)
    .execute(conn)
    .await?;
    Ok(())
}

/// A step this worker now holds under a lease.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: i64,
    pub mission_id: i64,
    pub name: String,
    pub spec: Value,
    pub attempts: i32,
    /// Its mission's params, for a shell step (they become its environment); no other
    /// kind reads them at run time (references to params were filled in at creation).
    pub params: Option<Value>,
    /// Its `when`, if it has one.
    pub condition: Option<Value>,
    /// The outputs of the mission's earlier succeeded steps by name, when the step
    /// refers to them (a reference or a condition); else None.
    pub outputs: Option<Value>,
}

/// Claim up to `limit` ready steps (highest priority first, then those ready longest,
/// then by id; the ready index is in that order, so no sort) unless paused, starting a new
/// attempt of each and writing their `step.started` events, in one statement. A step
/// whose mission is no longer running (cancelled, failed) is never claimed.
pub async fn claim_ready(
    pool: &PgPool,
    owner: &str,
    limit: i64,
    lease: Duration,
) -> OpsResult<Vec<Claimed>> {
    Ok(sqlx::query_as(concat!(
        "WITH ready AS (
            SELECT id FROM ops_mission_steps
            WHERE status = 'queued' AND run_after <= now()
              -- A boolean subquery, not `(SELECT m.status ..) = 'running'`: the planner
              -- guesses that comparison passes 0.5% of rows, and on a big queue then
              -- sorts the whole queue rather than walk the index and stop at the limit.
              AND (SELECT m.status = 'running' FROM ops_missions m WHERE m.id = ops_mission_steps.mission_id)
              AND NOT (SELECT paused FROM ops_paused())
            ORDER BY priority DESC, run_after, id
            LIMIT $2
            FOR UPDATE SKIP LOCKED
         ), claimed AS (
            UPDATE ops_mission_steps s
            SET status = 'running', attempts = s.attempts + 1, lease_owner = $1,
                lease_expires_at = now() + $3, started_at = now(), finished_at = NULL
            -- = ANY(ARRAY(..)): look the rows up by key; a join here seq-scans the table.
            WHERE s.id = ANY(ARRAY(SELECT id FROM ready))
            RETURNING s.id, s.mission_id, s.seq, s.name, s.kind, s.spec, s.attempts, s.condition, s.priority
         ), started AS (",
        insert_events!(
            kinds: ["$4"],
            rows: "SELECT $4::text, $5::text, NULL::bigint, c.mission_id, c.id,
                    jsonb_build_object('name', c.name, 'attempt', c.attempts, 'worker', $1::text)
             FROM claimed c",
        ),
        ")
         SELECT c.id, c.mission_id, c.name, c.spec, c.attempts, c.condition,
                CASE WHEN c.kind = 'shell' THEN
                    (SELECT p.params FROM ops_missions m JOIN ops_mission_proposals p ON p.id = m.proposal_id
                     WHERE m.id = c.mission_id) END AS params,
                -- earlier outputs, read only for a step that uses them
                CASE WHEN c.condition IS NOT NULL OR strpos(c.spec::text, '{steps.') > 0 THEN
                    (SELECT coalesce(jsonb_object_agg(p.name, p.output), '{}'::jsonb)
                     FROM ops_mission_steps p
                     WHERE p.mission_id = c.mission_id AND p.seq < c.seq
                       AND p.status = 'succeeded' AND p.output IS NOT NULL) END AS outputs
         FROM claimed c
         -- the worker starts them in this order (prefetched steps wait for a slot)
         ORDER BY c.priority DESC, c.id"
    ))
    .bind(owner)
    .bind(limit)
    .bind(interval(lease))
    .bind(EventKind::StepStarted.as_str())
    .bind(Source::Worker.as_str())
    .fetch_all(pool)
    .await?)
}

/// Extend the leases this worker holds. Returns the steps it still holds and whether
/// their mission was cancelled meanwhile; a step missing from the answer was lost.
pub async fn renew_leases(
    pool: &PgPool,
    owner: &str,
    held: &[(i64, i32)],
    lease: Duration,
) -> OpsResult<Vec<(i64, bool)>> {
    let ids: Vec<i64> = held.iter().map(|s| s.0).collect();
    let attempts: Vec<i32> = held.iter().map(|s| s.1).collect();
    Ok(sqlx::query_as(
        "UPDATE ops_mission_steps s SET lease_expires_at = now() + $4
         FROM unnest($2::bigint[], $3::int[]) AS held(id, attempt)
         WHERE s.id = ANY($2) AND s.id = held.id AND s.attempts = held.attempt
           AND s.lease_owner = $1 AND s.status = 'running'
         RETURNING s.id, (SELECT m.status = 'cancelled' FROM ops_missions m WHERE m.id = s.mission_id)",
    )
    .bind(owner)
    .bind(&ids)
    .bind(&attempts)
    .bind(interval(lease))
    .fetch_all(pool)
    .await?)
}

/// Give a step back to the queue (and wake the workers), at shutdown or when it was held
/// too long without starting: the attempt does not count. If its mission is no longer
/// running, it ends cancelled instead, as the mission's other unstarted steps did (its
/// mission is locked `FOR KEY SHARE`, so a cancel in progress is waited for and seen).
/// False when the lease was no longer held.
pub async fn release(pool: &PgPool, owner: &str, step_id: i64, attempt: i32) -> OpsResult<bool> {
    let released = sqlx::query(
        "WITH m AS MATERIALIZED (
            SELECT m.status = 'running' AS running FROM ops_missions m
            WHERE m.id = (SELECT mission_id FROM ops_mission_steps WHERE id = $1)
            FOR KEY SHARE
         ), r AS (
            UPDATE ops_mission_steps
            SET status = CASE WHEN (SELECT running FROM m) THEN 'queued' ELSE 'cancelled' END,
                finished_at = CASE WHEN (SELECT running FROM m) THEN NULL ELSE now() END,
                attempts = greatest(attempts - 1, 0), run_after = now(),
                lease_owner = NULL, lease_expires_at = NULL, started_at = NULL
            WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND status = 'running'
            RETURNING id)
         SELECT pg_notify($4, '') FROM r",
    )
    .bind(step_id)
    .bind(owner)
    .bind(attempt)
    .bind(channels::STEPS_READY)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(released > 0)
}

/// How one attempt ended, to be stored under its lease.
#[derive(Debug)]
pub struct EndingRow<'a> {
    pub step_id: i64,
    pub owner: &'a str,
    pub attempt: i32,
    /// `Succeeded`, `Skipped` (its condition did not hold), `Asking` (an ask step's
    /// question is out), `Cancelled` or `Failed` (then queued again while attempts are
    /// left, unless `permanent`).
    pub outcome: StepStatus,
    pub result: &'a Value,
    pub output: Option<&'a Value>,
    pub error: Option<&'a str>,
    pub retry_in: Duration,
    /// A failure no retry can mend (a reference with no value): fails for good now.
    pub permanent: bool,
}

/// A stored attempt, as the fenced update returned it.
#[derive(Debug, sqlx::FromRow)]
pub struct Stored {
    pub id: i64,
    pub mission_id: i64,
    pub name: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub outcome: StepStatus,
    pub permanent: bool,
    /// After a success or a skip: the mission's next step (none: it was the last).
    pub next_id: Option<i64>,
}

impl Stored {
    /// A failure with no attempt left (or none that could help): failed for good.
    pub fn out_of_attempts(&self) -> bool {
        self.outcome == StepStatus::Failed && (self.permanent || self.attempts >= self.max_attempts)
    }

    /// The step is done and the mission goes on to its next step.
    pub fn moves_on(&self) -> bool {
        matches!(self.outcome, StepStatus::Succeeded | StepStatus::Skipped)
    }
}

/// Store attempts' endings where their lease still holds (fenced on id, owner and
/// attempt), with their `ops_action_runs` rows and their `step.succeeded` /
/// `step.retrying` events, in one statement (the worker's hot path). A failure with
/// attempts left goes back to the queue, due after its backoff. Endings whose lease was
/// lost are missing from the answer.
pub async fn store_endings(
    conn: &mut PgConnection,
    rows: &[EndingRow<'_>],
) -> OpsResult<Vec<Stored>> {
    let ids: Vec<i64> = rows.iter().map(|r| r.step_id).collect();
    let owners: Vec<&str> = rows.iter().map(|r| r.owner).collect();
    let attempts: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
    let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome.as_str()).collect();
    let results: Vec<&Value> = rows.iter().map(|r| r.result).collect();
    let outputs: Vec<Option<&Value>> = rows.iter().map(|r| r.output).collect();
    let errors: Vec<Option<&str>> = rows.iter().map(|r| r.error).collect();
    let retry_ms: Vec<i64> = rows
        .iter()
        .map(|r| i64::try_from(r.retry_in.as_millis()).unwrap_or(i64::MAX))
        .collect();
    let permanent: Vec<bool> = rows.iter().map(|r| r.permanent).collect();
    Ok(sqlx::query_as(concat!(
        "WITH input AS (
            SELECT i.*, i.outcome = 'failed' AND NOT i.permanent AS may_retry
            FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::jsonb[], $6::text[], $7::bigint[],
                        $11::jsonb[], $12::bool[])
              AS i(id, owner, attempt, outcome, result, error, retry_ms, output, permanent)
         ), stored AS (
            UPDATE ops_mission_steps s SET
                status = CASE WHEN i.may_retry AND s.attempts < s.max_attempts THEN 'queued' ELSE i.outcome END,
                run_after = CASE WHEN i.may_retry AND s.attempts < s.max_attempts
                                 THEN now() + i.retry_ms * interval '1 millisecond' ELSE s.run_after END,
                finished_at = CASE WHEN (i.may_retry AND s.attempts < s.max_attempts) OR i.outcome = 'asking'
                                   THEN NULL ELSE now() END,
                -- a skipped step never ran: its claim was no attempt
                attempts = CASE WHEN i.outcome = 'skipped' THEN greatest(s.attempts - 1, 0) ELSE s.attempts END,
                result = i.result, output = i.output, error = i.error, lease_owner = NULL, lease_expires_at = NULL
            FROM input i
            -- s.id = ANY($1) offers the planner the key; with lagging statistics it may
            -- still walk the lease index, whose rows are only the running steps.
            WHERE s.id = ANY($1) AND s.id = i.id AND s.lease_owner = i.owner AND s.attempts = i.attempt AND s.status = 'running'
            RETURNING s.id, s.mission_id, s.seq, s.name, s.attempts, s.max_attempts, s.started_at,
                      i.outcome, i.error, i.retry_ms, i.owner, i.permanent,
                      i.may_retry AND s.attempts < s.max_attempts AS retrying,
                      -- a correlated probe by key (mission, seq), only when the mission moves on
                      CASE WHEN i.outcome IN ('succeeded', 'skipped') THEN
                          (SELECT n.id FROM ops_mission_steps n
                           WHERE n.mission_id = s.mission_id AND n.seq = s.seq + 1) END AS next_id
         ), runs AS (",
        insert_runs!(
            "SELECT 'step', id, attempts, owner, outcome, jsonb_build_object('error', error),
                    coalesce(started_at, now()), now()
             FROM stored WHERE outcome NOT IN ('skipped', 'asking')"
        ),
        "), events AS (",
        insert_events!(
            kinds: ["$8", "$9", "$13"],
            rows: "SELECT CASE outcome WHEN 'succeeded' THEN $8::text WHEN 'skipped' THEN $13::text ELSE $9::text END,
                    $10::text, NULL::bigint, mission_id, id,
                    CASE WHEN outcome IN ('succeeded', 'skipped') THEN jsonb_build_object('name', name, 'attempt', attempts)
                         ELSE jsonb_build_object('name', name, 'attempt', attempts, 'max_attempts', max_attempts,
                                                 'error', error, 'retry_in_ms', retry_ms) END
             FROM stored
             WHERE outcome IN ('succeeded', 'skipped') OR retrying
             ORDER BY id",
        ),
        ")
         SELECT id, mission_id, name, attempts, max_attempts, outcome, permanent, next_id FROM stored"
    ))
    .bind(&ids)
    .bind(&owners)
    .bind(&attempts)
    .bind(&outcomes)
    .bind(&results)
    .bind(&errors)
    .bind(&retry_ms)
    .bind(EventKind::StepSucceeded.as_str())
    .bind(EventKind::StepRetrying.as_str())
    .bind(Source::Worker.as_str())
    .bind(&outputs)
    .bind(&permanent)
    .bind(EventKind::StepSkipped.as_str())
    .fetch_all(conn)
    .await?)
}

/// Queue these waiting steps (the next of their missions) and wake the workers.
pub async fn queue_next(conn: &mut PgConnection, step_ids: &[i64]) -> OpsResult<()> {
    sqlx::query(
        "WITH next AS (
            UPDATE ops_mission_steps SET status = 'queued', run_after = now()
            WHERE id = ANY($1) AND status = 'waiting'
            RETURNING 1)
         SELECT pg_notify($2, '') FROM (SELECT 1 FROM next LIMIT 1) one",
    )
    .bind(step_ids)
    .bind(channels::STEPS_READY)
    .execute(conn)
    .await?;
    Ok(())
}

/// Cancel a mission's steps that have not started (waiting, queued) or wait for an
/// answer (asking).
pub async fn cancel_remaining(conn: &mut PgConnection, mission_id: i64) -> OpsResult<u64> {
    Ok(sqlx::query(
        "UPDATE ops_mission_steps SET status = 'cancelled', finished_at = now()
         WHERE mission_id = $1 AND status IN ('waiting', 'queued', 'asking')",
    )
    .bind(mission_id)
    .execute(conn)
    .await?
    .rows_affected())
}

/// The step that stopped a mission: its first that neither succeeded nor was skipped.
#[derive(Debug, sqlx::FromRow)]
pub struct Stopping {
    pub id: i64,
    pub seq: i32,
    pub name: String,
    pub status: StepStatus,
    pub attempts: i32,
}

/// The step that stopped mission `mission_id` (None: every step succeeded or was
/// skipped), its row locked until the caller's transaction ends.
pub async fn stopping(conn: &mut PgConnection, mission_id: i64) -> OpsResult<Option<Stopping>> {
    Ok(sqlx::query_as(
        "SELECT id, seq, name, status, attempts FROM ops_mission_steps
         WHERE mission_id = $1 AND status NOT IN ('succeeded', 'skipped')
         ORDER BY seq LIMIT 1 FOR UPDATE",
    )
    .bind(mission_id)
    .fetch_optional(conn)
    .await?)
}

/// A retry: the mission's step `seq` is queued again with a fresh allowance of attempts
/// (its plan's `max_attempts` on top of those made: attempt numbers go on counting) and
/// the steps after it wait again; earlier steps are left as they are. The caller holds
/// the mission's lock and wakes the workers.
pub async fn requeue_from(conn: &mut PgConnection, mission_id: i64, seq: i32) -> OpsResult<u64> {
    Ok(sqlx::query(
        "UPDATE ops_mission_steps s SET
            status = CASE WHEN s.seq = $2 THEN 'queued' ELSE 'waiting' END,
            max_attempts = s.attempts + coalesce(
                (SELECT (p.plan->(s.seq - 1)->>'max_attempts')::int
                 FROM ops_missions m JOIN ops_mission_proposals p ON p.id = m.proposal_id
                 WHERE m.id = s.mission_id),
                s.max_attempts),
            run_after = now(), error = NULL, result = NULL, output = NULL, progress = NULL, lease_owner = NULL,
            lease_expires_at = NULL, started_at = NULL, finished_at = NULL
         WHERE s.mission_id = $1 AND s.seq >= $2",
    )
    .bind(mission_id)
    .bind(seq)
    .execute(conn)
    .await?
    .rows_affected())
}

/// The tail of a step's stored stderr (its last attempt's), at most `max` characters.
pub async fn stderr_tail(
    conn: &mut PgConnection,
    step_id: i64,
    max: i32,
) -> OpsResult<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT nullif(right(result->>'stderr', $2), '') FROM ops_mission_steps WHERE id = $1",
    )
    .bind(step_id)
    .bind(max)
    .fetch_optional(conn)
    .await?
    .flatten())
}

/// A running step whose lease ran out, with its mission's status.
#[derive(Debug, sqlx::FromRow)]
pub struct Expired {
    pub id: i64,
    pub mission_id: i64,
    pub name: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub lease_owner: Option<String>,
    pub mission_status: MissionStatus,
}

/// Up to `limit` steps whose lease ran out, oldest first, locked until the caller's
/// transaction ends (SKIP LOCKED) with their missions `FOR KEY SHARE`: a cancel in
/// progress is waited for and seen, so a cancelled mission's step is never queued again.
pub async fn lock_expired(conn: &mut PgConnection, limit: i64) -> OpsResult<Vec<Expired>> {
    Ok(sqlx::query_as(
        "SELECT s.id, s.mission_id, s.name, s.attempts, s.max_attempts, s.lease_owner, m.status AS mission_status
         FROM ops_mission_steps s JOIN ops_missions m ON m.id = s.mission_id
         WHERE s.status = 'running' AND s.lease_expires_at < now()
         ORDER BY s.lease_expires_at LIMIT $1
         FOR UPDATE OF s SKIP LOCKED FOR KEY SHARE OF m",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// End an expired lease (a step `lock_expired` returned): `next` is `Queued` (run
/// again now), `Failed` or `Cancelled`, with `error` saying why.
pub async fn recover_expired(
    conn: &mut PgConnection,
    step_id: i64,
    next: StepStatus,
    error: &str,
) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_mission_steps SET status = $2, error = $3, lease_owner = NULL, lease_expires_at = NULL,
                run_after = now(), finished_at = CASE WHEN $2 = 'queued' THEN NULL ELSE now() END
         WHERE id = $1",
    )
    .bind(step_id)
    .bind(next)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// asking → succeeded: an ask step's question was answered; `output` is the answer.
/// Returns the step's mission and its next step, or None when it was not asking (a
/// cancel came first).
pub async fn answer_asking(
    conn: &mut PgConnection,
    step_id: i64,
    output: &Value,
) -> OpsResult<Option<AnsweredStep>> {
    Ok(sqlx::query_as(concat!(
        "WITH answered AS (
            UPDATE ops_mission_steps s SET status = 'succeeded', output = $2, finished_at = now()
            WHERE s.id = $1 AND s.status = 'asking'
            RETURNING s.id, s.mission_id, s.seq, s.name, s.attempts,
                (SELECT n.id FROM ops_mission_steps n WHERE n.mission_id = s.mission_id AND n.seq = s.seq + 1) AS next_id
         ), events AS (",
        insert_events!(
            kinds: ["$3"],
            rows: "SELECT $3::text, $4::text, NULL::bigint, mission_id, id,
                    jsonb_build_object('name', name, 'attempt', attempts) FROM answered",
        ),
        ")
         SELECT id, mission_id, name, attempts, next_id FROM answered"
    ))
    .bind(step_id)
    .bind(output)
    .bind(EventKind::StepSucceeded.as_str())
    .bind(Source::Worker.as_str())
    .fetch_optional(conn)
    .await?)
}

/// An ask step whose question was answered.
#[derive(Debug, sqlx::FromRow)]
pub struct AnsweredStep {
    pub id: i64,
    pub mission_id: i64,
    pub name: String,
    pub attempts: i32,
    pub next_id: Option<i64>,
}

/// asking → failed: the question expired with no default. Returns the step's mission,
/// name and attempts when it was asking.
pub async fn fail_asking(
    conn: &mut PgConnection,
    step_id: i64,
    error: &str,
) -> OpsResult<Option<(i64, String, i32)>> {
    Ok(sqlx::query_as(
        "UPDATE ops_mission_steps SET status = 'failed', error = $2, finished_at = now()
         WHERE id = $1 AND status = 'asking'
         RETURNING mission_id, name, attempts",
    )
    .bind(step_id)
    .bind(error)
    .fetch_optional(conn)
    .await?)
}

/// Keep a running step's latest `::progress` line, with its `step.progress` event,
/// while `owner` holds that attempt's lease. False when it no longer does.
pub async fn record_progress(
    pool: &PgPool,
    step_id: i64,
    owner: &str,
    attempt: i32,
    progress: &Value,
) -> OpsResult<bool> {
    let recorded: Option<i64> = sqlx::query_scalar(concat!(
        "WITH recorded AS (
            UPDATE ops_mission_steps SET progress = $4
            WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND status = 'running'
            RETURNING id, mission_id, name, attempts
         ), events AS (",
        insert_events!(
            kinds: ["$5"],
            rows: "SELECT $5::text, $6::text, NULL::bigint, mission_id, id,
                    jsonb_build_object('name', name, 'attempt', attempts) || $4 FROM recorded",
        ),
        ")
         SELECT id FROM recorded"
    ))
    .bind(step_id)
    .bind(owner)
    .bind(attempt)
    .bind(progress)
    .bind(EventKind::StepProgress.as_str())
    .bind(Source::Worker.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(recorded.is_some())
}

/// Whether `owner` still runs this attempt of the step; the row is held `FOR KEY SHARE`
/// until the caller's transaction ends.
pub async fn lock_running(
    conn: &mut PgConnection,
    step_id: i64,
    owner: &str,
    attempt: i32,
) -> OpsResult<bool> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM ops_mission_steps
         WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND status = 'running'
         FOR KEY SHARE",
    )
    .bind(step_id)
    .bind(owner)
    .bind(attempt)
    .fetch_optional(conn)
    .await?;
    Ok(held.is_some())
}

/// Wake the workers (delivered on commit): steps became ready.
pub async fn wake_workers(conn: &mut PgConnection) -> OpsResult<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channels::STEPS_READY)
        .execute(conn)
        .await?;
    Ok(())
}
