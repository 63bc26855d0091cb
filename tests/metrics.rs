//! `/metrics` describes the system, whichever process did the work: a proposal made by
//! `opsloop propose` (another process) moves the daemon's counters on the next scrape.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{POLICY, opsloop, opsloop_cmd, path_str, test_db, write_temp};

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// The value of one sample line (`name{labels}`), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

struct Run(std::process::Child);

impl Drop for Run {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cli_proposal_and_decision_show_on_the_daemons_metrics() {
    let db = test_db().await;
    let addr = free_addr();
    let file = write_temp(&format!("metrics-{}.toml", db.name), POLICY);
    let _run = Run(opsloop_cmd(Some(&db.url))
        .args(["run", "--policy", path_str(&file)])
        .env("OPSLOOP_HTTP_ADDR", &addr)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn opsloop run"));
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/metrics");
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        if let Ok(res) = client.get(&url).send().await
            && res.status().is_success()
        {
            break res.text().await.expect("body");
        }
        assert!(Instant::now() < deadline, "/metrics never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let approved = r#"opsloop_proposals_total{outcome="approved",source="cli"}"#;
    let pending = r#"opsloop_proposals_total{outcome="pending",source="cli"}"#;
    let refused = r#"opsloop_gate_refusals_total{gate="dedupe"}"#;
    let approvals = r#"opsloop_decisions_total{decision="approve"}"#;
    assert_eq!(sample(&before, approved), 0.0, "{before}");

    let out = opsloop(&db.url, &["propose", "hello", "name=ada"]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    let out = opsloop(&db.url, &["propose", "deploy", "tag=v1.0.0"]);
    assert!(out.status.success(), "{}", support::stderr(&out));
    let out = opsloop(&db.url, &["propose", "deploy", "tag=v1.0.0"]);
    assert_eq!(out.status.code(), Some(3), "a duplicate is refused");
    let out = opsloop(&db.url, &["approve", "2", "--as", "bob"]);
    assert!(out.status.success(), "{}", support::stderr(&out));

    let after = client
        .get(&url)
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body");
    assert_eq!(sample(&after, approved), 1.0, "{after}");
    assert_eq!(sample(&after, pending), 1.0, "{after}");
    assert_eq!(sample(&after, refused), 1.0, "{after}");
    assert_eq!(sample(&after, approvals), 1.0, "{after}");
    assert!(after.contains("# TYPE opsloop_proposals_total counter"));
}

/// Metrics a feature under way will export (questions, budgets): a dashboard panel or an
/// alert may name one before opsloop exports it. Empty today; move a name out of here
/// when its metric lands.
const PLANNED: &[&str] = &[];

/// The names a scrape exposes: samples (`name{...} v`, `name v`) and `# TYPE` lines.
fn exported(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every `opsloop_*` name in a text (PromQL, YAML, the dashboard's strings).
fn named(text: &str) -> std::collections::BTreeSet<String> {
    regex::Regex::new(r"\bopsloop_[a-z0-9_]*[a-z0-9]")
        .expect("regex")
        .find_iter(text)
        .map(|m| m.as_str().to_owned())
        .collect()
}

fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(o) => o.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// deploy/grafana/opsloop.json parses, and it and deploy/prometheus/ name only metrics a
/// live daemon exports once it has ticked and run a mission (a histogram shows its
/// first sample only).
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_alert_rules_name_only_exported_metrics() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy.join("grafana/opsloop.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().expect("every target has an expr"))
        .collect();
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    let mut texts = Vec::new();
    strings(&dashboard, &mut texts);
    let in_dashboard = named(&texts.join("\n"));
    let rules =
        std::fs::read_to_string(deploy.join("prometheus/opsloop.rules.yml")).expect("rules");
    for alert in ["OpsloopDeadLettersGrowing", "OpsloopNoTick"] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
    let in_rules = named(&rules);

    let db = test_db().await;
    let addr = free_addr();
    let file = write_temp(&format!("dashboard-{}.toml", db.name), POLICY);
    let _run = Run(opsloop_cmd(Some(&db.url))
        .args(["run", "--policy", path_str(&file)])
        .env("OPSLOOP_HTTP_ADDR", &addr)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn opsloop run"));
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/metrics");
    let mut proposed = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        if let Ok(res) = client.get(&url).send().await
            && res.status().is_success()
        {
            let text = res.text().await.expect("body");
            if !proposed {
                let out = opsloop(&db.url, &["propose", "hello", "name=ada"]);
                assert!(out.status.success(), "{}", support::stderr(&out));
                proposed = true;
            }
            let names = exported(&text);
            if [
                "opsloop_missions_finished_total",
                "opsloop_step_duration_seconds_bucket",
                "opsloop_tick_duration_seconds_bucket",
            ]
            .iter()
            .all(|n| names.contains(*n))
            {
                break text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the mission never showed on /metrics"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let exported = exported(&text);
    for (what, names) in [("the dashboard", &in_dashboard), ("the rules", &in_rules)] {
        assert!(!names.is_empty(), "{what} names no metric");
        let unknown: Vec<_> = names
            .iter()
            .filter(|n| !exported.contains(*n) && !PLANNED.contains(&n.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{what} names metrics opsloop does not export: {unknown:?}\n{text}"
        );
    }
    // Every exported family has a panel (a new metric should get one, or be named here).
    let families: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let shown = |f: &str| in_dashboard.iter().any(|n| n.starts_with(f));
    let missing: Vec<_> = families.iter().filter(|f| !shown(f)).collect();
    assert!(missing.is_empty(), "no panel shows {missing:?}");
}
