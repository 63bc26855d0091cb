//! Owner of `ops_budget_periods`: what each budget spent, and was raised by, per period.
//!
//! ```text
//! (no row) ──charge / raise──▶ row of the current period (ops_budget_period(kind))
//! row ──charge──▶ spent + x            (under the row's lock: no lost update)
//! row ──mark_warned──▶ warned          (once spent ≥ warn_at × (limit + raised))
//! row ──mark_exhausted──▶ exhausted    (once spent ≥ limit + raised)
//! row ──raise──▶ raised + x, raises + 1, warned and exhausted cleared (re-armed)
//! ```
//!
//! The period is always computed by PostgreSQL from `now()` (`ops_budget_period`), so
//! a new period is a new row and starts from nothing. Amounts are decimal text bound
//! as `text` and cast to `numeric`; they come back as text (`trim_scale`d).

use chrono::NaiveDate;
use sqlx::PgConnection;

use crate::domain::budgets::Amount;
use crate::domain::error::OpsResult;
use crate::domain::policy::Budget;

/// A budget's current period as stored (or as it would start: nothing spent).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Current {
    pub budget: String,
    pub starts: NaiveDate,
    pub spent: String,
    /// The policy's limit plus this period's raises.
    pub limit: String,
    pub raises: i32,
    pub raised_by: Option<String>,
    pub raised_at: Option<chrono::DateTime<chrono::Utc>>,
    pub warning: bool,
    pub exhausted: bool,
}

/// The columns of budgets given as arrays, in one order: name, period, limit, warn_at.
struct Columns {
    names: Vec<String>,
    periods: Vec<&'static str>,
    limits: Vec<String>,
    warn_ats: Vec<String>,
}

fn columns<'a>(budgets: impl IntoIterator<Item = &'a Budget>) -> Columns {
    let mut c = Columns {
        names: Vec::new(),
        periods: Vec::new(),
        limits: Vec::new(),
        warn_ats: Vec::new(),
    };
    for b in budgets {
        c.names.push(b.name.clone());
        c.periods.push(b.period.as_str());
        c.limits.push(b.limit.as_str().to_string());
        c.warn_ats.push(b.warn_at.as_str().to_string());
    }
    c
}

/// Add `amounts` to what `budget` spent this period (one increment under the row's
/// lock, created if it is the period's first). Callers charging several budgets in one
/// transaction charge them in name order, so two such transactions cannot deadlock.
pub async fn charge(conn: &mut PgConnection, budget: &Budget, amounts: &[Amount]) -> OpsResult<()> {
    let amounts: Vec<&str> = amounts.iter().map(Amount::as_str).collect();
    sqlx::query(
        "INSERT INTO ops_budget_periods AS b (budget, period, starts, spent)
         SELECT $1, $2, ops_budget_period($2), coalesce(sum(a::numeric), 0) FROM unnest($3::text[]) a
         ON CONFLICT (budget, period, starts)
         DO UPDATE SET spent = b.spent + EXCLUDED.spent, updated_at = now()",
    )
    .bind(&budget.name)
    .bind(budget.period.as_str())
    .bind(amounts)
    .execute(conn)
    .await?;
    Ok(())
}

/// A budget's period that crossed a threshold: for its event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Crossed {
    pub budget: String,
    pub period: String,
    pub starts: NaiveDate,
    pub spent: String,
    pub limit: String,
    pub raises: i32,
}

/// Of these budgets, the current periods that reached `warn_at × limit` and were not
/// marked yet: now marked `warned` (so each period warns once until a raise).
pub async fn mark_warned<'a>(
    conn: &mut PgConnection,
    budgets: impl IntoIterator<Item = &'a Budget>,
) -> OpsResult<Vec<Crossed>> {
    let c = columns(budgets);
    Ok(sqlx::query_as(
        "UPDATE ops_budget_periods p SET warned = true, updated_at = now()
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS b(name, period, lim, warn_at)
         WHERE p.budget = b.name AND p.period = b.period AND p.starts = ops_budget_period(b.period)
           AND NOT p.warned AND p.spent >= b.warn_at::numeric * (b.lim::numeric + p.raised)
         RETURNING p.budget, p.period, p.starts, trim_scale(p.spent)::text AS spent,
                   trim_scale(b.lim::numeric + p.raised)::text AS \"limit\", p.raises",
    )
    .bind(c.names)
    .bind(c.periods)
    .bind(c.limits)
    .bind(c.warn_ats)
    .fetch_all(conn)
    .await?)
}

/// Of these budgets, the current periods that reached their limit and were not marked
/// yet: now marked `exhausted` (once per period until a raise).
pub async fn mark_exhausted<'a>(
    conn: &mut PgConnection,
    budgets: impl IntoIterator<Item = &'a Budget>,
) -> OpsResult<Vec<Crossed>> {
    let c = columns(budgets);
    Ok(sqlx::query_as(
        "UPDATE ops_budget_periods p SET exhausted = true, updated_at = now()
         FROM unnest($1::text[], $2::text[], $3::text[]) AS b(name, period, lim)
         WHERE p.budget = b.name AND p.period = b.period AND p.starts = ops_budget_period(b.period)
           AND NOT p.exhausted AND p.spent >= b.lim::numeric + p.raised
         RETURNING p.budget, p.period, p.starts, trim_scale(p.spent)::text AS spent,
                   trim_scale(b.lim::numeric + p.raised)::text AS \"limit\", p.raises",
    )
    .bind(c.names)
    .bind(c.periods)
    .bind(c.limits)
    .fetch_all(conn)
    .await?)
}

/// What a raise did.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Raised {
    pub starts: NaiveDate,
    pub spent: String,
    /// The limit now (the policy's plus every raise of the period).
    pub limit: String,
    pub raises: i32,
}

/// Raise `budget`'s current period by `amount`, re-arming its warning and exhaustion.
/// With `seen = Some((starts, raises))` (a Raise button), only if the current period is
/// still that one and was raised exactly that many times: a second tap changes nothing.
pub async fn raise(
    conn: &mut PgConnection,
    budget: &Budget,
    amount: &Amount,
    by: &str,
    seen: Option<(NaiveDate, i32)>,
) -> OpsResult<Option<Raised>> {
    Ok(sqlx::query_as(
        "INSERT INTO ops_budget_periods AS b (budget, period, starts, raised, raises, raised_by, raised_at)
         SELECT $1, $2, ops_budget_period($2), $4::numeric, 1, $5, now()
         WHERE $6::date IS NULL OR $6::date = ops_budget_period($2)
         ON CONFLICT (budget, period, starts)
         DO UPDATE SET raised = b.raised + EXCLUDED.raised, raises = b.raises + 1,
                       raised_by = EXCLUDED.raised_by, raised_at = now(),
                       warned = false, exhausted = false, updated_at = now()
         WHERE $7::integer IS NULL OR b.raises = $7
         RETURNING b.starts, trim_scale(b.spent)::text AS spent,
                   trim_scale($3::numeric + b.raised)::text AS \"limit\", b.raises",
    )
    .bind(&budget.name)
    .bind(budget.period.as_str())
    .bind(budget.limit.as_str())
    .bind(amount.as_str())
    .bind(by)
    .bind(seen.map(|(starts, _)| starts))
    .bind(seen.map(|(_, raises)| raises))
    .fetch_optional(conn)
    .await?)
}

/// Each budget's current period (nothing spent when it has no row yet), in the given
/// order, with its status against the policy's limit and warn_at.
pub async fn current<'a>(
    conn: &mut PgConnection,
    budgets: impl IntoIterator<Item = &'a Budget>,
) -> OpsResult<Vec<Current>> {
    let c = columns(budgets);
    Ok(sqlx::query_as(
        "SELECT b.name AS budget, ops_budget_period(b.period) AS starts,
                trim_scale(coalesce(p.spent, 0))::text AS spent,
                trim_scale(b.lim::numeric + coalesce(p.raised, 0))::text AS \"limit\",
                coalesce(p.raises, 0) AS raises, p.raised_by, p.raised_at,
                coalesce(p.spent, 0) >= b.warn_at::numeric * (b.lim::numeric + coalesce(p.raised, 0)) AS warning,
                coalesce(p.spent, 0) >= b.lim::numeric + coalesce(p.raised, 0) AS exhausted
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY
              AS b(name, period, lim, warn_at, n)
         LEFT JOIN ops_budget_periods p
           ON p.budget = b.name AND p.period = b.period AND p.starts = ops_budget_period(b.period)
         ORDER BY b.n",
    )
    .bind(c.names)
    .bind(c.periods)
    .bind(c.limits)
    .bind(c.warn_ats)
    .fetch_all(conn)
    .await?)
}

/// Half of `budget`'s current limit (the policy's plus raises), as decimal text: what
/// the **➕ Raise 50%** button adds.
pub async fn half_of_limit(conn: &mut PgConnection, budget: &Budget) -> OpsResult<String> {
    Ok(sqlx::query_scalar(
        "SELECT trim_scale(($3::numeric + coalesce(
                    (SELECT raised FROM ops_budget_periods
                     WHERE budget = $1 AND period = $2 AND starts = ops_budget_period($2)), 0)) / 2)::text",
    )
    .bind(&budget.name)
    .bind(budget.period.as_str())
    .bind(budget.limit.as_str())
    .fetch_one(conn)
    .await?)
}

/// The row of one budget's period (any period), if it has one: what a message about it
/// shows now.
pub async fn period_row(
    conn: &mut PgConnection,
    budget: &str,
    period: &str,
    starts: NaiveDate,
) -> OpsResult<
    Option<(
        i32,
        Option<String>,
        Option<chrono::DateTime<chrono::Utc>>,
        bool,
    )>,
> {
    Ok(sqlx::query_as(
        "SELECT raises, raised_by, raised_at, starts = ops_budget_period(period)
         FROM ops_budget_periods WHERE budget = $1 AND period = $2 AND starts = $3",
    )
    .bind(budget)
    .bind(period)
    .bind(starts)
    .fetch_optional(conn)
    .await?)
}
