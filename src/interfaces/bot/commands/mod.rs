//! Chat commands. Each handler checks the role it needs, validates its arguments with
//! the same parsers as the CLI, calls the library, and answers through the outbox.

use std::sync::Arc;

use teloxide::prelude::*;
use teloxide::utils::command::{BotCommands, ParseError};

use super::access::{self, Pace};
use super::{BotState, HandlerResult};
use crate::approvals::{self, Decision};
use crate::error::{OpsError, OpsResult};
use crate::events::sources;
use crate::input::{parse_id, parse_params, parse_telegram_id};
use crate::notify::{self, cut, escape, render};
use crate::proposals::{self, NewProposal, ProposalStatus, Source};
use crate::users::{self, Role, User};
use crate::{gates, missions, status};

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
    #[command(description = "ID ROLE — give someone a role (admin)")]
    Grant(String),
    #[command(description = "ID — remove someone (admin)")]
    Revoke(String),
    #[command(description = "people and roles (admin)")]
    Users,
}

impl Command {
    /// The least role that may use the command.
    fn needs(&self) -> Role {
        match self {
            Command::Propose(_) | Command::Cancel(_) => Role::Operator,
            Command::Approve(_) | Command::Reject(_) => Role::Approver,
            Command::Pause
            | Command::Resume(_)
            | Command::Grant(_)
            | Command::Revoke(_)
            | Command::Users => Role::Admin,
            _ => Role::Viewer,
        }
    }
}

pub async fn on_message(msg: Message, state: Arc<BotState>) -> HandlerResult {
    let (Some(from), Some(text)) = (msg.from.as_ref(), msg.text()) else {
        return Ok(());
    };
    if from.is_bot {
        return Ok(());
    }
    let chat = msg.chat.id.0;
    let private = msg.chat.is_private();
    let user = access::seen(&state.pool, from, private).await?;
    let id = from.id.0 as i64;
    let parsed = match Command::parse(text, &state.username) {
        // `/cmd@otherbot` in a group is not for us.
        Err(ParseError::WrongBotName(_)) => return Ok(()),
        Err(_) if !private && !addressed_to_us(text, &state.username) => return Ok(()),
        parsed => parsed,
    };
    // A stranger learns their id, at most once per window; the rest is dropped unqueued,
    // so a flood cannot fill the outbox ahead of everyone's messages.
    let Some(user) = user else {
        if state.limits.stranger(id) {
            return reply(&state, chat, &access::not_authorized(id)).await;
        }
        return Ok(());
    };
    // Every message counts against the user's limit, those not understood too.
    match state.limits.command(id) {
        Pace::Ok => {}
        Pace::Ignore => return Ok(()),
        Pace::TellToSlowDown => return reply(&state, chat, super::SLOW_DOWN).await,
    }
    let command = match parsed {
        Ok(command) => command,
        Err(error) => return reply(&state, chat, &misunderstood(text, error)).await,
    };
    let answer = match access::refuse(Some(&user), id, command.needs()) {
        Some(refusal) => refusal,
        None => match handle(&state, &user, from, private, command).await {
            Ok(text) => text,
            Err(OpsError::BadInput(m) | OpsError::Refused(m)) => {
                format!("⚠️ {}", escape(&cut(&m, 1500)))
            }
            Err(e) => {
                tracing::error!(error = %e, "bot command failed");
                "⚠️ Something went wrong on my side; try again in a moment.".to_string()
            }
        },
    };
    reply(&state, chat, &answer).await
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

/// Queue an answer; one too long for a Telegram message goes as several.
async fn reply(state: &BotState, chat: i64, text: &str) -> HandlerResult {
    let mut conn = state.pool.acquire().await?;
    notify::enqueue_text(&mut conn, chat, text).await?;
    Ok(())
}

async fn handle(
    state: &BotState,
    user: &User,
    from: &teloxide::types::User,
    private: bool,
    command: Command,
) -> OpsResult<String> {
    let pool = &state.pool;
    let me = access::actor(from);
    Ok(match command {
        Command::Start => format!(
            "👋 Hi {}! You are <b>{}</b>. /help lists what you can do.{}",
            escape(&access::display_name(from)),
            escape(&user.role),
            if private {
                ""
            } else {
                "\nTo get messages from me, send me /start in a private chat."
            }
        ),
        Command::Help => escape(&Command::descriptions().to_string()),
        Command::Propose(args) => propose(state, from.id.0 as i64, &me, &args).await?,
        Command::Approve(args) => decide(state, &me, &args, Decision::Approve).await?,
        Command::Reject(args) => decide(state, &me, &args, Decision::Reject).await?,
        Command::Pending => {
            let pending = proposals::pending(pool).await?;
            if pending.is_empty() {
                "Nothing is waiting for a decision.".to_string()
            } else {
                let lines: Vec<String> = pending
                    .iter()
                    .take(20)
                    .map(|p| {
                        format!(
                            "• proposal #{} {} ({} risk) by {}: {}/{} — /approve {}",
                            p.id,
                            escape(&p.template),
                            escape(&p.risk),
                            escape(&p.proposed_by),
                            p.approvals,
                            p.approvals_needed,
                            p.id
                        )
                    })
                    .collect();
                format!("⏳ <b>Waiting for a decision</b>\n{}", lines.join("\n"))
            }
        }
        Command::Status => {
            let s = status::status(pool).await?;
            let counts = |m: &std::collections::BTreeMap<String, i64>| {
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
                if parts.is_empty() {
                    "none".into()
                } else {
                    parts.join(", ")
                }
            };
            format!(
                "<b>opsloop</b> {}\nproposals: {}\nmissions: {}\nsteps: {}\ndead letters: {}\nworkers: {}\npending approvals: {}",
                if s.paused {
                    "⏸ paused"
                } else {
                    "▶️ running"
                },
                counts(&s.proposals),
                counts(&s.missions),
                counts(&s.steps),
                s.dead_letters,
                s.workers.len(),
                s.pending_approvals.len()
            )
        }
        Command::Missions => {
            let list = missions::list(pool, None, 10).await?;
            if list.is_empty() {
                "No missions yet.".to_string()
            } else {
                list.iter()
                    .map(|m| {
                        format!(
                            "• mission #{} {} — {} ({}/{} steps)",
                            m.id,
                            escape(&m.template),
                            m.status,
                            m.steps_done,
                            m.steps_total
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
        Command::Mission(args) => {
            render::mission(pool, parse_id(first(&args, "mission")?, "mission")?)
                .await?
                .text
        }
        Command::Cancel(args) => {
            let id = parse_id(first(&args, "mission")?, "mission")?;
            missions::cancel(pool, id, &me, sources::TELEGRAM).await?;
            format!("⏹ mission #{id} cancelled")
        }
        Command::Templates => templates(state).await,
        Command::Subscribe | Command::Unsubscribe => {
            let on = matches!(command, Command::Subscribe);
            users::set_subscribed(pool, user.telegram_id, on).await?;
            match (on, user.started || private) {
                (true, true) => {
                    "🔔 Subscribed: mission notifications will come to your private chat.".into()
                }
                (true, false) => {
                    "🔔 Subscribed. Send me /start in a private chat so I can write to you.".into()
                }
                (false, _) => "🔕 Unsubscribed.".into(),
            }
        }
        Command::Whoami => format!(
            "{} — id <code>{}</code>, role <b>{}</b>{}",
            escape(&access::display_name(from)),
            user.telegram_id,
            escape(&user.role),
            if user.subscribed { ", subscribed" } else { "" }
        ),
        Command::Pause => {
            let mut conn = pool.acquire().await?;
            if gates::set_paused(&mut conn, true, &me).await? {
                "⏸ Paused: triggers, reactions and step claims stop; running steps finish.".into()
            } else {
                "Already paused.".into()
            }
        }
        Command::Resume(args) => {
            let mut conn = pool.acquire().await?;
            match args.split_whitespace().next() {
                None => {
                    if gates::set_paused(&mut conn, false, &me).await? {
                        "▶️ Resumed.".into()
                    } else {
                        "Not paused.".into()
                    }
                }
                Some(template) if gates::resume_template(&mut conn, template).await? => {
                    format!("▶️ Template {} resumed.", escape(template))
                }
                Some(template) => format!("Template {} is not paused.", escape(&cut(template, 64))),
            }
        }
        Command::Grant(args) => {
            let mut words = args.split_whitespace();
            let (Some(id), Some(role)) = (words.next(), words.next()) else {
                return Err(OpsError::bad_input(
                    "usage: /grant TELEGRAM_ID ROLE (viewer, operator, approver, admin)",
                ));
            };
            let id = parse_telegram_id(id)?;
            let role: Role = role.parse()?;
            users::grant(pool, id, role, Source::Telegram, &me).await?;
            let started = users::get(pool, id).await?.is_some_and(|u| u.started);
            format!(
                "✅ {id} is now {role}.{}",
                if started {
                    ""
                } else {
                    " They should send me /start in a private chat so I can write to them."
                }
            )
        }
        Command::Revoke(args) => {
            let id = parse_telegram_id(first(&args, "user")?)?;
            users::revoke(pool, id, Source::Telegram, &me).await?;
            format!("✅ {id} revoked.")
        }
        Command::Users => {
            let list = users::list(pool).await?;
            list.iter()
                .map(|u| {
                    format!(
                        "• <code>{}</code> {} — {}{}",
                        u.telegram_id,
                        escape(u.name.as_deref().unwrap_or("?")),
                        u.role,
                        if u.subscribed { " 🔔" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
    })
}

fn first<'a>(args: &'a str, what: &str) -> OpsResult<&'a str> {
    args.split_whitespace()
        .next()
        .ok_or_else(|| OpsError::bad_input(format!("which {what}? Give its id, e.g. 12")))
}

async fn propose(state: &BotState, id: i64, me: &str, args: &str) -> OpsResult<String> {
    // Pick up a policy applied a moment ago.
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    let words: Vec<&str> = args.split_whitespace().collect();
    let Some((template, params)) = words.split_first() else {
        return Ok(format!(
            "Usage: /propose TEMPLATE key=value …\n{}",
            templates(state).await
        ));
    };
    let request = NewProposal {
        template: template.to_string(),
        params: parse_params(params)?,
        proposed_by: me.to_string(),
        source: Source::Telegram,
    };
    let checked = proposals::validate(&policy, &request).map(|_| ());
    if checked.is_ok() {
        match state.limits.proposal(id) {
            Pace::Ok => {}
            Pace::Ignore | Pace::TellToSlowDown => return Ok(super::SLOW_DOWN.to_string()),
        }
    }
    let proposed = match checked {
        Ok(()) => proposals::propose(&state.pool, &policy, request).await,
        Err(e) => Err(e),
    };
    let proposed = match proposed {
        Ok(p) => p,
        Err(OpsError::BadInput(message)) => {
            // Show how to call it right.
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

async fn decide(state: &BotState, me: &str, args: &str, decision: Decision) -> OpsResult<String> {
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
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    let decided = approvals::decide(
        &state.pool,
        &policy,
        id,
        me,
        decision,
        reason.as_deref(),
        sources::TELEGRAM,
    )
    .await?;
    Ok(escape(&decided.describe()))
}

async fn templates(state: &BotState) -> String {
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    if policy.templates.is_empty() {
        return "No templates: apply a policy first.".into();
    }
    policy
        .templates
        .values()
        .map(|t| {
            let params = t.params_help();
            format!(
                "• <b>{}</b> ({} risk){}{}",
                escape(t.name.as_str()),
                t.risk.as_str(),
                if t.description.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", escape(&t.description))
                },
                if params.is_empty() {
                    String::new()
                } else {
                    format!("\n    {}", escape(&params.join("\n    ")))
                }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
