//! Admins pause and resume the loop and manage people.

use std::sync::Arc;

use super::{Caller, first};
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::input::parse_telegram_id;
use crate::domain::vocab::Source;
use crate::engine::gates;
use crate::engine::missions::controls;
use crate::engine::notify::{cut, escape};
use crate::interfaces::bot::BotState;
use crate::store::users::{self, Role};

/// `/pause`: triggers, reactions and step claims stop; running steps finish.
pub async fn pause(state: Arc<BotState>, caller: Caller) -> OpsResult<String> {
    let mut conn = state.pool.acquire().await?;
    Ok(
        if gates::set_paused(&mut conn, true, Source::Telegram, &caller.actor()).await? {
            "⏸ Paused: triggers, reactions and step claims stop; running steps finish.".into()
        } else {
            "Already paused.".into()
        },
    )
}

/// `/resume`, or `/resume TEMPLATE` to lift a template's pause after failures.
pub async fn resume(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    let mut conn = state.pool.acquire().await?;
    Ok(match args.split_whitespace().next() {
        None => {
            if gates::set_paused(&mut conn, false, Source::Telegram, &caller.actor()).await? {
                "▶️ Resumed.".into()
            } else {
                "Not paused.".into()
            }
        }
        Some(template)
            if gates::resume_template(&mut conn, template, Source::Telegram, &caller.actor())
                .await? =>
        {
            format!("▶️ Template {} resumed.", escape(template))
        }
        Some(template) => format!("Template {} is not paused.", escape(&cut(template, 64))),
    })
}

/// `/kill [reason]`: the kill switch. Pause, and every running mission cancelled now
/// (their processes killed); admins are told by the `system.killed` event.
pub async fn kill(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    let reason = args.trim();
    let reason = (!reason.is_empty()).then(|| cut(reason, 1000));
    let killed = controls::kill(
        &state.pool,
        &caller.actor(),
        Source::Telegram,
        reason.as_deref(),
    )
    .await?;
    let n = killed.missions.len();
    Ok(format!(
        "🛑 Killed: paused, {n} running mission{} cancelled. /resume lifts the pause; killed missions can be retried.",
        if n == 1 { "" } else { "s" }
    ))
}

/// `/grant TELEGRAM_ID ROLE`.
pub async fn grant(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    let mut words = args.split_whitespace();
    let (Some(id), Some(role)) = (words.next(), words.next()) else {
        return Err(OpsError::bad_input(
            "usage: /grant TELEGRAM_ID ROLE (viewer, operator, approver, admin)",
        ));
    };
    let id = parse_telegram_id(id)?;
    let role: Role = role.parse()?;
    users::grant(&state.pool, id, role, Source::Telegram, &caller.actor()).await?;
    let started = users::get(&state.pool, id)
        .await?
        .is_some_and(|u| u.started);
    Ok(format!(
        "✅ {id} is now {role}.{}",
        if started {
            ""
        } else {
            " They should send me /start in a private chat so I can write to them."
        }
    ))
}

/// `/revoke TELEGRAM_ID`.
pub async fn revoke(state: Arc<BotState>, caller: Caller, args: String) -> OpsResult<String> {
    let id = parse_telegram_id(first(&args, "user")?)?;
    users::revoke(&state.pool, id, Source::Telegram, &caller.actor()).await?;
    Ok(format!("✅ {id} revoked."))
}

/// `/users`: everyone with a role.
pub async fn users(state: Arc<BotState>, _: Caller) -> OpsResult<String> {
    let list = users::list(&state.pool).await?;
    Ok(list
        .iter()
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
        .join("\n"))
}
