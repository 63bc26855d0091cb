//! Budgets (issue 12, "Done when" 2; design §11): steps' costs as exact decimals, the
//! warning and the exhaustion written once each per period under several worker
//! processes, the `budget` gate (new proposals and retries), raises, the period rolling
//! over, bad costs, and `policy check`. Real PostgreSQL, the real binary.

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{opsloop, opsloop_cmd, path_str, request, stderr, stdout, test_db, write_temp};

/// `opsloop worker` processes, stopped (SIGTERM) on drop.
struct Workers(Vec<Child>);

impl Workers {
    fn start(url: &str, n: usize, concurrency: u32) -> Workers {
        Workers(
            (0..n)
                .map(|_| {
                    opsloop_cmd(Some(url))
                        .args(["worker", "--concurrency", &concurrency.to_string()])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("spawn opsloop worker")
                })
                .collect(),
        )
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

async fn apply(pool: &sqlx::PgPool, source: &str) -> opsloop::domain::policy::Policy {
    let policy = match opsloop::domain::policy::parse(source) {
        Ok(p) => p,
        Err(problems) => panic!("test policy: {problems:#?}"),
    };
    opsloop::store::policy::apply(pool, source, "test")
        .await
        .expect("apply policy");
    policy
}

async fn scalar<T>(pool: &sqlx::PgPool, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// Wait (generously) until `sql` returns true.
async fn until(pool: &sqlx::PgPool, sql: &str, timeout: Duration) {
    let start = Instant::now();
    // No row yet is not yet.
    let sql = &format!("SELECT coalesce(({sql}), false)");
    loop {
        if scalar::<bool>(pool, sql).await {
            return;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for: {sql}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn propose_as(
    pool: &sqlx::PgPool,
    policy: &opsloop::domain::policy::Policy,
    template: &str,
    n: &str,
    by: &str,
) -> opsloop::engine::proposals::Proposed {
    opsloop::engine::proposals::propose(pool, policy, request(template, &[("n", n)], by))
        .await
        .expect("propose")
}

fn budgets_json(url: &str) -> Vec<Value> {
    let out = opsloop(url, &["budgets", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_str::<Value>(&stdout(&out))
        .expect("budgets --json")
        .as_array()
        .cloned()
        .expect("an array")
}

const MANY: &str = r#"
[worker]
max_attempts = 3
backoff = { base = "100ms", max = "1s" }

[templates.draft]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [
  { name = "outline", kind = "shell", run = ["sh", "-c", "echo cost=0.03 >> \"$OPSLOOP_OUTPUT\""] },
  { name = "write", kind = "shell", run = ["sh", "-c", "printf '\\173\"cost\": 0.02\\175' > \"$OPSLOOP_OUTPUT\""] },
]

[budgets.writing]
limit = 8
period = "day"
templates = ["dra*"]
warn_at = 0.5
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_warn_and_exhaust_once_then_the_gate_refuses_until_a_raise() {
    let db = test_db().await;
    let policy = apply(&db.pool, MANY).await;
    // 200 missions proposed while paused (people's proposals are still accepted and
    // their missions created), then 4 worker processes finish them all at once.
    assert_eq!(opsloop(&db.url, &["pause"]).status.code(), Some(0));
    for n in 0..200 {
        let p = propose_as(&db.pool, &policy, "draft", &n.to_string(), "test").await;
        assert!(p.mission_id.is_some(), "{p:?}");
    }
    let _workers = Workers::start(&db.url, 4, 8);
    assert_eq!(opsloop(&db.url, &["resume"]).status.code(), Some(0));
    until(
        &db.pool,
        "SELECT count(*) = 200 FROM ops_missions WHERE status = 'succeeded'",
        Duration::from_secs(240),
    )
    .await;

    // Exact decimals: 200 × (0.03 + 0.02) is 10, not 9.999….
    assert!(
        scalar::<bool>(
            &db.pool,
            "SELECT bool_and(cost = 0.05) AND sum(cost) = 10 FROM ops_missions"
        )
        .await
    );
    assert!(
        scalar::<bool>(
            &db.pool,
            "SELECT spent = 10 FROM ops_budget_periods WHERE budget = 'writing'"
        )
        .await
    );
    for kind in ["budget.warning", "budget.exhausted"] {
        let n: i64 = scalar(
            &db.pool,
            &format!("SELECT count(*) FROM ops_agent_events WHERE kind = '{kind}'"),
        )
        .await;
        assert_eq!(n, 1, "{kind}");
    }
    // The warning came at 4 (half of 8), the exhaustion at 8; running missions finished.
    let payload: Value = scalar(
        &db.pool,
        "SELECT payload FROM ops_agent_events WHERE kind = 'budget.exhausted'",
    )
    .await;
    assert_eq!(payload["budget"], "writing");
    assert_eq!(payload["limit"], "8");
    assert_eq!(payload["period"], "day");
    let mission = opsloop(&db.url, &["mission", "7", "--json"]);
    let mission: Value = serde_json::from_str(&stdout(&mission)).expect("mission --json");
    assert_eq!(mission["cost"].as_f64(), Some(0.05), "{mission}");

    // The gate refuses the next proposal of its scope, naming the budget, spent, limit.
    let out = opsloop(&db.url, &["propose", "draft", "n=1000", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let refused: Value = serde_json::from_str(&stdout(&out)).expect("propose --json");
    let reason = refused["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("budget writing is exhausted: spent 10 of 8 this day"),
        "{reason}"
    );
    let listed = budgets_json(&db.url);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "writing");
    assert_eq!(listed[0]["status"], "exhausted");
    assert_eq!(listed[0]["spent"].as_f64(), Some(10.0));
    assert_eq!(listed[0]["limit"].as_f64(), Some(8.0));

    // Bad raises change nothing (exit 2).
    for args in [
        ["budget", "raise", "writing", "-1"],
        ["budget", "raise", "writing", "0"],
        ["budget", "raise", "writing", "lots"],
        ["budget", "raise", "nope", "5"],
    ] {
        let out = opsloop(&db.url, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        scalar::<i64>(
            &db.pool,
            "SELECT count(*) FROM ops_agent_events WHERE kind = 'budget.raised'"
        )
        .await,
        0
    );

    // A raise lets work through again, and re-arms the warning: 10 of 12.5 is past 50 %.
    let out = opsloop(
        &db.url,
        &["budget", "raise", "writing", "4.5", "--as", "ops"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("limit now 12.5"), "{}", stdout(&out));
    let out = opsloop(&db.url, &["propose", "draft", "n=1001", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let listed = budgets_json(&db.url);
    assert_eq!(listed[0]["limit"].as_f64(), Some(12.5));
    assert_eq!(listed[0]["status"], "warning");
    let raised: Value = scalar(
        &db.pool,
        "SELECT payload FROM ops_agent_events WHERE kind = 'budget.raised'",
    )
    .await;
    assert_eq!(raised["by"], "ops");
    assert_eq!(raised["amount"], "4.5");
}

const SMALL: &str = r#"
[heartbeat]
interval = "1s"

[worker]
max_attempts = 1

[templates.draft]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "write", kind = "shell", run = ["sh", "-c", "echo cost=0.6 > \"$OPSLOOP_OUTPUT\""] } ]

[templates.flaky]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "try", kind = "shell", run = ["sh", "-c", "exit 1"] } ]

[templates.other]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "write", kind = "shell", run = ["sh", "-c", "echo cost=0.25 > \"$OPSLOOP_OUTPUT\""] } ]

[budgets.writing]
limit = 1.0
period = "day"
templates = ["draft", "flaky"]
agents = ["writer"]
warn_at = 0.5
"#;

async fn warnings(pool: &sqlx::PgPool) -> (i64, i64) {
    (
        scalar(
            pool,
            "SELECT count(*) FROM ops_agent_events WHERE kind = 'budget.warning'",
        )
        .await,
        scalar(
            pool,
            "SELECT count(*) FROM ops_agent_events WHERE kind = 'budget.exhausted'",
        )
        .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_period_rolls_over_and_agents_and_retries_are_in_scope() {
    let db = test_db().await;
    let policy = apply(&db.pool, SMALL).await;
    let _workers = Workers::start(&db.url, 1, 2);

    // A mission of the budget fails (before it is exhausted), to be retried later.
    let flaky = propose_as(&db.pool, &policy, "flaky", "1", "test").await;
    let flaky = flaky.mission_id.expect("a mission");
    until(
        &db.pool,
        &format!("SELECT status = 'failed' FROM ops_missions WHERE id = {flaky}"),
        Duration::from_secs(60),
    )
    .await;

    // A person's proposal of a template outside the budget does not count; an agent's does.
    propose_as(&db.pool, &policy, "other", "1", "test").await;
    propose_as(&db.pool, &policy, "other", "2", "agent:writer").await;
    until(
        &db.pool,
        "SELECT count(*) = 2 FROM ops_missions WHERE template = 'other' AND status = 'succeeded'",
        Duration::from_secs(60),
    )
    .await;
    assert!(scalar::<bool>(&db.pool, "SELECT spent = 0.25 FROM ops_budget_periods").await);
    assert_eq!(warnings(&db.pool).await, (0, 0));

    // 0.25 + 0.6 passes the warning (0.5); + 0.6 reaches the limit (1).
    propose_as(&db.pool, &policy, "draft", "1", "test").await;
    until(
        &db.pool,
        "SELECT spent = 0.85 FROM ops_budget_periods",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(warnings(&db.pool).await, (1, 0));
    propose_as(&db.pool, &policy, "draft", "2", "test").await;
    until(
        &db.pool,
        "SELECT spent = 1.45 FROM ops_budget_periods",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(warnings(&db.pool).await, (1, 1));

    // Exhausted: new proposals in its scope are refused (a template's, an agent's), and so
    // is the retry of its failed mission; outside the scope work goes on.
    for (template, by) in [("draft", "test"), ("other", "agent:writer")] {
        let p = propose_as(&db.pool, &policy, template, "3", by).await;
        assert_eq!(p.status.as_str(), "rejected", "{template} by {by}: {p:?}");
        assert!(
            p.reason
                .as_deref()
                .unwrap_or_default()
                .contains("budget writing is exhausted"),
            "{p:?}"
        );
    }
    let p = propose_as(&db.pool, &policy, "other", "4", "test").await;
    assert!(p.mission_id.is_some(), "{p:?}");
    let out = opsloop(&db.url, &["retry", &flaky.to_string()]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("budget writing is exhausted"),
        "{}",
        stderr(&out)
    );

    // A tick checks budgets again and writes nothing twice.
    assert_eq!(opsloop(&db.url, &["tick"]).status.code(), Some(0));
    assert_eq!(warnings(&db.pool).await, (1, 1));

    // The day ends (the recorded period is moved back one day; the current period is
    // computed by PostgreSQL from now()): the budget starts from nothing.
    sqlx::query("UPDATE ops_budget_periods SET starts = starts - 1")
        .execute(&db.pool)
        .await
        .expect("move the period back");
    let listed = budgets_json(&db.url);
    assert_eq!(listed[0]["status"], "ok");
    assert_eq!(listed[0]["spent"].as_f64(), Some(0.0));
    let p = propose_as(&db.pool, &policy, "draft", "5", "test").await;
    assert!(p.mission_id.is_some(), "{p:?}");
    until(
        &db.pool,
        "SELECT spent = 0.6 FROM ops_budget_periods WHERE starts = ops_budget_period('day')",
        Duration::from_secs(60),
    )
    .await;
    // A new period warns again, once.
    assert_eq!(warnings(&db.pool).await, (2, 1));
    let out = opsloop(&db.url, &["retry", &flaky.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

const BAD_COSTS: &str = r#"
[gates]
pause_after_failures = 0

[worker]
max_attempts = 1

[templates.spend]
risk = "low"
params.n = { pattern = '^.+$', help = "what the step writes to its output" }
steps = [ { name = "pay", kind = "shell", run = ["sh", "-c", "printf '%s' \"$0\" > \"$OPSLOOP_OUTPUT\"", "{n}"] } ]

[budgets.all]
limit = 100
period = "month"
templates = ["*"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_costs_fail_the_attempt_and_never_count() {
    let db = test_db().await;
    let policy = apply(&db.pool, BAD_COSTS).await;
    let _workers = Workers::start(&db.url, 1, 4);
    let bad = [
        "cost=-1",
        "cost=abc",
        "cost=NaN",
        "cost=1e3",
        "cost=",
        r#"{"cost": -0.5}"#,
        r#"{"cost": "lots"}"#,
        r#"{"cost": null}"#,
        r#"{"cost": [1]}"#,
    ];
    let mut ids = Vec::new();
    for output in bad {
        let p = propose_as(&db.pool, &policy, "spend", output, "test").await;
        let Some(id) = p.mission_id else {
            panic!("{output}: {p:?}");
        };
        ids.push((output, id));
    }
    // Exact: 0.1 + 0.2 is 0.3 (as numbers and as key=value text).
    for output in [r#"{"cost": 0.1}"#, "cost=0.2"] {
        propose_as(&db.pool, &policy, "spend", output, "test").await;
    }
    until(
        &db.pool,
        "SELECT count(*) = 11 FROM ops_missions WHERE status <> 'running'",
        Duration::from_secs(90),
    )
    .await;
    for (output, id) in ids {
        let (status, error): (String, Option<String>) = sqlx::query_as(
            "SELECT m.status, s.error FROM ops_missions m JOIN ops_mission_steps s ON s.mission_id = m.id WHERE m.id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("mission");
        assert_eq!(status, "failed", "{output}");
        let error = error.unwrap_or_default();
        assert!(error.contains("cost"), "{output}: {error}");
    }
    assert!(
        scalar::<bool>(
            &db.pool,
            "SELECT sum(cost) = 0.3 AND count(*) FILTER (WHERE cost > 0) = 2 FROM ops_missions"
        )
        .await
    );
    assert!(
        scalar::<bool>(
            &db.pool,
            "SELECT spent = 0.3 FROM ops_budget_periods WHERE budget = 'all' AND period = 'month'"
        )
        .await
    );
    let listed = budgets_json(&db.url);
    assert_eq!(listed[0]["spent"].as_f64(), Some(0.3));
    assert_eq!(listed[0]["period"], "month");
    assert_eq!(listed[0]["status"], "ok");
}

#[test]
fn policy_check_reports_every_budget_problem_with_its_location() {
    let file = write_temp(
        "bad-budgets.toml",
        r#"
[templates.draft]
risk = "low"
steps = [ { name = "s", kind = "noop" } ]

[budgets.writing]
limit = -5
period = "week"
templates = ["draft*"]
warn_at = 1.5
colour = "red"

[budgets.noscope]
limit = 5
period = "day"

[budgets.Bad_Name]
limit = 5
period = "day"
templates = ["draft"]

[budgets.typos]
limit = "five"
period = "month"
templates = ["nothing*"]
agents = ["Writer"]
"#,
    );
    let out = opsloop("postgres://unused", &["policy", "check", path_str(&file)]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    for expected in [
        ":7:9: budgets.writing.limit: -5 is out of range: it must be more than zero",
        ":8:10: budgets.writing.period: unknown period \"week\"",
        ":10:11: budgets.writing.warn_at: 1.5 is out of range",
        ":11:1: budgets.writing.colour: unknown key colour",
        ":13:1: budgets.noscope: a budget needs a scope",
        ":17:10: budgets.Bad_Name: invalid budget name",
        ":23:9: budgets.typos.limit: expected a number",
        ":25:14: budgets.typos.templates[0]: pattern \"nothing*\" matches no template",
        ":26:11: budgets.typos.agents[0]: invalid agent name \"Writer\"",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    // A good one passes.
    let good = write_temp(
        "good-budgets.toml",
        "[templates.draft]\nrisk = \"low\"\nsteps = [ { name = \"s\", kind = \"noop\" } ]\n\n[budgets.writing]\nlimit = 5.0\nperiod = \"day\"\ntemplates = [\"draft*\"]\n",
    );
    let out = opsloop("postgres://unused", &["policy", "check", path_str(&good)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
