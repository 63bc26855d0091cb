//! Test support: a fresh PostgreSQL database per test, the real binary, a test policy.
//!
//! The server is `DATABASE_URL` when set (CI points it at the machine's PostgreSQL),
//! else an embedded cluster this test binary starts in a temp dir and stops at exit.
#![allow(dead_code)]

pub mod fake_telegram;
pub mod pgbouncer;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use opsloop::db::embedded::EmbeddedPostgres;
use opsloop::domain::policy::Policy;
use sqlx::PgPool;

static SERVER: OnceLock<String> = OnceLock::new();
static EMBEDDED: Mutex<Option<(EmbeddedPostgres, PathBuf)>> = Mutex::new(None);
static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

extern "C" fn stop_embedded() {
    if let Ok(mut guard) = EMBEDDED.lock()
        && let Some((mut cluster, dir)) = guard.take()
    {
        cluster.stop();
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The admin URL of the test server, without a database name: `(base, query)`.
fn server() -> &'static str {
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL")
            && !url.trim().is_empty()
        {
            return url;
        }
        let dir = std::env::temp_dir().join(format!("opsloop-test-pg-{}", std::process::id()));
        let cluster = EmbeddedPostgres::start(&dir).expect("start the embedded test cluster");
        let url = cluster.url("postgres");
        *EMBEDDED.lock().expect("lock") = Some((cluster, dir));
        // SAFETY: registering a plain extern "C" fn with no arguments.
        unsafe { libc::atexit(stop_embedded) };
        url
    })
}

pub use opsloop::db::with_database;

async fn admin() -> PgPool {
    opsloop::db::connect(server(), 2)
        .await
        .expect("connect to the test server")
}

/// A migrated template database, made once per test binary.
async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let name = format!("opsloop_tpl_{}", std::process::id());
            let admin = admin().await;
            drop_leftovers(&admin).await;
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&admin)
                .await;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&admin)
                .await
                .expect("create template");
            let pool = opsloop::db::connect(&with_database(server(), &name), 1)
                .await
                .expect("connect template");
            opsloop::db::migrate(&pool).await.expect("migrate template");
            pool.close().await;
            admin.close().await;
            name
        })
        .await
}

/// Databases of earlier test runs whose process is gone (tests don't drop their own:
/// a failed test's database is worth looking at until the next run).
async fn drop_leftovers(admin: &PgPool) {
    let names: Vec<String> = sqlx::query_scalar(
        r"SELECT datname FROM pg_database WHERE datname ~ '^opsloop_(t|tpl)_\d+(_\d+)?$'",
    )
    .fetch_all(admin)
    .await
    .unwrap_or_default();
    for name in names {
        let pid = name.split('_').nth(2).unwrap_or_default();
        if Path::new("/proc").join(pid).exists() {
            continue; // another test binary is running
        }
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(admin)
            .await;
    }
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

pub async fn test_db() -> TestDb {
    // The code under test logs through tracing; show it with the test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let template = template().await;
    let name = format!(
        "opsloop_t_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let admin = admin().await;
    // Concurrent clones of one template can collide briefly; retry.
    let mut tries = 0;
    loop {
        match sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&admin)
            .await
        {
            Ok(_) => break,
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("create test database: {e}"),
        }
    }
    admin.close().await;
    let url = with_database(server(), &name);
    let pool = opsloop::db::connect(&url, 10)
        .await
        .expect("connect test database");
    TestDb { pool, url, name }
}

/// The policy most tests use: one template per risk tier, gates, a reaction, a trigger.
pub const POLICY: &str = r#"
[approval]
ttl = "1h"
auto_approve = ["low"]
high = { approvals = 1, self_approval = true }
red  = { approvals = 2, self_approval = false }

[gates]
max_pending = 5
pause_after_failures = 2

[gates.templates.capped]
daily_cap = 2

[gates.templates.cool]
cooldown = "1h"

[gates.templates.single]
max_running = 1

[worker]
concurrency = 4
lease = "5m"
max_attempts = 3
backoff = { base = "100ms", max = "1s" }

[heartbeat]
interval = "1s"

[templates.hello]
description = "Say hello"
risk = "low"
params.name = { pattern = '^[a-z]+$', help = "a lowercase name", default = "world" }
steps = [ { name = "greet", kind = "shell", run = ["echo", "hello {name}"] } ]

[templates.deploy]
description = "Deploy a tagged release"
risk = "high"
params.tag = { pattern = '^v\d+\.\d+\.\d+$', help = "release tag, e.g. v1.4.2" }
steps = [
  { name = "build", kind = "noop" },
  { name = "ship", kind = "noop" },
]

[templates.wipe]
description = "Dangerous"
risk = "red"
params.target = { pattern = '^[a-z]+$', help = "what to wipe" }
steps = [ { name = "wipe", kind = "noop" } ]

[templates.capped]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "s", kind = "noop" } ]

[templates.cool]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "s", kind = "noop" } ]

[templates.single]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "s", kind = "sleep", for = "1h" } ]

[templates.react]
risk = "low"
params.tag = { pattern = '^[a-z0-9.]+$', help = "a tag" }
steps = [ { name = "s", kind = "noop" } ]
"#;

pub fn policy() -> Policy {
    match opsloop::domain::policy::parse(POLICY) {
        Ok(p) => p,
        Err(problems) => panic!("test policy: {problems:?}"),
    }
}

/// Store the test policy in `db`.
pub async fn apply_policy(db: &TestDb) {
    opsloop::store::policy::apply(&db.pool, POLICY, "test")
        .await
        .expect("apply policy");
}

/// The real binary, with a clean environment pointing at `url`.
pub fn opsloop_cmd(url: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_opsloop"));
    for (key, _) in std::env::vars() {
        if key.starts_with("OPSLOOP_")
            || key.starts_with("TELEGRAM_")
            || key == "DATABASE_URL"
            || key == "OPS_KEY"
        {
            cmd.env_remove(key);
        }
    }
    if let Some(url) = url {
        cmd.env("DATABASE_URL", url);
    }
    cmd.env("OPSLOOP_LOG", "json");
    cmd
}

pub fn opsloop(url: &str, args: &[&str]) -> Output {
    opsloop_cmd(Some(url))
        .args(args)
        .output()
        .expect("run opsloop")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn write_temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("opsloop-test-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A proposal request as a person at the CLI would make it.
pub fn request(
    template: &str,
    params: &[(&str, &str)],
    by: &str,
) -> opsloop::engine::proposals::NewProposal {
    opsloop::engine::proposals::NewProposal {
        template: template.into(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        proposed_by: by.into(),
        source: opsloop::engine::proposals::Source::Cli,
        priority: None,
        may_raise_priority: false,
    }
}

/// Propose through the single entry point (as "test").
pub async fn propose(
    pool: &PgPool,
    policy: &Policy,
    template: &str,
    params: &[(&str, &str)],
) -> opsloop::engine::proposals::Proposed {
    opsloop::engine::proposals::propose(pool, policy, request(template, params, "test"))
        .await
        .expect("propose")
}

/// `opsloop run` with `policy`, talking to a (fake) Bot API; SIGTERM on drop.
pub struct Daemon(pub std::process::Child);

impl Daemon {
    pub fn start(
        db: &TestDb,
        fake: &fake_telegram::FakeTelegram,
        policy: &str,
        admins: &str,
    ) -> Daemon {
        let file = write_temp(&format!("daemon-{}.toml", db.name), policy);
        Daemon(
            opsloop_cmd(Some(&db.url))
                .args(["run", "--policy", path_str(&file)])
                .env("TELEGRAM_BOT_TOKEN", fake.token())
                .env("TELEGRAM_API_URL", fake.url().as_str())
                .env("OPSLOOP_ADMINS", admins)
                .env("OPSLOOP_HTTP_ADDR", "127.0.0.1:0")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn opsloop run"),
        )
    }

    pub fn signal(&mut self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, signal) };
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
    }
}

/// An HTTP server that records every `{n, seq}` POSTed to `/effect`, in memory (so it
/// keeps working while the database is down): the side effects of steps, to count.
pub struct Effects {
    pub port: u16,
    pub seen: std::sync::Arc<Mutex<Vec<(i64, i64)>>>,
}

impl Effects {
    pub async fn start() -> Effects {
        use axum::routing::post;
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/effect",
            post(move |body: axum::Json<serde_json::Value>| {
                let record = record.clone();
                async move {
                    let num = |k: &str| {
                        body[k]
                            .as_str()
                            .and_then(|s| s.parse::<i64>().ok())
                            .unwrap_or(-1)
                    };
                    if let Ok(mut seen) = record.lock() {
                        seen.push((num("n"), num("seq")));
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Effects { port, seen }
    }

    /// (total effects, distinct (n, seq) pairs)
    pub fn counts(&self) -> (usize, usize) {
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let distinct: std::collections::HashSet<_> = seen.iter().collect();
        (seen.len(), distinct.len())
    }

    /// Template steps that each POST their mission's `n` and their own seq here.
    pub fn steps(&self, count: u32) -> String {
        (1..=count)
            .map(|seq| {
                format!(
                    r#"{{ name = "s{seq}", kind = "http", method = "POST", url = "http://127.0.0.1:{}/effect", json = {{ n = "{{n}}", seq = "{seq}" }} }}"#,
                    self.port
                )
            })
            .collect::<Vec<_>>()
            .join(",\n  ")
    }
}
