//! `opsloop bench` (README, "Performance"): measured on the database server it is given, in a
//! scratch database it creates and drops, one JSON line per case. Benchmarks measure;
//! no test asserts a time.

mod fanout;
mod floor;
mod keys;
mod preload;
mod soak;
mod spawn;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db::{self, Database};
use crate::domain::error::OpsError;
use crate::engine::heartbeat;
use crate::engine::proposals::{self, NewProposal, Source};
use crate::engine::worker::Worker;
use crate::store::policy::{self as policy_store, PolicyCache};
use preload::preload;

mod chat;
pub use chat::chat;
pub use fanout::fanout;
pub use floor::floor;
pub use keys::{flood_wrong_keys, keys};
pub use soak::soak;

/// A scratch database on the same server, dropped at the end.
struct Scratch {
    admin_url: String,
    name: String,
    pool: PgPool,
}

impl Scratch {
    async fn create(db: &Database) -> anyhow::Result<Scratch> {
        let name = format!("opsloop_bench_{}", std::process::id());
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(&db.pool)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&db.pool).await.map_err(|e| {
            anyhow::anyhow!("the benchmark needs to create a scratch database ({e}); use a role with CREATEDB")
        })?;
        let admin_url = db.url().to_string();
        let pool = db::connect(&db::with_database(&admin_url, &name), 40).await?;
        db::migrate(&pool).await?;
        Ok(Scratch {
            admin_url,
            name,
            pool,
        })
    }

    async fn drop(self) {
        self.pool.close().await;
        if let Ok(admin) = db::connect(&self.admin_url, 1).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

async fn server_version(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT current_setting('server_version')")
        .fetch_one(pool)
        .await
        .unwrap_or_default()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn line(pool: &PgPool, mut figures: Value) -> Value {
    if let Some(map) = figures.as_object_mut() {
        map.insert("opsloop_version".into(), json!(env!("CARGO_PKG_VERSION")));
        map.insert("postgres_version".into(), json!(server_version(pool).await));
        map.insert(
            "cpus".into(),
            json!(std::thread::available_parallelism().map_or(0, |n| n.get())),
        );
    }
    figures
}

fn bench_policy(concurrency: u32, steps_per_mission: u32, rules: u32) -> String {
    let steps: Vec<String> = (1..=steps_per_mission.max(1))
        .map(|i| format!("{{ name = \"s{i}\", kind = \"noop\" }}"))
        .collect();
    let mut policy = format!(
        r#"
[gates]
max_pending = 1000000

[worker]
concurrency = {concurrency}
lease = "5m"

[heartbeat]
interval = "1h"

[templates.bench]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "sample number" }}
steps = [ {} ]
"#,
        steps.join(", ")
    );
    for r in 0..rules {
        // One rule in a hundred matches the events that are meant to match.
        let on = if r == 0 {
            "bench.hit".to_string()
        } else {
            format!("bench.rule{r}.*")
        };
        policy.push_str(&format!(
            "\n[[reactions]]\nname = \"rule{r}\"\non = \"{on}\"\nwhere = {{ ok = true }}\npropose = \"bench\"\nparams = {{ n = \"{{id}}\" }}\ncooldown = \"1h\"\n"
        ));
    }
    policy
}

/// What `bench worker` runs, and what else sits in the tables meanwhile.
#[derive(Debug, Clone)]
pub struct WorkerCase {
    pub steps: u32,
    pub workers: u32,
    pub steps_per_mission: u32,
    /// `noop`, or `shell` (each step runs `true`; the machine's spawn rate is measured
    /// in the same run).
    pub kind: String,
    /// Finished steps (with their events) already in the tables.
    pub history: u32,
    /// Missions waiting on an open question.
    pub open_questions: u32,
    /// Steps waiting behind a step that runs elsewhere.
    pub waiting: u32,
}

/// Set up in bulk (not timed): `missions` approved proposals, running missions, and
/// their `per` steps of `kind` (the first queued, the rest waiting), then ANALYZE as
/// the peer's bench does after enqueueing, so the planner sees the backlog.
async fn seed_missions(
    pool: &PgPool,
    steps: u32,
    per: u32,
    kind: &str,
    spec: &str,
) -> anyhow::Result<i64> {
    let missions = steps.div_ceil(per);
    sqlx::query(
        "WITH p AS (
            INSERT INTO ops_mission_proposals (template, params, risk, proposed_by, source, status, decided_at)
            SELECT 'bench', jsonb_build_object('n', g::text), 'low', 'bench', 'cli', 'approved', now()
            FROM generate_series(1, $1) g RETURNING id),
         m AS (
            INSERT INTO ops_missions (proposal_id, template, status, started_at)
            SELECT id, 'bench', 'running', now() FROM p RETURNING id)
         INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, status)
         SELECT m.id, s, 's' || s, $3, $4::jsonb, CASE WHEN s = 1 THEN 'queued' ELSE 'waiting' END
         FROM m, generate_series(1, $2) s",
    )
    .bind(missions as i32)
    .bind(per as i32)
    .bind(kind)
    .bind(spec)
    .execute(pool)
    .await?;
    sqlx::query("ANALYZE ops_mission_proposals, ops_missions, ops_mission_steps")
        .execute(pool)
        .await?;
    // Write the setup's pages out now, so the timed run does not pay for them (a big
    // preload's write-back otherwise lands in it). Needs superuser or pg_checkpoint
    // (PostgreSQL 15): without either the run goes on as it is.
    if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
        tracing::debug!(error = %e, "no CHECKPOINT before the timed run");
    }
    Ok(i64::from(missions) * i64::from(per))
}

/// `bench worker`: N steps through the whole lifecycle with W concurrent slots.
pub async fn worker(db: &Database, case: WorkerCase) -> anyhow::Result<Value> {
    let WorkerCase {
        steps,
        workers,
        steps_per_mission,
        ref kind,
        history,
        open_questions,
        waiting,
    } = case;
    if steps == 0 || workers == 0 || steps_per_mission == 0 {
        return Err(OpsError::bad_input(
            "--steps, --workers and --steps-per-mission must be at least 1",
        )
        .into());
    }
    let spec = match kind.as_str() {
        "noop" => "{\"kind\":\"noop\"}",
        "shell" => "{\"kind\":\"shell\",\"run\":[\"true\"]}",
        other => {
            return Err(OpsError::bad_input(format!(
                "--kind must be noop or shell (got {other:?})"
            ))
            .into());
        }
    };
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    policy_store::apply(&pool, &bench_policy(workers, steps_per_mission, 0), "bench").await?;
    preload(&pool, history, open_questions, waiting).await?;
    let total_steps = seed_missions(&pool, steps, steps_per_mission, kind, spec).await?;
    // The machine's own limit, in the same run: the same spawns minus opsloop.
    let spawn_limit = if kind == "shell" {
        Some(spawn::limit(total_steps as u32, workers).await?)
    } else {
        None
    };
    let cache = PolicyCache::default();
    cache.refresh(&pool).await?;
    let stop = CancellationToken::new();
    let bench_started = chrono::Utc::now();
    let started = Instant::now();
    let runner = tokio::spawn(
        Worker::new(pool.clone(), cache, workers as usize)
            .run(stop.clone(), Duration::from_secs(5)),
    );
    // A cheap look (not a count) so the measurement costs the database little.
    loop {
        let busy: bool = sqlx::query_scalar(
            // The preloads' missions are of template 'held': they never finish here.
            "SELECT EXISTS (SELECT 1 FROM ops_missions m WHERE m.status = 'running' AND m.template = 'bench')",
        )
        .fetch_one(&pool)
        .await?;
        if !busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    let _ = runner.await;
    let pickups: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM (s.started_at - s.run_after)) * 1000.0)::float8
         FROM ops_mission_steps s WHERE s.started_at >= $1 ORDER BY 1",
    )
    .bind(bench_started)
    .fetch_all(&pool)
    .await?;
    let done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ops_mission_steps WHERE status = 'succeeded' AND started_at >= $1",
    )
    .bind(bench_started)
    .fetch_one(&pool)
    .await?;
    let steps_per_s = done as f64 / elapsed.as_secs_f64();
    let mut figures = json!({
        "bench": "worker",
        "kind": kind,
        "steps": total_steps,
        "steps_succeeded": done,
        "workers": workers,
        "steps_per_mission": steps_per_mission,
        "history_steps": history,
        "open_questions": open_questions,
        "waiting_steps": waiting,
        "elapsed_ms": elapsed.as_millis() as u64,
        "steps_per_s": round2(steps_per_s),
        "queue_wait_p50_ms": round2(percentile(&pickups, 50.0)),
        "queue_wait_p99_ms": round2(percentile(&pickups, 99.0)),
    });
    if let Some(limit) = spawn_limit {
        figures["spawn_limit"] = limit.figures(steps_per_s);
    }
    let out = line(&pool, figures).await;
    scratch.drop().await;
    Ok(out)
}

/// `bench latency`: on an idle daemon, propose (low risk) → first step started, and
/// step ready (committed) → started.
/// `preload` is (finished history, open questions, waiting steps) present meanwhile.
pub async fn latency(
    db: &Database,
    samples: u32,
    (history, open_questions, waiting): (u32, u32, u32),
) -> anyhow::Result<Value> {
    let samples = samples.clamp(10, 100_000);
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    let source = bench_policy(4, 1, 0);
    policy_store::apply(&pool, &source, "bench").await?;
    preload(&pool, history, open_questions, waiting).await?;
    let policy = crate::domain::policy::parse(&source)
        .map_err(|p| anyhow::anyhow!("bench policy: {p:?}"))?;
    let cache = PolicyCache::default();
    cache.refresh(&pool).await?;
    let stop = CancellationToken::new();
    let runner =
        tokio::spawn(Worker::new(pool.clone(), cache, 4).run(stop.clone(), Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut propose_to_start, mut ready_to_start) = (Vec::new(), Vec::new());
    for n in 0..samples {
        let before = Utc::now();
        let proposed = proposals::propose(
            &pool,
            &policy,
            NewProposal {
                template: "bench".into(),
                params: [("n".to_string(), n.to_string())].into(),
                proposed_by: "bench".into(),
                source: Source::Cli,
                priority: None,
                may_raise_priority: false,
            },
        )
        .await?;
        let committed = Utc::now();
        let mission = proposed.mission_id.unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let started: DateTime<Utc> = loop {
            let started: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT started_at FROM ops_mission_steps WHERE mission_id = $1 AND seq = 1",
            )
            .bind(mission)
            .fetch_one(&pool)
            .await?;
            if let Some(t) = started {
                break t;
            }
            if Instant::now() > deadline {
                return Err(anyhow::anyhow!(
                    "mission #{mission}'s step did not start within 10 s"
                ));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let ms =
            |from: DateTime<Utc>| (started - from).num_microseconds().unwrap_or(0) as f64 / 1000.0;
        propose_to_start.push(ms(before));
        ready_to_start.push(ms(committed).max(0.0));
        // Let the daemon go idle again between samples.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = runner.await;
    propose_to_start.sort_by(f64::total_cmp);
    ready_to_start.sort_by(f64::total_cmp);
    let out = line(
        &pool,
        json!({
            "bench": "latency",
            "samples": samples,
            "history_steps": history,
            "open_questions": open_questions,
            "waiting_steps": waiting,
            "propose_to_start_p50_ms": round2(percentile(&propose_to_start, 50.0)),
            "propose_to_start_p99_ms": round2(percentile(&propose_to_start, 99.0)),
            "ready_to_start_p50_ms": round2(percentile(&ready_to_start, 50.0)),
            "ready_to_start_p99_ms": round2(percentile(&ready_to_start, 99.0)),
        }),
    )
    .await;
    scratch.drop().await;
    Ok(out)
}

/// `bench tick`: N events through R reaction rules by the heartbeat.
pub async fn tick(db: &Database, events: u32, rules: u32) -> anyhow::Result<Value> {
    if events == 0 {
        return Err(OpsError::bad_input("--events must be at least 1").into());
    }
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    let source = bench_policy(4, 1, rules);
    policy_store::apply(&pool, &source, "bench").await?;
    let policy = crate::domain::policy::parse(&source)
        .map_err(|p| anyhow::anyhow!("bench policy: {p:?}"))?;
    // One event in a hundred matches rule0's pattern and `where`; the rest match nothing.
    sqlx::query(
        "INSERT INTO ops_agent_events (kind, source, payload)
         SELECT CASE WHEN g % 100 = 0 THEN 'bench.hit' ELSE 'bench.miss.' || (g % 7) END, 'bench',
                jsonb_build_object('ok', true, 'n', g)
         FROM generate_series(1, $1) g",
    )
    .bind(events as i32)
    .execute(&pool)
    .await?;
    let started = Instant::now();
    let mut ticks = 0;
    let mut processed = 0;
    loop {
        let s = heartbeat::tick(&pool, &policy).await?;
        ticks += 1;
        processed += s.events_processed;
        if s.events_processed == 0 {
            break;
        }
    }
    let elapsed = started.elapsed();
    let decisions: i64 = sqlx::query_scalar("SELECT count(*) FROM ops_agent_reactions")
        .fetch_one(&pool)
        .await?;
    let out = line(
        &pool,
        json!({
            "bench": "tick",
            "events": events,
            "rules": rules,
            "events_processed": processed,
            "reaction_decisions": decisions,
            "ticks": ticks,
            "elapsed_ms": elapsed.as_millis() as u64,
            "events_per_s": round2(processed as f64 / elapsed.as_secs_f64()),
            "event_batch": policy.heartbeat.event_batch,
        }),
    )
    .await;
    scratch.drop().await;
    Ok(out)
}
