//! The heartbeat tick (design §5): due triggers → unprocessed events through the
//! reactions → expired leases recovered → pending proposals expired → questions past
//! their timeout settled → reminders due → budgets checked → missions finalized → one `ops_action_runs` row. One tick at a time across all hosts: a
//! session advisory lock taken for the tick on a connection of its own
//! (`db::singleton`), released when the tick ends or the holder dies. The tick checks
//! it still holds the lock before each phase, and stops at the first phase it does not;
//! a tick whose lock is lost mid-phase (its check failed) is cut off there.

use std::time::Instant;

use chrono::Utc;
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::db::locks;
use crate::db::singleton::{Held, Singleton};
use crate::db::vacuum;
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::policy::Policy;
use crate::domain::vocab::{EventKind, MissionStatus, Source, StepStatus};
use crate::engine::approvals;
use crate::engine::budgets;
use crate::engine::gates;
use crate::engine::missions::progress;
use crate::engine::questions;
use crate::engine::telemetry;
use crate::store::events::{self, NewEvent};
use crate::store::{missions, runs, steps};
use crate::{engine::reactions, engine::retention, engine::triggers};

#[derive(Debug, Default, Clone, Serialize)]
pub struct TickSummary {
    /// False when another process held the heartbeat lock: nothing was done.
    pub ran: bool,
    pub triggers_fired: u64,
    pub events_processed: u64,
    pub reactions_proposed: u64,
    pub reactions_skipped: u64,
    pub leases_recovered: u64,
    pub steps_failed: u64,
    pub proposals_expired: u64,
    /// Questions past their timeout: answered by their default, or expired.
    pub questions_settled: u64,
    /// Reminder messages queued (`[approval] remind`).
    pub reminders: u64,
    /// `budget.warning` and `budget.exhausted` events written ("budgets checked").
    pub budget_events: u64,
    pub missions_finalized: u64,
    pub deleted: retention::Deleted,
    /// Queue tables this tick vacuumed (only on a server whose autovacuum is off).
    pub vacuumed: Vec<String>,
    pub duration_ms: u64,
}

/// A tick's phases work in bounded batches and take seconds at most; one still running
/// after this long waits on a connection that stopped answering, and is cut off.
const TICK_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Run one tick if no other process is ticking.
pub async fn tick(pool: &PgPool, policy: &Policy) -> OpsResult<TickSummary> {
    let started = Instant::now();
    let summary = tick_locked(pool, policy).await;
    let outcome = match &summary {
        Ok(s) if s.ran => "ran",
        Ok(_) => "skipped",
        Err(_) => "error",
    };
    telemetry::tick(outcome, started.elapsed());
    summary
}

async fn tick_locked(pool: &PgPool, policy: &Policy) -> OpsResult<TickSummary> {
    let Some(held) = Singleton::new(pool, locks::HEARTBEAT, "heartbeat")
        .try_acquire()
        .await?
    else {
        return Ok(TickSummary::default());
    };
    // A phase whose connection stopped answering ends with the lock (its check fails
    // within a lease), not never: the next tick starts over on fresh connections.
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(TICK_LIMIT, phases(pool, policy, &held)) => {
            outcome.unwrap_or_else(|_| Err(OpsError::Other(anyhow::anyhow!(
                "the tick took longer than {TICK_LIMIT:?} (a connection that stopped answering?); stopped"
            ))))
        }
        _ = held.lost() => Err(OpsError::Other(anyhow::anyhow!(
            "lost the heartbeat lock mid-phase; the tick stopped"
        ))),
    };
    held.release().await;
    outcome
}

/// Stop before `phase` unless this tick still holds the heartbeat lock: another host may
/// be ticking, and reaction cooldowns and batch limits hold only for one tick at a time.
async fn still_holding(held: &Held, phase: &str) -> OpsResult<()> {
    held.ensure()
        .await
        .map_err(|lost| OpsError::Other(anyhow::anyhow!("{lost}; the tick stopped before {phase}")))
}

async fn phases(pool: &PgPool, policy: &Policy, held: &Held) -> OpsResult<TickSummary> {
    let started = Instant::now();
    let started_at = Utc::now();
    let mut s = TickSummary {
        ran: true,
        ..TickSummary::default()
    };
    let paused = gates::is_paused(&mut *pool.acquire().await?).await?;
    still_holding(held, "triggers").await?;
    s.triggers_fired = triggers::fire_due(pool, policy, Utc::now(), paused).await?;
    still_holding(held, "reactions").await?;
    let r = reactions::process(pool, policy, paused).await?;
    s.events_processed = r.events;
    s.reactions_proposed = r.proposed;
    s.reactions_skipped = r.skipped;
    still_holding(held, "lease recovery").await?;
    (s.leases_recovered, s.steps_failed) = recover_leases(pool, policy).await?;
    still_holding(held, "proposal expiry").await?;
    s.proposals_expired = expire_proposals(pool).await?;
    still_holding(held, "question timeouts").await?;
    s.questions_settled = settle_questions(pool, policy).await?;
    if let Some(after) = policy.approval.remind {
        still_holding(held, "reminders").await?;
        s.reminders = remind(pool, after).await?;
    }
    still_holding(held, "budgets").await?;
    s.budget_events = budgets::check(pool, policy).await?;
    still_holding(held, "finalization").await?;
    s.missions_finalized = finalize_missions(pool).await?;
    still_holding(held, "retention").await?;
    s.deleted = retention::enforce(pool, &policy.retention).await?;
    still_holding(held, "vacuum").await?;
    s.vacuumed = match vacuum::queue_tables_if_autovacuum_is_off(pool).await {
        Ok(tables) => tables,
        // Not the loop's work: a tick that could not vacuum still did everything else.
        Err(e) => {
            tracing::warn!(error = %e, "vacuuming the queue tables failed (the server's autovacuum is off)");
            Vec::new()
        }
    };
    s.duration_ms = started.elapsed().as_millis() as u64;
    still_holding(held, "the tick's record").await?;
    runs::record_tick(pool, &json!(s), started_at).await?;
    Ok(s)
}

/// Steps whose worker stopped renewing: back to the queue, or failed when out of
/// attempts, or cancelled when their mission was.
async fn recover_leases(pool: &PgPool, policy: &Policy) -> OpsResult<(u64, u64)> {
    let mut tx = pool.begin().await?;
    let expired = steps::lock_expired(&mut tx, 500).await?;
    let (mut recovered, mut failed) = (0, 0);
    for step in &expired {
        let owner = step.lease_owner.as_deref().unwrap_or("unknown");
        let error = format!("lease expired: worker {owner} stopped renewing it");
        let next = if step.mission_status == MissionStatus::Cancelled {
            StepStatus::Cancelled
        } else if step.attempts < step.max_attempts {
            StepStatus::Queued
        } else {
            StepStatus::Failed
        };
        steps::recover_expired(&mut tx, step.id, next, &error).await?;
        // What the lost attempt asked (`opsloop ask`) ends with it.
        questions::cancel_of_attempt_in(&mut tx, step.mission_id, step.id, step.attempts).await?;
        match next {
            StepStatus::Queued => {
                recovered += 1;
                events::emit(
                    &mut tx,
                    NewEvent::new(EventKind::StepRecovered, Source::Heartbeat)
                        .mission(step.mission_id)
                        .step(step.id)
                        .payload(json!({
                            "name": step.name, "attempt": step.attempts, "previous_owner": owner,
                        })),
                )
                .await?;
            }
            StepStatus::Failed => {
                failed += 1;
                progress::fail_for_good(
                    &mut tx,
                    step.id,
                    step.mission_id,
                    &step.name,
                    step.attempts,
                    &error,
                    policy.gates.pause_after_failures,
                )
                .await?;
            }
            _ => {}
        }
    }
    if recovered > 0 {
        steps::wake_workers(&mut tx).await?;
    }
    tx.commit().await?;
    telemetry::step_outcome("recovered", recovered);
    telemetry::step_outcome("failed", failed);
    Ok((recovered, failed))
}

async fn expire_proposals(pool: &PgPool) -> OpsResult<u64> {
    let mut tx = pool.begin().await?;
    let due = crate::store::proposals::lock_due_to_expire(&mut tx, 500).await?;
    for (id, template) in &due {
        approvals::expire(&mut tx, *id, template).await?;
    }
    tx.commit().await?;
    Ok(due.len() as u64)
}

/// One reminder per pending proposal and per open question, once they are `after` old.
async fn remind(pool: &PgPool, after: std::time::Duration) -> OpsResult<u64> {
    let mut tx = pool.begin().await?;
    let mut subjects: Vec<String> =
        crate::store::proposals::take_due_reminders(&mut tx, after, 100)
            .await?
            .into_iter()
            .map(|id| format!("proposal:{id}"))
            .collect();
    subjects.extend(
        crate::store::questions::take_due_reminders(&mut tx, after, 100)
            .await?
            .into_iter()
            .map(|id| format!("question:{id}")),
    );
    let n = if subjects.is_empty() {
        0
    } else {
        crate::store::outbox::enqueue_reminders(&mut tx, &subjects).await?
    };
    tx.commit().await?;
    Ok(n)
}

async fn settle_questions(pool: &PgPool, policy: &Policy) -> OpsResult<u64> {
    let mut tx = pool.begin().await?;
    let n = questions::settle_due(&mut tx, policy.gates.pause_after_failures).await?;
    tx.commit().await?;
    Ok(n)
}

/// A safety net: missions whose steps all succeeded but that are still running (the
/// worker's own finalization is the usual path). Idempotent.
async fn finalize_missions(pool: &PgPool) -> OpsResult<u64> {
    let ids = missions::awaiting_finalization(pool, 500).await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    let n = progress::finalize(&mut tx, &ids).await?;
    tx.commit().await?;
    Ok(n)
}
