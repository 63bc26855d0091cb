//! The leased step worker: claim ready steps in batches, run each under a lease that a
//! single renewal loop extends, and hand endings to a completer that stores them in
//! batches, each only while its lease holds (see `missions::progress`). Wakes on NOTIFY,
//! polls as a fallback. A worker that has gone one lease without renewing (the database
//! out of reach) kills its steps: by then the heartbeat may have given them to another.

mod asks;
mod completer;
mod pace;
mod step;

pub use asks::{Reply as AskReply, Request as AskRequest};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::db::channels;

use crate::domain::policy::Policy;
use crate::engine::executors::Executors;
use crate::engine::missions::progress::{Ending, Lease};
use crate::engine::telemetry;
use crate::store::policy::PolicyCache;
use crate::store::steps::{self, Claimed};
use crate::store::workers;
use asks::AskServer;
use pace::Pace;
use step::{Talk, execute};

/// How long running steps may take to finish after SIGTERM before they are released.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Fallback poll when no NOTIFY arrives (PgBouncer, lost connection).
const POLL: Duration = Duration::from_secs(1);
/// With slots busy, wait this long for more to free before claiming, so claims batch.
const CLAIM_COALESCE: Duration = Duration::from_millis(2);

/// Why a running step's token was cancelled: decides what happens to it.
const STOP_NONE: u8 = 0;
const STOP_CANCELLED: u8 = 1;
const STOP_SHUTDOWN: u8 = 2;
/// The lease was lost or could not be renewed in time: the step is no longer ours, and
/// its cancelled ending is not stored (the heartbeat recovers the step).
const STOP_LEASE_LOST: u8 = 3;

struct Running {
    mission_id: i64,
    attempt: i32,
    cancel: CancellationToken,
    stop: Arc<AtomicU8>,
}

pub struct Worker {
    pub id: String,
    pool: PgPool,
    policy: PolicyCache,
    executors: Executors,
    concurrency: usize,
    /// Execution slots; steps held beyond them wait here, leased.
    slots: Arc<Semaphore>,
    /// Serves `opsloop ask` to the shell steps this worker runs (None: could not start).
    asks: Option<AskServer>,
}

impl Worker {
    pub fn new(pool: PgPool, policy: PolicyCache, concurrency: usize) -> Worker {
        let id = format!(
            "{}:{}:{:04x}",
            hostname(),
            std::process::id(),
            rand::random::<u16>()
        );
        Worker {
            id,
            pool,
            policy,
            executors: Executors::new(),
            concurrency: concurrency.max(1),
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            asks: None,
        }
    }

    /// Run until `shutdown`, then let running steps finish within `grace` and give the
    /// rest back to the queue.
    pub async fn run(mut self, shutdown: CancellationToken, grace: Duration) -> anyhow::Result<()> {
        workers::register(&self.pool, &self.id, &hostname(), self.concurrency).await?;
        let pause_after_failures = self.policy.get().await.gates.pause_after_failures;
        match AskServer::start(self.pool.clone(), self.id.clone(), pause_after_failures) {
            Ok(server) => self.asks = Some(server),
            Err(e) => warn!(error = %e, "cannot serve `opsloop ask`; steps that ask will fail"),
        }
        info!(worker = %self.id, concurrency = self.concurrency, "worker started");
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener
            .listen_all([channels::STEPS_READY, channels::CANCEL])
            .await?;
        let (endings, received) = mpsc::unbounded_channel();
        let completer = tokio::spawn(completer::complete(
            self.pool.clone(),
            self.policy.clone(),
            received,
        ));

        let mut running: HashMap<i64, Running> = HashMap::new();
        let mut tasks: JoinSet<Done> = JoinSet::new();
        let mut last_renewal = Instant::now();
        // When the leases of the running steps were last extended (the renewal's send
        // time, never later than the database's `now()`): they hold until one lease on.
        let mut renewed_at = Instant::now();
        let mut want_claim = true;
        let mut last_claim = Instant::now();
        // When to look at the queue even without a NOTIFY: the fallback poll, or sooner
        // when a retry this worker scheduled becomes due.
        let mut next_poll = Instant::now() + POLL;
        let mut next_retry: Option<Instant> = None;
        // After the listener failed, when to try it again (polling meanwhile).
        let mut listen_again: Option<Instant> = None;
        let mut pace = Pace::default();

        while !shutdown.is_cancelled() {
            let policy = self.policy.get().await;
            let lease = policy.worker.lease;
            let capacity = pace.capacity(self.concurrency);
            let free = capacity.saturating_sub(running.len());
            let coalesced = running.is_empty()
                || free * 2 >= capacity
                || last_claim.elapsed() >= CLAIM_COALESCE;
            let mut wake = next_retry.map_or(next_poll, |r| r.min(next_poll));
            if want_claim && free > 0 && !coalesced {
                wake = wake.min(last_claim + CLAIM_COALESCE);
            } else if want_claim && free > 0 {
                last_claim = Instant::now();
                next_poll = last_claim + POLL;
                let idle = running.is_empty();
                // Bounded: a dead connection must not stop this loop (it renews leases).
                let claim = steps::claim_ready(&self.pool, &self.id, free as i64, lease);
                match completer::bounded(claim).await {
                    Ok(claimed) => {
                        telemetry::steps_claimed(claimed.len());
                        if idle {
                            renewed_at = last_claim;
                        }
                        // A full batch means more may be waiting: claim again when a slot frees.
                        want_claim = claimed.len() == free;
                        for step in claimed {
                            self.spawn(step, &policy, &mut running, &mut tasks);
                        }
                    }
                    // Retry at the next poll; never sleep here, the loop renews leases.
                    Err(e) => {
                        warn!(error = %e, "claiming steps failed; retrying");
                        want_claim = false;
                    }
                }
                wake = next_retry.map_or(next_poll, |r| r.min(next_poll));
            }
            if let Some(at) = listen_again {
                if at <= Instant::now() {
                    listen_again = None;
                } else {
                    wake = wake.min(at);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                Some(done) = tasks.join_next() => {
                    if let Ok(done) = done {
                        if let Some(delay) = done.retry_in() {
                            let at = Instant::now() + delay;
                            next_retry = Some(next_retry.map_or(at, |r| r.min(at)));
                        }
                        pace.record(done.took);
                        self.finished(done, &mut running, &endings).await;
                    }
                    // Take every other ending that is ready too, so they are stored together.
                    while let Some(Ok(done)) = tasks.try_join_next() {
                        pace.record(done.took);
                        self.finished(done, &mut running, &endings).await;
                    }
                    want_claim = true;
                }
                note = listener.try_recv(), if listen_again.is_none() => match note {
                    Ok(Some(n)) if n.channel() == channels::CANCEL => {
                        if let Ok(mission) = n.payload().parse::<i64>() {
                            cancel_mission(&running, mission);
                        }
                    }
                    Ok(Some(_)) => want_claim = true,
                    // The connection dropped; try_recv reconnects on the next call.
                    Ok(None) => want_claim = true,
                    Err(e) => {
                        warn!(error = %e, "listening for notifications failed; polling meanwhile");
                        listen_again = Some(Instant::now() + POLL);
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    if next_retry.is_some_and(|r| r <= Instant::now()) {
                        next_retry = None;
                    }
                    want_claim = true;
                }
                _ = tokio::time::sleep_until(renewed_at + lease), if !running.is_empty() => {
                    abandon(&running);
                    renewed_at = Instant::now();
                }
                _ = tokio::time::sleep_until(last_renewal + renewal_period(lease)) => {
                    last_renewal = Instant::now();
                    let until = (renewed_at + lease).min(last_renewal + renewal_period(lease));
                    if self.renew(&running, lease, until).await {
                        renewed_at = last_renewal;
                    }
                }
            }
        }

        info!(worker = %self.id, running = running.len(), "worker stopping; letting running steps finish");
        let deadline = tokio::time::sleep(grace);
        tokio::pin!(deadline);
        let lease = self.policy.get().await.worker.lease;
        while !running.is_empty() {
            tokio::select! {
                Some(done) = tasks.join_next() => {
                    if let Ok(done) = done {
                        self.finished(done, &mut running, &endings).await;
                    }
                }
                _ = &mut deadline => break,
                _ = tokio::time::sleep_until(renewed_at + lease) => {
                    abandon(&running);
                    renewed_at = Instant::now();
                }
                _ = tokio::time::sleep_until(last_renewal + renewal_period(lease)) => {
                    last_renewal = Instant::now();
                    let until = (renewed_at + lease).min(last_renewal + renewal_period(lease));
                    if self.renew(&running, lease, until).await {
                        renewed_at = last_renewal;
                    }
                }
            }
        }
        for step in running.values() {
            stop(step, STOP_SHUTDOWN);
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(done) = done {
                self.finished(done, &mut running, &endings).await;
            }
        }
        // Let the completer store what is left, then say goodbye.
        drop(endings);
        let _ = completer.await;
        let _ = workers::stopped(&self.pool, &self.id).await;
        if let Some(asks) = &self.asks {
            asks.remove();
        }
        info!(worker = %self.id, "worker stopped");
        Ok(())
    }

    fn spawn(
        &self,
        step: Claimed,
        policy: &Policy,
        running: &mut HashMap<i64, Running>,
        tasks: &mut JoinSet<Done>,
    ) {
        let cancel = CancellationToken::new();
        let stop = Arc::new(AtomicU8::new(STOP_NONE));
        running.insert(
            step.id,
            Running {
                mission_id: step.mission_id,
                attempt: step.attempts,
                cancel: cancel.clone(),
                stop: stop.clone(),
            },
        );
        let executors = self.executors.clone();
        let slots = self.slots.clone();
        let backoff = (policy.worker.backoff.base, policy.worker.backoff.max);
        let talk = Talk {
            pool: self.pool.clone(),
            owner: self.id.clone(),
            asks: self.asks.clone(),
        };
        let span = tracing::info_span!(
            "step",
            mission_id = step.mission_id,
            step_id = step.id,
            attempt = step.attempts
        );
        tasks.spawn(
            async move { execute(executors, slots, step, cancel, backoff, talk).await }
                .instrument(span),
        );
    }

    /// A step's execution ended: free its slot and store its ending (or give it back
    /// to the queue when we are shutting down, or it was held too long to start).
    async fn finished(
        &self,
        done: Done,
        running: &mut HashMap<i64, Running>,
        endings: &mpsc::UnboundedSender<(Lease, Ending)>,
    ) {
        let Some(step) = running.remove(&done.step_id) else {
            return;
        };
        let lease = Lease {
            step_id: done.step_id,
            owner: self.id.clone(),
            attempt: step.attempt,
        };
        let stopped = step.stop.load(Ordering::SeqCst);
        // Killed because the lease is gone: the step was not cancelled. An ending
        // that came first (success, failure) is still offered, fenced by the lease.
        if stopped == STOP_LEASE_LOST && matches!(done.ending, Some(Ending::Cancelled { .. })) {
            warn!(
                step_id = done.step_id,
                attempt = step.attempt,
                "step killed: its lease was lost; the heartbeat gives it to another worker once the lease expires"
            );
            return;
        }
        let ending = match done.ending {
            Some(ending) if stopped != STOP_SHUTDOWN => ending,
            // Stopped by the shutdown, or held too long to start: back to the queue.
            ending => {
                match steps::release(&self.pool, &self.id, done.step_id, step.attempt).await {
                    Ok(_) if ending.is_some() => info!(
                        step_id = done.step_id,
                        "released at shutdown; another worker will run it"
                    ),
                    Ok(_) => debug!(
                        step_id = done.step_id,
                        "held too long without a slot; given back to the queue"
                    ),
                    Err(e) => {
                        warn!(error = %e, "release failed; the lease will expire and the heartbeat recovers it")
                    }
                }
                return;
            }
        };
        if endings.send((lease, ending)).is_err() {
            warn!(
                step_id = done.step_id,
                "the completer is gone; the lease will expire and the step be retried"
            );
        }
    }

    /// Extend the leases of the running steps, giving up at `until`; true when the
    /// database answered. Steps it no longer holds are stopped, and so are steps whose
    /// mission was cancelled.
    async fn renew(
        &self,
        running: &HashMap<i64, Running>,
        lease: Duration,
        until: Instant,
    ) -> bool {
        let renewal = async {
            if running.is_empty() {
                let _ = workers::seen(&self.pool, &self.id).await;
                return Ok(());
            }
            let held: Vec<(i64, i32)> = running.iter().map(|(id, r)| (*id, r.attempt)).collect();
            let still = steps::renew_leases(&self.pool, &self.id, &held, lease).await?;
            let still: HashMap<i64, bool> = still.into_iter().collect();
            for (id, step) in running {
                match still.get(id) {
                    None => {
                        if step.stop.load(Ordering::SeqCst) == STOP_NONE {
                            warn!(step_id = id, "lease lost; stopping the step");
                        }
                        stop(step, STOP_LEASE_LOST);
                    }
                    Some(true) => stop(step, STOP_CANCELLED),
                    Some(false) => {}
                }
            }
            let _ = workers::seen(&self.pool, &self.id).await;
            Ok::<(), crate::domain::error::OpsError>(())
        };
        match tokio::time::timeout_at(until, renewal).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "renewing leases failed; will retry");
                false
            }
            Err(_) => {
                warn!("renewing leases timed out; will retry");
                false
            }
        }
    }
}

/// How often leases are renewed: a third of the lease, so one missed round is harmless.
fn renewal_period(lease: Duration) -> Duration {
    (lease / 3).min(Duration::from_secs(10))
}

/// Mark a running step stopped for `why` (the first reason wins) and kill it.
fn stop(step: &Running, why: u8) {
    let _ = step
        .stop
        .compare_exchange(STOP_NONE, why, Ordering::SeqCst, Ordering::SeqCst);
    step.cancel.cancel();
}

/// A whole lease has gone by without a renewal: the heartbeat may already have given
/// these steps to another worker, so they must not run on here.
fn abandon(running: &HashMap<i64, Running>) {
    warn!(
        steps = running.len(),
        "leases not renewed for a whole lease; killing this worker's steps"
    );
    for step in running.values() {
        stop(step, STOP_LEASE_LOST);
    }
}

fn cancel_mission(running: &HashMap<i64, Running>, mission_id: i64) {
    for step in running.values().filter(|r| r.mission_id == mission_id) {
        stop(step, STOP_CANCELLED);
    }
}

/// A finished execution: which step, how it ended (None: it never started, held too
/// long without a slot), how long it ran or waited.
struct Done {
    step_id: i64,
    ending: Option<Ending>,
    took: Duration,
}

impl Done {
    fn new(step_id: i64, ending: Ending, took: Duration) -> Done {
        Done {
            step_id,
            ending: Some(ending),
            took,
        }
    }

    fn given_back(step_id: i64, waited: Duration) -> Done {
        Done {
            step_id,
            ending: None,
            took: waited,
        }
    }

    fn retry_in(&self) -> Option<Duration> {
        match self.ending {
            Some(Ending::Failed { retry_in, .. }) => Some(retry_in),
            _ => None,
        }
    }
}

/// This machine's name, for `ops_workers.host`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
