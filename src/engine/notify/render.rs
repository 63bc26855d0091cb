//! What a notification says, rendered from the current state when it is sent (so a
//! burst of changes becomes one up-to-date message). HTML, every user-supplied string
//! escaped, under Telegram's 4096 characters.

use serde_json::Value;
use sqlx::PgPool;
use teloxide::types::{InlineKeyboardButton, InlineKeyboardMarkup};

use super::{budget_messages, cut, escape, pages};
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::vocab::{EventKind, QuestionStatus};
use crate::engine::proposals::{self, ProposalStatus};
use crate::engine::{missions, questions};

/// A message ready to send: text and, for open prompts, the buttons.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub buttons: Option<InlineKeyboardMarkup>,
    /// A new message asks for a reply (an open free-text question); edits cannot.
    pub force_reply: bool,
}

impl Rendered {
    fn text(text: String) -> Rendered {
        Rendered {
            text: fit(&text),
            buttons: None,
            force_reply: false,
        }
    }
}

/// What a message too long for Telegram ends with, after its cut.
pub const CUT_NOTE: &str = "… (cut: too long for one Telegram message)";

/// Keep a rendered message within Telegram's limit (cut at a line, tags kept balanced).
pub fn fit(text: &str) -> String {
    pages::fit(text, CUT_NOTE)
}

/// Callback data of the prompt buttons: `a:ID` / `r:ID` (well within 64 bytes).
pub fn approve_data(id: i64) -> String {
    format!("a:{id}")
}
pub fn reject_data(id: i64) -> String {
    format!("r:{id}")
}
/// Callback data of a failure message's Retry button: `retry:MISSION_ID`.
pub fn retry_data(mission_id: i64) -> String {
    format!("retry:{mission_id}")
}

fn params_lines(params: &Value) -> String {
    match params.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| {
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                format!(
                    "{} = <code>{}</code>\n",
                    escape(&cut(k, 64)),
                    escape(&cut(&v, 300))
                )
            })
            .collect(),
        _ => String::new(),
    }
}

/// The approval prompt of a proposal, as it stands now.
pub async fn prompt(pool: &PgPool, proposal_id: i64) -> OpsResult<Rendered> {
    let p = proposals::get(pool, proposal_id).await?;
    let risk_mark = match p.risk.as_str() {
        "red" => "🔴",
        "high" => "🟠",
        _ => "🟢",
    };
    let mut text = format!(
        "{risk_mark} <b>proposal #{}</b> · {} · {} risk\n{}proposed by {}\n",
        p.id,
        escape(&p.template),
        escape(&p.risk),
        params_lines(&p.params),
        escape(&who(pool, &p.proposed_by).await)
    );
    let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default()
    };
    let open =
        p.status == ProposalStatus::Pending && p.expires_at.is_none_or(|e| e > chrono::Utc::now());
    // What will run, exactly, so approvers approve what runs.
    let plan = p.planned_steps();
    if !plan.is_empty() {
        text.push_str("plan:\n");
        for (i, step) in plan.iter().enumerate() {
            let what = step.spec.summary();
            text.push_str(&format!(
                "{}. {} · {}{}\n",
                i + 1,
                escape(&cut(&step.name, 64)),
                step.spec.kind(),
                if what.is_empty() {
                    String::new()
                } else {
                    format!(": <code>{}</code>", escape(&cut(&what, 300)))
                }
            ));
        }
    }
    if open && let Some(e) = p.expires_at {
        text.push_str(&format!("expires {}\n", when(Some(e))));
    }
    match p.status {
        ProposalStatus::Approved => {
            text.push_str(&format!(
                "\n✅ <b>approved</b> by {} at {}",
                escape(&people(pool, &p.approvers).await),
                when(p.decided_at)
            ));
            if let Some(m) = p.mission_id {
                text.push_str(&format!(" → mission #{m}"));
            }
        }
        ProposalStatus::Rejected => text.push_str(&format!(
            "\n❌ <b>rejected</b> by {} at {}{}",
            escape(&who(pool, p.decided_by.as_deref().unwrap_or("?")).await),
            when(p.decided_at),
            p.reason
                .as_deref()
                .map(|r| format!(": {}", escape(&cut(r, 500))))
                .unwrap_or_default()
        )),
        ProposalStatus::Expired => {
            text.push_str(&format!("\n⌛ <b>expired</b> at {}", when(p.decided_at)))
        }
        _ if !open => text.push_str("\n⌛ <b>expired</b>"),
        _ => {
            text.push_str(&format!(
                "\n{}/{} approvals",
                p.approvals, p.approvals_needed
            ));
            if !p.approvers.is_empty() {
                text.push_str(&format!(" ({})", escape(&people(pool, &p.approvers).await)));
            }
        }
    }
    let buttons = open.then(|| {
        InlineKeyboardMarkup::new([[
            InlineKeyboardButton::callback("✅ Approve", approve_data(p.id)),
            InlineKeyboardButton::callback("❌ Reject", reject_data(p.id)),
        ]])
    });
    Ok(Rendered {
        text: fit(&text),
        buttons,
        force_reply: false,
    })
}

/// Callback data of a question's button: `q:ID:N`, the choice's index (within 64 bytes
/// whatever the choice's text).
pub fn answer_data(id: i64, choice: usize) -> String {
    format!("q:{id}:{choice}")
}

/// A question, as it stands now: open with its buttons (or asking for a reply), or its
/// outcome.
pub async fn question(pool: &PgPool, id: i64) -> OpsResult<Rendered> {
    let q = questions::get(pool, id).await?;
    let mut text = format!("❓ <b>question #{}</b>", q.id);
    if let Some(m) = q.mission_id {
        let template: Option<String> =
            sqlx::query_scalar("SELECT template FROM ops_missions WHERE id = $1")
                .bind(m)
                .fetch_optional(pool)
                .await?;
        text.push_str(&format!(
            " · mission #{m}{}",
            template
                .map(|t| format!(" ({})", escape(&t)))
                .unwrap_or_default()
        ));
    }
    text.push_str(&format!(
        "
{}
",
        escape(&cut(&q.question, 1500))
    ));
    let choices = q.choice_list();
    let when = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M UTC").to_string();
    let open = q.status == QuestionStatus::Open;
    match q.status {
        QuestionStatus::Open => {
            if choices.is_empty() {
                text.push_str(
                    "
↩️ Reply to this message with your answer",
                );
                if let Some(h) = &q.help {
                    text.push_str(&format!(" ({})", escape(&cut(h, 300))));
                }
                text.push_str(&format!(", or send /answer {} TEXT.", q.id));
            }
            if let Some(e) = q.expires_at {
                let then = match &q.default_answer {
                    Some(d) => format!("the answer is {}", escape(&cut(d, 64))),
                    None => "it expires".to_string(),
                };
                text.push_str(&format!(
                    "
⏳ at {} {then}",
                    when(e)
                ));
            }
        }
        QuestionStatus::Answered => text.push_str(&format!(
            "
✅ <b>{}</b> — answered by {} at {}",
            escape(&cut(q.answer.as_deref().unwrap_or(""), 500)),
            escape(&who(pool, q.answered_by.as_deref().unwrap_or("?")).await),
            q.answered_at.map(when).unwrap_or_default()
        )),
        QuestionStatus::Expired => text.push_str(&format!(
            "
⌛ <b>expired</b> without an answer at {}",
            q.answered_at.map(when).unwrap_or_default()
        )),
        QuestionStatus::Cancelled => text.push_str(&format!(
            "
⏹ <b>cancelled</b> at {}",
            q.answered_at.map(when).unwrap_or_default()
        )),
    }
    let buttons = (open && !choices.is_empty()).then(|| {
        InlineKeyboardMarkup::new(choices.iter().enumerate().map(|(i, c)| {
            [InlineKeyboardButton::callback(
                cut(c, 64),
                answer_data(q.id, i),
            )]
        }))
    });
    Ok(Rendered {
        text: fit(&text),
        buttons,
        force_reply: open && choices.is_empty(),
    })
}

/// The card of a mission, as it stands now.
pub async fn mission(pool: &PgPool, mission_id: i64) -> OpsResult<Rendered> {
    let v = missions::get(pool, mission_id).await?;
    let m = &v.mission;
    let mark = match m.status.as_str() {
        "succeeded" => "✅",
        "failed" => "❌",
        "cancelled" => "⏹",
        _ => "▶️",
    };
    let mut text = format!(
        "{mark} <b>mission #{}</b> · {} · {}\n{}",
        m.id,
        escape(&m.template),
        m.status,
        params_lines(&v.params)
    );
    for s in &v.steps {
        let icon = match s.status.as_str() {
            "succeeded" => "✅",
            "failed" => "❌",
            "running" => "⏳",
            "queued" => "🔁",
            "cancelled" => "⏹",
            "asking" => "❓",
            "skipped" => "⏭",
            _ => "▫️",
        };
        text.push_str(&format!("{icon} {}", escape(&s.name)));
        if s.attempts > 1
            || (s.status == crate::domain::vocab::StepStatus::Queued && s.attempts > 0)
        {
            text.push_str(&format!(" (attempt {}/{})", s.attempts, s.max_attempts));
        }
        // How long its last attempt took, once it ended.
        if let (Some(start), Some(end)) = (s.started_at, s.finished_at)
            && let Ok(took) = (end - start).to_std()
        {
            text.push_str(&format!(" · {}", took_text(took)));
        }
        if s.status == crate::domain::vocab::StepStatus::Running
            && let Some(p) = &s.progress
        {
            text.push_str(&format!(
                " · {}% {}",
                p.get("percent").and_then(Value::as_u64).unwrap_or(0),
                escape(&cut(
                    p.get("text").and_then(Value::as_str).unwrap_or(""),
                    200
                ))
            ));
        }
        // A short output is worth a glance; a long one is in `mission ID`.
        if let Some(o) = s.output.as_ref().and_then(Value::as_object)
            && !o.is_empty()
        {
            let shown = serde_json::to_string(o).unwrap_or_default();
            if shown.chars().count() <= 200 {
                text.push_str(&format!(" → <code>{}</code>", escape(&shown)));
            }
        }
        text.push('\n');
    }
    if let Some(e) = &m.error {
        text.push_str(&format!("\n{}", escape(&cut(e, 1000))));
    }
    Ok(Rendered::text(text))
}

/// A standalone message about one event.
pub async fn event(pool: &PgPool, event_id: i64) -> OpsResult<Rendered> {
    let e: (String, Option<i64>, Value) =
        sqlx::query_as("SELECT kind, mission_id, payload FROM ops_agent_events WHERE id = $1")
            .bind(event_id)
            .fetch_optional(pool)
            .await?
            .ok_or_else(|| OpsError::bad_input(format!("there is no event #{event_id}")))?;
    let (kind, mission, payload) = e;
    let s = |key: &str| {
        payload
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let text = match kind.parse::<EventKind>() {
        Ok(EventKind::MissionFailed) => {
            return failure(pool, mission.unwrap_or(0), &payload).await;
        }
        Ok(EventKind::MissionRetried) => format!(
            "🔁 <b>mission #{}</b> ({}) retried by {} from step {} (attempt {})",
            mission.unwrap_or(0),
            escape(&s("template")),
            escape(&who(pool, &s("by")).await),
            escape(&s("step")),
            payload.get("attempt").and_then(Value::as_i64).unwrap_or(0)
        ),
        Ok(EventKind::SystemKilled) => {
            let ids: Vec<String> = payload
                .get("missions")
                .and_then(Value::as_array)
                .map(|ids| {
                    ids.iter()
                        .filter_map(Value::as_i64)
                        .map(|m| format!("#{m}"))
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "🛑 <b>kill switch</b> by {}: {} running mission{} cancelled{}; opsloop is paused until /resume.{}",
                escape(&who(pool, &s("by")).await),
                ids.len(),
                if ids.len() == 1 { "" } else { "s" },
                if ids.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", cut(&ids.join(", "), 1000))
                },
                payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .map(|r| format!("\nreason: {}", escape(&cut(r, 500))))
                    .unwrap_or_default()
            )
        }
        Ok(EventKind::TemplatePaused) => format!(
            "⏸ template <b>{}</b> is paused after {} failed missions in a row. An admin can /resume {}",
            escape(&s("template")),
            payload.get("failures").and_then(Value::as_i64).unwrap_or(0),
            escape(&s("template"))
        ),
        Ok(
            kind
            @ (EventKind::BudgetWarning | EventKind::BudgetExhausted | EventKind::BudgetRaised),
        ) => return budget_messages::render(pool, kind, &payload).await,
        Ok(EventKind::SystemPaused) => format!("⏸ opsloop paused by {}", escape(&s("by"))),
        Ok(EventKind::SystemResumed) => format!("▶️ opsloop resumed by {}", escape(&s("by"))),
        _ => format!(
            "🔔 <b>{}</b>{}\n<code>{}</code>",
            escape(&kind),
            mission
                .map(|m| format!(" · mission #{m}"))
                .unwrap_or_default(),
            escape(&cut(&payload.to_string(), 1500))
        ),
    };
    Ok(Rendered::text(text))
}

/// A mission's failure message: the step, its attempts, the last error and the tail of
/// its stderr, with a Retry button until someone retried it (then who and when).
async fn failure(pool: &PgPool, mission: i64, payload: &Value) -> OpsResult<Rendered> {
    let s = |key: &str| payload.get(key).and_then(Value::as_str).unwrap_or("");
    let attempts = payload.get("attempts").and_then(Value::as_i64);
    let mut text = format!(
        "❌ <b>mission #{mission}</b> ({}) failed at step <b>{}</b>{}: {}",
        escape(s("template")),
        escape(s("step")),
        match attempts {
            Some(1) => " after 1 attempt".to_string(),
            Some(n) => format!(" after {n} attempts"),
            None => String::new(),
        },
        escape(&cut(s("error"), 1000))
    );
    let stderr = s("stderr").trim_end();
    if !stderr.is_empty() {
        // The tail is what matters: cut from the front.
        let chars: Vec<char> = stderr.chars().collect();
        let tail: String = if chars.len() > STDERR_SHOWN {
            let kept: String = chars[chars.len() - STDERR_SHOWN..].iter().collect();
            format!("… {kept}")
        } else {
            stderr.to_string()
        };
        text.push_str(&format!("\nstderr:\n<pre>{}</pre>", escape(&tail)));
    }
    let step_id = payload.get("step_id").and_then(Value::as_i64);
    let retried = match (step_id, attempts) {
        (Some(step), Some(n)) => {
            crate::store::dead_letters::retried(pool, step, i32::try_from(n).unwrap_or(0)).await?
        }
        _ => None,
    };
    let buttons = match retried {
        Some((by, at)) => {
            text.push_str(&format!(
                "\n🔁 retried by {} at {}",
                escape(&who(pool, &by).await),
                at.format("%Y-%m-%d %H:%M UTC")
            ));
            None
        }
        None => Some(InlineKeyboardMarkup::new([[
            InlineKeyboardButton::callback("🔁 Retry", retry_data(mission)),
        ]])),
    };
    Ok(Rendered {
        text: fit(&text),
        buttons,
        force_reply: false,
    })
}

/// How much of the stderr tail a failure message shows (characters, before escaping).
const STDERR_SHOWN: usize = 1200;

/// A step's duration for people: `0.4s`, `12s`, `3m 05s`, `1h 02m`.
fn took_text(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..10 => format!("{:.1}s", d.as_secs_f64()),
        10..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// `tg:123` → `Ann (tg:123)` when we know the name; other actors as they are.
pub(super) async fn who(pool: &PgPool, actor: &str) -> String {
    let Some(id) = actor
        .strip_prefix("tg:")
        .and_then(|s| s.parse::<i64>().ok())
    else {
        return actor.to_string();
    };
    let name: Option<Option<String>> =
        sqlx::query_scalar("SELECT name FROM ops_users WHERE telegram_id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .ok()
            .flatten();
    match name.flatten() {
        Some(name) => format!("{} ({actor})", cut(&name, 64)),
        None => actor.to_string(),
    }
}

async fn people(pool: &PgPool, actors: &[String]) -> String {
    let mut names = Vec::with_capacity(actors.len());
    for a in actors {
        names.push(who(pool, a).await);
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        let d = std::time::Duration::from_millis;
        assert_eq!(took_text(d(420)), "0.4s");
        assert_eq!(took_text(d(12_300)), "12s");
        assert_eq!(took_text(d(185_000)), "3m 05s");
        assert_eq!(took_text(d(3_720_000)), "1h 02m");
        assert!(retry_data(i64::MAX).len() <= 64);
    }
}
