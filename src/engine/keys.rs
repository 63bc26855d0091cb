//! Agent keys (design §11): create (the text printed once, its digest kept), revoke,
//! list, and [`authenticate`], which turns a bearer token into the agent it belongs to.
//! Every request with a live key looks it up again, so a revocation holds on the next
//! request on every host; a [`KeyFilter`] of live digests answers wrong keys without
//! touching the database, so a flood of them costs little.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use crate::db::{self, channels};

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
    db::notify(&mut tx, channels::KEYS).await?;
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
    db::notify(&mut tx, channels::KEYS).await?;
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

/// The digests of the live keys, kept in memory and reloaded whenever a key is created
/// or revoked on any host (`channels::KEYS`), and every half minute anyway. It only
/// ever says "surely not a live key": a digest it holds is still looked up, so a
/// revocation holds before the reload. A digest it lacks may be a key created a moment
/// ago on another host, so it is looked up too, but at most [`MISS_LOOKUPS`] a second:
/// past that, a flood of wrong keys is answered from memory.
pub struct KeyFilter {
    live: RwLock<Option<HashSet<String>>>,
    misses: DefaultDirectRateLimiter,
}

/// Lookups per second of digests the filter lacks.
const MISS_LOOKUPS: u32 = 50;
const RELOAD: StdDuration = StdDuration::from_secs(30);

impl KeyFilter {
    /// Load and keep reloading on `pool` until the process ends.
    pub fn start(pool: &PgPool) -> Arc<KeyFilter> {
        let per_second = NonZeroU32::new(MISS_LOOKUPS).unwrap_or(NonZeroU32::MIN);
        let filter = Arc::new(KeyFilter {
            live: RwLock::new(None),
            misses: RateLimiter::direct(Quota::per_second(per_second)),
        });
        let (pool, keep) = (pool.clone(), filter.clone());
        tokio::spawn(async move {
            loop {
                let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await.ok();
                if let Some(l) = listener.as_mut()
                    && l.listen(channels::KEYS).await.is_err()
                {
                    listener = None;
                }
                // Listening first, so a key created while loading is heard.
                keep.reload(&pool).await;
                let Some(mut listener) = listener else {
                    keep.forget();
                    tokio::time::sleep(StdDuration::from_secs(1)).await;
                    continue;
                };
                // A notification or half a minute of quiet: reload. Anything else means
                // the connection went, and without news the filter cannot be trusted.
                while let Ok(Ok(Some(_))) | Err(_) =
                    tokio::time::timeout(RELOAD, listener.try_recv()).await
                {
                    keep.reload(&pool).await;
                }
                keep.forget();
            }
        });
        filter
    }

    async fn reload(&self, pool: &PgPool) {
        let loaded = store::live_digests(pool).await;
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        *live = loaded.ok().map(|d| d.into_iter().collect());
    }

    fn forget(&self) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether `digest` must be looked up in the table.
    fn worth_a_lookup(&self, digest: &str) -> bool {
        let known = match &*self.live.read().unwrap_or_else(|p| p.into_inner()) {
            None => return true,
            Some(live) => live.contains(digest),
        };
        known || self.misses.check().is_ok()
    }
}

/// The live agent whose key `text` is, or `None` (unknown, revoked, or not shaped like
/// a key). Records the use at most once a minute.
pub async fn authenticate(
    pool: &PgPool,
    filter: &KeyFilter,
    text: &str,
) -> OpsResult<Option<Agent>> {
    if !keys::looks_like_key(text) {
        return Ok(None);
    }
    let digest = keys::digest(text);
    if !filter.worth_a_lookup(&digest) {
        return Ok(None);
    }
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
