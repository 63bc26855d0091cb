//! What budget events say in Telegram (design §11): the warning, the exhaustion with its
//! **➕ Raise 50%** button (until someone raised it or the period ended), the raise.

use serde_json::Value;
use sqlx::PgPool;
use teloxide::types::{InlineKeyboardButton, InlineKeyboardMarkup};

use super::escape;
use super::render::{Rendered, fit, who};
use crate::domain::error::OpsResult;
use crate::domain::vocab::EventKind;

/// The message about a budget event `kind` with `payload`.
pub(super) async fn render(pool: &PgPool, kind: EventKind, payload: &Value) -> OpsResult<Rendered> {
    let s = |key: &str| {
        payload
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let text = match kind {
        EventKind::BudgetExhausted => return budget_exhausted(pool, payload).await,
        EventKind::BudgetWarning => format!(
            "⚠️ <b>budget {}</b> at its warning: spent {} of {} this {} (warn_at {})",
            escape(&s("budget")),
            escape(&s("spent")),
            escape(&s("limit")),
            escape(&s("period")),
            escape(&s("warn_at"))
        ),
        EventKind::BudgetRaised => format!(
            "➕ <b>budget {}</b> raised by {} by {}: limit now {} this {} (spent {})",
            escape(&s("budget")),
            escape(&who(pool, &s("by")).await),
            escape(&s("amount")),
            escape(&s("limit")),
            escape(&s("period")),
            escape(&s("spent"))
        ),
        _ => format!("🔔 <b>{}</b>", escape(kind.as_str())),
    };
    Ok(Rendered {
        text: fit(&text),
        buttons: None,
        force_reply: false,
    })
}

/// Callback data of an exhaustion message's Raise button: `bud:YYYYMMDD:RAISES:NAME`,
/// the period and the count of raises it was shown at (a name has at most 32 bytes, so
/// this stays within 64).
pub fn raise_data(starts: chrono::NaiveDate, raises: i32, budget: &str) -> String {
    format!("bud:{}:{raises}:{budget}", starts.format("%Y%m%d"))
}

/// A budget's exhaustion message: the **➕ Raise 50%** button while the budget stays as
/// it was (same period, no raise since), else who raised it, or that the period is over.
async fn budget_exhausted(pool: &PgPool, payload: &Value) -> OpsResult<Rendered> {
    let s = |key: &str| payload.get(key).and_then(Value::as_str).unwrap_or("");
    let mut text = format!(
        "🛑 <b>budget {}</b> is exhausted: spent {} of {} this {} (UTC, since {}). New proposals in its scope are refused; running missions finish.",
        escape(s("budget")),
        escape(s("spent")),
        escape(s("limit")),
        escape(s("period")),
        escape(s("starts"))
    );
    let raises = payload
        .get("raises")
        .and_then(Value::as_i64)
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(0);
    let starts = chrono::NaiveDate::parse_from_str(s("starts"), "%Y-%m-%d").ok();
    let row = match starts {
        Some(starts) => {
            let mut conn = pool.acquire().await?;
            crate::store::budgets::period_row(&mut conn, s("budget"), s("period"), starts).await?
        }
        None => None,
    };
    let buttons = match (starts, row) {
        (Some(starts), Some((now, _, _, true))) if now == raises => {
            Some(InlineKeyboardMarkup::new([[
                InlineKeyboardButton::callback(
                    "➕ Raise 50%",
                    raise_data(starts, raises, s("budget")),
                ),
            ]]))
        }
        (_, Some((now, Some(by), at, _))) if now > raises => {
            text.push_str(&format!(
                "\n➕ raised by {}{}",
                escape(&who(pool, &by).await),
                at.map(|t| format!(" at {}", t.format("%Y-%m-%d %H:%M UTC")))
                    .unwrap_or_default()
            ));
            None
        }
        _ => {
            text.push_str("\n⌛ that period is over");
            None
        }
    };
    Ok(Rendered {
        text: fit(&text),
        buttons,
        force_reply: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_data_fits_in_64_bytes() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 2).unwrap_or_default();
        assert!(raise_data(day, i32::MAX, &"b".repeat(32)).len() <= 64);
    }
}
