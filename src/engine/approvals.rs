//! Approvals: people deciding pending proposals. One row per (proposal, person) makes a
//! repeated approve count once; the proposal's row lock makes two approvers at once
//! see each other, so the last needed approval creates exactly one mission. That
//! approval passes the gates about missions again (`gates::check_mission`) under the
//! proposals lock, so approving in any order never runs more than the caps allow.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::db::locks;
use crate::error::{OpsError, OpsResult};
use crate::events::{self, NewEvent};
use crate::policy::Policy;
use crate::proposals::{self, ProposalStatus};
use crate::{gates, input, notify};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Approve,
    Reject,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
        }
    }
}

/// The outcome of one person's decision.
#[derive(Debug, Clone, Serialize)]
pub struct Decided {
    pub proposal_id: i64,
    pub template: String,
    pub status: ProposalStatus,
    pub approvals: i64,
    pub approvals_needed: i32,
    pub mission_id: Option<i64>,
    /// False when this person had already approved: counted once.
    pub counted: bool,
}

impl Decided {
    /// One line for people: `proposal #12 approved (2/2 approvals): mission #7 started`.
    pub fn describe(&self) -> String {
        let id = self.proposal_id;
        match (self.status, self.mission_id) {
            (ProposalStatus::Approved, Some(m)) => {
                format!("proposal #{id} approved: mission #{m} started")
            }
            (ProposalStatus::Rejected, _) => format!("proposal #{id} rejected"),
            _ if !self.counted => format!(
                "you already approved proposal #{id} ({}/{} approvals)",
                self.approvals, self.approvals_needed
            ),
            _ => format!(
                "proposal #{id}: {}/{} approvals, waiting for another approver",
                self.approvals, self.approvals_needed
            ),
        }
    }
}

#[derive(sqlx::FromRow)]
struct Locked {
    template: String,
    status: String,
    proposed_by: String,
    approvals_needed: i32,
    self_approval: bool,
    decided_by: Option<String>,
    decided_at: Option<DateTime<Utc>>,
    expired: bool,
}

/// Approve or reject proposal `id` as `actor`. Refuses, with the current state and who
/// decided, when the proposal is no longer pending, and with the gate's reason when the
/// approval would create a mission the gates about missions refuse (the proposal stays
/// pending, this approval unrecorded: approve again when the gate allows). People are
/// compared by their normalized identity ([`input::identity`]).
pub async fn decide(
    pool: &PgPool,
    policy: &Policy,
    id: i64,
    actor: &str,
    decision: Decision,
    reason: Option<&str>,
    source: &str,
) -> OpsResult<Decided> {
    let actor = input::identity(actor, "the approver's name")?;
    if let Some(reason) = reason {
        input::storable_text(reason, "the reason")?;
    }
    let mut tx = pool.begin().await?;
    if decision == Decision::Approve {
        // An approval may create a mission: gate it under the lock new proposals take,
        // taken before the row lock, in the same order as `proposals::propose_in`.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(locks::PROPOSALS)
            .execute(&mut *tx)
            .await?;
    }
    let p: Locked = sqlx::query_as(
        "SELECT template, status, proposed_by, approvals_needed, self_approval, decided_by, decided_at,
                (status = 'pending' AND expires_at <= now()) AS expired
         FROM ops_mission_proposals WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| OpsError::bad_input(format!("there is no proposal #{id}")))?;

    if p.expired {
        expire(&mut tx, id, &p.template).await?;
        tx.commit().await?;
        return Err(OpsError::refused(format!("proposal #{id} has expired")));
    }
    if p.status != "pending" {
        let by = p.decided_by.as_deref().unwrap_or("nobody");
        let when = p
            .decided_at
            .map(|t| format!(" at {}", t.format("%Y-%m-%d %H:%M UTC")))
            .unwrap_or_default();
        return Err(OpsError::refused(format!(
            "proposal #{id} is already {} (by {by}{when})",
            p.status
        )));
    }
    if decision == Decision::Approve
        && !p.self_approval
        && input::same_person(&actor, &p.proposed_by)
    {
        return Err(OpsError::refused(format!(
            "proposal #{id} was proposed by you; it needs {} approvals from other people",
            p.approvals_needed
        )));
    }

    // Earlier decisions on this proposal, matched by person, not by spelling (rows
    // written before names were normalized may be spelled `Alice`). The row lock above
    // makes this read-then-write safe; the unique index holds the normalized name.
    let earlier: Vec<(String, String)> = sqlx::query_as(
        "SELECT actor, decision FROM ops_proposal_approvals WHERE proposal_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let mine = earlier
        .iter()
        .find(|(who, _)| input::same_person(who, &actor));
    let inserted = match mine {
        None => {
            sqlx::query(
                "INSERT INTO ops_proposal_approvals (proposal_id, actor, decision, reason)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (proposal_id, actor) DO NOTHING",
            )
            .bind(id)
            .bind(&actor)
            .bind(decision.as_str())
            .bind(reason)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1
        }
        Some((stored, previous)) => {
            // A repeated approve counts once; changing one's mind from approve to
            // reject is still a reject.
            if decision == Decision::Reject && previous == "approve" {
                sqlx::query(
                    "UPDATE ops_proposal_approvals SET decision = 'reject', reason = $3, created_at = now()
                     WHERE proposal_id = $1 AND actor = $2",
                )
                .bind(id)
                .bind(stored)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
            }
            false
        }
    };

    // Distinct people who approve, never the proposer when self-approval is off.
    let approved: Vec<String> = sqlx::query_scalar(
        "SELECT actor FROM ops_proposal_approvals
         WHERE proposal_id = $1 AND decision = 'approve' ORDER BY id",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    let mut approvers: Vec<String> = Vec::new();
    for who in approved {
        let counts = p.self_approval || !input::same_person(&who, &p.proposed_by);
        if counts && !approvers.iter().any(|a| input::same_person(a, &who)) {
            approvers.push(who);
        }
    }
    let approvals = approvers.len() as i64;

    let mut decided = Decided {
        proposal_id: id,
        template: p.template.clone(),
        status: ProposalStatus::Pending,
        approvals,
        approvals_needed: p.approvals_needed,
        mission_id: None,
        counted: inserted,
    };
    match decision {
        Decision::Reject => {
            sqlx::query(
                "UPDATE ops_mission_proposals
                 SET status = 'rejected', decided_by = $2, decided_at = now(), reason = coalesce($3, reason)
                 WHERE id = $1",
            )
            .bind(id)
            .bind(&actor)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
            events::emit(
                &mut tx,
                NewEvent::new("proposal.rejected", source.to_string())
                    .proposal(id)
                    .payload(json!({
                        "template": p.template, "decided_by": actor, "reason": reason,
                    })),
            )
            .await?;
            decided.status = ProposalStatus::Rejected;
        }
        Decision::Approve if approvals >= i64::from(p.approvals_needed) => {
            if let Some(refusal) = gates::check_mission(&mut tx, policy, &p.template).await? {
                // Dropping the transaction leaves the proposal and its approvals as
                // they were.
                return Err(OpsError::refused(format!(
                    "proposal #{id} stays pending: {}; it can be approved again once the {} gate allows",
                    refusal.reason, refusal.gate
                )));
            }
            let mission = proposals::approve(&mut tx, id, &approvers.join(", "), source).await?;
            decided.status = ProposalStatus::Approved;
            decided.mission_id = Some(mission);
        }
        // A partial approval changes no status (no event), but prompts show `1/2 approvals`.
        Decision::Approve if inserted => notify::refresh_prompts(&mut tx, id).await?,
        Decision::Approve => {}
    }
    tx.commit().await?;
    Ok(decided)
}

/// Mark one pending proposal expired, with its event.
pub(crate) async fn expire(
    conn: &mut sqlx::PgConnection,
    id: i64,
    template: &str,
) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_mission_proposals SET status = 'expired', decided_at = now(), decided_by = 'ttl'
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    events::emit(
        conn,
        NewEvent::new("proposal.expired", events::sources::HEARTBEAT)
            .proposal(id)
            .payload(json!({ "template": template })),
    )
    .await?;
    Ok(())
}
