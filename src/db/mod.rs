//! The database: connecting (to `DATABASE_URL` or the embedded cluster), migrations,
//! the advisory-lock keys (`locks`) and the singletons they make across hosts
//! (`singleton`).

pub mod embedded;
pub mod locks;
pub mod pooler;
pub mod singleton;
pub mod vacuum;

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};

use crate::domain::config::{Settings, redact_url};
use embedded::EmbeddedPostgres;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// NOTIFY channels.
pub mod channels {
    /// A step became ready to claim (payload unused).
    pub const STEPS_READY: &str = "ops_steps_ready";
    /// A new event (payload: its id).
    pub const EVENTS: &str = "ops_events";
    /// A mission was cancelled (payload: its id); workers kill its running step.
    pub const CANCEL: &str = "ops_cancel";
    /// New outbox rows (payload unused).
    pub const OUTBOX: &str = "ops_outbox";
    /// A question was answered, expired or cancelled (payload: its id, or empty for several).
    pub const QUESTIONS: &str = "ops_questions";
    /// An agent key was created or revoked (payload unused): HTTP servers reload their
    /// filter of live keys.
    pub const KEYS: &str = "ops_keys";
}

/// NOTIFY `channel` in the caller's transaction: listeners hear it on commit.
pub async fn notify(
    conn: &mut sqlx::PgConnection,
    channel: &str,
) -> crate::domain::error::OpsResult<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(conn)
        .await?;
    Ok(())
}

/// An open database: the pool, and the embedded cluster when this process started one
/// (it is stopped when this value is dropped).
pub struct Database {
    pub pool: PgPool,
    url: String,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// A database this process connected to itself (no embedded cluster to stop).
    pub fn from_pool(pool: PgPool, url: &str) -> Database {
        Database {
            pool,
            url: url.to_string(),
            embedded: None,
        }
    }

    /// Connect to `DATABASE_URL`, or start (or attach to) the embedded cluster.
    pub async fn open(settings: &Settings, max_connections: u32) -> anyhow::Result<Database> {
        match &settings.database_url {
            Some(url) => {
                let pool = connect(url, max_connections).await?;
                pooler::refuse_transaction_pooling(&pool.connect_options()).await?;
                Ok(Database {
                    pool,
                    url: url.clone(),
                    embedded: None,
                })
            }
            None => {
                let dir = settings.data_dir.clone();
                let cluster = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir))
                    .await
                    .context("embedded PostgreSQL start-up panicked")??;
                create_database_if_missing(&cluster.url("postgres"), "opsloop").await?;
                let url = cluster.url("opsloop");
                let pool = connect(&url, max_connections).await?;
                Ok(Database {
                    pool,
                    url,
                    embedded: Some(cluster),
                })
            }
        }
    }

    /// The URL this database was opened with (it may hold a password: never print it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Close the pool, then stop the embedded cluster if this process started it.
    pub async fn close(mut self) {
        self.pool.close().await;
        if let Some(mut cluster) = self.embedded.take() {
            let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
        }
    }
}

/// Set on every connection right after it is made. Not as startup `options`: PgBouncer
/// refuses those ("unsupported startup parameter: options").
///
/// - Plan every statement with its actual parameters: a generic plan cannot see how
///   small a batch array is and scans whole (ever-growing) tables instead.
/// - End a transaction left idle for 30 s: opsloop's transactions are short, so one
///   that idles is one whose client is gone (its connection dropped by the network)
///   and would otherwise hold its row locks until the server notices, if ever.
/// - No JIT: every statement here is short, and the claim's correlated probe of its
///   mission puts its estimated cost over `jit_above_cost`, so each claim compiled
///   itself (35 to 200 ms, against 1 ms to run; `benches/results.md`, issue 16).
pub const SESSION_SETUP: &str = "SELECT set_config('plan_cache_mode', 'force_custom_plan', false),
        set_config('idle_in_transaction_session_timeout', '30s', false),
        set_config('jit', 'off', false)";

/// Only startup parameters a pooler accepts. PgBouncer refuses the ones it does not
/// track ("unsupported startup parameter"), such as sqlx's default `extra_float_digits`,
/// which since PostgreSQL 12 changes nothing (any value above 0 prints floats exactly).
pub fn pooler_safe(options: PgConnectOptions) -> PgConnectOptions {
    options.extra_float_digits(None)
}

pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("DATABASE_URL {} is not a PostgreSQL URL", redact_url(url)))?;
    let options = pooler_safe(options)
        .application_name("opsloop")
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(2));
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(10))
        // The simple protocol: no prepared statement is left behind for this.
        .after_connect(|conn, _| {
            Box::pin(async move { conn.execute(SESSION_SETUP).await.map(drop) })
        })
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at {}", redact_url(url)))
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("applying database migrations")
}

/// `CREATE DATABASE name` unless it exists (two processes racing is fine).
pub async fn create_database_if_missing(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let pool = connect(admin_url, 1).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&pool)
            .await?;
    if !exists {
        // Identifiers cannot be bound; `name` is ours, quoted anyway.
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        if let Err(e) = sqlx::query(&sql).execute(&pool).await {
            let duplicate = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P04" || c == "23505");
            if !duplicate {
                return Err(e).context("creating the opsloop database");
            }
        }
    }
    pool.close().await;
    Ok(())
}

/// A duration as a bindable Postgres interval: whole microseconds (Postgres refuses
/// finer precision), saturating instead of failing on absurd values.
pub fn interval(d: Duration) -> chrono::Duration {
    let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2);
    chrono::Duration::microseconds(micros.min(i64::MAX / 2))
}

/// `url` with its database replaced by `name` (query parameters such as a socket
/// `host` are kept).
pub fn with_database(url: &str, name: &str) -> String {
    let (head, query) = url
        .split_once('?')
        .map_or((url, None), |(h, q)| (h, Some(q)));
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let base = head[scheme_end..]
        .find('/')
        .map_or(head, |i| &head[..scheme_end + i]);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_is_replaced_and_query_kept() {
        assert_eq!(
            super::with_database("postgres://u@h:5/a", "b"),
            "postgres://u@h:5/b"
        );
        assert_eq!(
            super::with_database("postgres://u@h", "b"),
            "postgres://u@h/b"
        );
        assert_eq!(
            super::with_database("postgres://u@localhost/a?host=/x&port=5432", "b"),
            "postgres://u@localhost/b?host=/x&port=5432"
        );
    }
}
