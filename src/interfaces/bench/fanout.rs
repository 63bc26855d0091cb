//! `bench fanout`: one mission notification to many subscribed chats, through a fake Bot
//! API on loopback (the real wire format, answering at once) and the real outbox sender
//! at a configured global rate. Measures the delivery rate against that rate, the time
//! from the event's commit to the last chat, and checks the limits held: each chat got
//! its one message, and no second (a sliding window) carried more than the global rate.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::chat::{Fake, TOKEN};
use super::{Scratch, line, round2};
use crate::db::Database;
use crate::domain::error::OpsError;
use crate::engine::notify::sender::Sender;
use crate::interfaces::bot;
use crate::store::policy as policy_store;

/// The chat that receives the warm-up notification (the fan-out's chats are above it).
const WARM_UP_CHAT: i64 = 1;
const FIRST_CHAT: i64 = 10_000;

fn policy(rate: u32) -> String {
    format!(
        r#"
[heartbeat]
interval = "1h"

[telegram]
messages_per_second = {rate}
chat_messages_per_second = 1

[templates.bench]
risk = "low"
steps = [ {{ name = "s1", kind = "noop" }} ]
"#
    )
}

/// A running mission (proposal approved), for its events to be about.
async fn mission(pool: &PgPool, n: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "WITH p AS (
            INSERT INTO ops_mission_proposals (template, params, risk, proposed_by, source, status, decided_at)
            VALUES ('bench', jsonb_build_object('n', $1::text), 'low', 'bench', 'cli', 'approved', now()) RETURNING id)
         INSERT INTO ops_missions (proposal_id, template, status, started_at)
         SELECT id, 'bench', 'running', now() FROM p RETURNING id",
    )
    .bind(n)
    .fetch_one(pool)
    .await?)
}

/// Its `mission.started` event (the outbox trigger queues a card per subscriber), at
/// commit time.
async fn announce(pool: &PgPool, mission_id: i64) -> anyhow::Result<DateTime<Utc>> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO ops_agent_events (kind, source, mission_id, payload, processed_at)
         VALUES ('mission.started', 'worker', $1, '{\"template\": \"bench\"}', now())",
    )
    .bind(mission_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Utc::now())
}

async fn subscribe(pool: &PgPool, from: i64, count: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO ops_users (telegram_id, name, role, subscribed, started)
         SELECT g, 'chat ' || g, 'viewer', true, true FROM generate_series($1::bigint, $2::bigint) g",
    )
    .bind(from)
    .bind(from + count - 1)
    .execute(pool)
    .await?;
    Ok(())
}

/// Wait until the fake has sent `count` messages to chats `from` and up.
async fn sent_to(fake: &Fake, from: i64, count: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if fake.lock().sent.iter().filter(|m| m.1 >= from).count() >= count {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow::anyhow!(
                "bench fanout: not all {count} chats were sent their message within {within:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn fanout(db: &Database, chats: u32, rate: u32) -> anyhow::Result<Value> {
    if chats == 0 || rate == 0 {
        return Err(OpsError::bad_input("--chats and --rate must be at least 1").into());
    }
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    let source = policy(rate);
    policy_store::apply(&pool, &source, "bench").await?;
    let policy = crate::domain::policy::parse(&source)
        .map_err(|p| anyhow::anyhow!("bench policy: {p:?}"))?;

    let fake = Fake::default();
    let (url, server) = fake.serve().await?;
    let stop = CancellationToken::new();
    let telegram = bot::bot(TOKEN, &url)?;
    let sender = Sender::new(pool.clone(), telegram, &policy.telegram);
    let sending = {
        let stop = stop.clone();
        tokio::spawn(async move { sender.run(stop).await })
    };

    // Warm-up (not timed): the sender holds its lock and has sent once.
    subscribe(&pool, WARM_UP_CHAT, 1).await?;
    let warm = mission(&pool, "warm").await?;
    announce(&pool, warm).await?;
    sent_to(&fake, WARM_UP_CHAT, 1, Duration::from_secs(30)).await?;

    // The fan-out: `chats` more subscribers, one mission event.
    subscribe(&pool, FIRST_CHAT, i64::from(chats)).await?;
    let mission_id = mission(&pool, "fanout").await?;
    let committed = announce(&pool, mission_id).await?;
    // Generous: twice the time the rate needs, and a minute more.
    let within = Duration::from_secs(60 + 2 * u64::from(chats / rate + 1));
    sent_to(&fake, FIRST_CHAT, chats as usize, within).await?;
    // Anything sent after the last expected message (a second copy) is counted too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), sending).await;
    server.abort();

    let mut times: Vec<DateTime<Utc>> = Vec::new();
    let mut per_chat: std::collections::HashMap<i64, u32> = Default::default();
    for (at, chat, _, _) in fake.lock().sent.iter().filter(|m| m.1 >= FIRST_CHAT) {
        times.push(*at);
        *per_chat.entry(*chat).or_default() += 1;
    }
    times.sort();
    let (Some(first), Some(last)) = (times.first().copied(), times.last().copied()) else {
        return Err(anyhow::anyhow!("bench fanout: nothing was sent"));
    };
    let secs = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0) as f64 / 1e6;
    // The most messages any one-second window saw (the global limit, as Telegram counts).
    let mut busiest = 0usize;
    let mut start = 0usize;
    for (end, at) in times.iter().enumerate() {
        while secs(*at - times[start]) >= 1.0 {
            start += 1;
        }
        busiest = busiest.max(end - start + 1);
    }
    let span = secs(last - first);
    let delivered_rate = if span > 0.0 {
        (times.len() - 1) as f64 / span
    } else {
        0.0
    };
    let out = line(
        &pool,
        json!({
            "bench": "fanout",
            "chats": chats,
            "messages": times.len(),
            "chats_reached": per_chat.len(),
            "most_messages_to_one_chat": per_chat.values().max().copied().unwrap_or(0),
            "configured_rate_per_s": rate,
            "delivered_rate_per_s": round2(delivered_rate),
            "ratio_to_configured": round2(delivered_rate / f64::from(rate)),
            "busiest_second": busiest,
            "event_to_first_chat_ms": round2(secs(first - committed) * 1000.0),
            "event_to_last_chat_ms": round2(secs(last - committed) * 1000.0),
        }),
    )
    .await;
    scratch.drop().await;
    Ok(out)
}
