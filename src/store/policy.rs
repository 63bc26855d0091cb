//! The applied policy lives in `ops_policy` (key `policy`) as its TOML source with a
//! version number; every process parses it and reloads when the version moves, so
//! `policy apply` on one host reaches daemons on all hosts within one tick.

use std::sync::Arc;

use sqlx::{PgConnection, PgPool};
use tokio::sync::RwLock;

use crate::domain::error::{OpsError, OpsResult};
use crate::domain::policy::{NotifyPolicy, Policy, parse};
use crate::domain::vocab::{EventKind, Source};
use crate::store::events::{self, NewEvent};

/// A parsed policy and the version it was stored under.
#[derive(Debug, Clone)]
pub struct Applied {
    pub version: i64,
    pub source: String,
    pub policy: Arc<Policy>,
}

/// Validate and store `source`. Returns the new version.
pub async fn apply(pool: &PgPool, source: &str, applied_by: &str) -> OpsResult<i64> {
    let policy = match parse(source) {
        Ok(policy) => policy,
        Err(problems) => {
            let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            return Err(OpsError::bad_input(format!(
                "the policy has {} problem(s):\n{}",
                lines.len(),
                lines.join("\n")
            )));
        }
    };
    let mut tx = pool.begin().await?;
    // The outbox trigger reads who to tell from here (migrations/0002_outbox.sql).
    sqlx::query(
        "INSERT INTO ops_policy (key, value, updated_at) VALUES ('notify', $1, now())
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
    )
    .bind(notify_config(&policy.notify))
    .execute(&mut *tx)
    .await?;
    // Events are written already processed when no rule can match their kind
    // (ops_processed_at in migrations/0001_schema.sql).
    sqlx::query(
        "INSERT INTO ops_policy (key, value, updated_at) VALUES ('reactions', $1, now())
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
    )
    .bind(reactions_config(&policy))
    .execute(&mut *tx)
    .await?;
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO ops_policy (key, value, updated_at)
         VALUES ('policy', jsonb_build_object('version', 1, 'source', $1::text, 'applied_by', $2::text), now())
         ON CONFLICT (key) DO UPDATE SET
           value = jsonb_build_object(
             'version', (ops_policy.value->>'version')::bigint + 1,
             'source', $1::text, 'applied_by', $2::text),
           updated_at = now()
         RETURNING (value->>'version')::bigint",
    )
    .bind(source)
    .bind(applied_by)
    .fetch_one(&mut *tx)
    .await?;
    events::emit(
        &mut tx,
        NewEvent::new(EventKind::PolicyApplied, Source::Cli)
            .payload(serde_json::json!({ "version": version, "by": applied_by })),
    )
    .await?;
    tx.commit().await?;
    Ok(version)
}

/// `notify` as the outbox trigger reads it: chats, and event patterns as LIKE patterns.
fn notify_config(notify: &NotifyPolicy) -> serde_json::Value {
    let like: Vec<String> = notify
        .events
        .iter()
        .map(|p| like_pattern(p.as_str()))
        .collect();
    serde_json::json!({ "chats": notify.chats, "like": like })
}

/// The kinds reaction rules listen to, as LIKE patterns.
fn reactions_config(policy: &Policy) -> serde_json::Value {
    let like: Vec<String> = policy
        .reactions
        .iter()
        .map(|r| like_pattern(r.on.as_str()))
        .collect();
    serde_json::json!({ "like": like })
}

/// `mission.*` → `mission.%`, with LIKE's own wildcards escaped.
fn like_pattern(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len());
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// The applied policy, if any.
pub async fn load(pool: &PgPool) -> OpsResult<Option<Applied>> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT (value->>'version')::bigint, value->>'source' FROM ops_policy WHERE key = 'policy'",
    )
    .fetch_optional(pool)
    .await?;
    let Some((version, source)) = row else {
        return Ok(None);
    };
    let policy = parse(&source).map_err(|problems| {
        OpsError::Other(anyhow::anyhow!(
            "the stored policy (version {version}) no longer parses: {}",
            problems.first().map(|p| p.to_string()).unwrap_or_default()
        ))
    })?;
    Ok(Some(Applied {
        version,
        source,
        policy: Arc::new(policy),
    }))
}

/// The applied policy, or a clear refusal telling how to apply one.
pub async fn require(pool: &PgPool) -> OpsResult<Applied> {
    load(pool).await?.ok_or_else(|| {
        OpsError::bad_input(
            "no policy has been applied yet: run `opsloop policy apply FILE` (e.g. deploy/opsloop.example.toml)",
        )
    })
}

async fn current_version(pool: &PgPool) -> OpsResult<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT (value->>'version')::bigint FROM ops_policy WHERE key = 'policy'",
    )
    .fetch_optional(pool)
    .await?)
}

/// A daemon's view of the policy, refreshed cheaply (one tiny query) when the version moves.
#[derive(Clone, Default)]
pub struct PolicyCache {
    inner: Arc<RwLock<Option<Applied>>>,
}

impl PolicyCache {
    /// The current policy (an empty default policy if none was applied yet).
    pub async fn get(&self) -> Arc<Policy> {
        match &*self.inner.read().await {
            Some(applied) => applied.policy.clone(),
            None => Arc::new(Policy::default()),
        }
    }

    /// Reload if the stored version changed. Returns the new version when it did.
    pub async fn refresh(&self, pool: &PgPool) -> OpsResult<Option<i64>> {
        let stored = current_version(pool).await?;
        let known = self.inner.read().await.as_ref().map(|a| a.version);
        if stored.is_none() || stored == known {
            return Ok(None);
        }
        let applied = load(pool).await?;
        let version = applied.as_ref().map(|a| a.version);
        *self.inner.write().await = applied;
        Ok(version)
    }
}

// The pause switch and paused templates, also kept in `ops_policy`.

/// The pause switch, read through `ops_paused()` (migrations/0011_paused.sql), the one
/// definition the worker's claim uses too.
pub async fn is_paused(conn: &mut PgConnection) -> OpsResult<bool> {
    Ok(sqlx::query_scalar("SELECT paused FROM ops_paused()")
        .fetch_one(conn)
        .await?)
}

/// Put the switch in position `paused`. Returns false when it was there already.
/// Concurrent flips serialize on the switch's row.
pub async fn switch_pause(conn: &mut PgConnection, paused: bool, by: &str) -> OpsResult<bool> {
    sqlx::query(
        "INSERT INTO ops_policy (key, value, updated_at)
         VALUES ('paused', '{\"paused\": false}', now()) ON CONFLICT (key) DO NOTHING",
    )
    .execute(&mut *conn)
    .await?;
    let switched = sqlx::query(
        "UPDATE ops_policy SET value = $1, updated_at = now()
         WHERE key = 'paused' AND coalesce((value->>'paused')::boolean, false) IS DISTINCT FROM $2",
    )
    .bind(serde_json::json!({ "paused": paused, "by": by }))
    .bind(paused)
    .execute(conn)
    .await?;
    Ok(switched.rows_affected() > 0)
}

/// A paused template's count of failures in a row, if it is paused.
pub async fn template_paused(conn: &mut PgConnection, template: &str) -> OpsResult<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT (value->$1->>'failures')::bigint FROM ops_policy WHERE key = 'paused_templates'",
    )
    .bind(template)
    .fetch_optional(conn)
    .await?
    .flatten())
}

pub async fn pause_template(
    conn: &mut PgConnection,
    template: &str,
    failures: i64,
) -> OpsResult<()> {
    sqlx::query(
        "INSERT INTO ops_policy (key, value, updated_at)
         VALUES ('paused_templates', jsonb_build_object($1::text, jsonb_build_object('failures', $2::bigint, 'at', now())), now())
         ON CONFLICT (key) DO UPDATE
           SET value = ops_policy.value || EXCLUDED.value, updated_at = now()",
    )
    .bind(template)
    .bind(failures)
    .execute(conn)
    .await?;
    Ok(())
}

/// Lift a template's pause. Returns whether it was paused.
pub async fn resume_template(conn: &mut PgConnection, template: &str) -> OpsResult<bool> {
    let done = sqlx::query(
        "UPDATE ops_policy SET value = value - $1, updated_at = now()
         WHERE key = 'paused_templates' AND value ? $1",
    )
    .bind(template)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

pub async fn paused_templates(conn: &mut PgConnection) -> OpsResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT jsonb_object_keys(value) FROM ops_policy WHERE key = 'paused_templates' ORDER BY 1",
    )
    .fetch_all(conn)
    .await?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn globs_become_like_patterns() {
        assert_eq!(super::like_pattern("mission.*"), "mission.%");
        assert_eq!(super::like_pattern("my_app.*"), "my\\_app.%");
    }
}
