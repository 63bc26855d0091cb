//! Operators propose work, cancel missions and retry them.

use std::sync::Arc;

use super::viewer::template_list;
use super::{Caller, first};
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::input::{parse_id, parse_params};
use crate::domain::policy::{MAX_PRIORITY, MIN_PRIORITY, PRIORITY_PARAM};
use crate::domain::vocab::Source;
use crate::engine::missions::{self, controls};
use crate::engine::notify::{cut, escape};
use crate::engine::proposals::{self, NewProposal, ProposalStatus};
use crate::interfaces::bot::access::Pace;
use crate::interfaces::bot::answers;
use crate::interfaces::bot::{BotState, SLOW_DOWN};
use crate::store::users::Role;

/// `/propose TEMPLATE key=value …`: the same entry point as the CLI and HTTP. Only a
/// valid proposal counts against the proposal rate limit; bad input gets the template's
/// params to show how to call it right.
pub async fn propose(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    // Pick up a policy applied a moment ago.
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    let words: Vec<&str> = args.split_whitespace().collect();
    let Some((template, params)) = words.split_first() else {
        return Ok(format!(
            "Usage: /propose TEMPLATE key=value …\n{}",
            template_list(&state).await
        ));
    };
    let mut params = parse_params(params)?;
    // `priority` is no param of any template (`policy check` refuses it): it is this.
    let priority = match params.remove(PRIORITY_PARAM) {
        None => None,
        Some(n) => Some(n.trim().parse::<i32>().map_err(|_| {
            OpsError::bad_input(format!(
                "priority={n:?} is not a number from {MIN_PRIORITY} to {MAX_PRIORITY}"
            ))
        })?),
    };
    let request = NewProposal {
        template: template.to_string(),
        params,
        proposed_by: caller.actor(),
        source: Source::Telegram,
        priority,
        // Raising it above the template's is an approver's decision.
        may_raise_priority: caller.user.role().is_some_and(|r| r >= Role::Approver),
    };
    let checked = proposals::validate(&policy, &request).map(|_| ());
    if checked.is_ok() {
        match state.limits.proposal(caller.id()) {
            Pace::Ok => {}
            Pace::Ignore | Pace::TellToSlowDown => return Ok(SLOW_DOWN.to_string()),
        }
    }
    let proposed = match checked {
        Ok(()) => proposals::propose(&state.pool, &policy, request).await,
        Err(e) => Err(e),
    };
    let proposed = match proposed {
        Ok(p) => p,
        Err(OpsError::BadInput(message)) => {
            let help = policy
                .template(template)
                .map(|t| {
                    let lines = t.params_help();
                    if lines.is_empty() {
                        format!("\n{} takes no params.", escape(template))
                    } else {
                        format!(
                            "\nParams of {}:\n{}",
                            escape(template),
                            escape(&lines.join("\n"))
                        )
                    }
                })
                .unwrap_or_else(|| "\n/templates lists what can be proposed.".to_string());
            return Ok(format!("⚠️ {}{help}", escape(&cut(&message, 1500))));
        }
        Err(e) => return Err(e),
    };
    Ok(match proposed.status {
        ProposalStatus::Approved => format!(
            "✅ proposal #{} approved: mission #{} started ({})",
            proposed.id,
            proposed.mission_id.unwrap_or(0),
            escape(&proposed.template)
        ),
        ProposalStatus::Pending => format!(
            "⏳ proposal #{} ({}, {} risk) awaits approval: 0/{}. Approvers have been asked.",
            proposed.id,
            escape(&proposed.template),
            proposed.risk.as_str(),
            proposed.approvals_needed
        ),
        _ => format!(
            "⛔ proposal #{} refused: {}",
            proposed.id,
            escape(proposed.reason.as_deref().unwrap_or("no reason given"))
        ),
    })
}

/// `/cancel ID`: queued steps are cancelled, a running step is killed.
pub async fn cancel(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    let id = parse_id(first(&args, "mission")?, "mission")?;
    missions::cancel(&state.pool, id, &caller.actor(), Source::Telegram.as_str()).await?;
    Ok(format!("⏹ mission #{id} cancelled"))
}

/// `/answer ID text` (and a reply to a question's message): the rest of the line is
/// the answer.
pub async fn answer(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    let args = args.trim_start();
    let (id, text) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
    if id.is_empty() {
        return Err(OpsError::bad_input(
            "Usage: /answer ID text, e.g. /answer 5 publish",
        ));
    }
    let id = parse_id(id, "question")?;
    let text = text.trim();
    if text.is_empty() {
        return Err(OpsError::bad_input(format!(
            "What is your answer? /answer {id} TEXT"
        )));
    }
    answers::answer(&state, &caller.user, &caller.actor(), id, text).await
}

/// `/retry ID`: a failed or cancelled mission runs again from the step that stopped it.
/// A high or red one needs an approver (checked on its risk, in the retry).
pub async fn retry(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    let id = parse_id(first(&args, "mission")?, "mission")?;
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    let retried = controls::retry(
        &state.pool,
        &policy,
        id,
        &caller.actor(),
        Source::Telegram,
        Some(caller.user.role().unwrap_or(Role::Viewer)),
    )
    .await?;
    Ok(format!("🔁 {}", escape(&retried.describe())))
}
