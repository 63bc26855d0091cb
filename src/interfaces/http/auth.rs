//! Who is calling `/api/*`: `Authorization: Bearer $OPS_KEY` is the operator, with every
//! scope; `Bearer olk_…` is an agent key (design §11), looked up on every request so a
//! revocation holds at once, and limited to its scopes. A key anywhere else (the query
//! string, Basic auth) is refused: URLs end up in logs.

use std::sync::Arc;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::errors::ApiError;
use crate::engine::keys::{self, Agent};

/// `OPS_KEY`, kept only as its SHA-256 digest, so it can neither be logged by accident
/// nor compared in time that depends on its contents.
#[derive(Clone)]
pub(super) struct ApiKey(Option<Arc<[u8; 32]>>);

impl ApiKey {
    /// `None` (or blank) turns the API off: every `/api/*` call is refused, agent keys'
    /// too (the operator turns the API on by setting `OPS_KEY`).
    pub(super) fn new(key: Option<&str>) -> ApiKey {
        ApiKey(
            key.filter(|k| !k.trim().is_empty())
                .map(|k| Arc::new(digest(k))),
        )
    }

    fn is_off(&self) -> bool {
        self.0.is_none()
    }

    fn is(&self, given: &str) -> bool {
        // Equal-length digests compared in constant time: neither the key's length nor
        // its contents show in the timing.
        self.0
            .as_deref()
            .is_some_and(|expected| bool::from(digest(given).ct_eq(expected)))
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Refused keys per client address per second before its refusals slow down. An agent
/// with a stale key retries a few times a second at most; at 1,000 a second a flood
/// still cost the other callers 2× their latency on 2 cores (benches/results.md).
const REFUSALS_PER_SECOND: u32 = 100;
/// The longest a refusal is held back.
const MAX_HOLD: Duration = Duration::from_secs(1);

/// A tarpit for wrong keys: past [`REFUSALS_PER_SECOND`] from one address, each 401 is
/// held back until the address is within its rate again (at most [`MAX_HOLD`]). A flood
/// then paces itself instead of taking the server's cores from everyone else, and no
/// one is locked out: a right key from the same address is never held.
pub(super) struct Refusals {
    pace: DefaultKeyedRateLimiter<IpAddr>,
    unlogged: std::sync::Mutex<Unlogged>,
}

/// Unknown keys since the last log line, and when that was written.
#[derive(Default)]
struct Unlogged {
    refused: u64,
    logged_at: Option<Instant>,
}

impl Unlogged {
    /// Count one refusal at `now`; when a line is due, how many it reports.
    fn count(&mut self, now: Instant) -> Option<u64> {
        self.refused += 1;
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
        if !due {
            return None;
        }
        let refused = self.refused;
        *self = Unlogged {
            refused: 0,
            logged_at: Some(now),
        };
        Some(refused)
    }
}

/// At most one log line about unknown keys this often: a flood must not become a
/// flood of log lines (each costs more than the refusal itself).
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Refusals {
    pub(super) fn new() -> Refusals {
        let rate = NonZeroU32::new(REFUSALS_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        Refusals {
            pace: RateLimiter::keyed(Quota::per_second(rate)),
            unlogged: std::sync::Mutex::new(Unlogged::default()),
        }
    }

    async fn hold(&self, from: IpAddr) {
        if self.pace.len() > 10_000 {
            self.pace.retain_recent();
        }
        let _ = tokio::time::timeout(MAX_HOLD, self.pace.until_key_ready(&from)).await;
    }

    /// An unknown or revoked key from `from`: the first is logged at once, the rest
    /// counted into one line per [`LOG_EVERY`].
    fn unknown_key(&self, from: IpAddr) {
        let due = match self.unlogged.lock() {
            Ok(mut unlogged) => unlogged.count(Instant::now()),
            Err(_) => return,
        };
        if let Some(n) = due {
            tracing::warn!(
                refused = n,
                latest_from = %from,
                "http: /api calls with an unknown or revoked key were refused"
            );
        }
    }
}

/// The authenticated caller, put into the request for the handlers.
#[derive(Clone)]
pub(super) enum Caller {
    Operator,
    Agent(Arc<Agent>),
}

impl Caller {
    /// The identity an agent acts as (`agent:NAME`); `None` for the operator.
    pub(super) fn agent(&self) -> Option<&Agent> {
        match self {
            Caller::Operator => None,
            Caller::Agent(agent) => Some(agent),
        }
    }
}

/// What a route needs beyond a valid key. Agents need the scope; the operator has all.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Need {
    /// `OPS_KEY` only (the heartbeat).
    Operator,
    /// At least one `--propose` pattern; the handler checks the template.
    Propose,
    /// At least one `--emit` pattern; the handler checks the kind.
    Emit,
    /// `--read`.
    Read,
    /// `--answer`.
    Answer,
    /// Reading a question: both `--read` (a GET) and `--answer` (a question).
    ReadAnswer,
}

impl Need {
    /// Why `agent` may not call a route that needs this, or `None` when it may.
    fn refusal(self, agent: &Agent) -> Option<String> {
        let s = &agent.scopes;
        let name = agent.name.as_str();
        let missing = |what: &str, flag: &str| {
            Some(format!(
                "key {name} may not {what} (a key needs {flag} for that)"
            ))
        };
        match self {
            Need::Operator => Some(format!(
                "key {name} may not run the heartbeat: only OPS_KEY may"
            )),
            Need::Propose if s.propose.is_empty() => missing("propose", "--propose PATTERN"),
            Need::Emit if s.emit.is_empty() => missing("emit events", "--emit PATTERN"),
            Need::Read if !s.read => missing("read", "--read"),
            Need::Answer if !s.answer => missing("ask or answer questions", "--answer"),
            Need::ReadAnswer if !(s.read && s.answer) => {
                missing("read questions", "--read and --answer")
            }
            _ => None,
        }
    }
}

/// The layer on every route that needs a key: checked before anything else, so
/// without one there is no 404, 405 or 422 either.
pub(super) async fn require(
    State((state, need)): State<(AppState, Need)>,
    mut request: Request,
    next: Next,
) -> Response {
    // Read what the check needs first: a `&Request` cannot be held across an await.
    let in_url = request.uri().query().is_some_and(query_holds_a_key);
    let given = bearer(request.headers()).map(str::to_owned);
    // Without connection info (a router served by hand) every caller shares one rate.
    let from = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    match authorize(&state, need, in_url, given, from).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refused) => {
            if refused.status() == StatusCode::UNAUTHORIZED {
                state.refusals.hold(from).await;
            }
            refused.into_response()
        }
    }
}

async fn authorize(
    state: &AppState,
    need: Need,
    key_in_url: bool,
    given: Result<String, &'static str>,
    from: IpAddr,
) -> Result<Caller, ApiError> {
    let unauthorized = |m: &str| Err(ApiError::new(StatusCode::UNAUTHORIZED, m));
    if state.ops_key.is_off() {
        return unauthorized("the API is off: OPS_KEY is not set on this server");
    }
    if key_in_url {
        return unauthorized(
            "a key in the URL is refused (URLs end up in logs): send Authorization: Bearer KEY",
        );
    }
    let given = match given {
        Ok(token) => token,
        Err(why) => return unauthorized(why),
    };
    if state.ops_key.is(&given) {
        return Ok(Caller::Operator);
    }
    let agent = {
        let _turn = state.key_lookups.acquire().await.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            )
        })?;
        keys::authenticate(&state.pool, state.key_filter(), &given).await?
    };
    let Some(agent) = agent else {
        state.refusals.unknown_key(from);
        return unauthorized("unknown or revoked key");
    };
    if let Some(why) = need.refusal(&agent) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, why));
    }
    Ok(Caller::Agent(Arc::new(agent)))
}

fn bearer(headers: &HeaderMap) -> Result<&str, &'static str> {
    const MISSING: &str = "missing key: send Authorization: Bearer KEY";
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(MISSING);
    };
    let value = value.to_str().map_err(|_| MISSING)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(MISSING)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(
            "only bearer keys are accepted (not Basic or other schemes): send Authorization: Bearer KEY",
        );
    }
    let token = token.trim();
    if token.is_empty() {
        Err(MISSING)
    } else {
        Ok(token)
    }
}

/// A query string that carries something key-like: a parameter named like a key, or a
/// value shaped like an agent key.
fn query_holds_a_key(query: &str) -> bool {
    query.split('&').any(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = name.to_ascii_lowercase();
        matches!(
            name.as_str(),
            "key"
                | "api_key"
                | "apikey"
                | "ops_key"
                | "token"
                | "access_token"
                | "auth"
                | "authorization"
        ) || value.starts_with(crate::domain::keys::PREFIX)
    })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;
    use crate::domain::keys::{KeyName, Scopes};

    #[test]
    fn unknown_keys_are_logged_once_per_interval_with_their_count() {
        let mut unlogged = Unlogged::default();
        let t0 = Instant::now();
        assert_eq!(unlogged.count(t0), Some(1), "the first is logged at once");
        for i in 1..=99 {
            assert_eq!(unlogged.count(t0 + Duration::from_millis(i * 10)), None);
        }
        // The next after the interval reports all since the last line, itself included.
        assert_eq!(unlogged.count(t0 + LOG_EVERY), Some(100));
        assert_eq!(
            unlogged.count(t0 + LOG_EVERY + Duration::from_secs(1)),
            None
        );
        assert_eq!(unlogged.count(t0 + LOG_EVERY * 2), Some(2));
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut h = HeaderMap::new();
        assert!(bearer(&h).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Ok("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Ok("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(bearer(&h).unwrap_err().contains("Basic"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert!(bearer(&h).is_err());
    }

    #[test]
    fn only_the_key_itself_is_the_operator() {
        let key = ApiKey::new(Some("sesame"));
        assert!(key.is("sesame"));
        assert!(!key.is("sesam"));
        for off in [None, Some(""), Some("  ")] {
            assert!(!ApiKey::new(off).is("sesame"));
        }
    }

    #[test]
    fn keys_in_query_strings_are_spotted() {
        assert!(query_holds_a_key("key=x"));
        assert!(query_holds_a_key("wait=30s&access_token=x"));
        assert!(query_holds_a_key("x=olk_abc"));
        assert!(!query_holds_a_key("wait=30s"));
    }

    #[test]
    fn each_need_names_the_missing_scope() {
        let agent = |scopes: Scopes| Agent {
            name: KeyName::parse("writer").unwrap(),
            scopes,
        };
        let none = agent(Scopes::default());
        for need in [
            Need::Operator,
            Need::Propose,
            Need::Emit,
            Need::Read,
            Need::Answer,
            Need::ReadAnswer,
        ] {
            assert!(need.refusal(&none).is_some(), "{need:?}");
        }
        let all = agent(Scopes::parse(&["*".into()], &["*".into()], true, true).unwrap());
        for need in [
            Need::Propose,
            Need::Emit,
            Need::Read,
            Need::Answer,
            Need::ReadAnswer,
        ] {
            assert_eq!(need.refusal(&all), None, "{need:?}");
        }
        assert!(Need::Operator.refusal(&all).unwrap().contains("heartbeat"));
        let answer_only = agent(Scopes::parse(&[], &[], true, false).unwrap());
        assert!(
            Need::ReadAnswer
                .refusal(&answer_only)
                .unwrap()
                .contains("--read")
        );
    }
}
