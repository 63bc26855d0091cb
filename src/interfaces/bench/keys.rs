//! `bench keys`: what a flood of wrong keys from one client does to everyone else. The
//! real HTTP server runs on this process's runtime (as in `opsloop run`) against a
//! scratch database with one live agent key; `/healthz` is probed from a thread of its
//! own, first idle, then while another thread (the attacker, with its own runtime as
//! another process would have) sends `requests` wrong keys, `concurrency` at a time,
//! half shaped like agent keys (`olk_…`) and half not.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Scratch, line, percentile, round2};
use crate::db::Database;
use crate::domain::error::OpsError;
use crate::domain::keys::{KeyName, Scopes};
use crate::engine::keys;
use crate::interfaces::http;
use crate::store::policy::PolicyCache;

/// Idle probes before the flood.
const IDLE_PROBES: usize = 1000;
/// The pause between two probes, idle and during the flood: the same cadence in both,
/// or the idle figure is of a server kept awake by back-to-back probes.
const PROBE_EVERY: Duration = Duration::from_millis(5);

pub async fn keys(db: &Database, requests: u32, concurrency: u32) -> anyhow::Result<Value> {
    if requests == 0 || concurrency == 0 {
        return Err(OpsError::bad_input("--requests and --concurrency must be at least 1").into());
    }
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    // One live key, so the filter of live digests is what a host with agents has.
    let scopes = Scopes::parse(&["draft*".into()], &["writer.*".into()], false, false)?;
    keys::create(&pool, &KeyName::parse("writer")?, &scopes, "bench").await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let state = http::AppState::new(pool.clone(), PolicyCache::default(), Some("bench-ops-key"));
    let server = tokio::spawn(http::serve(listener, state, stop.clone()));

    // The probe runs its idle round, then lets the attacker go and probes until the
    // attacker says it is done.
    let (idle_done, idle_rx) = std::sync::mpsc::channel::<()>();
    let over = Arc::new(AtomicBool::new(false));
    let probe = {
        let (base, over) = (base.clone(), over.clone());
        std::thread::spawn(move || probe_healthz(&base, idle_done, &over))
    };
    let attack = {
        let url = format!("{base}/api/events");
        std::thread::spawn(move || {
            if idle_rx.recv().is_err() {
                return Err(anyhow::anyhow!("the probe stopped before the flood"));
            }
            let started = Instant::now();
            let outcome = flood_wrong_keys(&url, requests, concurrency);
            over.store(true, Ordering::Release);
            outcome.map(|(refused, other)| (started.elapsed(), refused, other))
        })
    };
    let flood = attack
        .join()
        .map_err(|_| anyhow::anyhow!("the attacking thread panicked"))?;
    let probed = probe
        .join()
        .map_err(|_| anyhow::anyhow!("the probing thread panicked"))?;
    let (took, refused, other) = flood?;
    let (idle, loaded) = probed?;
    let flood_seconds = took.as_secs_f64();
    stop.cancel();
    let _ = server.await;
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops_agent_events WHERE kind = 'writer.x'")
            .fetch_one(&pool)
            .await?;
    let ms = |v: &[f64], p: f64| round2(percentile(v, p));
    let idle_p95 = percentile(&idle, 95.0);
    let out = line(
        &pool,
        json!({
            "bench": "keys",
            "requests": requests,
            "concurrency": concurrency,
            "refused_401": refused,
            "other_statuses": other,
            "events_stored": stored,
            "flood_seconds": round2(flood_seconds),
            "refusals_per_second": round2(refused as f64 / flood_seconds.max(1e-9)),
            "healthz_idle_p50_ms": ms(&idle, 50.0),
            "healthz_idle_p95_ms": ms(&idle, 95.0),
            "healthz_flood_p50_ms": ms(&loaded, 50.0),
            "healthz_flood_p95_ms": ms(&loaded, 95.0),
            "healthz_flood_p99_ms": ms(&loaded, 99.0),
            "healthz_flood_samples": loaded.len(),
            "p95_ratio": round2(percentile(&loaded, 95.0) / idle_p95.max(1e-9)),
        }),
    )
    .await;
    scratch.drop().await;
    Ok(out)
}

/// `/healthz` latencies in ms, one every `PROBE_EVERY`: `IDLE_PROBES` idle, then (once
/// `idle_done` has let the flood go) until `over`.
fn probe_healthz(
    base: &str,
    idle_done: std::sync::mpsc::Sender<()>,
    over: &AtomicBool,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let url = format!("{base}/healthz");
    runtime.block_on(async move {
        let client = reqwest::Client::new();
        let once = || {
            let request = client.get(&url);
            async move {
                let t = Instant::now();
                let r = request.send().await?;
                if r.status() != StatusCode::OK {
                    anyhow::bail!("/healthz answered {}", r.status());
                }
                Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64() * 1000.0)
            }
        };
        let mut idle = Vec::with_capacity(IDLE_PROBES);
        for _ in 0..IDLE_PROBES {
            idle.push(once().await?);
            tokio::time::sleep(PROBE_EVERY).await;
        }
        let _ = idle_done.send(());
        let mut loaded = Vec::new();
        while !over.load(Ordering::Acquire) {
            loaded.push(once().await?);
            tokio::time::sleep(PROBE_EVERY).await;
        }
        idle.sort_by(f64::total_cmp);
        loaded.sort_by(f64::total_cmp);
        Ok((idle, loaded))
    })
}

/// Sends `requests` wrong keys to `url`, `concurrency` at a time, on a runtime of its
/// own (call it from a thread of its own); returns the 401s and a count of any other
/// status by status (empty when every one was a 401). Tests use it too.
pub fn flood_wrong_keys(
    url: &str,
    requests: u32,
    concurrency: u32,
) -> anyhow::Result<(u64, Value)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = reqwest::Client::new();
        let mut unauthorized = 0u64;
        let mut other = serde_json::Map::new();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..requests {
            if set.len() >= concurrency as usize {
                tally(set.join_next().await, &mut unauthorized, &mut other);
            }
            let wrong = if i % 2 == 0 {
                format!("olk_{i:043}")
            } else {
                format!("guess-{i}")
            };
            let request = client
                .post(url)
                .bearer_auth(wrong)
                .json(&json!({ "kind": "writer.x" }));
            set.spawn(async move { request.send().await.map(|r| r.status()) });
        }
        while let Some(done) = set.join_next().await {
            tally(Some(done), &mut unauthorized, &mut other);
        }
        Ok((unauthorized, Value::Object(other)))
    })
}

type Sent = Result<Result<StatusCode, reqwest::Error>, tokio::task::JoinError>;

fn tally(done: Option<Sent>, unauthorized: &mut u64, other: &mut serde_json::Map<String, Value>) {
    let label = match done {
        None => return,
        Some(Ok(Ok(StatusCode::UNAUTHORIZED))) => {
            *unauthorized += 1;
            return;
        }
        Some(Ok(Ok(status))) => status.as_u16().to_string(),
        Some(Ok(Err(_))) => "transport error".to_string(),
        Some(Err(_)) => "task failed".to_string(),
    };
    let n = other.get(&label).and_then(Value::as_u64).unwrap_or(0);
    other.insert(label, json!(n + 1));
}
