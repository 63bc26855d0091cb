//! `opsloop bench` (README, "Performance"): measured on the database server it is given, in a
//! scratch database it creates and drops, one JSON line per case. Benchmarks measure;
//! no test asserts a time.

mod soak;

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

mod chat;
pub use chat::chat;
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

/// `bench worker`: N noop steps through the whole lifecycle with W concurrent slots.
pub async fn worker(
    db: &Database,
    steps: u32,
    workers: u32,
    steps_per_mission: u32,
    history: u32,
    open_questions: u32,
) -> anyhow::Result<Value> {
    if steps == 0 || workers == 0 || steps_per_mission == 0 {
        return Err(OpsError::bad_input(
            "--steps, --workers and --steps-per-mission must be at least 1",
        )
        .into());
    }
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    policy_store::apply(&pool, &bench_policy(workers, steps_per_mission, 0), "bench").await?;
    if history > 0 {
        preload_history(&pool, history).await?;
    }
    if open_questions > 0 {
        preload_questions(&pool, open_questions).await?;
    }
    let missions = steps.div_ceil(steps_per_mission);
    // Set up in bulk (not timed): approved proposals, running missions, their steps.
    sqlx::query(
        "WITH p AS (
            INSERT INTO ops_mission_proposals (template, params, risk, proposed_by, source, status, decided_at)
            SELECT 'bench', jsonb_build_object('n', g::text), 'low', 'bench', 'cli', 'approved', now()
            FROM generate_series(1, $1) g RETURNING id),
         m AS (
            INSERT INTO ops_missions (proposal_id, template, status, started_at)
            SELECT id, 'bench', 'running', now() FROM p RETURNING id)
         INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, status)
         SELECT m.id, s, 's' || s, 'noop', '{\"kind\":\"noop\"}', CASE WHEN s = 1 THEN 'queued' ELSE 'waiting' END
         FROM m, generate_series(1, $2) s",
    )
    .bind(missions as i32)
    .bind(steps_per_mission as i32)
    .execute(&pool)
    .await?;
    // As the peer's bench does after enqueueing: the planner sees the backlog.
    sqlx::query("ANALYZE ops_mission_proposals, ops_missions, ops_mission_steps")
        .execute(&pool)
        .await?;
    let total_steps = i64::from(missions) * i64::from(steps_per_mission);
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
            "SELECT EXISTS (SELECT 1 FROM ops_missions m WHERE m.status = 'running'
             AND NOT EXISTS (SELECT 1 FROM ops_mission_steps s WHERE s.mission_id = m.id AND s.status = 'asking'))",
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
    let out = line(
        &pool,
        json!({
            "bench": "worker",
            "steps": total_steps,
            "steps_succeeded": done,
            "workers": workers,
            "steps_per_mission": steps_per_mission,
            "history_steps": history,
            "open_questions": open_questions,
            "elapsed_ms": elapsed.as_millis() as u64,
            "steps_per_s": round2(done as f64 / elapsed.as_secs_f64()),
            "queue_wait_p50_ms": round2(percentile(&pickups, 50.0)),
            "queue_wait_p99_ms": round2(percentile(&pickups, 99.0)),
        }),
    )
    .await;
    scratch.drop().await;
    Ok(out)
}

/// Missions waiting on people: `n` missions whose one step is `asking`, each with its
/// open question (they hold no lease and no slot; the bench shows what they cost).
async fn preload_questions(pool: &PgPool, n: u32) -> anyhow::Result<()> {
    sqlx::query(
        "WITH p AS (
            INSERT INTO ops_mission_proposals (template, params, risk, proposed_by, source, status, decided_at)
            SELECT 'bench', jsonb_build_object('n', 'q' || g), 'low', 'bench', 'cli', 'approved', now()
            FROM generate_series(1, $1) g RETURNING id),
         m AS (
            INSERT INTO ops_missions (proposal_id, template, status, started_at)
            SELECT id, 'bench', 'running', now() FROM p RETURNING id),
         s AS (
            INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, status, attempts)
            SELECT m.id, 1, 'go', 'ask', '{\"kind\":\"ask\",\"question\":\"Go?\",\"choices\":[\"yes\",\"no\"]}', 'asking', 1
            FROM m RETURNING id, mission_id)
         INSERT INTO ops_questions (mission_id, step_id, asked_by, question, choices, audience)
         SELECT mission_id, id, 'step:' || id, 'Go?', '[\"yes\", \"no\"]', 'approvers' FROM s",
    )
    .bind(n as i32)
    .execute(pool)
    .await?;
    Ok(())
}

/// Finished work already in the tables (cost growth): `steps` succeeded steps, 100
/// per mission, each with its `step.succeeded` event, then VACUUM ANALYZE as a
/// long-running database would have had.
async fn preload_history(pool: &PgPool, steps: u32) -> anyhow::Result<()> {
    let missions = steps.div_ceil(100) as i32;
    sqlx::query(
        "WITH p AS (
            INSERT INTO ops_mission_proposals (template, params, risk, proposed_by, source, status, decided_at)
            SELECT 'bench', jsonb_build_object('n', 'old' || g), 'low', 'bench', 'cli', 'approved', now()
            FROM generate_series(1, $1) g RETURNING id)
         INSERT INTO ops_missions (proposal_id, template, status, started_at, finished_at)
         SELECT id, 'bench', 'succeeded', now(), now() FROM p",
    )
    .bind(missions)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO ops_mission_steps (mission_id, seq, name, kind, spec, status, attempts, started_at, finished_at)
         SELECT m.id, s, 's' || s, 'noop', '{\"kind\":\"noop\"}', 'succeeded', 1, now(), now()
         FROM ops_missions m, generate_series(1, 100) s",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO ops_agent_events (kind, source, mission_id, step_id, payload, processed_at)
         SELECT 'step.succeeded', 'worker', mission_id, id, jsonb_build_object('name', name), now()
         FROM ops_mission_steps",
    )
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE").execute(pool).await?;
    Ok(())
}

/// `bench latency`: on an idle daemon, propose (low risk) → first step started, and
/// step ready (committed) → started.
pub async fn latency(db: &Database, samples: u32) -> anyhow::Result<Value> {
    let samples = samples.clamp(10, 100_000);
    let scratch = Scratch::create(db).await?;
    let pool = scratch.pool.clone();
    let source = bench_policy(4, 1, 0);
    policy_store::apply(&pool, &source, "bench").await?;
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
