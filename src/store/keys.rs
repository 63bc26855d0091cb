//! Owner of `ops_api_keys`: agent keys, kept as the SHA-256 of their text (never the text).
//! `insert` → `touch` (first use, then at most once a minute) → `revoke`. A revoked row
//! stays for the record; its name may be given to a new key.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgConnection, PgExecutor};

use crate::domain::error::OpsResult;
use crate::domain::keys::{KeyName, Scopes};

/// A key as the table holds it.
#[derive(Debug, Clone, FromRow)]
pub struct KeyRow {
    pub id: i64,
    pub name: String,
    pub digest: String,
    pub propose: Vec<String>,
    pub emit: Vec<String>,
    pub answer: bool,
    pub read: bool,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, name, digest, propose, emit, answer, read, created_by, created_at, last_used_at, revoked_at";

/// A new live key; `None` when a live key already has this name.
pub async fn insert(
    conn: &mut PgConnection,
    name: &KeyName,
    digest: &str,
    scopes: &Scopes,
    by: &str,
) -> OpsResult<Option<i64>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO ops_api_keys (name, digest, propose, emit, answer, read, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING
         RETURNING id",
    )
    .bind(name.as_str())
    .bind(digest)
    .bind(Scopes::patterns(&scopes.propose))
    .bind(Scopes::patterns(&scopes.emit))
    .bind(scopes.answer)
    .bind(scopes.read)
    .bind(by)
    .fetch_optional(conn)
    .await?)
}

/// The live key with this digest (the unique index finds it; the caller compares the
/// digest again in constant time).
pub async fn find_live(db: impl PgExecutor<'_>, digest: &str) -> OpsResult<Option<KeyRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM ops_api_keys WHERE digest = $1 AND revoked_at IS NULL"
    ))
    .bind(digest)
    .fetch_optional(db)
    .await?)
}

/// Record a use, unless one was recorded less than a minute ago (so a busy agent does
/// not write a row per request).
pub async fn touch(db: impl PgExecutor<'_>, id: i64) -> OpsResult<()> {
    sqlx::query(
        "UPDATE ops_api_keys SET last_used_at = now()
         WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Revoke the live key of this name; its id, or `None` when there is none.
pub async fn revoke(conn: &mut PgConnection, name: &str, by: &str) -> OpsResult<Option<i64>> {
    Ok(sqlx::query_scalar(
        "UPDATE ops_api_keys SET revoked_at = now(), revoked_by = $2
         WHERE name = $1 AND revoked_at IS NULL
         RETURNING id",
    )
    .bind(name)
    .bind(by)
    .fetch_optional(conn)
    .await?)
}

/// The digests of every live key (for the HTTP servers' filter).
pub async fn live_digests(db: impl PgExecutor<'_>) -> OpsResult<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT digest FROM ops_api_keys WHERE revoked_at IS NULL")
            .fetch_all(db)
            .await?,
    )
}

/// Every key, live ones first, then by name and age.
pub async fn list(db: impl PgExecutor<'_>) -> OpsResult<Vec<KeyRow>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM ops_api_keys ORDER BY revoked_at IS NOT NULL, name, id DESC"
    ))
    .fetch_all(db)
    .await?)
}
