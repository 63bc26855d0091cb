//! `bench chat`: the loop as a person on a phone feels it, against a fake Bot API on
//! loopback (the real wire format, answering at once) with the daemon's bot, outbox
//! sender and worker in this process and idle otherwise. Per sample: a high-risk
//! proposal's prompt is tapped ✅ (tap → `answerCallbackQuery`, tap → first step
//! started), then its `ask` step's question goes out (asked → `sendMessage`) and its
//! button is tapped (tap → the asking step has its answer).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::post;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Scratch, line, percentile, round2};
use crate::db::Database;
use crate::domain::vocab::Source;
use crate::engine::notify::sender::Sender;
use crate::engine::proposals::{self, NewProposal};
use crate::engine::worker::Worker;
use crate::interfaces::bot;
use crate::store::policy::{self as policy_store, PolicyCache};

pub(super) const TOKEN: &str = "123456:bench";
pub(super) const PERSON: i64 = 1001;

/// What the fake Bot API saw, with when.
#[derive(Default)]
pub(super) struct Seen {
    updates: VecDeque<Value>,
    next_update: i64,
    next_message: i64,
    /// (when, chat, message id, text) of every sendMessage.
    pub(super) sent: Vec<(DateTime<Utc>, i64, i64, String)>,
    /// (when, callback query id) of every answerCallbackQuery.
    answered: Vec<(DateTime<Utc>, String)>,
}

#[derive(Clone, Default)]
pub(super) struct Fake {
    seen: Arc<Mutex<Seen>>,
    arrived: Arc<Notify>,
}

impl Fake {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, kind: &str, payload: Value) {
        let mut seen = self.lock();
        seen.next_update += 1;
        let mut update = json!({ "update_id": seen.next_update });
        update[kind] = payload;
        seen.updates.push_back(update);
        drop(seen);
        self.arrived.notify_waiters();
    }

    fn message(id: i64, chat: i64, text: &str) -> Value {
        json!({"message_id": id, "date": Utc::now().timestamp(), "text": text,
            "chat": {"id": chat, "type": "private", "first_name": "Bench"},
            "from": {"id": 1, "is_bot": true, "first_name": "opsloop", "username": "opsloop_bench_bot"}})
    }

    fn person() -> Value {
        json!({"id": PERSON, "is_bot": false, "first_name": "Bench"})
    }

    pub(super) fn say(&self, text: &str) {
        let id = {
            let mut seen = self.lock();
            seen.next_message += 1;
            seen.next_message
        };
        let mut msg = Fake::message(id, PERSON, text);
        msg["from"] = Fake::person();
        if text.starts_with('/') {
            let len = text.split_whitespace().next().unwrap_or("").len();
            msg["entities"] = json!([{"type": "bot_command", "offset": 0, "length": len}]);
        }
        self.push("message", msg);
    }

    /// Serve the fake Bot API on a loopback port: its base URL, and the server's task
    /// (abort it when done).
    pub(super) async fn serve(
        &self,
    ) -> anyhow::Result<(String, tokio::task::JoinHandle<std::io::Result<()>>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        let app = Router::new()
            .route("/{bot}/{method}", post(api))
            .with_state(self.clone());
        Ok((
            url,
            tokio::spawn(async move { axum::serve(listener, app).await }),
        ))
    }

    /// What was sent since the last call, taken out (with the callback answers seen):
    /// a long run keeps nothing it has looked at.
    pub(super) fn take_sent(&self) -> Vec<(DateTime<Utc>, i64, i64, String)> {
        let mut seen = self.lock();
        seen.answered.clear();
        std::mem::take(&mut seen.sent)
    }

    /// Tap a button on message `message_id`; returns the callback query id.
    pub(super) fn tap(&self, message_id: i64, data: &str) -> String {
        let id = format!("cb{}", Utc::now().timestamp_nanos_opt().unwrap_or(0));
        let q = json!({"id": id, "from": Fake::person(), "chat_instance": "bench", "data": data,
            "message": Fake::message(message_id, PERSON, "…")});
        self.push("callback_query", q);
        id
    }
}

async fn api(
    State(fake): State<Fake>,
    Path((_bot, method)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> axum::Json<Value> {
    let p: Value = serde_json::from_slice(&body).unwrap_or(json!({}));
    let ok = |result: Value| axum::Json(json!({ "ok": true, "result": result }));
    match method.to_ascii_lowercase().as_str() {
        "getme" => ok(
            json!({"id": 1, "is_bot": true, "first_name": "opsloop", "username": "opsloop_bench_bot",
            "can_join_groups": true, "can_read_all_group_messages": false, "supports_inline_queries": false,
            "can_connect_to_business": false, "has_main_web_app": false}),
        ),
        "getupdates" => {
            let offset = p["offset"].as_i64().unwrap_or(0);
            let timeout = p["timeout"].as_u64().unwrap_or(0).min(10);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                let woken = fake.arrived.notified();
                {
                    let mut seen = fake.lock();
                    seen.updates
                        .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= offset);
                    if !seen.updates.is_empty() {
                        return ok(json!(seen.updates.iter().cloned().collect::<Vec<_>>()));
                    }
                }
                if tokio::time::timeout_at(deadline, woken).await.is_err() {
                    return ok(json!([]));
                }
            }
        }
        "sendmessage" => {
            let chat = p["chat_id"].as_i64().unwrap_or(0);
            let text = p["text"].as_str().unwrap_or("").to_string();
            let mut seen = fake.lock();
            seen.next_message += 1;
            let id = seen.next_message;
            seen.sent.push((Utc::now(), chat, id, text.clone()));
            ok(Fake::message(id, chat, &text))
        }
        "editmessagetext" => {
            let chat = p["chat_id"].as_i64().unwrap_or(0);
            let id = p["message_id"].as_i64().unwrap_or(0);
            ok(Fake::message(id, chat, p["text"].as_str().unwrap_or("")))
        }
        "getwebhookinfo" => {
            ok(json!({"url": "", "has_custom_certificate": false, "pending_update_count": 0}))
        }
        "answercallbackquery" => {
            let id = p["callback_query_id"].as_str().unwrap_or("").to_string();
            fake.lock().answered.push((Utc::now(), id));
            ok(json!(true))
        }
        _ => ok(json!(true)),
    }
}

fn policy() -> String {
    r#"
[gates]
max_pending = 1000000

[worker]
concurrency = 4

[heartbeat]
interval = "1h"

# The per-chat spacing (1 message/s) would measure Telegram's limit, not opsloop.
[telegram]
chat_messages_per_second = 1000
messages_per_second = 1000
command_burst = 1000
proposal_burst = 1000

[templates.chat]
risk = "high"
params.n = { pattern = '^\d+$' }
steps = [
  { name = "start", kind = "noop" },
  { name = "go", kind = "ask", question = "Go on with sample {n}?", choices = ["yes", "no"] },
]
"#
    .to_string()
}

/// Wait until `f` finds something in what the fake saw (10 s at most).
async fn wait_for<T>(fake: &Fake, what: &str, f: impl Fn(&Seen) -> Option<T>) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(t) = f(&fake.lock()) {
            return Ok(t);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow::anyhow!("bench chat: no {what} within 10 s"));
        }
        tokio::time::sleep(Duration::from_micros(250)).await;
    }
}

async fn wait_db<
    T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
>(
    pool: &sqlx::PgPool,
    what: &str,
    sql: &str,
    id: i64,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found: Option<T> = sqlx::query_scalar(sql)
            .bind(id)
            .fetch_optional(pool)
            .await?;
        if let Some(t) = found {
            return Ok(t);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow::anyhow!("bench chat: no {what} within 10 s"));
        }
        tokio::time::sleep(Duration::from_micros(250)).await;
    }
}

fn ms(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_microseconds().unwrap_or(0) as f64 / 1000.0).max(0.0)
}

pub async fn chat(db: &Database, samples: u32) -> anyhow::Result<Value> {
    let samples = samples.clamp(5, 10_000);
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    let source = policy();
    policy_store::apply(&pool, &source, "bench").await?;
    let policy = crate::domain::policy::parse(&source)
        .map_err(|p| anyhow::anyhow!("bench policy: {p:?}"))?;
    crate::store::users::grant(
        &pool,
        PERSON,
        crate::store::users::Role::Admin,
        Source::Cli,
        "bench",
    )
    .await?;

    let fake = Fake::default();
    let (url, server) = fake.serve().await?;

    let stop = CancellationToken::new();
    let cache = PolicyCache::default();
    cache.refresh(&pool).await?;
    let telegram = bot::bot(TOKEN, &url)?;
    let tasks = [
        tokio::spawn(
            Worker::new(pool.clone(), cache.clone(), 4).run(stop.clone(), Duration::from_secs(5)),
        ),
        {
            let (pool, telegram, cache, stop) =
                (pool.clone(), telegram.clone(), cache.clone(), stop.clone());
            tokio::spawn(async move {
                bot::run(pool, telegram, TOKEN, cache, stop).await;
                Ok::<(), anyhow::Error>(())
            })
        },
        {
            let sender = Sender::new(pool.clone(), telegram.clone(), &policy.telegram);
            let stop = stop.clone();
            tokio::spawn(async move {
                sender.run(stop).await;
                Ok::<(), anyhow::Error>(())
            })
        },
    ];
    // The person starts the bot, so prompts and questions reach them.
    fake.say("/start");
    wait_for(&fake, "answer to /start", |s| s.sent.first().map(|_| ())).await?;

    let (mut tap_answered, mut tap_started, mut asked_sent, mut answer_seen) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for n in 0..samples {
        let proposed = proposals::propose(
            &pool,
            &policy,
            NewProposal {
                template: "chat".into(),
                params: [("n".to_string(), n.to_string())].into(),
                proposed_by: "bench".into(),
                source: Source::Cli,
                priority: None,
                may_raise_priority: false,
            },
        )
        .await?;
        let needle = format!("proposal #{}</b>", proposed.id);
        let prompt = wait_for(&fake, "prompt", |s| {
            s.sent.iter().find(|m| m.3.contains(&needle)).map(|m| m.2)
        })
        .await?;
        let tapped = Utc::now();
        let callback = fake.tap(prompt, &format!("a:{}", proposed.id));
        let answered = wait_for(&fake, "callback answer", |s| {
            s.answered.iter().find(|a| a.1 == callback).map(|a| a.0)
        })
        .await?;
        tap_answered.push(ms(tapped, answered));
        let mission: i64 = wait_db(
            &pool,
            "mission",
            "SELECT id FROM ops_missions WHERE proposal_id = $1",
            proposed.id,
        )
        .await?;
        let started: DateTime<Utc> = wait_db(
            &pool,
            "first step",
            "SELECT started_at FROM ops_mission_steps WHERE mission_id = $1 AND seq = 1 AND started_at IS NOT NULL",
            mission,
        )
        .await?;
        tap_started.push(ms(tapped, started));
        let (question, asked): (i64, DateTime<Utc>) = {
            let id: i64 = wait_db(
                &pool,
                "question",
                "SELECT id FROM ops_questions WHERE mission_id = $1",
                mission,
            )
            .await?;
            let at: DateTime<Utc> = wait_db(
                &pool,
                "question",
                "SELECT created_at FROM ops_questions WHERE id = $1",
                id,
            )
            .await?;
            (id, at)
        };
        let needle = format!("question #{question}</b>");
        let (sent_at, message) = wait_for(&fake, "question message", |s| {
            s.sent
                .iter()
                .find(|m| m.3.contains(&needle))
                .map(|m| (m.0, m.2))
        })
        .await?;
        asked_sent.push(ms(asked, sent_at));
        let tapped = Utc::now();
        fake.tap(message, &format!("q:{question}:0"));
        let seen: DateTime<Utc> = wait_db(
            &pool,
            "answer",
            "SELECT finished_at FROM ops_mission_steps WHERE mission_id = $1 AND seq = 2 AND status = 'succeeded'",
            mission,
        )
        .await?;
        answer_seen.push(ms(tapped, seen));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    }
    server.abort();
    for v in [
        &mut tap_answered,
        &mut tap_started,
        &mut asked_sent,
        &mut answer_seen,
    ] {
        v.sort_by(f64::total_cmp);
    }
    let p = |v: &[f64], q| round2(percentile(v, q));
    let out = line(
        &pool,
        json!({
            "bench": "chat",
            "samples": samples,
            "tap_to_callback_answered_p50_ms": p(&tap_answered, 50.0),
            "tap_to_callback_answered_p99_ms": p(&tap_answered, 99.0),
            "tap_to_first_step_started_p50_ms": p(&tap_started, 50.0),
            "tap_to_first_step_started_p99_ms": p(&tap_started, 99.0),
            "question_asked_to_sent_p50_ms": p(&asked_sent, 50.0),
            "question_asked_to_sent_p99_ms": p(&asked_sent, 99.0),
            "tap_to_answer_seen_p50_ms": p(&answer_seen, 50.0),
            "tap_to_answer_seen_p99_ms": p(&answer_seen, 99.0),
        }),
    )
    .await;
    scratch.drop().await;
    Ok(out)
}
