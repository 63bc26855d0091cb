//! Operator controls on missions (design §12, docs/commands.md): retry a failed or
//! cancelled mission from the step that stopped it, and the kill switch (pause, and
//! every running mission cancelled, in one transaction). Both go through the tables'
//! owners and write their events in the same transaction; kill cancels each mission
//! through the same path as `cancel` (`missions::cancel_in`).

use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::db::locks;
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::input;
use crate::domain::policy::{Policy, Risk};
use crate::domain::vocab::{EventKind, MissionStatus, Source};
use crate::engine::{budgets, gates, telemetry};
use crate::store::events::{self, NewEvent};
use crate::store::users::Role;
use crate::store::{dead_letters, missions, outbox, policy as policy_store, steps};

/// A retried mission.
#[derive(Debug, Clone, Serialize)]
pub struct Retried {
    pub mission_id: i64,
    pub template: String,
    /// The step that runs again, and the number of its next attempt.
    pub step: String,
    pub attempt: i32,
    /// What the mission was before: `failed` or `cancelled`.
    pub was: MissionStatus,
}

impl Retried {
    /// One line for people: `mission #7 retried from step build (attempt 4)`.
    pub fn describe(&self) -> String {
        format!(
            "mission #{} retried from step {} (attempt {})",
            self.mission_id, self.step, self.attempt
        )
    }
}

/// The least role that may retry a mission of this risk: re-running risky work is a
/// decision, so high and red need an approver.
pub fn retry_role(risk: Risk) -> Role {
    match risk {
        Risk::Low => Role::Operator,
        Risk::High | Risk::Red => Role::Approver,
    }
}

/// Retry mission `mission_id` as `actor`: the step that stopped it is queued again with
/// a fresh allowance of attempts, the steps after it wait again, the mission runs again
/// (`mission.retried`), its dead letter is marked retried and its failure messages are
/// edited. `role`: the Telegram caller's (checked against the mission's risk); None
/// for the CLI. Refused (exit 3) in any other state, while the template is paused or
/// its max_running is reached; an unknown id is bad input. The mission's row lock
/// makes two retries at once one retry and one refusal.
pub async fn retry(
    pool: &PgPool,
    policy: &Policy,
    mission_id: i64,
    actor: &str,
    source: Source,
    role: Option<Role>,
) -> OpsResult<Retried> {
    let actor = input::identity(actor, "who retries")?;
    let mut tx = pool.begin().await?;
    // max_running counts running missions: take the lock approvals creating missions
    // take, before the row lock, in the same order.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(locks::PROPOSALS)
        .execute(&mut *tx)
        .await?;
    let status = missions::lock(&mut tx, mission_id)
        .await?
        .ok_or_else(|| OpsError::bad_input(format!("there is no mission #{mission_id}")))?;
    if !matches!(status, MissionStatus::Failed | MissionStatus::Cancelled) {
        return Err(OpsError::refused(format!(
            "mission #{mission_id} is {status}; only a failed or cancelled mission can be retried"
        )));
    }
    let mission = missions::retryable(&mut tx, mission_id).await?;
    let risk: Risk = mission.risk.parse().unwrap_or(Risk::Red);
    if let Some(role) = role {
        let needed = retry_role(risk);
        if role < needed {
            return Err(OpsError::refused(format!(
                "retrying a {}-risk mission needs the {needed} role; you are {role}",
                risk.as_str()
            )));
        }
    }
    let refusal = match gates::check_retry(&mut tx, policy, &mission.template).await? {
        None => budgets::gate(&mut tx, policy, &mission.template, &mission.proposed_by).await?,
        refused => refused,
    };
    if let Some(refusal) = refusal {
        return Err(OpsError::refused(format!(
            "mission #{mission_id} cannot be retried now: {}",
            refusal.reason
        )));
    }
    let step = steps::stopping(&mut tx, mission_id).await?.ok_or_else(|| {
        OpsError::refused(format!("mission #{mission_id} has no step left to run"))
    })?;
    if !step.status.is_finished() {
        // A cancel's kill is still on its way to the worker that runs the step.
        return Err(OpsError::refused(format!(
            "mission #{mission_id}'s step {} is still stopping ({}); try again in a moment",
            step.name, step.status
        )));
    }
    steps::requeue_from(&mut tx, mission_id, step.seq).await?;
    dead_letters::mark_retried(&mut tx, step.id, &actor).await?;
    if !missions::reopen(&mut tx, mission_id).await? {
        return Err(OpsError::refused(format!(
            "mission #{mission_id} changed meanwhile; look at it again"
        )));
    }
    let attempt = step.attempts + 1;
    events::emit(
        &mut tx,
        NewEvent::new(EventKind::MissionRetried, source)
            .proposal(mission.proposal_id)
            .mission(mission_id)
            .step(step.id)
            .payload(json!({
                "template": mission.template, "by": actor, "step": step.name,
                "attempt": attempt, "was": status.as_str(),
            })),
    )
    .await?;
    if status == MissionStatus::Failed {
        outbox::enqueue_failure_edits(&mut tx, mission_id, EventKind::MissionFailed.as_str())
            .await?;
    }
    steps::wake_workers(&mut tx).await?;
    tx.commit().await?;
    Ok(Retried {
        mission_id,
        template: mission.template,
        step: step.name,
        attempt,
        was: status,
    })
}

/// What the kill switch did.
#[derive(Debug, Clone, Serialize)]
pub struct Killed {
    /// The missions it cancelled, oldest first.
    pub missions: Vec<i64>,
    /// The pause switch was on already.
    pub was_paused: bool,
}

/// The kill switch: the pause switch goes on and every running mission is cancelled
/// (each as `cancel` does it: waiting steps cancelled, workers told to kill running
/// ones), in one transaction with one `system.killed` event (it stands for the pause
/// too). A deadlock with a worker storing endings of the same missions is retried.
pub async fn kill(
    pool: &PgPool,
    actor: &str,
    source: Source,
    reason: Option<&str>,
) -> OpsResult<Killed> {
    let actor = input::identity(actor, "who kills")?;
    if let Some(reason) = reason {
        input::storable_text(reason, "the reason")?;
    }
    let mut tries = 0;
    loop {
        tries += 1;
        match kill_once(pool, &actor, source, reason).await {
            Err(OpsError::Db(e)) if tries < 5 && is_deadlock(&e) => {
                tracing::warn!(error = %e, "kill: deadlock with another transaction; again");
            }
            done => return done,
        }
    }
}

async fn kill_once(
    pool: &PgPool,
    actor: &str,
    source: Source,
    reason: Option<&str>,
) -> OpsResult<Killed> {
    let mut tx = pool.begin().await?;
    let by = format!("kill by {actor}");
    let was_paused = !policy_store::switch_pause(&mut tx, true, &by).await?;
    let ids = missions::lock_running(&mut tx).await?;
    for id in &ids {
        super::cancel_in(&mut tx, *id, actor, source.as_str()).await?;
    }
    let event = events::emit(
        &mut tx,
        NewEvent::new(EventKind::SystemKilled, source).payload(json!({
            "cancelled": ids.len(), "missions": ids, "reason": reason, "by": actor,
            "was_paused": was_paused,
        })),
    )
    .await?;
    // Admins are told whatever `notify.events` says.
    outbox::enqueue_for_admins(&mut tx, event).await?;
    tx.commit().await?;
    for _ in &ids {
        telemetry::mission_finished(MissionStatus::Cancelled.as_str());
    }
    Ok(Killed {
        missions: ids,
        was_paused,
    })
}

fn is_deadlock(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}
