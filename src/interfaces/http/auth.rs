//! `/api/*` needs `Authorization: Bearer $OPS_KEY`; without `OPS_KEY` nothing passes.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::errors::ApiError;

/// The API key, kept only as its SHA-256 digest, so it can neither be logged by
/// accident nor compared in time that depends on its contents.
#[derive(Clone)]
pub(super) struct ApiKey(Option<Arc<[u8; 32]>>);

impl ApiKey {
    /// `None` (or blank) turns every `/api/*` call away.
    pub(super) fn new(key: Option<&str>) -> ApiKey {
        ApiKey(
            key.filter(|k| !k.trim().is_empty())
                .map(|k| Arc::new(digest(k))),
        )
    }

    fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = self.0.as_deref() else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the API is off: OPS_KEY is not set on this server",
            ));
        };
        let Some(given) = bearer(headers) else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing key: send Authorization: Bearer $OPS_KEY",
            ));
        };
        // Equal-length digests compared in constant time: neither the key's length nor
        // its contents show in the timing.
        if bool::from(digest(given).ct_eq(expected)) {
            Ok(())
        } else {
            tracing::warn!("http: an /api call with a wrong key was refused");
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong key"))
        }
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// The layer on every route that needs the key: checked before anything else, so
/// without it there is no 404, 405 or 422 either.
pub(super) async fn require_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match state.ops_key.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

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
    fn only_the_key_itself_passes() {
        let with = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            h
        };
        let key = ApiKey::new(Some("sesame"));
        assert!(key.check(&with("Bearer sesame")).is_ok());
        assert!(key.check(&with("Bearer sesam")).is_err());
        assert!(key.check(&HeaderMap::new()).is_err());
        for off in [None, Some(""), Some("  ")] {
            assert!(ApiKey::new(off).check(&with("Bearer sesame")).is_err());
        }
    }
}
