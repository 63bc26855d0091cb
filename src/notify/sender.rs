//! The outbox sender: one per database (advisory lock), in order per chat, within
//! Telegram's limits, honouring 429 `retry_after`, retrying other failures with backoff.
//! A row is marked sent right after Telegram accepts it and is never sent again.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use sqlx::{PgPool, postgres::PgListener};
use teloxide::prelude::*;
use teloxide::types::{MessageId, ParseMode};
use teloxide::{ApiError, RequestError};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::render::{self, Rendered};
use crate::db::singleton::Singleton;
use crate::db::{self, channels, locks};
use crate::error::OpsResult;
use crate::policy::TelegramPolicy;
use crate::telemetry;

/// Failed attempts before a row is given up (transient errors only).
const MAX_ATTEMPTS: i32 = 12;

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    chat_id: i64,
    subject: String,
    action: String,
    event_id: Option<i64>,
    body: Value,
    attempts: i32,
    due: bool,
}

enum Delivery {
    Sent(Option<i32>),
    RetryAfter(Duration),
    Transient(String),
    Permanent(String),
}

pub struct Sender {
    pool: PgPool,
    bot: Bot,
    global: DefaultDirectRateLimiter,
    chats: DefaultKeyedRateLimiter<i64>,
    groups: DefaultKeyedRateLimiter<i64>,
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

/// `n` per `period`, evenly spaced: no bursts, since Telegram's limits are about spacing.
fn spaced(period: Duration, n: u32) -> Quota {
    let every = period / n.max(1);
    Quota::with_period(every.max(Duration::from_micros(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::MIN)
}

impl Sender {
    /// A sender within `limits` (Telegram's, unless the policy says otherwise).
    pub fn new(pool: PgPool, bot: Bot, limits: &TelegramPolicy) -> Sender {
        Sender {
            pool,
            bot,
            global: RateLimiter::direct(spaced(SECOND, limits.messages_per_second)),
            chats: RateLimiter::keyed(spaced(SECOND, limits.chat_messages_per_second)),
            groups: RateLimiter::keyed(spaced(MINUTE, limits.group_messages_per_minute)),
        }
    }

    /// Send until `shutdown`, while holding the outbox lock; wait for it otherwise.
    pub async fn run(self, shutdown: CancellationToken) {
        let singleton = Singleton::new(&self.pool, locks::OUTBOX, "outbox sender");
        let sender = std::sync::Arc::new(self);
        singleton
            .run(&shutdown, |stop| {
                let sender = sender.clone();
                async move { sender.serve(&stop).await }
            })
            .await;
    }

    /// Send until `stop` (shutdown, or this process lost the outbox lock).
    async fn serve(&self, stop: &CancellationToken) -> OpsResult<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(channels::OUTBOX).await?;
        loop {
            let wait = match self.round().await {
                Ok(wait) => wait,
                Err(e) => {
                    warn!(error = %e, "outbox round failed");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = listener.try_recv() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Send what each chat may send now; return how long to wait before the next round.
    pub async fn round(&self) -> OpsResult<Duration> {
        // Only each chat's oldest pending row is eligible: order per chat holds.
        let mut heads: Vec<Row> = sqlx::query_as(
            "SELECT DISTINCT ON (chat_id) id, chat_id, subject, action, event_id, body, attempts,
                    run_after <= now() AS due
             FROM ops_notifications WHERE status = 'pending'
             ORDER BY chat_id, id LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await?;
        heads.sort_by_key(|r| r.id);
        let mut wait = Duration::from_secs(1);
        let mut sent_any = false;
        for row in heads.iter().filter(|r| r.due) {
            if let Some(not_yet) = self.throttled(row.chat_id) {
                wait = wait.min(not_yet);
                continue;
            }
            self.deliver_and_record(row).await?;
            sent_any = true;
        }
        if sent_any {
            wait = Duration::ZERO;
        }
        Ok(wait.max(Duration::from_millis(5)))
    }

    /// How long until `chat` may receive another message (None: now, and counted).
    fn throttled(&self, chat: i64) -> Option<Duration> {
        let now = governor::clock::Clock::now(&governor::clock::DefaultClock::default());
        if let Err(not_until) = self.chats.check_key(&chat) {
            return Some(not_until.wait_time_from(now));
        }
        if chat < 0
            && let Err(not_until) = self.groups.check_key(&chat)
        {
            return Some(not_until.wait_time_from(now));
        }
        if let Err(not_until) = self.global.check() {
            return Some(not_until.wait_time_from(now));
        }
        None
    }

    async fn deliver_and_record(&self, row: &Row) -> OpsResult<()> {
        // Refreshes of one prompt or card up to now are covered by this render.
        let covered: i64 = sqlx::query_scalar(
            "SELECT coalesce(max(id), $4) FROM ops_notifications
             WHERE status = 'pending' AND chat_id = $1 AND subject = $2 AND action = $3 AND action <> 'send'",
        )
        .bind(row.chat_id)
        .bind(&row.subject)
        .bind(&row.action)
        .bind(row.id)
        .fetch_one(&self.pool)
        .await?;
        match self.deliver(row).await {
            Delivery::Sent(message_id) => {
                telemetry::notification("sent");
                sqlx::query(
                    "UPDATE ops_notifications
                     SET status = 'sent', sent_at = now(), error = NULL,
                         message_id = CASE WHEN id = $1 THEN $5 ELSE message_id END
                     WHERE status = 'pending' AND chat_id = $2
                       AND (id = $1 OR (subject = $3 AND action = $4 AND action <> 'send' AND id <= $6))",
                )
                .bind(row.id)
                .bind(row.chat_id)
                .bind(&row.subject)
                .bind(&row.action)
                .bind(message_id.map(i64::from))
                .bind(covered)
                .execute(&self.pool)
                .await?;
            }
            Delivery::RetryAfter(after) => {
                warn!(
                    chat_id = row.chat_id,
                    retry_after_s = after.as_secs(),
                    "Telegram asked to slow down"
                );
                // The whole chat waits, so its order holds.
                sqlx::query(
                    "UPDATE ops_notifications SET run_after = now() + $2
                     WHERE status = 'pending' AND chat_id = $1",
                )
                .bind(row.chat_id)
                .bind(db::interval(after))
                .execute(&self.pool)
                .await?;
            }
            Delivery::Transient(error) if row.attempts + 1 < MAX_ATTEMPTS => {
                let delay = crate::executors::backoff_delay(
                    (row.attempts + 1) as u32,
                    Duration::from_millis(500),
                    Duration::from_secs(60),
                );
                sqlx::query(
                    "UPDATE ops_notifications SET attempts = attempts + 1, error = $2, run_after = now() + $3
                     WHERE id = $1",
                )
                .bind(row.id)
                .bind(&error)
                .bind(db::interval(delay))
                .execute(&self.pool)
                .await?;
            }
            Delivery::Transient(error) | Delivery::Permanent(error) => {
                warn!(chat_id = row.chat_id, error = %error, "notification given up");
                telemetry::notification("failed");
                sqlx::query(
                    "UPDATE ops_notifications SET status = 'failed', attempts = attempts + 1, error = $2 WHERE id = $1",
                )
                .bind(row.id)
                .bind(&error)
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    async fn deliver(&self, row: &Row) -> Delivery {
        let rendered = match self.render(row).await {
            Ok(r) => r,
            // What it was about is gone (retention, a bad id): nothing to say.
            Err(e) => return Delivery::Permanent(format!("cannot render: {e}")),
        };
        let chat = ChatId(row.chat_id);
        let existing = if row.action == "send" {
            None
        } else {
            self.message_of(row).await
        };
        if let Some(message_id) = existing {
            let mut edit = self
                .bot
                .edit_message_text(chat, MessageId(message_id), &rendered.text)
                .parse_mode(ParseMode::Html);
            if let Some(buttons) = rendered.buttons.clone() {
                edit = edit.reply_markup(buttons);
            }
            match edit.await {
                Ok(_) => return Delivery::Sent(Some(message_id)),
                Err(RequestError::Api(ApiError::MessageNotModified)) => {
                    return Delivery::Sent(Some(message_id));
                }
                // Deleted by someone: send it anew below.
                Err(RequestError::Api(
                    ApiError::MessageToEditNotFound | ApiError::MessageIdInvalid,
                )) => {}
                Err(e) => return classify(e),
            }
        }
        let mut send = self
            .bot
            .send_message(chat, &rendered.text)
            .parse_mode(ParseMode::Html);
        if let Some(buttons) = rendered.buttons {
            send = send.reply_markup(buttons);
        }
        match send.await {
            Ok(message) => Delivery::Sent(Some(message.id.0)),
            Err(e) => classify(e),
        }
    }

    async fn render(&self, row: &Row) -> OpsResult<Rendered> {
        let id = |prefix: &str| {
            row.subject
                .strip_prefix(prefix)
                .and_then(|s| s.parse::<i64>().ok())
        };
        match row.action.as_str() {
            "prompt" => render::prompt(&self.pool, id("proposal:").unwrap_or(0)).await,
            "mission" => render::mission(&self.pool, id("mission:").unwrap_or(0)).await,
            _ => match (row.body.get("text").and_then(Value::as_str), row.event_id) {
                (Some(text), _) => Ok(Rendered {
                    text: text.to_string(),
                    buttons: None,
                }),
                (None, Some(event)) => render::event(&self.pool, event).await,
                (None, None) => Err(crate::error::OpsError::bad_input("an empty notification")),
            },
        }
    }

    /// The message already showing this prompt or card in this chat.
    async fn message_of(&self, row: &Row) -> Option<i32> {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT message_id FROM ops_notifications
             WHERE chat_id = $1 AND subject = $2 AND action = $3 AND status = 'sent' AND message_id IS NOT NULL
             ORDER BY id DESC LIMIT 1",
        )
        .bind(row.chat_id)
        .bind(&row.subject)
        .bind(&row.action)
        .fetch_optional(&self.pool)
        .await
        .ok()
        .flatten();
        id.and_then(|i| i32::try_from(i).ok())
    }
}

fn classify(error: RequestError) -> Delivery {
    match error {
        RequestError::RetryAfter(secs) => Delivery::RetryAfter(secs.duration()),
        RequestError::Api(
            e @ (ApiError::BotBlocked
            | ApiError::ChatNotFound
            | ApiError::UserDeactivated
            | ApiError::BotKicked
            | ApiError::BotKickedFromSupergroup
            | ApiError::CantInitiateConversation
            | ApiError::CantParseEntities(_)
            | ApiError::MessageIsTooLong
            | ApiError::MessageTextIsEmpty),
        ) => Delivery::Permanent(e.to_string()),
        RequestError::Api(ApiError::Unknown(text))
            if text.starts_with("Forbidden") || text.starts_with("Bad Request") =>
        {
            Delivery::Permanent(text)
        }
        // Network trouble, 5xx and anything unexpected: try again later.
        other => Delivery::Transient(other.to_string()),
    }
}
