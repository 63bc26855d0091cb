//! Owner of `ops_proposal_approvals`: one row per (proposal, person), so a repeated
//! approve counts once. A person's first decision is recorded (`record`); an approve
//! can later become a reject (`turn_into_reject`), never the other way. The rows go
//! with their proposal (cascade). Callers hold the proposal's row lock
//! (`store::proposals::lock`), which makes their read-then-write safe.

use serde::Serialize;
use sqlx::PgConnection;

use crate::domain::error::{OpsError, OpsResult};

/// One person's decision on a proposal.
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

    fn parse(word: &str) -> OpsResult<Decision> {
        match word {
            "approve" => Ok(Decision::Approve),
            "reject" => Ok(Decision::Reject),
            other => Err(OpsError::Other(anyhow::anyhow!(
                "unknown decision {other:?} in ops_proposal_approvals"
            ))),
        }
    }
}

/// Everyone's decision on proposal `proposal_id` so far, in the order they came:
/// `(actor as stored, decision)`.
pub async fn decisions(
    conn: &mut PgConnection,
    proposal_id: i64,
) -> OpsResult<Vec<(String, Decision)>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT actor, decision FROM ops_proposal_approvals WHERE proposal_id = $1 ORDER BY id",
    )
    .bind(proposal_id)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(actor, word)| Ok((actor, Decision::parse(&word)?)))
        .collect()
}

/// Record `actor`'s first decision. Returns false when they had decided already.
pub async fn record(
    conn: &mut PgConnection,
    proposal_id: i64,
    actor: &str,
    decision: Decision,
    reason: Option<&str>,
) -> OpsResult<bool> {
    let done = sqlx::query(
        "INSERT INTO ops_proposal_approvals (proposal_id, actor, decision, reason)
         VALUES ($1, $2, $3, $4) ON CONFLICT (proposal_id, actor) DO NOTHING",
    )
    .bind(proposal_id)
    .bind(actor)
    .bind(decision.as_str())
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// approve → reject: `actor` (spelled as stored) changed their mind.
pub async fn turn_into_reject(
    conn: &mut PgConnection,
    proposal_id: i64,
    actor: &str,
    reason: Option<&str>,
) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_proposal_approvals SET decision = 'reject', reason = $3, created_at = now()
         WHERE proposal_id = $1 AND actor = $2",
    )
    .bind(proposal_id)
    .bind(actor)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Who approved proposal `proposal_id`, in the order they did (as stored: the same
/// person may appear under two spellings written before names were normalized).
pub async fn approvers(conn: &mut PgConnection, proposal_id: i64) -> OpsResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT actor FROM ops_proposal_approvals
         WHERE proposal_id = $1 AND decision = 'approve' ORDER BY id",
    )
    .bind(proposal_id)
    .fetch_all(conn)
    .await?)
}
