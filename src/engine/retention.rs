//! Retention (`[retention]`): the heartbeat deletes what is older than the policy says,
//! in bounded batches, so tables do not grow forever on a long-running VPS. Never
//! deleted: anything of a running mission or a pending proposal, unprocessed events,
//! events a pending notification will still render, and the sent messages that live
//! prompts and mission cards are edited through.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::error::OpsResult;
use crate::policy::RetentionPolicy;
use crate::store::{self, events, reactions, runs};

/// Statements per kind of row and tick: with `batch` rows each, a tick's work is bounded.
const ROUNDS: u32 = 10;

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Deleted {
    pub proposals: u64,
    pub events: u64,
    pub reactions: u64,
    pub action_runs: u64,
    pub notifications: u64,
}

// The deletes of the tables that have an owner module are that owner's
// (`delete_expired`); this module keeps what is deleted when.

/// Decided proposals and their finished missions (steps, approvals and dead letters go
/// with them by cascade).
const PROPOSALS: &str = "DELETE FROM ops_mission_proposals WHERE id IN (
    SELECT p.id FROM ops_mission_proposals p
    LEFT JOIN ops_missions m ON m.proposal_id = p.id
    WHERE p.status <> 'pending' AND p.decided_at < $1
      AND (m.id IS NULL OR (m.status <> 'running' AND m.finished_at < $1))
    LIMIT $2)";

const NOTIFICATIONS: &str = "DELETE FROM ops_notifications WHERE id IN (
    SELECT n.id FROM ops_notifications n
    WHERE n.status <> 'pending' AND n.created_at < $1
      AND NOT (n.subject LIKE 'mission:%' AND EXISTS (
            SELECT 1 FROM ops_missions m WHERE 'mission:' || m.id = n.subject AND m.status = 'running'))
      AND NOT (n.subject LIKE 'proposal:%' AND EXISTS (
            SELECT 1 FROM ops_mission_proposals p WHERE 'proposal:' || p.id = n.subject AND p.status = 'pending'))
    ORDER BY n.created_at LIMIT $2)";

/// Delete what the policy no longer keeps.
pub async fn enforce(pool: &PgPool, policy: &RetentionPolicy) -> OpsResult<Deleted> {
    let batch = i64::from(policy.batch.max(1));
    Ok(Deleted {
        proposals: prune(policy.missions, batch, |c, n| {
            store::delete_older(pool, PROPOSALS, c, n)
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
            store::delete_older(pool, NOTIFICATIONS, c, n)
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
