//! Step executors: what a worker does with one claimed step (docs/policy.md, "Step kinds").
//!
//! `Executors::execute` turns a `StepSpec` into an `Outcome`. It never touches the
//! database: the worker stores the outcome (and, for `emit`, writes the event) in its
//! completion transaction, fenced by its lease. Every kind that can take time honours
//! `StepContext::cancel`, which fires when the mission is cancelled or the lease is lost.

mod http;
mod shell;

pub(crate) use shell::find_program;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::outputs::Progress;
use crate::domain::steps::StepSpec;

/// How much of each output stream (stdout, stderr, an HTTP body) a result keeps.
pub const TAIL_BYTES: usize = 16 * 1024;

/// Timeout of an HTTP step whose spec and context give none.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything about one attempt of one step that is not in its spec.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub mission_id: i64,
    pub step_id: i64,
    pub attempt: i32,
    /// Already validated; exported to shell steps as `OPSLOOP_PARAM_<NAME>`.
    pub params: BTreeMap<String, String>,
    /// Cancelled when the mission is cancelled or the lease is lost.
    pub cancel: CancellationToken,
    /// Used when the spec has no timeout of its own.
    pub default_timeout: Option<Duration>,
    /// `opsloop ask` for this attempt (shell steps run by a worker).
    pub ask: Option<AskAccess>,
    /// Where a shell step's latest `::progress` line goes; the worker writes it down.
    pub progress: Option<Arc<watch::Sender<Option<Progress>>>>,
}

/// Environment of a shell step: the file its output goes in.
pub const ENV_OUTPUT: &str = "OPSLOOP_OUTPUT";
/// Environment of a shell step: where `opsloop ask` reaches the worker, and the secret
/// that says it is this attempt asking.
pub const ENV_ASK_SOCKET: &str = "OPSLOOP_ASK_SOCKET";
pub const ENV_ASK_TOKEN: &str = "OPSLOOP_ASK_TOKEN";

/// How one attempt may ask people a question: the worker's socket and a secret given
/// to this attempt alone.
#[derive(Clone)]
pub struct AskAccess {
    pub socket: PathBuf,
    pub token: String,
}

impl std::fmt::Debug for AskAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AskAccess")
            .field("socket", &self.socket)
            .field("token", &"[redacted]")
            .finish()
    }
}

/// What one attempt came to. `result` is what `ops_mission_steps.result` stores.
#[derive(Debug)]
pub enum Outcome {
    /// `output` is the step's output object (docs/policy.md, "Outputs").
    Succeeded {
        result: Value,
        output: Value,
    },
    /// `error` is one line, e.g. "exit status 3", "timed out after 10s".
    Failed {
        error: String,
        result: Value,
    },
    Cancelled {
        result: Value,
    },
}

impl Outcome {
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Failed { .. } => "failed",
            Outcome::Cancelled { .. } => "cancelled",
        }
    }

    pub fn result(&self) -> &Value {
        match self {
            Outcome::Succeeded { result, .. }
            | Outcome::Failed { result, .. }
            | Outcome::Cancelled { result } => result,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Failed { error, .. } => Some(error),
            _ => None,
        }
    }

    fn failed(error: impl Into<String>) -> Outcome {
        Outcome::Failed {
            error: error.into(),
            result: json!({}),
        }
    }
}

/// Runs steps. Cheap to clone: the HTTP client's connection pool is shared.
#[derive(Debug, Clone)]
pub struct Executors {
    http: reqwest::Client,
}

impl Default for Executors {
    fn default() -> Self {
        Self::new()
    }
}

impl Executors {
    pub fn new() -> Self {
        Executors {
            http: http::client(),
        }
    }

    pub async fn execute(&self, spec: &StepSpec, ctx: &StepContext) -> Outcome {
        if ctx.cancel.is_cancelled() {
            return Outcome::Cancelled { result: json!({}) };
        }
        match spec {
            StepSpec::Noop => Outcome::Succeeded {
                result: json!({}),
                output: json!({}),
            },
            StepSpec::Emit { event, payload } => Outcome::Succeeded {
                result: json!({ "event": event, "payload": payload }),
                output: json!({}),
            },
            // Asked by the worker itself (the step becomes `asking`), never executed.
            StepSpec::Ask { .. } => Outcome::failed("an ask step is not executed"),
            StepSpec::Sleep { for_ms } => {
                let started = tokio::time::Instant::now();
                tokio::select! {
                    biased;
                    _ = ctx.cancel.cancelled() => Outcome::Cancelled {
                        result: json!({ "slept_ms": millis(started.elapsed()) }),
                    },
                    _ = tokio::time::sleep(Duration::from_millis(*for_ms)) => Outcome::Succeeded {
                        result: json!({ "slept_ms": for_ms }),
                        output: json!({}),
                    },
                }
            }
            StepSpec::Shell {
                run,
                cwd,
                env,
                timeout_ms,
            } => {
                let timeout = timeout_ms
                    .map(Duration::from_millis)
                    .or(ctx.default_timeout);
                // Boxed, like the http arm: their futures are kilobytes, and every
                // step's task (a noop's too) would otherwise be as big and be copied
                // that much when it is spawned.
                Box::pin(shell::run(run, cwd.as_deref(), env, timeout, ctx)).await
            }
            StepSpec::Http {
                method,
                url,
                headers,
                json,
                body,
                expect,
                timeout_ms,
            } => {
                let timeout = timeout_ms
                    .map(Duration::from_millis)
                    .or(ctx.default_timeout)
                    .unwrap_or(DEFAULT_HTTP_TIMEOUT);
                let req = http::Request {
                    method,
                    url,
                    headers,
                    json: json.as_ref(),
                    body: body.as_deref(),
                    expect,
                    timeout,
                };
                Box::pin(http::run(&self.http, req, ctx)).await
            }
        }
    }
}

/// The delay before retrying after failed attempt number `attempt` (counted from 1):
/// `min(base·2^(attempt-1), max)` plus a random jitter of up to 25% of that.
/// Saturating: never panics, whatever the inputs.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempt.max(1) - 1;
    let grown = 1u32
        .checked_shl(exp)
        .and_then(|factor| base.checked_mul(factor))
        .unwrap_or(Duration::MAX);
    let delay = grown.min(max);
    let quarter = u64::try_from(delay.as_nanos() / 4).unwrap_or(u64::MAX);
    let jitter = if quarter == 0 {
        0
    } else {
        rand::random_range(0..=quarter)
    };
    delay.saturating_add(Duration::from_nanos(jitter))
}

/// The name a param is exported under: `OPSLOOP_PARAM_` + the name uppercased, with
/// every character that is not an ASCII letter or digit replaced by `_`.
pub fn param_env_name(name: &str) -> String {
    let mut out = String::from("OPSLOOP_PARAM_");
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    out
}

/// "10s" for whole seconds, else "1500ms": for one-line errors.
pub(crate) fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The last `TAIL_BYTES` bytes of a stream, trimmed as it is fed so memory stays
/// bounded whatever the stream's length.
#[derive(Debug)]
pub(crate) struct Tail {
    buf: Vec<u8>,
    truncated: bool,
}

impl Tail {
    pub(crate) fn new() -> Tail {
        Tail {
            buf: Vec::with_capacity(TAIL_BYTES),
            truncated: false,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= TAIL_BYTES {
            self.truncated |= !self.buf.is_empty() || chunk.len() > TAIL_BYTES;
            self.buf.clear();
            self.buf
                .extend_from_slice(&chunk[chunk.len() - TAIL_BYTES..]);
            return;
        }
        let excess = (self.buf.len() + chunk.len()).saturating_sub(TAIL_BYTES);
        if excess > 0 {
            self.truncated = true;
            self.buf.drain(..excess);
        }
        self.buf.extend_from_slice(chunk);
    }

    pub(crate) fn truncated(&self) -> bool {
        self.truncated
    }

    /// The kept bytes as text: when the front was cut, a partial UTF-8 sequence at the
    /// cut is dropped; anything else invalid becomes U+FFFD, and so does NUL, which
    /// PostgreSQL cannot store in text (one such result would fail its whole batch).
    pub(crate) fn text(&self) -> String {
        let mut bytes = &self.buf[..];
        if self.truncated {
            let skip = bytes
                .iter()
                .take(3)
                .take_while(|b| (**b & 0xC0) == 0x80)
                .count();
            bytes = &bytes[skip..];
        }
        String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_and_stays_bounded() {
        let mut t = Tail::new();
        t.push(b"hello ");
        t.push(b"world");
        assert_eq!(t.text(), "hello world");
        assert!(!t.truncated());
        let chunk = vec![b'x'; 8192];
        for _ in 0..1000 {
            t.push(&chunk);
        }
        t.push(b"END");
        assert!(t.truncated());
        assert_eq!(t.buf.len(), TAIL_BYTES);
        assert!(t.buf.capacity() <= TAIL_BYTES, "{}", t.buf.capacity());
        assert!(t.text().ends_with("xxEND"));
        let mut big = Tail::new();
        big.push(&vec![b'y'; TAIL_BYTES * 3]);
        assert!(big.truncated());
        assert_eq!(big.text().len(), TAIL_BYTES);
    }

    #[test]
    fn tail_cuts_at_a_char_boundary() {
        let mut t = Tail::new();
        // "é" is two bytes; an odd total makes the cut land inside one.
        t.push("é".repeat(TAIL_BYTES).as_bytes());
        t.push(b"!");
        let text = t.text();
        assert!(!text.contains('\u{FFFD}'));
        assert!(text.starts_with('é') && text.ends_with("é!"));
        let mut exact = Tail::new();
        exact.push(&vec![b'z'; TAIL_BYTES]);
        assert!(!exact.truncated());
    }

    #[test]
    fn env_names_and_durations() {
        assert_eq!(param_env_name("tag"), "OPSLOOP_PARAM_TAG");
        assert_eq!(param_env_name("build-id.x"), "OPSLOOP_PARAM_BUILD_ID_X");
        assert_eq!(human_duration(Duration::from_secs(10)), "10s");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(human_duration(Duration::from_millis(300)), "300ms");
    }
}
