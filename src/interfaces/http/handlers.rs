//! One plain async function per endpoint. Each calls the same library function as the
//! CLI and the bot (`proposals::propose`, `events::emit_user`, `heartbeat::tick`,
//! `missions::get`); none writes SQL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Caller;
use super::errors::ApiError;
use super::json::StrictJson;
use super::{AppState, SERVER};
use crate::domain::error::OpsError;
use crate::domain::input;
use crate::domain::policy::Policy;
use crate::domain::vocab::{Audience, QuestionStatus, Source};
use crate::engine::proposals::{self, NewProposal, ProposalStatus};
use crate::engine::questions::{self, NewQuestion};
use crate::engine::{heartbeat, missions, telemetry};
use crate::store::events;

/// `/healthz` says 503 when `SELECT 1` takes longer than this.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// `GET /healthz`: 200 when the database answers `SELECT 1` in time, else 503.
pub(super) async fn healthz(State(state): State<AppState>) -> Response {
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

/// `GET /metrics`: the process's metrics and the database's counters, Prometheus text.
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
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

/// `POST /api/ops/heartbeat`: one tick, its summary.
pub(super) async fn heartbeat(State(state): State<AppState>) -> Result<Response, ApiError> {
    let policy = current_policy(&state).await?;
    let summary = heartbeat::tick(&state.pool, &policy).await?;
    Ok(Json(summary).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventRequest {
    kind: String,
    #[serde(default)]
    payload: Option<Value>,
}

/// `POST /api/events`: an event of the caller's own kind; 201 with its id. An agent's
/// events carry its name as their source (`agent:NAME`).
pub(super) async fn emit_event(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    StrictJson(body): StrictJson<EventRequest>,
) -> Result<Response, ApiError> {
    let source = match caller.agent() {
        None => Source::Http.as_str().to_string(),
        Some(agent) if agent.scopes.may_emit(&body.kind) => agent.name.principal(),
        Some(agent) => {
            return Err(forbidden(format!(
                "key {} may not emit {:?} (its scopes: {})",
                agent.name.as_str(),
                body.kind,
                agent.scopes.describe()
            )));
        }
    };
    let payload = body.payload.unwrap_or_else(|| json!({}));
    let id = events::emit_user(&state.pool, &body.kind, &source, payload).await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProposalRequest {
    template: String,
    #[serde(default)]
    params: BTreeMap<String, Value>,
    /// Required with `OPS_KEY`; an agent key proposes as `agent:NAME` (omit it or give
    /// exactly that).
    #[serde(default)]
    proposed_by: Option<String>,
    /// Overrides the template's priority, only downwards (design §12).
    #[serde(default)]
    priority: Option<i64>,
}

/// `POST /api/proposals`, the same entry point as `opsloop propose`: 201 with
/// `propose --json`'s document, 409 with it when a gate refused (the refused proposal
/// exists, with its id).
pub(super) async fn propose(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    StrictJson(body): StrictJson<ProposalRequest>,
) -> Result<Response, ApiError> {
    if let Some(agent) = caller.agent()
        && !agent.scopes.may_propose(&body.template)
    {
        return Err(forbidden(format!(
            "key {} may not propose {:?} (its scopes: {})",
            agent.name.as_str(),
            body.template,
            agent.scopes.describe()
        )));
    }
    // Normalized, so the same person is the same proposer whatever the spelling.
    let proposed_by = acting_as(&caller, body.proposed_by.as_deref(), "proposed_by")?;
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
    let priority = match body.priority.map(i32::try_from) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "priority is out of range (-100..=100)",
            ));
        }
    };
    let policy = current_policy(&state).await?;
    let request = NewProposal {
        template: body.template,
        params,
        proposed_by,
        source: Source::Http,
        priority,
        // Callers of the API may only lower a template's priority.
        may_raise_priority: false,
    };
    let proposed = match proposals::propose(&state.pool, &policy, request).await {
        Ok(p) => p,
        // Not a gate (that is a recorded, refused proposal): this caller may not do it.
        Err(OpsError::Refused(msg)) => return Err(ApiError::new(StatusCode::FORBIDDEN, msg)),
        Err(e) => return Err(e.into()),
    };
    let status = if proposed.status == ProposalStatus::Rejected {
        StatusCode::CONFLICT
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(json!(proposed))).into_response())
}

/// `GET /api/missions/{id}`: `opsloop mission ID --json`'s document.
pub(super) async fn mission(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = path_id(&raw, "mission")?;
    match missions::get(&state.pool, id).await {
        Ok(view) => Ok(Json(json!(view)).into_response()),
        Err(OpsError::BadInput(msg)) => Err(ApiError::new(StatusCode::NOT_FOUND, msg)),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuestionRequest {
    question: String,
    #[serde(default)]
    choices: Option<Vec<String>>,
    #[serde(default)]
    pattern: Option<String>,
    /// A duration such as "1h".
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    to: Option<Audience>,
}

/// `POST /api/questions`: an agent asks people; 201 `{id, status}`.
pub(super) async fn ask(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    StrictJson(body): StrictJson<QuestionRequest>,
) -> Result<Response, ApiError> {
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    if body.choices.is_some() && body.pattern.is_some() {
        return Err(unprocessable("give choices or pattern, not both".into()));
    }
    let timeout = match body.timeout.as_deref() {
        None => None,
        Some(t) => Some(
            humantime::parse_duration(t)
                .map_err(|e| unprocessable(format!("timeout {t:?} is not a duration: {e}")))?,
        ),
    };
    let question = NewQuestion {
        asked_by: caller
            .agent()
            .map_or_else(|| Source::Http.as_str().to_string(), |a| a.name.principal()),
        question: body.question,
        choices: body.choices.unwrap_or_default(),
        pattern: body.pattern,
        audience: body.to,
        default: body.default,
        timeout,
        ..NewQuestion::default()
    };
    let mut tx = state.pool.begin().await.map_err(OpsError::from)?;
    let id = questions::ask(&mut tx, &question).await?;
    tx.commit().await.map_err(OpsError::from)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "status": QuestionStatus::Open })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitQuery {
    #[serde(default)]
    wait: Option<String>,
}

/// The longest `?wait=` a long poll may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// `GET /api/questions/{id}?wait=30s`: the question, waiting (up to 60 s) until it is
/// no longer open.
pub(super) async fn question(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(&raw, "question")?;
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let wait = match query.wait.as_deref() {
        None => Duration::ZERO,
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("wait={w:?} is not a duration such as 30s: {e}"),
                )
            })?
            .min(MAX_WAIT),
    };
    let found = state.waiters().wait(&state.pool, id, wait).await;
    match found {
        Ok(q) => Ok(Json(json!(q)).into_response()),
        Err(OpsError::BadInput(msg)) => Err(ApiError::new(StatusCode::NOT_FOUND, msg)),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AnswerRequest {
    answer: String,
    /// Required with `OPS_KEY`; an agent key answers as `agent:NAME`.
    #[serde(default)]
    answered_by: Option<String>,
}

/// `POST /api/questions/{id}/answer`: 200 with the answer; 422 when it is not allowed,
/// 409 when the question is no longer open, 404 when there is none.
pub(super) async fn answer(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    StrictJson(body): StrictJson<AnswerRequest>,
) -> Result<Response, ApiError> {
    let id = path_id(&raw, "question")?;
    let by = acting_as(&caller, body.answered_by.as_deref(), "answered_by")?;
    if questions::get(&state.pool, id).await.is_err() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("there is no question #{id}"),
        ));
    }
    let answered = questions::answer(&state.pool, id, &body.answer, &by, Source::Http).await?;
    Ok(Json(json!(answered)).into_response())
}

/// Who the caller acts as: the operator names anyone (`field` is required); an agent
/// is always `agent:NAME`, and naming anyone else is refused.
fn acting_as(caller: &Caller, named: Option<&str>, field: &str) -> Result<String, ApiError> {
    match (caller.agent(), named) {
        (None, Some(name)) => Ok(input::identity(name, field)?),
        (None, None) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{field} is required (who is acting, e.g. \"script:deploy\")"),
        )),
        (Some(agent), None) => Ok(agent.name.principal()),
        (Some(agent), Some(name)) => {
            let principal = agent.name.principal();
            if input::normalize_identity(name) == principal {
                Ok(principal)
            } else {
                Err(forbidden(format!(
                    "key {} acts only as {principal}, not {:?}",
                    agent.name.as_str(),
                    name.chars().take(64).collect::<String>()
                )))
            }
        }
    }
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message)
}

/// An id from the path: a positive number (`#5` is fine), else 400.
fn path_id(raw: &str, what: &str) -> Result<i64, ApiError> {
    match raw.trim().trim_start_matches('#').parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{raw:?} is not a {what} id (a positive number)"),
        )),
    }
}

/// The current policy, reloaded if `policy apply` moved its version (one tiny query).
async fn current_policy(state: &AppState) -> Result<Arc<Policy>, ApiError> {
    state.policy.refresh(&state.pool).await?;
    Ok(state.policy.get().await)
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
