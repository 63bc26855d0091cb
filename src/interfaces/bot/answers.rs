//! Answers to questions from Telegram: a button per choice (`q:ID:N`), a reply to the
//! question's message, or `/answer ID text`. Who may answer: an operator or higher,
//! an approver or higher when the question is for approvers. Every way ends in
//! `questions::answer`, where the first valid answer wins.

use crate::domain::error::{OpsError, OpsResult};
use crate::domain::vocab::{Audience, Source};
use crate::engine::notify::escape;
use crate::engine::questions;
use crate::interfaces::bot::BotState;
use crate::store::users::{Role, User};

/// `q:12:0` → (question 12, choice 0). Anything else is refused.
pub fn parse_data(data: &str) -> Option<(i64, usize)> {
    if data.len() > 64 {
        return None;
    }
    let rest = data.strip_prefix("q:")?;
    let (id, choice) = rest.split_once(':')?;
    let id: i64 = id.parse().ok().filter(|id| *id > 0)?;
    if choice.is_empty() || choice.len() > 2 || !choice.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((id, choice.parse().ok()?))
}

/// Answer question `id` with `text` as `user` (`actor`, `tg:ID`). The answer says what
/// happened, or why nothing did.
pub async fn answer(
    state: &BotState,
    user: &User,
    actor: &str,
    id: i64,
    text: &str,
) -> OpsResult<String> {
    let q = questions::get(&state.pool, id).await?;
    let needed = if q.audience == Audience::Approvers {
        Role::Approver
    } else {
        Role::Operator
    };
    if user.role().is_none_or(|r| r < needed) {
        return Err(OpsError::refused(format!(
            "Not allowed: answering question #{id} needs the {needed} role; you are {}.",
            user.role
        )));
    }
    let answered = questions::answer(&state.pool, id, text, actor, Source::Telegram).await?;
    Ok(format!(
        "✅ question #{} answered: <b>{}</b>",
        answered.id,
        escape(&answered.answer)
    ))
}

/// The choice a button stands for.
pub async fn choice(state: &BotState, id: i64, index: usize) -> OpsResult<String> {
    let q = questions::get(&state.pool, id).await?;
    q.choice_list()
        .get(index)
        .cloned()
        .ok_or_else(|| OpsError::bad_input("This button is not one of mine."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_buttons_are_strict() {
        assert_eq!(parse_data("q:12:0"), Some((12, 0)));
        assert_eq!(parse_data("q:1:19"), Some((1, 19)));
        for bad in [
            "q:", "q:1", "q:1:", "q:0:1", "q:-1:1", "q:1:x", "q:1:-1", "q:1:100", "a:1", "q:1:1:1",
        ] {
            assert_eq!(parse_data(bad), None, "{bad}");
        }
    }
}
