//! Notifications through a durable outbox (`ops_notifications`, owned by
//! `store::outbox`). Most rows are written by the events trigger
//! (migrations/0002_outbox.sql) in the event's own transaction; this module adds the
//! rest (command replies, prompt refreshes) and renders and sends them (`render`,
//! `budget_messages`, `sender`).

mod budget_messages;
pub mod pages;
pub mod render;
pub mod sender;

use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::domain::error::OpsResult;
use crate::store::outbox;

/// Telegram's limit on a message's text (UTF-16 code units after entity parsing).
pub const MAX_TEXT: usize = 4096;

/// A reply longer than this many messages is cut (a page says so).
const MAX_PAGES: usize = 10;

/// Queue a new message with this (HTML) text for `chat_id`. A text too long for one
/// message becomes several, numbered, in order, each valid HTML on its own.
pub async fn enqueue_text(conn: &mut PgConnection, chat_id: i64, text: &str) -> OpsResult<()> {
    let bodies: Vec<Value> = paged(text)
        .into_iter()
        .map(|text| json!({ "text": text }))
        .collect();
    outbox::enqueue_replies(conn, chat_id, bodies).await
}

/// Hold `chat_id`'s place for the reply to a command about to run
/// (`store::outbox::reserve_reply`): what the command causes there comes after it.
pub use crate::store::outbox::reserve_reply;

/// Queue the reply `text` in the place `slot` reserved for it (pages after it).
pub async fn fill_reply(
    conn: &mut PgConnection,
    slot: i64,
    chat_id: i64,
    text: &str,
) -> OpsResult<()> {
    let bodies: Vec<Value> = paged(text)
        .into_iter()
        .map(|text| json!({ "text": text }))
        .collect();
    outbox::fill_reply(conn, slot, chat_id, bodies).await
}

/// The messages a reply becomes: one when it fits, else pages marked `(1/3)`.
fn paged(text: &str) -> Vec<String> {
    // Room for the page mark and the cut note.
    let mut parts = pages::pages(text, pages::LIMIT - 64);
    if parts.len() <= 1 {
        return vec![text.to_string()];
    }
    if parts.len() > MAX_PAGES {
        parts.truncate(MAX_PAGES);
        parts[MAX_PAGES - 1].push_str("\n… (cut: too long for Telegram)");
    }
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| format!("{part}\n({}/{n})", i + 1))
        .collect()
}

/// A tap on a prompt of ours we have no record of (`store::outbox::adopt_prompt`).
pub use crate::store::outbox::adopt_prompt;

/// The question a message of ours shows (a reply to it answers it).
pub use crate::store::outbox::question_of_message;

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
    fn a_long_reply_becomes_numbered_pages_that_fit() {
        assert_eq!(paged("short"), vec!["short".to_string()]);
        let lines: Vec<String> = (0..400)
            .map(|i| format!("• <code>{i}</code> 🙂 someone"))
            .collect();
        let parts = paged(&lines.join("\n"));
        assert!(parts.len() > 1);
        for (i, part) in parts.iter().enumerate() {
            assert!(pages::telegram_len(part) <= pages::LIMIT);
            assert!(
                part.ends_with(&format!("({}/{})", i + 1, parts.len())),
                "{part}"
            );
        }
        let all = parts.join("\n");
        assert!(
            lines.iter().all(|l| all.contains(l.as_str())),
            "every line is there"
        );
        // Past the page cap, the last page says it was cut.
        let huge = "\nline".repeat(20_000);
        let parts = paged(&huge);
        assert_eq!(parts.len(), MAX_PAGES);
        assert!(parts[MAX_PAGES - 1].contains("(cut: too long for Telegram)"));
    }

    #[test]
    fn escapes_html_and_cuts_long_text() {
        assert_eq!(escape("<b>&\"x\""), "&lt;b&gt;&amp;&quot;x&quot;");
        let long = "é".repeat(5000);
        let short = cut(&long, 100);
        assert!(short.chars().count() <= 100 && short.ends_with("(cut)"));
        assert_eq!(cut("short", 100), "short");
    }
}
