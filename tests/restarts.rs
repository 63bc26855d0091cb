//! Graceful shutdown and restart loops (issue 14): `opsloop run` is started and sent
//! SIGTERM over and over while missions keep arriving. Every cycle exits 0, every
//! step's side effect happens exactly once, and no step process is left behind; with
//! the embedded cluster, no PostgreSQL process outlives the daemon that started it.
//!
//! `OPSLOOP_TEST_CYCLES` sets the number of cycles (default 50).

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::{Effects, TestDb, opsloop_cmd, path_str, test_db, write_temp};

fn policy(effects: &Effects, marker: &str) -> String {
    format!(
        r#"
[gates]
max_pending = 100000

[worker]
concurrency = 8
lease = "60s"

[heartbeat]
interval = "300ms"

[templates.fan]
risk = "low"
params.n = {{ pattern = '^\d+$', help = "n" }}
steps = [
  {},
  {{ name = "proc", kind = "shell", run = ["sh", "-c", "sleep 0.3", "{marker}"] }},
]
"#,
        effects.steps(2)
    )
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// Processes whose command line contains `marker` (step processes left behind).
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(marker) {
                found.push(format!("{pid}: {text}"));
            }
        }
    }
    found
}

/// Start `opsloop run` and wait until its /healthz answers.
async fn start(cmd: &mut std::process::Command, addr: &str) -> Child {
    let mut child = cmd.spawn().expect("spawn opsloop run");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("http://{addr}/healthz")).send().await
            && r.status().is_success()
        {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("opsloop run exited during start-up: {status}");
        }
        assert!(Instant::now() < deadline, "opsloop run did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then the exit code (within a generous limit).
async fn terminate(mut child: Child) -> Option<i32> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("opsloop run did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("join")
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_and_start_cycles_under_load_lose_double_and_leave_nothing() {
    let cycles: usize = std::env::var("OPSLOOP_TEST_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let db = test_db().await;
    let effects = Effects::start().await;
    let marker = format!("opsloop-restart-step-{}", db.name);
    let source = policy(&effects, &marker);
    let file = write_temp(&format!("restarts-{}.toml", db.name), &source);
    let policy = opsloop::domain::policy::parse(&source).expect("policy");
    let started = Instant::now();
    let mut proposed = 0i64;
    for cycle in 0..cycles {
        let addr = free_addr();
        let mut cmd = opsloop_cmd(Some(&db.url));
        cmd.args(["run", "--policy", path_str(&file)])
            .env("OPSLOOP_HTTP_ADDR", &addr)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = start(&mut cmd, &addr).await;
        // Work arrives while it runs; it is stopped at a different moment each cycle.
        for _ in 0..4 {
            support::propose(&db.pool, &policy, "fan", &[("n", &proposed.to_string())]).await;
            proposed += 1;
        }
        tokio::time::sleep(Duration::from_millis(150 + 150 * (cycle as u64 % 5))).await;
        let code = terminate(child).await;
        assert_eq!(
            code,
            Some(0),
            "cycle {cycle}: SIGTERM should end opsloop run cleanly"
        );
    }
    let cycling = started.elapsed();
    // One last daemon finishes what is left.
    let addr = free_addr();
    let mut cmd = opsloop_cmd(Some(&db.url));
    cmd.args(["run", "--policy", path_str(&file)])
        .env("OPSLOOP_HTTP_ADDR", &addr)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let last = start(&mut cmd, &addr).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = count(
            &db,
            "SELECT count(*) FROM ops_missions WHERE status = 'succeeded'",
        )
        .await;
        if done >= proposed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {proposed} missions succeeded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(terminate(last).await, Some(0));
    let (total, distinct) = effects.counts();
    assert_eq!(distinct as i64, proposed * 2, "every http step ran");
    assert_eq!(total, distinct, "no step ran twice");
    let attempts = count(
        &db,
        "SELECT count(*) FROM ops_mission_steps WHERE attempts > 1",
    )
    .await;
    let left = processes_with(&marker);
    assert!(left.is_empty(), "step processes left behind: {left:?}");
    println!(
        "{cycles} SIGTERM/start cycles in {cycling:?}: {proposed} missions, every effect once, \
         {attempts} step(s) claimed again after a shutdown gave them back, no step process left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_cluster_stops_with_the_daemon_every_time() {
    if std::process::Command::new("sh")
        .args(["-c", "ls /usr/lib/postgresql/*/bin/initdb"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(true, |s| !s.success())
    {
        println!("SKIPPED: no PostgreSQL server binaries for the embedded cluster");
        return;
    }
    let dir = std::env::temp_dir().join(format!("opsloop-restart-embedded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.to_str().expect("utf-8").to_string();
    for cycle in 0..5 {
        let addr = free_addr();
        let mut cmd = opsloop_cmd(None);
        cmd.args(["run"])
            .env("OPSLOOP_DATA_DIR", &data)
            .env("OPSLOOP_HTTP_ADDR", &addr)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = start(&mut cmd, &addr).await;
        assert!(
            !processes_with(&data).is_empty(),
            "cycle {cycle}: no embedded PostgreSQL process found for {data}"
        );
        assert_eq!(terminate(child).await, Some(0), "cycle {cycle}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = processes_with(&data);
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the embedded cluster outlived the daemon: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
