//! Embedded default database (docs/commands.md): a private PostgreSQL cluster under the data dir.
//! Layout: `DATA_DIR/pg` (PGDATA), socket in `DATA_DIR/run` (or `/tmp/opsloop-<hash>` when
//! that path is too long for a Unix socket), log `DATA_DIR/postgres.log`, start-up lock
//! `DATA_DIR/.pg-start.lock`. No TCP listener; superuser `opsloop`, trust auth.
//!
//! Long because starting a cluster safely (as root, reused, attached, adopted after a crash)
//! is one sequence of steps that reads best in one place.

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs::{self, File, Permissions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Cluster superuser created by initdb.
pub const SUPERUSER: &str = "opsloop";
/// Only names the socket file (`.s.PGSQL.<port>`): the server never listens on TCP.
const PORT: u16 = 5432;
const SOCKET_PATH_MAX: usize = 107;
const TIMEOUT: Duration = Duration::from_secs(60);
const LOG_ROTATE_BYTES: u64 = 16 << 20;

#[derive(thiserror::Error, Debug)]
pub enum EmbeddedError {
    #[error(
        "no PostgreSQL server binaries found (looked in PATH, pg_config --bindir, \
         /usr/lib/postgresql/*/bin): install them (Debian/Ubuntu: apt-get install postgresql) \
         or set DATABASE_URL"
    )]
    NoServerBinaries,
    #[error(
        "running as root but no unprivileged user (opsloop, postgres, nobody) exists to run \
         PostgreSQL as: create one (useradd --system opsloop) or set DATABASE_URL"
    )]
    NoUnprivilegedUser,
    /// What was done to which path, and the OS error.
    #[error("embedded PostgreSQL: {0}: {1}")]
    Io(String, #[source] io::Error),
    /// Which command failed, and the tail of its output/log.
    #[error("embedded PostgreSQL: {0} failed: {1}")]
    Command(String, String),
    #[error("embedded PostgreSQL: {0}")]
    Other(String),
}

/// `.at("create", path)?`: an I/O error naming what was done to which path.
trait At<T> {
    fn at(self, what: &str, path: &Path) -> Result<T, EmbeddedError>;
}
impl<T> At<T> for io::Result<T> {
    fn at(self, what: &str, path: &Path) -> Result<T, EmbeddedError> {
        self.map_err(|e| EmbeddedError::Io(format!("{what} {}", path.display()), e))
    }
}

pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    bindir: PathBuf,
    /// (uid, gid) the server tools run as when we are root.
    run_as: Option<(u32, u32)>,
    /// The socket dir is the /tmp fallback (removed once we stop the server).
    tmp_socket_dir: bool,
    /// We stop the server on drop (we started it, or adopted one whose starter is gone).
    started: bool,
    /// flock on `DATA_DIR/.pg-owner.lock`, held while we own the server.
    owner: Option<File>,
}

impl EmbeddedPostgres {
    /// Blocking: find binaries, initdb if needed, start (or attach to) the server, wait until ready.
    pub fn start(data_dir: &Path) -> Result<EmbeddedPostgres, EmbeddedError> {
        let t0 = Instant::now();
        fs::create_dir_all(data_dir).at("create", data_dir)?;
        let data_dir = fs::canonicalize(data_dir).at("resolve", data_dir)?;
        let bindir = find_server_bindir().ok_or(EmbeddedError::NoServerBinaries)?;
        let pgdata = data_dir.join("pg");

        // Serialise start-up between processes; the flock goes when `lock` drops (or we die).
        let lock_path = data_dir.join(".pg-start.lock");
        let lock = File::create(&lock_path).at("open", &lock_path)?;
        lock_exclusive(&lock).at("lock", &lock_path)?;

        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = root.then(|| server_user(&pgdata)).transpose()?;
        let (socket_dir, tmp_socket_dir) = socket_dir_for(&data_dir);
        let mut pg = EmbeddedPostgres {
            data_dir,
            pgdata,
            socket_dir,
            port: PORT,
            bindir,
            run_as,
            tmp_socket_dir,
            started: false,
            owner: None,
        };
        if let Some((uid, gid)) = run_as {
            pg.prepare_for_user(uid, gid)?;
        }
        if tmp_socket_dir {
            let dir = pg.socket_dir.display();
            tracing::info!(socket_dir = %dir, "data dir path too long for a Unix socket; socket goes under /tmp");
        }
        pg.ensure_socket_dir()?;

        if pg.attach_if_running()? {
            let owned = pg.try_own()?;
            let dir = pg.data_dir.display();
            if owned {
                // Its starter died without stopping it (kill -9, crash): nobody else will.
                pg.started = true;
                tracing::info!(data_dir = %dir, "adopted the embedded PostgreSQL left by a process that is gone");
            } else {
                tracing::info!(data_dir = %dir, "attached to the embedded PostgreSQL another process started");
            }
            return Ok(pg);
        }
        if !pg.pgdata.join("PG_VERSION").exists() {
            pg.initdb()?;
        }
        pg.write_config()?;
        let log = pg.data_dir.join("postgres.log");
        if fs::metadata(&log).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
            let _ = fs::rename(&log, log.with_extension("log.1"));
        }
        if log.exists() {
            pg.give(&log)?;
        }
        pg.try_own()?;
        pg.started = true; // from here on, Drop stops whatever may have come up
        let mut cmd = pg.cmd("pg_ctl");
        cmd.args(["start", "-l"]).arg(&log);
        cmd.arg("-D").arg(&pg.pgdata);
        cmd.args(["-w", "-s", "-t", &TIMEOUT.as_secs().to_string()]);
        let log_from = fs::metadata(&log).map_or(0, |m| m.len());
        pg.run(cmd, "pg_ctl start", Some((&log, log_from)))?;
        let ms = t0.elapsed().as_millis() as u64;
        tracing::info!(data_dir = %pg.data_dir.display(), elapsed_ms = ms, "started embedded PostgreSQL");
        Ok(pg)
    }

    /// sqlx/libpq URL: `postgres://opsloop@localhost/DB?host=/socket/dir&port=5432`.
    pub fn url(&self, database: &str) -> String {
        let db = pct(database.as_bytes(), false);
        let host = pct(self.socket_dir.as_os_str().as_bytes(), true);
        format!(
            "postgres://{SUPERUSER}@localhost/{db}?host={host}&port={}",
            self.port
        )
    }

    /// Stop the server if this value started it (fast, then immediate). Idempotent.
    pub fn stop(&mut self) {
        if !self.started {
            return;
        }
        self.started = false;
        let running = self.pgdata.join("postmaster.pid").exists();
        for mode in ["fast", "immediate"].into_iter().filter(|_| running) {
            let mut cmd = self.cmd("pg_ctl");
            cmd.arg("stop").arg("-D").arg(&self.pgdata);
            cmd.args(["-m", mode, "-w", "-s", "-t", &TIMEOUT.as_secs().to_string()]);
            match self.run(cmd, &format!("pg_ctl stop -m {mode}"), None) {
                Ok(()) => {
                    let dir = self.data_dir.display();
                    tracing::info!(data_dir = %dir, "stopped embedded PostgreSQL");
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "stopping embedded PostgreSQL"),
            }
        }
        self.owner = None;
        if self.tmp_socket_dir {
            let _ = fs::remove_dir(&self.socket_dir);
        }
    }

    /// True when this value will stop the server: it started it, or adopted a running one
    /// whose starting process is gone. False when attached to another live process's server.
    pub fn started_here(&self) -> bool {
        self.started
    }

    /// Take the owner lock unless a live process holds it.
    fn try_own(&mut self) -> Result<bool, EmbeddedError> {
        let path = self.data_dir.join(".pg-owner.lock");
        let file = File::create(&path).at("open", &path)?;
        // SAFETY: the descriptor is valid while `file` lives.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        self.owner = (rc == 0).then_some(file);
        Ok(rc == 0)
    }

    /// A server tool, run as the unprivileged user when we are root (std's `uid()` also
    /// drops supplementary groups when the parent is root).
    fn cmd(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(tool));
        cmd.stdin(Stdio::null()).current_dir(&self.data_dir);
        cmd.env("LC_MESSAGES", "C");
        for var in "PGDATA PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE".split(' ') {
            cmd.env_remove(var);
        }
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Run to completion; on failure, one line with the tail of its output (and of `log`).
    fn run(
        &self,
        mut cmd: Command,
        what: &str,
        log: Option<(&Path, u64)>,
    ) -> Result<(), EmbeddedError> {
        let out = cmd.output().at("run", Path::new(cmd.get_program()))?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        let mut detail = String::new();
        if let Some((log, from)) = log {
            text.push_str(&read_tail(log, from));
            detail = format!("; see {}", log.display());
        }
        let detail = format!("{} ({}){detail}", out.status, tail_lines(&text, 4));
        Err(EmbeddedError::Command(what.to_string(), detail))
    }

    fn initdb(&self) -> Result<(), EmbeddedError> {
        let t0 = Instant::now();
        // Into a scratch dir, then rename: an interrupted initdb never looks initialised.
        let tmp = self.data_dir.join("pg.initdb-tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).at("remove", &tmp)?;
        }
        if self.pgdata.exists() && fs::remove_dir(&self.pgdata).is_err() {
            return Err(EmbeddedError::Other(format!(
                "{} is not empty but has no PG_VERSION (not a cluster): move it away",
                self.pgdata.display()
            )));
        }
        let mut cmd = self.cmd("initdb");
        cmd.arg("-D").arg(&tmp);
        cmd.args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8"]);
        // --no-sync + one syncfs is ~3x faster than initdb's per-file fsyncs, and as durable.
        cmd.args(["--locale=C", "--no-sync"]);
        self.run(cmd, "initdb", None)?;
        let conf = tmp.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).at("read", &conf)?;
        text.push_str("\n# opsloop\ninclude_if_exists = 'opsloop.conf'\n");
        fs::write(&conf, text).at("write", &conf)?;
        sync_fs(&tmp).at("sync", &tmp)?;
        fs::rename(&tmp, &self.pgdata).at("rename", &tmp)?;
        let parent = File::open(&self.data_dir).and_then(|d| d.sync_all());
        parent.at("sync", &self.data_dir)?;
        let ms = t0.elapsed().as_millis() as u64;
        tracing::info!(pgdata = %self.pgdata.display(), elapsed_ms = ms, "initialised embedded PostgreSQL cluster");
        Ok(())
    }

    fn write_config(&self) -> Result<(), EmbeddedError> {
        let dir = self.socket_dir.to_string_lossy().replace('\'', "''");
        let text = format!(
            "# Written by opsloop at every start; edits here are lost (use ALTER SYSTEM).\n\
             listen_addresses = ''\nport = {}\nunix_socket_directories = '{dir}'\n\
             unix_socket_permissions = 0700\nmax_connections = 200\nshared_buffers = '128MB'\n",
            self.port
        );
        let path = self.pgdata.join("opsloop.conf");
        fs::write(&path, text).at("write", &path)?;
        self.give(&path)
    }

    /// If a live server owns PGDATA, wait until it answers and use its socket. Ok(false): start one.
    fn attach_if_running(&mut self) -> Result<bool, EmbeddedError> {
        let pidfile = self.pgdata.join("postmaster.pid");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let Ok(text) = fs::read_to_string(&pidfile) else {
                return Ok(false);
            };
            let lines: Vec<&str> = text.lines().map(str::trim).collect();
            let pid: i32 = lines.first().and_then(|p| p.parse().ok()).unwrap_or(0);
            if pid <= 0 || !process_alive(pid) {
                return Ok(false); // stale after a crash: postgres cleans it up on start
            }
            if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm"))
                && !matches!(comm.trim(), "postgres" | "postmaster")
            {
                // The pid was reused by an unrelated process (e.g. after a container restart);
                // postgres would refuse to start while that process lives.
                let process = comm.trim();
                tracing::warn!(
                    pid,
                    process,
                    "stale postmaster.pid names another process; moving it aside"
                );
                fs::rename(&pidfile, self.pgdata.join("postmaster.pid.stale"))
                    .at("rename", &pidfile)?;
                return Ok(false);
            }
            if let Some(port) = lines.get(3).and_then(|p| p.parse().ok()) {
                self.port = port;
            }
            if let Some(dir) = lines.get(4).filter(|d| d.starts_with('/')) {
                self.socket_dir = PathBuf::from(dir);
            }
            let ready = if self.bindir.join("pg_isready").is_file() {
                let mut cmd = self.cmd("pg_isready");
                cmd.arg("-h").arg(&self.socket_dir);
                cmd.args(["-p", &self.port.to_string()]);
                cmd.args(["-U", SUPERUSER, "-d", "postgres", "-t", "2"]);
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
                cmd.status().is_ok_and(|s| s.success())
            } else {
                lines.get(7) == Some(&"ready")
            };
            if ready {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Err(EmbeddedError::Other(format!(
                    "server pid {pid} owns {} but does not answer on {}; see {}",
                    self.pgdata.display(),
                    self.socket_dir.display(),
                    self.data_dir.join("postgres.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// As root: hand the data dir to the server user and make sure it can reach it.
    fn prepare_for_user(&self, uid: u32, gid: u32) -> Result<(), EmbeddedError> {
        self.give(&self.data_dir)?;
        let mut opened = Vec::new();
        for dir in self.data_dir.ancestors().skip(1) {
            let md = fs::metadata(dir).at("stat", dir)?;
            let bit = match (md.uid() == uid, md.gid() == gid) {
                (true, _) => 0o100,
                (false, true) => 0o010,
                (false, false) => 0o001,
            };
            if md.mode() & bit == 0 {
                let mode = Permissions::from_mode((md.mode() | bit) & 0o7777);
                fs::set_permissions(dir, mode).at("chmod", dir)?;
                opened.push(dir.display().to_string());
            }
        }
        if !opened.is_empty() {
            let dirs = opened.join(", ");
            tracing::warn!(
                uid,
                dirs,
                "added the search (x) permission to ancestors of the data dir so the PostgreSQL user can reach it"
            );
        }
        Ok(())
    }

    /// Create the socket dir (0700, owned by the server user) or check an existing one.
    fn ensure_socket_dir(&self) -> Result<(), EmbeddedError> {
        let dir = &self.socket_dir;
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => return self.give(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).at("create", dir),
        }
        let md = fs::symlink_metadata(dir).at("stat", dir)?;
        // SAFETY: geteuid has no preconditions.
        let want = self
            .run_as
            .map_or_else(|| unsafe { libc::geteuid() }, |(uid, _)| uid);
        if !md.is_dir() || (md.uid() != want && md.uid() != 0) {
            return Err(EmbeddedError::Other(format!(
                "socket dir {} is not a directory owned by uid {want}: remove it",
                dir.display()
            )));
        }
        self.give(dir)?;
        fs::set_permissions(dir, Permissions::from_mode(0o700)).at("chmod", dir)
    }

    /// chown to the server user when we are root; no-op otherwise.
    fn give(&self, path: &Path) -> Result<(), EmbeddedError> {
        match self.run_as {
            Some((uid, gid)) => chown(path, Some(uid), Some(gid)).at("chown", path),
            None => Ok(()),
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop()
    }
}

/// Server binaries: PATH (symlinks resolved), `pg_config --bindir`, /usr/lib/postgresql/*/bin
/// (highest version first). Returns the real directory holding initdb, pg_ctl and postgres.
pub fn find_server_bindir() -> Option<PathBuf> {
    let check = |dir: PathBuf| -> Option<PathBuf> {
        let real = fs::canonicalize(dir.join("pg_ctl"))
            .ok()?
            .parent()?
            .to_path_buf();
        let complete = ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|t| real.join(t).is_file());
        (dir.join("initdb").is_file() && complete).then_some(real)
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&path).find_map(check) {
        return Some(dir);
    }
    let pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = pg_config
        && out.status.success()
        && let Some(dir) = check(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    {
        return Some(dir);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|n| n.parse().ok()).collect();
            Some((version?, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.into_iter().rev().find_map(|(_, dir)| check(dir))
}

/// Who runs the server when we are root: the owner of an existing cluster, else the first
/// existing user of opsloop, postgres, nobody.
fn server_user(pgdata: &Path) -> Result<(u32, u32), EmbeddedError> {
    if let Ok(md) = fs::metadata(pgdata)
        && md.uid() != 0
    {
        return Ok((md.uid(), md.gid()));
    }
    ["opsloop", "postgres", "nobody"]
        .iter()
        .find_map(|name| lookup_user(name))
        .ok_or(EmbeddedError::NoUnprivilegedUser)
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: passwd is plain data; all-zero is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let (name, buf_len) = (cname.as_ptr(), buf.len());
    // SAFETY: every pointer is valid for the call; afterwards we only read integers.
    let rc = unsafe { libc::getpwnam_r(name, &mut pwd, buf.as_mut_ptr(), buf_len, &mut found) };
    (rc == 0 && !found.is_null() && pwd.pw_uid != 0).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// Blocking exclusive flock (std's `File::lock` needs Rust 1.89; the crate's MSRV is 1.88).
fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: the descriptor is valid while `file` lives.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Flush the file system holding `dir` (Linux: syncfs; elsewhere: sync).
fn sync_fs(dir: &Path) -> io::Result<()> {
    let dir = File::open(dir)?;
    // SAFETY: the descriptor is valid while `dir` lives; sync has no preconditions.
    #[cfg(target_os = "linux")]
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    #[cfg(not(target_os = "linux"))]
    let rc = {
        unsafe { libc::sync() };
        i32::from(dir.as_raw_fd() < 0)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// `DATA_DIR/run`, or `/tmp/opsloop-<fnv1a64(DATA_DIR)>` if the socket path would be too long.
fn socket_dir_for(data_dir: &Path) -> (PathBuf, bool) {
    let dir = data_dir.join("run");
    if dir.as_os_str().len() + format!("/.s.PGSQL.{PORT}").len() <= SOCKET_PATH_MAX {
        return (dir, false);
    }
    let bytes = data_dir.as_os_str().as_bytes().iter();
    let hash = bytes.fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    (PathBuf::from(format!("/tmp/opsloop-{hash:016x}")), true)
}

/// Percent-encode all but RFC 3986 unreserved characters (and '/' when asked).
fn pct(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// What was appended to `path` after offset `from` (at most its last 4 KiB).
fn read_tail(path: &Path, from: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = f.seek(SeekFrom::Start(from.max(len.saturating_sub(4096))));
        let _ = f.read_to_end(&mut buf);
    }
    format!("\n{}", String::from_utf8_lossy(&buf))
}

/// The last `n` non-empty lines of `text`, joined into one line.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
