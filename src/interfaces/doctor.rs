//! `opsloop doctor`: check the setup and explain, one line per check with its fix.
//! Works when the database is unreachable (that is one of the things it reports), never
//! changes anything (no migrations, no policy apply), and never prints a secret.
//!
//! Long because it is a list of independent checks, each short, each with its fix.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

use crate::db::{Database, MIGRATOR, pooler, vacuum};
use crate::domain::config::{Settings, redact_url};
use crate::domain::policy;
use crate::store::policy as policy_store;

const DB_TIMEOUT: Duration = Duration::from_secs(5);
const TELEGRAM_TIMEOUT: Duration = Duration::from_secs(5);
const CLOCK_TOLERANCE: Duration = Duration::from_secs(2);

/// Printed lines and the count of failures.
#[derive(Default)]
struct Report {
    failures: usize,
    warnings: usize,
}

impl Report {
    fn ok(&mut self, check: &str, what: impl Display) {
        println!("ok    {check}: {what}");
    }
    fn warn(&mut self, check: &str, what: impl Display, fix: impl Display) {
        self.warnings += 1;
        println!("warn  {check}: {what}; fix: {fix}");
    }
    fn fail(&mut self, check: &str, what: impl Display, fix: impl Display) {
        self.failures += 1;
        println!("FAIL  {check}: {what}; fix: {fix}");
    }
    fn skip(&mut self, check: &str, why: impl Display) {
        println!("skip  {check}: {why}");
    }
}

/// Run every check; the exit code is 0 when none failed (warnings allowed), else 1.
pub async fn doctor(
    settings: &Settings,
    policy_file: Option<PathBuf>,
    max_transaction_age: Duration,
) -> i32 {
    let mut report = Report::default();
    let mut db = check_database(&mut report, settings).await;
    let mut no_db = "no database to look at";
    if let Some(d) = &db
        && settings.database_url.is_some()
        && !check_pooler(&mut report, &d.pool).await
    {
        if let Some(d) = db.take() {
            d.close().await;
        }
        no_db = "the connections do not keep their session (see pooler)";
    }
    let migrated = match &db {
        Some(db) => check_migrations(&mut report, &db.pool).await,
        None => {
            report.skip("migrations", no_db);
            false
        }
    };
    let policy_file = policy_file.or_else(|| settings.policy_file.clone());
    check_policy(
        &mut report,
        policy_file.as_deref(),
        db.as_ref().filter(|_| migrated).map(|d| &d.pool),
    )
    .await;
    check_telegram(&mut report, settings).await;
    if settings.admins.is_empty() {
        report.fail(
            "admins",
            "OPSLOOP_ADMINS is empty: nobody can approve or administer from Telegram",
            "set OPSLOOP_ADMINS to your Telegram user id (the bot tells unknown users their id)",
        );
    } else {
        report.ok(
            "admins",
            format!("OPSLOOP_ADMINS names {} admin(s)", settings.admins.len()),
        );
    }
    match &db {
        Some(db) => check_clock(&mut report, &db.pool).await,
        None => report.skip("clock", no_db),
    }
    match &db {
        Some(db) => {
            check_old_transactions(&mut report, &db.pool, max_transaction_age).await;
            check_autovacuum(&mut report, &db.pool).await;
            if migrated {
                check_bloat(&mut report, &db.pool).await;
            } else {
                report.skip(
                    "bloat",
                    "the queue tables are not as this binary knows them",
                );
            }
        }
        None => {
            report.skip("transactions", no_db);
            report.skip("autovacuum", no_db);
            report.skip("bloat", no_db);
        }
    }
    check_http_addr(&mut report, settings.http_addr).await;
    if let Some(db) = db {
        db.close().await;
    }
    if report.failures == 0 {
        println!(
            "all checks passed{}",
            if report.warnings > 0 {
                format!(" ({} warning(s))", report.warnings)
            } else {
                String::new()
            }
        );
        0
    } else {
        println!("{} problem(s) found", report.failures);
        1
    }
}

async fn check_database(report: &mut Report, settings: &Settings) -> Option<Database> {
    const CHECK: &str = "database";
    match &settings.database_url {
        Some(url) => {
            let shown = redact_url(url);
            let options: PgConnectOptions = match url.parse() {
                Ok(o) => o,
                Err(_) => {
                    report.fail(
                        CHECK,
                        format!("DATABASE_URL {shown} is not a PostgreSQL URL"),
                        "write it as postgres://USER:PASSWORD@HOST:5432/DATABASE",
                    );
                    return None;
                }
            };
            let options = crate::db::pooler_safe(options).application_name("opsloop doctor");
            // One plain connection first: a pool would hide the cause behind a timeout.
            let result = match tokio::time::timeout(DB_TIMEOUT, options.connect()).await {
                Ok(r) => r.map_err(|e| {
                    let missing_db = e
                        .as_database_error()
                        .and_then(|d| d.code())
                        .is_some_and(|c| c == "3D000");
                    (e.to_string(), missing_db)
                }),
                Err(_) => Err((format!("no answer within {}s", DB_TIMEOUT.as_secs()), false)),
            };
            match result {
                Ok(conn) => {
                    let _ = conn.close().await;
                    report.ok(CHECK, format!("PostgreSQL answers at {shown}"));
                    let pool = PgPoolOptions::new()
                        .max_connections(2)
                        .acquire_timeout(DB_TIMEOUT)
                        .connect_lazy_with(options);
                    Some(Database::from_pool(pool, url))
                }
                Err((error, true)) => {
                    report.fail(
                        CHECK,
                        format!("cannot connect to {shown}: {error}"),
                        "create that database (createdb NAME) or correct its name in DATABASE_URL",
                    );
                    None
                }
                Err((error, false)) => {
                    report.fail(
                        CHECK,
                        format!("cannot connect to {shown}: {error}"),
                        "check DATABASE_URL (host, port, user, password) and that PostgreSQL is running there",
                    );
                    None
                }
            }
        }
        None => match Database::open(settings, 2).await {
            Ok(db) => {
                report.ok(
                    CHECK,
                    format!(
                        "embedded PostgreSQL answers (data in {})",
                        settings.data_dir.display()
                    ),
                );
                Some(db)
            }
            Err(e) => {
                report.fail(
                    CHECK,
                    format!("the embedded PostgreSQL did not start: {e:#}"),
                    "install the PostgreSQL server binaries (apt-get install postgresql) or set DATABASE_URL",
                );
                None
            }
        },
    }
}

/// A pooler in transaction mode between opsloop and PostgreSQL (opsloop refuses to
/// start behind one). True when connections keep their session.
async fn check_pooler(report: &mut Report, pool: &PgPool) -> bool {
    const CHECK: &str = "pooler";
    match pooler::probe(&pool.connect_options()).await {
        Ok(pooler::Sessions::Kept) => {
            report.ok(
                CHECK,
                "each connection keeps its server session (PostgreSQL, or a pooler in session mode)",
            );
            true
        }
        Ok(pooler::Sessions::Shared) => {
            report.fail(
                CHECK,
                "DATABASE_URL leads to a connection pooler in transaction (or statement) pooling mode: \
                 advisory locks, LISTEN and prepared statements do not stay on one session, so opsloop refuses to start",
                "set pool_mode = session for opsloop's database in PgBouncer, or point DATABASE_URL at PostgreSQL itself",
            );
            false
        }
        Err(e) => {
            report.fail(
                CHECK,
                format!("cannot tell how connections reach PostgreSQL: {e:#}"),
                "check DATABASE_URL and the pooler's logs",
            );
            false
        }
    }
}

/// Applied migrations against the ones built into this binary. True when all match.
async fn check_migrations(report: &mut Report, pool: &PgPool) -> bool {
    const CHECK: &str = "migrations";
    let applied: Vec<(i64, bool, Vec<u8>)> = match sqlx::query_as(
        "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(e)
            if e.as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P01") =>
        {
            report.fail(
                CHECK,
                "the database has no opsloop tables yet",
                "run `opsloop migrate` (`opsloop run` also migrates at start)",
            );
            return false;
        }
        Err(e) => {
            report.fail(
                CHECK,
                format!("cannot read the migrations table: {e}"),
                "check the database user's privileges",
            );
            return false;
        }
    };
    let known: Vec<_> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    if let Some((version, ..)) = applied.iter().find(|(_, success, _)| !success) {
        report.fail(
            CHECK,
            format!("migration {version} failed part-way"),
            "look at the database's log, fix the cause, then run `opsloop migrate`",
        );
        return false;
    }
    if let Some((version, ..)) = applied
        .iter()
        .find(|(v, ..)| !known.iter().any(|m| m.version == *v))
    {
        report.fail(
            CHECK,
            format!("the database has migration {version}, which this binary does not know"),
            "a newer opsloop migrated it: upgrade this binary to the same version",
        );
        return false;
    }
    if let Some(m) = known.iter().find(|m| {
        applied
            .iter()
            .any(|(v, _, sum)| *v == m.version && sum.as_slice() != m.checksum.as_ref())
    }) {
        report.fail(
            CHECK,
            format!(
                "migration {} ({}) differs from the one applied",
                m.version, m.description
            ),
            "use the opsloop binary that migrated this database (migrations are never edited)",
        );
        return false;
    }
    let pending: Vec<_> = known
        .iter()
        .filter(|m| !applied.iter().any(|(v, ..)| *v == m.version))
        .collect();
    if !pending.is_empty() {
        report.fail(
            CHECK,
            format!(
                "{} migration(s) not applied yet (first: {} {})",
                pending.len(),
                pending[0].version,
                pending[0].description
            ),
            "run `opsloop migrate` (`opsloop run` also migrates at start)",
        );
        return false;
    }
    report.ok(CHECK, format!("all {} migration(s) applied", known.len()));
    true
}

async fn check_policy(report: &mut Report, file: Option<&Path>, pool: Option<&PgPool>) {
    const CHECK: &str = "policy";
    if let Some(file) = file {
        match std::fs::read_to_string(file) {
            Err(e) => report.fail(
                CHECK,
                format!("cannot read the policy file {}: {e}", file.display()),
                "correct --policy / OPSLOOP_POLICY, or make the file readable",
            ),
            Ok(source) => match policy::parse(&source) {
                Ok(p) => report.ok(
                    CHECK,
                    format!(
                        "{} is valid ({} templates, {} reactions, {} triggers)",
                        file.display(),
                        p.templates.len(),
                        p.reactions.len(),
                        p.triggers.len()
                    ),
                ),
                Err(problems) => {
                    let first = problems
                        .first()
                        .map(|p| p.located(file))
                        .unwrap_or_default();
                    report.fail(
                        CHECK,
                        format!(
                            "{} is invalid ({} problem(s)), first: {first}",
                            file.display(),
                            problems.len()
                        ),
                        format!(
                            "run `opsloop policy check {}` to see every problem with its place",
                            file.display()
                        ),
                    );
                }
            },
        }
    }
    let Some(pool) = pool else {
        if file.is_none() {
            report.skip(
                CHECK,
                "no database to read the applied policy from, and no --policy / OPSLOOP_POLICY file",
            );
        }
        return;
    };
    match policy_store::load(pool).await {
        Ok(Some(applied)) => report.ok(
            CHECK,
            format!("the applied policy (version {}) is valid", applied.version),
        ),
        Ok(None) if file.is_some() => report.ok(
            CHECK,
            "no policy applied yet; `opsloop run` applies the file at start",
        ),
        Ok(None) => report.fail(
            CHECK,
            "no policy has been applied",
            "run `opsloop policy apply FILE` (e.g. deploy/opsloop.example.toml)",
        ),
        Err(e) => report.fail(
            CHECK,
            format!("the applied policy: {e}"),
            "apply a corrected file with `opsloop policy apply FILE`",
        ),
    }
}

async fn check_telegram(report: &mut Report, settings: &Settings) {
    const CHECK: &str = "telegram";
    let Some(token) = settings.telegram_token.as_deref() else {
        report.fail(
            CHECK,
            "TELEGRAM_BOT_TOKEN is not set: the bot is off",
            "create a bot with @BotFather and set TELEGRAM_BOT_TOKEN",
        );
        return;
    };
    let api = settings.telegram_api_url.trim_end_matches('/');
    let url = format!("{api}/bot{token}/getMe");
    let shown = format!("{api}/bot<token>/getMe");
    // Whatever a library says, the token never reaches the terminal.
    let clean = |text: String| text.replace(token, "<token>");
    let client = match reqwest::Client::builder().timeout(TELEGRAM_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            report.fail(
                CHECK,
                clean(format!("cannot make an HTTP client: {e}")),
                "check the system's TLS setup",
            );
            return;
        }
    };
    let response = match client.get(&url).send().await {
        Ok(r) => r,
        Err(e) => {
            let why = if e.is_timeout() {
                format!("no answer within {}s", TELEGRAM_TIMEOUT.as_secs())
            } else {
                error_chain(&e.without_url())
            };
            report.fail(
                CHECK,
                clean(format!("the Bot API at {shown} is unreachable: {why}")),
                "check TELEGRAM_API_URL and that this host can reach it (DNS, firewall, proxy)",
            );
            return;
        }
    };
    let status = response.status();
    let body: Option<serde_json::Value> = response.json().await.ok();
    let ok = body
        .as_ref()
        .and_then(|b| b.get("ok"))
        .and_then(|v| v.as_bool());
    match ok {
        Some(true) => {
            let name = body
                .as_ref()
                .and_then(|b| b.pointer("/result/username"))
                .and_then(|v| v.as_str())
                .unwrap_or("?");
            report.ok(
                CHECK,
                clean(format!("getMe at {shown} answers: the bot is @{name}")),
            );
        }
        Some(false) => {
            let description = body
                .as_ref()
                .and_then(|b| b.get("description"))
                .and_then(|v| v.as_str())
                .unwrap_or("no description");
            report.fail(
                CHECK,
                clean(format!(
                    "getMe at {shown} refused the token (HTTP {}): {description}",
                    status.as_u16()
                )),
                "copy the token again from @BotFather into TELEGRAM_BOT_TOKEN",
            );
        }
        None => report.fail(
            CHECK,
            clean(format!(
                "{shown} answered HTTP {} without Bot API JSON",
                status.as_u16()
            )),
            "TELEGRAM_API_URL must point at a Bot API server (default https://api.telegram.org)",
        ),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

async fn check_clock(report: &mut Report, pool: &PgPool) {
    const CHECK: &str = "clock";
    let before = Utc::now();
    let db_now: Result<DateTime<Utc>, _> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await;
    let after = Utc::now();
    let db_now = match db_now {
        Ok(t) => t,
        Err(e) => {
            report.fail(
                CHECK,
                format!("cannot read the database's clock: {e}"),
                "check the database connection",
            );
            return;
        }
    };
    let local = before + (after - before) / 2;
    let skew = (db_now - local).abs();
    let millis = skew.num_milliseconds();
    if skew.to_std().unwrap_or(Duration::MAX) > CLOCK_TOLERANCE {
        report.warn(
            CHECK,
            format!(
                "this host's clock and the database's differ by {:.1}s (leases, cooldowns and cron use the database's)",
                millis as f64 / 1000.0
            ),
            "run NTP on both hosts (timedatectl set-ntp true)",
        );
    } else {
        report.ok(
            CHECK,
            format!("agrees with the database's within {millis} ms"),
        );
    }
}

/// Transactions open for long in this database (a `pg_dump`, a forgotten `BEGIN` in
/// psql) keep every row version since they started: vacuum cannot clean the queue
/// tables behind them. (Since PostgreSQL 14 other databases' transactions do not.)
async fn check_old_transactions(report: &mut Report, pool: &PgPool, max_age: Duration) {
    const CHECK: &str = "transactions";
    let oldest: Result<Vec<(i32, String, f64, String)>, _> = sqlx::query_as(
        "SELECT pid, coalesce(nullif(application_name, ''), usename::text, '?'),
                extract(epoch FROM clock_timestamp() - xact_start)::float8, state
         FROM pg_stat_activity
         WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()
           AND datname = current_database()
           AND clock_timestamp() - xact_start > $1
         ORDER BY xact_start LIMIT 3",
    )
    .bind(crate::db::interval(max_age))
    .fetch_all(pool)
    .await;
    let limit = humantime::format_duration(max_age);
    match oldest {
        Err(e) => report.warn(
            CHECK,
            format!("cannot read pg_stat_activity: {e}"),
            "grant pg_read_all_stats to opsloop's database user to see other sessions",
        ),
        Ok(rows) if rows.is_empty() => {
            report.ok(CHECK, format!("none open longer than {limit}"));
        }
        Ok(rows) => {
            let shown: Vec<String> = rows
                .iter()
                .map(|(pid, app, secs, state)| format!("pid {pid} ({app}, {state}) for {secs:.0}s"))
                .collect();
            report.warn(
                CHECK,
                format!(
                    "{} open longer than {limit}: {}; they keep vacuum from cleaning the queue tables",
                    if rows.len() == 1 { "a transaction is" } else { "transactions are" },
                    shown.join(", ")
                ),
                "end them (COMMIT, or SELECT pg_terminate_backend(PID)); run pg_dump from a replica or with --snapshot",
            );
        }
    }
}

/// Autovacuum off: the heartbeat vacuums opsloop's queue tables itself
/// (`db::vacuum`), but nothing else on the server is.
async fn check_autovacuum(report: &mut Report, pool: &PgPool) {
    const CHECK: &str = "autovacuum";
    let on: Result<bool, _> = sqlx::query_scalar("SELECT current_setting('autovacuum')::bool")
        .fetch_one(pool)
        .await;
    match on {
        Ok(true) => report.ok(CHECK, "on"),
        Ok(false) => report.warn(
            CHECK,
            "autovacuum is off on this server: the heartbeat vacuums opsloop's queue tables itself, nothing else is",
            "set autovacuum = on in postgresql.conf and reload",
        ),
        Err(e) => report.warn(
            CHECK,
            format!("cannot read the autovacuum setting: {e}"),
            "run SHOW autovacuum as opsloop's database user to see why",
        ),
    }
}

/// Fewer dead rows than this are autovacuum's ordinary backlog.
const DEAD_ROWS_WARN: i64 = 10_000;

async fn check_bloat(report: &mut Report, pool: &PgPool) {
    const CHECK: &str = "bloat";
    let rows: Result<Vec<(String, i64, i64)>, _> = sqlx::query_as(
        "SELECT relname::text, n_live_tup, n_dead_tup FROM pg_stat_user_tables
         WHERE relname = ANY($1) AND schemaname = current_schema()
           AND n_dead_tup >= $2 AND n_dead_tup > n_live_tup
         ORDER BY n_dead_tup DESC",
    )
    .bind(vacuum::QUEUE_TABLES)
    .bind(DEAD_ROWS_WARN)
    .fetch_all(pool)
    .await;
    match rows {
        Err(e) => report.warn(
            CHECK,
            format!("cannot read pg_stat_user_tables: {e}"),
            "check the database user's privileges",
        ),
        Ok(rows) if rows.is_empty() => report.ok(
            CHECK,
            "the queue tables have more live rows than dead ones (or few dead)",
        ),
        Ok(rows) => {
            let shown: Vec<String> = rows
                .iter()
                .map(|(table, live, dead)| format!("{table} {dead} dead / {live} live"))
                .collect();
            report.warn(
                CHECK,
                format!("dead row versions pile up: {}", shown.join(", ")),
                "end long transactions (see transactions), keep autovacuum on; VACUUM the table once they are gone",
            );
        }
    }
}

async fn check_http_addr(report: &mut Report, addr: SocketAddr) {
    const CHECK: &str = "http";
    let bound = std::net::TcpListener::bind(addr);
    match bound {
        Ok(listener) => {
            drop(listener);
            report.ok(CHECK, format!("{addr} is free for OPSLOOP_HTTP_ADDR"));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => match running_opsloop(addr).await {
            Some(status) => report.ok(
                CHECK,
                format!("{addr} is served by a running opsloop (/healthz: {status})"),
            ),
            None => report.fail(
                CHECK,
                format!("{addr} is in use by another program"),
                "set OPSLOOP_HTTP_ADDR to a free address, or stop that program",
            ),
        },
        Err(e) => report.fail(
            CHECK,
            format!("cannot listen on {addr}: {e}"),
            "set OPSLOOP_HTTP_ADDR to an address of this host (e.g. 127.0.0.1:8080)",
        ),
    }
}

/// The status of `/healthz` at `addr` when an opsloop answers there.
async fn running_opsloop(addr: SocketAddr) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let response = client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .ok()?;
    let server = response
        .headers()
        .get(reqwest::header::SERVER)?
        .to_str()
        .ok()?;
    server
        .starts_with("opsloop/")
        .then(|| response.status().as_u16())
}
