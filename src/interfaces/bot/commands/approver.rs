//! Approvers decide on proposals (buttons on prompts do the same, in `taps`).

use std::sync::Arc;

use super::Caller;
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::input::parse_id;
use crate::domain::vocab::Source;
use crate::engine::approvals::{self, Decision};
use crate::engine::notify::{cut, escape};
use crate::interfaces::bot::BotState;

/// `/approve ID`.
pub async fn approve(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    decide(&state, &caller, &args, Decision::Approve).await
}

/// `/reject ID [reason]`.
pub async fn reject(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    decide(&state, &caller, &args, Decision::Reject).await
}

async fn decide(
    state: &BotState,
    caller: &Caller,
    args: &str,
    decision: Decision,
) -> OpsResult<String> {
    let (id, reason) = match args.trim().split_once(char::is_whitespace) {
        Some((id, reason)) => (id, Some(cut(reason.trim(), 500))),
        None => (args.trim(), None),
    };
    if id.is_empty() {
        return Err(OpsError::bad_input(
            "which proposal? Give its id, e.g. /approve 12",
        ));
    }
    let id = parse_id(id, "proposal")?;
    // The gates about missions are checked again by the approval that would create one.
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    let decided = approvals::decide(
        &state.pool,
        &policy,
        id,
        &caller.actor(),
        decision,
        reason.as_deref(),
        Source::Telegram.as_str(),
    )
    .await?;
    Ok(escape(&decided.describe()))
}
