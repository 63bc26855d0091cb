//! `opsloop doctor`, the real binary: all green on a healthy setup (a migrated database
//! with a policy, the fake Bot API, admins, a free HTTP address); each broken part is
//! named with its fix and makes it exit non-zero. The token never shows.

mod support;

use std::process::Output;

use support::fake_telegram::FakeTelegram;
use support::{
    TestDb, apply_policy, opsloop_cmd, path_str, stdout, test_db, with_database, write_temp,
};

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// Run `opsloop doctor ARGS` with a healthy environment, changed by `env`.
async fn doctor(
    url: &str,
    fake: &FakeTelegram,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Option<i32>, String) {
    let mut cmd = opsloop_cmd(Some(url));
    cmd.arg("doctor")
        .args(args)
        .env("TELEGRAM_BOT_TOKEN", fake.token())
        .env("TELEGRAM_API_URL", fake.url().as_str())
        .env("OPSLOOP_ADMINS", "1001,1002")
        .env("OPSLOOP_HTTP_ADDR", free_addr());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // The fake Bot API runs on this test's runtime: wait for the child elsewhere.
    let out: Output = tokio::task::spawn_blocking(move || cmd.output().expect("run doctor"))
        .await
        .expect("join");
    let text = stdout(&out);
    assert!(!text.contains(fake.token()), "the token leaked:\n{text}");
    assert!(
        !support::stderr(&out).contains(fake.token()),
        "the token leaked to stderr"
    );
    (out.status.code(), text)
}

fn line<'a>(text: &'a str, check: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(&format!("{check}:")))
        .unwrap_or_else(|| panic!("no {check} line in:\n{text}"))
}

async fn healthy() -> (TestDb, FakeTelegram) {
    let db = test_db().await;
    apply_policy(&db).await;
    (db, FakeTelegram::start().await)
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_is_all_green_on_a_healthy_setup() {
    let (db, fake) = healthy().await;
    let (code, text) = doctor(&db.url, &fake, &[], &[]).await;
    assert_eq!(code, Some(0), "{text}");
    for check in [
        "database",
        "migrations",
        "policy",
        "telegram",
        "admins",
        "clock",
        "http",
    ] {
        assert!(line(&text, check).starts_with("ok "), "{check}:\n{text}");
    }
    // The one warning a healthy setup can have is the server's: autovacuum off (as on
    // the machines these tests run on).
    let autovacuum: bool = sqlx::query_scalar("SELECT current_setting('autovacuum')::bool")
        .fetch_one(&db.pool)
        .await
        .expect("autovacuum");
    let vacuum_line = line(&text, "autovacuum");
    if autovacuum {
        assert!(vacuum_line.starts_with("ok "), "{text}");
        assert!(text.trim_end().ends_with("all checks passed"), "{text}");
    } else {
        assert!(
            vacuum_line.starts_with("warn ")
                && vacuum_line.contains("the heartbeat vacuums opsloop's queue tables itself")
                && vacuum_line.contains("fix: set autovacuum = on"),
            "{text}"
        );
        assert!(
            text.trim_end()
                .ends_with("all checks passed (1 warning(s))"),
            "{text}"
        );
    }
    let others: Vec<&str> = text.lines().filter(|l| *l != vacuum_line).collect();
    assert!(
        !others
            .iter()
            .any(|l| l.contains("FAIL") || l.starts_with("warn")),
        "{text}"
    );
    assert!(
        line(&text, "telegram").contains("bot<token>/getMe"),
        "{text}"
    );
    assert!(
        line(&text, "telegram").contains(FakeTelegram::BOT_USERNAME),
        "{text}"
    );

    // A valid policy file is checked too.
    let file = write_temp("doctor-good.toml", support::POLICY);
    let (code, text) = doctor(&db.url, &fake, &[], &["--policy", path_str(&file)]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("doctor-good.toml is valid"), "{text}");

    // The HTTP address taken by a running opsloop is fine; by anything else it is not.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let state = opsloop::interfaces::http::AppState::new(
        db.pool.clone(),
        opsloop::store::policy::PolicyCache::default(),
        None,
    );
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(opsloop::interfaces::http::serve(
        listener,
        state,
        stop.clone(),
    ));
    let (code, text) = doctor(&db.url, &fake, &[("OPSLOOP_HTTP_ADDR", &addr)], &[]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(line(&text, "http").contains("running opsloop"), "{text}");
    stop.cancel();

    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let other_addr = other.local_addr().expect("addr").to_string();
    // Something that accepts and says nothing useful: not an opsloop.
    std::thread::spawn(move || {
        for s in other.incoming().flatten() {
            drop(s);
        }
    });
    let (code, text) = doctor(&db.url, &fake, &[("OPSLOOP_HTTP_ADDR", &other_addr)], &[]).await;
    assert_eq!(code, Some(1), "{text}");
    let http = line(&text, "http");
    assert!(
        http.starts_with("FAIL") && http.contains("in use") && http.contains("fix: "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_names_a_wrong_database_url() {
    let (db, fake) = healthy().await;
    let missing = with_database(&db.url, "opsloop_no_such_database");
    let (code, text) = doctor(&missing, &fake, &[], &[]).await;
    assert_eq!(code, Some(1), "{text}");
    let database = line(&text, "database");
    assert!(database.starts_with("FAIL"), "{text}");
    assert!(
        database.contains("opsloop_no_such_database") && database.contains("does not exist"),
        "{text}"
    );
    assert!(database.contains("fix: "), "{text}");
    // The other checks still run and say why they cannot.
    assert!(line(&text, "migrations").starts_with("skip"), "{text}");
    assert!(line(&text, "telegram").starts_with("ok"), "{text}");

    // Nothing listens there, and a password in the URL never shows.
    let closed = free_addr();
    let url = format!("postgres://opsloop:hunter2@{closed}/opsloop");
    let (code, text) = doctor(&url, &fake, &[], &[]).await;
    assert_eq!(code, Some(1), "{text}");
    let database = line(&text, "database");
    assert!(
        database.starts_with("FAIL") && database.contains("refused"),
        "{text}"
    );
    assert!(database.contains("check DATABASE_URL"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");

    // An unmigrated database is named with its fix.
    let admin = opsloop::db::connect(&with_database(&db.url, "postgres"), 1)
        .await
        .expect("admin");
    let name = format!("{}_empty", db.name);
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create");
    admin.close().await;
    let (code, text) = doctor(&with_database(&db.url, &name), &fake, &[], &[]).await;
    assert_eq!(code, Some(1), "{text}");
    let migrations = line(&text, "migrations");
    assert!(
        migrations.starts_with("FAIL") && migrations.contains("opsloop migrate"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_names_an_invalid_policy() {
    let (db, fake) = healthy().await;
    let bad = write_temp(
        "doctor-bad.toml",
        "[worker]\nconcurrency = \"many\"\n\n[templates.x]\nrisk = \"hgih\"\nsteps = []\n",
    );
    for how in ["--policy", "OPSLOOP_POLICY"] {
        let (code, text) = if how == "--policy" {
            doctor(&db.url, &fake, &[], &["--policy", path_str(&bad)]).await
        } else {
            doctor(&db.url, &fake, &[("OPSLOOP_POLICY", path_str(&bad))], &[]).await
        };
        assert_eq!(code, Some(1), "{how}: {text}");
        let policy = text
            .lines()
            .find(|l| l.starts_with("FAIL  policy:"))
            .unwrap_or_else(|| panic!("{how}: no failing policy line:\n{text}"));
        assert!(policy.contains("doctor-bad.toml:2:"), "{how}: {policy}");
        assert!(policy.contains("opsloop policy check"), "{how}: {policy}");
    }
    // No policy applied at all.
    let empty = test_db().await;
    let (code, text) = doctor(&empty.url, &fake, &[], &[]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        line(&text, "policy").contains("opsloop policy apply"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_names_an_unreachable_bot_api_and_a_refused_token() {
    let (db, fake) = healthy().await;
    let closed = format!("http://{}", free_addr());
    let (code, text) = doctor(&db.url, &fake, &[("TELEGRAM_API_URL", &closed)], &[]).await;
    assert_eq!(code, Some(1), "{text}");
    let telegram = line(&text, "telegram");
    assert!(
        telegram.starts_with("FAIL") && telegram.contains("unreachable"),
        "{text}"
    );
    assert!(
        telegram.contains(&format!("{closed}/bot<token>/getMe")),
        "{text}"
    );
    assert!(telegram.contains("TELEGRAM_API_URL"), "{text}");

    let (code, text) = doctor(&db.url, &fake, &[("TELEGRAM_BOT_TOKEN", "999:wrong")], &[]).await;
    assert_eq!(code, Some(1), "{text}");
    let telegram = line(&text, "telegram");
    assert!(
        telegram.starts_with("FAIL") && telegram.contains("@BotFather"),
        "{text}"
    );
    assert!(!text.contains("999:wrong"), "{text}");

    // Unset token and admins: named, with their fixes.
    let mut cmd = opsloop_cmd(Some(&db.url));
    cmd.arg("doctor").env("OPSLOOP_HTTP_ADDR", free_addr());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run"))
        .await
        .expect("join");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        line(&text, "telegram").contains("TELEGRAM_BOT_TOKEN is not set"),
        "{text}"
    );
    assert!(line(&text, "admins").contains("OPSLOOP_ADMINS"), "{text}");
}
