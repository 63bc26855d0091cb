//! Missions: approved proposals being executed, step by step. Creation and cancel live
//! here (their statements in `store::missions` and `store::steps`); the worker moves
//! steps along (`progress`), the heartbeat recovers lost leases and finalizes.

pub mod controls;
pub mod progress;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::domain::error::{OpsError, OpsResult};
use crate::domain::outputs::Condition;
use crate::domain::steps::StepSpec;
use crate::domain::vocab::EventKind;
pub use crate::domain::vocab::{MissionStatus, StepStatus};
use crate::store::{
    self,
    events::{self, NewEvent},
};

/// One step of a proposal's plan, params already substituted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub name: String,
    pub spec: StepSpec,
    pub max_attempts: i32,
    /// Plans stored before conditions existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
}

/// Create the mission of an approved proposal with its steps: the first `queued`, the
/// rest `waiting`. Runs in the approval's transaction; the step insert wakes workers.
pub async fn create(
    conn: &mut PgConnection,
    proposal_id: i64,
    template: &str,
    plan: &[PlannedStep],
    source: &str,
) -> OpsResult<i64> {
    let mission_id = store::missions::create(conn, proposal_id, template).await?;
    let names: Vec<&str> = plan.iter().map(|s| s.name.as_str()).collect();
    let kinds: Vec<&str> = plan.iter().map(|s| s.spec.kind().as_str()).collect();
    let specs: Vec<Value> = plan.iter().map(|s| json!(s.spec)).collect();
    let attempts: Vec<i32> = plan.iter().map(|s| s.max_attempts).collect();
    let conditions: Vec<Option<Value>> = plan
        .iter()
        .map(|s| s.when.as_ref().map(|w| json!(w)))
        .collect();
    store::steps::create(
        conn,
        mission_id,
        &names,
        &kinds,
        &specs,
        &attempts,
        &conditions,
    )
    .await?;
    events::emit(
        conn,
        NewEvent::new(EventKind::MissionStarted, source.to_string())
            .proposal(proposal_id)
            .mission(mission_id)
            .payload(json!({ "template": template, "steps": names })),
    )
    .await?;
    Ok(mission_id)
}

/// Cancel a running mission: queued and waiting steps are cancelled now; a running
/// step's worker is told (NOTIFY) to kill its process and records it cancelled. The
/// mission row is taken `FOR UPDATE`, so an attempt's ending stored meanwhile (which
/// takes it `FOR KEY SHARE`) is either seen here as the step's final state or sees the
/// cancel: no step of a cancelled mission is queued, retried or claimed again.
pub async fn cancel(pool: &PgPool, mission_id: i64, actor: &str, source: &str) -> OpsResult<()> {
    let mut tx = pool.begin().await?;
    cancel_in(&mut tx, mission_id, actor, source).await?;
    tx.commit().await?;
    crate::engine::telemetry::mission_finished(MissionStatus::Cancelled.as_str());
    Ok(())
}

/// [`cancel`] inside the caller's transaction (the kill switch cancels every running
/// mission in one); the caller counts it (`telemetry::mission_finished`) after commit.
pub async fn cancel_in(
    tx: &mut PgConnection,
    mission_id: i64,
    actor: &str,
    source: &str,
) -> OpsResult<()> {
    let status = store::missions::lock(&mut *tx, mission_id)
        .await?
        .ok_or_else(|| OpsError::bad_input(format!("there is no mission #{mission_id}")))?;
    let already = || OpsError::refused(format!("mission #{mission_id} is already {status}"));
    if status.is_finished() {
        return Err(already());
    }
    let by = format!("cancelled by {actor}");
    let template = store::missions::cancel(&mut *tx, mission_id, &by)
        .await?
        .ok_or_else(already)?;
    store::steps::cancel_remaining(&mut *tx, mission_id).await?;
    let cause = source.parse().unwrap_or(crate::domain::vocab::Source::Cli);
    crate::engine::questions::cancel_of_mission(&mut *tx, mission_id, cause).await?;
    events::emit(
        &mut *tx,
        NewEvent::new(EventKind::MissionCancelled, source.to_string())
            .mission(mission_id)
            .payload(json!({ "template": template, "by": actor })),
    )
    .await?;
    store::missions::announce_cancel(&mut *tx, mission_id).await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct MissionSummary {
    pub id: i64,
    pub proposal_id: i64,
    pub template: String,
    pub status: MissionStatus,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub steps_total: i64,
    pub steps_done: i64,
    /// Its steps are claimed in this order (-100..=100, higher first).
    pub priority: i32,
    /// What its steps reported they spent (an exact decimal in the database).
    #[serde(serialize_with = "crate::engine::budgets::as_number")]
    pub cost: String,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StepView {
    pub id: i64,
    pub seq: i32,
    pub name: String,
    pub kind: String,
    pub status: StepStatus,
    pub attempts: i32,
    pub max_attempts: i32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub result: Option<Value>,
    pub output: Option<Value>,
    pub progress: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MissionView {
    #[serde(flatten)]
    pub mission: MissionSummary,
    pub params: Value,
    pub steps: Vec<StepView>,
}

const SUMMARY: &str = "SELECT m.id, m.proposal_id, m.template, m.status, m.error, m.created_at, m.finished_at, m.priority, trim_scale(m.cost)::text AS cost,
            (SELECT count(*) FROM ops_mission_steps s WHERE s.mission_id = m.id) AS steps_total,
            (SELECT count(*) FROM ops_mission_steps s WHERE s.mission_id = m.id AND s.status IN ('succeeded', 'skipped')) AS steps_done
     FROM ops_missions m";

/// The newest missions, newest first; optionally only those with `status`.
pub async fn list(
    pool: &PgPool,
    status: Option<MissionStatus>,
    limit: i64,
) -> OpsResult<Vec<MissionSummary>> {
    Ok(sqlx::query_as(&format!(
        "{SUMMARY} WHERE ($1::text IS NULL OR m.status = $1) ORDER BY m.id DESC LIMIT $2"
    ))
    .bind(status.map(|s| s.as_str()))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub async fn get(pool: &PgPool, id: i64) -> OpsResult<MissionView> {
    let mission: MissionSummary = sqlx::query_as(&format!("{SUMMARY} WHERE m.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| OpsError::bad_input(format!("there is no mission #{id}")))?;
    let params: Value =
        sqlx::query_scalar("SELECT params FROM ops_mission_proposals WHERE id = $1")
            .bind(mission.proposal_id)
            .fetch_one(pool)
            .await?;
    let steps = sqlx::query_as(
        "SELECT id, seq, name, kind, status, attempts, max_attempts, started_at, finished_at, error, result,
                output, progress
         FROM ops_mission_steps WHERE mission_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(MissionView {
        mission,
        params,
        steps,
    })
}
