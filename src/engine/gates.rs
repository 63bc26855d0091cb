//! Gates: the checks every proposal passes before approval (docs/policy.md, "gates"). Each is
//! one small query, run inside the proposal's transaction under the proposals lock,
//! so two proposals racing each other see each other's effect. The gates about
//! missions run once more, under the same lock, when an approval would create one.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::db::{self, channels};
use crate::domain::error::OpsResult;
use crate::domain::policy::{Policy, Template};
use crate::domain::vocab::{EventKind, Source};
use crate::store;
use crate::store::events::{self, NewEvent};

/// Why a proposal was refused: the gate's name and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub gate: &'static str,
    pub reason: String,
    /// For dedupe: the proposal this one duplicates.
    pub existing: Option<i64>,
}

impl Refusal {
    fn new(gate: &'static str, reason: String) -> Refusal {
        Refusal {
            gate,
            reason,
            existing: None,
        }
    }
}

/// The gates of a new proposal, in order; the first that refuses decides. `automatic`:
/// from a reaction or a trigger, which the pause switch refuses. `proposed_by`: an
/// agent (`agent:NAME`) is held to its own gates too.
pub async fn check(
    conn: &mut PgConnection,
    policy: &Policy,
    template: &Template,
    params: &Value,
    automatic: bool,
    proposed_by: &str,
) -> OpsResult<Option<Refusal>> {
    let name = template.name.as_str();
    if automatic && is_paused(conn).await? {
        return Ok(Some(Refusal::new(
            "paused",
            "opsloop is paused: triggers and reactions propose nothing until `resume`".into(),
        )));
    }
    if let Some(refusal) = template_paused_refusal(conn, name).await? {
        return Ok(Some(refusal));
    }
    if let Some((existing, what)) = duplicate_of(conn, name, params).await? {
        return Ok(Some(Refusal {
            gate: "dedupe",
            reason: format!(
                "duplicate of proposal #{existing} ({what}) with the same template and params"
            ),
            existing: Some(existing),
        }));
    }
    let pending = count_pending(conn).await?;
    if pending >= i64::from(policy.gates.max_pending) {
        return Ok(Some(Refusal::new(
            "max_pending",
            format!(
                "{pending} proposals are waiting for a decision (max_pending = {}); decide some first",
                policy.gates.max_pending
            ),
        )));
    }
    if let Some(refusal) = agent_gates(conn, policy, proposed_by).await? {
        return Ok(Some(refusal));
    }
    caps(conn, policy, name).await
}

/// `[gates.agents.NAME]` for a proposal of `agent:NAME`; people are not bound by them.
async fn agent_gates(
    conn: &mut PgConnection,
    policy: &Policy,
    proposed_by: &str,
) -> OpsResult<Option<Refusal>> {
    let Some((agent, limits)) = proposed_by
        .strip_prefix("agent:")
        .and_then(|name| policy.gates.agents.get_key_value(name))
    else {
        return Ok(None);
    };
    if let Some(max) = limits.max_pending {
        let pending = count_pending_of(conn, proposed_by).await?;
        if pending >= i64::from(max) {
            return Ok(Some(Refusal::new(
                "agent_max_pending",
                format!(
                    "agent {agent} has {pending} proposals waiting for a decision (gates.agents.{agent}.max_pending = {max})"
                ),
            )));
        }
    }
    if let Some(cap) = limits.daily_cap {
        let today = count_today_of(conn, proposed_by).await?;
        if today >= i64::from(cap) {
            return Ok(Some(Refusal::new(
                "agent_daily_cap",
                format!(
                    "agent {agent} made {today} proposals today (gates.agents.{agent}.daily_cap = {cap}, UTC day)"
                ),
            )));
        }
    }
    Ok(None)
}

/// The gates about missions (template paused, max_running, cooldown, daily_cap), run
/// again when an approval is about to create a mission of `template`: proposals made
/// while the cap allowed them must not all run once approved. The caller holds the
/// proposals lock, so approvals racing each other see each other's missions.
pub async fn check_mission(
    conn: &mut PgConnection,
    policy: &Policy,
    template: &str,
) -> OpsResult<Option<Refusal>> {
    if let Some(refusal) = template_paused_refusal(conn, template).await? {
        return Ok(Some(refusal));
    }
    caps(conn, policy, template).await
}

/// The gates a retry passes (design §12): the template's pause and its max_running. A
/// retry is no new mission, so cooldown and daily_cap do not count it. The caller holds
/// the proposals lock, as for [`check_mission`].
pub async fn check_retry(
    conn: &mut PgConnection,
    policy: &Policy,
    template: &str,
) -> OpsResult<Option<Refusal>> {
    if let Some(refusal) = template_paused_refusal(conn, template).await? {
        return Ok(Some(refusal));
    }
    max_running(conn, policy, template).await
}

async fn template_paused_refusal(
    conn: &mut PgConnection,
    name: &str,
) -> OpsResult<Option<Refusal>> {
    Ok(template_paused(conn, name).await?.map(|failures| {
        Refusal::new(
            "template_paused",
            format!(
                "template {name} is paused after {failures} failed missions in a row; an admin can `resume {name}`"
            ),
        )
    }))
}

/// The template's caps on missions: max_running, cooldown, daily_cap.
async fn caps(conn: &mut PgConnection, policy: &Policy, name: &str) -> OpsResult<Option<Refusal>> {
    let limits = policy.template_gates(name);
    if let Some(refusal) = max_running(conn, policy, name).await? {
        return Ok(Some(refusal));
    }
    if let Some(cooldown) = limits.cooldown
        && let Some((mission, at)) = last_mission(conn, name).await?
    {
        let since = Utc::now()
            .signed_duration_since(at)
            .to_std()
            .unwrap_or_default();
        if since < cooldown {
            let wait = humantime::format_duration(round_secs(cooldown - since));
            return Ok(Some(Refusal::new(
                "cooldown",
                format!(
                    "cooldown: mission #{mission} of {name} started {} ago; next one allowed in {wait}",
                    humantime::format_duration(round_secs(since))
                ),
            )));
        }
    }
    if let Some(cap) = limits.daily_cap {
        let today = count_today(conn, name).await?;
        if today >= i64::from(cap) {
            return Ok(Some(Refusal::new(
                "daily_cap",
                format!("{today} missions of {name} today (daily_cap = {cap}, UTC day)"),
            )));
        }
    }
    Ok(None)
}

async fn max_running(
    conn: &mut PgConnection,
    policy: &Policy,
    name: &str,
) -> OpsResult<Option<Refusal>> {
    let Some(max) = policy.template_gates(name).max_running else {
        return Ok(None);
    };
    let running = count_running(conn, name).await?;
    Ok((running >= i64::from(max)).then(|| {
        Refusal::new(
            "max_running",
            format!("{running} missions of {name} are running (max_running = {max})"),
        )
    }))
}

fn round_secs(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs().max(1))
}

pub use crate::store::policy::{is_paused, paused_templates, template_paused};

/// The pause switch, with its `system.paused` / `system.resumed` event, in one
/// transaction. Returns false when it was already in that position.
pub async fn set_paused(
    conn: &mut PgConnection,
    paused: bool,
    source: Source,
    by: &str,
) -> OpsResult<bool> {
    let mut tx = conn.begin().await?;
    if !store::policy::switch_pause(&mut tx, paused, by).await? {
        return Ok(false);
    }
    let kind = if paused {
        EventKind::SystemPaused
    } else {
        EventKind::SystemResumed
    };
    events::emit(
        &mut tx,
        NewEvent::new(kind, source).payload(json!({ "by": by })),
    )
    .await?;
    if !paused {
        // Steps queued while paused are claimable again.
        db::notify(&mut tx, channels::STEPS_READY).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Pause a template after `failures` failed missions in a row (pause_after_failures),
/// in the caller's transaction, with its `template.paused` event.
pub async fn pause_template(
    conn: &mut PgConnection,
    template: &str,
    failures: i64,
) -> OpsResult<()> {
    store::policy::pause_template(conn, template, failures).await?;
    events::emit(
        conn,
        NewEvent::new(EventKind::TemplatePaused, Source::Heartbeat)
            .payload(json!({ "template": template, "failures": failures })),
    )
    .await?;
    Ok(())
}

/// Lift a template's pause, with its `template.resumed` event, in one transaction.
/// Returns whether it was paused.
pub async fn resume_template(
    conn: &mut PgConnection,
    template: &str,
    source: Source,
    by: &str,
) -> OpsResult<bool> {
    let mut tx = conn.begin().await?;
    if !store::policy::resume_template(&mut tx, template).await? {
        return Ok(false);
    }
    events::emit(
        &mut tx,
        NewEvent::new(EventKind::TemplateResumed, source)
            .payload(json!({ "template": template, "by": by })),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// A pending proposal, or one whose mission runs, with the same template and params.
async fn duplicate_of(
    conn: &mut PgConnection,
    template: &str,
    params: &Value,
) -> OpsResult<Option<(i64, String)>> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT p.id, CASE WHEN p.status = 'pending' THEN 'pending' ELSE 'mission #' || m.id || ' running' END
         FROM ops_mission_proposals p
         LEFT JOIN ops_missions m ON m.proposal_id = p.id
         WHERE p.template = $1 AND p.params = $2
           AND ((p.status = 'pending' AND p.expires_at > now()) OR m.status = 'running')
         ORDER BY p.id DESC LIMIT 1",
    )
    .bind(template)
    .bind(params)
    .fetch_optional(conn)
    .await?;
    Ok(row)
}

async fn count_pending(conn: &mut PgConnection) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM ops_mission_proposals WHERE status = 'pending' AND expires_at > now()",
    )
    .fetch_one(conn)
    .await?)
}

async fn count_pending_of(conn: &mut PgConnection, proposed_by: &str) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM ops_mission_proposals
         WHERE proposed_by = $1 AND status = 'pending' AND expires_at > now()",
    )
    .bind(proposed_by)
    .fetch_one(conn)
    .await?)
}

/// Proposals of `proposed_by` created this UTC day, not counting those a gate refused.
async fn count_today_of(conn: &mut PgConnection, proposed_by: &str) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM ops_mission_proposals
         WHERE proposed_by = $1
           AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
           AND (decided_by IS NULL OR decided_by NOT LIKE 'gate:%')",
    )
    .bind(proposed_by)
    .fetch_one(conn)
    .await?)
}

async fn count_running(conn: &mut PgConnection, template: &str) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM ops_missions WHERE template = $1 AND status = 'running'",
    )
    .bind(template)
    .fetch_one(conn)
    .await?)
}

async fn last_mission(
    conn: &mut PgConnection,
    template: &str,
) -> OpsResult<Option<(i64, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT id, created_at FROM ops_missions WHERE template = $1 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(template)
    .fetch_optional(conn)
    .await?)
}

async fn count_today(conn: &mut PgConnection, template: &str) -> OpsResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM ops_missions
         WHERE template = $1 AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
    )
    .bind(template)
    .fetch_one(conn)
    .await?)
}
