//! Operator controls in Telegram (issue 13, "Done when" 2): the failure message with its
//! stderr tail and Retry button, who may tap it, `/kill`, `/propose … priority=N`, and
//! a command's reply before what it causes. The real `opsloop run` against the fake
//! Bot API and a real PostgreSQL.

mod support;

use std::time::Duration;

use support::fake_telegram::{Chat, FakeTelegram, Sent, User};
use support::{Daemon, TestDb, test_db};

const POLICY: &str = r#"
[approval]
ttl = "1h"

[heartbeat]
interval = "500ms"

[worker]
max_attempts = 1

[notify]
events = ["proposal.*", "mission.*", "step.failed"]

[telegram]
chat_messages_per_second = 20
command_burst = 50
proposal_burst = 20

[templates.hello]
risk = "low"
params.name = { pattern = '^[a-z]+$', help = "who to greet" }
steps = [ { name = "greet", kind = "noop" } ]

[templates.boom]
description = "Fails like a full disk"
risk = "high"
steps = [
  { name = "prepare", kind = "noop" },
  { name = "boom", kind = "shell", run = ["sh", "-c", "echo '<disk full>: /var/lib/thing' >&2; exit 3"] },
]

[templates.deploy]
risk = "high"
priority = 10
params.tag = { pattern = '^v\d+$', help = "tag" }
steps = [ { name = "ship", kind = "noop" } ]
"#;

const ADMIN: i64 = 1001;
const ANN: i64 = 2001; // operator
const BOB: i64 = 3001; // approver
const VIC: i64 = 4001; // viewer

fn user(id: i64) -> User {
    let name = match id {
        ADMIN => "Ada",
        ANN => "Ann",
        BOB => "Bob",
        _ => "Vic",
    };
    User::new(id, name)
}

struct World {
    // First: fields drop in order, and the daemon must stop while its database and
    // Bot API are still there (else its last Telegram call waits for the client timeout).
    _daemon: Daemon,
    db: TestDb,
    fake: FakeTelegram,
}

async fn world() -> World {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    for (id, role) in [(ANN, "operator"), (BOB, "approver"), (VIC, "viewer")] {
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
    let daemon = Daemon::start(&db, &fake, POLICY, &ADMIN.to_string());
    let w = World {
        db,
        fake,
        _daemon: daemon,
    };
    for id in [ADMIN, ANN, BOB, VIC] {
        w.say(id, "/start").await;
        assert!(w.any_text(id, "Hi").await, "no answer to /start for {id}");
    }
    w
}

impl World {
    async fn say(&self, id: i64, text: &str) {
        self.fake.send_text(Chat::private(id), user(id), text);
    }

    async fn any_text(&self, chat: i64, words: &str) -> bool {
        self.fake
            .wait_for(Duration::from_secs(15), |f| {
                f.sent_messages(chat).iter().any(|m| m.text.contains(words))
            })
            .await
    }

    async fn message(&self, chat: i64, words: &str) -> Sent {
        assert!(
            self.any_text(chat, words).await,
            "no {words:?} in chat {chat}: {:#?}",
            self.fake.sent_messages(chat)
        );
        self.fake
            .sent_messages(chat)
            .into_iter()
            .find(|m| m.text.contains(words))
            .expect("message")
    }

    async fn tap(&self, id: i64, message_id: i64, data: &str) -> String {
        let query = self.fake.tap(Chat::private(id), user(id), message_id, data);
        assert!(
            self.fake
                .wait_for(Duration::from_secs(10), |f| {
                    f.callback_answers().iter().any(|(q, _)| *q == query)
                })
                .await,
            "tap {data} by {id} was not answered"
        );
        self.fake
            .callback_answers()
            .into_iter()
            .find(|(q, _)| *q == query)
            .and_then(|(_, text)| text)
            .unwrap_or_default()
    }

    async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db.pool)
            .await
            .expect(sql)
    }
}

fn has_button(m: &Sent, data: &str) -> bool {
    m.reply_markup
        .as_ref()
        .is_some_and(|k| k.to_string().contains(data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_message_says_why_and_an_approvers_tap_retries() {
    let w = world().await;
    for id in [ANN, BOB, VIC] {
        w.say(id, "/subscribe").await;
        assert!(w.any_text(id, "Subscribed").await);
    }
    w.say(ANN, "/propose boom").await;
    let prompt = w.message(BOB, "proposal #1</b>").await;
    assert!(
        w.tap(BOB, prompt.message_id, "a:1")
            .await
            .contains("approved")
    );

    // The failure message: the step, its attempts, the error, the stderr tail
    // (escaped), and the Retry button, for everyone who sees it.
    let failure = w.message(VIC, "failed at step").await;
    for words in [
        "mission #1</b>",
        "<b>boom</b>",
        "after 1 attempt",
        "exit status 3",
        "&lt;disk full&gt;: /var/lib/thing",
    ] {
        assert!(failure.text.contains(words), "{words}: {}", failure.text);
    }
    assert!(has_button(&failure, "retry:1"), "{failure:?}");
    // The card shows each step's duration.
    let card = w.message(ANN, "mission #1</b> · boom · failed").await;
    assert!(card.text.contains("prepare ·"), "{}", card.text);

    // A viewer's tap changes nothing; an operator may not retry high risk.
    let answer = w.tap(VIC, failure.message_id, "retry:1").await;
    assert!(answer.contains("Not allowed"), "{answer}");
    let ann_failure = w.message(ANN, "failed at step").await;
    let answer = w.tap(ANN, ann_failure.message_id, "retry:1").await;
    assert!(answer.contains("needs the approver role"), "{answer}");
    assert_eq!(
        w.scalar("SELECT count(*) FROM ops_agent_events WHERE kind = 'mission.retried'")
            .await,
        0
    );

    // An approver's tap retries: answered at once, the failure messages edited.
    let bob_failure = w.message(BOB, "failed at step").await;
    let answer = w.tap(BOB, bob_failure.message_id, "retry:1").await;
    assert!(
        answer.contains("mission #1 retried from step boom (attempt 2)"),
        "{answer}"
    );
    for chat in [BOB, VIC, ANN] {
        let original = w.message(chat, "failed at step").await;
        assert!(
            w.fake
                .wait_for(Duration::from_secs(15), |f| {
                    f.sent_messages(chat).iter().any(|m| {
                        m.message_id == original.message_id
                            && m.text.contains("retried by Bob")
                            && m.reply_markup.is_none()
                    })
                })
                .await,
            "failure message in chat {chat} not edited: {:#?}",
            w.fake.sent_messages(chat)
        );
    }
    // It fails again (the disk is still full): a second failure message, with its button.
    assert!(
        w.fake
            .wait_for(Duration::from_secs(15), |f| f
                .sent_messages(BOB)
                .iter()
                .any(
                    |m| m.text.contains("after 2 attempts") && has_button(m, "retry:1")
                ))
            .await,
        "{:#?}",
        w.fake.sent_messages(BOB)
    );
    // `/retry ID` from an operator is refused the same way.
    w.say(ANN, "/retry 1").await;
    assert!(w.any_text(ANN, "needs the approver role").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_is_for_admins_and_tells_them() {
    let w = world().await;
    w.say(ANN, "/kill").await;
    assert!(w.any_text(ANN, "admin").await);
    w.say(BOB, "/kill now").await;
    assert!(w.any_text(BOB, "admin").await);
    assert_eq!(
        w.scalar("SELECT count(*) FROM ops_agent_events WHERE kind = 'system.killed'")
            .await,
        0
    );
    w.say(ADMIN, "/kill runaway <agent>").await;
    assert!(
        w.any_text(ADMIN, "🛑 Killed: paused, 0 running missions cancelled")
            .await
    );
    // Admins are told, the reason escaped.
    assert!(w.any_text(ADMIN, "kill switch</b> by Ada").await);
    assert!(w.any_text(ADMIN, "reason: runaway &lt;agent&gt;").await);
    assert_eq!(
        w.scalar("SELECT count(*) FROM ops_agent_events WHERE kind = 'system.killed'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_approvers_raise_a_priority_and_replies_come_first() {
    let w = world().await;
    w.say(ANN, "/subscribe").await;
    assert!(w.any_text(ANN, "Subscribed").await);
    // The reply to a command comes before the mission card it caused.
    w.say(ANN, "/propose hello name=ada").await;
    assert!(w.any_text(ANN, "mission #1</b> · hello · succeeded").await);
    let texts: Vec<String> = w
        .fake
        .sent_messages(ANN)
        .into_iter()
        .map(|m| m.text)
        .collect();
    let reply = texts
        .iter()
        .position(|t| t.contains("proposal #1 approved"));
    let card = texts.iter().position(|t| t.contains("mission #1</b>"));
    assert!(reply.is_some() && reply < card, "{texts:#?}");

    // An operator may only lower a template's priority; an approver may raise it.
    w.say(ANN, "/propose deploy tag=v1 priority=50").await;
    assert!(w.any_text(ANN, "only an approver may raise it").await);
    w.say(ANN, "/propose deploy tag=v2 priority=-5").await;
    assert!(w.any_text(ANN, "proposal #2").await);
    w.say(ANN, "/propose deploy tag=v3 priority=high").await;
    assert!(w.any_text(ANN, "is not a number").await);
    w.say(BOB, "/propose deploy tag=v4 priority=50").await;
    // Bob is an approver: his own prompt comes after his reply.
    assert!(w.any_text(BOB, "proposal #3</b>").await);
    let texts: Vec<String> = w
        .fake
        .sent_messages(BOB)
        .into_iter()
        .map(|m| m.text)
        .collect();
    let reply = texts.iter().position(|t| t.contains("proposal #3 ("));
    let prompt = texts.iter().position(|t| t.contains("proposal #3</b>"));
    assert!(reply.is_some() && reply < prompt, "{texts:#?}");
    assert_eq!(
        w.scalar("SELECT priority::bigint FROM ops_mission_proposals WHERE id = 2")
            .await,
        -5
    );
    assert_eq!(
        w.scalar("SELECT priority::bigint FROM ops_mission_proposals WHERE id = 3")
            .await,
        50
    );
}
