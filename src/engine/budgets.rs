//! Budgets (design §11): steps' reported costs charged to their missions and to the
//! budgets those missions fall in, the warning and exhaustion written once per period,
//! the `budget` gate, and raises.
//!
//! A cost is charged in the transaction that stores the step's ending (`charge`), as
//! `spent = spent + x` on the budget's row of the current period, so workers finishing
//! missions at once never lose an update; the same transaction then marks the row
//! warned / exhausted if it just crossed (`cross`), each at most once per period: the
//! row's lock orders the workers, and the mark is the row's own flag. The heartbeat runs
//! `cross` too ("budgets checked"), for a limit lowered by a policy or a raise that did
//! not lift the budget out of its state. The gate reads the current row: nothing locks.

use chrono::NaiveDate;
use serde::Serialize;
use serde_json::json;
use sqlx::{PgConnection, PgPool};

use crate::domain::budgets::Amount;
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::policy::{Budget, Policy};
use crate::domain::vocab::{EventKind, Source};
use crate::engine::gates::Refusal;
use crate::store::budgets::{self as store, Crossed, Current};
use crate::store::events::{self, NewEvent};
use crate::store::{missions, outbox};

/// The gate's name in refusals.
pub const GATE: &str = "budget";

/// Charge steps' costs `(mission_id, cost)` to their missions and to every budget each
/// mission falls in (once per budget), then write what crossed. In the caller's
/// transaction (the one storing the endings).
pub async fn charge(
    conn: &mut PgConnection,
    policy: &Policy,
    costs: &[(i64, Amount)],
) -> OpsResult<()> {
    if costs.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = costs.iter().map(|(id, _)| *id).collect();
    let amounts: Vec<&str> = costs.iter().map(|(_, a)| a.as_str()).collect();
    let charged = missions::add_cost(conn, &ids, &amounts).await?;
    if policy.budgets.is_empty() {
        return Ok(());
    }
    // Name order (a BTreeMap): two transactions charging the same budgets lock their
    // rows in the same order.
    let mut touched = Vec::new();
    for budget in policy.budgets.values() {
        let amounts: Vec<Amount> = charged
            .iter()
            .filter(|m| budget.covers(&m.template, &m.proposed_by))
            .filter_map(|m| Amount::parse(&m.added).ok())
            .filter(|a| !a.is_zero())
            .collect();
        if !amounts.is_empty() {
            store::charge(conn, budget, &amounts).await?;
            touched.push(budget);
        }
    }
    if !touched.is_empty() {
        cross(conn, touched, Source::Worker).await?;
    }
    Ok(())
}

/// The heartbeat's phase: every budget's current period checked against its thresholds.
/// Returns how many warnings and exhaustions it wrote.
pub async fn check(pool: &PgPool, policy: &Policy) -> OpsResult<u64> {
    if policy.budgets.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    let n = cross(&mut tx, policy.budgets.values(), Source::Heartbeat).await?;
    tx.commit().await?;
    Ok(n)
}

/// Mark the budgets' periods that crossed warn_at or their limit (each once per period
/// until a raise) and write their events; admins are told whatever `notify.events` says.
async fn cross<'a>(
    conn: &mut PgConnection,
    budgets: impl IntoIterator<Item = &'a Budget> + Clone,
    source: Source,
) -> OpsResult<u64> {
    let warned = store::mark_warned(conn, budgets.clone()).await?;
    let exhausted = store::mark_exhausted(conn, budgets.clone()).await?;
    let all: Vec<&Budget> = budgets.into_iter().collect();
    let mut written = 0;
    for (kind, rows) in [
        (EventKind::BudgetWarning, warned),
        (EventKind::BudgetExhausted, exhausted),
    ] {
        for c in rows {
            let Some(budget) = all.iter().find(|b| b.name == c.budget) else {
                continue;
            };
            let id = events::emit(
                conn,
                NewEvent::new(kind, source).payload(payload(budget, &c)),
            )
            .await?;
            outbox::enqueue_for_admins(conn, id).await?;
            written += 1;
        }
    }
    Ok(written)
}

fn payload(budget: &Budget, c: &Crossed) -> serde_json::Value {
    json!({
        "budget": c.budget,
        "period": c.period,
        "starts": c.starts.to_string(),
        "spent": c.spent,
        "limit": c.limit,
        "warn_at": budget.warn_at.as_str(),
        "raises": c.raises,
    })
}

/// The `budget` gate: a proposal of `template` by `proposed_by` is refused while a budget
/// it falls in is exhausted this period. Runs inside the proposal's (or approval's, or
/// retry's) transaction.
pub async fn gate(
    conn: &mut PgConnection,
    policy: &Policy,
    template: &str,
    proposed_by: &str,
) -> OpsResult<Option<Refusal>> {
    let covering: Vec<&Budget> = policy
        .budgets
        .values()
        .filter(|b| b.covers(template, proposed_by))
        .collect();
    if covering.is_empty() {
        return Ok(None);
    }
    let current = store::current(conn, covering.iter().copied()).await?;
    Ok(current
        .iter()
        .zip(&covering)
        .find(|(c, _)| c.exhausted)
        .map(|(c, b)| Refusal {
            gate: GATE,
            reason: format!(
                "budget {} is exhausted: spent {} of {} this {} (UTC, since {}); an admin can raise it (`opsloop budget raise {} AMOUNT`)",
                b.name, c.spent, c.limit, b.period, c.starts, b.name
            ),
            existing: None,
        }))
}

/// One budget as `budgets` and `/budgets` show it.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub name: String,
    pub period: String,
    /// This period's limit (the policy's plus raises), an exact decimal.
    #[serde(serialize_with = "as_number")]
    pub limit: String,
    #[serde(serialize_with = "as_number")]
    pub spent: String,
    /// `ok`, `warning` or `exhausted`.
    pub status: &'static str,
    /// The day the period started (UTC).
    pub starts: String,
    pub raised_by: Option<String>,
}

/// Decimal text as a JSON number (what scripts compare); the exact value is in the
/// database.
pub(crate) fn as_number<S: serde::Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    match text.parse::<f64>() {
        Ok(f) => s.serialize_f64(f),
        Err(_) => s.serialize_str(text),
    }
}

/// Every budget of the policy, by name, with this period's spent, limit and status.
pub async fn list(pool: &PgPool, policy: &Policy) -> OpsResult<Vec<View>> {
    let mut conn = pool.acquire().await?;
    let current = store::current(&mut conn, policy.budgets.values()).await?;
    Ok(current
        .into_iter()
        .zip(policy.budgets.values())
        .map(|(c, b)| view(b, c))
        .collect())
}

fn view(b: &Budget, c: Current) -> View {
    View {
        name: b.name.clone(),
        period: b.period.as_str().to_string(),
        status: if c.exhausted {
            "exhausted"
        } else if c.warning {
            "warning"
        } else {
            "ok"
        },
        limit: c.limit,
        spent: c.spent,
        starts: c.starts.to_string(),
        raised_by: c.raised_by,
    }
}

/// What a raise did, for people and scripts.
#[derive(Debug, Clone, Serialize)]
pub struct RaisedView {
    pub budget: String,
    pub period: String,
    pub amount: String,
    pub limit: String,
    pub spent: String,
    pub by: String,
}

impl RaisedView {
    pub fn describe(&self) -> String {
        format!(
            "budget {} raised by {} for this {}: limit now {}, spent {}",
            self.budget, self.amount, self.period, self.limit, self.spent
        )
    }
}

fn known<'p>(policy: &'p Policy, name: &str) -> OpsResult<&'p Budget> {
    policy.budgets.get(name).ok_or_else(|| {
        let names: Vec<&str> = policy.budgets.keys().map(String::as_str).collect();
        OpsError::bad_input(format!(
            "there is no budget {:?} in the policy{}",
            name.chars().take(40).collect::<String>(),
            if names.is_empty() {
                String::new()
            } else {
                format!(" (budgets: {})", names.join(", "))
            }
        ))
    })
}

/// `opsloop budget raise NAME AMOUNT`: raise this period's limit by AMOUNT (positive).
pub async fn raise(
    pool: &PgPool,
    policy: &Policy,
    name: &str,
    amount: &str,
    by: &str,
    source: Source,
) -> OpsResult<RaisedView> {
    let budget = known(policy, name)?;
    let amount =
        Amount::positive(amount).map_err(|e| OpsError::bad_input(format!("bad amount: {e}")))?;
    let mut tx = pool.begin().await?;
    let raised = store::raise(&mut tx, budget, &amount, by, None)
        .await?
        .ok_or_else(|| OpsError::Other(anyhow::anyhow!("the raise changed no row")))?;
    let view = announce(&mut tx, budget, &amount, &raised, by, source).await?;
    tx.commit().await?;
    Ok(view)
}

/// A **➕ Raise 50%** tap: half the current limit, only if the period and the count of
/// raises are still those the message showed (a second or stale tap changes nothing).
pub async fn raise_half(
    pool: &PgPool,
    policy: &Policy,
    name: &str,
    starts: NaiveDate,
    raises: i32,
    by: &str,
) -> OpsResult<RaisedView> {
    let budget = policy
        .budgets
        .get(name)
        .ok_or_else(|| OpsError::bad_input(format!("budget {name} is no longer in the policy")))?;
    let mut tx = pool.begin().await?;
    let half = store::half_of_limit(&mut tx, budget).await?;
    let amount = Amount::positive(&half).map_err(|e| OpsError::Other(anyhow::anyhow!(e)))?;
    let Some(raised) = store::raise(&mut tx, budget, &amount, by, Some((starts, raises))).await?
    else {
        drop(tx);
        let mut conn = pool.acquire().await?;
        let why = match store::period_row(&mut conn, name, budget.period.as_str(), starts).await? {
            Some((_, _, _, false)) | None => {
                format!("that period of budget {name} is over; a new one started from nothing")
            }
            Some((_, by, at, true)) => format!(
                "budget {name} was already raised{}{}",
                by.map(|b| format!(" by {b}")).unwrap_or_default(),
                at.map(|t| format!(" at {}", t.format("%H:%M UTC")))
                    .unwrap_or_default()
            ),
        };
        return Err(OpsError::refused(why));
    };
    let view = announce(&mut tx, budget, &amount, &raised, by, Source::Telegram).await?;
    tx.commit().await?;
    Ok(view)
}

/// A raise's event and the edits of the period's exhaustion messages (they lose their
/// button and say who raised it).
async fn announce(
    conn: &mut PgConnection,
    budget: &Budget,
    amount: &Amount,
    raised: &store::Raised,
    by: &str,
    source: Source,
) -> OpsResult<RaisedView> {
    let view = RaisedView {
        budget: budget.name.clone(),
        period: budget.period.as_str().to_string(),
        amount: amount.as_str().to_string(),
        limit: raised.limit.clone(),
        spent: raised.spent.clone(),
        by: by.to_string(),
    };
    events::emit(
        conn,
        NewEvent::new(EventKind::BudgetRaised, source).payload(json!({
            "budget": budget.name,
            "period": budget.period.as_str(),
            "starts": raised.starts.to_string(),
            "amount": view.amount,
            "limit": view.limit,
            "spent": view.spent,
            "raises": raised.raises,
            "by": by,
        })),
    )
    .await?;
    outbox::enqueue_budget_edits(
        conn,
        EventKind::BudgetExhausted.as_str(),
        &budget.name,
        &raised.starts.to_string(),
    )
    .await?;
    Ok(view)
}
