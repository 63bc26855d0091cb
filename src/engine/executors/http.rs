//! `http` steps: one request, success when the status is expected. Errors are one
//! line and never carry header values or the URL (either may hold a secret).

use std::collections::BTreeMap;
use std::error::Error as _;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Method, Url};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Outcome, StepContext, Tail, human_duration, millis};

/// The shared client: no proxy from the environment (a step goes where its URL
/// says), bounded redirects, an opsloop user agent. Timeouts are per step.
pub(super) fn client() -> Client {
    Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::limited(5))
        .user_agent(concat!("opsloop/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot build the HTTP client with opsloop's settings; using defaults");
            Client::default()
        })
}

/// One request, borrowed from the step's spec.
pub(super) struct Request<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub headers: &'a BTreeMap<String, String>,
    pub json: Option<&'a Value>,
    pub body: Option<&'a str>,
    pub expect: &'a [u16],
    pub timeout: Duration,
}

pub(super) async fn run(client: &Client, req: Request<'_>, ctx: &StepContext) -> Outcome {
    let started = Instant::now();
    let builder = match build(client, &req) {
        Ok(b) => b,
        Err(error) => return Outcome::failed(error),
    };
    let exchange = async {
        let response = builder.send().await?;
        let status = response.status().as_u16();
        let mut response = response;
        let mut body = Tail::new();
        while let Some(chunk) = response.chunk().await? {
            body.push(&chunk);
        }
        Ok::<_, reqwest::Error>((status, body))
    };
    let done = tokio::select! {
        biased;
        _ = ctx.cancel.cancelled() => None,
        r = tokio::time::timeout(req.timeout, exchange) => Some(r),
    };
    let duration_ms = millis(started.elapsed());
    let no_response = json!({ "status": null, "duration_ms": duration_ms });
    match done {
        None => Outcome::Cancelled {
            result: no_response,
        },
        Some(Err(_elapsed)) => Outcome::Failed {
            error: format!("timed out after {}", human_duration(req.timeout)),
            result: no_response,
        },
        Some(Ok(Err(e))) => Outcome::Failed {
            error: describe(&e, req.timeout),
            result: no_response,
        },
        Some(Ok(Ok((status, body)))) => {
            let result = json!({
                "status": status,
                "body": body.text(),
                "truncated": body.truncated(),
                "duration_ms": duration_ms,
            });
            let ok = if req.expect.is_empty() {
                (200..300).contains(&status)
            } else {
                req.expect.contains(&status)
            };
            if ok {
                let output = json!({ "status": status, "body": body_value(&body.text()) });
                Outcome::Succeeded { result, output }
            } else {
                Outcome::Failed {
                    error: format!("HTTP {status} (expected {})", expected(req.expect)),
                    result,
                }
            }
        }
    }
}

/// A response body as an output: its JSON when it is JSON (and storable), else its text.
fn body_value(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if crate::domain::input::storable_json(&v, "body").is_ok() => v,
        _ => Value::String(text.to_string()),
    }
}

fn build(client: &Client, req: &Request<'_>) -> Result<reqwest::RequestBuilder, String> {
    let method = Method::from_bytes(req.method.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("invalid HTTP method {:?}", req.method))?;
    let url = Url::parse(req.url).map_err(|e| format!("invalid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("unsupported URL scheme {:?}", url.scheme()));
    }
    let mut headers = HeaderMap::new();
    for (name, value) in req.headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        // The value is never echoed: it may be a token.
        let mut value =
            HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {name}"))?;
        value.set_sensitive(true);
        headers.append(header, value);
    }
    let builder = client.request(method, url).headers(headers);
    Ok(match (req.json, req.body) {
        (Some(_), Some(_)) => return Err("both json and body are set".to_string()),
        // `json` keeps a Content-Type given in the headers, else sets application/json.
        (Some(v), None) => builder.json(v),
        (None, Some(body)) => builder.body(body.to_string()),
        (None, None) => builder,
    })
}

fn expected(expect: &[u16]) -> String {
    if expect.is_empty() {
        return "2xx".to_string();
    }
    let codes: Vec<String> = expect.iter().map(u16::to_string).collect();
    codes.join(", ")
}

/// One line about a failed exchange: the kind of failure and its innermost cause,
/// without the URL (reqwest's own message includes it).
fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {}", human_duration(timeout));
    }
    let what = if e.is_connect() {
        "connection failed"
    } else if e.is_redirect() {
        "too many redirects"
    } else if e.is_body() || e.is_decode() {
        "reading the response failed"
    } else {
        "request failed"
    };
    let mut cause: Option<&dyn std::error::Error> = e.source();
    let mut innermost = None;
    while let Some(c) = cause {
        innermost = Some(c);
        cause = c.source();
    }
    match innermost {
        Some(c) => {
            let text = c.to_string();
            let text = match text.find(" (os error ") {
                Some(i) => &text[..i],
                None => &text,
            };
            format!("{what}: {}", one_line(text))
        }
        None => what.to_string(),
    }
}

fn one_line(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > 300 {
        let mut end = 300;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &line[..end])
    } else {
        line
    }
}
