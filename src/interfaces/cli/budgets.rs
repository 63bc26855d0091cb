//! Budgets from the command line: `budgets [--json]` and `budget raise NAME AMOUNT`.

use serde_json::json;
use sqlx::PgPool;

use super::commands::whoami;
use crate::domain::error::OpsResult;
use crate::domain::vocab::Source;
use crate::engine::budgets;
use crate::store::policy as store;

pub(super) async fn list(pool: &PgPool, json: bool) -> OpsResult<i32> {
    let policy = store::load(pool)
        .await?
        .map(|a| a.policy)
        .unwrap_or_default();
    let views = budgets::list(pool, &policy).await?;
    if json {
        println!("{}", json!(views));
        return Ok(0);
    }
    if views.is_empty() {
        println!("no budgets (add [budgets.NAME] to the policy)");
        return Ok(0);
    }
    println!(
        "{:<24} {:<6} {:>14} {:>14}  status",
        "budget", "period", "spent", "limit"
    );
    for v in &views {
        println!(
            "{:<24} {:<6} {:>14} {:>14}  {}",
            v.name, v.period, v.spent, v.limit, v.status
        );
    }
    Ok(0)
}

pub(super) async fn raise(
    pool: &PgPool,
    name: &str,
    amount: &str,
    actor: Option<String>,
    json: bool,
) -> OpsResult<i32> {
    let by = whoami(actor)?;
    let policy = store::load(pool)
        .await?
        .map(|a| a.policy)
        .unwrap_or_default();
    let raised = budgets::raise(pool, &policy, name, amount, &by, Source::Cli).await?;
    if json {
        println!("{}", json!(raised));
    } else {
        println!("{}", raised.describe());
    }
    Ok(0)
}
