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

/// Decided proposals and their finished missions (steps, approvals and dead letters go
/// with them by cascade).
const PROPOSALS: &str = "DELETE FROM ops_mission_proposals WHERE id IN (
    SELECT p.id FROM ops_mission_proposals p
    LEFT JOIN ops_missions m ON m.proposal_id = p.id
    WHERE p.status <> 'pending' AND p.decided_at < $1
      AND (m.id IS NULL OR (m.status <> 'running' AND m.finished_at < $1))
    LIMIT $2)";

// Events and action runs are walked in id order (ids grow with time), so the oldest
// come first without an index on their timestamps, which every insert would pay for.
const EVENTS: &str = "DELETE FROM ops_agent_events WHERE id IN (
    SELECT e.id FROM ops_agent_events e
    WHERE e.created_at < $1 AND e.processed_at IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM ops_notifications n WHERE n.event_id = e.id AND n.status = 'pending')
      AND NOT EXISTS (SELECT 1 FROM ops_missions m WHERE m.id = e.mission_id AND m.status = 'running')
    ORDER BY e.id LIMIT $2)";

const REACTIONS: &str = "DELETE FROM ops_agent_reactions WHERE id IN (
    SELECT id FROM ops_agent_reactions WHERE created_at < $1 ORDER BY created_at LIMIT $2)";

const ACTION_RUNS: &str = "DELETE FROM ops_action_runs WHERE id IN (
    SELECT id FROM ops_action_runs WHERE started_at < $1 ORDER BY id LIMIT $2)";

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
        proposals: prune(pool, PROPOSALS, policy.missions, batch).await?,
        events: prune(pool, EVENTS, policy.events, batch).await?,
        reactions: prune(pool, REACTIONS, policy.reactions, batch).await?,
        action_runs: prune(pool, ACTION_RUNS, policy.action_runs, batch).await?,
        notifications: prune(pool, NOTIFICATIONS, policy.notifications, batch).await?,
    })
}

async fn prune(pool: &PgPool, sql: &str, keep: Option<Duration>, batch: i64) -> OpsResult<u64> {
    let Some(keep) = keep else {
        return Ok(0);
    };
    let cutoff: DateTime<Utc> = Utc::now() - crate::db::interval(keep);
    let mut total = 0;
    for _ in 0..ROUNDS {
        let gone = sqlx::query(sql)
            .bind(cutoff)
            .bind(batch)
            .execute(pool)
            .await?
            .rows_affected();
        total += gone;
        if gone < batch as u64 {
            break;
        }
    }
    Ok(total)
}
