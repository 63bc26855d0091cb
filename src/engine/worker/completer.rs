//! The completer: endings arrive from the worker's steps and are stored in batches,
//! each only while its lease holds (`missions::progress::finish_batch`). A few batches
//! are stored at once, each on its own connection: a batch's commit waits for its WAL
//! flush, and meanwhile the next batch's statements run (the batches hold different
//! steps; what they share, a mission or a template's failure count, is locked as it is
//! between worker processes).

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;
use tracing::warn;

use crate::domain::error::{OpsError, OpsResult};
use crate::domain::policy::Policy;
use crate::engine::missions::progress::{self, Ending, Lease};
use crate::store::policy::PolicyCache;

/// Endings stored in one transaction at most.
const COMPLETION_BATCH: usize = 512;
/// Batches being stored at once.
const IN_FLIGHT: usize = 2;
/// The fewest endings a batch stored beside another holds (a smaller one waits).
const SECOND_BATCH: usize = 64;

/// A claim or a batch of results that has not been answered in this long is given up
/// and tried again on another connection: its connection is presumed dead (a network
/// that drops packets, a firewall that forgot the connection). Steps that a lost
/// answer claimed come back after their lease.
pub(super) const STALLED: Duration = Duration::from_secs(20);

/// `call`, or an error once it has gone [`STALLED`] without an answer.
pub(super) async fn bounded<T>(call: impl Future<Output = OpsResult<T>>) -> OpsResult<T> {
    tokio::time::timeout(STALLED, call)
        .await
        .unwrap_or_else(|_| {
            Err(OpsError::Other(anyhow::anyhow!(
                "no answer within {STALLED:?}"
            )))
        })
}

/// Store endings in batches of whatever has arrived, until the sender is dropped.
pub(super) async fn complete(
    pool: PgPool,
    policy: PolicyCache,
    mut received: mpsc::UnboundedReceiver<(Lease, Ending)>,
) {
    let mut storing = tokio::task::JoinSet::new();
    loop {
        if storing.len() >= IN_FLIGHT {
            let _ = storing.join_next().await;
        }
        let mut batch = Vec::with_capacity(COMPLETION_BATCH);
        if received.recv_many(&mut batch, COMPLETION_BATCH).await == 0 {
            break;
        }
        // With a batch being stored, a second starts once it is worth a transaction of
        // its own; until then it gathers, and goes as soon as the first is done.
        while !storing.is_empty() && batch.len() < SECOND_BATCH {
            let room = COMPLETION_BATCH - batch.len();
            tokio::select! {
                n = received.recv_many(&mut batch, room) => if n == 0 { break },
                _ = storing.join_next() => {}
            }
        }
        let policy = policy.get().await;
        let pool = pool.clone();
        storing.spawn(async move { store(&pool, &batch, &policy).await });
    }
    // The worker has gone: what is being stored still lands.
    while storing.join_next().await.is_some() {}
}

/// Store a batch, retrying on database trouble until it lands; refused endings (lost
/// leases) are only logged.
async fn store(pool: &PgPool, batch: &[(Lease, Ending)], policy: &Policy) {
    let mut delay = Duration::from_millis(100);
    for _ in 0..20 {
        // On a connection of its own, bounded: one that does not answer is given up and
        // closed (not handed back to the pool, whose check would wait on it forever),
        // and the batch stored on another within its leases (an answer lost after the
        // commit is refused harmlessly; a transaction left open ends server-side).
        let attempt = async {
            let mut conn = pool.acquire().await?;
            let stored = tokio::time::timeout(STALLED, async {
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                let stored = progress::finish_batch(&mut tx, batch, policy).await?;
                tx.commit().await?;
                Ok::<Vec<bool>, OpsError>(stored)
            })
            .await;
            stored.unwrap_or_else(|_| {
                drop(conn.detach());
                Err(OpsError::Other(anyhow::anyhow!(
                    "no answer within {STALLED:?}"
                )))
            })
        };
        match attempt.await {
            Ok(stored) => {
                for ((lease, _), ok) in batch.iter().zip(stored) {
                    if !ok {
                        warn!(
                            step_id = lease.step_id,
                            attempt = lease.attempt,
                            "result refused: this worker no longer holds the step's lease"
                        );
                    }
                }
                return;
            }
            Err(e) => {
                warn!(error = %e, steps = batch.len(), "storing step results failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    warn!(
        steps = batch.len(),
        "giving up storing results; their leases will expire and the steps be retried"
    );
}
