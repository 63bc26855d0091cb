//! HTTP (design §7): `/healthz`, `/metrics`, and the bearer-protected `/api/*` for
//! agents and scripts. Handlers call the same library functions as the CLI and the bot
//! (`proposals::propose`, `events::emit_user`, `heartbeat::tick`, `missions::get`);
//! nothing here writes SQL. Every error, including a malformed request, is a JSON
//! `{"error": "..."}` with a 4xx status; a 5xx only means the server or database failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::OpsError;
use crate::events::{self, sources};
use crate::input;
use crate::policy::store::PolicyCache;
use crate::proposals::{self, NewProposal, ProposalStatus, Source};
use crate::{heartbeat, missions, telemetry};

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;
/// `/healthz` says 503 when `SELECT 1` takes longer than this.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// The `Server` header of every response; `opsloop doctor` recognises a running opsloop by it.
pub const SERVER: &str = concat!("opsloop/", env!("CARGO_PKG_VERSION"));

/// What the handlers share. The API key is kept only as its SHA-256 digest, so it can
/// neither be logged by accident nor compared in time that depends on its contents.
#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    policy: PolicyCache,
    ops_key: Option<Arc<[u8; 32]>>,
    metrics: PrometheusHandle,
}

impl AppState {
    /// `ops_key` is `OPS_KEY`; `None` (or blank) turns every `/api/*` call away.
    pub fn new(pool: PgPool, policy: PolicyCache, ops_key: Option<&str>) -> AppState {
        AppState {
            pool,
            policy,
            ops_key: ops_key
                .filter(|k| !k.trim().is_empty())
                .map(|k| Arc::new(digest(k))),
            metrics: telemetry::handle(),
        }
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Bind `addr`, with one clear line when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen on {addr}: the address is already in use (another opsloop?); set OPSLOOP_HTTP_ADDR to a free address"
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}; set OPSLOOP_HTTP_ADDR")
        }
    })
}

/// Serve `router(state)` on `listener` until `shutdown`; in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let upkeep = {
        // Histograms are drained into their buckets by upkeep; scrapes do it too.
        let handle = state.metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                }
            }
        })
    };
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    upkeep.abort();
    served
}

/// All routes, for `serve` and for tests (bind 127.0.0.1:0 and `axum::serve` it).
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/ops/heartbeat", post(run_heartbeat))
        .route("/events", post(emit_event))
        .route("/proposals", post(create_proposal))
        .route("/missions/{id}", get(show_mission))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .nest("/api", api)
        .fallback(not_found)
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

// ---------------------------------------------------------------------------------
// Errors

/// A JSON error response: `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read: the connection cannot be reused.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> ApiError {
        match e {
            OpsError::BadInput(msg) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, msg),
            OpsError::Refused(msg) => ApiError::new(StatusCode::CONFLICT, msg),
            OpsError::Db(e) if is_unavailable(&e) => {
                tracing::warn!(error = %e, "http: database unavailable");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
            }
            other => {
                tracing::error!(error = %other, "http: request failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
    ) || e
        .as_database_error()
        .and_then(|d| d.code())
        // 08: connection exception; 57P: operator intervention (shutdown, terminated); 3D000: no such database
        .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "3D000")
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such route (GET /healthz, GET /metrics, POST /api/ops/heartbeat, POST /api/events, POST /api/proposals, GET /api/missions/{id})",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// Any error response that is not JSON yet (a rejection from axum or hyper) becomes
/// `{"error": ...}` with the same status; every request is counted by route and status.
async fn json_errors(request: Request, next: Next) -> Response {
    let route = route_label(request.uri().path());
    let response = next.run(request).await;
    let status = response.status();
    telemetry::http_request(route.to_string(), status.as_u16());
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut fixed = ApiError::new(status, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fixed
}

/// A bounded set of route labels for the request counter.
fn route_label(path: &str) -> &'static str {
    match path {
        "/healthz" => "/healthz",
        "/metrics" => "/metrics",
        "/api/ops/heartbeat" => "/api/ops/heartbeat",
        "/api/events" => "/api/events",
        "/api/proposals" => "/api/proposals",
        p if p.starts_with("/api/missions/") => "/api/missions/{id}",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------------
// Authentication

/// `/api/*` needs `Authorization: Bearer $OPS_KEY`; without `OPS_KEY` nothing passes.
async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.ops_key.as_deref() else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the API is off: OPS_KEY is not set on this server",
        )
        .into_response();
    };
    let Some(given) = bearer(request.headers()) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing key: send Authorization: Bearer $OPS_KEY",
        )
        .into_response();
    };
    // Equal-length digests compared in constant time: neither the key's length nor
    // its contents show in the timing.
    if bool::from(digest(given).ct_eq(expected)) {
        next.run(request).await
    } else {
        tracing::warn!("http: an /api call with a wrong key was refused");
        ApiError::new(StatusCode::UNAUTHORIZED, "wrong key").into_response()
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

// ---------------------------------------------------------------------------------
// Strict JSON bodies

/// A JSON body: `Content-Type: application/json` (else 415), at most [`BODY_LIMIT`]
/// bytes (else 413), well-formed (else 400) and of the expected shape, unknown fields
/// and wrong types included (else 422). Every refusal is a JSON error.
pub struct StrictJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        let is_json = content_type
            .as_deref()
            .is_some_and(|t| t == "application/json" || t.ends_with("+json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON: send Content-Type: application/json",
            ));
        }
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {} KiB", BODY_LIMIT / 1024),
            )
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
            return Err(too_large());
        }
        let bytes: Bytes = match axum::body::to_bytes(request.into_body(), BODY_LIMIT).await {
            Ok(bytes) => bytes,
            Err(e) if is_length_limit(&e) => return Err(too_large()),
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "could not read the request body",
                ));
            }
        };
        let body = serde_json::from_slice(&bytes).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
                Category::Syntax | Category::Eof | Category::Io => {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"))
                }
            }
        })?;
        // Well-formed JSON that PostgreSQL cannot store (U+0000 in a string or a key):
        // refused for every body here, before a handler could store any of it.
        if let Ok(raw) = serde_json::from_slice::<Value>(&bytes) {
            input::storable_json(&raw, "")?;
        }
        Ok(StrictJson(body))
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

// ---------------------------------------------------------------------------------
// Handlers

async fn healthz(State(state): State<AppState>) -> Response {
    let answered = matches!(
        tokio::time::timeout(HEALTH_TIMEOUT, sqlx::query("SELECT 1").execute(&state.pool)).await,
        Ok(Ok(_))
    );
    let mut response = if answered {
        (StatusCode::OK, Json(json!({ "ok": true }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ok": false, "error": "database unreachable" })),
        )
            .into_response()
    };
    response
        .headers_mut()
        .insert(header::SERVER, HeaderValue::from_static(SERVER));
    response
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    telemetry::refresh_gauges(&state.pool).await;
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        Body::from(state.metrics.render() + &telemetry::database_counters(&state.pool).await),
    )
        .into_response()
}

/// The current policy, reloaded if `policy apply` moved its version (one tiny query).
async fn current_policy(state: &AppState) -> Result<Arc<crate::policy::Policy>, ApiError> {
    state.policy.refresh(&state.pool).await?;
    Ok(state.policy.get().await)
}

async fn run_heartbeat(State(state): State<AppState>) -> Result<Response, ApiError> {
    let policy = current_policy(&state).await?;
    let summary = heartbeat::tick(&state.pool, &policy).await?;
    Ok(Json(summary).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRequest {
    kind: String,
    #[serde(default)]
    payload: Option<Value>,
}

async fn emit_event(
    State(state): State<AppState>,
    StrictJson(body): StrictJson<EventRequest>,
) -> Result<Response, ApiError> {
    let payload = body.payload.unwrap_or_else(|| json!({}));
    let id = events::emit_user(&state.pool, &body.kind, sources::HTTP, payload).await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProposalRequest {
    template: String,
    #[serde(default)]
    params: BTreeMap<String, Value>,
    proposed_by: String,
}

/// The same entry point as `opsloop propose`: 201 with `propose --json`'s document,
/// 409 with it when a gate refused (the refused proposal exists, with its id).
async fn create_proposal(
    State(state): State<AppState>,
    StrictJson(body): StrictJson<ProposalRequest>,
) -> Result<Response, ApiError> {
    // Normalized, so the same person is the same proposer whatever the spelling.
    let proposed_by = input::identity(&body.proposed_by, "proposed_by")?;
    let mut params = BTreeMap::new();
    for (key, value) in body.params {
        match value {
            Value::String(text) => {
                params.insert(key, text);
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "params.{key} must be a string, not {} (quote it)",
                        json_type(&other)
                    ),
                ));
            }
        }
    }
    let policy = current_policy(&state).await?;
    let request = NewProposal {
        template: body.template,
        params,
        proposed_by,
        source: Source::Http,
    };
    let proposed = proposals::propose(&state.pool, &policy, request).await?;
    let status = if proposed.status == ProposalStatus::Rejected {
        StatusCode::CONFLICT
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(json!(proposed))).into_response())
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `opsloop mission ID --json`'s document.
async fn show_mission(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = match raw.trim().trim_start_matches('#').parse::<i64>() {
        Ok(id) if id > 0 => id,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{raw:?} is not a mission id (a positive number)"),
            ));
        }
    };
    match missions::get(&state.pool, id).await {
        Ok(view) => Ok(Json(json!(view)).into_response()),
        Err(OpsError::BadInput(msg)) => Err(ApiError::new(StatusCode::NOT_FOUND, msg)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn route_labels_are_bounded() {
        assert_eq!(route_label("/api/missions/12"), "/api/missions/{id}");
        assert_eq!(route_label("/etc/passwd"), "other");
    }
}
