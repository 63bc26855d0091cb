//! Cron triggers: a schedule proposes a template. Each trigger remembers the last slot
//! it handled, so after downtime a missed schedule fires once, not once per slot.
//!
//! Schedules are read on the trigger's wall clock, and each wall-clock time a schedule
//! names is one slot, at the first instant it occurs. Daylight saving time:
//! - fall-back: a repeated wall-clock time fires once, at its first occurrence (a daily
//!   `15 2 * * *` in Europe/Berlin fires at 02:15 CEST, not again at 02:15 CET; an
//!   every-10-minutes schedule does not repeat the hour's slots either);
//! - spring-forward: a fixed time that does not exist that day fires once, at the first
//!   wall-clock time after the gap (02:30 → 03:00); repeating schedules go on after it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tracing::warn;

use crate::domain::error::OpsResult;
use crate::domain::policy::{Policy, Trigger};
use crate::domain::vocab::Source;
use crate::engine::proposals::{self, NewProposal};
use crate::store::triggers as state;

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
        let last = state::lock_last_slot(&mut tx, &trigger.name).await?;
        let Some(last) = last else {
            // First sight: start counting from now; nothing was missed yet.
            state::start(&mut tx, &trigger.name, now).await?;
            tx.commit().await?;
            continue;
        };
        let Some(due) = next_slot(trigger, last) else {
            continue;
        };
        if due > now {
            continue;
        }
        let handled = last_due(trigger, due, now);
        if !paused {
            let request = NewProposal {
                template: trigger.propose.as_str().to_string(),
                params: trigger.params.clone(),
                proposed_by: format!("trigger:{}", trigger.name),
                source: Source::Trigger,
                priority: None,
                may_raise_priority: false,
            };
            match proposals::validate(policy, &request) {
                Ok((template, params)) => {
                    proposals::propose_in(&mut tx, policy, template, params, &request).await?;
                    fired += 1;
                }
                Err(e) => warn!(trigger = %trigger.name, error = %e, "trigger cannot propose"),
            }
        }
        // The slot, not the tick's time: the next slot is searched from it.
        state::record_slot(&mut tx, &trigger.name, handled).await?;
        tx.commit().await?;
    }
    Ok(fired)
}

/// Slots searched past before giving up (a per-second schedule across a repeated hour
/// needs 3600).
const MAX_STEPS: u32 = 100_000;

/// The first slot of `trigger` strictly after `after`, in the trigger's time zone.
pub fn next_slot(trigger: &Trigger, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut from = after.with_timezone(&trigger.tz);
    for _ in 0..MAX_STEPS {
        match trigger.cron.find_next_occurrence(&from, false) {
            Ok(next) if next.with_timezone(&Utc) > after => return Some(next.with_timezone(&Utc)),
            // The search walks the wall clock: after a fall-back, a wall-clock time that
            // comes again maps to its first instant, which is already past.
            Ok(next) => from = next,
            Err(e) => {
                warn!(trigger = %trigger.name, error = %e, "no next slot for the cron expression");
                return None;
            }
        }
    }
    warn!(trigger = %trigger.name, "no next slot within {MAX_STEPS} steps");
    None
}

/// The latest slot at or before `now`, given that `due` is one: what a tick at `now`
/// has handled (after downtime, every slot missed is handled by one firing).
pub fn last_due(trigger: &Trigger, due: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    let mut slot = due;
    // Jump close to `now` first (a long downtime of a frequent schedule); the steps
    // below make it exact, whatever the backward search made of a DST change.
    if let Ok(previous) = trigger
        .cron
        .find_previous_occurrence(&now.with_timezone(&trigger.tz), true)
    {
        let previous = previous.with_timezone(&Utc);
        if previous > slot && previous <= now {
            slot = previous;
        }
    }
    for _ in 0..MAX_STEPS {
        match next_slot(trigger, slot) {
            Some(next) if next <= now => slot = next,
            _ => break,
        }
    }
    slot
}
