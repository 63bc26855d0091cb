//! Operator controls from the command line: `retry` and `kill` (the kill switch).

use serde_json::json;
use sqlx::PgPool;

use super::commands::whoami;
use crate::domain::error::OpsResult;
use crate::domain::input::parse_id;
use crate::domain::vocab::Source;
use crate::engine::missions::controls;
use crate::store::policy as store;

pub(super) async fn retry(
    pool: &PgPool,
    mission_id: &str,
    actor: Option<String>,
    json: bool,
) -> OpsResult<i32> {
    let id = parse_id(mission_id, "mission")?;
    // The template's pause and max_running are checked as for a new mission.
    let policy = match store::load(pool).await? {
        Some(applied) => applied.policy,
        None => Default::default(),
    };
    let retried = controls::retry(pool, &policy, id, &whoami(actor)?, Source::Cli, None).await?;
    if json {
        println!("{}", json!(retried));
    } else {
        println!("{}", retried.describe());
    }
    Ok(0)
}

pub(super) async fn kill(
    pool: &PgPool,
    reason: Option<String>,
    actor: Option<String>,
    json: bool,
) -> OpsResult<i32> {
    let reason = reason.map(|r| r.trim().chars().take(1000).collect::<String>());
    let killed = controls::kill(pool, &whoami(actor)?, Source::Cli, reason.as_deref()).await?;
    if json {
        println!("{}", json!(killed));
    } else {
        let ids: Vec<String> = killed.missions.iter().map(|m| format!("#{m}")).collect();
        println!(
            "killed: paused, {} running mission{} cancelled{}; `opsloop resume` lifts the pause",
            ids.len(),
            if ids.len() == 1 { "" } else { "s" },
            if ids.is_empty() {
                String::new()
            } else {
                format!(" ({})", ids.join(", "))
            }
        );
    }
    Ok(0)
}
