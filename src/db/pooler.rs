//! Connection poolers between opsloop and PostgreSQL (PgBouncer and the like).
//!
//! opsloop needs each of its connections to keep one server session: the singletons
//! are session advisory locks, the worker and sender LISTEN, and sqlx names its
//! prepared statements per session. A pooler in *session* mode gives that (a client
//! keeps its server connection until it disconnects); one in *transaction* or
//! *statement* mode hands each transaction to whichever server connection is free, so
//! a lock or a LISTEN could end up on someone else's session and two heartbeats or two
//! pollers could run at once. opsloop refuses to start behind such a pooler (see
//! `refuse_transaction_pooling`); `opsloop doctor` says the same.
//!
//! The probe uses the simple query protocol only (no prepared statements), so it works
//! whatever the pooler does with them.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor, PgConnection, Row};

use crate::domain::error::OpsError;

/// How connections reach their server session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sessions {
    /// Each connection keeps one server session (PostgreSQL itself, or a session pooler).
    Kept,
    /// Transactions of one connection run on different server sessions (a pooler in
    /// transaction or statement mode).
    Shared,
}

/// The one line opsloop refuses to start with behind a transaction-mode pooler.
pub const REFUSAL: &str = "DATABASE_URL leads to a connection pooler in transaction (or statement) pooling mode, \
     where advisory locks, LISTEN and prepared statements do not stay on one session: \
     set pool_mode = session for opsloop's database in PgBouncer, or point DATABASE_URL at PostgreSQL itself";

/// Whether connections made with `options` keep their server session.
///
/// Connection A asks for its backend pid, then connection B opens a transaction and asks
/// for its own: a transaction pooler hands B the server A just released (PgBouncer
/// reuses the most recently released one), and A's next transaction then runs on
/// another. Through PostgreSQL or a session pooler both pids of A are equal and B's differs.
pub async fn probe(options: &PgConnectOptions) -> anyhow::Result<Sessions> {
    let options = options.clone().application_name("opsloop pooler probe");
    let wait = Duration::from_secs(10);
    let run = async {
        let mut a = PgConnection::connect_with(&options)
            .await
            .context("connecting")?;
        let mut b = PgConnection::connect_with(&options)
            .await
            .context("connecting a second time")?;
        let mut shared = false;
        for _ in 0..3 {
            let first = backend_pid(&mut a).await?;
            b.execute("BEGIN").await?;
            let other = backend_pid(&mut b).await?;
            let again = backend_pid(&mut a).await?;
            b.execute("ROLLBACK").await?;
            if other == first || again != first {
                shared = true;
                break;
            }
        }
        let _ = a.close().await;
        let _ = b.close().await;
        anyhow::Ok(if shared {
            Sessions::Shared
        } else {
            Sessions::Kept
        })
    };
    tokio::time::timeout(wait, run)
        .await
        .context("no answer within 10s")?
}

async fn backend_pid(conn: &mut PgConnection) -> anyhow::Result<i32> {
    // A plain string: the simple protocol, no prepared statement.
    let row = conn.fetch_one("SELECT pg_backend_pid()").await?;
    Ok(row.try_get(0)?)
}

/// Refuse (exit code 3) when `options` lead to a transaction-mode pooler.
pub async fn refuse_transaction_pooling(options: &PgConnectOptions) -> anyhow::Result<()> {
    match probe(options)
        .await
        .context("checking how connections reach PostgreSQL")?
    {
        Sessions::Kept => Ok(()),
        Sessions::Shared => Err(OpsError::refused(REFUSAL).into()),
    }
}
