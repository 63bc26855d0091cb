//! peer-bench: no-op job throughput and idle pickup latency of the `graphile_worker`
//! crate, measured the same way `opsloop bench worker` measures opsloop's worker.
//!
//! For each case (`tuned`, `default`):
//!   1. drop and recreate the peer's schema (default `graphile_worker`) and migrate it;
//!   2. enqueue N no-op jobs with the bulk API (`add_raw_jobs`, chunks of 5,000),
//!      then `ANALYZE` the jobs table — all before the timer;
//!   3. start a worker at concurrency C; the timer runs from `run()` until the
//!      handler has run N times AND the jobs table is empty (graphile_worker deletes
//!      a job when its completion is persisted, batched or not);
//!   4. with the worker now idle, adds `--latency-samples` jobs one at a time
//!      (5–15 ms apart, each after the previous one ran) and records
//!      handler start − job `run_at` (the insert's `now()`): pickup p50/p99;
//!   5. shuts the worker down and drops the schema.
//!
//! One JSON line per case on stdout; progress goes to stderr.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graphile_worker::{
    IntoTaskHandlerResult, JobSpec, LocalQueueConfig, RawJobSpec, TaskHandler,
    WorkerContext, WorkerOptions, WorkerUtils,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};

const GW_VERSION: &str = env!("GRAPHILE_WORKER_VERSION");
const IDENT: &str = "noop";
const ENQUEUE_CHUNK: usize = 5_000;

// ---------------------------------------------------------------- task

#[derive(Deserialize, Serialize, Clone, Debug)]
struct Noop {}

/// Shared with the handler through a worker extension. No lifecycle hook is
/// registered: with any hook present graphile_worker emits per-job hook events,
/// which would cost the peer throughput it does not pay in normal use.
#[derive(Clone, Debug)]
struct Probe {
    /// handler runs so far (throughput phase)
    ran: Arc<AtomicU64>,
    target: u64,
    all_ran: Arc<tokio::sync::Notify>,
    /// armed only during the latency phase: the handler reports (now − run_at)
    armed: Arc<AtomicBool>,
    tx: tokio::sync::mpsc::UnboundedSender<f64>,
}

impl TaskHandler for Noop {
    const IDENTIFIER: &'static str = IDENT;

    async fn run(self, ctx: WorkerContext) -> impl IntoTaskHandlerResult {
        if let Some(p) = ctx.get_ext::<Probe>() {
            if p.ran.fetch_add(1, Ordering::Relaxed) + 1 == p.target {
                p.all_ran.notify_one();
            }
            if p.armed.load(Ordering::Relaxed) {
                let now = chrono::Utc::now();
                let ms = (now - *ctx.job().run_at()).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                let _ = p.tx.send(ms);
            }
        }
        Ok::<(), String>(())
    }
}

// ---------------------------------------------------------------- args

#[derive(Clone, Debug)]
struct Tuned {
    lq_size: usize,
    lq_count: usize,
    batch_delay_ms: u64,
    poll_ms: u64,
    max_conn: u32,
}

#[derive(Clone, Debug)]
struct Args {
    jobs: usize,
    concurrency: usize,
    database_url: String,
    schema: String,
    cases: Vec<String>,
    latency_samples: usize,
    time_limit_s: u64,
    tuned: Tuned,
}

fn usage() -> ! {
    eprintln!(
        "usage: peer-bench --jobs N --concurrency C [--database-url URL] [--case tuned|default|both]\n\
         \x20                 [--latency-samples K] [--time-limit-s T] [--schema NAME]\n\
         \x20                 [--lq-size S] [--lq-count Q] [--batch-delay-ms D] [--poll-ms P] [--max-conn M]\n\
         defaults: --jobs 20000 --concurrency 16 --case both --latency-samples 200 --time-limit-s 20\n\
         \x20         --database-url $DATABASE_URL (else postgres://postgres@127.0.0.1:5432/postgres)\n\
         \x20         tuned: --lq-size 1000 --lq-count 2 --batch-delay-ms 2 --poll-ms 100 --max-conn 20"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        jobs: 20_000,
        concurrency: 16,
        database_url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        schema: "graphile_worker".into(),
        cases: vec!["tuned".into(), "default".into()],
        latency_samples: 200,
        time_limit_s: 20,
        tuned: Tuned { lq_size: 1000, lq_count: 2, batch_delay_ms: 2, poll_ms: 100, max_conn: 20 },
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            usage();
        }
        let val = it.next().unwrap_or_else(|| {
            eprintln!("peer-bench: {flag} needs a value");
            usage()
        });
        let num = |v: &str| -> u64 {
            v.parse().unwrap_or_else(|_| {
                eprintln!("peer-bench: {flag}: not a number: {v}");
                usage()
            })
        };
        match flag.as_str() {
            "--jobs" => a.jobs = num(&val) as usize,
            "--concurrency" => a.concurrency = num(&val) as usize,
            "--database-url" => a.database_url = val,
            "--schema" => a.schema = val,
            "--latency-samples" => a.latency_samples = num(&val) as usize,
            "--time-limit-s" => a.time_limit_s = num(&val).max(1),
            "--case" => {
                a.cases = match val.as_str() {
                    "both" => vec!["tuned".into(), "default".into()],
                    "tuned" | "default" => vec![val],
                    _ => usage(),
                }
            }
            "--lq-size" => a.tuned.lq_size = num(&val) as usize,
            "--lq-count" => a.tuned.lq_count = num(&val) as usize,
            "--batch-delay-ms" => a.tuned.batch_delay_ms = num(&val),
            "--poll-ms" => a.tuned.poll_ms = num(&val),
            "--max-conn" => a.tuned.max_conn = num(&val) as u32,
            _ => {
                eprintln!("peer-bench: unknown flag {flag}");
                usage()
            }
        }
    }
    if a.jobs == 0 || a.concurrency == 0 {
        eprintln!("peer-bench: --jobs and --concurrency must be > 0");
        usage()
    }
    a
}

// ---------------------------------------------------------------- bench

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn run_case(args: &Args, case: &str, pg_version: &str) -> Result<Value, BoxErr> {
    let n = args.jobs;
    let c = args.concurrency;
    let schema = args.schema.as_str();
    let tuned = case == "tuned";
    let t = &args.tuned;
    // Our own small pool for setup, enqueueing and checks (not the worker's).
    let admin = PgPoolOptions::new().max_connections(2).connect(&args.database_url).await?;

    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {} CASCADE", quote_ident(schema))))
        .execute(&admin)
        .await?;
    let utils = WorkerUtils::new(admin.clone(), schema.to_string());
    utils.migrate().await?;

    // ---- enqueue (before the timer)
    let t_enq = Instant::now();
    let spec = JobSpec::default();
    let mut left = n;
    while left > 0 {
        let k = left.min(ENQUEUE_CHUNK);
        let batch: Vec<RawJobSpec> = (0..k)
            .map(|_| RawJobSpec { identifier: IDENT.into(), payload: json!({}), spec: spec.clone() })
            .collect();
        utils.add_raw_jobs(&batch).await?;
        left -= k;
    }
    let enqueue_ms = t_enq.elapsed().as_secs_f64() * 1000.0;
    sqlx::query(AssertSqlSafe(format!("ANALYZE {}._private_jobs", quote_ident(schema)))).execute(&admin).await?;
    let queued: i64 =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {}._private_jobs", quote_ident(schema))))
            .fetch_one(&admin)
            .await?;
    if queued as usize != n {
        return Err(format!("expected {n} queued jobs, found {queued}").into());
    }
    eprintln!("peer-bench[{case}]: enqueued {n} jobs in {enqueue_ms:.0} ms");

    // ---- worker
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<f64>();
    let probe = Probe {
        ran: Arc::new(AtomicU64::new(0)),
        target: n as u64,
        all_ran: Arc::new(tokio::sync::Notify::new()),
        armed: Arc::new(AtomicBool::new(false)),
        tx,
    };

    let mut opts = WorkerOptions::default()
        .schema(schema)
        .concurrency(c)
        .listen_os_shutdown_signals(false)
        .add_extension(probe.clone())
        .define_job::<Noop>();
    let settings;
    if tuned {
        let pool: PgPool = PgPoolOptions::new()
            .max_connections(t.max_conn)
            .connect(&args.database_url)
            .await?;
        opts = opts
            .pg_pool(pool)
            .poll_interval(Duration::from_millis(t.poll_ms))
            .complete_job_batch_delay(Duration::from_millis(t.batch_delay_ms))
            .fail_job_batch_delay(Duration::from_millis(t.batch_delay_ms))
            .local_queue(
                LocalQueueConfig::default()
                    .with_size(t.lq_size)
                    .with_queue_count(t.lq_count)
                    .with_ttl(Duration::from_secs(60)),
            );
        settings = json!({
            "local_queue": {"size": t.lq_size, "queue_count": t.lq_count, "ttl_s": 60, "refetch_delay": null},
            "complete_job_batch_delay_ms": t.batch_delay_ms,
            "fail_job_batch_delay_ms": t.batch_delay_ms,
            "poll_interval_ms": t.poll_ms,
            "max_pg_conn": t.max_conn,
            "use_notification_delivery": true,
        });
    } else {
        opts = opts.database_url(&args.database_url);
        settings = json!({
            "local_queue": null,
            "complete_job_batch_delay_ms": null,
            "fail_job_batch_delay_ms": null,
            "poll_interval_ms": 1000,
            "max_pg_conn": 20,
            "use_notification_delivery": true,
        });
    }
    let worker = Arc::new(opts.init().await?);

    let start = Instant::now();
    let handle = tokio::spawn({
        let worker = worker.clone();
        async move { worker.run().await }
    });
    let limit = Duration::from_secs(args.time_limit_s);
    let mut capped = false;
    let count_sql = format!("SELECT count(*) FROM {}._private_jobs", quote_ident(schema));
    // 1) wait until the handler has run N times ...
    while probe.ran.load(Ordering::Relaxed) < n as u64 {
        if handle.is_finished() {
            return Err(format!("worker exited early after {} jobs", probe.ran.load(Ordering::Relaxed)).into());
        }
        if start.elapsed() >= limit {
            capped = true;
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(20), probe.all_ran.notified()).await;
    }
    // 2) ... then until every completion is persisted (completed jobs are deleted).
    while !capped {
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(count_sql.clone())).fetch_one(&admin).await?;
        if left == 0 {
            break;
        }
        if start.elapsed() >= limit {
            capped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    let completed = if capped {
        let left: i64 = sqlx::query_scalar(AssertSqlSafe(count_sql.clone())).fetch_one(&admin).await?;
        n - (left.max(0) as usize).min(n)
    } else {
        n
    };
    let jobs_per_s = completed as f64 / elapsed.as_secs_f64();
    if capped {
        eprintln!(
            "peer-bench[{case}]: time limit ({} s) reached: {completed} of {n} jobs done ({jobs_per_s:.1} jobs/s); \
             reporting the partial rate",
            args.time_limit_s
        );
        // Stop feeding the throughput backlog so the latency phase sees an idle queue.
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {}._private_jobs WHERE locked_at IS NULL",
            quote_ident(schema)
        )))
        .execute(&admin)
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    } else {
        eprintln!(
            "peer-bench[{case}]: {n} jobs in {:.0} ms = {jobs_per_s:.0} jobs/s",
            elapsed.as_secs_f64() * 1000.0
        );
    }

    // ---- idle pickup latency: one job at a time on the now idle worker
    let mut lat = Vec::with_capacity(args.latency_samples);
    if args.latency_samples > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        probe.armed.store(true, Ordering::Relaxed);
        for i in 0..args.latency_samples {
            utils.add_raw_job(IDENT, json!({}), JobSpec::default()).await?;
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(ms)) => lat.push(ms),
                _ => return Err(format!("latency sample {i}: job not picked up within 10 s").into()),
            }
            // 5..15 ms gap (cheap deterministic jitter, avoids phase-locking with timers)
            tokio::time::sleep(Duration::from_micros(5_000 + (i as u64 * 7_919) % 10_000)).await;
        }
        probe.armed.store(false, Ordering::Relaxed);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let note = if capped && !tuned {
        Some(
            "graphile_worker without local_queue fetches one job per slot per wake-up \
             (NOTIFY or poll tick), so a pre-enqueued backlog drains at about \
             concurrency / poll_interval; partial rate over the time limit",
        )
    } else if capped {
        Some("time limit reached; partial rate")
    } else {
        None
    };

    worker.request_shutdown();
    match tokio::time::timeout(Duration::from_secs(30), handle).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("peer-bench[{case}]: worker shutdown error: {e}"),
        Ok(Err(e)) => eprintln!("peer-bench[{case}]: worker task panicked: {e}"),
        Err(_) => eprintln!("peer-bench[{case}]: worker did not stop within 30 s"),
    }
    drop(worker);
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {} CASCADE", quote_ident(schema))))
        .execute(&admin)
        .await?;
    admin.close().await;

    Ok(json!({
        "bench": "peer_graphile_worker",
        "case": case,
        "jobs": n,
        "completed": completed,
        "complete": !capped,
        "concurrency": c,
        "jobs_per_s": jobs_per_s.round(),
        "elapsed_ms": round2(elapsed.as_secs_f64() * 1000.0),
        "enqueue_ms": round2(enqueue_ms),
        "pickup_p50_ms": percentile(&lat, 50.0).map(round2),
        "pickup_p99_ms": percentile(&lat, 99.0).map(round2),
        "pickup_samples": lat.len(),
        "note": note,
        "version": GW_VERSION,
        "postgres": pg_version,
        "settings": settings,
    }))
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let pg_version = match async {
        let pool = PgPoolOptions::new().max_connections(1).connect(&args.database_url).await?;
        let v: String = sqlx::query_scalar("SHOW server_version").fetch_one(&pool).await?;
        pool.close().await;
        Ok::<_, sqlx::Error>(v)
    }
    .await
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("peer-bench: cannot connect to {}: {e}", args.database_url);
            std::process::exit(1);
        }
    };
    let mut failed = false;
    for case in &args.cases {
        match run_case(&args, case, &pg_version).await {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("peer-bench[{case}]: FAILED: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
