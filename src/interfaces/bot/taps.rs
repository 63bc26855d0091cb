//! Button taps: approval prompts (`a:ID`, `r:ID`) and failure messages' Retry
//! (`retry:MISSION_ID`). Everything in the data is checked again on every tap (role,
//! state, self-approval) and every tap is answered at once. The messages themselves are
//! edited through the outbox.

use std::sync::Arc;

use teloxide::prelude::*;

use super::{BotState, HandlerResult};
use super::{access, answers};
use crate::domain::error::OpsError;
use crate::domain::vocab::Source;
use crate::engine::approvals::{self, Decision};
use crate::engine::missions::controls;
use crate::engine::notify::{self, cut};

use crate::store::users::{Role, User};

/// `a:12` → (Approve, 12). Anything else is refused.
pub fn parse_data(data: &str) -> Option<(Decision, i64)> {
    if data.len() > 64 {
        return None;
    }
    let (action, id) = data.split_once(':')?;
    let decision = match action {
        "a" => Decision::Approve,
        "r" => Decision::Reject,
        _ => return None,
    };
    let id: i64 = id.parse().ok().filter(|id| *id > 0)?;
    Some((decision, id))
}

/// `retry:7` → 7. Anything else is None.
pub fn parse_retry(data: &str) -> Option<i64> {
    let id = data.strip_prefix("retry:")?;
    id.parse().ok().filter(|id| *id > 0 && data.len() <= 64)
}

pub async fn on_tap(bot: Bot, q: CallbackQuery, state: Arc<BotState>) -> HandlerResult {
    let data = q.data.as_deref().unwrap_or("");
    let answer = if let Some((question, choice)) = answers::parse_data(data) {
        answer_question(&state, &q, question, choice).await
    } else if let Some(mission) = parse_retry(data) {
        retry(&state, &q, mission).await
    } else {
        adopt(&state, &q).await;
        decide(&state, &q).await
    };
    // Callback answers are short (Telegram shows at most 200 characters).
    bot.answer_callback_query(q.id.clone())
        .text(cut(&answer, 190))
        .await?;
    Ok(())
}

/// A tap on a prompt message we have no record of (sent twice, Telegram's answer to the
/// first send lost) makes it known, so the proposal's edits reach it too.
async fn adopt(state: &BotState, q: &CallbackQuery) {
    let message = q.message.as_ref().and_then(|m| m.regular_message());
    let proposal = q.data.as_deref().and_then(parse_data);
    if let (Some(message), Some((_, proposal))) = (message, proposal)
        && let Err(e) =
            notify::adopt_prompt(&state.pool, message.chat.id.0, message.id.0, proposal).await
    {
        tracing::warn!(error = %e, "cannot record a tapped prompt");
    }
}

/// Who tapped, if we know them; else what they are told (strangers learn their id).
async fn tapper(state: &BotState, q: &CallbackQuery) -> Result<User, String> {
    match access::seen(&state.pool, &q.from, false).await {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(format!(
            "Not authorized. Your Telegram id is {}.",
            q.from.id.0
        )),
        Err(_) => Err("Something went wrong; try again.".into()),
    }
}

/// A tap on a question's button: its choice is the answer.
async fn answer_question(state: &BotState, q: &CallbackQuery, id: i64, choice: usize) -> String {
    let user = match tapper(state, q).await {
        Ok(user) => user,
        Err(refusal) => return refusal,
    };
    let answered = async {
        let text = answers::choice(state, id, choice).await?;
        answers::answer(state, &user, &access::actor(&q.from), id, &text).await
    };
    match answered.await {
        // A callback answer is plain text.
        Ok(_) => "Answered.".to_string(),
        Err(OpsError::BadInput(m) | OpsError::Refused(m)) => m,
        Err(e) => {
            tracing::error!(error = %e, "answer tap failed");
            "Something went wrong; try again.".into()
        }
    }
}

/// A Retry tap: anyone who sees the failure message may tap; the role is checked here
/// (an operator for low risk, an approver for high and red, in the retry itself).
async fn retry(state: &BotState, q: &CallbackQuery, mission: i64) -> String {
    let user = match tapper(state, q).await {
        Ok(user) => user,
        Err(refusal) => return refusal,
    };
    let Some(role) = user.role().filter(|r| *r >= Role::Operator) else {
        return format!(
            "Not allowed: retrying needs the operator role; you are {}.",
            user.role
        );
    };
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    match controls::retry(
        &state.pool,
        &policy,
        mission,
        &access::actor(&q.from),
        Source::Telegram,
        Some(role),
    )
    .await
    {
        Ok(retried) => retried.describe(),
        Err(OpsError::BadInput(m) | OpsError::Refused(m)) => m,
        Err(e) => {
            tracing::error!(error = %e, "retry tap failed");
            "Something went wrong; try again.".into()
        }
    }
}

async fn decide(state: &BotState, q: &CallbackQuery) -> String {
    let user = match tapper(state, q).await {
        Ok(user) => user,
        Err(refusal) => return refusal,
    };
    if user.role().is_none_or(|r| r < Role::Approver) {
        return format!(
            "Not allowed: approving needs the approver role; you are {}.",
            user.role
        );
    }
    let Some((decision, proposal)) = q.data.as_deref().and_then(parse_data) else {
        return "This button is not one of mine.".into();
    };
    // The gates about missions are checked again by the approval that would create one.
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    match approvals::decide(
        &state.pool,
        &policy,
        proposal,
        &access::actor(&q.from),
        decision,
        None,
        Source::Telegram.as_str(),
    )
    .await
    {
        Ok(decided) => decided.describe(),
        Err(OpsError::BadInput(m) | OpsError::Refused(m)) => m,
        Err(e) => {
            tracing::error!(error = %e, "tap failed");
            "Something went wrong; try again.".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_data_is_strict() {
        assert_eq!(parse_data("a:12"), Some((Decision::Approve, 12)));
        assert_eq!(parse_data("r:7"), Some((Decision::Reject, 7)));
        for bad in [
            "a:",
            "a:-1",
            "a:0",
            "x:1",
            "a:1:2",
            "a:99999999999999999999",
            "",
            "a",
            &"a:1".repeat(30),
        ] {
            assert_eq!(parse_data(bad), None, "{bad}");
        }
        assert_eq!(parse_retry("retry:7"), Some(7));
        for bad in [
            "retry:",
            "retry:0",
            "retry:-3",
            "retry:x",
            "a:7",
            "retry:7:1",
        ] {
            assert_eq!(parse_retry(bad), None, "{bad}");
        }
    }
}
