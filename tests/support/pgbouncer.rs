//! Debian's PgBouncer, started by a test on a loopback port in front of the test server,
//! with a default configuration apart from the pool mode.
//!
//! `start` returns `None` (and the test skips, saying why) only when the `pgbouncer`
//! binary is missing and `apt-get install pgbouncer` cannot install it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "/usr/sbin/pgbouncer";

pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    pub port: u16,
    /// The log PgBouncer writes (for a failing test's message).
    pub log: PathBuf,
}

/// Where PostgreSQL is, from a URL like `postgres://user@host:port/db`.
fn server_of(url: &str) -> (String, u16, String) {
    let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("server URL");
    let host = match opts.get_socket() {
        Some(dir) => dir.display().to_string(),
        None => opts.get_host().to_string(),
    };
    (host, opts.get_port(), opts.get_username().to_string())
}

fn installed() -> bool {
    if std::path::Path::new(BINARY).exists() {
        return true;
    }
    eprintln!("pgbouncer is not installed; trying apt-get install pgbouncer");
    let quiet = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let _ = quiet(&["install", "-y", "pgbouncer"])
        || (quiet(&["update"]) && quiet(&["install", "-y", "pgbouncer"]));
    std::path::Path::new(BINARY).exists()
}

/// The uid/gid PgBouncer runs as: it refuses to run as root.
fn nobody() -> (u32, u32) {
    // SAFETY: getpwnam with a NUL-terminated name; the result is read at once.
    unsafe {
        let pw = libc::getpwnam(c"nobody".as_ptr());
        if pw.is_null() {
            (65534, 65534)
        } else {
            ((*pw).pw_uid, (*pw).pw_gid)
        }
    }
}

impl PgBouncer {
    /// PgBouncer in `pool_mode` ("session" or "transaction") in front of the server of
    /// `server_url`; every database name is passed through as is.
    pub fn start(server_url: &str, pool_mode: &str) -> Option<PgBouncer> {
        if !installed() {
            eprintln!("SKIPPED: pgbouncer is not installed and apt-get install pgbouncer failed");
            return None;
        }
        let (host, port, user) = server_of(server_url);
        let free = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let listen = free.local_addr().expect("addr").port();
        drop(free);
        let dir =
            std::env::temp_dir().join(format!("opsloop-pgbouncer-{}-{listen}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        let log = dir.join("pgbouncer.log");
        // A plain configuration: defaults apart from where it listens, where the server
        // is, and the pool mode. `auth_type = any` logs in as the server's user.
        let ini = format!(
            "[databases]\n* = host={host} port={port} user={user}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen}\n\
             unix_socket_dir =\nauth_type = any\npool_mode = {pool_mode}\n\
             logfile = {}\n",
            log.display()
        );
        let config = dir.join("pgbouncer.ini");
        std::fs::write(&config, ini).expect("pgbouncer.ini");
        let (uid, gid) = nobody();
        // SAFETY: chown of paths we just created.
        unsafe {
            let dir_c = std::ffi::CString::new(dir.to_string_lossy().as_bytes()).expect("path");
            libc::chown(dir_c.as_ptr(), uid, gid);
        }
        use std::os::unix::process::CommandExt;
        let child = Command::new(BINARY)
            .arg(&config)
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgbouncer");
        let bouncer = PgBouncer {
            child,
            dir,
            port: listen,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen: {}",
                bouncer.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(bouncer)
    }

    /// `url` (a test database's) with its host and port replaced by PgBouncer's.
    pub fn url(&self, url: &str) -> String {
        let opts: sqlx::postgres::PgConnectOptions = url.parse().expect("URL");
        let db = opts.get_database().unwrap_or("postgres");
        format!(
            "postgres://{}@127.0.0.1:{}/{db}",
            opts.get_username(),
            self.port
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
