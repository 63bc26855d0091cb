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
