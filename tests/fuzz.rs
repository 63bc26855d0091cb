//! Fuzzed parsers (issue 14): property tests over every parser of outside input —
//! the policy file, `key=value` params, ids and identities, chat command text, button
//! callback data, `{placeholder}` templates, and HTTP bodies over real loopback HTTP.
//! Thousands of generated cases each (the HTTP ones fewer: each is a round trip);
//! none may panic, and every refusal must be a clear error (located, or naming what
//! was wrong). `nasty_*` tests keep a corpus of the worst inputs as regular tests.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use opsloop::domain::input;
use opsloop::domain::policy;
use opsloop::domain::steps::{placeholders_in, substitute_str};
use opsloop::interfaces::bot::{Command, parse_callback_data};
use proptest::prelude::*;
use teloxide::utils::command::BotCommands;

const CASES: u32 = 2000;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Shrinking a failure is worth little time in CI; the failing input is printed.
        max_shrink_iters: 200,
        // No regression files in the source tree: the corpus below keeps what matters.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text with the characters parsers trip on: quotes, brackets, `=`, `:`, `#`,
/// newlines, NUL, bidi and zero-width marks, wide and combining characters.
fn nasty_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z=:#{}\\[\\]\"' \\n\\t\\\\.,0-9-]{0,40}",
        proptest::collection::vec(
            prop_oneof![
                Just("\0"),
                Just("\u{202e}"),
                Just("\u{200b}"),
                Just("\u{feff}"),
                Just("é"),
                Just("e\u{301}"),
                Just("Ｗ"),
                Just("🙂"),
                Just("\r\n"),
                Just("="),
                Just(":"),
                Just("{"),
                Just("}"),
                Just("\""),
                Just("'''"),
                Just("[[x]]"),
                Just("a"),
                Just("9223372036854775808"),
                Just("-1"),
            ],
            0..20
        )
        .prop_map(|parts| parts.concat()),
    ]
}

/// A policy refusal is a list of located problems with messages.
fn assert_clear(problems: &[policy::Problem], source: &str) {
    assert!(!problems.is_empty(), "refused without a problem");
    let lines = source.split('\n').count().max(1);
    for p in problems {
        assert!(
            !p.message.trim().is_empty(),
            "a problem without a message: {p:?}"
        );
        assert!(
            p.line >= 1 && p.line <= lines + 1 && p.column >= 1,
            "a problem outside the file ({lines} lines): {p:?}"
        );
    }
}

fn check_policy(source: &str) {
    if let Err(problems) = policy::parse(source) {
        assert_clear(&problems, source);
    }
}

/// The test policy with one edit at a place chosen by `at`.
fn mutated_policy() -> impl Strategy<Value = String> {
    let base = support::POLICY;
    (0..base.len(), 0usize..8, nasty_text(), 0usize..40).prop_map(move |(at, op, text, len)| {
        let mut at = at;
        while !base.is_char_boundary(at) {
            at -= 1;
        }
        let mut end = (at + len).min(base.len());
        while !base.is_char_boundary(end) {
            end -= 1;
        }
        match op {
            0 | 1 => format!("{}{}", &base[..at], &base[end..]),
            2 | 3 => format!("{}{text}{}", &base[..at], &base[at..]),
            4 | 5 => format!("{}{text}{}", &base[..at], &base[end..]),
            // A line duplicated: repeated keys and tables.
            _ => {
                let line_start = base[..at].rfind('\n').map_or(0, |i| i + 1);
                let line_end = base[at..].find('\n').map_or(base.len(), |i| at + i);
                let line = &base[line_start..line_end];
                format!("{}\n{line}{}", &base[..line_end], &base[line_end..])
            }
        }
    })
}

/// TOML made of the policy's own words with random values: gets past the syntax and
/// into the checks of every section.
fn worded_policy() -> impl Strategy<Value = String> {
    let section = prop_oneof![
        Just("approval"),
        Just("gates"),
        Just("worker"),
        Just("heartbeat"),
        Just("notify"),
        Just("retention"),
        Just("telegram"),
        Just("templates.t"),
        Just("templates.t.params.p"),
        Just("[reactions]"),
        Just("[triggers]"),
        Just("gates.templates.t"),
        Just("approval.high"),
    ];
    let key = prop_oneof![
        Just("ttl"),
        Just("auto_approve"),
        Just("approvals"),
        Just("self_approval"),
        Just("max_pending"),
        Just("daily_cap"),
        Just("cooldown"),
        Just("max_running"),
        Just("concurrency"),
        Just("lease"),
        Just("max_attempts"),
        Just("backoff"),
        Just("interval"),
        Just("event_batch"),
        Just("risk"),
        Just("steps"),
        Just("pattern"),
        Just("default"),
        Just("help"),
        Just("on"),
        Just("propose"),
        Just("params"),
        Just("cron"),
        Just("timezone"),
        Just("name"),
        Just("kind"),
        Just("run"),
        Just("url"),
        Just("for"),
        Just("chats"),
    ];
    let value = prop_oneof![
        Just("\"1h\"".to_string()),
        Just("\"0s\"".to_string()),
        Just("\"-1s\"".to_string()),
        Just("\"low\"".to_string()),
        Just("\"red\"".to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("9223372036854775807".to_string()),
        Just("true".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\"(\"".to_string()),
        Just("\"* * * * *\"".to_string()),
        Just("\"Mars/Phobos\"".to_string()),
        Just("[ { name = \"s\", kind = \"shell\", run = [] } ]".to_string()),
        Just("[ { name = \"s\", kind = \"http\", url = \"ftp://x\" } ]".to_string()),
        Just("[ { name = \"s\", kind = \"emit\" } ]".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z0-9 ]{0,12}".prop_map(|s| format!("{s:?}")),
    ];
    proptest::collection::vec(
        (section, proptest::collection::vec((key, value), 0..6)),
        0..6,
    )
    .prop_map(|sections| {
        let mut out = String::new();
        for (name, pairs) in sections {
            // "[reactions]" becomes the array table "[[reactions]]".
            out.push_str(&format!("[{name}]\n"));
            for (k, v) in pairs {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn any_text_as_a_policy_is_parsed_or_refused_with_located_problems(source in nasty_text()) {
        check_policy(&source);
    }

    #[test]
    fn an_edited_policy_is_parsed_or_refused_with_located_problems(source in mutated_policy()) {
        check_policy(&source);
    }

    #[test]
    fn a_policy_of_the_policy_words_is_parsed_or_refused_with_located_problems(source in worded_policy()) {
        check_policy(&source);
    }

    #[test]
    fn params_are_parsed_exactly_or_refused_naming_the_word(words in proptest::collection::vec(nasty_text(), 0..6)) {
        match input::parse_params(&words) {
            Ok(params) => {
                prop_assert!(params.len() <= words.len());
                for word in &words {
                    let (key, value) = word.split_once('=').expect("accepted words have =");
                    prop_assert_eq!(params.get(key.trim()), Some(&value.to_string()));
                }
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert_eq!(e.exit_code(), 2);
                prop_assert!(
                    text.contains("key=value") || text.contains("param"),
                    "unclear refusal: {}", text
                );
            }
        }
    }

    #[test]
    fn well_formed_params_come_back_as_given(
        pairs in proptest::collection::btree_map("[A-Za-z0-9_-]{1,64}", any::<String>(), 0..8)
    ) {
        let words: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let parsed = input::parse_params(&words).expect("well-formed params");
        prop_assert_eq!(parsed, pairs.into_iter().collect::<BTreeMap<_, _>>());
    }

    #[test]
    fn ids_are_positive_numbers_or_refused(raw in nasty_text()) {
        match input::parse_id(&raw, "mission") {
            Ok(id) => prop_assert!(id > 0),
            Err(e) => {
                prop_assert_eq!(e.exit_code(), 2);
                prop_assert!(e.to_string().contains("is not a mission id"));
            }
        }
    }

    #[test]
    fn identities_are_normalized_or_refused_saying_why(raw in nasty_text()) {
        match input::identity(&raw, "proposed_by") {
            Ok(name) => {
                prop_assert!(!name.is_empty());
                // Normalizing is idempotent: a stored name compares equal to itself.
                prop_assert_eq!(input::normalize_identity(&name), name.clone());
                prop_assert!(input::same_person(&name, &raw));
            }
            Err(e) => prop_assert!(e.to_string().starts_with("proposed_by must be")),
        }
    }

    #[test]
    fn chat_command_text_parses_or_is_refused(text in nasty_text(), command in prop_oneof![
        Just(""), Just("/propose "), Just("/approve "), Just("/reject "), Just("/cancel "),
        Just("/mission "), Just("/grant "), Just("/resume "), Just("/propose@opsloop_bot "),
        Just("/propose@other_bot "), Just("/PROPOSE "), Just("/help"), Just("/"),
    ]) {
        let text = format!("{command}{text}");
        if let Ok(parsed) = Command::parse(&text, "opsloop_bot") {
            // The arguments go through the same parsers as the CLI's.
            match parsed {
                Command::Propose(args) => {
                    let words: Vec<&str> = args.split_whitespace().collect();
                    if let Some((_, params)) = words.split_first() {
                        let _ = input::parse_params(params);
                    }
                }
                Command::Approve(args) | Command::Reject(args) | Command::Cancel(args)
                | Command::Mission(args) | Command::Revoke(args) => {
                    if let Some(first) = args.split_whitespace().next() {
                        let _ = input::parse_id(first, "proposal");
                    }
                }
                Command::Grant(args) => {
                    if let Some(first) = args.split_whitespace().next() {
                        let _ = input::parse_telegram_id(first);
                    }
                }
                _ => {}
            }
        }
    }

    #[test]
    fn callback_data_is_a_decision_on_a_positive_id_or_nothing(data in nasty_text()) {
        if let Some((_, id)) = parse_callback_data(&data) {
            prop_assert!(id > 0);
            prop_assert!(data.len() <= 64);
            prop_assert!(data.starts_with("a:") || data.starts_with("r:"));
        }
    }

    #[test]
    fn callback_data_the_prompts_send_is_understood(id in 1i64..=i64::MAX, approve in any::<bool>()) {
        let data = format!("{}:{id}", if approve { "a" } else { "r" });
        let (_, parsed) = parse_callback_data(&data).expect("our own callback data");
        prop_assert_eq!(parsed, id);
    }

    #[test]
    fn placeholders_expand_without_panicking(template in nasty_text(), value in nasty_text()) {
        let names = placeholders_in(&template);
        let out = substitute_str(&template, |name| names.iter().any(|n| n == name).then(|| value.clone()));
        // Nothing is lost: with no placeholders, only `{{`/`}}` change.
        if names.is_empty() && !template.contains("{{") && !template.contains("}}") {
            prop_assert_eq!(out, template);
        }
    }

    #[test]
    fn json_that_postgres_cannot_store_is_refused_by_name(value in json_value()) {
        if let Err(e) = input::storable_json(&value, "payload") {
            prop_assert!(e.to_string().contains("payload"), "{}", e);
        }
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        nasty_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(nasty_text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

// ---- HTTP bodies over real loopback HTTP --------------------------------------------

const KEY: &str = "fuzz-key-0123456789";

struct Api {
    base: String,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
    _db: support::TestDb,
}

impl Api {
    fn start() -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (db, base) = rt.block_on(async {
            let db = support::test_db().await;
            support::apply_policy(&db).await;
            let state = opsloop::interfaces::http::AppState::new(
                db.pool.clone(),
                opsloop::store::policy::PolicyCache::default(),
                Some(KEY),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let shutdown = tokio_util::sync::CancellationToken::new();
            tokio::spawn(opsloop::interfaces::http::serve(listener, state, shutdown));
            (db, format!("http://{addr}"))
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        Api {
            base,
            client,
            rt,
            _db: db,
        }
    }

    /// POST `body` with `content_type`; the status and the body as JSON.
    fn post(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
        self.rt.block_on(async {
            let response = self
                .client
                .post(format!("{}{path}", self.base))
                .bearer_auth(KEY)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .expect("POST");
            let status = response.status().as_u16();
            let bytes = response.bytes().await.expect("body");
            let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "HTTP {status} without a JSON body: {:?}",
                    String::from_utf8_lossy(&bytes)
                )
            });
            (status, json)
        })
    }
}

fn check_answer(status: u16, json: &serde_json::Value) {
    assert!(
        matches!(status, 200 | 201 | 400 | 409 | 413 | 415 | 422),
        "HTTP {status}: {json}"
    );
    if status == 409 {
        // A gate refused: the refused proposal's document, with its reason.
        let reason = json["reason"].as_str().unwrap_or_default();
        assert!(
            json["status"] == "rejected" && !reason.trim().is_empty(),
            "a gate refusal without its reason: {json}"
        );
    } else if status >= 400 {
        let error = json["error"].as_str().unwrap_or_default();
        assert!(
            !error.trim().is_empty(),
            "a refusal without an error: {json}"
        );
    }
}

/// Bodies for the two POST endpoints: raw bytes, any JSON, and documents of nearly the
/// right shape.
fn body() -> impl Strategy<Value = Vec<u8>> {
    use serde_json::json;
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (nasty_text(), json_value()).prop_map(|(kind, payload)| {
            json!({ "kind": kind, "payload": payload })
                .to_string()
                .into_bytes()
        }),
        (
            prop_oneof![
                Just("hello".to_string()),
                Just("deploy".to_string()),
                nasty_text()
            ],
            proptest::collection::btree_map(nasty_text(), json_value(), 0..4),
            nasty_text()
        )
            .prop_map(|(template, params, by)| {
                json!({ "template": template, "params": params, "proposed_by": by })
                    .to_string()
                    .into_bytes()
            }),
        nasty_text().prop_map(String::into_bytes),
    ]
}

#[test]
fn http_bodies_are_answered_or_refused_with_a_json_error() {
    let api = Api::start();
    let mut runner = proptest::test_runner::TestRunner::new(config(300));
    let cases = (
        prop_oneof![Just("/api/events"), Just("/api/proposals")],
        prop_oneof![
            Just("application/json"),
            Just("application/json; charset=utf-8"),
            Just("text/plain"),
            Just("application/x-www-form-urlencoded"),
        ],
        body(),
    );
    runner
        .run(&cases, |(path, content_type, body)| {
            let (status, json) = api.post(path, content_type, body);
            check_answer(status, &json);
            Ok(())
        })
        .expect("every body answered");
}

// ---- the corpus ---------------------------------------------------------------------

/// The worst inputs found so far and thought of, for every parser.
const NASTY: &[&str] = &[
    "",
    "\0",
    "\u{202e}",
    "\u{feff}[approval]",
    "=",
    "==",
    "a==",
    "=a",
    " = ",
    "a:",
    ":1",
    "a:0",
    "a:-1",
    "a:+1",
    "a: 1",
    "A:1",
    "a:1:2",
    "a:9223372036854775807",
    "a:9223372036854775808",
    "r:00000000000000000000000000000001",
    "#",
    "##1",
    "#-0",
    "{",
    "}",
    "{{}",
    "{}}",
    "{ {x} }",
    "\"\"\"",
    "'''",
    "[[",
    "[a]\n[a]",
    "[templates.x]\n[templates.x]",
    "templates = 1",
    "templates = { x = 1 }",
    "[templates.\"\"]\nrisk = \"low\"\nsteps = []",
    "[templates.x]\nrisk = \"low\"\nsteps = [ { name = \"s\", kind = \"shell\", run = [\"\0\"] } ]",
    "[worker]\nconcurrency = 18446744073709551616",
    "[worker]\nlease = \"99999999999999999999h\"",
    "[heartbeat]\ninterval = \"0s\"",
    "[[triggers]]\nname = \"t\"\ncron = \"0 0 31 2 *\"\npropose = \"x\"",
    "x = 1979-05-27T07:32:00Z",
    "x = nan\ny = inf",
    "a.b.c.d.e.f.g = 1",
    "/propose",
    "/propose@opsloop_bot",
    "/propose hello name",
    "/propose hello =x",
    "/approve #",
    "/grant 1 god",
    "/revoke -1",
];

#[test]
fn nasty_inputs_never_panic_and_refusals_are_clear() {
    let long = "x".repeat(100_000);
    let deep = "[".repeat(10_000);
    let deep_toml = format!("a = {}", "[".repeat(10_000));
    let many_eq = "a=".repeat(10_000);
    let mut corpus: Vec<String> = NASTY.iter().map(|s| s.to_string()).collect();
    corpus.extend([long, deep, deep_toml, many_eq]);
    for text in &corpus {
        check_policy(text);
        let _ = input::parse_params(&[text.as_str()]);
        let words: Vec<&str> = text.split_whitespace().collect();
        let _ = input::parse_params(&words);
        let _ = input::parse_id(text, "proposal");
        let _ = input::parse_telegram_id(text);
        if let Err(e) = input::identity(text, "who") {
            assert!(e.to_string().starts_with("who must be"), "{e}");
        }
        let _ = parse_callback_data(text);
        let _ = Command::parse(text, "opsloop_bot");
        let _ = substitute_str(text, |_| Some(text.clone()));
        let _ = placeholders_in(text);
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
            let _ = input::storable_json(&value, "payload");
        }
    }
    // The callback data of a prompt's buttons, and what is refused.
    assert!(parse_callback_data("a:1").is_some());
    for refused in [
        "a:0",
        "a:-1",
        "a: 1",
        "A:1",
        "x:1",
        "a:1:2",
        "a:9223372036854775808",
    ] {
        assert_eq!(parse_callback_data(refused), None, "{refused}");
    }
}

#[test]
fn nasty_http_bodies_are_refused_with_a_json_error() {
    let api = Api::start();
    let deep = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    let big = format!("{{\"kind\":\"x\",\"payload\":\"{}\"}}", "x".repeat(70_000));
    let bodies: Vec<(&str, String)> = vec![
        ("/api/events", String::new()),
        ("/api/events", "null".into()),
        ("/api/events", "[]".into()),
        ("/api/events", deep.clone()),
        ("/api/events", big),
        ("/api/events", r#"{"kind":"x\u0000y"}"#.into()),
        (
            "/api/events",
            r#"{"kind":"ok","payload":{"\u0000":1}}"#.into(),
        ),
        ("/api/events", r#"{"kind":"ok","payload":"\ud800"}"#.into()),
        ("/api/events", r#"{"kind":"ok","extra":1}"#.into()),
        ("/api/events", r#"{"kind":"ok","kind":"twice"}"#.into()),
        ("/api/events", r#"{"kind":1e999}"#.into()),
        ("/api/proposals", deep),
        (
            "/api/proposals",
            r#"{"template":"hello","params":{"name":1},"proposed_by":"x"}"#.into(),
        ),
        (
            "/api/proposals",
            r#"{"template":"hello","params":[],"proposed_by":"x"}"#.into(),
        ),
        (
            "/api/proposals",
            r#"{"template":"hello","proposed_by":"\u202e"}"#.into(),
        ),
        (
            "/api/proposals",
            r#"{"template":"hello","proposed_by":""}"#.into(),
        ),
        (
            "/api/proposals",
            r#"{"template":"","proposed_by":"x"}"#.into(),
        ),
        (
            "/api/proposals",
            r#"{"template":"hello","params":{"name":"A"},"proposed_by":"x"}"#.into(),
        ),
    ];
    for (path, body) in bodies {
        let (status, json) = api.post(path, "application/json", body.into_bytes());
        check_answer(status, &json);
        assert!(
            status >= 400 || path == "/api/events",
            "{path}: {status} {json}"
        );
    }
}
