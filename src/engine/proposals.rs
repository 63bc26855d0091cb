//! The single entry point: every proposal, from Telegram, the CLI, HTTP, a reaction or
//! a trigger, is created here: validate → gate → record → maybe auto-approve, in one
//! transaction with its events.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::db::{self, locks};
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::input;
use crate::domain::policy::{MAX_PRIORITY, MIN_PRIORITY, Policy, Risk, Template};
use crate::domain::vocab::EventKind;
use crate::engine::missions::{self, PlannedStep};
use crate::engine::{budgets, gates};
use crate::store::events::{self, NewEvent};
use crate::store::proposals::{self as store, NewRow};

/// What became of a proposal (the vocabulary's word).
pub use crate::domain::vocab::ProposalStatus;
/// Where a proposal came from (reactions and triggers are automatic: pause refuses them).
pub use crate::domain::vocab::Source;

/// A request to run a template, before validation.
#[derive(Debug, Clone)]
pub struct NewProposal {
    pub template: String,
    pub params: BTreeMap<String, String>,
    pub proposed_by: String,
    pub source: Source,
    /// Overrides the template's priority for this proposal (design §12).
    pub priority: Option<i32>,
    /// Whether this proposer may raise the priority above the template's: the CLI (the
    /// operator's own machine) and Telegram approvers; keys, operators and automatic
    /// proposals may only lower it.
    pub may_raise_priority: bool,
}

/// What became of a proposal. `propose --json` prints this.
#[derive(Debug, Clone, Serialize)]
pub struct Proposed {
    pub id: i64,
    pub status: ProposalStatus,
    pub mission_id: Option<i64>,
    pub reason: Option<String>,
    pub template: String,
    pub risk: Risk,
    pub approvals_needed: i32,
    /// For a duplicate: the proposal it duplicates.
    pub existing_id: Option<i64>,
    pub priority: i32,
}

/// Create a proposal in its own transaction.
pub async fn propose(pool: &PgPool, policy: &Policy, request: NewProposal) -> OpsResult<Proposed> {
    let (template, params) = validate(policy, &request)?;
    let mut tx = pool.begin().await?;
    let proposed = propose_in(&mut tx, policy, template, params, &request).await?;
    tx.commit().await?;
    Ok(proposed)
}

/// Check the template and params; bad input changes nothing.
pub fn validate<'p>(
    policy: &'p Policy,
    request: &NewProposal,
) -> OpsResult<(&'p Template, BTreeMap<String, String>)> {
    // Before anything quotes them: a pattern like `^.*$` would let U+0000 through.
    input::storable_text(&request.proposed_by, "proposed_by")?;
    for (key, value) in &request.params {
        input::storable_text(key, "a param name")?;
        input::storable_text(value, &format!("param {key:?}"))?;
    }
    let Some(template) = policy.template(&request.template) else {
        let known: Vec<&str> = policy.templates.keys().map(|k| k.as_str()).collect();
        return Err(OpsError::bad_input(format!(
            "unknown template {:?} (templates: {})",
            request.template,
            if known.is_empty() {
                "none; apply a policy first".to_string()
            } else {
                known.join(", ")
            }
        )));
    };
    let params = template
        .validate_params(&request.params)
        .map_err(|problems| OpsError::bad_input(problems.join("; ")))?;
    priority(template, request.priority, request.may_raise_priority)?;
    Ok((template, params))
}

/// The priority a proposal runs at: `requested`, or the template's. Outside -100..=100
/// is bad input; above the template's is refused unless `may_raise`.
pub fn priority(template: &Template, requested: Option<i32>, may_raise: bool) -> OpsResult<i32> {
    let Some(n) = requested else {
        return Ok(template.priority);
    };
    if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&n) {
        return Err(OpsError::bad_input(format!(
            "priority {n} is out of range ({MIN_PRIORITY}..={MAX_PRIORITY})"
        )));
    }
    if n > template.priority && !may_raise {
        return Err(OpsError::refused(format!(
            "priority {n} is above template {}'s ({}); only an approver may raise it",
            template.name.as_str(),
            template.priority
        )));
    }
    Ok(n)
}

/// Create a proposal inside the caller's transaction (the heartbeat creates many in one).
/// `template` and `params` come from [`validate`].
pub async fn propose_in(
    conn: &mut PgConnection,
    policy: &Policy,
    template: &Template,
    params: BTreeMap<String, String>,
    request: &NewProposal,
) -> OpsResult<Proposed> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(locks::PROPOSALS)
        .execute(&mut *conn)
        .await?;
    let params_json = json!(params);
    let refusal = gates::check(
        conn,
        policy,
        template,
        &params_json,
        request.source.is_automatic(),
        &request.proposed_by,
    )
    .await?;
    let refusal = match refusal {
        None => budgets::gate(conn, policy, template.name.as_str(), &request.proposed_by).await?,
        refused => refused,
    };
    let rule = policy.approval.rule(template.risk);
    let plan = plan(policy, template, &params);
    let ttl = db::interval(policy.approval.ttl);
    let priority = priority(template, request.priority, request.may_raise_priority)?;
    let status = if refusal.is_some() {
        ProposalStatus::Rejected
    } else {
        ProposalStatus::Pending
    };

    let row = NewRow {
        template: template.name.as_str(),
        params: &params_json,
        risk: template.risk,
        proposed_by: &request.proposed_by,
        source: request.source,
        plan: json!(plan),
        approvals_needed: rule.approvals as i32,
        self_approval: rule.self_approval,
        ttl,
        priority,
    };
    let id = match &refusal {
        None => store::insert_pending(conn, &row).await?,
        Some(r) => store::insert_refused(conn, &row, r.gate, &r.reason).await?,
    };

    let auto = policy.approval.auto_approves(template.risk);
    let about = json!({
        "template": template.name.as_str(),
        "params": params_json,
        "risk": template.risk.as_str(),
        "proposed_by": request.proposed_by,
        "source": request.source.as_str(),
        // the outbox trigger sends approval prompts for these
        "awaits_approval": refusal.is_none() && !auto,
    });
    events::emit(
        conn,
        NewEvent::new(EventKind::ProposalCreated, request.source)
            .proposal(id)
            .payload(about),
    )
    .await?;

    let mut proposed = Proposed {
        id,
        status,
        mission_id: None,
        reason: None,
        template: template.name.as_str().to_string(),
        risk: template.risk,
        approvals_needed: rule.approvals as i32,
        existing_id: None,
        priority,
    };

    if let Some(refusal) = refusal {
        events::emit(
            conn,
            NewEvent::new(EventKind::ProposalRejected, Source::Gate)
                .proposal(id)
                .payload(json!({
                    "template": template.name.as_str(),
                    "gate": refusal.gate,
                    "reason": refusal.reason,
                    "existing_id": refusal.existing,
                    "decided_by": format!("gate:{}", refusal.gate),
                })),
        )
        .await?;
        proposed.reason = Some(refusal.reason);
        proposed.existing_id = refusal.existing;
        return Ok(proposed);
    }

    if auto {
        let mission_id = approve(conn, id, "auto", request.source.as_str()).await?;
        proposed.status = ProposalStatus::Approved;
        proposed.mission_id = Some(mission_id);
    }
    Ok(proposed)
}

/// The template's steps with params substituted: what the mission will run.
fn plan(
    policy: &Policy,
    template: &Template,
    params: &BTreeMap<String, String>,
) -> Vec<PlannedStep> {
    template
        .render_steps(params)
        .into_iter()
        .map(|step| PlannedStep {
            name: step.name,
            spec: step.spec,
            max_attempts: step.max_attempts.unwrap_or(policy.worker.max_attempts) as i32,
            when: step.when,
        })
        .collect()
}

/// Mark a pending proposal approved and create its mission, in the caller's transaction.
/// The caller holds the proposal's row lock (or just inserted it).
pub(crate) async fn approve(
    conn: &mut PgConnection,
    proposal_id: i64,
    decided_by: &str,
    source: &str,
) -> OpsResult<i64> {
    let (template, plan) = store::approve(conn, proposal_id, decided_by).await?;
    events::emit(
        conn,
        NewEvent::new(EventKind::ProposalApproved, source.to_string())
            .proposal(proposal_id)
            .payload(json!({ "template": template, "decided_by": decided_by })),
    )
    .await?;
    let plan: Vec<PlannedStep> = serde_json::from_value(plan).map_err(|e| {
        OpsError::Other(anyhow::anyhow!(
            "proposal #{proposal_id} has an unreadable plan: {e}"
        ))
    })?;
    missions::create(conn, proposal_id, &template, &plan, source).await
}

/// A proposal as people and scripts see it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ProposalView {
    pub id: i64,
    pub template: String,
    pub params: Value,
    pub risk: String,
    pub proposed_by: String,
    pub source: String,
    pub status: ProposalStatus,
    pub reason: Option<String>,
    pub approvals_needed: i32,
    pub approvals: i64,
    pub approvers: Vec<String>,
    pub decided_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub mission_id: Option<i64>,
    /// The steps the mission will run, params substituted (`Vec<PlannedStep>`).
    #[serde(skip)]
    pub plan: Value,
}

impl ProposalView {
    /// The plan's steps; an unreadable plan shows as none.
    pub fn planned_steps(&self) -> Vec<PlannedStep> {
        serde_json::from_value(self.plan.clone()).unwrap_or_default()
    }
}

const VIEW: &str = "SELECT p.id, p.template, p.params, p.risk, p.proposed_by, p.source, p.status, p.reason,
            p.approvals_needed,
            (SELECT count(*) FROM ops_proposal_approvals a WHERE a.proposal_id = p.id AND a.decision = 'approve') AS approvals,
            coalesce((SELECT array_agg(a.actor ORDER BY a.id) FROM ops_proposal_approvals a
                      WHERE a.proposal_id = p.id AND a.decision = 'approve'), '{}') AS approvers,
            p.decided_by, p.created_at, p.decided_at, p.expires_at,
            (SELECT m.id FROM ops_missions m WHERE m.proposal_id = p.id) AS mission_id,
            p.plan
     FROM ops_mission_proposals p";

pub async fn get(pool: &PgPool, id: i64) -> OpsResult<ProposalView> {
    sqlx::query_as(&format!("{VIEW} WHERE p.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| OpsError::bad_input(format!("there is no proposal #{id}")))
}

/// Proposals waiting for a decision, oldest first.
pub async fn pending(pool: &PgPool) -> OpsResult<Vec<ProposalView>> {
    Ok(sqlx::query_as(&format!(
        "{VIEW} WHERE p.status = 'pending' AND p.expires_at > now() ORDER BY p.id"
    ))
    .fetch_all(pool)
    .await?)
}
