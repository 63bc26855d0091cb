//! The command line as users run it: the real binary against a real database
//! (issue 2, "Done when" 3). Bad input gets one clear line, the right exit code, and
//! changes nothing.

mod support;

use support::{
    TestDb, apply_policy, opsloop, opsloop_cmd, path_str, stderr, stdout, test_db, write_temp,
};

/// Rows in every table that a refused command must leave alone.
async fn snapshot(db: &TestDb) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "ops_mission_proposals",
        "ops_proposal_approvals",
        "ops_missions",
        "ops_mission_steps",
        "ops_agent_events",
        "ops_users",
    ] {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&db.pool)
            .await
            .expect("count");
        counts.push(n);
    }
    counts
}

/// Run `args`, expect `code` and an error line containing `words`, and no change.
async fn refused(db: &TestDb, args: &[&str], code: i32, words: &str) {
    let before = snapshot(db).await;
    let out = opsloop(&db.url, args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(
        err.contains(words),
        "{args:?}: expected {words:?} in {err:?}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with('{')).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one clear line, got {err:?}");
    assert_eq!(snapshot(db).await, before, "{args:?} changed something");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_one_line_and_exit_code_2() {
    let db = test_db().await;
    apply_policy(&db).await;
    refused(&db, &["propose", "nope"], 2, "unknown template \"nope\"").await;
    refused(&db, &["propose", "deploy"], 2, "param tag").await;
    refused(
        &db,
        &["propose", "deploy", "tag=v1.2.3", "extra=1"],
        2,
        "extra",
    )
    .await;
    refused(
        &db,
        &["propose", "deploy", "tag=1.2"],
        2,
        "release tag, e.g. v1.4.2",
    )
    .await;
    refused(&db, &["propose", "deploy", "tag"], 2, "not key=value").await;
    refused(&db, &["propose", "deploy", "=v1"], 2, "not a param name").await;
    refused(
        &db,
        &["propose", "deploy", "tag=v1.2.3", "tag=v1.2.4"],
        2,
        "given twice",
    )
    .await;
    refused(
        &db,
        &["propose", "deploy", "tag=v1.2.3; rm -rf /"],
        2,
        "does not match",
    )
    .await;
    refused(
        &db,
        &["propose", "hello", "name=$(reboot)"],
        2,
        "does not match",
    )
    .await;
    refused(&db, &["approve", "abc"], 2, "not a proposal id").await;
    refused(&db, &["approve", "-5"], 2, "").await;
    refused(&db, &["approve", "424242"], 2, "no proposal #424242").await;
    refused(&db, &["reject", "1x"], 2, "not a proposal id").await;
    refused(&db, &["cancel", "seven"], 2, "not a mission id").await;
    refused(&db, &["cancel", "77"], 2, "no mission #77").await;
    refused(&db, &["mission", "0"], 2, "not a mission id").await;
    refused(&db, &["emit", "Bad Kind"], 2, "not valid").await;
    refused(
        &db,
        &["emit", "ok.kind", "--payload", "{nope"],
        2,
        "not valid JSON",
    )
    .await;
    refused(
        &db,
        &["emit", "ok.kind", "--payload", "[1]"],
        2,
        "JSON object",
    )
    .await;
    refused(
        &db,
        &["users", "grant", "12x", "admin"],
        2,
        "not a Telegram user id",
    )
    .await;
    refused(&db, &["users", "grant", "12", "boss"], 2, "unknown role").await;
    refused(&db, &["frobnicate"], 2, "unrecognized subcommand").await;
    refused(
        &db,
        &["missions", "--status", "weird"],
        2,
        "unknown mission status",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn decided_proposals_are_refused_with_exit_3_and_who_decided() {
    let db = test_db().await;
    apply_policy(&db).await;
    let out = opsloop(
        &db.url,
        &["propose", "deploy", "tag=v1.2.3", "--as", "ann", "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let proposed: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    for key in ["id", "status", "mission_id", "reason"] {
        assert!(
            proposed.get(key).is_some(),
            "propose --json has {key}: {proposed}"
        );
    }
    assert_eq!(proposed["status"], "pending");
    let id = proposed["id"].to_string();
    let out = opsloop(
        &db.url,
        &["reject", &id, "--as", "bob", "--reason", "not now"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    refused(
        &db,
        &["approve", &id, "--as", "carol"],
        3,
        "already rejected (by bob",
    )
    .await;
    // The dedupe gate: exit 3 and the existing id.
    let first = opsloop(&db.url, &["propose", "deploy", "tag=v2.0.0", "--json"]);
    let first: serde_json::Value = serde_json::from_str(&stdout(&first)).expect("json");
    let dup = opsloop(&db.url, &["propose", "deploy", "tag=v2.0.0", "--json"]);
    assert_eq!(dup.status.code(), Some(3));
    let dup: serde_json::Value = serde_json::from_str(&stdout(&dup)).expect("json");
    assert_eq!(dup["status"], "rejected");
    assert_eq!(dup["existing_id"], first["id"]);
    assert!(
        dup["reason"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("#{}", first["id"]))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_happy_path_prints_what_happened() {
    let db = test_db().await;
    let file = write_temp("cli-policy.toml", support::POLICY);
    let out = opsloop(&db.url, &["policy", "apply", path_str(&file)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = opsloop(&db.url, &["propose", "hello", "name=ada"]);
    assert!(
        stdout(&out).contains("proposal #1 approved: mission #1 started"),
        "{}",
        stdout(&out)
    );
    let out = opsloop(&db.url, &["mission", "1", "--json"]);
    let m: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(m["id"], 1);
    assert_eq!(m["status"], "running");
    assert_eq!(m["template"], "hello");
    let step = &m["steps"][0];
    for key in ["seq", "name", "kind", "status", "attempts"] {
        assert!(step.get(key).is_some(), "step has {key}: {step}");
    }
    let out = opsloop(&db.url, &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(s["paused"], false);
    assert_eq!(opsloop(&db.url, &["pause"]).status.code(), Some(0));
    let s: serde_json::Value =
        serde_json::from_str(&stdout(&opsloop(&db.url, &["status", "--json"]))).expect("json");
    assert_eq!(s["paused"], true);
    let out = opsloop(&db.url, &["events", "--json"]);
    let events: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let kinds: Vec<&str> = events
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "policy.applied",
            "proposal.created",
            "proposal.approved",
            "mission.started",
            "system.paused"
        ]
    );
    let out = opsloop(&db.url, &["users", "grant", "42", "approver"]);
    assert_eq!(out.status.code(), Some(0));
    let out = opsloop(&db.url, &["users", "list", "--json"]);
    assert!(
        stdout(&out).contains("\"role\":\"approver\""),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_policy_with_several_errors_lists_them_all_with_locations() {
    let file = write_temp(
        "bad-policy.toml",
        r#"[gates]
max_pendin = 3

[worker]
lease = "five minutes"

[templates.deploy]
risk = "hgih"
params.tag = { pattern = '^v(\d+$', help = "tag" }
steps = [ { name = "b", kind = "shell", run = ["x", "{tagg}"] } ]

[[triggers]]
name = "t"
cron = "61 * * * *"
propose = "ghost"
"#,
    );
    let out = opsloop_cmd(None)
        .args(["policy", "check", path_str(&file)])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    for (line, words) in [
        (2, "max_pendin"),
        (5, "five minutes"),
        (8, "hgih"),
        (9, "pattern"),
        (10, "tagg"),
        (14, "cron"),
        (15, "ghost"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!(".toml:{line}:")) && l.contains(words)),
            "expected a problem on line {line} about {words:?} in:\n{err}"
        );
    }
    // `policy apply` refuses it too, and stores nothing.
    assert!(err.contains("problem"));
}

/// Names as people type them: one person whatever the case, width or spaces.
#[tokio::test(flavor = "multi_thread")]
async fn dual_control_is_not_fooled_by_how_a_name_is_spelled() {
    let db = test_db().await;
    apply_policy(&db).await;
    let out = opsloop(
        &db.url,
        &["propose", "wipe", "target=cache", "--as", "alice", "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let proposed: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(proposed["status"], "pending");
    let id = proposed["id"].to_string();
    for me in [
        "Alice",
        " ALICE",
        "alice\u{a0}",
        "\u{ff41}\u{ff4c}\u{ff49}\u{ff43}\u{ff45}",
    ] {
        refused(&db, &["approve", &id, "--as", me], 3, "proposed by you").await;
    }
    for (me, says) in [
        (
            "",
            "--as NAME must be 1 to 64 printable characters (it is empty)",
        ),
        ("   ", "(it is empty)"),
        ("bo\u{7}b", "U+0007 is a control character"),
        ("b\u{200b}ob", "U+200B is an invisible formatting character"),
    ] {
        refused(&db, &["approve", &id, "--as", me], 2, says).await;
    }
    let out = opsloop(&db.url, &["approve", &id, "--as", "Bob"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("1/2 approvals"), "{}", stdout(&out));
    let out = opsloop(&db.url, &["approve", &id, "--as", "BOB "]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("you already approved"),
        "{}",
        stdout(&out)
    );
    let out = opsloop(&db.url, &["approve", &id, "--as", "carol"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("approved: mission"),
        "{}",
        stdout(&out)
    );
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT actor FROM ops_proposal_approvals WHERE proposal_id = $1 ORDER BY id",
    )
    .bind(proposed["id"].as_i64().expect("id"))
    .fetch_all(&db.pool)
    .await
    .expect("approvals");
    assert_eq!(actors, ["bob", "carol"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approval_over_a_cap_is_refused_with_exit_3_and_the_proposal_waits() {
    let db = test_db().await;
    let source = format!(
        "{}{}",
        support::POLICY,
        r#"
[gates.templates.one_at_a_time]
max_running = 1

[templates.one_at_a_time]
risk = "high"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "s", kind = "noop" } ]
"#
    );
    opsloop::store::policy::apply(&db.pool, &source, "test")
        .await
        .expect("apply");
    for n in ["1", "2"] {
        let out = opsloop(&db.url, &["propose", "one_at_a_time", &format!("n={n}")]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(stdout(&out).contains("pending"), "{}", stdout(&out));
    }
    let out = opsloop(&db.url, &["approve", "1", "--as", "bob"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    refused(
        &db,
        &["approve", "2", "--as", "bob"],
        3,
        "proposal #2 stays pending: 1 missions of one_at_a_time are running (max_running = 1)",
    )
    .await;
    let status: String =
        sqlx::query_scalar("SELECT status FROM ops_mission_proposals WHERE id = 2")
            .fetch_one(&db.pool)
            .await
            .expect("status");
    assert_eq!(status, "pending");
}

#[tokio::test(flavor = "multi_thread")]
async fn nul_characters_in_json_or_policy_strings_are_bad_input() {
    let db = test_db().await;
    apply_policy(&db).await;
    refused(
        &db,
        &["emit", "ok.kind", "--payload", r#"{"note":"a\u0000b"}"#],
        2,
        r"payload.note contains \u0000 (a NUL character), which cannot be stored",
    )
    .await;
    refused(
        &db,
        &[
            "emit",
            "ok.kind",
            "--payload",
            r#"{"deep":[{"k\u0000":1}]}"#,
        ],
        2,
        r"the key payload.deep[0]",
    )
    .await;
    let file = write_temp(
        "nul-policy.toml",
        &support::POLICY.replace(
            "description = \"Say hello\"",
            "description = \"Say \\u0000hello\"",
        ),
    );
    // And in a key of a step's JSON, which would be stored when the step runs.
    let key_file = write_temp(
        "nul-key-policy.toml",
        &format!(
            "{}{}",
            support::POLICY,
            r#"
[templates.tell]
risk = "low"
steps = [ { name = "t", kind = "emit", event = "told", payload = { "k\u0000" = "v" } } ]
"#
        ),
    );
    for (file, at) in [
        (&file, "templates.hello.description"),
        (&key_file, "templates.tell.steps[0].payload"),
    ] {
        for command in ["check", "apply"] {
            let out = opsloop(&db.url, &["policy", command, path_str(file)]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "policy {command}: {err}");
            assert!(
                err.contains(at) && err.contains(r"\u0000 (a NUL character)"),
                "policy {command}: {err}"
            );
            assert!(
                !err.contains('\0'),
                "the message itself holds no NUL: {err:?}"
            );
        }
    }
    let version: i64 = sqlx::query_scalar(
        "SELECT (value->>'version')::bigint FROM ops_policy WHERE key = 'policy'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("version");
    assert_eq!(version, 1, "the bad policy was not stored");
}

/// opsloop's own event kinds drive reactions and notifications: `emit mission.failed`
/// would fake a failure (and fire a rollback). Refused, nothing stored.
#[tokio::test]
async fn opsloops_own_event_kinds_cannot_be_emitted() {
    let db = test_db().await;
    support::apply_policy(&db).await;
    for kind in [
        "mission.failed",
        "proposal.approved",
        "step.succeeded",
        "system.paused",
    ] {
        refused(&db, &["emit", kind], 2, "reserved").await;
    }
    let out = opsloop(&db.url, &["emit", "deploy.done"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// A report cut short by its reader (`opsloop events | head -1`) ends quietly, as `cat`
/// does, instead of panicking about the broken pipe.
#[tokio::test]
async fn a_report_whose_reader_leaves_ends_without_a_panic() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let db = test_db().await;
    // Far more than a pipe's buffer (64 KiB) of events.
    sqlx::query(
        "INSERT INTO ops_agent_events (kind, source, payload, processed_at)
         SELECT 'soak.ping', 'cli', jsonb_build_object('filler', repeat('x', 200)), now()
         FROM generate_series(1, 3000)",
    )
    .execute(&db.pool)
    .await
    .expect("events");
    let mut child = opsloop_cmd(Some(&db.url))
        .args(["events", "--limit", "3000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut first = [0u8; 64];
    let mut out = child.stdout.take().expect("stdout");
    out.read_exact(&mut first).expect("the first bytes");
    drop(out);
    let done = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        done.status.success() || done.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {err}",
        done.status
    );
}
