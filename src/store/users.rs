//! People: Telegram users and their roles (docs/telegram.md). Roles are ordered: each can do
//! everything the one before it can.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use serde_json::json;

use crate::domain::error::{OpsError, OpsResult};
use crate::domain::vocab::{EventKind, Source};
use crate::store::events::{self, NewEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Approver,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = OpsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "approver" => Role::Approver,
            "admin" => Role::Admin,
            _ => {
                return Err(OpsError::bad_input(format!(
                    "unknown role {s:?} (roles: viewer, operator, approver, admin)"
                )));
            }
        })
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct User {
    pub telegram_id: i64,
    pub name: Option<String>,
    pub role: String,
    pub subscribed: bool,
    pub started: bool,
    pub created_at: DateTime<Utc>,
}

impl User {
    pub fn role(&self) -> Option<Role> {
        self.role.parse().ok()
    }
}

pub async fn get(pool: &PgPool, telegram_id: i64) -> OpsResult<Option<User>> {
    Ok(sqlx::query_as(
        "SELECT telegram_id, name, role, subscribed, started, created_at FROM ops_users WHERE telegram_id = $1",
    )
    .bind(telegram_id)
    .fetch_optional(pool)
    .await?)
}

pub async fn list(pool: &PgPool) -> OpsResult<Vec<User>> {
    Ok(sqlx::query_as(
        "SELECT telegram_id, name, role, subscribed, started, created_at FROM ops_users ORDER BY telegram_id",
    )
    .fetch_all(pool)
    .await?)
}

/// Give `telegram_id` a role (creating the user if new), with its `user.granted`
/// event in the same transaction. Returns false when they had that role already.
pub async fn grant(
    pool: &PgPool,
    telegram_id: i64,
    role: Role,
    source: Source,
    by: &str,
) -> OpsResult<bool> {
    if telegram_id <= 0 {
        return Err(OpsError::bad_input(format!(
            "{telegram_id} is not a Telegram user id (user ids are positive numbers)"
        )));
    }
    let mut tx = pool.begin().await?;
    // Someone who already wrote to the bot privately can be written to at once.
    let previous: Option<Option<String>> = sqlx::query_scalar(
        "WITH before AS (SELECT role FROM ops_users WHERE telegram_id = $1)
         INSERT INTO ops_users (telegram_id, role, name, started)
         SELECT $1, $2, c.name, c.telegram_id IS NOT NULL
         FROM (SELECT 1) one LEFT JOIN ops_telegram_contacts c ON c.telegram_id = $1
         ON CONFLICT (telegram_id) DO UPDATE SET role = EXCLUDED.role, updated_at = now()
           WHERE ops_users.role IS DISTINCT FROM EXCLUDED.role
         RETURNING (SELECT role FROM before)",
    )
    .bind(telegram_id)
    .bind(role.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(previous) = previous else {
        return Ok(false);
    };
    events::emit(
        &mut tx,
        NewEvent::new(EventKind::UserGranted, source).payload(json!({
            "telegram_id": telegram_id, "role": role, "previous": previous, "by": by,
        })),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Remove a user, with its `user.revoked` event. Refused for an unknown id.
pub async fn revoke(pool: &PgPool, telegram_id: i64, source: Source, by: &str) -> OpsResult<()> {
    let mut tx = pool.begin().await?;
    let role: Option<String> =
        sqlx::query_scalar("DELETE FROM ops_users WHERE telegram_id = $1 RETURNING role")
            .bind(telegram_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(role) = role else {
        return Err(OpsError::bad_input(format!(
            "there is no user {telegram_id}"
        )));
    };
    events::emit(
        &mut tx,
        NewEvent::new(EventKind::UserRevoked, source)
            .payload(json!({ "telegram_id": telegram_id, "role": role, "by": by })),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Make the `OPSLOOP_ADMINS` ids admins (at start). Other users are left alone.
pub async fn ensure_admins(pool: &PgPool, admins: &[i64]) -> OpsResult<()> {
    for &id in admins {
        grant(pool, id, Role::Admin, Source::Cli, "OPSLOOP_ADMINS").await?;
    }
    Ok(())
}

/// Someone wrote to the bot: remember their name, and in a private chat that the bot
/// may now write to them. Returns their user row, if they have a role.
pub async fn seen(
    pool: &PgPool,
    telegram_id: i64,
    name: &str,
    private: bool,
) -> OpsResult<Option<User>> {
    // A display name is anyone's choice; PostgreSQL cannot store NUL in text.
    let name = &name.replace('\0', "\u{FFFD}");
    if private {
        sqlx::query(
            "INSERT INTO ops_telegram_contacts (telegram_id, name) VALUES ($1, $2)
             ON CONFLICT (telegram_id) DO UPDATE SET name = EXCLUDED.name, last_seen = now()",
        )
        .bind(telegram_id)
        .bind(name)
        .execute(pool)
        .await?;
    }
    Ok(sqlx::query_as(
        "UPDATE ops_users SET name = $2, started = started OR $3, updated_at = now()
         WHERE telegram_id = $1
         RETURNING telegram_id, name, role, subscribed, started, created_at",
    )
    .bind(telegram_id)
    .bind(name)
    .bind(private)
    .fetch_optional(pool)
    .await?)
}

pub async fn set_subscribed(pool: &PgPool, telegram_id: i64, subscribed: bool) -> OpsResult<()> {
    sqlx::query("UPDATE ops_users SET subscribed = $2, updated_at = now() WHERE telegram_id = $1")
        .bind(telegram_id)
        .bind(subscribed)
        .execute(pool)
        .await?;
    Ok(())
}
