use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use super::*;

const EXAMPLE: &str = r#"
[approval]
ttl = "24h"                    # pending proposals expire after this
auto_approve = ["low"]
high = { approvals = 1, self_approval = true }
red  = { approvals = 2, self_approval = false }   # two distinct people, not the proposer

[gates]
max_pending = 50
pause_after_failures = 2

[gates.templates.tweet]
daily_cap = 10
cooldown = "30m"
max_running = 1

[worker]
concurrency = 4
lease = "5m"
max_attempts = 3
backoff = { base = "1s", max = "5m" }

[heartbeat]
interval = "15s"
event_batch = 100
reaction_batch = 50

[notify]
chats = [-1001234567890]
events = ["proposal.*", "mission.*", "step.failed"]

[retention]
events = "30d"
batch = 500

[templates.deploy]
description = "Deploy a tagged release"
risk = "high"                  # low | high | red
params.tag = { pattern = '^v\d+\.\d+\.\d+$', help = "release tag, e.g. v1.4.2" }
steps = [
  { name = "build",  kind = "shell", run = ["./scripts/build.sh", "{tag}"], timeout = "10m" },
  { name = "ping",   kind = "http",  method = "POST", url = "http://127.0.0.1:9000/deployed", json = { tag = "{tag}" } },
]

[templates.rollback]
risk = "red"
params.tag = { pattern = 'v\d+\.\d+\.\d+', help = "tag to roll back to" }
steps = [{ name = "rollback", kind = "shell", run = ["./scripts/rollback.sh", "{tag}"], env = { TAG = "{tag}" } }]

[templates.digest]
risk = "low"
[[templates.digest.steps]]
name = "wait"
kind = "sleep"
for = "2s"
[[templates.digest.steps]]
name = "announce"
kind = "emit"
event = "digest.ready"
payload = { ok = true }
max_attempts = 1

[templates.tweet]
description = "Post a tweet"
risk = "low"
params.text = { pattern = '.{1,280}', help = "tweet text" }
params.lang = { pattern = '[a-z]{2}', help = "language", default = "en" }
steps = [{ name = "post", kind = "http", method = "post", url = "https://api.example.com/tweet", body = "{text}", expect = [200, 201], headers = { "Content-Language" = "{lang}" } }]

[[reactions]]
name = "rollback-failed-deploy"
on = "mission.failed"          # event kind; `*` wildcards allowed
where = { template = "deploy" }   # subset match on the event payload
propose = "rollback"
params = { tag = "{payload.params.tag}" }
cooldown = "1h"
probability = 1.0

[[triggers]]
name = "morning-digest"
cron = "0 9 * * *"
tz = "UTC"
propose = "digest"

[[triggers]]
name = "weekly-tweet"
cron = "0 30 8 * * MON"
tz = "Europe/Berlin"
propose = "tweet"
params = { text = "weekly update" }
"#;

fn parse_ok(src: &str) -> Policy {
    match parse(src) {
        Ok(p) => p,
        Err(problems) => {
            let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
            panic!("unexpected problems:\n{}", lines.join("\n"));
        }
    }
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_documented_example_parses() {
    let p = parse_ok(EXAMPLE);
    assert_eq!(p.approval.ttl, Duration::from_secs(86_400));
    assert!(p.approval.auto_approves(Risk::Low) && !p.approval.auto_approves(Risk::High));
    assert_eq!(
        p.approval.rule(Risk::Red),
        TierRule {
            approvals: 2,
            self_approval: false
        }
    );
    assert_eq!(p.approval.rule(Risk::Low), TierRule::LOW);
    let tweet = p.template_gates("tweet");
    assert_eq!(tweet.daily_cap, Some(10));
    assert_eq!(tweet.cooldown, Some(Duration::from_secs(1800)));
    assert_eq!(p.notify.chats, vec![-1001234567890]);
    assert_eq!(p.retention.events, Some(Duration::from_secs(30 * 86_400)));
    assert_eq!(p.retention.missions, None);
    assert_eq!(p.retention.batch, 500);

    let deploy = p.template("deploy").expect("deploy");
    assert_eq!(deploy.risk, Risk::High);
    assert_eq!(deploy.steps.len(), 2);
    match &deploy.steps[0].spec {
        StepSpec::Shell {
            run, timeout_ms, ..
        } => {
            assert_eq!(run, &["./scripts/build.sh", "{tag}"]);
            assert_eq!(*timeout_ms, Some(600_000));
        }
        other => panic!("{other:?}"),
    }
    match &deploy.steps[1].spec {
        StepSpec::Http { method, json, .. } => {
            assert_eq!(method, "POST");
            assert_eq!(json, &Some(json!({"tag": "{tag}"})));
        }
        other => panic!("{other:?}"),
    }
    let digest = p.template("digest").expect("digest");
    assert_eq!(digest.steps[0].spec, StepSpec::Sleep { for_ms: 2000 });
    assert_eq!(digest.steps[1].max_attempts, Some(1));
    let StepSpec::Http { method, expect, .. } = &p.template("tweet").expect("tweet").steps[0].spec
    else {
        panic!("tweet is http");
    };
    assert_eq!(
        (method.as_str(), expect.as_slice()),
        ("POST", &[200u16, 201][..])
    );

    let r = &p.reactions[0];
    assert_eq!(r.propose.as_str(), "rollback");
    assert_eq!(r.cooldown, Some(Duration::from_secs(3600)));
    let payload = json!({"template": "deploy", "params": {"tag": "v1.2.3"}});
    assert!(r.matches("mission.failed", &payload));
    assert!(!r.matches("mission.failed", &json!({"template": "tweet"})));
    assert!(!r.matches("mission.succeeded", &payload));
    let resolved = r.resolve_params(7, "mission.failed", "opsloop", &payload);
    let rollback = p.template("rollback").expect("rollback");
    assert_eq!(
        rollback.validate_params(&resolved),
        Ok(params(&[("tag", "v1.2.3")]))
    );

    assert_eq!(p.triggers.len(), 2);
    let t = &p.triggers[0];
    assert_eq!(
        (t.cron_source.as_str(), t.tz),
        ("0 9 * * *", chrono_tz::UTC)
    );
    let after = chrono::DateTime::parse_from_rfc3339("2024-05-01T10:00:00Z")
        .expect("time")
        .with_timezone(&chrono::Utc);
    let next = t.next_after(after).expect("next");
    assert_eq!(next.to_rfc3339(), "2024-05-02T09:00:00+00:00");
    let weekly = p.triggers[1].next_after(after).expect("next");
    assert_eq!(weekly.to_rfc3339(), "2024-05-06T06:30:00+00:00"); // 08:30 CEST
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let src = r#"[gates]
max_pendin = 3

[templates.deploy]
risk = "hgih"
params.tag = { pattern = '^v(\d+$', help = "tag" }
steps = [
  { name = "build", kind = "shell", run = ["./build.sh", "{tagg}"], timeout = "10 parsecs" },
  { name = "ping", kind = "http", method = "POST", url = "ftp://x" },
]

[[reactions]]
name = "r"
on = "mission.failed"
propose = "rollbak"
probability = 1.5

[[triggers]]
name = "t"
cron = "61 9 * * *"
tz = "Mars/Olympus"
propose = "deploy"
params = { tag = "v1.2.3; rm -rf /", nope = "x" }
"#;
    let problems = parse(src).expect_err("must fail");
    let got: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.path.as_str())).collect();
    let want = vec![
        (2, "gates.max_pendin"),
        (5, "templates.deploy.risk"),
        (6, "templates.deploy.params.tag.pattern"),
        (8, "templates.deploy.steps[0]"),
        (8, "templates.deploy.steps[0].timeout"),
        (9, "templates.deploy.steps[1].url"),
        (15, "reactions[0].propose"),
        (16, "reactions[0].probability"),
        (20, "triggers[0].cron"),
        (21, "triggers[0].tz"),
        (23, "triggers[0].params.nope"),
    ];
    let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(got, want, "{all:#?}");
    assert_eq!(
        all[0],
        "line 2, column 1: gates.max_pendin: unknown key max_pendin (did you mean max_pending?)"
    );
    assert_eq!(
        all[1],
        "line 5, column 8: templates.deploy.risk: unknown risk \"hgih\" (expected low, high or red)"
    );
    assert!(
        all[3].ends_with("step build uses undeclared param {tagg}"),
        "{}",
        all[3]
    );
    assert_eq!(problems[3].column, 59);
    assert!(
        all[6].contains("unknown template \"rollbak\""),
        "{}",
        all[6]
    );
}

#[test]
fn cross_references_and_shapes() {
    let src = r#"[approval]
auto_approve = ["low", "mid"]
[gates.templates.nope]
daily_cap = 1
[templates.t]
risk = "low"
params.n = { pattern = '\d+' }
params.opt = { pattern = 'a|ab', default = "c" }
steps = []
[templates.u]
risk = "low"
steps = [{ name = "x", kind = "noop" }, { name = "x", kind = "teleport" }, { kind = "http", method = "GET", url = "http://a", json = 1, body = "b" }]
[[triggers]]
name = "t"
cron = "0 9 * * *"
propose = "t"
[[triggers]]
name = "t"
cron = "0 9 * * *"
propose = "u"
[[reactions]]
name = "r"
on = "x.*"
propose = "t"
params = { n = "{payload.n}", opt = "{weird}" }
"#;
    let problems = parse(src).expect_err("must fail");
    let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let expect = [
        "line 2, column 24: approval.auto_approve[1]: unknown risk \"mid\"",
        "line 3, column 18: gates.templates.nope: unknown template \"nope\"",
        "line 8, column 44: templates.t.params.opt.default: default \"c\" does not match a|ab",
        "line 9, column 9: templates.t.steps: a template needs at least one step",
        "templates.u.steps[1].name: duplicate step name \"x\"",
        "templates.u.steps[1].kind: unknown step kind \"teleport\"",
        "templates.u.steps[2].name: missing key name",
        "templates.u.steps[2].body: set json or body, not both",
        "line 13, column 1: triggers[0].params: trigger t does not set required param n of template t",
        "line 18, column 8: triggers[1].name: duplicate trigger name \"t\"",
        "reactions[0].params.opt: unknown placeholder {weird}",
    ];
    for e in expect {
        assert!(
            all.iter().any(|p| p.contains(e)),
            "missing {e:?} in {all:#?}"
        );
    }
    assert_eq!(all.len(), expect.len(), "{all:#?}");
}

#[test]
fn syntax_errors_and_regex_injection() {
    let problems = parse("[gates]\nmax_pending = \n").expect_err("syntax");
    assert_eq!(problems[0].line, 2);
    assert!(problems[0].path.is_empty());
    // `a)(b` must not compile into `^(?:a)(b)$`.
    let src = "[templates.t]\nrisk = \"low\"\nparams.p = { pattern = 'a)(b' }\nsteps = [{ name = \"n\", kind = \"noop\" }]\n";
    let problems = parse(src).expect_err("bad regex");
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].message.starts_with("invalid regex \"a)(b\""),
        "{}",
        problems[0]
    );
    assert!(!problems[0].message.contains('\n'));
    assert!(
        parse("[worker]\nbackoff = { base = \"10m\", max = \"1m\" }\nconcurrency = 0\n").is_err()
    );
}

#[test]
fn trigger_params_are_checked_against_patterns() {
    let src = EXAMPLE.replace(
        "params = { text = \"weekly update\" }",
        "params = { text = \"hi\", lang = \"english; rm -rf /\" }",
    );
    let problems = parse(&src).expect_err("bad trigger param");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].path, "triggers[1].params.lang");
    assert_eq!(
        problems[0].message,
        r#"param lang: "english; rm -rf /" does not match [a-z]{2} (language)"#
    );
}

#[test]
fn param_validation() {
    let p = parse_ok(EXAMPLE);
    let deploy = p.template("deploy").expect("deploy");
    assert_eq!(
        deploy.validate_params(&params(&[("tag", "v1.4.2")])),
        Ok(params(&[("tag", "v1.4.2")]))
    );
    let errs = deploy.validate_params(&params(&[])).expect_err("missing");
    assert_eq!(errs, vec!["param tag: missing (release tag, e.g. v1.4.2)"]);
    let errs = deploy
        .validate_params(&params(&[("tag", "v1.2.3; rm -rf /"), ("extra", "1")]))
        .expect_err("bad");
    assert_eq!(
        errs,
        vec![
            "unknown param extra: template deploy takes tag".to_string(),
            r#"param tag: "v1.2.3; rm -rf /" does not match ^v\d+\.\d+\.\d+$ (release tag, e.g. v1.4.2)"#
                .to_string(),
        ]
    );
    // Unanchored patterns in the file are anchored: no substring matches.
    let rollback = p.template("rollback").expect("rollback");
    assert!(
        rollback
            .validate_params(&params(&[("tag", "v1.2.3; rm -rf /")]))
            .is_err()
    );
    assert!(
        rollback
            .validate_params(&params(&[("tag", "xv1.2.3")]))
            .is_err()
    );
    assert!(
        rollback
            .validate_params(&params(&[("tag", "v1.2.3\n")]))
            .is_err()
    );
    // Defaults are filled; alternations must match in full.
    let tweet = p.template("tweet").expect("tweet");
    assert_eq!(
        tweet.validate_params(&params(&[("text", "hi")])),
        Ok(params(&[("lang", "en"), ("text", "hi")]))
    );
    assert_eq!(
        tweet.params_help(),
        vec![
            "lang — language (default \"en\")",
            "text — tweet text (required)"
        ]
    );
    assert_eq!(
        deploy.params_help(),
        vec!["tag — release tag, e.g. v1.4.2 (required)"]
    );
    let alt = ParamSpec::new("a|ab", "", None).expect("regex");
    assert!(alt.matches("ab") && alt.matches("a") && !alt.matches("abc"));
    assert_eq!(alt.pattern_source(), "a|ab");
    // Substitution after validation keeps a value inside one argv element.
    let steps = deploy.render_steps(&params(&[("tag", "v1.4.2")]));
    let StepSpec::Shell { run, .. } = &steps[0].spec else {
        panic!("shell");
    };
    assert_eq!(run, &["./scripts/build.sh", "v1.4.2"]);
}

#[test]
fn event_patterns() {
    let pat = |s: &str| EventPattern::parse(s).expect("pattern");
    assert!(pat("mission.*").matches("mission.failed"));
    assert!(pat("mission.*").matches("mission.a.b"));
    assert!(!pat("mission.*").matches("missions.failed"));
    assert!(!pat("mission.*").matches("proposal.created"));
    assert!(pat("*").matches("anything.at.all"));
    assert!(pat("step.failed").matches("step.failed"));
    assert!(!pat("step.failed").matches("step.failed2"));
    assert!(pat("*.failed").matches("step.failed") && !pat("*.failed").matches("step.retrying"));
    assert!(pat("a*b*c").matches("aXbYbc") && !pat("a*b*c").matches("aXbYbd"));
    assert!(EventPattern::parse("Mission.*").is_err());
    assert!(EventPattern::parse("").is_err());
    assert!(TemplateName::parse("deploy-v2_x").is_ok());
    assert!(TemplateName::parse("2deploy").is_err());
    assert_eq!("red".parse::<Risk>(), Ok(Risk::Red));
}

#[test]
fn defaults_when_sections_are_absent() {
    let p = parse_ok("");
    let d = Policy::default();
    assert_eq!(p.approval, d.approval);
    assert_eq!(p.approval.ttl, Duration::from_secs(86_400));
    assert_eq!(p.approval.auto_approve, vec![Risk::Low]);
    assert_eq!(
        p.approval.high,
        TierRule {
            approvals: 1,
            self_approval: true
        }
    );
    assert_eq!(p.gates.max_pending, 50);
    assert_eq!(p.gates.pause_after_failures, 2);
    assert_eq!(p.worker, WorkerPolicy::default());
    assert_eq!((p.worker.concurrency, p.worker.max_attempts), (4, 3));
    assert_eq!(p.worker.lease, Duration::from_secs(300));
    assert_eq!(p.worker.backoff.delay(1), Duration::from_secs(1));
    assert_eq!(p.worker.backoff.delay(4), Duration::from_secs(8));
    assert_eq!(p.worker.backoff.delay(40), Duration::from_secs(300));
    assert_eq!(p.heartbeat, HeartbeatPolicy::default());
    assert_eq!(p.heartbeat.interval, Duration::from_secs(15));
    assert!(p.notify.wants("mission.succeeded") && p.notify.wants("step.failed"));
    assert!(!p.notify.wants("step.started"));
    assert_eq!(p.retention, RetentionPolicy::default());
    assert!(p.templates.is_empty() && p.reactions.is_empty() && p.triggers.is_empty());
    // A partial table keeps the other defaults.
    let p = parse_ok("[approval]\nred = { approvals = 3 }\n");
    assert_eq!(
        p.approval.red,
        TierRule {
            approvals: 3,
            self_approval: false
        }
    );

    fn send_sync<T: Send + Sync>() {}
    send_sync::<Policy>();
}

#[test]
fn template_priority_is_an_integer_in_range_and_not_a_param() {
    let p = parse_ok(
        r#"[templates.urgent]
risk = "low"
priority = 100
steps = [{ name = "x", kind = "noop" }]
[templates.plain]
risk = "low"
steps = [{ name = "x", kind = "noop" }]
"#,
    );
    assert_eq!(p.templates.values().map(|t| t.priority).max(), Some(100));
    assert_eq!(p.templates.values().map(|t| t.priority).min(), Some(0));
    let src = r#"[templates.t]
risk = "low"
priority = 101
params.priority = { pattern = '\d+' }
steps = [{ name = "x", kind = "noop" }]
[templates.u]
risk = "low"
priority = "high"
steps = [{ name = "x", kind = "noop" }]
"#;
    let problems = parse(src).expect_err("must fail");
    let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let expect = [
        "line 3, column 12: templates.t.priority: 101 is out of range (-100..=100)",
        "templates.t.params.priority: priority is not a valid param name",
        "templates.u.priority:",
    ];
    for e in expect {
        assert!(
            all.iter().any(|p| p.contains(e)),
            "missing {e:?} in {all:#?}"
        );
    }
    assert_eq!(all.len(), expect.len(), "{all:#?}");
}
