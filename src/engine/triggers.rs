//! Cron triggers: a schedule proposes a template. Each trigger remembers the last slot
//! it handled, so after downtime a missed schedule fires once, not once per slot.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tracing::warn;

use crate::error::OpsResult;
use crate::policy::{Policy, Trigger};
use crate::proposals::{self, NewProposal, Source};

/// Fire every trigger whose next slot after the last one handled is due. Returns how
/// many fired. While paused, due slots are passed over (recorded, not fired).
pub async fn fire_due(
    pool: &PgPool,
    policy: &Policy,
    now: DateTime<Utc>,
    paused: bool,
) -> OpsResult<u64> {
    let mut fired = 0;
    for trigger in &policy.triggers {
        let mut tx = pool.begin().await?;
        let last: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT last_slot FROM ops_trigger_state WHERE name = $1 FOR UPDATE",
        )
        .bind(&trigger.name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(last) = last else {
            // First sight: start counting from now; nothing was missed yet.
            sqlx::query(
                "INSERT INTO ops_trigger_state (name, last_slot) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            )
            .bind(&trigger.name)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            continue;
        };
        let Some(due) = next_slot(trigger, last) else {
            continue;
        };
        if due > now {
            continue;
        }
        if !paused {
            let request = NewProposal {
                template: trigger.propose.as_str().to_string(),
                params: trigger.params.clone(),
                proposed_by: format!("trigger:{}", trigger.name),
                source: Source::Trigger,
            };
            match proposals::validate(policy, &request) {
                Ok((template, params)) => {
                    proposals::propose_in(&mut tx, policy, template, params, &request).await?;
                    fired += 1;
                }
                Err(e) => warn!(trigger = %trigger.name, error = %e, "trigger cannot propose"),
            }
        }
        sqlx::query(
            "UPDATE ops_trigger_state SET last_slot = $2, fired_at = now() WHERE name = $1",
        )
        .bind(&trigger.name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(fired)
}

/// The first slot of `trigger` strictly after `after`, in the trigger's time zone.
pub fn next_slot(trigger: &Trigger, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = after.with_timezone(&trigger.tz);
    match trigger.cron.find_next_occurrence(&local, false) {
        Ok(next) => Some(next.with_timezone(&Utc)),
        Err(e) => {
            warn!(trigger = %trigger.name, error = %e, "no next slot for the cron expression");
            None
        }
    }
}
