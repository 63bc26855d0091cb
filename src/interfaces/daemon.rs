//! `opsloop run` and `opsloop worker`: start the loop's parts on one database and stop
//! them cleanly on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::db::{self, Database};
use crate::domain::config::Settings;
use crate::domain::error::{OpsError, OpsResult};
use crate::engine::heartbeat::{self, TickSummary};
use crate::engine::notify::sender::Sender;
use crate::engine::worker::{self, Worker};
use crate::interfaces::bot;
use crate::interfaces::http;
use crate::store::policy::{self as policy_store, PolicyCache};
use crate::store::users;

/// The daemon: heartbeat and worker (and, when configured, the bot and HTTP).
pub async fn run(settings: Settings, policy_file: Option<PathBuf>) -> anyhow::Result<()> {
    // Bind first: a taken address fails at once, before any slow start-up work.
    let listener = http::bind(settings.http_addr).await?;
    let shutdown = shutdown_on_signal();
    let db = Database::open(&settings, 16).await?;
    let pool = db.pool.clone();
    db::migrate(&pool).await?;
    // Serve as soon as the database is usable, so /healthz answers during start-up.
    let policy = PolicyCache::default();
    let state = http::AppState::new(pool.clone(), policy.clone(), settings.ops_key.as_deref());
    let http_addr = settings.http_addr;
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if let Err(e) = http::serve(listener, state, shutdown).await {
                error!(error = %e, "the HTTP server stopped");
            }
        }
    });
    info!(addr = %http_addr, api = settings.ops_key.is_some(), "HTTP listening");
    if settings.ops_key.is_none() {
        info!("OPS_KEY is not set: /api/* refuses every call");
    }
    if let Some(path) = policy_file.or_else(|| settings.policy_file.clone()) {
        let source = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the policy file {}", path.display()))?;
        let version = policy_store::apply(&pool, &source, "opsloop run").await?;
        info!(file = %path.display(), version, "policy applied");
    }
    users::ensure_admins(&pool, &settings.admins).await?;
    if policy.refresh(&pool).await?.is_none() {
        warn!(
            "no policy applied yet: `opsloop policy apply FILE` (daemons pick it up within a tick)"
        );
    }
    let telegram = start_telegram(&settings, &pool, &policy, &shutdown).await?;
    let concurrency = policy.get().await.worker.concurrency as usize;
    let worker = Worker::new(pool.clone(), policy.clone(), concurrency);
    let heart = tokio::spawn(heartbeat_loop(
        pool.clone(),
        policy.clone(),
        shutdown.clone(),
    ));
    info!("opsloop running; stop with Ctrl-C or SIGTERM");
    let worked = worker.run(shutdown.clone(), worker::SHUTDOWN_GRACE).await;
    shutdown.cancel();
    let _ = heart.await;
    for task in telegram {
        let _ = task.await;
    }
    // In-flight requests finish; a client that holds a request open does not hold us.
    if tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .is_err()
    {
        warn!("HTTP requests still open after 5s; stopping anyway");
    }
    db.close().await;
    worked
}

/// The bot (one poller per token across hosts) and the outbox sender (one per
/// database), when a token is set.
async fn start_telegram(
    settings: &Settings,
    pool: &PgPool,
    policy: &PolicyCache,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let Some(token) = settings.telegram_token.clone() else {
        info!("TELEGRAM_BOT_TOKEN is not set: the Telegram bot is off");
        return Ok(Vec::new());
    };
    let bot = bot::bot(&token, &settings.telegram_api_url)?;
    let sender = Sender::new(pool.clone(), bot.clone(), &policy.get().await.telegram);
    let poller = tokio::spawn({
        let (pool, policy, shutdown) = (pool.clone(), policy.clone(), shutdown.clone());
        async move { bot::run(pool, bot, &token, policy, shutdown).await }
    });
    let sending = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { sender.run(shutdown).await }
    });
    Ok(vec![poller, sending])
}

/// `opsloop worker`: only the step worker, for extra hosts.
pub async fn run_worker(settings: Settings, concurrency: Option<u32>) -> anyhow::Result<()> {
    if concurrency == Some(0) {
        return Err(OpsError::bad_input("--concurrency must be at least 1").into());
    }
    let db = Database::open(&settings, 8 + concurrency.unwrap_or(4)).await?;
    let pool = db.pool.clone();
    db::migrate(&pool).await?;
    let policy = PolicyCache::default();
    policy.refresh(&pool).await?;
    let shutdown = shutdown_on_signal();
    let concurrency = concurrency.unwrap_or(policy.get().await.worker.concurrency) as usize;
    let refresher = tokio::spawn(refresh_loop(pool.clone(), policy.clone(), shutdown.clone()));
    let worked = Worker::new(pool.clone(), policy, concurrency)
        .run(shutdown.clone(), worker::SHUTDOWN_GRACE)
        .await;
    shutdown.cancel();
    let _ = refresher.await;
    db.close().await;
    worked
}

/// `opsloop tick`.
pub async fn tick_once(pool: &PgPool, _settings: &Settings) -> OpsResult<TickSummary> {
    let policy = PolicyCache::default();
    policy.refresh(pool).await?;
    heartbeat::tick(pool, &*policy.get().await).await
}

async fn heartbeat_loop(pool: PgPool, policy: PolicyCache, shutdown: CancellationToken) {
    loop {
        if let Err(e) = policy.refresh(&pool).await {
            warn!(error = %e, "reloading the policy failed; keeping the previous one");
        }
        let current = policy.get().await;
        match heartbeat::tick(&pool, &current).await {
            Ok(s) if s.ran => tracing::debug!(summary = ?s, "tick"),
            Ok(_) => tracing::debug!("another process is ticking"),
            Err(e) => error!(error = %e, "tick failed"),
        }
        let interval = current.heartbeat.interval.max(Duration::from_millis(100));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Extra workers have no heartbeat; they still follow `policy apply`.
async fn refresh_loop(pool: PgPool, policy: PolicyCache, shutdown: CancellationToken) {
    loop {
        let _ = policy.refresh(&pool).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// A token cancelled on the first SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        info!("shutdown requested");
        cancel.cancel();
    });
    token
}

/// `opsloop doctor` (it lives in `crate::doctor`).
pub use crate::interfaces::doctor::doctor;
