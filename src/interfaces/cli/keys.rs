//! `opsloop keys create | list | revoke`: agent keys for `/api/*` (design §11).

use serde_json::json;
use sqlx::PgPool;

use super::KeysCommand;
use super::commands::whoami;
use crate::domain::error::{OpsError, OpsResult};
use crate::domain::keys::{KeyName, Scopes};
use crate::engine::keys::{self, KeyView};

pub(super) async fn run(pool: &PgPool, command: KeysCommand) -> OpsResult<i32> {
    match command {
        KeysCommand::Create {
            name,
            propose,
            emit,
            answer,
            read,
        } => {
            let name = KeyName::parse(&name)?;
            let scopes = Scopes::parse(&propose, &emit, answer, read)?;
            if scopes == Scopes::default() {
                return Err(OpsError::bad_input(
                    "a key without scopes can do nothing: give --propose, --emit, --answer or --read",
                ));
            }
            let key = keys::create(pool, &name, &scopes, &whoami(None)?).await?;
            // The key alone on stdout, so `KEY=$(opsloop keys create …)` works.
            println!("{key}");
            eprintln!(
                "key {} created ({}); it is shown only this once: store it now",
                name.as_str(),
                scopes.describe()
            );
        }
        KeysCommand::List { json } => {
            let list = keys::list(pool).await?;
            if json {
                println!("{}", json!(list));
            } else {
                print_list(&list);
            }
        }
        KeysCommand::Revoke { name } => {
            keys::revoke(pool, &name, &whoami(None)?).await?;
            println!("key {name} revoked: its next request is refused, on every host");
        }
    }
    Ok(0)
}

fn print_list(list: &[KeyView]) {
    if list.is_empty() {
        println!("no keys (create one: opsloop keys create NAME --propose 'TEMPLATE*')");
        return;
    }
    let when = |at: Option<chrono::DateTime<chrono::Utc>>| {
        at.map_or_else(
            || "never".to_string(),
            |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
        )
    };
    for key in list {
        let state = match key.revoked_at {
            Some(at) => format!("revoked {}", when(Some(at))),
            None => format!("last used {}", when(key.last_used_at)),
        };
        println!("{:<32}  {}  · {state}", key.name, key.scopes.describe());
    }
}
