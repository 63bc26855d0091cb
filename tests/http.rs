//! The HTTP API over real loopback HTTP against a real PostgreSQL: health, metrics,
//! bearer keys, strict bodies, and proposals that behave exactly as the CLI's.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use opsloop::engine::worker::Worker;
use opsloop::interfaces::http::{AppState, serve};
use opsloop::store::policy::PolicyCache;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{TestDb, apply_policy, opsloop, opsloop_cmd, stderr, stdout, test_db, with_database};
use tokio_util::sync::CancellationToken;

const KEY: &str = "test-ops-key-0123456789";

struct App {
    base: String,
    addr: SocketAddr,
    client: reqwest::Client,
    db: TestDb,
    shutdown: CancellationToken,
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl App {
    async fn start(key: Option<&str>) -> App {
        let db = test_db().await;
        apply_policy(&db).await;
        App::on(db, key).await
    }

    async fn on(db: TestDb, key: Option<&str>) -> App {
        let state = AppState::new(db.pool.clone(), PolicyCache::default(), key);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, state, shutdown.clone()));
        App {
            base: format!("http://{addr}"),
            addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            db,
            shutdown,
        }
    }

    async fn get(&self, path: &str, key: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        into_json(req.send().await.expect("GET")).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(KEY)
            .json(&body);
        into_json(req.send().await.expect("POST")).await
    }

    async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(KEY)
            .body(body.to_vec());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        into_json(req.send().await.expect("POST")).await
    }

    async fn metrics(&self) -> BTreeMap<String, f64> {
        let res = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(res.status(), StatusCode::OK);
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(ct.starts_with("text/plain"), "{ct}");
        parse_prometheus(&res.text().await.expect("body"))
    }
}

/// Every error is JSON with an "error" string (except a gate's refusal: 409 with the
/// refused proposal, as `propose --json` prints it); every success is JSON.
async fn into_json(res: reqwest::Response) -> (StatusCode, Value) {
    let status = res.status();
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = res.text().await.expect("body");
    assert!(
        ct.starts_with("application/json"),
        "{status}: content-type {ct:?}, body {text}"
    );
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text}"));
    let refused_proposal = status == StatusCode::CONFLICT && body["status"] == "rejected";
    if (status.is_client_error() || status.is_server_error()) && !refused_proposal {
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{status}: {body}"
        );
    }
    (status, body)
}

/// A strict reading of the Prometheus text format: `# HELP`/`# TYPE` comments, and
/// `name{label="value",...} number` samples. Returns samples keyed by name and
/// sorted labels.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let sample = regex::Regex::new(
        r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*)\})? (\S+)( -?\d+)?$"#,
    )
    .expect("regex");
    let label =
        regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)""#).expect("regex");
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            assert!(
                matches!(words.first(), Some(&"HELP") | Some(&"TYPE")) && words.len() >= 3,
                "bad comment line: {line}"
            );
            if words[0] == "TYPE" {
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2]),
                    "bad type: {line}"
                );
            }
            continue;
        }
        let caps = sample
            .captures(line)
            .unwrap_or_else(|| panic!("not a Prometheus sample: {line:?}"));
        let value: f64 = match &caps[4] {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let mut labels: Vec<String> = caps
            .get(3)
            .map(|m| {
                label
                    .captures_iter(m.as_str())
                    .map(|c| format!("{}={}", &c[1], &c[2]))
                    .collect()
            })
            .unwrap_or_default();
        labels.sort();
        out.insert(format!("{}{{{}}}", &caps[1], labels.join(",")), value);
    }
    out
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_is_200_and_503_when_the_database_is_gone() {
    let app = App::start(Some(KEY)).await;
    let res = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()
            .get("server")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|s| s.starts_with("opsloop/"))
    );
    assert_eq!(
        res.json::<Value>().await.expect("json"),
        json!({"ok": true})
    );

    // Drop the app's database under it: its connections are terminated and every new
    // one is refused.
    let admin = opsloop::db::connect(&with_database(&app.db.url, "postgres"), 1)
        .await
        .expect("admin");
    sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", app.db.name))
        .execute(&admin)
        .await
        .expect("drop");
    admin.close().await;
    for _ in 0..2 {
        let started = Instant::now();
        let (status, body) = app.get("/healthz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body, json!({"ok": false, "error": "database unreachable"}));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // The API says the database is unavailable, as JSON.
    let (status, body) = app.post("/api/events", json!({"kind": "x.y"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_prometheus_text_and_move_with_work() {
    let app = App::start(Some(KEY)).await;
    let before = app.metrics().await;
    for name in [
        "opsloop_notifications_total{outcome=sent}",
        "opsloop_notifications_total{outcome=failed}",
        "opsloop_steps_queued{}",
        "opsloop_steps_running{}",
        "opsloop_worker_slots{}",
        "opsloop_lease_utilisation{}",
        "opsloop_proposals_pending{}",
    ] {
        assert!(before.contains_key(name), "missing {name}: {before:?}");
    }

    let (status, proposed) = app
        .post(
            "/api/proposals",
            json!({"template": "hello", "params": {"name": "ada"}, "proposed_by": "agent:metrics"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{proposed}");
    let mission_id = proposed["mission_id"].as_i64().expect("mission id");
    let queued = app.metrics().await;
    assert!(
        metric(&queued, "opsloop_steps_queued{}") >= 1.0,
        "{queued:?}"
    );

    // A worker in this process runs the mission's step.
    let policy = PolicyCache::default();
    policy.refresh(&app.db.pool).await.expect("policy");
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(app.db.pool.clone(), policy, 2).run(stop.clone(), Duration::from_secs(5)),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, mission) = app
            .get(&format!("/api/missions/{mission_id}"), Some(KEY))
            .await;
        assert_eq!(status, StatusCode::OK);
        if mission["status"] == "succeeded" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mission did not finish: {mission}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = worker.await;
    let (status, tick) = app.post("/api/ops/heartbeat", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{tick}");

    let after = app.metrics().await;
    for key in [
        "opsloop_proposals_total{outcome=approved,source=http}",
        "opsloop_steps_total{outcome=succeeded}",
        "opsloop_steps_claimed_total{}",
        "opsloop_missions_finished_total{status=succeeded}",
        "opsloop_step_duration_seconds_count{kind=shell}",
        "opsloop_http_requests_total{route=/api/proposals,status=201}",
    ] {
        assert!(
            metric(&after, key) >= metric(&before, key) + 1.0,
            "{key} did not move: {} → {}",
            metric(&before, key),
            metric(&after, key)
        );
    }
    let ticks = metric(&after, "opsloop_ticks_total{outcome=ran}")
        + metric(&after, "opsloop_ticks_total{outcome=skipped}");
    assert!(ticks >= 1.0, "{after:?}");
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("opsloop_step_duration_seconds_bucket{"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn api_needs_the_right_bearer_key() {
    let app = App::start(Some(KEY)).await;
    let url = format!("{}/api/ops/heartbeat", app.base);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("wrong key", Some(format!("Bearer {KEY}x"))),
        ("prefix of the key", Some(format!("Bearer {}", &KEY[..5]))),
        ("other scheme", Some(format!("Basic {KEY}"))),
        ("empty", Some("Bearer ".into())),
    ];
    for (what, header) in cases {
        let mut req = app.client.post(&url);
        if let Some(h) = header {
            req = req.header("authorization", h);
        }
        let res = req.send().await.expect("POST");
        assert_eq!(
            res.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer"),
            "{what}"
        );
        let (status, body) = into_json(res).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert!(!body.to_string().contains(KEY), "{what}: the key is echoed");
    }
    // Key checked before anything else: no key, no 404 either.
    let (status, _) = app.get("/api/missions/999", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = app.post("/api/ops/heartbeat", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["ran"].is_boolean(), "{body}");
    assert!(body["events_processed"].is_u64(), "{body}");

    // Without OPS_KEY every /api call is refused, whatever it sends.
    let open = App::start(None).await;
    for key in [Some(KEY), Some(""), None] {
        let (status, body) = open.get("/api/missions/1", key).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("OPS_KEY")
        );
    }
    // /healthz and /metrics need no key.
    assert_eq!(open.get("/healthz", None).await.0, StatusCode::OK);
}

/// An HTTP/1.1 request written by hand: a chunked body has no Content-Length, so the
/// limit must hold while streaming.
fn raw_chunked_post(addr: SocketAddr, path: &str, chunks: usize, chunk: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("write");
    for _ in 0..chunks {
        // The server may answer and close early; later writes may fail.
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .is_err()
            || s.write_all(chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_json_4xx() {
    let app = App::start(Some(KEY)).await;
    let big = format!(
        r#"{{"kind":"big.one","payload":{{"x":"{}"}}}}"#,
        "a".repeat(70 * 1024)
    );
    // (what, path, content type, body, expected status, what the error says)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Vec<u8>,
        StatusCode,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "oversize",
            "/api/events",
            Some("application/json"),
            big.into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "KiB",
        ),
        (
            "malformed",
            "/api/proposals",
            Some("application/json"),
            br#"{"template": "hello","#.to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "not an object",
            "/api/proposals",
            Some("application/json"),
            b"[1,2]".to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid type",
        ),
        (
            "empty body",
            "/api/events",
            Some("application/json"),
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "unknown field",
            "/api/proposals",
            Some("application/json"),
            br#"{"template":"hello","params":{},"proposed_by":"a","prio":1}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field `prio`",
        ),
        (
            "unknown event field",
            "/api/events",
            Some("application/json"),
            br#"{"kind":"a.b","payloads":{}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field `payloads`",
        ),
        (
            "number param",
            "/api/proposals",
            Some("application/json"),
            br#"{"template":"capped","params":{"n":3},"proposed_by":"a"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "params.n must be a string, not a number",
        ),
        (
            "missing proposed_by",
            "/api/proposals",
            Some("application/json"),
            br#"{"template":"hello","params":{}}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "proposed_by is required",
        ),
        (
            "blank proposed_by",
            "/api/proposals",
            Some("application/json"),
            br#"{"template":"hello","params":{},"proposed_by":"  "}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "proposed_by must be 1 to 64",
        ),
        (
            "long proposed_by",
            "/api/proposals",
            Some("application/json"),
            format!(
                r#"{{"template":"hello","proposed_by":"{}"}}"#,
                "x".repeat(65)
            )
            .into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "proposed_by must be 1 to 64",
        ),
        (
            "control chars in proposed_by",
            "/api/proposals",
            Some("application/json"),
            br#"{"template":"hello","proposed_by":"a\u0007b"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "proposed_by must be 1 to 64",
        ),
        (
            "string kind as number",
            "/api/events",
            Some("application/json"),
            br#"{"kind":5}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid type",
        ),
        (
            "bad event kind",
            "/api/events",
            Some("application/json"),
            br#"{"kind":"Bad Kind!"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "kind",
        ),
        (
            "payload not an object",
            "/api/events",
            Some("application/json"),
            br#"{"kind":"a.b","payload":[1]}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "JSON object",
        ),
        (
            "text content type",
            "/api/proposals",
            Some("text/plain"),
            br#"{"template":"hello","proposed_by":"a"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type: application/json",
        ),
        (
            "no content type",
            "/api/events",
            None,
            br#"{"kind":"a.b"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type",
        ),
    ];
    for (what, path, ct, body, want, says) in cases {
        let (status, answer) = app.post_raw(path, ct, &body).await;
        assert_eq!(status, want, "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(says),
            "{what}: {error:?} should say {says:?}"
        );
    }

    // Oversize without Content-Length: refused while streaming.
    let addr = app.addr;
    let (status, text) = tokio::task::spawn_blocking(move || {
        raw_chunked_post(addr, "/api/events", 80, &[b' '; 1024])
    })
    .await
    .expect("join");
    assert_eq!(status, 413, "{text}");
    assert!(text.contains(r#"{"error":"#), "{text}");

    // Ids, routes and methods.
    let (status, body) = app.get("/api/missions/abc", Some(KEY)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = app.get("/api/missions/-4", Some(KEY)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = app
        .get("/api/missions/99999999999999999999", Some(KEY))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = app.get("/api/missions/424242", Some(KEY)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("#424242")
    );
    let (status, _) = app.get("/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app.get("/api/proposals", Some(KEY)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let res = app
        .client
        .post(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("POST");
    assert_eq!(into_json(res).await.0, StatusCode::METHOD_NOT_ALLOWED);

    // Nothing above created anything.
    let proposals: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_mission_proposals")
        .fetch_one(&app.db.pool)
        .await
        .expect("count");
    assert_eq!(proposals, 0);
}

async fn event_sources(db: &TestDb, proposal_id: i64) -> Vec<(String, String)> {
    sqlx::query_as("SELECT kind, source FROM ops_agent_events WHERE proposal_id = $1 ORDER BY id")
        .bind(proposal_id)
        .fetch_all(&db.pool)
        .await
        .expect("events")
}

fn cli_json(db: &TestDb, args: &[&str]) -> (i32, Value) {
    let out = opsloop(&db.url, args);
    let value = serde_json::from_str(stdout(&out).trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value)
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_proposal_over_http_behaves_as_one_from_the_cli() {
    let app = App::start(Some(KEY)).await;

    // Low risk: approved, mission started, events from `http` (the CLI's from `cli`).
    let (status, http_low) = app
        .post(
            "/api/proposals",
            json!({"template": "hello", "params": {"name": "ada"}, "proposed_by": "agent:writer"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{http_low}");
    assert_eq!(http_low["status"], "approved");
    assert!(http_low["mission_id"].is_i64());
    assert!(http_low["reason"].is_null());
    let db = &app.db;
    let (code, cli_low) = tokio::task::block_in_place(|| {
        cli_json(
            db,
            &["propose", "hello", "name=bob", "--as", "cli:test", "--json"],
        )
    });
    assert_eq!(code, 0);
    assert_eq!(cli_low["status"], "approved");
    assert_eq!(keys(&http_low), keys(&cli_low));
    let http_id = http_low["id"].as_i64().expect("id");
    let cli_id = cli_low["id"].as_i64().expect("id");
    let http_events = event_sources(db, http_id).await;
    let cli_events = event_sources(db, cli_id).await;
    let kinds = |e: &[(String, String)]| e.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(kinds(&http_events), kinds(&cli_events));
    assert_eq!(
        kinds(&http_events),
        ["proposal.created", "proposal.approved", "mission.started"]
    );
    assert!(
        http_events.iter().all(|(_, s)| s == "http"),
        "{http_events:?}"
    );
    assert!(cli_events.iter().all(|(_, s)| s == "cli"), "{cli_events:?}");
    let proposed_by: String =
        sqlx::query_scalar("SELECT proposed_by FROM ops_mission_proposals WHERE id = $1")
            .bind(http_id)
            .fetch_one(&db.pool)
            .await
            .expect("row");
    assert_eq!(proposed_by, "agent:writer");

    // High risk: pending. The same again, from either side: refused as a duplicate
    // with the existing id (CLI exit 3, HTTP 409, same document).
    let (status, pending) = app
        .post(
            "/api/proposals",
            json!({"template": "deploy", "params": {"tag": "v1.2.3"}, "proposed_by": "agent:writer"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pending}");
    assert_eq!(pending["status"], "pending");
    assert!(pending["mission_id"].is_null());
    let pending_id = pending["id"].as_i64().expect("id");
    let (code, cli_dup) = tokio::task::block_in_place(|| {
        cli_json(db, &["propose", "deploy", "tag=v1.2.3", "--json"])
    });
    assert_eq!(code, 3);
    let (status, http_dup) = app
        .post(
            "/api/proposals",
            json!({"template": "deploy", "params": {"tag": "v1.2.3"}, "proposed_by": "agent:other"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{http_dup}");
    for dup in [&cli_dup, &http_dup] {
        assert_eq!(dup["status"], "rejected", "{dup}");
        assert_eq!(dup["existing_id"], json!(pending_id), "{dup}");
        assert!(
            dup["reason"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("#{pending_id}"))
        );
    }
    assert_eq!(keys(&cli_dup), keys(&http_dup));
    assert_eq!(
        cli_dup["reason"]
            .as_str()
            .map(|r| r.replace(&cli_dup["id"].to_string(), "N")),
        http_dup["reason"]
            .as_str()
            .map(|r| r.replace(&http_dup["id"].to_string(), "N")),
    );

    // Bad input: the same message as the CLI's, nothing created.
    let out = tokio::task::block_in_place(|| opsloop(&db.url, &["propose", "hello", "name=Ada!"]));
    assert_eq!(out.status.code(), Some(2));
    let (status, bad) = app
        .post(
            "/api/proposals",
            json!({"template": "hello", "params": {"name": "Ada!"}, "proposed_by": "agent:writer"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = bad["error"].as_str().unwrap_or_default();
    assert!(
        stderr(&out).contains(error),
        "{error:?} vs {}",
        stderr(&out)
    );
    let (status, bad) = app
        .post(
            "/api/proposals",
            json!({"template": "nope", "params": {}, "proposed_by": "agent:writer"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        bad["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown template")
    );

    // GET /api/missions/{id} is `opsloop mission ID --json`.
    let mission_id = http_low["mission_id"].as_i64().expect("mission");
    let (status, over_http) = app
        .get(&format!("/api/missions/{mission_id}"), Some(KEY))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (code, over_cli) = tokio::task::block_in_place(|| {
        cli_json(db, &["mission", &mission_id.to_string(), "--json"])
    });
    assert_eq!(code, 0);
    assert_eq!(over_http, over_cli);
    assert_eq!(over_http["template"], "hello");
    assert_eq!(over_http["steps"][0]["name"], "greet");

    // Events of one's own kind.
    let (status, emitted) = app
        .post(
            "/api/events",
            json!({"kind": "agent.note", "payload": {"text": "hi"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{emitted}");
    let id = emitted["id"].as_i64().expect("id");
    let (kind, source, payload): (String, String, Value) =
        sqlx::query_as("SELECT kind, source, payload FROM ops_agent_events WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .expect("event");
    assert_eq!((kind.as_str(), source.as_str()), ("agent.note", "http"));
    assert_eq!(payload, json!({"text": "hi"}));
    let (status, _) = app.post("/api/events", json!({"kind": "agent.bare"})).await;
    assert_eq!(status, StatusCode::CREATED);
}

/// `opsloop run` serves HTTP soon after start, and refuses a taken address with one line.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_serves_http_and_refuses_a_taken_address() {
    let db = test_db().await;
    apply_policy(&db).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let mut child = opsloop_cmd(Some(&db.url))
        .args(["run"])
        .env("OPSLOOP_HTTP_ADDR", &addr)
        .env("OPS_KEY", KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let mut healthy = None;
    while started.elapsed() < Duration::from_secs(20) {
        if let Ok(res) = client.get(format!("http://{addr}/healthz")).send().await
            && res.status() == StatusCode::OK
        {
            healthy = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let healthy = healthy.expect("/healthz never answered 200");
    eprintln!("/healthz answered {healthy:?} after spawning `opsloop run`");

    // The real daemon's API, with its worker behind it.
    let res = client
        .post(format!("http://{addr}/api/proposals"))
        .bearer_auth(KEY)
        .json(
            &json!({"template": "hello", "params": {"name": "eve"}, "proposed_by": "agent:writer"}),
        )
        .send()
        .await
        .expect("POST");
    let (status, proposed) = into_json(res).await;
    assert_eq!(status, StatusCode::CREATED, "{proposed}");

    // A second daemon on the same address: one clear line, non-zero exit.
    let second = tokio::task::block_in_place(|| {
        opsloop_cmd(Some(&db.url))
            .args(["run"])
            .env("OPSLOOP_HTTP_ADDR", &addr)
            .output()
            .expect("run")
    });
    assert_eq!(second.status.code(), Some(1));
    let err = stderr(&second);
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // SAFETY: sending SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| child.wait()).expect("wait");
    assert!(status.success(), "{status:?}");
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut log);
    }
    assert!(!log.contains(KEY), "the key is in the log");
}

/// PostgreSQL stores no U+0000 in text or jsonb: JSON carrying one is bad input (422
/// naming where it is), never a 500, and nothing is stored.
#[tokio::test(flavor = "multi_thread")]
async fn nul_characters_in_json_get_422_and_store_nothing() {
    let db = test_db().await;
    let source = format!(
        "{}{}",
        support::POLICY,
        r#"
[templates.note]
risk = "low"
params.text = { pattern = '^.*$', help = "any text" }
steps = [ { name = "s", kind = "noop" } ]
"#
    );
    opsloop::store::policy::apply(&db.pool, &source, "test")
        .await
        .expect("apply");
    let app = App::on(db, Some(KEY)).await;
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_agent_events")
        .fetch_one(&app.db.pool)
        .await
        .expect("count");
    let cases: [(&str, &[u8], &str); 6] = [
        (
            "/api/events",
            br#"{"kind":"a.b","payload":{"x":"a\u0000b"}}"#,
            r"payload.x contains \u0000 (a NUL character), which cannot be stored",
        ),
        (
            "/api/events",
            br#"{"kind":"a.b","payload":{"list":[1,{"deep":"\u0000"}]}}"#,
            r"payload.list[1].deep contains \u0000",
        ),
        (
            "/api/events",
            br#"{"kind":"a.b","payload":{"k\u0000":true}}"#,
            r"the key payload.",
        ),
        (
            "/api/proposals",
            br#"{"template":"note","params":{"text":"a\u0000"},"proposed_by":"agent:x"}"#,
            r"params.text contains \u0000",
        ),
        (
            "/api/proposals",
            br#"{"template":"note","params":{"text":"ok"},"proposed_by":"agent:\u0000"}"#,
            r"proposed_by contains \u0000",
        ),
        (
            "/api/proposals",
            br#"{"template":"no\u0000te","params":{},"proposed_by":"agent:x"}"#,
            r"template contains \u0000",
        ),
    ];
    for (path, body, says) in cases {
        let (status, answer) = app.post_raw(path, Some("application/json"), body).await;
        let text = String::from_utf8_lossy(body);
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(says),
            "{text}: {error:?} should say {says:?}"
        );
    }
    // The same body without the NUL is fine: the check is about U+0000 only.
    let (status, answer) = app
        .post(
            "/api/events",
            json!({"kind": "a.b", "payload": {"x": "a\\u0000b"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_agent_events")
        .fetch_one(&app.db.pool)
        .await
        .expect("count");
    assert_eq!(events, events_before + 1, "only the last event was stored");
    let proposals: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_mission_proposals")
        .fetch_one(&app.db.pool)
        .await
        .expect("count");
    assert_eq!(proposals, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_may_only_lower_a_priority() {
    let app = App::start(Some(KEY)).await;
    let propose = |name: &str, priority: Value| json!({"template": "hello", "params": {"name": name}, "proposed_by": "agent:a", "priority": priority});
    let (status, lower) = app.post("/api/proposals", propose("ada", json!(-7))).await;
    assert_eq!(status, StatusCode::CREATED, "{lower}");
    assert_eq!(lower["priority"], -7);
    let (status, same) = app.post("/api/proposals", propose("bob", json!(0))).await;
    assert_eq!(status, StatusCode::CREATED, "{same}");
    let (status, raised) = app.post("/api/proposals", propose("cat", json!(1))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{raised}");
    assert!(
        raised["error"]
            .as_str()
            .is_some_and(|e| e.contains("approver"))
    );
    for bad in [
        json!(-101),
        json!(1e3),
        json!("5"),
        json!(99_999_999_999_i64),
    ] {
        let (status, body) = app
            .post("/api/proposals", propose("dan", bad.clone()))
            .await;
        assert!(status.is_client_error(), "{bad}: {status} {body}");
        assert_ne!(status, StatusCode::CREATED);
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_mission_proposals")
        .fetch_one(&app.db.pool)
        .await
        .expect("count");
    assert_eq!(count, 2, "refused priorities record nothing");
}
