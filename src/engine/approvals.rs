//! Approvals: people deciding pending proposals. One row per (proposal, person) makes a
//! repeated approve count once; the proposal's row lock makes two approvers at once
//! see each other, so the last needed approval creates exactly one mission. That
//! approval passes the gates about missions again (`gates::check_mission`) under the
//! proposals lock, so approving in any order never runs more than the caps allow.

use serde::Serialize;
use serde_json::json;
use sqlx::{PgConnection, PgPool};

use crate::db::locks;
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::input;
use crate::domain::policy::Policy;
use crate::domain::vocab::{EventKind, Source};
use crate::engine::proposals::{self, ProposalStatus};
use crate::engine::{budgets, gates};
use crate::store::events::{self, NewEvent};
use crate::store::{approvals as approvals_store, outbox, proposals as proposals_store};

pub use crate::store::approvals::Decision;

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
    let p = proposals_store::lock(&mut tx, id)
        .await?
        .ok_or_else(|| OpsError::bad_input(format!("there is no proposal #{id}")))?;

    if p.expired {
        expire(&mut tx, id, &p.template).await?;
        tx.commit().await?;
        return Err(OpsError::refused(format!("proposal #{id} has expired")));
    }
    if p.status != ProposalStatus::Pending {
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
    let earlier = approvals_store::decisions(&mut tx, id).await?;
    let mine = earlier
        .iter()
        .find(|(who, _)| input::same_person(who, &actor));
    let inserted = match mine {
        None => approvals_store::record(&mut tx, id, &actor, decision, reason).await?,
        Some((stored, previous)) => {
            // A repeated approve counts once; changing one's mind from approve to
            // reject is still a reject.
            if decision == Decision::Reject && *previous == Decision::Approve {
                approvals_store::turn_into_reject(&mut tx, id, stored, reason).await?;
            }
            false
        }
    };

    // Distinct people who approve, never the proposer when self-approval is off.
    let approved = approvals_store::approvers(&mut tx, id).await?;
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
            proposals_store::reject(&mut tx, id, &actor, reason).await?;
            events::emit(
                &mut tx,
                NewEvent::new(EventKind::ProposalRejected, source.to_string())
                    .proposal(id)
                    .payload(json!({
                        "template": p.template, "decided_by": actor, "reason": reason,
                    })),
            )
            .await?;
            decided.status = ProposalStatus::Rejected;
        }
        Decision::Approve if approvals >= i64::from(p.approvals_needed) => {
            let refusal = match gates::check_mission(&mut tx, policy, &p.template).await? {
                None => budgets::gate(&mut tx, policy, &p.template, &p.proposed_by).await?,
                refused => refused,
            };
            if let Some(refusal) = refusal {
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
        Decision::Approve if inserted => outbox::enqueue_prompt_refreshes(&mut tx, id).await?,
        Decision::Approve => {}
    }
    tx.commit().await?;
    Ok(decided)
}

/// Mark one pending proposal expired, with its event.
pub(crate) async fn expire(conn: &mut PgConnection, id: i64, template: &str) -> OpsResult<()> {
    proposals_store::expire(conn, id).await?;
    events::emit(
        conn,
        NewEvent::new(EventKind::ProposalExpired, Source::Heartbeat)
            .proposal(id)
            .payload(json!({ "template": template })),
    )
    .await?;
    Ok(())
}
