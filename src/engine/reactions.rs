//! Reactions: event pattern → proposal. Events are taken in batches (SKIP LOCKED),
//! every (event, rule) decision is recorded in `ops_agent_reactions` (unique, so a
//! decision is made once), and the events are marked processed in the same transaction.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::db::locks;
use crate::domain::error::OpsResult;
use crate::domain::policy::{Policy, Reaction};
use crate::engine::proposals::{self, NewProposal, ProposalStatus, Source};
use crate::store;

/// How long one tick may spend on reactions before leaving the rest for the next.
const BUDGET: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Clone, Copy)]
pub struct Processed {
    pub events: u64,
    pub proposed: u64,
    pub skipped: u64,
}

pub use crate::store::events::PendingEvent;

/// Process unprocessed events in batches of `heartbeat.event_batch`, creating at most
/// `heartbeat.reaction_batch` proposals per tick (a brake on runaway loops).
pub async fn process(pool: &PgPool, policy: &Policy, paused: bool) -> OpsResult<Processed> {
    let mut total = Processed::default();
    let started = Instant::now();
    let batch = i64::from(policy.heartbeat.event_batch.max(1));
    let mut proposals_left = u64::from(policy.heartbeat.reaction_batch);
    while started.elapsed() < BUDGET {
        let mut tx = pool.begin().await?;
        let events = store::events::lock_unprocessed(&mut tx, batch).await?;
        if events.is_empty() {
            break;
        }
        let mut handled = Vec::with_capacity(events.len());
        let mut serialized = false;
        for event in &events {
            let matching: Vec<&Reaction> = policy
                .reactions
                .iter()
                .filter(|r| matches(r, event))
                .collect();
            if !matching.is_empty() && proposals_left == 0 {
                break; // the rest waits for the next tick
            }
            if !matching.is_empty() && !serialized {
                // Cooldowns read earlier reactions: under the proposals lock (which
                // propose_in takes anyway, until this batch commits) they hold even if
                // two hosts tick at once.
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(locks::PROPOSALS)
                    .execute(&mut *tx)
                    .await?;
                serialized = true;
            }
            for rule in matching {
                let (status, proposal, reason) =
                    decide(&mut tx, policy, rule, event, paused).await?;
                store::reactions::record(&mut tx, event.id, &rule.name, status, proposal, &reason)
                    .await?;
                if status == "proposed" {
                    total.proposed += 1;
                    proposals_left = proposals_left.saturating_sub(1);
                } else {
                    total.skipped += 1;
                }
            }
            handled.push(event.id);
        }
        store::events::mark_processed(&mut tx, &handled).await?;
        tx.commit().await?;
        total.events += handled.len() as u64;
        if handled.len() < events.len() || (events.len() as i64) < batch {
            break;
        }
    }
    Ok(total)
}

/// Does `rule` apply to `event`: its `on` pattern and its `where` subset
/// (`Reaction::matches`), but never to the proposals the rule made itself.
pub fn matches(rule: &Reaction, event: &PendingEvent) -> bool {
    rule.matches(&event.kind, &event.payload)
        && event.payload.get("proposed_by").and_then(Value::as_str)
            != Some(&format!("reaction:{}", rule.name))
}

async fn decide(
    conn: &mut PgConnection,
    policy: &Policy,
    rule: &Reaction,
    event: &PendingEvent,
    paused: bool,
) -> OpsResult<(&'static str, Option<i64>, String)> {
    if paused {
        return Ok(("skipped", None, "paused".into()));
    }
    if let Some(cooldown) = rule.cooldown
        && let Some(last) = store::reactions::last_proposed(conn, &rule.name).await?
    {
        let since = Utc::now()
            .signed_duration_since(last)
            .to_std()
            .unwrap_or_default();
        if since < cooldown {
            return Ok(("skipped", None, "cooldown".into()));
        }
    }
    if rule.probability < 1.0 && rand::random::<f64>() >= rule.probability {
        return Ok(("skipped", None, format!("probability {}", rule.probability)));
    }
    let request = NewProposal {
        template: rule.propose.as_str().to_string(),
        params: rule.resolve_params(event.id, &event.kind, &event.source, &event.payload),
        proposed_by: format!("reaction:{}", rule.name),
        source: Source::Reaction,
        priority: None,
        may_raise_priority: false,
    };
    let (template, params) = match proposals::validate(policy, &request) {
        Ok(ok) => ok,
        Err(e) => return Ok(("skipped", None, e.to_string())),
    };
    let proposed = proposals::propose_in(conn, policy, template, params, &request).await?;
    let reason = match proposed.status {
        ProposalStatus::Rejected => proposed.reason.unwrap_or_default(),
        status => status.to_string(),
    };
    Ok(("proposed", Some(proposed.id), reason))
}
