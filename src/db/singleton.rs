//! Singletons across hosts (heartbeat tick, Telegram poller, outbox sender): a session
//! advisory lock on a connection of its own, pinged, and given up as soon as it cannot
//! be shown to be held.
//!
//! - The lock's connection is opened for it and never goes back to the pool, so no
//!   other part of the process (a LISTEN, a worker's claim) can inherit the lock by
//!   reusing that session, and closing it always releases the lock.
//! - The holder pings it every `ping_every`, checking in `pg_locks` that its session
//!   still holds the key. When a check fails, or none succeeded for a `lease`, the lock
//!   is lost: the holder's token is cancelled and it must stop.
//! - `run` (for long-lived holders) waits one lease after taking the lock before it
//!   works, and cuts its own work off one lease after its last good check. A holder
//!   whose session was cut (terminated, server restart) may take up to a lease to
//!   notice, but the next holder starts only after that, so two never work at once.

use std::fmt::Display;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use anyhow::Context;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{info, warn};

use super::locks::LockKey;

/// The lock was lost (or its connection stopped answering): the holder must stop.
#[derive(Debug, thiserror::Error)]
#[error("lost the {0} lock")]
pub struct LockLost(pub &'static str);

/// One lock key and how its holder keeps it.
pub struct Singleton {
    pool: PgPool,
    key: LockKey,
    name: &'static str,
    ping_every: Duration,
    lease: Duration,
    retry_every: Duration,
}

impl Singleton {
    /// `name` is for logs and `pg_stat_activity` (`application_name`).
    pub fn new(pool: &PgPool, key: LockKey, name: &'static str) -> Singleton {
        Singleton {
            pool: pool.clone(),
            key,
            name,
            ping_every: Duration::from_secs(1),
            lease: Duration::from_secs(5),
            retry_every: Duration::from_secs(2),
        }
    }

    /// How often the holder checks it still holds the lock (default 1 s).
    pub fn ping_every(mut self, every: Duration) -> Singleton {
        self.ping_every = every;
        self
    }

    /// How long the lock counts as held without a good check (default 5 s); also how
    /// long `run` waits after taking the lock before working.
    pub fn lease(mut self, lease: Duration) -> Singleton {
        self.lease = lease;
        self
    }

    /// How often `run` tries again while another process holds the lock (default 2 s).
    pub fn retry_every(mut self, every: Duration) -> Singleton {
        self.retry_every = every;
        self
    }

    /// Take the lock if it is free, on a new connection. `None`: someone else holds it.
    pub async fn try_acquire(&self) -> anyhow::Result<Option<Held>> {
        // As long as the pool waits for a connection.
        tokio::time::timeout(Duration::from_secs(10), self.connect_and_lock())
            .await
            .with_context(|| format!("taking the {} lock timed out", self.name))?
    }

    async fn connect_and_lock(&self) -> anyhow::Result<Option<Held>> {
        let options = (*self.pool.connect_options())
            .clone()
            .application_name(&format!("opsloop {}", self.name));
        let mut conn = PgConnection::connect_with(&options)
            .await
            .with_context(|| format!("connecting for the {} lock", self.name))?;
        // Let the server notice a vanished holder in about half a minute (TCP only). Set
        // after connecting, in the simple protocol: PgBouncer refuses startup `options`.
        conn.execute(
            "SELECT set_config('tcp_keepalives_idle', '10', false),
                    set_config('tcp_keepalives_interval', '5', false),
                    set_config('tcp_keepalives_count', '3', false)",
        )
        .await
        .with_context(|| format!("setting up the {} lock's connection", self.name))?;
        let asked = Instant::now();
        let got: bool = match self.key {
            LockKey::One(k) => {
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(k)
                    .fetch_one(&mut conn)
                    .await?
            }
            LockKey::Two(class, item) => {
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(class)
                    .bind(item)
                    .fetch_one(&mut conn)
                    .await?
            }
        };
        if !got {
            let _ = conn.close().await;
            return Ok(None);
        }
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        Ok(Some(Held::start(self, conn, pid, asked)))
    }

    /// Hold the lock and run `work` while holding it, until `shutdown`; wait for the
    /// lock while another process holds it. `work` gets a token cancelled on shutdown
    /// or when the lock is lost, and must return soon after; it is cut off one lease
    /// after the last good check. When it returns (an error, or by itself), the lock
    /// is released and taken again after `retry_every`.
    pub async fn run<F, Fut, E>(&self, shutdown: &CancellationToken, mut work: F)
    where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        while !shutdown.is_cancelled() {
            match self.try_acquire().await {
                Ok(Some(held)) => {
                    self.hold(&held, shutdown, &mut work).await;
                    held.release().await;
                }
                Ok(None) => {}
                Err(e) => warn!(singleton = self.name, error = %e, "cannot try the lock; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(self.retry_every) => {}
            }
        }
    }

    async fn hold<F, Fut, E>(&self, held: &Held, shutdown: &CancellationToken, work: &mut F)
    where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        // A previous holder whose session was cut may not know yet; it stops within a lease.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = held.lost() => {
                warn!(singleton = self.name, "lost the lock before starting");
                return;
            }
            _ = tokio::time::sleep(self.lease) => {}
        }
        info!(singleton = self.name, "active");
        let stop = shutdown.child_token();
        let job = work(stop.clone());
        tokio::pin!(job);
        let outcome = tokio::select! {
            outcome = &mut job => Some(outcome),
            _ = held.lost() => {
                warn!(singleton = self.name, "lost the lock; stepping down");
                stop.cancel();
                tokio::time::timeout_at(held.deadline(), &mut job).await.ok()
            }
        };
        stop.cancel();
        match outcome {
            Some(Ok(())) => info!(singleton = self.name, "stopped"),
            Some(Err(e)) => warn!(singleton = self.name, error = %e, "stopped; retrying"),
            None => warn!(
                singleton = self.name,
                "cut off: it did not stop within the lock's lease"
            ),
        }
    }
}

/// A held lock. Dropping it closes its connection, which releases the lock.
pub struct Held {
    name: &'static str,
    key: LockKey,
    pid: i32,
    lease: Duration,
    lost: CancellationToken,
    shared: Arc<Shared>,
    pinger: tokio::task::JoinHandle<()>,
}

struct Shared {
    /// `None` once closed after a failed check.
    conn: Mutex<Option<PgConnection>>,
    /// When the lock stops counting as held without another good check.
    deadline: StdMutex<Instant>,
}

impl Held {
    fn start(singleton: &Singleton, conn: PgConnection, pid: i32, asked: Instant) -> Held {
        let shared = Arc::new(Shared {
            conn: Mutex::new(Some(conn)),
            deadline: StdMutex::new(asked + singleton.lease),
        });
        let lost = CancellationToken::new();
        let (name, key, lease, every) = (
            singleton.name,
            singleton.key,
            singleton.lease,
            singleton.ping_every,
        );
        let pinger = tokio::spawn({
            let (shared, lost) = (shared.clone(), lost.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = lost.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    if let Err(why) = shared.check(key, lease).await {
                        warn!(singleton = name, error = %why, "lost the lock");
                        lost.cancel();
                        return;
                    }
                }
            }
        });
        Held {
            name,
            key,
            pid,
            lease,
            lost,
            shared,
            pinger,
        }
    }

    /// The backend holding the lock (for `pg_stat_activity`, and tests).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resolves when the lock is lost.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.lost.cancelled()
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// When the lock stops counting as held unless another check succeeds first.
    pub fn deadline(&self) -> Instant {
        *self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Check now, on the lock's own connection, that it is still held: before work
    /// that must not run twice.
    pub async fn ensure(&self) -> Result<(), LockLost> {
        if self.lost.is_cancelled() {
            return Err(LockLost(self.name));
        }
        match self.shared.check(self.key, self.lease).await {
            Ok(()) => Ok(()),
            Err(why) => {
                warn!(singleton = self.name, error = %why, "lost the lock");
                self.lost.cancel();
                Err(LockLost(self.name))
            }
        }
    }

    /// Give the lock up and close its connection. The unlock makes the lock free when
    /// this returns; closing alone would free it only once the server has noticed.
    pub async fn release(self) {
        self.pinger.abort();
        let conn = self.shared.conn.lock().await.take();
        if let Some(mut conn) = conn {
            let unlock = match self.key {
                LockKey::One(k) => sqlx::query("SELECT pg_advisory_unlock($1)").bind(k),
                LockKey::Two(class, item) => sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                    .bind(class)
                    .bind(item),
            };
            let wait = Duration::from_secs(2);
            let _ = tokio::time::timeout(wait, unlock.execute(&mut conn)).await;
            let _ = tokio::time::timeout(wait, conn.close()).await;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pinger.abort();
    }
}

impl Shared {
    /// One round trip on the lock's connection, within the lease; the connection is
    /// closed on failure, so a lock this session might still hold goes with it.
    async fn check(&self, key: LockKey, lease: Duration) -> Result<(), String> {
        let sent = Instant::now();
        let deadline = *self.deadline.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(mut conn) = tokio::time::timeout_at(deadline, self.conn.lock()).await else {
            return Err("no check succeeded within the lease".into());
        };
        let Some(c) = conn.as_mut() else {
            return Err("its connection is closed".into());
        };
        let (classid, objid, objsubid) = key.pg_locks_ids();
        let held = sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                            WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                              AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = $3)",
        )
        .bind(classid)
        .bind(objid)
        .bind(objsubid)
        .fetch_one(c);
        let why = match tokio::time::timeout_at(deadline, held).await {
            Ok(Ok(true)) => {
                let mut d = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
                *d = (*d).max(sent + lease);
                return Ok(());
            }
            Ok(Ok(false)) => "its session no longer holds it".to_string(),
            Ok(Err(e)) => format!("its connection failed: {e}"),
            Err(_) => "no check succeeded within the lease".to_string(),
        };
        *conn = None;
        Err(why)
    }
}

/// The backend holding `key` in the current database, if any (diagnostics and tests).
pub async fn holder(pool: &PgPool, key: LockKey) -> sqlx::Result<Option<i32>> {
    let (classid, objid, objsubid) = key.pg_locks_ids();
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks
         WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = $3",
    )
    .bind(classid)
    .bind(objid)
    .bind(objsubid)
    .fetch_optional(pool)
    .await
}
