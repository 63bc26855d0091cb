//! The Telegram bot (design §6): one dptree handler tree, handlers as plain async
//! functions calling the same library functions as the CLI. Replies go through the
//! outbox; button taps are answered at once. Only one process polls a token at a time
//! (advisory lock); another takes over when it dies.

mod access;
mod commands;
mod taps;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use teloxide::dispatching::UpdateHandler;
use teloxide::error_handlers::LoggingErrorHandler;
use teloxide::prelude::*;
use teloxide::update_listeners::Polling;
use teloxide::utils::command::BotCommands;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use commands::Command;

/// Slow-down answers are sent once until the user is within limits again.
pub const SLOW_DOWN: &str =
    "🐢 Too many commands; slow down a little, I will answer again shortly.";

use crate::db::locks;
use crate::policy::store::PolicyCache;

/// What every handler may use.
pub struct BotState {
    pub pool: PgPool,
    pub policy: PolicyCache,
    /// The bot's own username, for `/cmd@botname` in groups.
    pub username: String,
    pub limits: access::Limiter,
}

type HandlerResult = Result<(), anyhow::Error>;

/// The handler tree: messages (commands) and callback queries (button taps).
pub fn schema() -> UpdateHandler<anyhow::Error> {
    dptree::entry()
        .branch(Update::filter_message().endpoint(commands::on_message))
        .branch(Update::filter_callback_query().endpoint(taps::on_tap))
}

/// Build the bot for `token` against `api_url` (Telegram, a local Bot API server, tests).
pub fn bot(token: &str, api_url: &str) -> anyhow::Result<Bot> {
    let url = reqwest::Url::parse(api_url)
        .map_err(|e| anyhow::anyhow!("TELEGRAM_API_URL {api_url:?} is not a URL: {e}"))?;
    let client = teloxide::net::default_reqwest_settings()
        .timeout(Duration::from_secs(40))
        .build()?;
    Ok(Bot::with_client(token, client).set_api_url(url))
}

/// Poll for updates while holding this token's lock, until `shutdown`.
pub async fn run(
    pool: PgPool,
    bot: Bot,
    token: &str,
    policy: PolicyCache,
    shutdown: CancellationToken,
) {
    let key = token_key(token);
    while !shutdown.is_cancelled() {
        match poll_while_leader(&pool, &bot, key, &policy, &shutdown).await {
            Ok(true) => {}
            Ok(false) => {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
            Err(e) => {
                warn!(error = %e, "Telegram poller stopped; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    }
}

/// A lock key per token that does not reveal the token (FNV-1a).
fn token_key(token: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in token.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash as i32
}

/// Returns Ok(false) when another process holds the lock.
async fn poll_while_leader(
    pool: &PgPool,
    bot: &Bot,
    key: i32,
    policy: &PolicyCache,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let mut lock = pool.acquire().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1::int, $2::int)")
        .bind(locks::TELEGRAM_POLLER as i32)
        .bind(key)
        .fetch_one(&mut *lock)
        .await?;
    if !got {
        return Ok(false);
    }
    let me = bot.get_me().await?;
    let username = me.username.clone().unwrap_or_default();
    info!(bot = %username, "Telegram poller active");
    if let Err(e) = bot.set_my_commands(Command::bot_commands()).await {
        warn!(error = %e, "setMyCommands failed; the command menu may be stale");
    }
    let state = Arc::new(BotState {
        pool: pool.clone(),
        policy: policy.clone(),
        username,
        limits: access::Limiter::new(&policy.get().await.telegram),
    });
    let mut dispatcher = Dispatcher::builder(bot.clone(), schema())
        .dependencies(dptree::deps![state])
        .default_handler(|_| async {})
        .build();
    let stop = dispatcher.shutdown_token();
    let listener = Polling::builder(bot.clone())
        .timeout(Duration::from_secs(10))
        .delete_webhook()
        .await
        .build();
    let lost = CancellationToken::new();
    let watcher = {
        let (shutdown, lost) = (shutdown.clone(), lost.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        // The lock lives with this connection: if it is gone, so is our turn.
                        if sqlx::query("SELECT 1").execute(&mut *lock).await.is_err() {
                            warn!("lost the Telegram poller lock's connection");
                            lost.cancel();
                            break;
                        }
                    }
                }
            }
            // Wait until the dispatcher accepts the shutdown (it may still be starting).
            loop {
                match stop.shutdown() {
                    Ok(done) => {
                        let _ = tokio::time::timeout(Duration::from_secs(15), done).await;
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            let _ = sqlx::query("SELECT pg_advisory_unlock($1::int, $2::int)")
                .bind(locks::TELEGRAM_POLLER as i32)
                .bind(key)
                .execute(&mut *lock)
                .await;
        }
    };
    let watcher = tokio::spawn(watcher);
    dispatcher
        .dispatch_with_listener(
            listener,
            LoggingErrorHandler::with_custom_text("Telegram polling"),
        )
        .await;
    let _ = watcher.await;
    info!("Telegram poller stopped");
    Ok(!lost.is_cancelled())
}
