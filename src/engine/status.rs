//! `opsloop status`: one look at the whole loop.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::domain::error::OpsResult;
use crate::engine::gates;
use crate::engine::missions::{self, MissionStatus, MissionSummary};
use crate::engine::proposals::{self, ProposalView};

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct WorkerView {
    pub id: String,
    pub host: String,
    pub pid: i32,
    pub concurrency: i32,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub paused: bool,
    pub paused_templates: Vec<String>,
    pub policy_version: Option<i64>,
    pub proposals: BTreeMap<String, i64>,
    pub missions: BTreeMap<String, i64>,
    pub steps: BTreeMap<String, i64>,
    pub dead_letters: i64,
    /// Questions waiting for an answer.
    pub open_questions: i64,
    pub pending_approvals: Vec<ProposalView>,
    pub running_missions: Vec<MissionSummary>,
    /// Workers seen in the last minute.
    pub workers: Vec<WorkerView>,
}

async fn counts(pool: &PgPool, table: &str) -> OpsResult<BTreeMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT status, count(*) FROM {table} GROUP BY status"
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

pub async fn status(pool: &PgPool) -> OpsResult<Status> {
    let mut conn = pool.acquire().await?;
    let paused = gates::is_paused(&mut conn).await?;
    let paused_templates = gates::paused_templates(&mut conn).await?;
    drop(conn);
    Ok(Status {
        paused,
        paused_templates,
        policy_version: sqlx::query_scalar(
            "SELECT (value->>'version')::bigint FROM ops_policy WHERE key = 'policy'",
        )
        .fetch_optional(pool)
        .await?,
        proposals: counts(pool, "ops_mission_proposals").await?,
        missions: counts(pool, "ops_missions").await?,
        steps: counts(pool, "ops_mission_steps").await?,
        dead_letters: sqlx::query_scalar("SELECT count(*) FROM ops_step_dead_letters")
            .fetch_one(pool)
            .await?,
        open_questions: crate::engine::questions::count_open(pool).await?,
        pending_approvals: proposals::pending(pool).await?,
        running_missions: missions::list(pool, Some(MissionStatus::Running), 50).await?,
        workers: sqlx::query_as(
            "SELECT id, host, pid, concurrency, started_at, last_seen FROM ops_workers
             WHERE stopped_at IS NULL AND last_seen > now() - interval '1 minute' ORDER BY id",
        )
        .fetch_all(pool)
        .await?,
    })
}
