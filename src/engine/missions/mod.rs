//! Missions: approved proposals being executed, step by step. Creation and cancel live
//! here; the worker moves steps along (see `worker`), the heartbeat finalizes.

pub mod progress;

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::db::channels;
use crate::error::{OpsError, OpsResult};
use crate::events::{self, NewEvent};
use crate::steps::StepSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissionStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Waiting,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

macro_rules! status_words {
    ($ty:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $word),+ }
            }
            pub fn parse(s: &str) -> Option<$ty> {
                match s { $($word => Some($ty::$variant),)+ _ => None }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

status_words!(MissionStatus {
    Running => "running", Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled",
});
status_words!(StepStatus {
    Waiting => "waiting", Queued => "queued", Running => "running",
    Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled",
});

impl MissionStatus {
    pub fn is_final(self) -> bool {
        self != MissionStatus::Running
    }
}

/// One step of a proposal's plan, params already substituted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub name: String,
    pub spec: StepSpec,
    pub max_attempts: i32,
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
    let mission_id: i64 = sqlx::query_scalar(
        "INSERT INTO ops_missions (proposal_id, template, status, started_at)
         VALUES ($1, $2, 'running', now()) RETURNING id",
    )
    .bind(proposal_id)
    .bind(template)
    .fetch_one(&mut *conn)
    .await?;

    let names: Vec<&str> = plan.iter().map(|s| s.name.as_str()).collect();
    let kinds: Vec<&str> = plan.iter().map(|s| s.spec.kind().as_str()).collect();
    let specs: Vec<Value> = plan.iter().map(|s| json!(s.spec)).collect();
    let attempts: Vec<i32> = plan.iter().map(|s| s.max_attempts).collect();
    sqlx::query(
        "INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, max_attempts, status)
         SELECT $1, s.seq, s.name, s.kind, s.spec, s.max_attempts,
                CASE WHEN s.seq = 1 THEN 'queued' ELSE 'waiting' END
         FROM unnest($2::text[], $3::text[], $4::jsonb[], $5::int[])
              WITH ORDINALITY AS s(name, kind, spec, max_attempts, seq)",
    )
    .bind(mission_id)
    .bind(&names)
    .bind(&kinds)
    .bind(&specs)
    .bind(&attempts)
    .execute(&mut *conn)
    .await?;

    events::emit(
        conn,
        NewEvent::new("mission.started", source.to_string())
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
    let status: String =
        sqlx::query_scalar("SELECT status FROM ops_missions WHERE id = $1 FOR UPDATE")
            .bind(mission_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| OpsError::bad_input(format!("there is no mission #{mission_id}")))?;
    if status != "running" {
        return Err(OpsError::refused(format!(
            "mission #{mission_id} is already {status}"
        )));
    }
    sqlx::query(
        "UPDATE ops_missions SET status = 'cancelled', finished_at = now(), error = $2 WHERE id = $1",
    )
    .bind(mission_id)
    .bind(format!("cancelled by {actor}"))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE ops_mission_steps SET status = 'cancelled', finished_at = now()
         WHERE mission_id = $1 AND status IN ('queued', 'waiting')",
    )
    .bind(mission_id)
    .execute(&mut *tx)
    .await?;
    let template: String = sqlx::query_scalar("SELECT template FROM ops_missions WHERE id = $1")
        .bind(mission_id)
        .fetch_one(&mut *tx)
        .await?;
    events::emit(
        &mut tx,
        NewEvent::new("mission.cancelled", source.to_string())
            .mission(mission_id)
            .payload(json!({ "template": template, "by": actor })),
    )
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channels::CANCEL)
        .bind(mission_id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    crate::telemetry::mission_finished("cancelled");
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct MissionSummary {
    pub id: i64,
    pub proposal_id: i64,
    pub template: String,
    pub status: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub steps_total: i64,
    pub steps_done: i64,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StepView {
    pub id: i64,
    pub seq: i32,
    pub name: String,
    pub kind: String,
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub result: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MissionView {
    #[serde(flatten)]
    pub mission: MissionSummary,
    pub params: Value,
    pub steps: Vec<StepView>,
}

const SUMMARY: &str = "SELECT m.id, m.proposal_id, m.template, m.status, m.error, m.created_at, m.finished_at,
            (SELECT count(*) FROM ops_mission_steps s WHERE s.mission_id = m.id) AS steps_total,
            (SELECT count(*) FROM ops_mission_steps s WHERE s.mission_id = m.id AND s.status = 'succeeded') AS steps_done
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
        "SELECT id, seq, name, kind, status, attempts, max_attempts, started_at, finished_at, error, result
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
