//! Metrics (docs/http.md): the names opsloop exposes on `/metrics`, the process-wide
//! Prometheus recorder, and the cheap database gauges refreshed on each scrape.
//!
//! Instrumented code calls the small functions below (never `metrics::` macros with
//! ad-hoc names), so every name lives here. Without an installed recorder (extra
//! `opsloop worker` processes, the CLI) they cost nothing.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

pub const PROPOSALS: &str = "opsloop_proposals_total";
pub const GATE_REFUSALS: &str = "opsloop_gate_refusals_total";
pub const DECISIONS: &str = "opsloop_decisions_total";
pub const MISSIONS_FINISHED: &str = "opsloop_missions_finished_total";
pub const STEPS: &str = "opsloop_steps_total";
pub const STEPS_CLAIMED: &str = "opsloop_steps_claimed_total";
pub const STEP_DURATION: &str = "opsloop_step_duration_seconds";
pub const TICKS: &str = "opsloop_ticks_total";
pub const TICK_DURATION: &str = "opsloop_tick_duration_seconds";
pub const NOTIFICATIONS: &str = "opsloop_notifications_total";
pub const HTTP_REQUESTS: &str = "opsloop_http_requests_total";
pub const STEPS_QUEUED: &str = "opsloop_steps_queued";
pub const STEPS_RUNNING: &str = "opsloop_steps_running";
pub const WORKER_SLOTS: &str = "opsloop_worker_slots";
pub const LEASE_UTILISATION: &str = "opsloop_lease_utilisation";
pub const PROPOSALS_PENDING: &str = "opsloop_proposals_pending";
pub const DEAD_LETTERS: &str = "opsloop_dead_letters";
pub const QUESTIONS_OPEN: &str = "opsloop_questions_open";

const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle. The recorder is built and installed globally on
/// first use; later calls (many apps in one test process) share it. If some other
/// recorder was installed first, the handle still renders (only the names) and a
/// warning says why the numbers stay empty.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS);
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                // Only fails on empty buckets, which ours are not; fall back to summaries.
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "another metrics recorder is installed; /metrics will show no opsloop numbers"
                );
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(MISSIONS_FINISHED, "Missions finished, by status");
    describe_counter!(
        STEPS,
        "Step attempt outcomes: succeeded, failed, retrying, recovered, cancelled"
    );
    describe_counter!(
        STEPS_CLAIMED,
        "Step attempts claimed by this process's worker"
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Time one step attempt ran, by kind"
    );
    describe_counter!(
        TICKS,
        "Heartbeat ticks, by outcome (ran, skipped: another host ticks, error)"
    );
    describe_histogram!(TICK_DURATION, Unit::Seconds, "Duration of heartbeat ticks");
    describe_counter!(
        NOTIFICATIONS,
        "Telegram notifications, by outcome (sent, failed)"
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by route and status");
    describe_gauge!(STEPS_QUEUED, "Steps queued (ready or waiting for a retry)");
    describe_gauge!(STEPS_RUNNING, "Steps running under a lease, on every host");
    describe_gauge!(
        WORKER_SLOTS,
        "Concurrency of the workers seen in the last minute, on every host"
    );
    describe_gauge!(
        LEASE_UTILISATION,
        "Running steps divided by worker slots (0 when no worker is alive)"
    );
    describe_gauge!(PROPOSALS_PENDING, "Proposals waiting for a decision");
    describe_gauge!(
        DEAD_LETTERS,
        "Steps out of attempts (ops_step_dead_letters), from every host"
    );
    describe_gauge!(
        QUESTIONS_OPEN,
        "Questions waiting for an answer (ops_questions), from every host"
    );
    // Counters that the notifier will move: present from the start, at zero.
    for outcome in ["sent", "failed"] {
        counter!(NOTIFICATIONS, "outcome" => outcome).increment(0);
    }
}

pub fn mission_finished(status: &'static str) {
    counter!(MISSIONS_FINISHED, "status" => status).increment(1);
}

pub fn step_outcome(outcome: &'static str, n: u64) {
    if n > 0 {
        counter!(STEPS, "outcome" => outcome).increment(n);
    }
}

pub fn steps_claimed(n: usize) {
    if n > 0 {
        counter!(STEPS_CLAIMED).increment(n as u64);
    }
}

pub fn step_duration(kind: &'static str, took: Duration) {
    metrics::histogram!(STEP_DURATION, "kind" => kind).record(took.as_secs_f64());
}

pub fn tick(outcome: &'static str, took: Duration) {
    counter!(TICKS, "outcome" => outcome).increment(1);
    if outcome == "ran" {
        metrics::histogram!(TICK_DURATION).record(took.as_secs_f64());
    }
}

pub fn notification(outcome: &'static str) {
    counter!(NOTIFICATIONS, "outcome" => outcome).increment(1);
}

pub fn http_request(route: String, status: u16) {
    counter!(HTTP_REQUESTS, "route" => route, "status" => status.to_string()).increment(1);
}

/// Counters kept by the database (migrations/0010_counters.sql), so that work done by
/// any process is counted: proposals, gate refusals, decisions. Rendered straight from
/// the database on each scrape (Prometheus text), never held in this process.
pub async fn database_counters(pool: &PgPool) -> String {
    let query = sqlx::query_as::<_, (String, serde_json::Value, i64)>(
        "SELECT name, labels, value FROM ops_counters ORDER BY name, labels::text",
    )
    .fetch_all(pool);
    let rows = match tokio::time::timeout(Duration::from_secs(1), query).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "metrics counters: query failed");
            return String::new();
        }
        Err(_) => {
            tracing::debug!("metrics counters: query timed out");
            return String::new();
        }
    };
    let families = [
        (
            "proposals",
            PROPOSALS,
            "Proposals created by any process, by source and outcome (approved, pending, rejected)",
        ),
        (
            "gate_refusals",
            GATE_REFUSALS,
            "Proposals refused by a gate, by gate, from any process",
        ),
        (
            "decisions",
            DECISIONS,
            "People's decisions on proposals (approve, reject), from any process",
        ),
    ];
    let mut out = String::new();
    for (key, metric, help) in families {
        out.push_str(&format!(
            "# HELP {metric} {help}\n# TYPE {metric} counter\n"
        ));
        for (_, labels, value) in rows.iter().filter(|r| r.0 == key) {
            let mut pairs: Vec<String> = labels
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}=\"{}\"", label_value(v.as_str().unwrap_or(""))))
                .collect();
            pairs.sort();
            out.push_str(&format!("{metric}{{{}}} {value}\n", pairs.join(",")));
        }
    }
    out
}

/// A label value in Prometheus text: backslash, quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The cluster-wide gauges, from one cheap query (partial indexes cover it). Errors and
/// a slow database leave the previous values: a scrape never fails because of them.
pub async fn refresh_gauges(pool: &PgPool) {
    let query = sqlx::query_as::<_, (i64, i64, i64, i64, i64, i64)>(
        "SELECT
            (SELECT count(*) FROM ops_mission_steps WHERE status = 'queued'),
            (SELECT count(*) FROM ops_mission_steps WHERE status = 'running'),
            (SELECT coalesce(sum(concurrency), 0)::bigint FROM ops_workers
              WHERE stopped_at IS NULL AND last_seen > now() - interval '1 minute'),
            (SELECT count(*) FROM ops_mission_proposals
              WHERE status = 'pending' AND expires_at > now()),
            (SELECT count(*) FROM ops_step_dead_letters),
            (SELECT count(*) FROM ops_questions WHERE status = 'open')",
    )
    .fetch_one(pool);
    match tokio::time::timeout(Duration::from_secs(1), query).await {
        Ok(Ok((queued, running, slots, pending, dead, questions))) => {
            gauge!(STEPS_QUEUED).set(queued as f64);
            gauge!(STEPS_RUNNING).set(running as f64);
            gauge!(WORKER_SLOTS).set(slots as f64);
            gauge!(LEASE_UTILISATION).set(if slots > 0 {
                running as f64 / slots as f64
            } else {
                0.0
            });
            gauge!(PROPOSALS_PENDING).set(pending as f64);
            gauge!(DEAD_LETTERS).set(dead as f64);
            gauge!(QUESTIONS_OPEN).set(questions as f64);
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics gauges: query failed"),
        Err(_) => tracing::debug!("metrics gauges: query timed out"),
    }
}
