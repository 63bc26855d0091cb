//! Commands every known user may use: looking, and their own notifications.

use std::collections::BTreeMap;
use std::sync::Arc;

use teloxide::utils::command::BotCommands;

use super::{Caller, Command, first};
use crate::domain::error::OpsResult;
use crate::domain::input::parse_id;
use crate::engine::budgets as engine_budgets;
use crate::engine::notify::{escape, render};
use crate::engine::{missions, proposals, questions, status as summary};
use crate::interfaces::bot::BotState;
use crate::interfaces::bot::access;
use crate::store::outbox;
use crate::store::users;

pub async fn start(_: Arc<BotState>, caller: Caller) -> OpsResult<String> {
    Ok(format!(
        "👋 Hi {}! You are <b>{}</b>. /help lists what you can do.{}",
        escape(&access::display_name(&caller.from)),
        escape(&caller.user.role),
        if caller.private {
            ""
        } else {
            "\nTo get messages from me, send me /start in a private chat."
        }
    ))
}

pub async fn help(_: Arc<BotState>, _: Caller) -> OpsResult<String> {
    Ok(escape(&Command::descriptions().to_string()))
}

pub async fn pending(state: Arc<BotState>, caller: Caller) -> OpsResult<String> {
    let pending = proposals::pending(&state.pool).await?;
    let open = questions::open(&state.pool).await?;
    let asked = if open.is_empty() {
        String::new()
    } else {
        // Each open question follows as a message of its own, with its buttons.
        let ids: Vec<i64> = open.iter().take(10).map(|q| q.id).collect();
        let mut conn = state.pool.acquire().await?;
        outbox::enqueue_question_copies(&mut conn, caller.chat, &ids).await?;
        format!(
            "\n❓ {} open question{} (below, with {})",
            open.len(),
            if open.len() == 1 { "" } else { "s" },
            if open.len() > 10 {
                "the oldest 10"
            } else {
                "their buttons"
            }
        )
    };
    if pending.is_empty() {
        return Ok(format!("Nothing is waiting for a decision.{asked}"));
    }
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
    Ok(format!(
        "⏳ <b>Waiting for a decision</b>\n{}{asked}",
        lines.join("\n")
    ))
}

pub async fn status(state: Arc<BotState>, _: Caller) -> OpsResult<String> {
    let s = summary::status(&state.pool).await?;
    let counts = |m: &BTreeMap<String, i64>| {
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    };
    Ok(format!(
        "<b>opsloop</b> {}\nproposals: {}\nmissions: {}\nsteps: {}\ndead letters: {}\nworkers: {}\npending approvals: {}\nopen questions: {}",
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
        s.pending_approvals.len(),
        s.open_questions
    ))
}

/// `/budgets`: every budget's spent, limit and status this period.
pub async fn budgets(state: Arc<BotState>, _: Caller) -> OpsResult<String> {
    let _ = state.policy.refresh(&state.pool).await;
    let policy = state.policy.get().await;
    let views = engine_budgets::list(&state.pool, &policy).await?;
    if views.is_empty() {
        return Ok(
            "No budgets. An admin can add <code>[budgets.NAME]</code> to the policy.".into(),
        );
    }
    let lines: Vec<String> = views
        .iter()
        .map(|v| {
            let mark = match v.status {
                "exhausted" => "🛑",
                "warning" => "⚠️",
                _ => "🟢",
            };
            format!(
                "{mark} <b>{}</b> · {} of {} this {} · {}",
                escape(&v.name),
                escape(&v.spent),
                escape(&v.limit),
                escape(&v.period),
                v.status
            )
        })
        .collect();
    Ok(format!("<b>budgets</b>\n{}", lines.join("\n")))
}

pub async fn missions(state: Arc<BotState>, _: Caller) -> OpsResult<String> {
    let list = missions::list(&state.pool, None, 10).await?;
    if list.is_empty() {
        return Ok("No missions yet.".to_string());
    }
    Ok(list
        .iter()
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
        .join("\n"))
}

pub async fn mission(state: Arc<BotState>, _: Caller, args: String) -> OpsResult<String> {
    let id = parse_id(first(&args, "mission")?, "mission")?;
    Ok(render::mission(&state.pool, id).await?.text)
}

pub async fn templates(state: Arc<BotState>, _: Caller) -> OpsResult<String> {
    Ok(template_list(&state).await)
}

pub async fn subscribe(state: Arc<BotState>, caller: Caller) -> OpsResult<String> {
    users::set_subscribed(&state.pool, caller.user.telegram_id, true).await?;
    Ok(if caller.user.started || caller.private {
        "🔔 Subscribed: mission notifications will come to your private chat.".into()
    } else {
        "🔔 Subscribed. Send me /start in a private chat so I can write to you.".into()
    })
}

pub async fn unsubscribe(state: Arc<BotState>, caller: Caller) -> OpsResult<String> {
    users::set_subscribed(&state.pool, caller.user.telegram_id, false).await?;
    Ok("🔕 Unsubscribed.".into())
}

pub async fn whoami(_: Arc<BotState>, caller: Caller) -> OpsResult<String> {
    let user = &caller.user;
    Ok(format!(
        "{} — id <code>{}</code>, role <b>{}</b>{}",
        escape(&access::display_name(&caller.from)),
        user.telegram_id,
        escape(&user.role),
        if user.subscribed { ", subscribed" } else { "" }
    ))
}

/// The templates of the current policy with their params (also `/propose`'s usage).
pub(super) async fn template_list(state: &BotState) -> String {
    // Pick up a policy applied a moment ago.
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
