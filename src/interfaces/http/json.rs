//! Strict JSON bodies: the only way a handler reads a request body.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::errors::ApiError;
use crate::domain::input;

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;

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

/// Whether reading the body stopped at [`BODY_LIMIT`] (a chunked body says no length).
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
