//! Notifications through a durable outbox (`ops_notifications`). Most rows are written
//! by the events trigger (migrations/0002_outbox.sql) in the event's own transaction;
//! this module adds the rest (command replies, prompt refreshes) and renders and sends
//! them (`render`, `sender`).

pub mod render;
pub mod sender;

use serde_json::json;
use sqlx::PgConnection;

use crate::error::OpsResult;

/// Telegram's limit on a message's text.
pub const MAX_TEXT: usize = 4096;

/// Queue a new message with this (HTML) text for `chat_id`.
pub async fn enqueue_text(conn: &mut PgConnection, chat_id: i64, text: &str) -> OpsResult<()> {
    sqlx::query(
        "WITH n AS (
            INSERT INTO ops_notifications (chat_id, subject, action, body)
            VALUES ($1, 'reply', 'send', $2) RETURNING id)
         SELECT pg_notify('ops_outbox', '') FROM n",
    )
    .bind(chat_id)
    .bind(json!({ "text": text }))
    .execute(conn)
    .await?;
    Ok(())
}

/// Re-render every prompt of a proposal (a partial approval: `1/2 approvals`).
pub async fn refresh_prompts(conn: &mut PgConnection, proposal_id: i64) -> OpsResult<()> {
    sqlx::query(
        "WITH n AS (
            INSERT INTO ops_notifications (chat_id, subject, action)
            SELECT DISTINCT chat_id, subject, 'prompt' FROM ops_notifications
            WHERE subject = 'proposal:' || $1 AND action = 'prompt'
            RETURNING id)
         SELECT pg_notify('ops_outbox', '') FROM n LIMIT 1",
    )
    .bind(proposal_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Escape user-supplied text for Telegram's HTML parse mode.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Cut plain text to at most `max` characters, saying so. Cut before escaping, so an
/// entity is never split.
pub fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let kept: String = text.chars().take(max.saturating_sub(12)).collect();
    format!("{kept}… (cut)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html_and_cuts_long_text() {
        assert_eq!(escape("<b>&\"x\""), "&lt;b&gt;&amp;&quot;x&quot;");
        let long = "é".repeat(5000);
        let short = cut(&long, 100);
        assert!(short.chars().count() <= 100 && short.ends_with("(cut)"));
        assert_eq!(cut("short", 100), "short");
    }
}
