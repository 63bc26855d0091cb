//! The completer: endings arrive from the worker's steps and are stored in batches,
//! each only while its lease holds (`missions::progress::finish_batch`).

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
    let mut batch = Vec::with_capacity(COMPLETION_BATCH);
    while received.recv_many(&mut batch, COMPLETION_BATCH).await > 0 {
        let policy = policy.get().await;
        store(&pool, &batch, &policy).await;
        batch.clear();
    }
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
