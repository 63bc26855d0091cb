//! One claimed step's run: its condition and references resolved against earlier
//! outputs (or it is skipped, fails at once, or asks), then its execution in a slot,
//! with `opsloop ask` granted to a shell step and its `::progress` lines written down
//! at a bounded pace.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Done;
use super::asks::AskServer;
use super::pace::HELD_LIMIT;
use crate::domain::outputs::{Condition, Outputs, Progress};
use crate::domain::steps::StepSpec;
use crate::engine::executors::{self, Executors, Outcome, StepContext};
use crate::engine::missions::progress::Ending;
use crate::engine::questions::NewQuestion;
use crate::engine::telemetry;
use crate::store::steps::{self, Claimed};

/// What a running step may use to talk back: progress lines, `opsloop ask`.
pub(super) struct Talk {
    pub pool: PgPool,
    pub owner: String,
    pub asks: Option<AskServer>,
}

/// A claimed step made ready to run: its condition checked, its references resolved.
/// An ending instead when it will not run: skipped, failed at once, or asking.
pub(super) fn prepare(step: &Claimed) -> Result<StepSpec, Ending> {
    // Read from the claimed values in place (`&Value` is a deserializer), not copies.
    let spec = StepSpec::deserialize(&step.spec).map_err(|e| Ending::FailedForGood {
        error: format!("unreadable step spec: {e}"),
    })?;
    let outputs: Outputs = match &step.outputs {
        Some(v) => Outputs::deserialize(v).unwrap_or_default(),
        None => Outputs::new(),
    };
    if let Some(condition) = &step.condition {
        let condition: Condition =
            Condition::deserialize(condition).map_err(|e| Ending::FailedForGood {
                error: format!("unreadable condition: {e}"),
            })?;
        if !condition.holds(&outputs) {
            return Err(Ending::Skipped);
        }
    }
    // Only a spec with references was kept escaped at creation (see `StepSpec::substitute`).
    let spec = if step.outputs.is_some() && !spec.references().is_empty() {
        spec.resolve(&outputs)
            .map_err(|error| Ending::FailedForGood { error })?
    } else {
        spec
    };
    if let StepSpec::Ask {
        question,
        choices,
        pattern,
        help,
        timeout_ms,
        default,
        to,
    } = spec
    {
        return Err(Ending::Asking {
            question: Box::new(NewQuestion {
                mission_id: Some(step.mission_id),
                step_id: Some(step.id),
                attempt: None,
                asked_by: format!("step:{}", step.id),
                question,
                choices,
                pattern,
                help,
                audience: Some(to),
                default,
                timeout: timeout_ms.map(Duration::from_millis),
            }),
        });
    }
    Ok(spec)
}

/// `step.progress` events are written at most this often per step (the last always).
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Write a running step's latest progress line down, at most once per
/// `PROGRESS_EVERY`, and the last one when `done` fires.
pub(super) async fn record_progress(
    talk: &Talk,
    step_id: i64,
    attempt: i32,
    mut latest: watch::Receiver<Option<Progress>>,
    done: CancellationToken,
) {
    let mut written: Option<Progress> = None;
    let mut last: Option<Instant> = None;
    loop {
        if !done.is_cancelled() {
            tokio::select! {
                changed = latest.changed() => if changed.is_err() { done.cancel(); },
                _ = done.cancelled() => {}
            }
        }
        if let Some(at) = last
            && !done.is_cancelled()
        {
            tokio::select! {
                _ = tokio::time::sleep_until(at + PROGRESS_EVERY) => {}
                _ = done.cancelled() => {}
            }
        }
        let current = latest.borrow_and_update().clone();
        if let Some(p) = current.as_ref()
            && current != written
        {
            let value = json!({ "percent": p.percent, "text": p.text, "at": chrono::Utc::now() });
            match steps::record_progress(&talk.pool, step_id, &talk.owner, attempt, &value).await {
                Ok(_) => {}
                Err(e) => warn!(error = %e, step_id, "cannot record progress"),
            }
            written = current;
            last = Some(Instant::now());
        }
        // At the end, the latest line is written down before this returns (it may have
        // come while the write above was on its way).
        if done.is_cancelled() && *latest.borrow() == written {
            return;
        }
    }
}

/// Run one claimed step to its end, once an execution slot is free.
pub(super) async fn execute(
    executors: Executors,
    slots: Arc<Semaphore>,
    step: Claimed,
    cancel: CancellationToken,
    backoff: (Duration, Duration),
    talk: Talk,
) -> Done {
    let started = Instant::now();
    let spec = match prepare(&step) {
        Ok(spec) => spec,
        // Skipped, asking or refused: nothing runs, no slot is taken.
        Err(ending) => {
            return Done::new(step.id, ending, started.elapsed());
        }
    };
    // A prefetched step waits for a slot; a cancel (or shutdown) meanwhile ends the wait,
    // and so does waiting too long: then it never ran, and goes back to the queue.
    let _slot = tokio::select! {
        slot = slots.acquire_owned() => slot.ok(),
        _ = cancel.cancelled() => None,
        () = tokio::time::sleep(HELD_LIMIT) => return Done::given_back(step.id, started.elapsed()),
    };
    let started = Instant::now();
    let shell = matches!(spec, StepSpec::Shell { .. });
    let (ask, _ticket) = match (&talk.asks, shell) {
        (Some(server), true) => {
            let (access, ticket) = server.grant(step.mission_id, step.id, step.attempts);
            (Some(access), Some(ticket))
        }
        _ => (None, None),
    };
    let (progress, progress_writer) = if shell {
        let (sender, receiver) = watch::channel(None);
        let done = CancellationToken::new();
        let writer = {
            let done = done.clone();
            let talk = Talk {
                pool: talk.pool.clone(),
                owner: talk.owner.clone(),
                asks: None,
            };
            let (id, attempt) = (step.id, step.attempts);
            tokio::spawn(async move { record_progress(&talk, id, attempt, receiver, done).await })
        };
        (Some(Arc::new(sender)), Some((writer, done)))
    } else {
        (None, None)
    };
    let ctx = StepContext {
        mission_id: step.mission_id,
        step_id: step.id,
        attempt: step.attempts,
        params: step
            .params
            .as_ref()
            .and_then(|p| Deserialize::deserialize(p).ok())
            .unwrap_or_default(),
        cancel,
        default_timeout: None,
        ask,
        progress,
    };
    let outcome = executors.execute(&spec, &ctx).await;
    telemetry::step_duration(spec.kind().as_str(), started.elapsed());
    drop(ctx);
    // The last progress line is written before the ending is stored.
    if let Some((writer, done)) = progress_writer {
        done.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    }
    let ending = match outcome {
        Outcome::Succeeded { result, output } => Ending::Succeeded { result, output },
        Outcome::Cancelled { result } => Ending::Cancelled { result },
        Outcome::Failed { error, result } => Ending::Failed {
            retry_in: executors::backoff_delay(step.attempts.max(1) as u32, backoff.0, backoff.1),
            error,
            result,
        },
    };
    Done::new(step.id, ending, started.elapsed())
}
