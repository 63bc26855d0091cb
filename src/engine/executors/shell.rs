//! `shell` steps: an argv run directly (never through a shell) in a process group of
//! its own, so a timeout or a cancel kills everything it started. A step gets a clean
//! environment (a short allowlist of the daemon's, then its own `env` and the
//! `OPSLOOP_*` of its attempt) and, unless its spec names a `cwd`, a private working
//! directory of its own that is removed when the attempt ends: never the daemon's
//! secrets, its `.env` or its working directory.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Outcome, StepContext, Tail, human_duration, millis, param_env_name};
use crate::domain::outputs::{MAX_OUTPUT, Progress, parse_output};

/// The only variables of the daemon's environment a step inherits (plus every `LC_*`):
/// what programs need to find each other and speak the locale, nothing that configures
/// the daemon. Everything else, whether from the daemon's environment or its `.env`
/// (database passwords, cloud keys, the bot token), stays out.
pub const INHERITED_ENV: [&str; 8] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
];

/// `PATH` for a step when the daemon has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// After the main process exits, how long its output pipes may stay open (held by
/// background processes it left in its group) before the group is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// After a kill, how long to wait for the pipes to close before giving up on them
/// (a process that left the group with `setsid` may still hold them).
const KILL_GRACE: Duration = Duration::from_secs(1);

pub(super) async fn run(
    argv: &[String],
    cwd: Option<&str>,
    env: &BTreeMap<String, String>,
    timeout: Option<Duration>,
    ctx: &StepContext,
) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return Outcome::failed("cannot start: empty command");
    };
    if let Some(dir) = cwd
        && !Path::new(dir).is_dir()
    {
        return Outcome::failed(format!(
            "cannot start {program}: working directory {dir} does not exist"
        ));
    }
    // Held until the function returns (or its future is dropped): the private
    // directory is removed after the step's process group is gone.
    // Private to this attempt: the output file's home, and the working directory
    // unless the spec names one.
    let workdir = match WorkDir::create(ctx) {
        Ok(dir) => dir,
        Err(e) => {
            return Outcome::failed(format!(
                "cannot start {program}: cannot create its working directory in {}: {}",
                std::env::temp_dir().display(),
                io_reason(&e)
            ));
        }
    };
    let output_file = workdir.path.join("output");
    if let Err(e) = std::fs::File::create(&output_file) {
        return Outcome::failed(format!(
            "cannot start {program}: cannot create its output file: {}",
            io_reason(&e)
        ));
    }

    let dir = cwd.map(Path::new).unwrap_or(workdir.path.as_path());
    let inherited = inherited_env();
    // Found here on the step's own PATH, as the exec would: std spawns a program named
    // by path with posix_spawn (vfork), but forks the whole daemon for a bare name when
    // the environment is its own; a fork of a big threaded process costs more than the
    // step (copied page tables, TLB shootdowns).
    let step_path = env
        .get("PATH")
        .map(OsString::from)
        .or_else(|| {
            inherited
                .iter()
                .find(|(n, _)| n == "PATH")
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| DEFAULT_PATH.into());
    // From an absolute directory: a relative candidate would be taken from `dir` again
    // by the child, which changes into `dir` before it execs.
    let search_from = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let Some(executable) = find_program(program, &step_path, &search_from) else {
        return Outcome::failed(format!("cannot start {program}: No such file or directory"));
    };
    let mut cmd = Command::new(&executable);
    cmd.arg0(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd.current_dir(dir);
    cmd.env_clear().envs(inherited).envs(env);
    for (name, value) in &ctx.params {
        cmd.env(param_env_name(name), value);
    }
    cmd.env("OPSLOOP_MISSION_ID", ctx.mission_id.to_string())
        .env("OPSLOOP_STEP_ID", ctx.step_id.to_string())
        .env("OPSLOOP_ATTEMPT", ctx.attempt.to_string())
        .env(super::ENV_OUTPUT, &output_file);
    if let Some(ask) = &ctx.ask {
        cmd.env(super::ENV_ASK_SOCKET, &ask.socket)
            .env(super::ENV_ASK_TOKEN, &ask.token);
    }

    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return Outcome::failed(format!("cannot start {program}: {}", io_reason(&e))),
    };
    let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) else {
        return Outcome::failed(format!("cannot start {program}: no process id"));
    };
    // process_group(0): the child leads a new group whose id is its pid.
    let mut group = GroupGuard {
        pgid: pid,
        armed: true,
    };
    tracing::debug!(program = %program, pid, step_id = ctx.step_id, "shell step started");

    let mut stdout = Reader::spawn(child.stdout.take(), ctx.progress.clone());
    let mut stderr = Reader::spawn(child.stderr.take(), None);

    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    #[derive(Clone, Copy)]
    enum End {
        Exited,
        TimedOut,
        Cancelled,
    }
    let (mut end, exited) = tokio::select! {
        biased;
        _ = ctx.cancel.cancelled() => (End::Cancelled, None),
        status = child.wait() => (End::Exited, Some(status)),
        _ = deadline => (End::TimedOut, None),
    };
    let status = match exited {
        Some(status) => {
            // The leader is gone; leftovers that still hold our pipes get a grace
            // period, then the group is killed so the step can finish. A cancel
            // meanwhile kills them at once: the step has not finished.
            let drained = tokio::select! {
                biased;
                _ = ctx.cancel.cancelled() => {
                    end = End::Cancelled;
                    false
                }
                drained = both_done(&mut stdout, &mut stderr, EXIT_GRACE) => drained,
            };
            if !drained {
                group.kill();
            }
            status
        }
        None => {
            // Kill before reaping: the unreaped leader keeps the group id reserved.
            group.kill();
            child.wait().await
        }
    };
    group.armed = false;
    both_done(&mut stdout, &mut stderr, KILL_GRACE).await;
    let (out, err) = (stdout.finish(), stderr.finish());
    let output = match (&end, &status) {
        (End::Exited, Ok(s)) if s.code() == Some(0) => Some(read_output(&output_file).await),
        _ => None,
    };
    workdir.remove().await;

    let (exit_code, signal) = match &status {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    };
    let result = json!({
        "exit_code": exit_code,
        "signal": signal,
        "stdout": out.text(),
        "stderr": err.text(),
        "truncated": { "stdout": out.truncated(), "stderr": err.truncated() },
        "duration_ms": millis(started.elapsed()),
    });
    tracing::debug!(
        pid,
        ?exit_code,
        ?signal,
        step_id = ctx.step_id,
        "shell step ended"
    );

    match end {
        End::Cancelled => Outcome::Cancelled { result },
        End::TimedOut => Outcome::Failed {
            error: format!(
                "timed out after {}",
                human_duration(timeout.unwrap_or_default())
            ),
            result,
        },
        End::Exited => match (status, exit_code, signal) {
            (Err(e), _, _) => Outcome::Failed {
                error: format!("cannot wait for {program}: {}", io_reason(&e)),
                result,
            },
            (Ok(_), Some(0), _) => match output {
                Some(Ok(output)) => Outcome::Succeeded { result, output },
                Some(Err(why)) => failed(why, result),
                None => failed("no output read".into(), result),
            },
            (Ok(_), Some(code), _) => failed(format!("exit status {code}"), result),
            (Ok(_), None, Some(sig)) => failed(format!("killed by signal {sig}"), result),
            (Ok(s), None, None) => failed(format!("ended with {s}"), result),
        },
    }
}

/// The step's output file after a successful exit (docs/policy.md, "Outputs"); at most
/// one byte past the limit is read, so a huge file costs nothing.
async fn read_output(path: &Path) -> Result<Value, String> {
    let file = tokio::fs::File::open(path).await.map_err(|e| {
        format!(
            "cannot read the output file ${}: {}",
            super::ENV_OUTPUT,
            io_reason(&e)
        )
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_OUTPUT as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("cannot read the output file: {}", io_reason(&e)))?;
    if bytes.len() > MAX_OUTPUT {
        return Err(format!(
            "the output file holds more than {MAX_OUTPUT} bytes (64 KiB), the most an output may"
        ));
    }
    parse_output(&bytes).map(Value::Object)
}

fn failed(error: String, result: Value) -> Outcome {
    Outcome::Failed { error, result }
}

/// "No such file or directory", without Rust's " (os error 2)" suffix.
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Where `program` is, as `execvp` would look for it: a name with a slash as it is, else
/// the first executable file of that name in `path`'s directories (an empty or relative
/// one is taken from `cwd`, the step's working directory). None: nowhere.
pub(crate) fn find_program(program: &str, path: &OsStr, cwd: &Path) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    if program.is_empty() {
        return None;
    }
    std::env::split_paths(path)
        .map(|dir| cwd.join(dir).join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The part of the daemon's environment a step inherits (`INHERITED_ENV`, `LC_*`).
fn inherited_env() -> Vec<(OsString, OsString)> {
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(name, _)| {
            name.to_str()
                .is_some_and(|name| INHERITED_ENV.contains(&name) || name.starts_with("LC_"))
        })
        .collect();
    if !vars.iter().any(|(name, _)| name == "PATH") {
        vars.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    vars
}

/// A step's private working directory (mode 0700, in the system's temp dir), removed
/// with what the step left in it: by `remove` when the attempt ends, else on drop (the
/// step's future dropped midway).
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create(ctx: &StepContext) -> std::io::Result<WorkDir> {
        let base = std::env::temp_dir();
        loop {
            let path = base.join(format!(
                "opsloop-step-{}-{}-{:08x}",
                ctx.step_id,
                ctx.attempt,
                rand::random::<u32>()
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(WorkDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Remove it before the attempt's outcome is reported, off the async threads (a step
    /// may leave a big tree behind).
    async fn remove(mut self) {
        let path = std::mem::take(&mut self.path);
        let _ = tokio::task::spawn_blocking(move || remove_tree(&path)).await;
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return; // removed already
        }
        let path = std::mem::take(&mut self.path);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || remove_tree(&path))),
            Err(_) => remove_tree(&path),
        }
    }
}

fn remove_tree(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %path.display(), error = %e, "cannot remove a step's working directory");
    }
}

/// Kills the step's whole process group, including when the step's future is dropped
/// midway (the worker's task aborted): no process outlives its step by accident.
struct GroupGuard {
    pgid: libc::pid_t,
    armed: bool,
}

impl GroupGuard {
    fn kill(&self) {
        if self.pgid > 1 {
            // SAFETY: kill(2) has no memory-safety preconditions; a negative pid
            // addresses the process group. ESRCH (already gone) is fine.
            unsafe {
                libc::kill(-self.pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

/// Drains one pipe into a bounded `Tail` on its own task, so stdout and stderr are
/// read concurrently and a full pipe never blocks the child.
struct Reader {
    tail: Arc<Mutex<Tail>>,
    task: Option<JoinHandle<()>>,
}

impl Reader {
    /// With `progress`, `::progress` lines are picked out of the stream as it passes.
    fn spawn<R: AsyncRead + Unpin + Send + 'static>(
        pipe: Option<R>,
        progress: Option<ProgressSink>,
    ) -> Reader {
        let tail = Arc::new(Mutex::new(Tail::new()));
        let task = pipe.map(|mut pipe| {
            let tail = Arc::clone(&tail);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut lines = progress.map(Lines::new);
                loop {
                    match pipe.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            lock(&tail).push(&buf[..n]);
                            if let Some(lines) = lines.as_mut() {
                                lines.feed(&buf[..n]);
                            }
                        }
                    }
                }
            })
        });
        Reader { tail, task }
    }

    /// Waits until `until` for the pipe to reach end of file; true when it did.
    async fn wait_until(&mut self, until: Instant) -> bool {
        let Some(task) = self.task.as_mut() else {
            return true;
        };
        let done = tokio::time::timeout_at(until, task).await.is_ok();
        if done {
            self.task = None;
        }
        done
    }

    fn finish(mut self) -> Tail {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        std::mem::replace(&mut *lock(&self.tail), Tail::new())
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

type ProgressSink = Arc<tokio::sync::watch::Sender<Option<Progress>>>;

/// Splits a stream into lines for `::progress`, keeping at most one short line
/// buffered: a line too long to be progress is skipped to its end.
struct Lines {
    sink: ProgressSink,
    line: Vec<u8>,
    skipping: bool,
}

/// A progress line is short; anything longer is ordinary output.
const MAX_PROGRESS_LINE: usize = 1024;

impl Lines {
    fn new(sink: ProgressSink) -> Lines {
        Lines {
            sink,
            line: Vec::new(),
            skipping: false,
        }
    }

    fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let end = chunk.iter().position(|b| *b == b'\n');
            let (part, rest) = match end {
                Some(i) => (&chunk[..i], &chunk[i + 1..]),
                None => (chunk, &[][..]),
            };
            if !self.skipping {
                if self.line.len() + part.len() > MAX_PROGRESS_LINE {
                    self.skipping = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            if end.is_some() {
                if !self.skipping {
                    let line = String::from_utf8_lossy(&self.line);
                    if let Some(p) = Progress::parse(line.trim_end_matches('\r')) {
                        // Only the latest matters: the worker writes it down at its pace.
                        self.sink.send_replace(Some(p));
                    }
                }
                self.line.clear();
                self.skipping = false;
            }
            chunk = rest;
        }
    }
}

fn lock(tail: &Mutex<Tail>) -> std::sync::MutexGuard<'_, Tail> {
    tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits up to `grace` for both pipes to reach end of file; true when they did.
async fn both_done(a: &mut Reader, b: &mut Reader, grace: Duration) -> bool {
    let until = Instant::now() + grace;
    let a_done = a.wait_until(until).await;
    let b_done = b.wait_until(until).await;
    a_done && b_done
}
