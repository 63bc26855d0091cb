//! The examples from the field (`examples/`, issue 15), each run end to end the way its
//! README section says: `examples/NAME/run.sh` with the real binary, on a copy of
//! `examples/` in a temp dir (so the runs leave the tree clean and never share files),
//! its agents' scripts run by the daemon, answered through the CLI, HTTP or the fake
//! Bot API. Each example listens on fixed local ports of its own (its policy names
//! them), so the tests can run side by side. Long because it is five end-to-end stories
//! sharing one harness (`Example`), each readable top to bottom.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::fake_telegram::{Chat, FakeTelegram, Sent, User};
use support::{TestDb, opsloop, stderr, stdout, test_db};

const ADMIN: i64 = 1501;

/// A copy of `examples/` for one test, and its `run.sh` running.
struct Example {
    dir: PathBuf,
    child: Child,
    http: String,
    url: String,
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read examples") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        // What a run leaves behind in a working copy is not part of the example.
        if [".opsloop", "out", ".ops_key", ".keys", "__pycache__"]
            .iter()
            .any(|n| name == *n)
        {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy (keeps the mode)");
        }
    }
}

impl Example {
    /// `examples/NAME/run.sh` with `env`, on `db`; its HTTP address is `http`.
    async fn start(name: &str, db: &TestDb, http: &str, env: &[(&str, &str)]) -> Example {
        let root = std::env::temp_dir().join(format!(
            "opsloop-examples-{}-{}",
            std::process::id(),
            db.name
        ));
        let _ = std::fs::remove_dir_all(&root);
        copy_tree(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"),
            &root.join("examples"),
        );
        let dir = root.join("examples").join(name);
        let log = std::fs::File::create(root.join("run.log")).expect("log");
        let mut cmd = Command::new("sh");
        cmd.arg(dir.join("run.sh"));
        for (key, _) in std::env::vars() {
            if key.starts_with("OPSLOOP")
                || key.starts_with("TELEGRAM_")
                || key == "DATABASE_URL"
                || key == "OPS_KEY"
            {
                cmd.env_remove(key);
            }
        }
        cmd.env("OPSLOOP", env!("CARGO_BIN_EXE_opsloop"))
            .env("DATABASE_URL", &db.url)
            .env("OPSLOOP_LOG", "json")
            .envs(env.iter().copied())
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("spawn run.sh");
        let example = Example {
            dir,
            child,
            http: http.to_string(),
            url: db.url.clone(),
        };
        example.wait_ready().await;
        example
    }

    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            let url = format!("http://{}/healthz", self.http);
            if let Ok(r) = client.get(&url).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("example never answered on {}: {}", self.http, self.log());
    }

    fn log(&self) -> String {
        let path = self.dir.join("../../run.log");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        opsloop(&self.url, args)
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_str(&stdout(&out)).expect("json")
    }

    fn missions(&self) -> Vec<Value> {
        let v = self.json(&["missions", "--json", "--limit", "500"]);
        v.as_array().cloned().unwrap_or_default()
    }

    fn mission(&self, id: i64) -> Value {
        self.json(&["mission", &id.to_string(), "--json"])
    }

    /// Waits until some mission of `template` satisfies `f`, and returns it (full).
    async fn wait_mission(&self, template: &str, f: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..600 {
            for m in self.missions() {
                if m["template"] == template {
                    let id = m["id"].as_i64().expect("id");
                    let full = self.mission(id);
                    if f(&full) {
                        return full;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no {template} mission as wanted: {:?}\n{}",
            self.missions(),
            self.log()
        );
    }

    async fn wait_status(&self, id: i64, want: &str) -> Value {
        for _ in 0..600 {
            let m = self.mission(id);
            if m["status"] == want {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("mission #{id} never {want}: {}", self.mission(id));
    }

    /// The JSON lines the example's sink received.
    fn posts(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("out/posts.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn count(&self, template: &str, status: &str) -> usize {
        self.missions()
            .iter()
            .filter(|m| m["template"] == template && m["status"] == status)
            .count()
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        let v = self.json(&["events", "--json", "--limit", "5000"]);
        v.as_array()
            .map(|a| a.iter().filter(|e| e["kind"] == kind).cloned().collect())
            .unwrap_or_default()
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        // run.sh's whole group: the daemon, its helpers and the shell itself.
        let pgid = self.child.id() as i32;
        // SAFETY: signalling a process group we created.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        // A graceful stop can wait out a Telegram long poll; the test is over by then.
        for _ in 0..100 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// The parsed policy of `examples/NAME`.
fn example_policy(name: &str) -> opsloop::domain::policy::Policy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}/policy.toml"));
    let text = std::fs::read_to_string(&path).expect("policy");
    match opsloop::domain::policy::parse(&text) {
        Ok(p) => p,
        Err(problems) => panic!("{}: {problems:?}", path.display()),
    }
}

/// What the heartbeat's cron triggers do at `later`: their slots between now and then
/// fire through the real trigger code (the daemon's own tick would, at that time).
async fn fire_triggers_at(db: &TestDb, name: &str, later: chrono::Duration) -> u64 {
    let policy = example_policy(name);
    let now = chrono::Utc::now();
    // First sight of a trigger only starts its clock (the daemon's first tick may not
    // have run yet).
    opsloop::engine::triggers::fire_due(&db.pool, &policy, now, false)
        .await
        .expect("fire_due");
    opsloop::engine::triggers::fire_due(&db.pool, &policy, now + later, false)
        .await
        .expect("fire_due")
}

fn user(id: i64) -> User {
    User::new(id, if id == ADMIN { "Root" } else { "Someone" })
}

async fn started(fake: &FakeTelegram, ids: &[i64]) {
    for &id in ids {
        fake.send_text(Chat::private(id), user(id), "/start");
        assert!(
            fake.wait_for(Duration::from_secs(30), |f| !f.sent_messages(id).is_empty())
                .await,
            "no answer to /start for {id}"
        );
    }
}

async fn message_with(fake: &FakeTelegram, chat: i64, needle: &str) -> Sent {
    let found = |f: &FakeTelegram| {
        f.sent_messages(chat)
            .into_iter()
            .find(|m| m.text.contains(needle))
    };
    assert!(
        fake.wait_for(Duration::from_secs(60), |f| found(f).is_some())
            .await,
        "no message with {needle:?} to {chat}: {:?}",
        fake.sent_messages(chat)
    );
    found(fake).expect("message")
}

fn telegram_env(fake: &FakeTelegram) -> Vec<(&'static str, String)> {
    vec![
        ("TELEGRAM_BOT_TOKEN", fake.token().to_string()),
        ("TELEGRAM_API_URL", fake.url().to_string()),
        ("OPSLOOP_ADMINS", ADMIN.to_string()),
    ]
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn output<'a>(mission: &'a Value, step: &str) -> &'a Value {
    mission["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == step))
        .map(|s| &s["output"])
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn every_example_policy_passes_policy_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("examples/")
        .filter_map(|e| e.ok().map(|e| e.path().join("policy.toml")))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for file in &files {
        let out = support::opsloop_cmd(None)
            .args(["policy", "check"])
            .arg(file)
            .output()
            .expect("run opsloop");
        assert!(
            out.status.success(),
            "{}: {}{}",
            file.display(),
            stdout(&out),
            stderr(&out)
        );
    }
    // A broken copy is refused: the check is not a rubber stamp.
    let text = std::fs::read_to_string(&files[0]).expect("policy");
    let broken = support::write_temp("examples-broken.toml", &format!("{text}\n[oops]\n"));
    let out = support::opsloop_cmd(None)
        .args(["policy", "check"])
        .arg(&broken)
        .output()
        .expect("run opsloop");
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
}

/// VoxYZ: scout → (radar.signal) → strategist → (strategy.ready) → writer, who asks
/// "publish?" in Telegram → (draft.approved) → publisher posts to the sink, under its
/// daily cap; the hourly observer reports dead letters and the failure rate.
#[tokio::test]
async fn voxyz_six_roles_from_scout_to_published_post() {
    let policy = example_policy("voxyz");
    assert_eq!(policy.heartbeat.event_batch, 100);
    assert_eq!(policy.heartbeat.reaction_batch, 50);
    assert_eq!(policy.worker.lease, Duration::from_secs(300));
    assert_eq!(policy.worker.max_attempts, 3);

    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let env = telegram_env(&fake);
    let ex = Example::start("voxyz", &db, "127.0.0.1:18710", &env_refs(&env)).await;
    started(&fake, &[ADMIN]).await;

    // What the scout's 15-minute trigger does.
    let scout = ex.json(&["propose", "scout", "--json"]);
    assert_eq!(scout["status"], "approved", "{scout}");
    let scout = ex
        .wait_status(scout["mission_id"].as_i64().expect("id"), "succeeded")
        .await;
    let topic = output(&scout, "scan")["topic"]
        .as_str()
        .expect("topic")
        .to_string();

    // The reactions carry it to the strategist, then the writer, who asks.
    let research = ex
        .wait_mission("research", |m| m["status"] == "succeeded")
        .await;
    let title = output(&research, "plan")["title"]
        .as_str()
        .expect("title")
        .to_string();
    assert!(title.to_lowercase().contains(&topic), "{title} / {topic}");
    let draft = ex
        .wait_mission("draft", |m| m["steps"][1]["status"] == "asking")
        .await;
    assert_eq!(output(&draft, "write")["title"], title.as_str());
    assert!(
        ex.posts().is_empty(),
        "nothing is posted before a person says so"
    );

    // The person taps "publish" in Telegram.
    let prompt = message_with(&fake, ADMIN, "question #").await;
    assert!(prompt.text.contains("Publish"), "{}", prompt.text);
    let buttons = prompt.reply_markup.clone().expect("buttons");
    let publish = buttons["inline_keyboard"][0][0].clone();
    assert_eq!(publish["text"], "publish", "{buttons}");
    let data = publish["callback_data"].as_str().expect("data");
    fake.tap(Chat::private(ADMIN), user(ADMIN), prompt.message_id, data);

    let draft_id = draft["id"].as_i64().expect("id");
    ex.wait_status(draft_id, "succeeded").await;
    ex.wait_mission("publish", |m| m["status"] == "succeeded")
        .await;
    let posts = ex.posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0]["body"]["title"], title.as_str(), "{posts:?}");

    // The publisher's daily cap (3): two more today, then refused, and nothing posted.
    for n in 1..=2 {
        let t = format!("Extra post {n}");
        let p = ex.json(&["propose", "publish", &format!("title={t}"), "--json"]);
        ex.wait_status(p["mission_id"].as_i64().expect("id"), "succeeded")
            .await;
    }
    let over = ex.cli(&["propose", "publish", "title=One too many"]);
    assert_eq!(over.status.code(), Some(3), "{}", stderr(&over));
    assert!(stderr(&over).contains("daily_cap = 3"), "{}", stderr(&over));
    assert_eq!(ex.posts().len(), 3);

    // The observer, as its hourly trigger fires it.
    let fired = fire_triggers_at(&db, "voxyz", chrono::Duration::minutes(61)).await;
    assert!(fired >= 1, "the hourly trigger did not fire");
    let observed = ex
        .wait_mission("observe", |m| m["status"] == "succeeded")
        .await;
    let judged = output(&observed, "judge");
    let status = ex.json(&["status", "--json"]);
    assert_eq!(
        judged["dead_letters"].as_str(),
        Some(status["dead_letters"].to_string().as_str()),
        "{judged}"
    );
    assert!(judged["failure_rate"].is_string(), "{judged}");
    let reports = ex.events("observer.report");
    assert_eq!(reports.len(), 1, "{reports:?}");
}

/// Fitflow's five invariants, each shown: (1) the heartbeat runs only for OPS_KEY;
/// (2) each event is tweeted once however often the heartbeat is hit; (3) pause stops
/// automatic tweets; (4) at most ten tweets per UTC day, whoever asks; (5) every tweet
/// the sink got belongs to a succeeded tweet mission, text for text.
#[tokio::test]
async fn fitflow_tweet_quota_and_its_five_invariants() {
    let db = test_db().await;
    let ex = Example::start("fitflow", &db, "127.0.0.1:18720", &[]).await;
    let key = std::fs::read_to_string(ex.dir.join(".ops_key")).expect("run.sh made an OPS_KEY");
    let key = key.trim().to_string();
    assert!(key.len() >= 32, "{key}");
    let http = reqwest::Client::new();
    let base = format!("http://{}", ex.http);
    let beat = |auth: Option<String>| {
        let mut req = http.post(format!("{base}/api/ops/heartbeat"));
        if let Some(a) = auth {
            req = req.header("Authorization", format!("Bearer {a}"));
        }
        req.send()
    };
    let tweets = || ex.count("tweet", "succeeded") + ex.count("tweet", "running");

    // The daemon's own (hourly) heartbeat has run once at start; from here on only cron does.
    for _ in 0..600 {
        let ticks: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ops_action_runs WHERE kind = 'tick'")
                .fetch_one(&db.pool)
                .await
                .expect("ticks");
        if ticks > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The app logs a workout (with OPS_KEY, as the README's curl line does).
    let emitted = http
        .post(format!("{base}/api/events"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"kind": "workout.logged", "payload": {"workout": "a 5k run"}}))
        .send()
        .await
        .expect("emit");
    assert_eq!(emitted.status(), 201, "{:?}", emitted.text().await);

    // (1) Without the key, or with a wrong one, the heartbeat refuses and nothing moves.
    assert_eq!(beat(None).await.expect("beat").status(), 401);
    assert_eq!(
        beat(Some(format!("{key}x"))).await.expect("beat").status(),
        401
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tweets(), 0, "{:?}", ex.missions());
    assert_eq!(beat(Some(key.clone())).await.expect("beat").status(), 200);
    let first = ex
        .wait_mission("tweet", |m| m["status"] == "succeeded")
        .await;
    assert_eq!(
        output(&first, "compose")["text"],
        "Someone just finished a 5k run. Your turn!"
    );

    // (2) Hitting it again tweets nothing more: an event is reacted to once.
    assert_eq!(beat(Some(key.clone())).await.expect("beat").status(), 200);
    assert_eq!(beat(Some(key.clone())).await.expect("beat").status(), 200);
    assert_eq!(tweets(), 1);

    // (3) Paused, a logged workout is not tweeted; resumed, the next one is.
    assert!(ex.cli(&["pause"]).status.success());
    let o = ex.cli(&[
        "emit",
        "workout.logged",
        "--payload",
        r#"{"workout":"yoga"}"#,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(beat(Some(key.clone())).await.expect("beat").status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tweets(), 1, "{:?}", ex.missions());
    assert!(ex.cli(&["resume"]).status.success());
    let o = ex.cli(&[
        "emit",
        "workout.logged",
        "--payload",
        r#"{"workout":"a swim"}"#,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(beat(Some(key.clone())).await.expect("beat").status(), 200);
    for _ in 0..600 {
        if ex.count("tweet", "succeeded") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ex.count("tweet", "succeeded"), 2, "{:?}", ex.missions());

    // (4) The quota: eight more by hand make ten; the eleventh is refused, and so is
    // the one a reaction would make.
    for n in 3..=10 {
        let p = ex.json(&[
            "propose",
            "tweet",
            &format!("text=Tip number {n}"),
            "--json",
        ]);
        assert_eq!(p["status"], "approved", "{p}");
        ex.wait_status(p["mission_id"].as_i64().expect("id"), "succeeded")
            .await;
    }
    let over = ex.cli(&["propose", "tweet", "text=Tip number 11"]);
    assert_eq!(over.status.code(), Some(3), "{}", stderr(&over));
    assert!(
        stderr(&over).contains("daily_cap = 10"),
        "{}",
        stderr(&over)
    );
    let fired = fire_triggers_at(&db, "fitflow", chrono::Duration::hours(25)).await;
    assert_eq!(fired, 1, "the morning tip trigger");
    let tip = ex
        .wait_mission("morning-tip", |m| m["status"] == "succeeded")
        .await;
    assert!(output(&tip, "pick")["text"].is_string(), "{tip}");
    assert_eq!(beat(Some(key.clone())).await.expect("beat").status(), 200);
    let refused: Vec<(String, String)> = sqlx::query_as(
        "SELECT status, coalesce(reason, '') FROM ops_mission_proposals \
         WHERE template = 'tweet' AND source = 'reaction' ORDER BY id DESC LIMIT 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("proposals");
    assert_eq!(refused[0].0, "rejected", "{refused:?}");
    assert!(refused[0].1.contains("daily_cap"), "{refused:?}");
    assert_eq!(ex.count("tweet", "succeeded"), 10);

    // (5) Every tweet the sink got is one succeeded mission's, text for text.
    let mut posted: Vec<String> = ex
        .posts()
        .iter()
        .map(|p| p["body"]["text"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut made: Vec<String> = ex
        .missions()
        .iter()
        .filter(|m| m["template"] == "tweet" && m["status"] == "succeeded")
        .map(|m| {
            let full = ex.mission(m["id"].as_i64().expect("id"));
            output(&full, "compose")["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    posted.sort();
    made.sort();
    assert_eq!(posted.len(), 10, "{posted:?}");
    assert_eq!(posted, made);
}

/// NeonHub: six cron agents every five minutes, with progress lines; one breaks, each
/// of its missions takes three attempts (1 s, then 2 s apart), and after two failed
/// missions in a row it is paused and the admin is told in Telegram.
#[tokio::test]
async fn neonhub_cron_agents_retry_then_pause_with_an_alert() {
    let policy = example_policy("neonhub");
    assert_eq!(policy.triggers.len(), 6);
    assert!(
        policy
            .triggers
            .iter()
            .all(|t| t.cron_source == "*/5 * * * *")
    );
    assert_eq!(policy.worker.max_attempts, 3);
    assert_eq!(policy.worker.backoff.base, Duration::from_secs(1));
    assert_eq!(policy.worker.backoff.max, Duration::from_secs(300));
    assert_eq!(policy.gates.pause_after_failures, 2);

    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let env = telegram_env(&fake);
    let ex = Example::start("neonhub", &db, "127.0.0.1:18730", &env_refs(&env)).await;
    started(&fake, &[ADMIN]).await;

    // Five minutes later, all six fire.
    let fired = fire_triggers_at(&db, "neonhub", chrono::Duration::minutes(5)).await;
    assert_eq!(fired, 6);
    let done = |t: &opsloop::domain::policy::Trigger, ms: &[Value]| {
        ms.iter()
            .find(|m| m["template"] == t.propose.as_str() && m["status"] == "succeeded")
            .and_then(|m| m["id"].as_i64())
    };
    for _ in 0..600 {
        let ms = ex.missions();
        if policy.triggers.iter().all(|t| done(t, &ms).is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ms = ex.missions();
    for t in &policy.triggers {
        let id = done(t, &ms).unwrap_or_else(|| panic!("{} never succeeded: {ms:?}", t.name));
        let m = ex.mission(id);
        let progress = &m["steps"][0]["progress"];
        assert_eq!(progress["percent"], 100, "{m}");
        assert!(
            progress["text"]
                .as_str()
                .is_some_and(|t| t.contains("done")),
            "{m}"
        );
    }

    // price-watch's upstream goes down.
    std::fs::write(ex.dir.join("out/break-price-watch"), "").expect("break");
    let mut failed = Vec::new();
    for n in 0..2 {
        let p = ex.json(&["propose", "price-watch", "--json"]);
        assert_eq!(p["status"], "approved", "attempt {n}: {p}");
        let m = ex
            .wait_status(p["mission_id"].as_i64().expect("id"), "failed")
            .await;
        assert_eq!(m["steps"][0]["attempts"], 3, "{m}");
        assert!(
            m["steps"][0]["progress"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("fetching")),
            "{m}"
        );
        failed.push(m);
    }
    let alert = message_with(&fake, ADMIN, "is paused after 2 failed missions").await;
    assert!(alert.text.contains("price-watch"), "{}", alert.text);
    let refused = ex.cli(&["propose", "price-watch"]);
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    // The other agents go on.
    let other = ex.json(&["propose", "seo-audit", "--json"]);
    assert_eq!(other["status"], "approved", "{other}");

    // Mended and resumed by an admin, it runs again.
    std::fs::remove_file(ex.dir.join("out/break-price-watch")).expect("mend");
    let o = ex.cli(&["resume", "price-watch"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = ex.json(&["propose", "price-watch", "--json"]);
    ex.wait_status(p["mission_id"].as_i64().expect("id"), "succeeded")
        .await;
    let status = ex.json(&["status", "--json"]);
    assert!(status["dead_letters"].as_i64() >= Some(2), "{status}");
}

/// Mission Control: LOW runs on its own, HIGH waits for one approver, RED for two
/// different people (never the proposer, never one person twice); each agent reports
/// its cost; `status` shows both agent hosts (the daemon's worker and run.sh's second).
#[tokio::test]
async fn mission_control_tiers_dual_control_and_workers() {
    let db = test_db().await;
    let ex = Example::start("mission-control", &db, "127.0.0.1:18740", &[]).await;

    // Agent liveness: two workers, each seen.
    let mut status = Value::Null;
    for _ in 0..600 {
        status = ex.json(&["status", "--json"]);
        if status["workers"].as_array().map_or(0, Vec::len) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let workers = status["workers"].as_array().cloned().unwrap_or_default();
    assert_eq!(workers.len(), 2, "{status}\n{}", ex.log());
    assert_ne!(workers[0]["id"], workers[1]["id"]);
    assert!(
        workers.iter().all(|w| w["last_seen"].is_string()),
        "{status}"
    );

    // LOW.
    let low = ex.json(&["propose", "health", "service=api", "--json"]);
    assert_eq!(low["status"], "approved", "{low}");
    let m = ex
        .wait_status(low["mission_id"].as_i64().expect("id"), "succeeded")
        .await;
    assert_eq!(output(&m, "probe")["cost"], 0.01, "{m}");

    // HIGH: nothing runs until an approver says so.
    let high = ex.json(&[
        "propose",
        "deploy",
        "service=api",
        "version=v2.3.1",
        "--json",
    ]);
    assert_eq!(high["status"], "pending", "{high}");
    assert!(high["mission_id"].is_null(), "{high}");
    let bad = ex.cli(&["propose", "deploy", "service=api", "version=latest"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    let id = high["id"].to_string();
    let o = ex.cli(&["approve", &id, "--as", "alice"]);
    assert!(o.status.success(), "{}", stderr(&o));
    ex.wait_mission("deploy", |m| m["status"] == "succeeded")
        .await;

    // RED: dual control.
    let red = ex.json(&[
        "propose",
        "failover",
        "cluster=main",
        "--as",
        "alice",
        "--json",
    ]);
    assert_eq!(red["status"], "pending", "{red}");
    let id = red["id"].to_string();
    let own = ex.cli(&["approve", &id, "--as", "alice"]);
    assert_eq!(own.status.code(), Some(3), "{}", stderr(&own));
    let first = ex.cli(&["approve", &id, "--as", "bob"]);
    assert!(stdout(&first).contains("1/2"), "{}", stdout(&first));
    // Bob again (however he spells it) is still one approval.
    let twice = ex.cli(&["approve", &id, "--as", "Bob"]);
    assert!(
        format!("{}{}", stdout(&twice), stderr(&twice)).contains("1/2"),
        "{}{}",
        stdout(&twice),
        stderr(&twice)
    );
    assert_eq!(
        ex.count("failover", "succeeded") + ex.count("failover", "running"),
        0
    );
    let second = ex.cli(&["approve", &id, "--as", "carol"]);
    assert!(second.status.success(), "{}", stderr(&second));
    ex.wait_mission("failover", |m| m["status"] == "succeeded")
        .await;
    let actions = std::fs::read_to_string(ex.dir.join("out/actions.log")).expect("log");
    assert_eq!(
        actions.lines().collect::<Vec<_>>(),
        [
            "health api",
            "deploy api v2.3.1",
            "health api",
            "fence main",
            "promote main"
        ]
    );
    let status = ex.json(&["status", "--json"]);
    assert_eq!(
        status["pending_approvals"],
        serde_json::json!([]),
        "{status}"
    );

    // The budget counted what every mission cost: 0.01 + 0.16 + 0.30.
    let budgets = ex.json(&["budgets", "--json"]);
    let ops = budgets
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "operations"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(ops["status"], "ok", "{budgets}");
    let number = |v: &Value| {
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(-1.0)
    };
    assert!((number(&ops["spent"]) - 0.47).abs() < 1e-9, "{budgets}");
    let m = ex
        .wait_mission("failover", |m| m["status"] == "succeeded")
        .await;
    assert!((number(&m["cost"]) - 0.30).abs() < 1e-9, "{m}");
}

/// AgentVine: each agent proposes over HTTP with its own key, only its own templates;
/// autonomous work runs, supervised work waits for one approver and then asks a
/// clarification question mid-step (`opsloop ask`), answered at the CLI;
/// human-required work needs two people; an agent's rate limit refuses the extra one.
#[tokio::test]
async fn agentvine_levels_keys_and_a_clarification_mid_step() {
    let db = test_db().await;
    let ex = Example::start("agentvine", &db, "127.0.0.1:18750", &[]).await;
    let keys = ex.dir.join(".keys");
    for _ in 0..600 {
        if ["triager", "coder", "releaser"]
            .iter()
            .all(|k| keys.join(k).is_file())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for k in ["triager", "coder", "releaser"] {
        let key = std::fs::read_to_string(keys.join(k)).expect("run.sh made the agent's key");
        assert!(key.starts_with("olk_"), "{k}");
    }
    let propose = |agent: &str, args: &[&str]| {
        let out = Command::new(ex.dir.join("agents/propose.py"))
            .arg(agent)
            .args(args)
            .current_dir(&ex.dir)
            .env("OPSLOOP_HTTP_ADDR", &ex.http)
            .output()
            .expect("propose.py");
        let body: Value = serde_json::from_str(&stdout(&out)).unwrap_or(Value::Null);
        (out.status.code(), body, stderr(&out))
    };

    // Autonomous.
    let (code, p, err) = propose("triager", &["triage", "issue=42"]);
    assert_eq!(code, Some(0), "{p} {err}\n{}", ex.log());
    assert_eq!(p["status"], "approved", "{p}");
    let m = ex
        .wait_status(p["mission_id"].as_i64().expect("id"), "succeeded")
        .await;
    assert_eq!(output(&m, "label")["label"], "bug");

    // Out of scope: nothing stored.
    let before = ex.missions().len();
    let (code, p, _) = propose("triager", &["release", "version=v1.0.0"]);
    assert_eq!(code, Some(3), "{p}");
    let (code, p, _) = propose("coder", &["triage", "issue=43"]);
    assert_eq!(code, Some(3), "{p}");
    assert_eq!(ex.missions().len(), before);

    // Supervised, with a question in the middle.
    let (code, p, _) = propose("coder", &["fix", "issue=42"]);
    assert_eq!(code, Some(0), "{p}");
    assert_eq!(p["status"], "pending", "{p}");
    let o = ex.cli(&["approve", &p["id"].to_string(), "--as", "alice"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut question = Value::Null;
    for _ in 0..600 {
        let open = ex.json(&["questions", "--json"]);
        if let Some(q) = open.as_array().and_then(|l| l.first()) {
            question = q.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        question["question"]
            .as_str()
            .is_some_and(|q| q.contains("Issue 42")),
        "{question}\n{}",
        ex.log()
    );
    let fix = ex
        .wait_mission("fix", |m| m["steps"][0]["status"] == "running")
        .await;
    assert_eq!(question["mission_id"], fix["id"], "{question}");
    let wrong = ex.cli(&["answer", &question["id"].to_string(), "maybe"]);
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    let o = ex.cli(&[
        "answer",
        &question["id"].to_string(),
        "break",
        "--as",
        "alice",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let fix = ex
        .wait_status(fix["id"].as_i64().expect("id"), "succeeded")
        .await;
    assert_eq!(output(&fix, "code")["compat"], "break", "{fix}");
    assert_eq!(ex.events("fix.ready").len(), 1);

    // The coder's rate limit: two pending at once, the third refused.
    for issue in ["issue=50", "issue=51"] {
        let (code, p, _) = propose("coder", &["fix", issue]);
        assert_eq!(code, Some(0), "{p}");
        assert_eq!(p["status"], "pending", "{p}");
    }
    let (code, p, _) = propose("coder", &["fix", "issue=52"]);
    assert_eq!(code, Some(3), "{p}");
    assert!(p.to_string().contains("max_pending"), "{p}");

    // Human-required.
    let (code, p, _) = propose("releaser", &["release", "version=v1.0.0"]);
    assert_eq!(code, Some(0), "{p}");
    let id = p["id"].to_string();
    let one = ex.cli(&["approve", &id, "--as", "alice"]);
    assert!(stdout(&one).contains("1/2"), "{}", stdout(&one));
    let two = ex.cli(&["approve", &id, "--as", "bob"]);
    assert!(two.status.success(), "{}", stderr(&two));
    ex.wait_mission("release", |m| m["status"] == "succeeded")
        .await;
    let log = std::fs::read_to_string(ex.dir.join("out/vine.log")).expect("log");
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["triaged 42 small", "fixed 42 break", "released v1.0.0"]
    );
    let listed = ex.json(&["keys", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    assert!(
        !listed.to_string().contains("olk_"),
        "no key is ever listed"
    );
}
