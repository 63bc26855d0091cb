//! Questions put to people while a mission runs (docs/policy.md, "Questions"): from an
//! `ask` step, from `opsloop ask` inside a shell step, or from an agent over HTTP. Each
//! is answered once: the first valid answer wins in one transaction with its event,
//! and an ask step's answer is its output and moves its mission on. The statements
//! are `store::questions`'; this module decides which run when.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;

use crate::db::channels;
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::input;
use crate::domain::policy::anchored_regex as regex_for;
use crate::domain::vocab::{Audience, EventKind, QuestionStatus, Source};
use crate::engine::missions::progress;
use crate::store::events::{self, NewEvent};
pub use crate::store::questions::Question;
use crate::store::questions::{self as store, Insert};
use crate::store::steps;

/// Answers are short: a choice, or a line or a paragraph of text.
pub const MAX_ANSWER: usize = 1000;
/// A question's own text.
pub const MAX_QUESTION: usize = 1000;
/// Who answers a question whose timeout came, with its default.
pub const TIMEOUT_ACTOR: &str = "timeout";

/// A question about to be asked.
#[derive(Debug, Clone, Default)]
pub struct NewQuestion {
    pub mission_id: Option<i64>,
    pub step_id: Option<i64>,
    /// Set for `opsloop ask`: the attempt that asks (its questions end with it).
    pub attempt: Option<i32>,
    pub asked_by: String,
    pub question: String,
    /// Empty: free text (checked against `pattern` when there is one).
    pub choices: Vec<String>,
    pub pattern: Option<String>,
    pub help: Option<String>,
    pub audience: Option<Audience>,
    pub default: Option<String>,
    pub timeout: Option<Duration>,
}

impl NewQuestion {
    /// Refuse what cannot be asked: no text, both choices and a pattern, a pattern that
    /// does not compile, a default that is no valid answer, text PostgreSQL cannot store.
    pub fn validate(&self) -> OpsResult<()> {
        let bad = |m: String| Err(OpsError::bad_input(m));
        let q = self.question.trim();
        if q.is_empty() || self.question.chars().count() > MAX_QUESTION {
            return bad(format!("a question must be 1 to {MAX_QUESTION} characters"));
        }
        input::storable_text(&self.question, "the question")?;
        if !self.choices.is_empty() && self.pattern.is_some() {
            return bad("give choices or a pattern, not both".into());
        }
        if self.choices.len() > 20 {
            return bad("at most 20 choices".into());
        }
        for c in &self.choices {
            if c.trim().is_empty() || c.chars().count() > 64 {
                return bad(format!("a choice must be 1 to 64 characters: {c:?}"));
            }
            input::storable_text(c, "a choice")?;
        }
        if let Some(p) = &self.pattern {
            input::storable_text(p, "the pattern")?;
            regex_for(p).map_err(OpsError::bad_input)?;
        }
        if let Some(h) = &self.help {
            input::storable_text(h, "the help")?;
        }
        if let Some(d) = &self.default {
            self.check_answer(d).map_err(|e| {
                OpsError::bad_input(format!("the default {d:?} is not a valid answer: {e}"))
            })?;
        }
        if self.default.is_some() && self.timeout.is_none() {
            return bad("a default is given at the timeout: set a timeout too".into());
        }
        Ok(())
    }

    fn check_answer(&self, answer: &str) -> Result<(), String> {
        check(&self.choices, self.pattern.as_deref(), answer)
    }
}

/// Whether `answer` is allowed: one of `choices`, or free text matching `pattern`.
/// The error names what is allowed.
fn check(choices: &[String], pattern: Option<&str>, answer: &str) -> Result<(), String> {
    if answer.trim().is_empty() {
        return Err("an answer cannot be empty".into());
    }
    if answer.chars().count() > MAX_ANSWER {
        return Err(format!(
            "an answer is at most {MAX_ANSWER} characters; this one has {}",
            answer.chars().count()
        ));
    }
    if answer.contains('\0') {
        return Err("an answer cannot contain a NUL character".into());
    }
    if !choices.is_empty() {
        if choices.iter().any(|c| c == answer) {
            return Ok(());
        }
        return Err(format!("the answer must be one of: {}", choices.join(", ")));
    }
    if let Some(p) = pattern {
        let re = regex_for(p)?;
        if !re.is_match(answer) {
            return Err(format!("the answer must match {p}"));
        }
    }
    Ok(())
}

impl Question {
    pub fn choice_list(&self) -> Vec<String> {
        self.choices
            .as_ref()
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `answer` is allowed, and if not, what is.
    pub fn check_answer(&self, answer: &str) -> Result<(), String> {
        check(&self.choice_list(), self.pattern.as_deref(), answer)
    }

    /// "answered publish by Ann at …", for refusals of a late answer.
    pub fn outcome(&self) -> String {
        let by = self.answered_by.as_deref().unwrap_or("?");
        match self.status {
            QuestionStatus::Open => format!("question #{} is open", self.id),
            QuestionStatus::Answered => format!(
                "question #{} was already answered by {by}: {}",
                self.id,
                self.answer.as_deref().unwrap_or("")
            ),
            QuestionStatus::Expired => format!("question #{} expired without an answer", self.id),
            QuestionStatus::Cancelled => format!("question #{} was cancelled", self.id),
        }
    }
}

/// Put a question to people, with its `question.asked` event, in the caller's
/// transaction (the outbox trigger sends it to its audience). Returns its id.
pub async fn ask(conn: &mut PgConnection, q: &NewQuestion) -> OpsResult<i64> {
    q.validate()?;
    let choices = (!q.choices.is_empty()).then(|| json!(q.choices));
    let audience = q.audience.unwrap_or(Audience::Approvers);
    let id = store::insert(
        conn,
        &Insert {
            mission_id: q.mission_id,
            step_id: q.step_id,
            attempt: q.attempt,
            asked_by: &q.asked_by,
            question: &q.question,
            choices,
            pattern: q.pattern.as_deref(),
            help: q.help.as_deref(),
            audience,
            default_answer: q.default.as_deref(),
            timeout: q.timeout,
        },
    )
    .await?;
    let mut event = NewEvent::new(EventKind::QuestionAsked, source_of(&q.asked_by)).payload(
        json!({ "question": id, "text": q.question, "choices": q.choices, "to": audience }),
    );
    if let Some(m) = q.mission_id {
        event = event.mission(m);
    }
    if let Some(s) = q.step_id {
        event = event.step(s);
    }
    events::emit(conn, event).await?;
    Ok(id)
}

fn source_of(asked_by: &str) -> Source {
    if asked_by.starts_with("agent:") || asked_by == "http" {
        Source::Http
    } else {
        Source::Worker
    }
}

/// What an accepted answer did.
#[derive(Debug, Clone, Serialize)]
pub struct Answered {
    pub id: i64,
    pub answer: String,
    pub answered_by: String,
    pub mission_id: Option<i64>,
}

/// Answer question `id` with `answer` as `by` (from `source`). The first valid answer
/// wins; a question no longer open is refused (exit 3 / 409) saying how it ended, an
/// answer that is not allowed is bad input (exit 2 / 422) naming what is.
pub async fn answer(
    pool: &PgPool,
    id: i64,
    answer: &str,
    by: &str,
    source: Source,
) -> OpsResult<Answered> {
    let mut tx = pool.begin().await?;
    let q = store::lock(&mut tx, id)
        .await?
        .ok_or_else(|| OpsError::bad_input(format!("there is no question #{id}")))?;
    if q.status != QuestionStatus::Open {
        return Err(OpsError::refused(q.outcome()));
    }
    q.check_answer(answer)
        .map_err(|e| OpsError::bad_input(format!("question #{id}: {e}")))?;
    input::storable_text(by, "the name")?;
    let answered = settle(&mut tx, &q, answer, by, source).await?;
    tx.commit().await?;
    Ok(answered)
}

/// Record `answer` for open question `q` (locked by the caller) and move its ask step on.
async fn settle(
    conn: &mut PgConnection,
    q: &Question,
    answer: &str,
    by: &str,
    source: Source,
) -> OpsResult<Answered> {
    if !store::answer(conn, q.id, answer, by).await? {
        return Err(OpsError::refused(format!(
            "question #{} is no longer open",
            q.id
        )));
    }
    let mut event = NewEvent::new(EventKind::QuestionAnswered, source)
        .payload(json!({ "question": q.id, "answer": answer, "answered_by": by }));
    if let Some(m) = q.mission_id {
        event = event.mission(m);
    }
    if let Some(s) = q.step_id {
        event = event.step(s);
    }
    events::emit(conn, event).await?;
    // An ask step's answer is its output; its mission goes on (a paused loop claims the
    // next step on resume).
    if let (Some(step), None) = (q.step_id, q.attempt) {
        let output = json!({ "answer": answer, "answered_by": by });
        if let Some(done) = steps::answer_asking(conn, step, &output).await? {
            match done.next_id {
                Some(next) => steps::queue_next(conn, &[next]).await?,
                None => {
                    progress::finalize(conn, &[done.mission_id]).await?;
                }
            }
        }
    }
    Ok(Answered {
        id: q.id,
        answer: answer.to_string(),
        answered_by: by.to_string(),
        mission_id: q.mission_id,
    })
}

/// The heartbeat's phase: questions past their timeout are answered by their default
/// (`answered_by = "timeout"`), or expire; an ask step whose question expired fails for
/// good. Returns how many were settled.
pub async fn settle_due(conn: &mut PgConnection, pause_after_failures: u32) -> OpsResult<u64> {
    let due = store::lock_due(conn, 100).await?;
    let mut n = 0;
    for q in &due {
        match &q.default_answer {
            Some(d) => {
                settle(conn, q, d, TIMEOUT_ACTOR, Source::Heartbeat).await?;
            }
            None => expire(conn, q, pause_after_failures).await?,
        }
        n += 1;
    }
    Ok(n)
}

/// open → expired, with its event; an ask step's mission fails.
async fn expire(conn: &mut PgConnection, q: &Question, pause_after_failures: u32) -> OpsResult<()> {
    if !store::expire(conn, q.id).await? {
        return Ok(());
    }
    let mut event = NewEvent::new(EventKind::QuestionExpired, Source::Heartbeat)
        .payload(json!({ "question": q.id }));
    if let Some(m) = q.mission_id {
        event = event.mission(m);
    }
    if let Some(s) = q.step_id {
        event = event.step(s);
    }
    events::emit(conn, event).await?;
    if let (Some(step), None) = (q.step_id, q.attempt) {
        let error = format!("question #{} expired without an answer", q.id);
        if let Some((mission, name, attempts)) = steps::fail_asking(conn, step, &error).await? {
            progress::fail_for_good(
                conn,
                step,
                mission,
                &name,
                attempts,
                &error,
                pause_after_failures,
            )
            .await?;
        }
    }
    Ok(())
}

/// Expire one question now (the `opsloop ask` deadline, seen by the worker before the
/// heartbeat's next tick), if it is still open and past its timeout.
pub async fn expire_if_due(pool: &PgPool, id: i64, pause_after_failures: u32) -> OpsResult<()> {
    let mut tx = pool.begin().await?;
    if let Some(q) = store::lock(&mut tx, id).await?
        && q.status == QuestionStatus::Open
        && q.expires_at.is_some_and(|e| e <= chrono::Utc::now())
    {
        match &q.default_answer {
            Some(d) => {
                settle(&mut tx, &q, d, TIMEOUT_ACTOR, Source::Heartbeat).await?;
            }
            None => expire(&mut tx, &q, pause_after_failures).await?,
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Cancel a mission's open questions (in its cancel's transaction), each with its event.
pub async fn cancel_of_mission(
    conn: &mut PgConnection,
    mission_id: i64,
    source: Source,
) -> OpsResult<u64> {
    let ids = store::cancel_of_mission(conn, mission_id).await?;
    for id in &ids {
        cancelled(
            conn,
            *id,
            Some(mission_id),
            None,
            source,
            "the mission was cancelled",
        )
        .await?;
    }
    Ok(ids.len() as u64)
}

/// Cancel the open questions an attempt asked (`opsloop ask`): the attempt ended.
pub async fn cancel_of_attempt(
    pool: &PgPool,
    mission_id: i64,
    step_id: i64,
    attempt: i32,
) -> OpsResult<u64> {
    let mut tx = pool.begin().await?;
    let n = cancel_of_attempt_in(&mut tx, mission_id, step_id, attempt).await?;
    tx.commit().await?;
    Ok(n)
}

/// `cancel_of_attempt` in the caller's transaction (the heartbeat's lease recovery).
pub async fn cancel_of_attempt_in(
    conn: &mut PgConnection,
    mission_id: i64,
    step_id: i64,
    attempt: i32,
) -> OpsResult<u64> {
    let ids = store::open_of_attempt(conn, step_id, attempt).await?;
    let mut n = 0;
    for id in &ids {
        if store::cancel(conn, *id).await? {
            let why = "the step that asked it stopped";
            cancelled(
                conn,
                *id,
                Some(mission_id),
                Some(step_id),
                Source::Worker,
                why,
            )
            .await?;
            n += 1;
        }
    }
    Ok(n)
}

async fn cancelled(
    conn: &mut PgConnection,
    id: i64,
    mission: Option<i64>,
    step: Option<i64>,
    source: Source,
    why: &str,
) -> OpsResult<()> {
    let mut event = NewEvent::new(EventKind::QuestionCancelled, source)
        .payload(json!({ "question": id, "reason": why }));
    if let Some(m) = mission {
        event = event.mission(m);
    }
    if let Some(s) = step {
        event = event.step(s);
    }
    events::emit(conn, event).await?;
    Ok(())
}

pub async fn get(pool: &PgPool, id: i64) -> OpsResult<Question> {
    store::get(pool, id)
        .await?
        .ok_or_else(|| OpsError::bad_input(format!("there is no question #{id}")))
}

/// Open questions, oldest first.
pub async fn open(pool: &PgPool) -> OpsResult<Vec<Question>> {
    store::open(pool, 500).await
}

pub async fn count_open(pool: &PgPool) -> OpsResult<i64> {
    store::count_open(pool).await
}

/// Wakes everyone waiting for a question to close in this process: one LISTEN
/// connection for all of them, with a poll as the fallback.
#[derive(Clone)]
pub struct Waiters {
    notify: Arc<Notify>,
}

/// A waiter looks again this often even without a notification.
const POLL: Duration = Duration::from_millis(1000);

impl Waiters {
    /// Start listening on `pool` (reconnecting as needed) until the process ends.
    pub fn start(pool: &PgPool) -> Waiters {
        let notify = Arc::new(Notify::new());
        let (pool, wake) = (pool.clone(), notify.clone());
        tokio::spawn(async move {
            loop {
                match sqlx::postgres::PgListener::connect_with(&pool).await {
                    Ok(mut listener) => {
                        if listener.listen(channels::QUESTIONS).await.is_ok() {
                            while let Ok(Some(_)) = listener.try_recv().await {
                                wake.notify_waiters();
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot listen for answers; polling"),
                }
                wake.notify_waiters();
                tokio::time::sleep(POLL).await;
            }
        });
        Waiters { notify }
    }

    /// The question once it is no longer open, or as it is when `timeout` has passed.
    pub async fn wait(&self, pool: &PgPool, id: i64, timeout: Duration) -> OpsResult<Question> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let woken = self.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let q = get(pool, id).await?;
            if q.status != QuestionStatus::Open || tokio::time::Instant::now() >= deadline {
                return Ok(q);
            }
            let poll = (tokio::time::Instant::now() + POLL).min(deadline);
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(poll) => {}
            }
        }
    }
}
