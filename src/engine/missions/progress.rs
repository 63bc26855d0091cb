//! What a step attempt's end does to its mission: store it (fenced on step, lease owner
//! and attempt, so a worker presumed dead can never overwrite the result of the retry
//! that replaced it), then queue the next step, finalize the mission, or retry, or
//! dead-letter the step and fail the mission. The statements are the tables' owners'
//! (`store::steps`, `store::missions`, ...); this module decides which run when.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::domain::budgets::{Amount, cost_of};
use crate::domain::error::OpsResult;
use crate::domain::policy::Policy;
use crate::domain::vocab::{EventKind, MissionStatus, Source, StepStatus};
use crate::engine::questions::{self, NewQuestion};
use crate::engine::telemetry;
use crate::engine::{budgets, gates};
use crate::store::events::{self, NewEvent};
use crate::store::steps::{EndingRow, Stored};
use crate::store::{dead_letters, missions, steps};

/// The attempt a worker holds: its fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub step_id: i64,
    pub owner: String,
    pub attempt: i32,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum Ending {
    Succeeded {
        result: Value,
        output: Value,
    },
    Failed {
        error: String,
        result: Value,
        retry_in: Duration,
    },
    /// A failure no retry can mend (a reference with no value): the step fails now.
    FailedForGood {
        error: String,
    },
    Cancelled {
        result: Value,
    },
    /// Its `when` did not hold: the step is skipped and the mission goes on.
    Skipped,
    /// An ask step: its question goes out and the step waits, holding nothing.
    Asking {
        question: Box<NewQuestion>,
    },
}

/// Store one attempt's ending if `lease` still holds, and move the mission along.
/// Returns false when the lease was lost: the result is refused.
pub async fn finish(
    conn: &mut PgConnection,
    lease: &Lease,
    ending: &Ending,
    policy: &Policy,
) -> OpsResult<bool> {
    let stored = finish_batch(conn, &[(lease.clone(), ending.clone())], policy).await?;
    Ok(stored.first().copied().unwrap_or(false))
}

/// Store many attempts' endings in a few set-based statements (the worker's hot path):
/// the fenced store with its action runs and step events, then next steps queued and
/// finished missions finalized. Final failures and `emit` events go one by one (rare).
/// Returns, per item, whether it was stored (false: its lease was lost).
pub async fn finish_batch(
    conn: &mut PgConnection,
    items: &[(Lease, Ending)],
    policy: &Policy,
) -> OpsResult<Vec<bool>> {
    let pause_after_failures = policy.gates.pause_after_failures;
    let stopped = stopped_missions(conn, items).await?;
    let empty = json!({});
    let rows: Vec<EndingRow> = items
        .iter()
        .map(|(lease, ending)| {
            let row = |outcome, result, error, retry_in, output, permanent| EndingRow {
                step_id: lease.step_id,
                owner: &lease.owner,
                attempt: lease.attempt,
                outcome,
                result,
                output,
                error,
                retry_in,
                permanent,
            };
            let cancelled = StepStatus::Cancelled;
            match ending {
                // The mission was cancelled: this attempt's failure (or event, or
                // question) ends the step cancelled, never a retry or a dead letter.
                Ending::Failed { result, .. } | Ending::Succeeded { result, .. }
                    if stopped.contains(&lease.step_id) =>
                {
                    row(
                        cancelled,
                        result,
                        Some("cancelled"),
                        Duration::ZERO,
                        None,
                        false,
                    )
                }
                Ending::FailedForGood { .. } | Ending::Asking { .. } | Ending::Skipped
                    if stopped.contains(&lease.step_id) =>
                {
                    row(
                        cancelled,
                        &empty,
                        Some("cancelled"),
                        Duration::ZERO,
                        None,
                        false,
                    )
                }
                Ending::Succeeded { result, output } => row(
                    StepStatus::Succeeded,
                    result,
                    None,
                    Duration::ZERO,
                    Some(output),
                    false,
                ),
                Ending::Cancelled { result } => row(
                    cancelled,
                    result,
                    Some("cancelled"),
                    Duration::ZERO,
                    None,
                    false,
                ),
                Ending::Failed {
                    error,
                    result,
                    retry_in,
                } => row(
                    StepStatus::Failed,
                    result,
                    Some(error.as_str()),
                    *retry_in,
                    None,
                    false,
                ),
                Ending::FailedForGood { error } => row(
                    StepStatus::Failed,
                    &empty,
                    Some(error.as_str()),
                    Duration::ZERO,
                    None,
                    true,
                ),
                Ending::Skipped => row(
                    StepStatus::Skipped,
                    &empty,
                    None,
                    Duration::ZERO,
                    None,
                    false,
                ),
                Ending::Asking { .. } => row(
                    StepStatus::Asking,
                    &empty,
                    None,
                    Duration::ZERO,
                    None,
                    false,
                ),
            }
        })
        .collect();
    let stored = steps::store_endings(conn, &rows).await?;
    // Each stored step's ending, by step: a batch holds hundreds.
    let ending_of: HashMap<i64, &Ending> = items
        .iter()
        .map(|(lease, ending)| (lease.step_id, ending))
        .collect();
    // What the stored successes report they spent, charged in this transaction.
    let costs: Vec<(i64, Amount)> = stored
        .iter()
        .filter(|s| s.outcome == StepStatus::Succeeded)
        .filter_map(|s| match ending_of.get(&s.id) {
            Some(Ending::Succeeded { output, .. }) => output
                .as_object()
                .and_then(|o| cost_of(o).ok().flatten())
                .map(|cost| (s.mission_id, cost)),
            _ => None,
        })
        .collect();
    budgets::charge(conn, policy, &costs).await?;

    let tally = |f: fn(&Stored) -> bool| stored.iter().filter(|s| f(s)).count() as u64;
    telemetry::step_outcome("succeeded", tally(|s| s.outcome == StepStatus::Succeeded));
    telemetry::step_outcome("cancelled", tally(|s| s.outcome == StepStatus::Cancelled));
    telemetry::step_outcome(
        "retrying",
        tally(|s| s.outcome == StepStatus::Failed && !s.out_of_attempts()),
    );
    telemetry::step_outcome("failed", tally(Stored::out_of_attempts));

    telemetry::step_outcome("skipped", tally(|s| s.outcome == StepStatus::Skipped));
    let succeeded: Vec<&Stored> = stored.iter().filter(|s| s.moves_on()).collect();
    // An `emit` step's event belongs to its step, so it comes before `mission.succeeded`.
    for s in &succeeded {
        if let Some(Ending::Succeeded { result, .. }) = ending_of.get(&s.id)
            && let Some((event, payload)) = emitted_event(result)
        {
            let event = NewEvent::new(event, Source::Worker)
                .mission(s.mission_id)
                .step(s.id)
                .payload(payload);
            events::emit(conn, event).await?;
        }
    }
    // Steps run in order: a mission whose last step succeeded has succeeded.
    let next: Vec<i64> = succeeded.iter().filter_map(|s| s.next_id).collect();
    if !next.is_empty() {
        steps::queue_next(conn, &next).await?;
    }
    let done: Vec<i64> = succeeded
        .iter()
        .filter(|s| s.next_id.is_none())
        .map(|s| s.mission_id)
        .collect();
    if !done.is_empty() {
        finalize(conn, &done).await?;
    }
    for s in stored.iter().filter(|s| s.outcome == StepStatus::Asking) {
        if let Some(Ending::Asking { question }) = ending_of.get(&s.id) {
            questions::ask(conn, question).await?;
        }
    }
    for s in stored.iter().filter(|s| s.out_of_attempts()) {
        if let Some(Ending::Failed { error, .. } | Ending::FailedForGood { error }) =
            ending_of.get(&s.id)
        {
            fail_for_good(
                conn,
                s.id,
                s.mission_id,
                &s.name,
                s.attempts,
                error,
                pause_after_failures,
            )
            .await?;
        }
    }
    let stored_ids: HashSet<i64> = stored.iter().map(|s| s.id).collect();
    Ok(items
        .iter()
        .map(|(lease, _)| stored_ids.contains(&lease.step_id))
        .collect())
}

/// Of the steps whose ending depends on their mission still running (a failure would
/// retry or dead-letter, an `emit` would write its event), those whose mission is no
/// longer running, their missions locked until commit (`missions::lock_stopped`).
/// Plain successes and cancels (the hot path) need no lock and skip this statement.
async fn stopped_missions(
    conn: &mut PgConnection,
    items: &[(Lease, Ending)],
) -> OpsResult<Vec<i64>> {
    let checked: Vec<i64> = items
        .iter()
        .filter(|(_, ending)| match ending {
            Ending::Failed { .. }
            | Ending::FailedForGood { .. }
            | Ending::Asking { .. }
            | Ending::Skipped => true,
            Ending::Succeeded { result, .. } => emitted_event(result).is_some(),
            Ending::Cancelled { .. } => false,
        })
        .map(|(lease, _)| lease.step_id)
        .collect();
    if checked.is_empty() {
        return Ok(Vec::new());
    }
    missions::lock_stopped(conn, &checked).await
}

/// An `emit` step's event, from its result.
fn emitted_event(result: &Value) -> Option<(String, Value)> {
    let event = result.get("event")?.as_str()?.to_string();
    let payload = result.get("payload").cloned().unwrap_or_else(|| json!({}));
    Some((event, payload))
}

/// How much of a failed step's stderr its `mission.failed` event keeps (characters).
const STDERR_TAIL: i32 = 1500;

/// A step out of attempts: dead-letter it, fail its mission, cancel what follows.
pub(crate) async fn fail_for_good(
    conn: &mut PgConnection,
    step_id: i64,
    mission_id: i64,
    name: &str,
    attempts: i32,
    error: &str,
    pause_after_failures: u32,
) -> OpsResult<()> {
    dead_letters::record(conn, step_id, error).await?;
    events::emit(
        conn,
        NewEvent::new(EventKind::StepFailed, Source::Worker)
            .mission(mission_id)
            .step(step_id)
            .payload(json!({ "name": name, "attempts": attempts, "error": error })),
    )
    .await?;
    // The failure message shows the tail of what the step said on stderr.
    let stderr = steps::stderr_tail(conn, step_id, STDERR_TAIL).await?;
    steps::cancel_remaining(conn, mission_id).await?;
    let why = format!("step {name} failed: {error}");
    let Some(failed) = missions::fail(conn, mission_id, &why).await? else {
        return Ok(()); // already final (cancelled meanwhile): finalization is idempotent
    };
    telemetry::mission_finished(MissionStatus::Failed.as_str());
    events::emit(
        conn,
        NewEvent::new(EventKind::MissionFailed, Source::Worker)
            .proposal(failed.proposal_id)
            .mission(mission_id)
            .payload(json!({
                "template": failed.template, "params": failed.params, "step": name, "error": error,
                "step_id": step_id, "attempts": attempts, "stderr": stderr,
            })),
    )
    .await?;
    // `gates.pause_after_failures`: the template's last N finished missions all failed.
    if pause_after_failures > 0 {
        let failed_in_a_row =
            missions::failed_of_last(conn, &failed.template, pause_after_failures).await?;
        if failed_in_a_row >= i64::from(pause_after_failures) {
            gates::pause_template(conn, &failed.template, failed_in_a_row).await?;
        }
    }
    Ok(())
}

/// Mark these missions succeeded (with their events); the caller has seen all their
/// steps succeed. Idempotent; returns how many it finalized.
pub async fn finalize(conn: &mut PgConnection, mission_ids: &[i64]) -> OpsResult<u64> {
    let finished = missions::finalize_succeeded(conn, mission_ids).await?;
    for _ in 0..finished {
        telemetry::mission_finished(MissionStatus::Succeeded.as_str());
    }
    Ok(finished)
}
