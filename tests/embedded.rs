//! Real start/stop tests against the PostgreSQL server binaries on this machine.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use opsloop::db::embedded::{EmbeddedError, EmbeddedPostgres, find_server_bindir};

/// A temp dir (mode 0700, owned by us) removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = PathBuf::from(format!("/tmp/opsloop-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        TempDir(dir)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn psql(url: &str, sql: &str) -> Result<String, String> {
    let psql = find_server_bindir().unwrap().join("psql");
    let out = Command::new(psql)
        .args([url, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn postmaster_pid(data_dir: &Path) -> u32 {
    let text = fs::read_to_string(data_dir.join("pg/postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

fn proc_status(pid: u32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line[key.len()..].trim().to_string()
}

fn is_root() -> bool {
    fs::metadata("/proc/self").unwrap().uid() == 0
}

#[test]
fn finds_server_binaries() {
    let dir = find_server_bindir().expect("server binaries on this machine");
    assert!(dir.join("initdb").is_file() && dir.join("pg_ctl").is_file());
    let msg = EmbeddedError::NoServerBinaries.to_string();
    assert!(!msg.contains('\n') && msg.contains("DATABASE_URL") && msg.contains("apt-get"));
}

#[test]
fn lifecycle_attach_restart_under_private_parent() {
    // The parent is 0700 and owned by root: the server user must be given o+x on it.
    let tmp = TempDir::new("life");
    let data = tmp.0.join("data");

    let t = Instant::now();
    let mut pg = EmbeddedPostgres::start(&data).unwrap();
    eprintln!("first start (initdb): {:?}", t.elapsed());
    assert!(pg.started_here());
    let url = pg.url("postgres");
    eprintln!("url: {url}");
    assert!(url.starts_with("postgres://opsloop@localhost/postgres?host=/tmp/opsloop-test-"));
    assert!(url.ends_with("/data/run&port=5432"), "{url}");
    assert_eq!(psql(&url, "select 1").unwrap(), "1");
    assert_eq!(psql(&url, "select current_user").unwrap(), "opsloop");
    psql(
        &url,
        "create table marker (x int); insert into marker values (42)",
    )
    .unwrap();
    assert_eq!(psql(&url, "show listen_addresses").unwrap(), "");
    assert_eq!(psql(&url, "show fsync").unwrap(), "on");
    assert_eq!(psql(&url, "show max_connections").unwrap(), "200");

    let pid = postmaster_pid(&data);
    if is_root() {
        let uid = proc_status(pid, "Uid:");
        assert!(!uid.starts_with("0\t"), "server runs as root: {uid}");
        assert_eq!(proc_status(pid, "Groups:"), "", "supplementary groups kept");
        let mode = fs::metadata(&tmp.0).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o701, "parent must get o+x only");
    }

    // A second start while running attaches and does not own the server.
    let t = Instant::now();
    let mut second = EmbeddedPostgres::start(&data).unwrap();
    eprintln!("attach: {:?}", t.elapsed());
    assert!(!second.started_here());
    assert_eq!(second.url("postgres"), url);
    assert_eq!(
        psql(&second.url("postgres"), "select x from marker").unwrap(),
        "42"
    );
    second.stop();
    drop(second);
    assert_eq!(
        psql(&url, "select 1").unwrap(),
        "1",
        "attacher stopped the server"
    );

    pg.stop();
    pg.stop(); // idempotent
    assert!(
        psql(&url, "select 1").is_err(),
        "server still running after stop"
    );
    drop(pg);

    // Restart reuses the cluster (the table survives; no second initdb).
    let version = fs::metadata(data.join("pg/PG_VERSION")).unwrap().ino();
    let t = Instant::now();
    let pg = EmbeddedPostgres::start(&data).unwrap();
    eprintln!("restart: {:?}", t.elapsed());
    assert!(pg.started_here());
    assert_eq!(
        fs::metadata(data.join("pg/PG_VERSION")).unwrap().ino(),
        version
    );
    assert_eq!(
        psql(&pg.url("postgres"), "select x from marker").unwrap(),
        "42"
    );
    assert!(data.join("postgres.log").is_file());
    drop(pg);
    assert!(
        psql(&url, "select 1").is_err(),
        "drop did not stop the server"
    );
}

#[test]
fn concurrent_starts_one_owner() {
    let tmp = TempDir::new("race");
    let data = tmp.0.join("data");
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let data = data.clone();
            std::thread::spawn(move || EmbeddedPostgres::start(&data).unwrap())
        })
        .collect();
    let mut all: Vec<EmbeddedPostgres> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(all.iter().filter(|p| p.started_here()).count(), 1);
    for pg in &all {
        assert_eq!(psql(&pg.url("postgres"), "select 1").unwrap(), "1");
    }
    // Drop attachers first, then the owner.
    all.sort_by_key(|p| p.started_here());
    drop(all);
}

#[test]
fn long_path_uses_tmp_socket_dir_and_odd_names_encode() {
    let tmp = TempDir::new("long");
    let data = tmp
        .0
        .join("a dir with spaces+plus&amp=".to_string() + &"x".repeat(90));
    let pg = EmbeddedPostgres::start(&data).unwrap();
    let url = pg.url("postgres");
    assert!(url.contains("host=/tmp/opsloop-"), "{url}");
    assert_eq!(psql(&url, "select 1").unwrap(), "1");
    let socket_dir = url
        .split("host=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_string();
    drop(pg);
    assert!(
        !Path::new(&socket_dir).exists(),
        "tmp socket dir left behind"
    );

    // A short data dir whose name needs percent-encoding.
    let data = tmp.0.join("d ir+%&");
    let pg = EmbeddedPostgres::start(&data).unwrap();
    let url = pg.url("postgres");
    assert!(url.contains("host=/tmp/opsloop-test-"), "{url}");
    assert!(url.contains("/d%20ir%2B%25%26/run&port=5432"), "{url}");
    assert_eq!(psql(&url, "select 1").unwrap(), "1");
}

#[test]
fn stale_pid_files_do_not_block_start() {
    let tmp = TempDir::new("stale");
    let data = tmp.0.join("data");
    let pg = EmbeddedPostgres::start(&data).unwrap();
    let url = pg.url("postgres");
    let pid = postmaster_pid(&data);
    // Crash: SIGKILL the postmaster; its pid file stays.
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    while Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(pg); // its server is gone: stopping fails harmlessly
    std::thread::sleep(std::time::Duration::from_millis(500)); // let orphaned backends exit
    assert!(data.join("pg/postmaster.pid").exists());
    let mut pg = EmbeddedPostgres::start(&data).unwrap();
    assert!(pg.started_here());
    assert_eq!(psql(&url, "select 1").unwrap(), "1");
    pg.stop();

    // A pid file naming a live, unrelated process (pid reuse after a container restart).
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pidfile = data.join("pg/postmaster.pid");
    fs::write(
        &pidfile,
        format!("{}\n{}\n", sleeper.id(), data.join("pg").display()),
    )
    .unwrap();
    let pg = EmbeddedPostgres::start(&data).unwrap();
    assert!(pg.started_here());
    assert_eq!(psql(&url, "select 1").unwrap(), "1");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[tokio::test]
async fn sqlx_connects_with_the_url() {
    use sqlx::Connection;
    let tmp = TempDir::new("sqlx");
    let data = tmp.0.join("da ta+");
    let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&data).unwrap())
        .await
        .unwrap();
    let mut conn = sqlx::PgConnection::connect(&pg.url("postgres"))
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    conn.close().await.unwrap();
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}

#[test]
fn failures_are_one_clear_line() {
    let tmp = TempDir::new("fail");
    let data = tmp.0.join("data");
    drop(EmbeddedPostgres::start(&data).unwrap());
    let auto = data.join("pg/postgresql.auto.conf");
    let mut conf = fs::read_to_string(&auto).unwrap();
    conf.push_str("shared_buffers = 'lots'\n");
    fs::write(&auto, conf).unwrap();
    let err = EmbeddedPostgres::start(&data).err().unwrap().to_string();
    eprintln!("{err}");
    assert!(
        !err.contains('\n') && err.contains("pg_ctl start failed"),
        "{err}"
    );
    assert!(
        err.contains("shared_buffers") && err.contains("postgres.log"),
        "{err}"
    );

    let junk = tmp.0.join("junk");
    fs::create_dir_all(junk.join("pg")).unwrap();
    fs::write(junk.join("pg/file"), "x").unwrap();
    let err = EmbeddedPostgres::start(&junk).err().unwrap().to_string();
    eprintln!("{err}");
    assert!(
        !err.contains('\n') && err.contains("no PG_VERSION"),
        "{err}"
    );
}

/// Not a test on its own: the body of a helper process for `other_processes_*`.
#[test]
fn helper_process() {
    let Some(dir) = std::env::var_os("EMBEDDED_HELPER_DIR") else {
        return;
    };
    let pg = EmbeddedPostgres::start(Path::new(&dir)).unwrap();
    assert_eq!(psql(&pg.url("postgres"), "select 1").unwrap(), "1");
    println!("HELPER started_here={}", pg.started_here());
    // Stay alive until the parent has seen both helpers, so they really overlap.
    let release = Path::new(&dir).with_extension("release");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while !release.exists() && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::process::exit(0); // no Drop: the server outlives this process
}

#[test]
fn other_processes_race_then_orphan_is_adopted() {
    let tmp = TempDir::new("procs");
    let data = tmp.0.join("data");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "helper_process",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("EMBEDDED_HELPER_DIR", &data)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Read each helper's report while both are alive, then let them go.
    let mut children = children;
    let outputs: Vec<String> = children
        .iter_mut()
        .map(|c| {
            use std::io::BufRead;
            let out = c.stdout.take().unwrap();
            let mut text = String::new();
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
                if line.contains("HELPER started_here") {
                    break;
                }
            }
            text
        })
        .collect();
    std::fs::write(data.with_extension("release"), "").unwrap();
    for mut c in children {
        c.wait().unwrap();
    }
    let owners = outputs
        .iter()
        .filter(|o| o.contains("HELPER started_here=true"))
        .count();
    let attached = outputs
        .iter()
        .filter(|o| o.contains("HELPER started_here=false"))
        .count();
    assert_eq!((owners, attached), (1, 1), "{outputs:?}");

    // Both are gone and the server still runs: this process adopts it and stops it on drop.
    let pg = EmbeddedPostgres::start(&data).unwrap();
    assert!(pg.started_here());
    let url = pg.url("postgres");
    assert_eq!(psql(&url, "select 1").unwrap(), "1");
    let attacher = EmbeddedPostgres::start(&data).unwrap();
    assert!(!attacher.started_here());
    drop(attacher);
    drop(pg);
    assert!(
        psql(&url, "select 1").is_err(),
        "adopted server still running"
    );
}
