//! The outbox sender: one per database (advisory lock), in order per chat, within
//! Telegram's limits, honouring 429 `retry_after`, retrying other failures with backoff.
//!
//! Fairness: each round looks at every chat's oldest pending row and sends only for the
//! chats whose own limit allows a message now, then takes a global slot for each, so a
//! chat with a long queue gets its per-chat share and never holds the others back.
//! Approval prompts go first (someone is waiting to decide), then the chat served least
//! lately. Each chat's delivery runs on its own (at most one per chat at a time), so a
//! call that stalls (an answer hanging mid-body until the HTTP timeout) delays only its chat.
//!
//! Delivery is at least once. Telegram's `sendMessage` has no idempotency key, so when
//! the sender stops between Telegram's accepting a message and the row's being marked
//! sent, or Telegram's answer is lost on the way, the message is sent again. The window
//! is kept small and visible: the row says it is in flight (with its attempt) before
//! the call, and is marked sent as soon as Telegram answers (retrying that write). Edits
//! are idempotent; a prompt that ended up in a chat twice is edited wherever we know it
//! (the copy whose answer was lost becomes known when someone taps it).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{PgPool, postgres::PgListener};
use teloxide::prelude::*;
use teloxide::types::{ForceReply, MessageId, ParseMode};
use teloxide::{ApiError, RequestError};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::render::{self, Rendered};
use crate::db::singleton::Singleton;
use crate::db::{self, channels, locks};
use crate::domain::error::OpsResult;
use crate::domain::policy::TelegramPolicy;
use crate::engine::telemetry;
use crate::store::outbox::{self, Pending as Row};

/// Attempts before a row is given up (transient errors only; 429s do not count).
const MAX_ATTEMPTS: i32 = 12;

enum Delivery {
    Sent(Option<i32>),
    RetryAfter(Duration),
    Transient(String),
    Permanent(String),
}

/// Evenly spaced sends per key: one per `every`, no bursts, since Telegram's limits are
/// about spacing. Looking is separate from taking, so a chat that must wait spends nothing.
struct Spacing<K> {
    every: Duration,
    /// When each key may send next; a key not here may send now.
    next: HashMap<K, Instant>,
}

impl<K: Hash + Eq + Copy> Spacing<K> {
    /// `n` per `period`.
    fn new(period: Duration, n: u32) -> Spacing<K> {
        let every = (period / n.max(1)).max(Duration::from_micros(1));
        Spacing {
            every,
            next: HashMap::new(),
        }
    }

    fn wait(&self, key: K, now: Instant) -> Duration {
        self.next
            .get(&key)
            .map_or(Duration::ZERO, |next| next.saturating_duration_since(now))
    }

    fn take(&mut self, key: K, now: Instant) {
        self.next.insert(key, now + self.every);
    }

    /// Take on schedule: a send that comes late (a round's read, a timer) does not push
    /// the next one back, so the rate holds; at most one interval of lateness is made
    /// up, so two sends are never closer than back to back once.
    fn take_on_schedule(&mut self, key: K, now: Instant) {
        let due = self.next.get(&key).copied().unwrap_or(now);
        let from = due.max(now.checked_sub(self.every).unwrap_or(now));
        self.next.insert(key, from + self.every);
    }

    /// When `key` last sent, if lately (for round-robin: `None` sorts first).
    fn last(&self, key: K) -> Option<Instant> {
        self.next.get(&key).map(|next| *next - self.every)
    }

    /// Keys that may send now are as good as absent.
    fn forget_idle(&mut self, now: Instant) {
        if self.next.len() > 1024 {
            self.next.retain(|_, next| *next > now);
        }
    }
}

struct Limits {
    global: Spacing<()>,
    chats: Spacing<i64>,
    groups: Spacing<i64>,
}

impl Limits {
    /// How long `chat` must wait before its own limits allow a message.
    fn chat_wait(&self, chat: i64, now: Instant) -> Duration {
        let group = if chat < 0 {
            self.groups.wait(chat, now)
        } else {
            Duration::ZERO
        };
        self.chats.wait(chat, now).max(group)
    }

    fn take(&mut self, chat: i64, now: Instant) {
        // The global limit is a rate (Telegram counts per second); each chat's and
        // group's is a spacing, kept strictly.
        self.global.take_on_schedule((), now);
        self.chats.take(chat, now);
        if chat < 0 {
            self.groups.take(chat, now);
        }
    }
}

pub struct Sender {
    pool: PgPool,
    bot: Bot,
    limits: Mutex<Limits>,
    /// Chats with a delivery under way: their next row waits for it, other chats don't.
    busy: Mutex<HashSet<i64>>,
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

impl Sender {
    /// A sender within `limits` (Telegram's, unless the policy says otherwise).
    pub fn new(pool: PgPool, bot: Bot, limits: &TelegramPolicy) -> Sender {
        Sender {
            pool,
            bot,
            limits: Mutex::new(Limits {
                global: Spacing::new(SECOND, limits.messages_per_second),
                chats: Spacing::new(SECOND, limits.chat_messages_per_second),
                groups: Spacing::new(MINUTE, limits.group_messages_per_minute),
            }),
            busy: Mutex::new(HashSet::new()),
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
    async fn serve(self: &Arc<Self>, stop: &CancellationToken) -> OpsResult<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(channels::OUTBOX).await?;
        // Deliveries under way, at most one per chat. They end with this function (and
        // so with the lock): a cut-off sender leaves none running.
        let mut deliveries: JoinSet<OpsResult<()>> = JoinSet::new();
        self.busy().clear();
        loop {
            let wait = match self.round(&mut deliveries).await {
                Ok(wait) => wait,
                Err(e) => {
                    warn!(error = %e, "outbox round failed");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {
                    // Let calls under way answer, briefly; a stalled one is cut off.
                    let finish = async { while deliveries.join_next().await.is_some() {} };
                    let _ = tokio::time::timeout(Duration::from_secs(3), finish).await;
                    return Ok(());
                }
                _ = listener.try_recv() => {}
                Some(done) = deliveries.join_next() => {
                    if let Ok(Err(e)) = done {
                        warn!(error = %e, "recording a notification's delivery failed");
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Start what the limits allow now, each chat's delivery on its own, so a call that
    /// stalls holds back no other chat; return how long to wait before the next round.
    async fn round(
        self: &Arc<Self>,
        deliveries: &mut JoinSet<OpsResult<()>>,
    ) -> OpsResult<Duration> {
        // Only each chat's oldest pending row is eligible, and only while no delivery to
        // the chat is under way: order per chat holds. The busy chats are read before the
        // rows: a delivery that ends meanwhile has made its row stale in `heads`, and
        // that row must not go out again.
        let busy = self.busy().clone();
        let heads = outbox::heads(&self.pool, 1000).await?;
        let mut wait = Duration::from_secs(1);
        let mut ready: Vec<Row> = Vec::new();
        {
            let mut limits = self.limits();
            let now = Instant::now();
            limits.chats.forget_idle(now);
            limits.groups.forget_idle(now);
            for row in heads
                .into_iter()
                .filter(|r| r.due && !busy.contains(&r.chat_id))
            {
                match limits.chat_wait(row.chat_id, now) {
                    Duration::ZERO => ready.push(row),
                    not_yet => wait = wait.min(not_yet),
                }
            }
            // Someone is waiting to decide or to be answered.
            let urgent = |r: &Row| matches!(r.action.as_str(), "prompt" | "question");
            ready.sort_by_key(|r| (!urgent(r), limits.chats.last(r.chat_id), r.id));
        }
        let mut sent_all = !ready.is_empty();
        for row in ready {
            // The global slot is taken only by a chat that may send now.
            let global = self.limits().global.wait((), Instant::now());
            if !global.is_zero() {
                wait = wait.min(global);
                sent_all = false;
                break;
            }
            self.limits().take(row.chat_id, Instant::now());
            self.busy().insert(row.chat_id);
            let sender = self.clone();
            deliveries.spawn(async move {
                let delivered = sender.deliver_and_record(&row).await;
                sender.busy().remove(&row.chat_id);
                delivered
            });
        }
        if sent_all {
            wait = Duration::ZERO;
        }
        Ok(wait.max(Duration::from_millis(5)))
    }

    fn limits(&self) -> MutexGuard<'_, Limits> {
        self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn busy(&self) -> MutexGuard<'_, HashSet<i64>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn deliver_and_record(&self, row: &Row) -> OpsResult<()> {
        // Refreshes of one prompt or card up to now are covered by this render.
        let covered = outbox::latest_refresh(&self.pool, row).await?;
        if row.was_in_flight() {
            warn!(
                notification = row.id,
                chat_id = row.chat_id,
                "the last attempt's outcome is unknown (the sender stopped mid-call); \
                 trying again, so a new message may show twice"
            );
        }
        let attempt = row.attempts + 1;
        outbox::mark_in_flight(&self.pool, row.id, attempt).await?;
        match self.deliver(row).await {
            Delivery::Sent(message_id) => {
                telemetry::notification("sent");
                self.record_sent(row, message_id, covered).await?;
            }
            Delivery::RetryAfter(after) => {
                warn!(
                    chat_id = row.chat_id,
                    retry_after_s = after.as_secs(),
                    "Telegram asked to slow down"
                );
                // The whole chat waits, so its order holds. Telegram's pacing is no failure.
                let error = format!("Telegram asked to retry after {}s", after.as_secs());
                outbox::slow_down_chat(&self.pool, row, db::interval(after), &error).await?;
            }
            Delivery::Transient(error) if attempt < MAX_ATTEMPTS => {
                let delay = crate::engine::executors::backoff_delay(
                    attempt as u32,
                    Duration::from_millis(500),
                    Duration::from_secs(60),
                );
                outbox::retry_later(&self.pool, row.id, &error, db::interval(delay)).await?;
            }
            Delivery::Transient(error) | Delivery::Permanent(error) => {
                warn!(chat_id = row.chat_id, error = %error, "notification given up");
                telemetry::notification("failed");
                outbox::mark_failed(&self.pool, row.id, &error).await?;
            }
        }
        Ok(())
    }

    /// Mark the row (and the refreshes it covered) sent. The message is in the chat now,
    /// and a row left pending would be sent again, so a failing write is retried a while.
    async fn record_sent(&self, row: &Row, message_id: Option<i32>, covered: i64) -> OpsResult<()> {
        let mut pause = Duration::from_millis(100);
        loop {
            match outbox::mark_sent(&self.pool, row, message_id, covered).await {
                Ok(_) => return Ok(()),
                Err(e) if pause < Duration::from_secs(5) => {
                    warn!(notification = row.id, error = %e, "cannot mark a sent notification; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn deliver(&self, row: &Row) -> Delivery {
        let rendered = match self.render(row).await {
            Ok(r) => r,
            // What it was about is gone (retention, a bad id): nothing to say.
            Err(e) => return Delivery::Permanent(format!("cannot render: {e}")),
        };
        let chat = ChatId(row.chat_id);
        // A copy (`/pending`, a reminder) is a new message, edited with the others
        // afterwards. A `send` row that names its message edits it (a failure message
        // after a retry).
        let copy = row.body.get("copy").and_then(Value::as_bool) == Some(true);
        let edits = row.action == "send" && row.message_id.is_some();
        let existing = if copy {
            Vec::new()
        } else if row.action == "send" {
            row.message_id
                .and_then(|m| i32::try_from(m).ok())
                .into_iter()
                .collect()
        } else {
            match self.messages_of(row).await {
                Ok(ids) => ids,
                // Not knowing would send a second message: try later instead.
                Err(e) => return Delivery::Transient(format!("cannot look up the message: {e}")),
            }
        };
        // Every message showing this prompt or card in this chat (usually one).
        let mut shown = None;
        for message_id in existing {
            let mut edit = self
                .bot
                .edit_message_text(chat, MessageId(message_id), &rendered.text)
                .parse_mode(ParseMode::Html);
            if let Some(buttons) = rendered.buttons.clone() {
                edit = edit.reply_markup(buttons);
            }
            match edit.await {
                Ok(_) | Err(RequestError::Api(ApiError::MessageNotModified)) => {
                    shown = shown.or(Some(message_id));
                }
                // Deleted by someone: forget it; if none is left, send it anew below.
                Err(RequestError::Api(
                    ApiError::MessageToEditNotFound | ApiError::MessageIdInvalid,
                )) => self.forget_message(row, message_id).await,
                Err(e) => return classify(e),
            }
        }
        if shown.is_some() || edits {
            return Delivery::Sent(shown);
        }
        let mut send = self
            .bot
            .send_message(chat, &rendered.text)
            .parse_mode(ParseMode::Html);
        if let Some(buttons) = rendered.buttons {
            send = send.reply_markup(buttons);
        } else if rendered.force_reply {
            send = send.reply_markup(
                ForceReply::new().input_field_placeholder(Some("Your answer".to_string())),
            );
        }
        match send.await {
            Ok(message) => Delivery::Sent(Some(message.id.0)),
            Err(RequestError::Network(e)) if !e.is_connect() => Delivery::Transient(format!(
                "no answer from Telegram (the message may have arrived; it will be sent again): {e}"
            )),
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
            "question" => render::question(&self.pool, id("question:").unwrap_or(0)).await,
            _ => match (row.body.get("text").and_then(Value::as_str), row.event_id) {
                // Replies are split into pages when queued; this is the last guard.
                (Some(text), _) => Ok(Rendered {
                    text: render::fit(text),
                    buttons: None,
                    force_reply: false,
                }),
                (None, Some(event)) => render::event(&self.pool, event).await,
                (None, None) => Err(crate::domain::error::OpsError::bad_input(
                    "an empty notification",
                )),
            },
        }
    }

    /// The messages showing this prompt or card in this chat, oldest first.
    async fn messages_of(&self, row: &Row) -> OpsResult<Vec<i32>> {
        let ids = outbox::messages_of(&self.pool, row).await?;
        Ok(ids
            .into_iter()
            .filter_map(|i| i32::try_from(i).ok())
            .collect())
    }

    /// A message that is gone is not edited again.
    async fn forget_message(&self, row: &Row, message_id: i32) {
        if let Err(e) = outbox::forget_message(&self.pool, row, message_id).await {
            warn!(error = %e, "cannot forget a deleted message");
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_looks_without_taking_and_remembers_who_sent_last() {
        let mut chats: Spacing<i64> = Spacing::new(SECOND, 1);
        let now = Instant::now();
        assert_eq!(chats.wait(1, now), Duration::ZERO);
        // Looking costs nothing: still free.
        assert_eq!(chats.wait(1, now), Duration::ZERO);
        chats.take(1, now);
        assert_eq!(chats.wait(1, now), SECOND);
        assert_eq!(
            chats.wait(2, now),
            Duration::ZERO,
            "another chat is not held back"
        );
        assert_eq!(chats.wait(1, now + SECOND), Duration::ZERO);
        // Round-robin: a chat that never sent sorts before one that did.
        assert!(chats.last(2) < chats.last(1));
        let groups: Spacing<i64> = Spacing::new(MINUTE, 20);
        assert_eq!(groups.every, Duration::from_secs(3));
    }

    #[test]
    fn the_global_rate_keeps_its_schedule_when_a_send_comes_late() {
        let every = Duration::from_millis(10);
        let mut global: Spacing<()> = Spacing::new(SECOND, 100);
        let t0 = Instant::now();
        global.take_on_schedule((), t0);
        assert_eq!(global.wait((), t0), every);
        // Taken 3 ms late: the next is due on the schedule, not 10 ms after the late one.
        let late = t0 + every + Duration::from_millis(3);
        global.take_on_schedule((), late);
        assert_eq!(global.wait((), late), Duration::from_millis(7));
        // After a long idle, at most one interval is made up: never a burst.
        let idle = t0 + Duration::from_secs(60);
        global.take_on_schedule((), idle);
        assert_eq!(global.wait((), idle), Duration::ZERO);
        global.take_on_schedule((), idle);
        assert_eq!(global.wait((), idle), every);
        // 1,000 sends as fast as allowed take at least 999 intervals less one made up.
        let mut g: Spacing<()> = Spacing::new(SECOND, 100);
        let mut now = t0;
        for _ in 0..1000 {
            now += g.wait((), now);
            g.take_on_schedule((), now);
        }
        assert!(now - t0 >= every * 998);
    }
}
