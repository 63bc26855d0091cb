//! The machine's process-spawn limit, for `bench worker --kind shell` to be read
//! against in the same run: `true` spawned `count` times with `workers` at once, the
//! way the shell executor spawns (found on PATH first, own process group, clean
//! environment, piped output read to the end, reaped) minus opsloop, and by `xargs -P`
//! as a second opinion.

use std::process::Stdio;
use std::time::Instant;

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::round2;
use crate::engine::executors::find_program;

pub(super) struct Limit {
    /// Spawns per second from this process, as the shell executor spawns.
    rust_per_s: f64,
    /// Spawns per second by `xargs -P workers -n1 true` (None: no xargs here).
    xargs_per_s: Option<f64>,
}

impl Limit {
    /// The figures, with `steps_per_s` (the shell steps' rate) as ratios of each.
    pub(super) fn figures(&self, steps_per_s: f64) -> Value {
        json!({
            "rust_spawns_per_s": round2(self.rust_per_s),
            "xargs_spawns_per_s": self.xargs_per_s.map(round2),
            "ratio_to_rust": round2(steps_per_s / self.rust_per_s.max(1e-9)),
            "ratio_to_xargs": self.xargs_per_s.map(|x| round2(steps_per_s / x.max(1e-9))),
        })
    }
}

pub(super) async fn limit(count: u32, workers: u32) -> anyhow::Result<Limit> {
    let started = Instant::now();
    let mut loops = tokio::task::JoinSet::new();
    for w in 0..workers {
        // Spread `count` over the loops as evenly as it goes.
        let mine = count / workers + u32::from(w < count % workers);
        loops.spawn(async move {
            for _ in 0..mine {
                spawn_true().await?;
            }
            Ok::<(), std::io::Error>(())
        });
    }
    while let Some(done) = loops.join_next().await {
        done??;
    }
    let rust_per_s = f64::from(count) / started.elapsed().as_secs_f64().max(1e-9);

    let started = Instant::now();
    let xargs = Command::new("sh")
        .arg("-c")
        .arg(format!("seq 1 {count} | xargs -P {workers} -n1 true"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    let xargs_per_s = match xargs {
        Ok(status) if status.success() => {
            Some(f64::from(count) / started.elapsed().as_secs_f64().max(1e-9))
        }
        _ => None,
    };
    Ok(Limit {
        rust_per_s,
        xargs_per_s,
    })
}

/// One `true`, spawned as the shell executor spawns a step.
async fn spawn_true() -> std::io::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    let cwd = std::env::temp_dir();
    let program = find_program("true", &path, &cwd)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no `true` on PATH"))?;
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", path);
    let mut child = cmd.spawn()?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    if let Some(mut pipe) = child.stdout.take() {
        pipe.read_to_end(&mut out).await?;
    }
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_end(&mut err).await?;
    }
    child.wait().await?;
    Ok(())
}
