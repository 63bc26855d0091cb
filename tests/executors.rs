//! Step executors against real child processes and a real local HTTP server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use opsloop::domain::steps::StepSpec;
use opsloop::engine::executors::{Executors, Outcome, StepContext, backoff_delay};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn ctx() -> StepContext {
    StepContext {
        mission_id: 7,
        step_id: 42,
        attempt: 2,
        params: BTreeMap::from([
            ("tag".to_string(), "v1.2.3".to_string()),
            ("build-id".to_string(), "b9".to_string()),
        ]),
        cancel: CancellationToken::new(),
        default_timeout: None,
        ask: None,
        progress: None,
    }
}

fn shell(argv: &[&str], timeout_ms: Option<u64>) -> StepSpec {
    StepSpec::Shell {
        run: argv.iter().map(|s| s.to_string()).collect(),
        cwd: None,
        env: BTreeMap::new(),
        timeout_ms,
    }
}

async fn exec(spec: &StepSpec, ctx: &StepContext) -> Outcome {
    tokio::time::timeout(Duration::from_secs(30), Executors::new().execute(spec, ctx))
        .await
        .expect("executor hung")
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("opsloop-exec-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Gone, or a zombie waiting for init to reap it: either way no longer running.
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

async fn wait_gone(pid: i32) -> bool {
    for _ in 0..100 {
        if process_gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn read_pid(path: &std::path::Path) -> i32 {
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(pid) = text.trim().parse()
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no pid in {}", path.display());
}

#[tokio::test]
async fn noop_sleep_emit() {
    let c = ctx();
    assert!(
        matches!(exec(&StepSpec::Noop, &c).await, Outcome::Succeeded { result, .. } if result == json!({}))
    );
    let t = Instant::now();
    let out = exec(&StepSpec::Sleep { for_ms: 100 }, &c).await;
    assert!(matches!(out, Outcome::Succeeded { .. }) && t.elapsed() >= Duration::from_millis(100));
    let emit = StepSpec::Emit {
        event: "deploy.done".into(),
        payload: json!({"tag": "v1"}),
    };
    let Outcome::Succeeded { result, .. } = exec(&emit, &c).await else {
        panic!("emit failed")
    };
    assert_eq!(
        result,
        json!({"event": "deploy.done", "payload": {"tag": "v1"}})
    );

    let c = ctx();
    let cancel = c.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
    });
    let t = Instant::now();
    let out = exec(&StepSpec::Sleep { for_ms: 60_000 }, &c).await;
    assert!(matches!(out, Outcome::Cancelled { .. }), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn shell_success_sees_env_and_cwd() {
    let dir = scratch_dir("env");
    let spec = StepSpec::Shell {
        run: vec![
            "sh".into(),
            "-c".into(),
            "echo $OPSLOOP_PARAM_TAG $OPSLOOP_PARAM_BUILD_ID $OPSLOOP_MISSION_ID $OPSLOOP_STEP_ID $OPSLOOP_ATTEMPT $EXTRA; pwd; echo warn >&2".into(),
        ],
        cwd: Some(dir.display().to_string()),
        env: BTreeMap::from([("EXTRA".to_string(), "x y".to_string())]),
        timeout_ms: Some(10_000),
    };
    let Outcome::Succeeded { result, .. } = exec(&spec, &ctx()).await else {
        panic!("shell failed")
    };
    let pwd = std::fs::canonicalize(&dir).unwrap();
    assert_eq!(
        result["stdout"],
        format!("v1.2.3 b9 7 42 2 x y\n{}\n", pwd.display())
    );
    assert_eq!(result["stderr"], "warn\n");
    assert_eq!(result["exit_code"], 0);
    assert_eq!(
        result["truncated"],
        json!({"stdout": false, "stderr": false})
    );
    assert!(result["duration_ms"].is_u64());
}

#[tokio::test]
async fn shell_nonzero_exit_and_signal() {
    let out = exec(&shell(&["sh", "-c", "echo oops >&2; exit 3"], None), &ctx()).await;
    let Outcome::Failed { error, result } = out else {
        panic!("expected failure: {out:?}")
    };
    assert_eq!(error, "exit status 3");
    assert_eq!(result["exit_code"], 3);
    assert_eq!(result["stderr"], "oops\n");

    let out = exec(&shell(&["sh", "-c", "kill -9 $$"], None), &ctx()).await;
    let Outcome::Failed { error, result } = out else {
        panic!("expected failure: {out:?}")
    };
    assert_eq!(error, "killed by signal 9");
    assert_eq!(result["exit_code"], Value::Null);
    assert_eq!(result["signal"], 9);
}

#[tokio::test]
async fn shell_missing_program() {
    let out = exec(&shell(&["./no-such-script.sh", "arg"], None), &ctx()).await;
    let Outcome::Failed { error, .. } = out else {
        panic!("expected failure: {out:?}")
    };
    assert_eq!(
        error,
        "cannot start ./no-such-script.sh: No such file or directory"
    );
    let out = exec(&shell(&[], None), &ctx()).await;
    assert!(matches!(out, Outcome::Failed { .. }), "{out:?}");
}

/// A bare program name is looked up on the step's own PATH as exec would: the first
/// executable of that name (a plain file of that name before it is passed over), in a
/// relative entry from the step's working directory.
#[tokio::test]
async fn shell_finds_the_program_on_the_steps_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("path");
    let (plain, tools, work) = (dir.join("plain"), dir.join("tools"), dir.join("work"));
    for d in [&plain, &tools, &work.join("bin")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(plain.join("say-hi"), "#!/bin/sh\necho not me\n").unwrap();
    for script in [tools.join("say-hi"), work.join("bin/say-rel")] {
        std::fs::write(&script, "#!/bin/sh\necho \"hi from $0\"\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let step_path = format!("{}:{}:bin:/usr/bin:/bin", plain.display(), tools.display());
    let with_path = |program: &str| StepSpec::Shell {
        run: vec![program.into()],
        cwd: Some(work.display().to_string()),
        env: BTreeMap::from([("PATH".to_string(), step_path.clone())]),
        timeout_ms: Some(10_000),
    };
    let Outcome::Succeeded { result, .. } = exec(&with_path("say-hi"), &ctx()).await else {
        panic!("say-hi was not found on the step's PATH")
    };
    // A script's $0 is the path it was found at.
    assert_eq!(
        result["stdout"],
        format!("hi from {}\n", tools.join("say-hi").display())
    );
    let Outcome::Succeeded { result, .. } = exec(&with_path("say-rel"), &ctx()).await else {
        panic!("say-rel was not found through the relative PATH entry")
    };
    assert_eq!(
        result["stdout"],
        format!("hi from {}\n", work.join("bin/say-rel").display())
    );
    let Outcome::Failed { error, .. } = exec(&with_path("no-such-tool"), &ctx()).await else {
        panic!("a missing program ran")
    };
    assert_eq!(
        error,
        "cannot start no-such-tool: No such file or directory"
    );
}

#[tokio::test]
async fn shell_arguments_are_literal() {
    let spec = shell(&["printf", "%s", "a; rm -rf / $(id) `id` > x"], None);
    let Outcome::Succeeded { result, .. } = exec(&spec, &ctx()).await else {
        panic!("printf failed")
    };
    assert_eq!(result["stdout"], "a; rm -rf / $(id) `id` > x");
}

#[tokio::test]
async fn shell_timeout_kills_the_whole_group() {
    let dir = scratch_dir("timeout");
    let pidfile = dir.join("pid");
    let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let t = Instant::now();
    let out = exec(&shell(&["sh", "-c", &script], Some(1000)), &ctx()).await;
    let Outcome::Failed { error, result } = out else {
        panic!("expected timeout: {out:?}")
    };
    assert_eq!(error, "timed out after 1s");
    assert_eq!(result["signal"], 9);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let grandchild = read_pid(&pidfile).await;
    assert!(
        wait_gone(grandchild).await,
        "grandchild sleep {grandchild} survived"
    );
}

#[tokio::test]
async fn shell_default_timeout_applies() {
    let mut c = ctx();
    c.default_timeout = Some(Duration::from_millis(300));
    let out = exec(&shell(&["sleep", "60"], None), &c).await;
    assert!(
        matches!(&out, Outcome::Failed { error, .. } if error == "timed out after 300ms"),
        "{out:?}"
    );
}

#[tokio::test]
async fn shell_cancel_kills_the_process() {
    let dir = scratch_dir("cancel");
    let pidfile = dir.join("pid");
    let script = format!("echo $$ > {}; exec sleep 60", pidfile.display());
    let c = ctx();
    let cancel = c.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let t = Instant::now();
    let out = exec(&shell(&["sh", "-c", &script], None), &c).await;
    assert!(matches!(out, Outcome::Cancelled { .. }), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let pid = read_pid(&pidfile).await;
    assert!(wait_gone(pid).await, "sleep {pid} survived the cancel");
}

#[tokio::test]
async fn shell_dropped_future_kills_the_group() {
    let dir = scratch_dir("dropped");
    let pidfile = dir.join("pid");
    let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let spec = shell(&["sh", "-c", &script], None);
    let task = tokio::spawn(async move { Executors::new().execute(&spec, &ctx()).await });
    let grandchild = read_pid(&pidfile).await;
    task.abort();
    assert!(
        wait_gone(grandchild).await,
        "grandchild sleep {grandchild} survived the abort"
    );
}

#[tokio::test]
async fn shell_leftover_holding_the_pipe_is_killed_after_exit() {
    let dir = scratch_dir("leftover");
    let pidfile = dir.join("pid");
    let script = format!("sleep 60 & echo $! > {}; echo done", pidfile.display());
    let t = Instant::now();
    let out = exec(&shell(&["sh", "-c", &script], None), &ctx()).await;
    let Outcome::Succeeded { result, .. } = out else {
        panic!("expected success: {out:?}")
    };
    assert_eq!(result["stdout"], "done\n");
    assert!(t.elapsed() < Duration::from_secs(10));
    let pid = read_pid(&pidfile).await;
    assert!(wait_gone(pid).await, "leftover sleep {pid} survived");
}

/// The main process has exited but a leftover still holds the pipes: a cancel in that
/// grace period kills the group at once and the attempt ends cancelled, not with the
/// main process's exit status.
#[tokio::test]
async fn shell_cancel_is_honoured_while_leftovers_hold_the_pipes() {
    let dir = scratch_dir("drain-cancel");
    let (main, leftover) = (dir.join("main"), dir.join("leftover"));
    let script = format!(
        "sleep 60 & echo $! > {}; echo $$ > {}; exit 1",
        leftover.display(),
        main.display()
    );
    let spec = shell(&["sh", "-c", &script], None);
    let c = ctx();
    let cancel = c.cancel.clone();
    let task = tokio::spawn(async move { Executors::new().execute(&spec, &c).await });
    let (main, leftover) = (read_pid(&main).await, read_pid(&leftover).await);
    // Reaped (not just a zombie): the executor has seen the exit and is draining.
    let reaped = async {
        while std::path::Path::new(&format!("/proc/{main}")).exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), reaped)
        .await
        .expect("the main process was never reaped");
    cancel.cancel();
    let out = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("executor hung")
        .expect("executor panicked");
    assert!(matches!(out, Outcome::Cancelled { .. }), "{out:?}");
    assert!(
        wait_gone(leftover).await,
        "leftover sleep {leftover} survived"
    );
}

/// Without a `cwd` a step runs in a private directory of its own, removed afterwards.
#[tokio::test]
async fn shell_runs_in_a_private_directory_removed_afterwards() {
    let daemon_dir = std::env::current_dir().unwrap();
    let spec = shell(&["sh", "-c", "pwd; touch left-behind; ls -ld ."], None);
    let Outcome::Succeeded { result, .. } = exec(&spec, &ctx()).await else {
        panic!("shell failed")
    };
    let stdout = result["stdout"].as_str().unwrap();
    let mut lines = stdout.lines();
    let dir = PathBuf::from(lines.next().unwrap());
    assert_ne!(dir, daemon_dir);
    assert!(
        dir.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("opsloop-step-42-2-")),
        "{stdout}"
    );
    assert!(lines.next().unwrap().starts_with("drwx------"), "{stdout}");
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[tokio::test]
async fn shell_huge_output_keeps_the_tail() {
    let script = "head -c 5000000 /dev/zero | tr '\\000' a; printf END; \
                  head -c 3000000 /dev/zero | tr '\\000' b >&2; printf é>&2";
    let out = exec(&shell(&["sh", "-c", script], Some(30_000)), &ctx()).await;
    let Outcome::Succeeded { result, .. } = out else {
        panic!("expected success: {out:?}")
    };
    let stdout = result["stdout"].as_str().unwrap();
    let stderr = result["stderr"].as_str().unwrap();
    assert_eq!(stdout.len(), 16 * 1024);
    assert!(stdout.ends_with("aaaEND"));
    assert!(stderr.len() <= 16 * 1024 && stderr.ends_with("bbé"));
    assert_eq!(result["truncated"], json!({"stdout": true, "stderr": true}));
}

// ---- http ----

async fn server() -> String {
    let app = Router::new()
        .route("/ok", get(|| async { "hello" }))
        .route(
            "/status/{code}",
            get(|Path(code): Path<u16>| async move { StatusCode::from_u16(code).unwrap() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                "late"
            }),
        )
        .route(
            "/echo",
            post(|headers: HeaderMap, Json(body): Json<Value>| async move {
                let header = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(String::from)
                };
                Json(json!({
                    "got": body,
                    "token": header("x-token"),
                    "content_type": header("content-type"),
                }))
            }),
        )
        .route(
            "/raw",
            post(|body: String| async move { format!("raw:{body}") }),
        )
        .route("/big", get(|| async { "b".repeat(100_000) + "TAIL" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn http(method: &str, url: String) -> StepSpec {
    StepSpec::Http {
        method: method.into(),
        url,
        headers: BTreeMap::new(),
        json: None,
        body: None,
        expect: vec![],
        timeout_ms: Some(10_000),
    }
}

#[tokio::test]
async fn http_success_and_big_body() {
    let base = server().await;
    let Outcome::Succeeded { result, .. } = exec(&http("get", format!("{base}/ok")), &ctx()).await
    else {
        panic!("GET /ok failed")
    };
    assert_eq!(result["status"], 200);
    assert_eq!(result["body"], "hello");
    assert!(result["duration_ms"].is_u64());

    let Outcome::Succeeded { result, .. } = exec(&http("GET", format!("{base}/big")), &ctx()).await
    else {
        panic!("GET /big failed")
    };
    let body = result["body"].as_str().unwrap();
    assert_eq!(body.len(), 16 * 1024);
    assert!(body.ends_with("bbTAIL"));
    assert_eq!(result["truncated"], true);

    let StepSpec::Http {
        method, url, body, ..
    } = http("POST", format!("{base}/raw"))
    else {
        unreachable!()
    };
    let raw = StepSpec::Http {
        method,
        url,
        headers: BTreeMap::new(),
        json: None,
        body: Some("plain text".into()).or(body),
        expect: vec![200],
        timeout_ms: None,
    };
    let Outcome::Succeeded { result, .. } = exec(&raw, &ctx()).await else {
        panic!("POST /raw failed")
    };
    assert_eq!(result["body"], "raw:plain text");
}

#[tokio::test]
async fn http_json_body_is_echoed() {
    let base = server().await;
    let spec = StepSpec::Http {
        method: "POST".into(),
        url: format!("{base}/echo"),
        headers: BTreeMap::from([("X-Token".to_string(), "t0k".to_string())]),
        json: Some(json!({"tag": "v1.2.3", "n": 1})),
        body: None,
        expect: vec![200, 201],
        timeout_ms: None,
    };
    let Outcome::Succeeded { result, .. } = exec(&spec, &ctx()).await else {
        panic!("POST /echo failed")
    };
    let echoed: Value = serde_json::from_str(result["body"].as_str().unwrap()).unwrap();
    assert_eq!(echoed["got"], json!({"tag": "v1.2.3", "n": 1}));
    assert_eq!(echoed["token"], "t0k");
    assert_eq!(echoed["content_type"], "application/json");
}

#[tokio::test]
async fn http_unexpected_status() {
    let base = server().await;
    let out = exec(&http("GET", format!("{base}/status/503")), &ctx()).await;
    let Outcome::Failed { error, result } = out else {
        panic!("expected failure: {out:?}")
    };
    assert_eq!(error, "HTTP 503 (expected 2xx)");
    assert_eq!(result["status"], 503);

    let StepSpec::Http { method, url, .. } = http("GET", format!("{base}/status/204")) else {
        unreachable!()
    };
    let spec = StepSpec::Http {
        method,
        url,
        headers: BTreeMap::new(),
        json: None,
        body: None,
        expect: vec![200],
        timeout_ms: None,
    };
    let out = exec(&spec, &ctx()).await;
    assert!(
        matches!(&out, Outcome::Failed { error, .. } if error == "HTTP 204 (expected 200)"),
        "{out:?}"
    );
}

#[tokio::test]
async fn http_timeout_and_cancel() {
    let base = server().await;
    let StepSpec::Http { method, url, .. } = http("GET", format!("{base}/slow")) else {
        unreachable!()
    };
    let spec = StepSpec::Http {
        method,
        url,
        headers: BTreeMap::new(),
        json: None,
        body: None,
        expect: vec![],
        timeout_ms: Some(500),
    };
    let t = Instant::now();
    let out = exec(&spec, &ctx()).await;
    assert!(
        matches!(&out, Outcome::Failed { error, .. } if error == "timed out after 500ms"),
        "{out:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));

    let c = ctx();
    let cancel = c.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel();
    });
    let out = exec(&http("GET", format!("{base}/slow")), &c).await;
    assert!(matches!(out, Outcome::Cancelled { .. }), "{out:?}");
}

#[tokio::test]
async fn http_connection_error_hides_secrets() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let spec = StepSpec::Http {
        method: "POST".into(),
        url: format!("http://user:pa55word@{addr}/hook?key=qs-secret"),
        headers: BTreeMap::from([("Authorization".to_string(), "Bearer s3cret".to_string())]),
        json: Some(json!({})),
        body: None,
        expect: vec![],
        timeout_ms: Some(5000),
    };
    let out = exec(&spec, &ctx()).await;
    let Outcome::Failed { error, result } = out else {
        panic!("expected failure: {out:?}")
    };
    assert!(error.starts_with("connection failed"), "{error}");
    assert!(!error.contains('\n'));
    let all = format!("{error} {result}");
    for secret in ["s3cret", "pa55word", "qs-secret"] {
        assert!(!all.contains(secret), "{all}");
    }
    let bad_header = StepSpec::Http {
        method: "GET".into(),
        url: format!("http://{addr}/"),
        headers: BTreeMap::from([("Authorization".to_string(), "Bearer s3cret\n".to_string())]),
        json: None,
        body: None,
        expect: vec![],
        timeout_ms: None,
    };
    let out = exec(&bad_header, &ctx()).await;
    assert!(
        matches!(&out, Outcome::Failed { error, .. } if !error.contains("s3cret")),
        "{out:?}"
    );
}

#[test]
fn backoff_grows_and_caps() {
    let base = Duration::from_secs(1);
    let max = Duration::from_secs(300);
    for _ in 0..200 {
        for (attempt, secs) in [(0u32, 1u64), (1, 1), (2, 2), (3, 4), (4, 8), (9, 256)] {
            let d = backoff_delay(attempt, base, max);
            let low = Duration::from_secs(secs);
            assert!(d >= low && d <= low + low / 4, "attempt {attempt}: {d:?}");
        }
        for attempt in [10, 20, 64, 1000, u32::MAX] {
            let d = backoff_delay(attempt, base, max);
            assert!(d >= max && d <= max + max / 4, "attempt {attempt}: {d:?}");
        }
        let d = backoff_delay(u32::MAX, Duration::MAX, Duration::MAX);
        assert!(d >= Duration::MAX / 2);
        assert_eq!(backoff_delay(5, Duration::ZERO, max), Duration::ZERO);
    }
    let samples: Vec<Duration> = (0..50).map(|_| backoff_delay(3, base, max)).collect();
    assert!(samples.iter().any(|d| *d != samples[0]), "no jitter");
}

#[tokio::test]
async fn shell_output_files_are_checked() {
    let cases = [
        (
            "printf 'a=1\\nb=x=y\\n' > \"$OPSLOOP_OUTPUT\"",
            Ok(serde_json::json!({"a": "1", "b": "x=y"})),
        ),
        (
            "echo '{\"n\": 7}' > \"$OPSLOOP_OUTPUT\"",
            Ok(serde_json::json!({"n": 7})),
        ),
        ("true", Ok(serde_json::json!({}))),
        (
            "head -c 70000 /dev/zero | tr '\\0' a > \"$OPSLOOP_OUTPUT\"",
            Err("more than 65536"),
        ),
        (
            "head -c 100 /dev/urandom > \"$OPSLOOP_OUTPUT\"; printf '\\377' >> \"$OPSLOOP_OUTPUT\"",
            Err(""),
        ),
        ("echo '[1]' > \"$OPSLOOP_OUTPUT\"", Err("JSON array")),
        (
            "printf 'x' | head -c 1 > /dev/null; awk 'BEGIN{for(i=0;i<10000;i++) printf \"[\"}' > \"$OPSLOOP_OUTPUT\"",
            Err(""),
        ),
        (
            "echo 'not a pair' > \"$OPSLOOP_OUTPUT\"",
            Err("not key=value"),
        ),
        ("rm \"$OPSLOOP_OUTPUT\"", Err("cannot read the output file")),
    ];
    for (script, want) in cases {
        let out = exec(&shell(&["sh", "-c", script], Some(20_000)), &ctx()).await;
        match (want, out) {
            (Ok(expected), Outcome::Succeeded { output, .. }) => {
                assert_eq!(output, expected, "{script}")
            }
            (Err(why), Outcome::Failed { error, .. }) => {
                assert!(error.contains(why), "{script}: {error}")
            }
            (want, other) => panic!("{script}: wanted {want:?}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn progress_lines_keep_only_the_latest_and_ignore_the_malformed() {
    let (sender, receiver) = tokio::sync::watch::channel(None);
    let mut c = ctx();
    c.progress = Some(std::sync::Arc::new(sender));
    let script = "i=0; while [ $i -lt 3000 ]; do echo \"::progress $((i % 100)) line $i\"; i=$((i+1)); done; \
                  echo '::progress 100 done'; echo '::progress 101 too much'; echo '::progressx 5 y'; echo 'plain'";
    let out = exec(&shell(&["sh", "-c", script], Some(30_000)), &c).await;
    assert!(matches!(out, Outcome::Succeeded { .. }), "{out:?}");
    let last = receiver.borrow().clone().expect("progress");
    assert_eq!((last.percent, last.text.as_str()), (100, "done"));
    let Outcome::Succeeded { result, .. } = out else {
        unreachable!()
    };
    assert!(result["stdout"].as_str().unwrap_or("").ends_with("plain\n"));
}
