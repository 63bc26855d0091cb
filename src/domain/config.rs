//! Configuration from the environment (docs/commands.md, "Environment"), read in one place.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};

/// Where log lines go and how they look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Clone)]
pub struct Settings {
    pub database_url: Option<String>,
    pub data_dir: PathBuf,
    pub policy_file: Option<PathBuf>,
    pub telegram_token: Option<String>,
    pub telegram_api_url: String,
    pub admins: Vec<i64>,
    pub ops_key: Option<String>,
    pub http_addr: SocketAddr,
    pub log_format: LogFormat,
}

// Secrets stay out of Debug output, so a stray `{:?}` cannot leak them into logs.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("data_dir", &self.data_dir)
            .field("policy_file", &self.policy_file)
            .field(
                "telegram_token",
                &self.telegram_token.as_ref().map(|_| "<set>"),
            )
            .field("telegram_api_url", &self.telegram_api_url)
            .field("admins", &self.admins)
            .field("ops_key", &self.ops_key.as_ref().map(|_| "<set>"))
            .field("http_addr", &self.http_addr)
            .field("log_format", &self.log_format)
            .finish()
    }
}

impl Settings {
    /// Read the environment (after `.env`, which `main` loads first).
    pub fn from_env() -> anyhow::Result<Settings> {
        Self::from_lookup(|key| std::env::var(key).ok().filter(|v| !v.trim().is_empty()))
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
        let admins = match get("OPSLOOP_ADMINS") {
            None => Vec::new(),
            Some(raw) => raw
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<i64>().with_context(|| {
                        format!("OPSLOOP_ADMINS: {s:?} is not a Telegram user id (a number)")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        let http_addr = match get("OPSLOOP_HTTP_ADDR") {
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            Some(raw) => raw.parse().with_context(|| {
                format!("OPSLOOP_HTTP_ADDR: {raw:?} is not an address like 127.0.0.1:8080")
            })?,
        };
        let log_format = match get("OPSLOOP_LOG").as_deref() {
            None => {
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    LogFormat::Pretty
                } else {
                    LogFormat::Json
                }
            }
            Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => bail!("OPSLOOP_LOG: {other:?} is not pretty or json"),
        };
        Ok(Settings {
            database_url: get("DATABASE_URL"),
            data_dir: PathBuf::from(get("OPSLOOP_DATA_DIR").unwrap_or_else(|| ".opsloop".into())),
            policy_file: get("OPSLOOP_POLICY").map(PathBuf::from),
            telegram_token: get("TELEGRAM_BOT_TOKEN"),
            telegram_api_url: get("TELEGRAM_API_URL")
                .unwrap_or_else(|| "https://api.telegram.org".into()),
            admins,
            ops_key: get("OPS_KEY"),
            http_addr,
            log_format,
        })
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}://{}:***{}",
            &url[..scheme_end],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn bad_admins_are_refused_with_the_value() {
        let err = Settings::from_lookup(|k| (k == "OPSLOOP_ADMINS").then(|| "1, x".into()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("\"x\""), "{err}");
    }
}
