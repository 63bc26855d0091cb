//! `opsloop bench soak` (issue 14), the short CI version: one minute of the realistic
//! mix through the real binary. The figures are printed, not asserted (the README has
//! the 30-minute ones); what is checked is that the mix ran without an error, missions
//! started and finished, questions were answered through the fake Telegram, and the line
//! carries every figure.

mod support;

use support::{opsloop, stderr, stdout};

#[test]
fn a_one_minute_soak_runs_clean_and_reports_every_figure() {
    let url = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let out = opsloop(&url, &["bench", "soak", "--minutes", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    println!("{text}");
    let figures: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
    assert_eq!(figures["bench"], "soak");
    assert_eq!(figures["errors"], 0, "{figures}");
    let last = &figures["last_minute"];
    for key in [
        "rss_mb",
        "connections",
        "live_rows",
        "table_mb",
        "missions_running",
        "missions_started",
        "start_p50_ms",
        "start_p99_ms",
        "questions_answered",
        "question_answered_p50_ms",
        "question_answered_p99_ms",
        "questions_open",
        "outbox_backlog",
    ] {
        assert!(last[key].is_number(), "{key} missing: {figures}");
    }
    assert!(
        last["missions_started"].as_u64().unwrap_or(0) > 100,
        "the mix ran: {figures}"
    );
    // A question every 5 s, each answered by the person's tap in the fake Telegram.
    assert!(
        last["questions_answered"].as_u64().unwrap_or(0) >= 5,
        "questions were asked and answered in Telegram: {figures}"
    );
    assert!(
        figures["missions_succeeded_still_kept"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "missions finished: {figures}"
    );
}
