//! Agent keys (design §11): create (the text printed once, its digest kept), revoke,
//! list, and [`authenticate`], which turns a bearer token into the agent it belongs to.
//! Every request looks the key up again, so a revocation holds on the next request on
//! every host.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use crate::domain::error::{OpsError, OpsResult};
use crate::domain::keys::{self, KeyName, Scopes};
use crate::domain::vocab::{EventKind, Source};
use crate::store::events::{self, NewEvent};
use crate::store::keys::{self as store, KeyRow};

/// An authenticated agent: who it is and what it may do.
#[derive(Debug, Clone)]
pub struct Agent {
    pub name: KeyName,
    pub scopes: Scopes,
}

/// A key as `keys list` shows it: never the key, nor its digest.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    pub name: String,
    pub scopes: Scopes,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Create a key named `name` with `scopes`; returns its text, which nothing keeps.
/// A name given to a live key is refused (exit 3).
pub async fn create(pool: &PgPool, name: &KeyName, scopes: &Scopes, by: &str) -> OpsResult<String> {
    let key = keys::generate()?;
    let mut tx = pool.begin().await?;
    if store::insert(&mut tx, name, &keys::digest(&key), scopes, by)
        .await?
        .is_none()
    {
        return Err(OpsError::refused(format!(
            "a key named {} exists; `opsloop keys revoke {}` first, or pick another name",
            name.as_str(),
            name.as_str()
        )));
    }
    events::emit(
        &mut tx,
        NewEvent::new(EventKind::KeyCreated, Source::Cli).payload(json!({
            "name": name.as_str(),
            "scopes": scopes,
            "by": by,
        })),
    )
    .await?;
    tx.commit().await?;
    Ok(key)
}

/// Revoke the live key named `name` (exit 2 when there is none).
pub async fn revoke(pool: &PgPool, name: &str, by: &str) -> OpsResult<()> {
    let name = KeyName::parse(name)?;
    let mut tx = pool.begin().await?;
    if store::revoke(&mut tx, name.as_str(), by).await?.is_none() {
        return Err(OpsError::bad_input(format!(
            "there is no live key named {} (see `opsloop keys list`)",
            name.as_str()
        )));
    }
    events::emit(
        &mut tx,
        NewEvent::new(EventKind::KeyRevoked, Source::Cli)
            .payload(json!({ "name": name.as_str(), "by": by })),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn list(pool: &PgPool) -> OpsResult<Vec<KeyView>> {
    store::list(pool)
        .await?
        .into_iter()
        .map(|row| {
            Ok(KeyView {
                scopes: scopes_of(&row)?,
                name: row.name,
                created_at: row.created_at,
                last_used_at: row.last_used_at,
                revoked_at: row.revoked_at,
            })
        })
        .collect()
}

/// The live agent whose key `text` is, or `None` (unknown, revoked, or not shaped like
/// a key). Records the use at most once a minute.
pub async fn authenticate(pool: &PgPool, text: &str) -> OpsResult<Option<Agent>> {
    if !keys::looks_like_key(text) {
        return Ok(None);
    }
    let digest = keys::digest(text);
    let Some(row) = store::find_live(pool, &digest).await? else {
        return Ok(None);
    };
    // The index found it by digest; compare again in constant time so no path through
    // here depends on how much of a guess was right.
    if !bool::from(row.digest.as_bytes().ct_eq(digest.as_bytes())) {
        return Ok(None);
    }
    let stale = row
        .last_used_at
        .is_none_or(|at| Utc::now() - at >= Duration::minutes(1));
    if stale {
        store::touch(pool, row.id).await?;
    }
    Ok(Some(Agent {
        scopes: scopes_of(&row)?,
        name: KeyName::parse(&row.name)?,
    }))
}

fn scopes_of(row: &KeyRow) -> OpsResult<Scopes> {
    Scopes::parse(&row.propose, &row.emit, row.answer, row.read)
}
