//! Agent keys (design §11) on the real binary: `opsloop keys …`, two `opsloop run` on one
//! database serving `/api/*`, each scope allowing and refusing, revocation holding on
//! the next request on both, per-agent gates, and hostile requests.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Daemon, TestDb, opsloop, opsloop_cmd, stderr, stdout, test_db};

const OPS_KEY: &str = "operator-key-0123456789abcdef";

const POLICY: &str = r#"
[approval]
auto_approve = ["low"]
high = { approvals = 1, self_approval = true }

[heartbeat]
interval = "1h"

[gates.agents.writer]
max_pending = 2
daily_cap = 4

[templates.draft]
risk = "low"
params.topic = { pattern = '^[a-z]+$', help = "a topic", default = "news" }
steps = [ { name = "s", kind = "noop" } ]

[templates.draft-long]
risk = "high"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "s", kind = "noop" } ]

[templates.publish]
risk = "low"
steps = [ { name = "s", kind = "noop" } ]
"#;

/// One `opsloop run` serving HTTP on its own port, its log kept in a file.
struct Host {
    base: String,
    log: PathBuf,
    _daemon: Daemon,
}

impl Host {
    async fn start(db: &TestDb, n: usize) -> Host {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let policy = support::write_temp(&format!("keys-{}.toml", db.name), POLICY);
        let log = std::env::temp_dir().join(format!("opsloop-keys-{}-{n}.log", db.name));
        let child = opsloop_cmd(Some(&db.url))
            .args(["run", "--policy", support::path_str(&policy)])
            .env("OPSLOOP_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("OPS_KEY", OPS_KEY)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn opsloop run");
        let host = Host {
            base: format!("http://127.0.0.1:{port}"),
            log,
            _daemon: Daemon(child),
        };
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("{}/healthz", host.base)).send().await
                && r.status() == StatusCode::OK
            {
                return host;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("opsloop run #{n} never served /healthz");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn call(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let client = reqwest::Client::new();
    let mut req = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn create_key(db: &TestDb, args: &[&str]) -> String {
    let mut all = vec!["keys", "create"];
    all.extend_from_slice(args);
    let out = opsloop(&db.url, &all);
    assert!(
        out.status.success(),
        "keys create {args:?}: {}",
        stderr(&out)
    );
    let key = stdout(&out).trim().to_string();
    assert!(key.starts_with("olk_") && key.len() >= 36, "{key:?}");
    assert!(stderr(&out).contains("only this once"), "{}", stderr(&out));
    key
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect(sql)
}

#[tokio::test]
async fn each_scope_allows_and_refuses_and_a_revocation_holds_on_every_host() {
    let db = test_db().await;
    let one = Host::start(&db, 1).await;
    let two = Host::start(&db, 2).await;
    let writer = create_key(
        &db,
        &[
            "writer",
            "--propose",
            "draft*",
            "--emit",
            "writer.*",
            "--answer",
            "--read",
        ],
    );
    let scout = create_key(&db, &["scout", "--emit", "radar.*"]);
    let asker = create_key(&db, &["asker", "--answer"]);
    assert_ne!(writer, scout);
    let url = |host: &Host, path: &str| format!("{}{path}", host.base);

    // Proposals: only matching templates, always as agent:writer.
    let (s, v) = call(
        "POST",
        &url(&one, "/api/proposals"),
        Some(&writer),
        Some(json!({ "template": "draft" })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let mission = v["mission_id"].as_i64().expect("low risk: a mission");
    let (s, v) = call(
        "POST",
        &url(&two, "/api/proposals"),
        Some(&writer),
        Some(json!({ "template": "draft", "params": { "topic": "sports" }, "proposed_by": "Agent:Writer" })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "naming itself is fine: {v}");
    let before = count(&db, "SELECT count(*) FROM ops_mission_proposals").await;
    for body in [
        json!({ "template": "publish" }),
        json!({ "template": "draft", "proposed_by": "alice" }),
        json!({ "template": "draft", "proposed_by": "agent:scout" }),
    ] {
        let (s, v) = call(
            "POST",
            &url(&one, "/api/proposals"),
            Some(&writer),
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{body}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("writer")),
            "{v}"
        );
    }
    let (s, v) = call(
        "POST",
        &url(&one, "/api/proposals"),
        Some(&scout),
        Some(json!({ "template": "draft" })),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["error"].as_str().unwrap().contains("--propose"), "{v}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM ops_mission_proposals").await,
        before,
        "nothing stored"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops_mission_proposals WHERE proposed_by <> 'agent:writer'"
        )
        .await,
        0
    );
    // The operator's key still names anyone, and must name someone.
    let (s, v) = call(
        "POST",
        &url(&one, "/api/proposals"),
        Some(OPS_KEY),
        Some(json!({ "template": "publish", "proposed_by": "script:cron" })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = call(
        "POST",
        &url(&one, "/api/proposals"),
        Some(OPS_KEY),
        Some(json!({ "template": "publish" })),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    // Events: only matching kinds, carrying the agent's name.
    let (s, v) = call(
        "POST",
        &url(&one, "/api/events"),
        Some(&scout),
        Some(json!({ "kind": "radar.signal", "payload": { "x": 1 } })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let source: String = sqlx::query_scalar("SELECT source FROM ops_agent_events WHERE id = $1")
        .bind(v["id"].as_i64().expect("id"))
        .fetch_one(&db.pool)
        .await
        .expect("event");
    assert_eq!(source, "agent:scout");
    let (s, v) = call(
        "POST",
        &url(&one, "/api/events"),
        Some(&scout),
        Some(json!({ "kind": "writer.done" })),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops_agent_events WHERE kind = 'writer.done'"
        )
        .await,
        0
    );

    // Reads only with --read; questions only with --answer; reading one needs both.
    let mission_path = format!("/api/missions/{mission}");
    let (s, v) = call("GET", &url(&one, &mission_path), Some(&writer), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call("GET", &url(&one, &mission_path), Some(&scout), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = call(
        "POST",
        &url(&one, "/api/questions"),
        Some(&scout),
        Some(json!({ "question": "go?" })),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = call(
        "POST",
        &url(&one, "/api/questions"),
        Some(&asker),
        Some(json!({ "question": "go?", "choices": ["yes", "no"] })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let question = v["id"].as_i64().expect("id");
    let asked_by: String = sqlx::query_scalar("SELECT asked_by FROM ops_questions WHERE id = $1")
        .bind(question)
        .fetch_one(&db.pool)
        .await
        .expect("question");
    assert_eq!(asked_by, "agent:asker");
    let q_path = format!("/api/questions/{question}");
    let (s, v) = call("GET", &url(&one, &q_path), Some(&asker), None).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "--answer alone does not read: {v}"
    );
    let (s, v) = call("GET", &url(&two, &q_path), Some(&writer), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = call(
        "POST",
        &url(&one, &format!("{q_path}/answer")),
        Some(&writer),
        Some(json!({ "answer": "yes", "answered_by": "bob" })),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "an agent answers only as itself: {v}"
    );
    let (s, v) = call(
        "POST",
        &url(&one, &format!("{q_path}/answer")),
        Some(&writer),
        Some(json!({ "answer": "yes" })),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["answered_by"], "agent:writer", "{v}");

    // The heartbeat: never a key.
    let (s, v) = call(
        "POST",
        &url(&one, "/api/ops/heartbeat"),
        Some(&writer),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _) = call(
        "POST",
        &url(&one, "/api/ops/heartbeat"),
        Some(OPS_KEY),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // Unknown keys, keys in the URL and Basic auth: 401.
    let forged = format!("olk_{}", "A".repeat(43));
    let (s, _) = call("GET", &url(&one, &mission_path), Some(&forged), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = call(
        "GET",
        &format!("{}?key={writer}", url(&one, &mission_path)),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let (s, v) = call(
        "GET",
        &format!("{}?wait=1s&access_token={writer}", url(&one, &q_path)),
        Some(&writer),
        None,
    )
    .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "a key in the URL is refused even with a header: {v}"
    );
    let basic = reqwest::Client::new()
        .get(url(&one, &mission_path))
        .basic_auth("writer", Some(&writer))
        .send()
        .await
        .expect("basic");
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);

    // Used keys show when; no key or digest is ever listed.
    let out = opsloop(&db.url, &["keys", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).expect("json");
    let w = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "writer")
        .expect("writer");
    assert!(w["last_used_at"].is_string(), "{w}");
    assert_eq!(w["scopes"]["propose"], json!(["draft*"]));
    assert_eq!(w["scopes"]["read"], true);
    assert!(w["revoked_at"].is_null());
    let text = stdout(&out);
    assert!(!text.contains(&writer) && !text.contains(&opsloop::domain::keys::digest(&writer)));

    // Revoked: the very next request is refused, on both hosts, with no restart.
    let out = opsloop(&db.url, &["keys", "revoke", "writer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for host in [&one, &two] {
        let (s, v) = call("GET", &url(host, &mission_path), Some(&writer), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    }
    let (s, _) = call("GET", &url(&two, &mission_path), Some(OPS_KEY), None).await;
    assert_eq!(s, StatusCode::OK, "the operator is unaffected");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops_agent_events WHERE kind IN ('key.created', 'key.revoked')"
        )
        .await,
        4
    );

    // The key text is in no table, no log line, no error message.
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
            .fetch_all(&db.pool)
            .await
            .expect("tables");
    for key in [&writer, &scout, &asker] {
        for table in &tables {
            let n: i64 = sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {table} t WHERE strpos(t::text, $1) > 0"
            ))
            .bind(key.as_str())
            .fetch_one(&db.pool)
            .await
            .expect("scan");
            assert_eq!(n, 0, "{table} holds a key");
        }
        for host in [&one, &two] {
            assert!(
                !host.log_text().contains(key.as_str()),
                "a log line holds a key"
            );
        }
    }
    assert!(
        one.log_text().contains("unknown or revoked key"),
        "refusals are logged (without the key)"
    );
}

#[tokio::test]
async fn names_are_validated_and_a_live_name_is_not_given_twice() {
    let db = test_db().await;
    for bad in [
        "Writer",
        "2x",
        "a b",
        "",
        "-x",
        "abcdefghijklmnopqrstuvwxyz0123456",
    ] {
        let out = opsloop(&db.url, &["keys", "create", bad, "--read"]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "no key printed for {bad:?}");
    }
    let out = opsloop(&db.url, &["keys", "create", "writer"]);
    assert_eq!(out.status.code(), Some(2), "no scopes: {}", stderr(&out));
    let out = opsloop(
        &db.url,
        &["keys", "create", "writer", "--propose", "Bad Pattern"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--propose"), "{}", stderr(&out));
    assert_eq!(count(&db, "SELECT count(*) FROM ops_api_keys").await, 0);

    let first = create_key(&db, &["writer", "--read"]);
    let out = opsloop(&db.url, &["keys", "create", "writer", "--read"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a name in use: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let out = opsloop(&db.url, &["keys", "revoke", "nobody"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = opsloop(&db.url, &["keys", "revoke", "writer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = create_key(&db, &["writer", "--read"]);
    assert_ne!(
        first, second,
        "a revoked name may be given again, to a new key"
    );
    let out = opsloop(&db.url, &["keys", "list"]);
    let text = stdout(&out);
    assert!(text.contains("revoked") && text.contains("never"), "{text}");
}

#[tokio::test]
async fn an_agent_is_held_to_its_own_gates_and_people_are_not() {
    let db = test_db().await;
    let host = Host::start(&db, 1).await;
    let writer = create_key(&db, &["writer", "--propose", "draft*"]);
    let propose = |template: &'static str, n: u32, key: String, by: Option<&'static str>| {
        let url = format!("{}/api/proposals", host.base);
        async move {
            let mut body = json!({ "template": template });
            if template == "draft-long" {
                body["params"] = json!({ "n": n.to_string() });
            } else {
                let topic = ["a", "b", "c", "d", "e", "f"][n as usize];
                body["params"] = json!({ "topic": topic });
            }
            if let Some(by) = by {
                body["proposed_by"] = json!(by);
            }
            call("POST", &url, Some(&key), Some(body)).await
        }
    };
    // max_pending = 2: high risk proposals wait.
    let mut waiting = Vec::new();
    for n in 0..2 {
        let (s, v) = propose("draft-long", n, writer.clone(), None).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        waiting.push(v["id"].as_i64().expect("id"));
    }
    let (s, v) = propose("draft-long", 2, writer.clone(), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["status"], "rejected");
    let reason = v["reason"].as_str().expect("reason");
    assert!(
        reason.contains("agent writer") && reason.contains("max_pending = 2"),
        "{reason}"
    );
    // A person is not bound by the agent's gate.
    let (s, v) = propose("draft-long", 3, OPS_KEY.into(), Some("alice")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // daily_cap = 4 per UTC day: the two (now rejected by a person) + two more low ones,
    // then refused; the one a gate refused above does not count.
    for id in waiting {
        let out = opsloop(&db.url, &["reject", &id.to_string(), "--as", "alice"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for n in 0..2 {
        let (s, v) = propose("draft", n, writer.clone(), None).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, v) = propose("draft", 2, writer.clone(), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let reason = v["reason"].as_str().expect("reason");
    assert!(
        reason.contains("agent writer made 4 proposals today"),
        "{reason}"
    );
    let row: (String, String) =
        sqlx::query_as("SELECT status, decided_by FROM ops_mission_proposals WHERE id = $1")
            .bind(v["id"].as_i64().expect("id"))
            .fetch_one(&db.pool)
            .await
            .expect("refused proposal recorded");
    assert_eq!(row, ("rejected".into(), "gate:agent_daily_cap".into()));
    let (s, v) = propose("draft", 3, OPS_KEY.into(), Some("alice")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // policy check knows the section.
    let bad = support::write_temp(
        &format!("keys-bad-{}.toml", db.name),
        "[gates.agents.Writer]\nmax_pending = 0\nbogus = 1\n",
    );
    let out = opsloop(&db.url, &["policy", "check", support::path_str(&bad)]);
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    for needle in ["gates.agents.Writer", "max_pending", "bogus"] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

#[tokio::test]
async fn wrong_keys_in_bulk_get_401s_and_leave_health_checks_alone() {
    let db = test_db().await;
    let host = Host::start(&db, 1).await;
    let key = create_key(
        &db,
        &["writer", "--propose", "draft*", "--emit", "writer.*"],
    );
    let client = reqwest::Client::new();
    let health = format!("{}/healthz", host.base);
    let p95 = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() * 95 / 100]
    };
    let mut idle = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let r = client.get(&health).send().await.expect("healthz");
        assert_eq!(r.status(), StatusCode::OK);
        idle.push(t.elapsed());
    }
    // 1,000 wrong keys (half shaped like agent keys) from one client, 16 at a time,
    // while health is checked alongside; the attacker is `bench keys`' own, on a thread
    // and runtime of its own as another process would be (the 10,000 of the issue are
    // the bench's: at the tarpit's pace they take 100 s).
    let attack = {
        let url = format!("{}/api/events", host.base);
        std::thread::spawn(move || {
            let started = Instant::now();
            let sent = opsloop::interfaces::bench::flood_wrong_keys(&url, 1_000, 16);
            (sent.expect("flood"), started.elapsed())
        })
    };
    let mut loaded = Vec::new();
    let mut right_key_answers = Vec::new();
    while !attack.is_finished() {
        let t = Instant::now();
        let r = client.get(&health).send().await.expect("healthz");
        assert_eq!(r.status(), StatusCode::OK);
        loaded.push(t.elapsed());
        if right_key_answers.len() < 5 {
            // The same address with the right key is never refused, flood or not.
            let r = client
                .post(format!("{}/api/events", host.base))
                .bearer_auth(&key)
                .json(&json!({ "kind": "writer.ok" }))
                .send()
                .await
                .expect("right key");
            right_key_answers.push(r.status());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ((refused, other), took) = attack.join().expect("attack");
    assert_eq!(refused, 1_000, "every wrong key: 401");
    assert_eq!(other, json!({}), "no other status");
    assert!(
        right_key_answers.iter().all(|s| s.is_success()),
        "{right_key_answers:?}"
    );
    // The tarpit's pace (100 a second after a burst of 100) is a floor, not a timing
    // target: 1,000 cannot all be answered in under 9 s.
    assert!(took >= Duration::from_secs(4), "not paced: {took:?}");
    // Reported, not asserted (timing belongs to benchmarks): see benches/results.md.
    eprintln!(
        "healthz p95 idle {:?}, during 1,000 wrong keys {:?} ({} samples, {took:?})",
        p95(idle),
        p95(loaded.clone()),
        loaded.len()
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops_agent_events WHERE kind = 'writer.x'"
        )
        .await,
        0
    );

    // Hostile bodies with a valid key: 4xx, nothing stored.
    let url = format!("{}/api/events", host.base);
    let big = format!(
        r#"{{"kind":"writer.x","payload":{{"x":"{}"}}}}"#,
        "a".repeat(2 << 20)
    );
    let r = client
        .post(&url)
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("big");
    assert!(r.status().is_client_error(), "{}", r.status());
    let r = client
        .post(&url)
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(r#"{"kind":"writer.x","payload":{"x":"a\u0000b"}}"#)
        .send()
        .await
        .expect("nul");
    assert!(r.status().is_client_error(), "{}", r.status());
    let r = client
        .post(format!("{}/api/proposals", host.base))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(r#"{"template":"draft","params":{"topic":"a\u0000"}}"#)
        .send()
        .await
        .expect("nul");
    assert!(r.status().is_client_error(), "{}", r.status());
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops_agent_events WHERE kind = 'writer.x'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM ops_mission_proposals").await,
        0
    );
}
