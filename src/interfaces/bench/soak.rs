//! `bench soak --minutes N`: a realistic mix for N minutes in a scratch database, to
//! show that nothing grows without bound. Missions of shell, http, sleep and noop steps
//! arrive every 100 ms, events every 500 ms that a reaction turns into proposals, a cron
//! trigger fires every minute, and retention (two minutes) deletes what is done. Every
//! 5 s a mission asks a question in Telegram, which a person answers by tapping its
//! first button: the bot, the outbox sender and a fake Bot API on loopback (the chat
//! bench's) run in this process. Every minute it samples this process's RSS, the
//! database's connections, the opsloop tables' rows and size, the outbox's backlog,
//! that minute's propose → first step started latencies and question asked → answered
//! ones; the JSON line has the first and the last minute side by side.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::chat::{Fake, PERSON, TOKEN};
use super::{Scratch, line, percentile, round2};
use crate::db::Database;
use crate::domain::error::OpsError;
use crate::domain::policy::Policy;
use crate::domain::vocab::EventKind;
use crate::engine::heartbeat;
use crate::engine::notify::sender::Sender;
use crate::engine::proposals::{self, NewProposal, Source};
use crate::engine::worker::Worker;
use crate::interfaces::bot;
use crate::store::policy::{self as policy_store, PolicyCache};
use crate::store::{events, users};

fn soak_policy(sink: u16) -> String {
    format!(
        r#"
[gates]
max_pending = 1000000

[worker]
concurrency = 8
lease = "1m"

[heartbeat]
interval = "1s"

[retention]
missions = "2m"
events = "2m"
reactions = "2m"
action_runs = "2m"
notifications = "2m"

[templates.mix]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "sample number" }}
steps = [
  {{ name = "sh", kind = "shell", run = ["echo", "soak {{n}}"] }},
  {{ name = "post", kind = "http", method = "POST", url = "http://127.0.0.1:{sink}/sink", json = {{ n = "{{n}}" }} }},
  {{ name = "nap", kind = "sleep", for = "50ms" }},
  {{ name = "end", kind = "noop" }},
]

[templates.ask]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "question number" }}
steps = [
  {{ name = "q", kind = "ask", question = "Go on with soak {{n}}?", choices = ["yes", "no"] }},
  {{ name = "after", kind = "noop" }},
]

# Questions reach the person whatever this says; mission cards at 10 missions a
# second would only queue behind Telegram's 1 message/s per chat.
[notify]
events = ["{failed}"]

[templates.react]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "event number" }}
steps = [ {{ name = "r", kind = "noop" }} ]

[templates.cron]
risk = "low"
steps = [ {{ name = "c", kind = "noop" }} ]

[[reactions]]
name = "each-ping"
on = "soak.ping"
propose = "react"
params = {{ n = "{{payload.n}}" }}

[[triggers]]
name = "every-minute"
cron = "* * * * *"
propose = "cron"
"#,
        failed = EventKind::MissionFailed.as_str(),
    )
}

/// One minute's look at the system.
async fn sample(pool: &PgPool, since: DateTime<Utc>) -> anyhow::Result<Value> {
    let rss_kb = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let connections: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?;
    let (rows, bytes): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(n_live_tup), 0)::bigint,
                coalesce(sum(pg_total_relation_size(relid)), 0)::bigint
         FROM pg_stat_user_tables WHERE relname LIKE 'ops\\_%'",
    )
    .fetch_one(pool)
    .await?;
    let mut latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM (s.started_at - m.started_at)) * 1000.0)::float8
         FROM ops_missions m JOIN ops_mission_steps s ON s.mission_id = m.id AND s.seq = 1
         WHERE m.template = 'mix' AND m.started_at >= $1 AND s.started_at IS NOT NULL",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    latencies.sort_by(f64::total_cmp);
    // The biggest tables, with their dead rows: where growth is, when there is some.
    let biggest: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, pg_total_relation_size(relid)::bigint, n_live_tup, n_dead_tup
         FROM pg_stat_user_tables WHERE relname LIKE 'ops\\_%'
         ORDER BY 2 DESC LIMIT 4",
    )
    .fetch_all(pool)
    .await?;
    let biggest: serde_json::Map<String, Value> = biggest
        .into_iter()
        .map(|(table, bytes, live, dead)| {
            let mb = round2(bytes as f64 / 1024.0 / 1024.0);
            (table, json!({ "mb": mb, "live": live, "dead": dead }))
        })
        .collect();
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops_missions WHERE status = 'running'")
            .fetch_one(pool)
            .await?;
    let mut waits: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM (answered_at - created_at)) * 1000.0)::float8
         FROM ops_questions WHERE created_at >= $1 AND answered_at IS NOT NULL",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    waits.sort_by(f64::total_cmp);
    let (open, outbox): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM ops_questions WHERE status = 'open'),
                (SELECT count(*) FROM ops_notifications WHERE status = 'pending')",
    )
    .fetch_one(pool)
    .await?;
    Ok(json!({
        "rss_mb": round2(rss_kb as f64 / 1024.0),
        "connections": connections,
        "live_rows": rows,
        "table_mb": round2(bytes as f64 / 1024.0 / 1024.0),
        "biggest_tables": biggest,
        "missions_running": running,
        "missions_started": latencies.len(),
        "start_p50_ms": round2(percentile(&latencies, 50.0)),
        "start_p99_ms": round2(percentile(&latencies, 99.0)),
        "questions_answered": waits.len(),
        "question_answered_p50_ms": round2(percentile(&waits, 50.0)),
        "question_answered_p99_ms": round2(percentile(&waits, 99.0)),
        "questions_open": open,
        "outbox_backlog": outbox,
    }))
}

/// The sink the http steps post to.
async fn sink() -> anyhow::Result<(u16, CancellationToken)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let stop = CancellationToken::new();
    let app = axum::Router::new().route("/sink", axum::routing::post(|| async { "ok" }));
    let until = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(until.cancelled_owned())
            .await;
    });
    Ok((port, stop))
}

/// The Telegram side: a person (an admin who has sent /start) on a fake Bot API, the
/// bot and the outbox sender, and the person's thumb: every question that reaches them
/// is answered with its first choice.
async fn person_in_telegram(
    pool: &PgPool,
    policy: &Policy,
    cache: &PolicyCache,
    stop: &CancellationToken,
) -> anyhow::Result<(Fake, JoinHandle<std::io::Result<()>>, Vec<JoinHandle<()>>)> {
    users::grant(pool, PERSON, users::Role::Admin, Source::Cli, "bench").await?;
    let fake = Fake::default();
    let (url, server) = fake.serve().await?;
    let telegram = bot::bot(TOKEN, &url)?;
    let bot_task = tokio::spawn(bot::run(
        pool.clone(),
        telegram.clone(),
        TOKEN,
        cache.clone(),
        stop.clone(),
    ));
    let sender = Sender::new(pool.clone(), telegram, &policy.telegram);
    let sender_task = tokio::spawn({
        let stop = stop.clone();
        async move { sender.run(stop).await }
    });
    fake.say("/start");
    let thumb = tokio::spawn({
        let (fake, stop) = (fake.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                for (_, _, message, text) in fake.take_sent() {
                    if let Some(question) = question_in(&text) {
                        fake.tap(message, &format!("q:{question}:0"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    Ok((fake, server, vec![bot_task, sender_task, thumb]))
}

/// The question a message asks ("… question #12</b> …"), if it asks one.
fn question_in(text: &str) -> Option<i64> {
    let (_, after) = text.split_once("question #")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    if !after[digits.len()..].starts_with("</b>") {
        return None;
    }
    digits.parse().ok()
}

pub async fn soak(db: &Database, minutes: u32) -> anyhow::Result<Value> {
    if minutes == 0 {
        return Err(OpsError::bad_input("--minutes must be at least 1").into());
    }
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    let (port, sink_stop) = sink().await?;
    let source = soak_policy(port);
    policy_store::apply(&pool, &source, "bench").await?;
    let policy =
        crate::domain::policy::parse(&source).map_err(|p| anyhow::anyhow!("soak policy: {p:?}"))?;
    let cache = PolicyCache::default();
    cache.refresh(&pool).await?;
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(pool.clone(), cache.clone(), 8).run(stop.clone(), Duration::from_secs(5)),
    );
    let (fake, fake_server, telegram) = person_in_telegram(&pool, &policy, &cache, &stop).await?;
    let ticking = tokio::spawn({
        let (pool, policy, stop) = (pool.clone(), policy.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                let _ = heartbeat::tick(&pool, &policy).await;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    });
    let mut samples = Vec::new();
    let (mut n, mut failures) = (0u64, 0u64);
    for _ in 0..minutes {
        let minute_started = Utc::now();
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut every = tokio::time::interval(Duration::from_millis(100));
        while tokio::time::Instant::now() < until {
            every.tick().await;
            n += 1;
            let proposal = NewProposal {
                template: "mix".into(),
                params: [("n".to_string(), n.to_string())].into(),
                proposed_by: "bench".into(),
                source: Source::Cli,
                priority: None,
                may_raise_priority: false,
            };
            if proposals::propose(&pool, &policy, proposal).await.is_err() {
                failures += 1;
            }
            if n % 50 == 0 {
                let ask = NewProposal {
                    template: "ask".into(),
                    params: [("n".to_string(), n.to_string())].into(),
                    proposed_by: "bench".into(),
                    source: Source::Cli,
                    priority: None,
                    may_raise_priority: false,
                };
                if proposals::propose(&pool, &policy, ask).await.is_err() {
                    failures += 1;
                }
            }
            if n % 5 == 0 {
                let ping = json!({ "n": n.to_string() });
                if events::emit_user(&pool, "soak.ping", "bench", ping)
                    .await
                    .is_err()
                {
                    failures += 1;
                }
            }
        }
        samples.push(sample(&pool, minute_started).await?);
    }
    stop.cancel();
    let _ = worker.await;
    let _ = ticking.await;
    for task in telegram {
        let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    }
    fake_server.abort();
    drop(fake);
    sink_stop.cancel();
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops_missions WHERE status = 'succeeded'")
            .fetch_one(&pool)
            .await?;
    let out = line(
        &pool,
        json!({
            "bench": "soak",
            "minutes": minutes,
            "proposals": n,
            "errors": failures,
            "missions_succeeded_still_kept": succeeded,
            "first_minute": samples.first(),
            "last_minute": samples.last(),
            "every_minute": samples,
        }),
    )
    .await;
    scratch.drop().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::question_in;

    #[test]
    fn questions_are_found_in_their_messages() {
        assert_eq!(question_in("❓ <b>question #12</b> from mission"), Some(12));
        assert_eq!(question_in("question #12 from"), None);
        assert_eq!(question_in("proposal #3</b>"), None);
        assert_eq!(question_in("question #</b>"), None);
    }
}
