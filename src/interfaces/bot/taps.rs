//! Button taps: approval prompts (`a:ID`, `r:ID`), failure messages' Retry
//! (`retry:MISSION_ID`) and budget exhaustion messages' Raise (`bud:…`, admins only). Everything in the data is checked again on every tap (role,
//! state, self-approval) and every tap is answered at once. The messages themselves are
//! edited through the outbox.

use std::sync::Arc;

use teloxide::prelude::*;

use super::{BotState, HandlerResult};
use super::{access, answers};
use crate::domain::budgets;
use crate::domain::error::OpsError;
use crate::domain::vocab::Source;
use crate::engine::approvals::{self, Decision};
use crate::engine::budgets as engine_budgets;
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

/// `bud:20261202:0:writing` → (2026-12-02, 0, "writing"): the period and the count of
/// raises the message showed, and the budget. Anything else is None.
pub fn parse_raise(data: &str) -> Option<(chrono::NaiveDate, i32, &str)> {
    if data.len() > 64 {
        return None;
    }
    let mut parts = data.strip_prefix("bud:")?.splitn(3, ':');
    let day = parts.next().filter(|d| d.len() == 8)?;
    let starts = chrono::NaiveDate::parse_from_str(day, "%Y%m%d").ok()?;
    let raises = parts.next()?;
    let raises: i32 = raises
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| raises.parse().ok())
        .flatten()?;
    let name = parts.next().filter(|n| budgets::valid_name(n))?;
    Some((starts, raises, name))
}

pub async fn on_tap(bot: Bot, q: CallbackQuery, state: Arc<BotState>) -> HandlerResult {
    let data = q.data.as_deref().unwrap_or("");
    let answer = if let Some((question, choice)) = answers::parse_data(data) {
        answer_question(&state, &q, question, choice).await
    } else if let Some(mission) = parse_retry(data) {
        retry(&state, &q, mission).await
    } else if let Some((starts, raises, budget)) = parse_raise(data) {
        raise(&state, &q, starts, raises, budget).await
    } else if data.starts_with("bud:") {
        "This button is not one of mine.".into()
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

/// A **➕ Raise 50%** tap: admins only; raises the budget once however many tap.
async fn raise(
    state: &BotState,
    q: &CallbackQuery,
    starts: chrono::NaiveDate,
    raises: i32,
    budget: &str,
) -> String {
    let user = match tapper(state, q).await {
        Ok(user) => user,
        Err(refusal) => return refusal,
    };
    if user.role() != Some(Role::Admin) {
        return format!(
            "Not allowed: raising a budget needs the admin role; you are {}.",
            user.role
        );
    }
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    let by = access::actor(&q.from);
    match engine_budgets::raise_half(&state.pool, &policy, budget, starts, raises, &by).await {
        Ok(raised) => format!("Raised: {}.", raised.describe()),
        Err(OpsError::BadInput(m) | OpsError::Refused(m)) => m,
        Err(e) => {
            tracing::error!(error = %e, "raise tap failed");
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
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 2);
        assert_eq!(
            parse_raise("bud:20261202:3:writing"),
            day.map(|d| (d, 3, "writing"))
        );
        for bad in [
            "bud:",
            "bud:20261302:0:writing",
            "bud:2026122:0:writing",
            "bud:20261202:-1:writing",
            "bud:20261202:+1:writing",
            "bud:20261202:0:",
            "bud:20261202:0:Writing",
            "bud:20261202:0:a:b",
            "bud:20261202:99999999999:writing",
            "retry:7",
        ] {
            assert_eq!(parse_raise(bad), None, "{bad}");
        }
    }
}
