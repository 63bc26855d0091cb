//! Button taps on approval prompts. Callback data is `a:ID` or `r:ID`; everything in it
//! is checked again on every tap (role, state, self-approval) and every tap is answered
//! at once. The prompts themselves are edited through the outbox.

use std::sync::Arc;

use teloxide::prelude::*;

use super::{BotState, HandlerResult};
use super::{access, answers};
use crate::domain::error::OpsError;
use crate::domain::vocab::Source;
use crate::engine::approvals::{self, Decision};
use crate::engine::notify::{self, cut};

use crate::store::users::Role;

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

pub async fn on_tap(bot: Bot, q: CallbackQuery, state: Arc<BotState>) -> HandlerResult {
    let answer = match q.data.as_deref().and_then(answers::parse_data) {
        Some((question, choice)) => answer_question(&state, &q, question, choice).await,
        None => {
            adopt(&state, &q).await;
            decide(&state, &q).await
        }
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

/// A tap on a question's button: its choice is the answer.
async fn answer_question(state: &BotState, q: &CallbackQuery, id: i64, choice: usize) -> String {
    let user = match access::seen(&state.pool, &q.from, false).await {
        Ok(user) => user,
        Err(_) => return "Something went wrong; try again.".into(),
    };
    let Some(user) = user else {
        return format!("Not authorized. Your Telegram id is {}.", q.from.id.0);
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

async fn decide(state: &BotState, q: &CallbackQuery) -> String {
    let id = q.from.id.0 as i64;
    let user = match access::seen(&state.pool, &q.from, false).await {
        Ok(user) => user,
        Err(_) => return "Something went wrong; try again.".into(),
    };
    let Some(user) = user else {
        return format!("Not authorized. Your Telegram id is {id}.");
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
    }
}
