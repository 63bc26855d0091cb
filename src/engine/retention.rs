//! Retention (`[retention]`): the heartbeat deletes what is older than the policy says,
//! in bounded batches, so tables do not grow forever on a long-running VPS. Never
//! deleted: anything of a running mission or a pending proposal, open questions,
//! unprocessed events, events a pending notification will still render, and the sent
//! messages that live prompts and mission cards are edited through.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::domain::error::OpsResult;
use crate::domain::policy::RetentionPolicy;
use crate::store::{events, outbox, proposals, questions, reactions, runs};

/// Statements per kind of row and tick: with `batch` rows each, a tick's work is bounded.
const ROUNDS: u32 = 10;

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Deleted {
    pub proposals: u64,
    /// Closed questions asked outside a mission (`missions` keeps them as long).
    pub questions: u64,
    pub events: u64,
    pub reactions: u64,
    pub action_runs: u64,
    pub notifications: u64,
}

// Each table's delete is its owner's; this module keeps what is deleted when.

/// Delete what the policy no longer keeps.
pub async fn enforce(pool: &PgPool, policy: &RetentionPolicy) -> OpsResult<Deleted> {
    let batch = i64::from(policy.batch.max(1));
    Ok(Deleted {
        // Decided proposals and their finished missions (steps, approvals and dead
        // letters go with them by cascade).
        proposals: prune(policy.missions, batch, |c, n| {
            proposals::delete_decided_before(pool, c, n)
        })
        .await?,
        questions: prune(policy.missions, batch, |c, n| {
            questions::delete_closed_before(pool, c, n)
        })
        .await?,
        events: prune(policy.events, batch, |c, n| {
            events::delete_expired(pool, c, n)
        })
        .await?,
        reactions: prune(policy.reactions, batch, |c, n| {
            reactions::delete_expired(pool, c, n)
        })
        .await?,
        action_runs: prune(policy.action_runs, batch, |c, n| {
            runs::delete_expired(pool, c, n)
        })
        .await?,
        notifications: prune(policy.notifications, batch, |c, n| {
            outbox::delete_done_before(pool, c, n)
        })
        .await?,
    })
}

/// Delete what is older than `keep` with `delete(cutoff, batch)`, a batch at a time,
/// for at most `ROUNDS` batches.
async fn prune<F, Fut>(keep: Option<Duration>, batch: i64, delete: F) -> OpsResult<u64>
where
    F: Fn(DateTime<Utc>, i64) -> Fut,
    Fut: Future<Output = OpsResult<u64>>,
{
    let Some(keep) = keep else {
        return Ok(0);
    };
    let cutoff: DateTime<Utc> = Utc::now() - crate::db::interval(keep);
    let mut total = 0;
    for _ in 0..ROUNDS {
        let gone = delete(cutoff, batch).await?;
        total += gone;
        if gone < batch as u64 {
            break;
        }
    }
    Ok(total)
}
