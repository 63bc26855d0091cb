//! The Telegram bot (docs/telegram.md): one dptree handler tree, handlers as plain async
//! functions calling the same library functions as the CLI. Replies go through the
//! outbox; button taps are answered at once. Only one process polls a token at a time
//! (`db::singleton`); another takes over when it dies or loses the lock.

mod access;
mod answers;
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
// For the parsers' property tests (tests/fuzz.rs).
pub use taps::parse_data as parse_callback_data;

/// Slow-down answers are sent once until the user is within limits again.
pub const SLOW_DOWN: &str =
    "🐢 Too many commands; slow down a little, I will answer again shortly.";

use crate::db::locks;
use crate::db::singleton::Singleton;
use crate::store::policy::PolicyCache;

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
        .branch(commands::schema())
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

/// How long the poller may take to stop once asked: its handlers finish and its last
/// getUpdates confirms what they handled, unless the Bot API is slower than this.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Poll for updates while holding this token's lock, until `shutdown`.
pub async fn run(
    pool: PgPool,
    bot: Bot,
    token: &str,
    policy: PolicyCache,
    shutdown: CancellationToken,
) {
    Singleton::new(&pool, locks::telegram_poller(token), "Telegram poller")
        .run(&shutdown, |stop| {
            let (pool, bot, policy) = (pool.clone(), bot.clone(), policy.clone());
            async move { poll(&pool, &bot, &policy, stop).await }
        })
        .await;
}

/// Poll until `stop` (shutdown, or this process lost the poller's lock).
async fn poll(
    pool: &PgPool,
    bot: &Bot,
    policy: &PolicyCache,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let me = tokio::select! {
        me = bot.get_me() => me?,
        _ = stop.cancelled() => return Ok(()),
    };
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
    let dispatching = dispatcher.shutdown_token();
    let listener = Polling::builder(bot.clone())
        .timeout(Duration::from_secs(10))
        .delete_webhook()
        .await
        .build();
    let stopping = stop.clone();
    let stopper = tokio::spawn(async move {
        stop.cancelled().await;
        // Ask until the dispatcher accepts the shutdown (it may still be starting). The
        // call starts it; how long it may take is bounded below, not here.
        while dispatching.shutdown().is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let dispatching = dispatcher.dispatch_with_listener(
        listener,
        LoggingErrorHandler::with_custom_text("Telegram polling"),
    );
    tokio::select! {
        () = dispatching => {}
        // The dispatcher's shutdown ends with one more getUpdates, to confirm the
        // updates it handled; a Bot API that does not answer it would hold the exit up
        // for the client's whole timeout (40 s). Updates it could not confirm come
        // again at the next start, as after a crash.
        () = async {
            stopping.cancelled().await;
            tokio::time::sleep(STOP_GRACE).await;
        } => warn!(
            grace_s = STOP_GRACE.as_secs(),
            "Telegram poller: the Bot API did not answer in time; stopping without it"
        ),
    }
    stopper.abort();
    info!("Telegram poller stopped");
    Ok(())
}
