//! Steps that talk, end to end on the real binary: outputs and references between
//! steps, `when` conditions, questions from ask steps, from `opsloop ask` inside a
//! shell step and from HTTP, answered from the CLI, Telegram and HTTP.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::fake_telegram::{Chat, FakeTelegram, User};
use support::{Daemon, TestDb, opsloop, opsloop_cmd, stderr, stdout, test_db};

const ADMIN: i64 = 1001;
const BOB: i64 = 3001; // approver
const VIC: i64 = 4001; // viewer

/// Where the `agent` step writes its environment before it asks (one test uses it).
fn agent_env_file() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("opsloop-agent-env-{}", std::process::id()))
}

fn policy() -> String {
    let bin = env!("CARGO_BIN_EXE_opsloop");
    let env_file = agent_env_file();
    let env_file = env_file.display();
    format!(
        r#"
[heartbeat]
interval = "300ms"

[telegram]
chat_messages_per_second = 20
command_burst = 50

[templates.chain]
risk = "low"
steps = [
  {{ name = "draft", kind = "shell", run = ["sh", "-c", "printf 'title=Hello world; rm -rf /\nn=7\n' > \"$OPSLOOP_OUTPUT\""] }},
  {{ name = "use", kind = "shell", run = ["printf", "%s|%s", "{{steps.draft.title}}", "n={{steps.draft.n}}"] }},
  {{ name = "only7", kind = "noop", when = {{ "steps.draft.n" = 7 }} }},
  {{ name = "never", kind = "noop", when = {{ "steps.draft.n" = ["1", "2"] }} }},
]

[templates.chatty]
risk = "low"
steps = [ {{ name = "c", kind = "shell", run = ["sh", "-c", "i=0; while [ $i -lt 3000 ]; do echo \"::progress $((i % 100)) step $i\"; i=$((i+1)); done; echo '::progress 100 done'; echo '::progress 7x'"] }} ]

[templates.badout]
risk = "low"
steps = [ {{ name = "x", kind = "shell", max_attempts = 1, run = ["sh", "-c", "echo '[1,2]' > \"$OPSLOOP_OUTPUT\""] }} ]

[templates.missing]
risk = "low"
steps = [
  {{ name = "a", kind = "noop" }},
  {{ name = "b", kind = "shell", run = ["echo", "{{steps.a.nothing}}"] }},
]

[templates.writer]
risk = "low"
steps = [
  {{ name = "draft", kind = "shell", run = ["sh", "-c", "echo title=Launch > \"$OPSLOOP_OUTPUT\""] }},
  {{ name = "go", kind = "ask", question = "Publish <{{steps.draft.title}}>?", choices = ["publish", "revise", "drop"], to = "approvers" }},
  {{ name = "publish", kind = "noop", when = {{ "steps.go.answer" = "publish" }} }},
]

[templates.freetext]
risk = "low"
steps = [
  {{ name = "why", kind = "ask", question = "Why?", reply = {{ pattern = '^[a-z ]{{1,20}}$', help = "a few words" }}, to = "operators" }},
  {{ name = "echo", kind = "shell", run = ["echo", "{{steps.why.answer}}"] }},
]

[templates.timed]
risk = "low"
steps = [ {{ name = "q", kind = "ask", question = "Quick?", choices = ["yes", "no"], timeout = "1s", default = "no" }} ]

[templates.expiring]
risk = "low"
steps = [ {{ name = "q", kind = "ask", question = "Quick?", choices = ["yes", "no"], timeout = "1s" }} ]

[templates.agent]
risk = "low"
steps = [ {{ name = "think", kind = "shell", timeout = "60s", run = ["sh", "-c", "env > '{env_file}.tmp' && mv '{env_file}.tmp' '{env_file}' && a=$('{bin}' ask 'Deploy now?' --choice yes --choice no) && echo \"::progress 50 asked\" && echo got=$a > \"$OPSLOOP_OUTPUT\""] }} ]
"#
    )
}

struct World {
    // First: fields drop in order, and the daemon must stop while its database and
    // Bot API are still there (else its last Telegram call waits for the client timeout).
    daemon: Option<Daemon>,
    db: TestDb,
    fake: FakeTelegram,
    http: String,
}

async fn world() -> World {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    for (id, role) in [(BOB, "approver"), (VIC, "viewer")] {
        opsloop::store::users::grant(
            &db.pool,
            id,
            role.parse().expect("role"),
            opsloop::domain::vocab::Source::Cli,
            "test",
        )
        .await
        .expect("grant");
    }
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut w = World {
        db,
        fake,
        daemon: None,
        http,
    };
    w.start();
    for id in [ADMIN, BOB, VIC] {
        w.fake.send_text(Chat::private(id), user(id), "/start");
        assert!(
            w.fake
                .wait_for(Duration::from_secs(20), |f| !f.sent_messages(id).is_empty())
                .await,
            "no answer to /start for {id}"
        );
    }
    w
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn user(id: i64) -> User {
    User::new(
        id,
        match id {
            ADMIN => "Ada",
            BOB => "Bob",
            _ => "Vic",
        },
    )
}

impl World {
    fn start(&mut self) {
        let file = support::write_temp(&format!("talk-{}.toml", self.db.name), &policy());
        let child = opsloop_cmd(Some(&self.db.url))
            .args(["run", "--policy", support::path_str(&file)])
            .env("TELEGRAM_BOT_TOKEN", self.fake.token())
            .env("TELEGRAM_API_URL", self.fake.url().as_str())
            .env("OPSLOOP_ADMINS", ADMIN.to_string())
            .env("OPSLOOP_HTTP_ADDR", &self.http)
            .env("OPS_KEY", "test-ops-key-123")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn opsloop run");
        self.daemon = Some(Daemon(child));
    }

    fn propose(&self, template: &str) -> i64 {
        let out = opsloop(&self.db.url, &["propose", template, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
        v["mission_id"].as_i64().expect("mission")
    }

    fn mission(&self, id: i64) -> Value {
        let out = opsloop(&self.db.url, &["mission", &id.to_string(), "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).expect("json")
    }

    async fn wait_status(&self, id: i64, want: &str) -> Value {
        for _ in 0..300 {
            let m = self.mission(id);
            if m["status"] == want {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("mission #{id} never {want}: {}", self.mission(id));
    }

    async fn wait_step(&self, id: i64, seq: usize, want: &str) {
        for _ in 0..300 {
            if self.mission(id)["steps"][seq]["status"] == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("step {seq} of #{id} never {want}: {}", self.mission(id));
    }

    async fn open_question(&self, mission: i64) -> Value {
        for _ in 0..300 {
            let out = opsloop(&self.db.url, &["questions", "--json"]);
            let list: Value = serde_json::from_str(&stdout(&out)).expect("json");
            if let Some(q) = list
                .as_array()
                .and_then(|l| l.iter().find(|q| q["mission_id"] == mission))
            {
                return q.clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no open question for mission #{mission}");
    }

    async fn question_message(&self, chat: i64, id: i64) -> support::fake_telegram::Sent {
        let needle = format!("question #{id}</b>");
        assert!(
            self.fake
                .wait_for(Duration::from_secs(20), |f| {
                    f.sent_messages(chat)
                        .iter()
                        .any(|m| m.text.contains(&needle))
                })
                .await,
            "question #{id} never reached {chat}"
        );
        self.fake
            .sent_messages(chat)
            .into_iter()
            .find(|m| m.text.contains(&needle))
            .expect("message")
    }
}

#[tokio::test]
async fn outputs_flow_into_later_steps_and_conditions_skip_or_run() {
    let w = world().await;
    let id = w.propose("chain");
    let m = w.wait_status(id, "succeeded").await;
    let steps = m["steps"].as_array().expect("steps");
    assert_eq!(steps[0]["output"]["title"], "Hello world; rm -rf /");
    assert_eq!(steps[0]["output"]["n"], "7");
    // One argv element each, never through a shell: the `; rm -rf /` is only text.
    assert_eq!(
        steps[1]["result"]["stdout"], "Hello world; rm -rf /|n=7",
        "{m}"
    );
    assert_eq!(steps[2]["status"], "succeeded", "7 matches \"7\"");
    assert_eq!(steps[3]["status"], "skipped");
    assert_eq!(steps[3]["attempts"], 0, "a skipped step never ran");
    let skipped: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM ops_agent_events WHERE mission_id = $1 AND kind = 'step.skipped'",
    )
    .bind(id)
    .fetch_all(&w.db.pool)
    .await
    .expect("events");
    assert_eq!(
        skipped.len(),
        1,
        "{}",
        stdout(&opsloop(&w.db.url, &["events", "--json"]))
    );

    // Thousands of progress lines a second: the latest is kept, a few events written.
    let chatty = w.propose("chatty");
    let m = w.wait_status(chatty, "succeeded").await;
    assert_eq!(m["steps"][0]["progress"]["percent"], 100, "{m}");
    assert_eq!(m["steps"][0]["progress"]["text"], "done");
    let written: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ops_agent_events WHERE mission_id = $1 AND kind = 'step.progress'",
    )
    .bind(chatty)
    .fetch_one(&w.db.pool)
    .await
    .expect("count");
    assert!((1..=3).contains(&written), "{written} progress events");

    // An output that is not an object fails the attempt, saying why.
    let bad = w.propose("badout");
    let m = w.wait_status(bad, "failed").await;
    let error = m["steps"][0]["error"].as_str().unwrap_or("");
    assert!(error.contains("JSON array"), "{error}");
    assert!(m["steps"][0]["output"].is_null());

    // A reference with no value fails the step at once, naming the key.
    let missing = w.propose("missing");
    let m = w.wait_status(missing, "failed").await;
    assert_eq!(m["steps"][1]["attempts"], 1, "no retry: {m}");
    let error = m["steps"][1]["error"].as_str().unwrap_or("");
    assert!(error.contains("nothing"), "{error}");
}

#[tokio::test]
async fn an_ask_step_is_answered_once_from_the_cli_and_its_answer_decides() {
    let w = world().await;
    let id = w.propose("writer");
    w.wait_step(id, 1, "asking").await;
    let q = w.open_question(id).await;
    let qid = q["id"].as_i64().expect("id").to_string();
    // The question carries the earlier step's output, substituted.
    assert_eq!(q["question"], "Publish <Launch>?");
    assert_eq!(
        q["choices"],
        serde_json::json!(["publish", "revise", "drop"])
    );

    let bad = opsloop(&w.db.url, &["answer", &qid, "ship it"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("publish, revise, drop"),
        "{}",
        stderr(&bad)
    );
    assert!(
        opsloop(&w.db.url, &["answer", "99999", "publish"])
            .status
            .code()
            == Some(2)
    );

    // Several answers at once: exactly one wins.
    let url = w.db.url.clone();
    let racers: Vec<_> = ["publish", "drop", "publish", "revise"]
        .into_iter()
        .map(|a| {
            let (url, qid) = (url.clone(), qid.clone());
            std::thread::spawn(move || {
                opsloop(&url, &["answer", &qid, a, "--as", &format!("cli:{a}")])
                    .status
                    .code()
            })
        })
        .collect();
    let codes: Vec<Option<i32>> = racers
        .into_iter()
        .map(|t| t.join().expect("join"))
        .collect();
    assert_eq!(
        codes.iter().filter(|c| **c == Some(0)).count(),
        1,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == Some(3)).count(),
        3,
        "{codes:?}"
    );

    let m = w.wait_status(id, "succeeded").await;
    let answer = m["steps"][1]["output"]["answer"].as_str().expect("answer");
    let expected = if answer == "publish" {
        "succeeded"
    } else {
        "skipped"
    };
    assert_eq!(m["steps"][2]["status"], expected, "{m}");
    let late = opsloop(&w.db.url, &["answer", &qid, "publish"]);
    assert_eq!(late.status.code(), Some(3));
    assert!(
        stderr(&late).contains("already answered"),
        "{}",
        stderr(&late)
    );
}

#[tokio::test]
async fn telegram_answers_a_tap_from_an_approver_and_refuses_others() {
    let w = world().await;
    let id = w.propose("writer");
    let q = w.open_question(id).await;
    let qid = q["id"].as_i64().expect("id");
    let to_bob = w.question_message(BOB, qid).await;
    let to_ada = w.question_message(ADMIN, qid).await;
    // HTML in the question is escaped (the fake API refuses bad HTML).
    assert!(
        to_bob.text.contains("Publish &lt;Launch&gt;?"),
        "{}",
        to_bob.text
    );
    let keyboard = to_bob.reply_markup.clone().expect("buttons");
    let data = keyboard["inline_keyboard"][0][0]["callback_data"]
        .as_str()
        .expect("data")
        .to_string();
    assert_eq!(data, format!("q:{qid}:0"));

    // A viewer's tap, forged and stale data change nothing.
    w.fake
        .tap(Chat::private(VIC), user(VIC), to_bob.message_id, &data);
    w.fake.tap(
        Chat::private(BOB),
        user(BOB),
        to_bob.message_id,
        &format!("q:{qid}:9"),
    );
    w.fake.tap(
        Chat::private(BOB),
        user(BOB),
        to_bob.message_id,
        "q:99999:0",
    );
    assert!(
        w.fake
            .wait_for(Duration::from_secs(20), |f| f.callback_answers().len() >= 3)
            .await
    );
    assert_eq!(w.mission(id)["steps"][1]["status"], "asking");
    let answers = w.fake.callback_answers();
    assert!(
        answers
            .iter()
            .any(|(_, t)| t.as_deref().is_some_and(|t| t.contains("approver"))),
        "{answers:?}"
    );

    w.fake
        .tap(Chat::private(BOB), user(BOB), to_bob.message_id, &data);
    let m = w.wait_status(id, "succeeded").await;
    assert_eq!(m["steps"][1]["output"]["answer"], "publish");
    assert_eq!(m["steps"][1]["output"]["answered_by"], format!("tg:{BOB}"));
    assert_eq!(m["steps"][2]["status"], "succeeded");
    // Every copy shows the answer, without buttons.
    for (chat, msg) in [(BOB, &to_bob), (ADMIN, &to_ada)] {
        let edited = w
            .fake
            .wait_for(Duration::from_secs(20), |f| {
                f.sent_messages(chat).iter().any(|s| {
                    s.message_id == msg.message_id
                        && s.text.contains("answered by")
                        && s.reply_markup.is_none()
                })
            })
            .await;
        assert!(
            edited,
            "copy in {chat} not edited: {:?}",
            w.fake.sent_messages(chat)
        );
    }
    // A late tap is told who answered.
    w.fake
        .tap(Chat::private(ADMIN), user(ADMIN), to_ada.message_id, &data);
    assert!(
        w.fake
            .wait_for(Duration::from_secs(20), |f| f
                .callback_answers()
                .iter()
                .any(|(_, t)| t
                    .as_deref()
                    .is_some_and(|t| t.contains("already answered"))))
            .await
    );
}

#[tokio::test]
async fn free_text_is_answered_by_a_reply_and_checked_against_the_pattern() {
    let w = world().await;
    let id = w.propose("freetext");
    let q = w.open_question(id).await;
    let qid = q["id"].as_i64().expect("id");
    let msg = w.question_message(ADMIN, qid).await;
    assert!(msg.text.contains("Reply to this message"), "{}", msg.text);
    // Too long, and HTML: refused with what is allowed; nothing changes.
    let long = "a".repeat(4096);
    w.fake
        .send_reply(Chat::private(ADMIN), user(ADMIN), &long, msg.message_id);
    w.fake.send_reply(
        Chat::private(ADMIN),
        user(ADMIN),
        "<b>bold</b>",
        msg.message_id,
    );
    assert!(
        w.fake
            .wait_for(Duration::from_secs(20), |f| {
                f.sent_messages(ADMIN)
                    .iter()
                    .filter(|m| m.text.contains("must match") || m.text.contains("at most"))
                    .count()
                    >= 2
            })
            .await,
        "{:?}",
        w.fake.sent_messages(ADMIN)
    );
    assert_eq!(w.mission(id)["steps"][0]["status"], "asking");
    w.fake.send_reply(
        Chat::private(ADMIN),
        user(ADMIN),
        "because it is late",
        msg.message_id,
    );
    let m = w.wait_status(id, "succeeded").await;
    assert_eq!(m["steps"][1]["result"]["stdout"], "because it is late\n");
    // `/answer` on a question no longer open is told so.
    w.fake.send_text(
        Chat::private(ADMIN),
        user(ADMIN),
        &format!("/answer {qid} again"),
    );
    assert!(
        w.fake
            .wait_for(Duration::from_secs(20), |f| f
                .sent_messages(ADMIN)
                .iter()
                .any(|m| m.text.contains("already answered")))
            .await
    );
}

#[tokio::test]
async fn opsloop_ask_inside_a_step_waits_for_a_tap_and_prints_the_answer() {
    let w = world().await;
    // Outside a step, or with forged credentials: exit 3, nothing asked.
    let outside = opsloop(&w.db.url, &["ask", "Deploy?", "--choice", "yes"]);
    assert_eq!(outside.status.code(), Some(3), "{}", stderr(&outside));
    let id = w.propose("agent");
    let q = w.open_question(id).await;
    let qid = q["id"].as_i64().expect("id");
    let step_id = q["step_id"].as_i64().expect("step");
    // The step keeps running (and its lease) while it waits.
    assert_eq!(w.mission(id)["steps"][0]["status"], "running");
    // The step wrote its environment before asking: the daemon's secrets are not in it,
    // and its ask socket is, to be tried with a forged token.
    let env = std::fs::read_to_string(agent_env_file()).expect("the step's environment");
    for secret in ["OPS_KEY", "DATABASE_URL", "TELEGRAM_BOT_TOKEN"] {
        assert!(
            !env.lines().any(|l| l.starts_with(&format!("{secret}="))),
            "{secret} reached the step:\n{env}"
        );
    }
    assert!(
        !env.contains("test-ops-key-123")
            && !env.contains(&w.db.url)
            && !env.contains(w.fake.token()),
        "{env}"
    );
    let socket = env
        .lines()
        .find_map(|l| l.strip_prefix("OPSLOOP_ASK_SOCKET="))
        .expect("the step is told where to ask");
    assert!(std::path::Path::new(socket).exists(), "{socket}");
    let forged = opsloop_cmd(Some(&w.db.url))
        .args(["ask", "Forged?", "--choice", "x"])
        .env("OPSLOOP_ASK_SOCKET", socket)
        .env("OPSLOOP_ASK_TOKEN", "0".repeat(64))
        .env("OPSLOOP_STEP_ID", step_id.to_string())
        .output()
        .expect("run");
    assert_eq!(forged.status.code(), Some(3), "{}", stderr(&forged));
    let list = opsloop(&w.db.url, &["questions", "--json"]);
    let open: Value = serde_json::from_str(&stdout(&list)).expect("json");
    assert_eq!(open.as_array().map(Vec::len), Some(1), "{open}");

    let msg = w.question_message(BOB, qid).await;
    w.fake.tap(
        Chat::private(BOB),
        user(BOB),
        msg.message_id,
        &format!("q:{qid}:0"),
    );
    let m = w.wait_status(id, "succeeded").await;
    assert_eq!(m["steps"][0]["output"]["got"], "yes", "{m}");
    assert_eq!(m["steps"][0]["progress"]["percent"], 50);
    let _ = std::fs::remove_file(agent_env_file());
}

#[tokio::test]
async fn http_questions_long_poll_until_answered() {
    let w = world().await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", w.http);
    let auth = "Bearer test-ops-key-123";
    let mut ready = false;
    for _ in 0..100 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "HTTP never came up");
    let post = |body: Value| {
        client
            .post(format!("{base}/api/questions"))
            .header("Authorization", auth)
            .json(&body)
            .send()
    };
    let both = post(serde_json::json!({"question": "x", "choices": ["a"], "pattern": "b"}))
        .await
        .expect("post");
    assert_eq!(both.status(), 422);
    let bad_default = post(
        serde_json::json!({"question": "x", "choices": ["a"], "default": "z", "timeout": "1h"}),
    )
    .await
    .expect("post");
    assert_eq!(bad_default.status(), 422);
    let nul = post(serde_json::json!({"question": "x\u{0}"}))
        .await
        .expect("post");
    assert_eq!(nul.status(), 422);
    let created = post(serde_json::json!({"question": "Which region?", "choices": ["eu", "us"]}))
        .await
        .expect("post");
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.expect("json")["id"]
        .as_i64()
        .expect("id");
    let poll = {
        let client = client.clone();
        let url = format!("{base}/api/questions/{id}?wait=30s");
        tokio::spawn(async move {
            client
                .get(url)
                .header("Authorization", auth)
                .send()
                .await
                .expect("get")
                .json::<Value>()
                .await
                .expect("json")
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = |a: &str| {
        client
            .post(format!("{base}/api/questions/{id}/answer"))
            .header("Authorization", auth)
            .json(&serde_json::json!({"answer": a, "answered_by": "agent-x"}))
            .send()
    };
    assert_eq!(answer("mars").await.expect("post").status(), 422);
    assert_eq!(answer("eu").await.expect("post").status(), 200);
    assert_eq!(answer("us").await.expect("post").status(), 409);
    let seen = poll.await.expect("poll");
    assert_eq!(seen["status"], "answered");
    assert_eq!(seen["answer"], "eu");
    let bad_wait = client
        .get(format!("{base}/api/questions/{id}?wait=soon"))
        .header("Authorization", auth)
        .send()
        .await
        .expect("get");
    assert_eq!(bad_wait.status(), 400);
    let none = client
        .get(format!("{base}/api/questions/424242"))
        .header("Authorization", auth)
        .send()
        .await
        .expect("get");
    assert_eq!(none.status(), 404);
}

#[tokio::test]
async fn a_question_survives_a_crash_and_timeouts_answer_or_expire() {
    let mut w = world().await;
    let id = w.propose("writer");
    let q = w.open_question(id).await;
    let qid = q["id"].as_i64().expect("id").to_string();
    if let Some(mut d) = w.daemon.take() {
        d.signal(libc::SIGKILL);
    }
    // Answered while no daemon runs; the restarted one goes on from there.
    let ok = opsloop(&w.db.url, &["answer", &qid, "publish"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    w.start();
    w.wait_status(id, "succeeded").await;

    let timed = w.propose("timed");
    let m = w.wait_status(timed, "succeeded").await;
    assert_eq!(m["steps"][0]["output"]["answer"], "no");
    assert_eq!(m["steps"][0]["output"]["answered_by"], "timeout");

    let expiring = w.propose("expiring");
    let m = w.wait_status(expiring, "failed").await;
    assert!(
        m["steps"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("expired")),
        "{m}"
    );
}

#[tokio::test]
async fn cancel_while_asking_closes_the_question_and_edits_its_messages() {
    let w = world().await;
    let id = w.propose("writer");
    let q = w.open_question(id).await;
    let qid = q["id"].as_i64().expect("id");
    let msg = w.question_message(BOB, qid).await;
    let out = opsloop(&w.db.url, &["cancel", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = w.wait_status(id, "cancelled").await;
    assert_eq!(m["steps"][1]["status"], "cancelled");
    let late = opsloop(&w.db.url, &["answer", &qid.to_string(), "publish"]);
    assert_eq!(late.status.code(), Some(3));
    assert!(stderr(&late).contains("cancelled"));
    assert!(
        w.fake
            .wait_for(Duration::from_secs(20), |f| f
                .sent_messages(BOB)
                .iter()
                .any(|s| {
                    s.message_id == msg.message_id
                        && s.text.contains("cancelled")
                        && s.reply_markup.is_none()
                }))
            .await
    );
}
