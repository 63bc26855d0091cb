//! Chat commands. The message branch of the handler tree admits a message (a known
//! user, within their rate limit, with a command we understood), checks the role the
//! command needs ([`Command::required_role`]), and routes each command to one plain
//! async function that validates its arguments with the same parsers as the CLI,
//! calls the library, and returns its answer. The answer, or what went wrong, is
//! replied through the outbox by [`answer`].

mod admin;
mod approver;
mod operator;
mod viewer;

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use teloxide::dispatching::UpdateHandler;
use teloxide::dptree::case;
use teloxide::prelude::*;
use teloxide::types::User as TgUser;
use teloxide::utils::command::{BotCommands, ParseError};

use super::access::{self, Pace};
use super::{BotState, HandlerResult, SLOW_DOWN};
use crate::domain::error::{OpsError, OpsResult};
use crate::engine::notify::{self, cut, escape};
use crate::store::users::{Role, User};

#[derive(BotCommands, Clone, Debug, PartialEq)]
#[command(rename_rule = "lowercase", description = "opsloop commands:")]
pub enum Command {
    #[command(description = "start talking to opsloop")]
    Start,
    #[command(description = "this list")]
    Help,
    #[command(description = "TEMPLATE key=value … — propose work")]
    Propose(String),
    #[command(description = "ID — approve proposal #ID")]
    Approve(String),
    #[command(description = "ID [reason] — reject proposal #ID")]
    Reject(String),
    #[command(description = "proposals waiting for a decision")]
    Pending,
    #[command(description = "the loop at a glance")]
    Status,
    #[command(description = "recent missions")]
    Missions,
    #[command(description = "ID — one mission and its steps")]
    Mission(String),
    #[command(description = "ID — cancel mission #ID")]
    Cancel(String),
    #[command(description = "ID text — answer question #ID")]
    Answer(String),
    #[command(description = "ID — run failed or cancelled mission #ID again from where it stopped")]
    Retry(String),
    #[command(description = "what can be proposed")]
    Templates,
    #[command(description = "mission notifications in your private chat")]
    Subscribe,
    #[command(description = "no more mission notifications")]
    Unsubscribe,
    #[command(description = "your id and role")]
    Whoami,
    #[command(description = "stop triggers, reactions and step claims (admin)")]
    Pause,
    #[command(description = "[TEMPLATE] — resume, or lift a template's pause (admin)")]
    Resume(String),
    #[command(description = "[reason] — pause and cancel every running mission now (admin)")]
    Kill(String),
    #[command(description = "budgets: spent, limit and status this period")]
    Budgets,
    #[command(description = "ID ROLE — give someone a role (admin)")]
    Grant(String),
    #[command(description = "ID — remove someone (admin)")]
    Revoke(String),
    #[command(description = "people and roles (admin)")]
    Users,
}

impl Command {
    /// The least role that may use the command: the only role check of chat commands.
    pub fn required_role(&self) -> Role {
        match self {
            Command::Start
            | Command::Help
            | Command::Pending
            | Command::Status
            | Command::Missions
            | Command::Mission(_)
            | Command::Templates
            | Command::Budgets
            | Command::Subscribe
            | Command::Unsubscribe
            | Command::Whoami => Role::Viewer,
            // A retry of a high or red mission needs an approver: checked on its risk.
            Command::Propose(_) | Command::Cancel(_) | Command::Answer(_) | Command::Retry(_) => {
                Role::Operator
            }
            Command::Approve(_) | Command::Reject(_) => Role::Approver,
            Command::Pause
            | Command::Resume(_)
            | Command::Kill(_)
            | Command::Grant(_)
            | Command::Revoke(_)
            | Command::Users => Role::Admin,
        }
    }
}

/// A command admitted from someone we know: what every command function gets
/// besides the state.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Their row in `ops_telegram_users`.
    pub user: User,
    /// Who Telegram says they are.
    pub from: TgUser,
    pub chat: i64,
    pub private: bool,
    pub command: Command,
}

impl Caller {
    pub fn id(&self) -> i64 {
        self.from.id.0 as i64
    }

    /// Their name in proposals, approvals and events (`tg:ID`).
    pub fn actor(&self) -> String {
        access::actor(&self.from)
    }
}

/// The message branch: admit, check the role, then one function per command.
pub fn schema() -> UpdateHandler<anyhow::Error> {
    use Command as C;
    Update::filter_message()
        .filter_map_async(admit)
        .filter_async(allowed)
        .map(|caller: Caller| caller.command)
        .branch(case![C::Start].endpoint(answer(viewer::start)))
        .branch(case![C::Help].endpoint(answer(viewer::help)))
        .branch(case![C::Pending].endpoint(answer(viewer::pending)))
        .branch(case![C::Status].endpoint(answer(viewer::status)))
        .branch(case![C::Missions].endpoint(answer(viewer::missions)))
        .branch(case![C::Mission(args)].endpoint(answer_args(viewer::mission)))
        .branch(case![C::Templates].endpoint(answer(viewer::templates)))
        .branch(case![C::Subscribe].endpoint(answer(viewer::subscribe)))
        .branch(case![C::Unsubscribe].endpoint(answer(viewer::unsubscribe)))
        .branch(case![C::Whoami].endpoint(answer(viewer::whoami)))
        .branch(case![C::Propose(args)].endpoint(answer_args(operator::propose)))
        .branch(case![C::Cancel(args)].endpoint(answer_args(operator::cancel)))
        .branch(case![C::Answer(args)].endpoint(answer_args(operator::answer)))
        .branch(case![C::Retry(args)].endpoint(answer_args(operator::retry)))
        .branch(case![C::Approve(args)].endpoint(answer_args(approver::approve)))
        .branch(case![C::Reject(args)].endpoint(answer_args(approver::reject)))
        .branch(case![C::Pause].endpoint(answer(admin::pause)))
        .branch(case![C::Resume(args)].endpoint(answer_args(admin::resume)))
        .branch(case![C::Kill(args)].endpoint(answer_args(admin::kill)))
        .branch(case![C::Budgets].endpoint(answer(viewer::budgets)))
        .branch(case![C::Grant(args)].endpoint(answer_args(admin::grant)))
        .branch(case![C::Revoke(args)].endpoint(answer_args(admin::revoke)))
        .branch(case![C::Users].endpoint(answer(admin::users)))
}

/// Whom we answer, and with what. Strangers learn their id, at most once per window;
/// what they send meanwhile, and a flood from anyone, is dropped unqueued, so it cannot
/// fill the outbox ahead of everyone's messages. Every message counts against the
/// user's limit, those not understood too; text we do not understand is answered.
async fn admit(msg: Message, state: Arc<BotState>) -> Option<Caller> {
    match admitted(&msg, &state).await {
        Ok(caller) => caller,
        Err(e) => {
            tracing::error!(error = %e, "bot: cannot handle a message");
            None
        }
    }
}

async fn admitted(msg: &Message, state: &BotState) -> anyhow::Result<Option<Caller>> {
    let (Some(from), Some(text)) = (msg.from.as_ref(), msg.text()) else {
        return Ok(None);
    };
    if from.is_bot {
        return Ok(None);
    }
    let chat = msg.chat.id.0;
    let private = msg.chat.is_private();
    let user = access::seen(&state.pool, from, private).await?;
    let id = from.id.0 as i64;
    let parsed = match Command::parse(text, &state.username) {
        // `/cmd@otherbot` in a group is not for us.
        Err(ParseError::WrongBotName(_)) => return Ok(None),
        Err(_) if !private && !addressed_to_us(text, &state.username) => return Ok(None),
        parsed => parsed,
    };
    let Some(user) = user else {
        if state.limits.stranger(id) {
            reply(state, chat, &access::not_authorized(id)).await?;
        }
        return Ok(None);
    };
    match state.limits.command(id) {
        Pace::Ok => {}
        Pace::Ignore => return Ok(None),
        Pace::TellToSlowDown => {
            reply(state, chat, SLOW_DOWN).await?;
            return Ok(None);
        }
    }
    let command = match parsed {
        Ok(command) => command,
        // A reply to one of our questions is its answer.
        Err(_) if let Some(question) = replied_question(state, msg).await? => {
            Command::Answer(format!("{question} {text}"))
        }
        Err(error) => {
            reply(state, chat, &misunderstood(text, error)).await?;
            return Ok(None);
        }
    };
    Ok(Some(Caller {
        user,
        from: from.clone(),
        chat,
        private,
        command,
    }))
}

/// The question a message replies to, when it replies to one of our question messages.
async fn replied_question(state: &BotState, msg: &Message) -> anyhow::Result<Option<i64>> {
    let Some(replied) = msg.reply_to_message() else {
        return Ok(None);
    };
    if !replied.from.as_ref().is_some_and(|f| f.is_bot) {
        return Ok(None);
    }
    Ok(notify::question_of_message(&state.pool, msg.chat.id.0, replied.id.0).await?)
}

/// The role check: a caller below the command's role is told which role it needs.
async fn allowed(caller: Caller, state: Arc<BotState>) -> bool {
    let needed = caller.command.required_role();
    let Some(refusal) = access::refuse(Some(&caller.user), caller.id(), needed) else {
        return true;
    };
    if let Err(e) = reply(&state, caller.chat, &refusal).await {
        tracing::error!(error = %e, "bot: cannot queue a refusal");
    }
    false
}

fn addressed_to_us(text: &str, username: &str) -> bool {
    let first = text.split_whitespace().next().unwrap_or("");
    !username.is_empty()
        && first
            .to_lowercase()
            .ends_with(&format!("@{}", username.to_lowercase()))
}

fn misunderstood(text: &str, error: ParseError) -> String {
    let word = text.split_whitespace().next().unwrap_or("");
    match error {
        ParseError::UnknownCommand(_) => format!(
            "🤔 I don't know {}. /help lists the commands.",
            escape(&cut(word, 64))
        ),
        _ if !text.starts_with('/') => "Send /help to see what I can do.".to_string(),
        _ => format!(
            "🤔 {} takes no arguments like that. /help shows how to use it.",
            escape(&cut(word, 64))
        ),
    }
}

/// A command function without arguments as an endpoint: its answer is replied.
fn answer<F, Fut>(
    command: F,
) -> impl Fn(Arc<BotState>, Caller) -> BoxFuture<'static, HandlerResult> + Send + Sync + 'static
where
    F: Fn(Arc<BotState>, Caller) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = OpsResult<String>> + Send + 'static,
{
    move |state, caller| {
        let chat = caller.chat;
        let answered = command(state.clone(), caller);
        Box::pin(async move {
            let slot = reserve(&state, chat).await;
            reply_in(&state, chat, slot, &said(answered.await)).await
        })
    }
}

/// A command function taking the text after the command, as an endpoint.
fn answer_args<F, Fut>(
    command: F,
) -> impl Fn(Arc<BotState>, Caller, String) -> BoxFuture<'static, HandlerResult> + Send + Sync + 'static
where
    F: Fn(Arc<BotState>, Caller, String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = OpsResult<String>> + Send + 'static,
{
    move |state, caller, args| {
        let chat = caller.chat;
        let answered = command(state.clone(), caller, args);
        Box::pin(async move {
            let slot = reserve(&state, chat).await;
            reply_in(&state, chat, slot, &said(answered.await)).await
        })
    }
}

/// What the caller is told: the answer, the reason their input was refused, or (with
/// the details only in the log) that something failed on our side.
fn said(answer: OpsResult<String>) -> String {
    match answer {
        Ok(text) => text,
        Err(OpsError::BadInput(m) | OpsError::Refused(m)) => {
            format!("⚠️ {}", escape(&cut(&m, 1500)))
        }
        Err(e) => {
            tracing::error!(error = %e, "bot command failed");
            "⚠️ Something went wrong on my side; try again in a moment.".to_string()
        }
    }
}

/// Queue an answer; one too long for a Telegram message goes as several.
async fn reply(state: &BotState, chat: i64, text: &str) -> HandlerResult {
    let mut conn = state.pool.acquire().await?;
    notify::enqueue_text(&mut conn, chat, text).await?;
    Ok(())
}

/// Before a command runs: hold the chat's place for its answer, so the answer comes
/// before whatever the command causes in this chat (a mission card, a prompt). None
/// when the database would not take it (the answer is then queued after).
async fn reserve(state: &BotState, chat: i64) -> Option<i64> {
    match notify::reserve_reply(&state.pool, chat).await {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(error = %e, "bot: cannot reserve a reply's place");
            None
        }
    }
}

/// Queue an answer in the place `slot` reserved for it.
async fn reply_in(state: &BotState, chat: i64, slot: Option<i64>, text: &str) -> HandlerResult {
    let Some(slot) = slot else {
        return reply(state, chat, text).await;
    };
    let mut conn = state.pool.acquire().await?;
    notify::fill_reply(&mut conn, slot, chat, text).await?;
    Ok(())
}

/// The first word of `args`: the id a command is about.
fn first<'a>(args: &'a str, what: &str) -> OpsResult<&'a str> {
    args.split_whitespace()
        .next()
        .ok_or_else(|| OpsError::bad_input(format!("which {what}? Give its id, e.g. 12")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_rise_with_what_a_command_changes() {
        let cases = [
            ("/whoami", Role::Viewer),
            ("/mission 3", Role::Viewer),
            ("/propose hello", Role::Operator),
            ("/cancel 3", Role::Operator),
            ("/retry 3", Role::Operator),
            ("/kill", Role::Admin),
            ("/kill runaway agent", Role::Admin),
            ("/approve 3", Role::Approver),
            ("/reject 3 no", Role::Approver),
            ("/pause", Role::Admin),
            ("/grant 1 viewer", Role::Admin),
            ("/users", Role::Admin),
        ];
        for (text, role) in cases {
            let command = Command::parse(text, "opsloop_bot").expect(text);
            assert_eq!(command.required_role(), role, "{text}");
        }
    }
}
