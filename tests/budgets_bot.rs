//! Budgets in Telegram (issue 12, "Done when" 2): admins are told of the warning and the
//! exhaustion; the exhausted message's **➕ Raise 50%** works for an admin (answered at
//! once, every copy edited) and for nobody else (refused, nothing changes); a second or
//! stale tap is told so; `/budgets`. The real `opsloop run` against the fake Bot API.

mod support;

use std::time::Duration;

use support::fake_telegram::{Chat, FakeTelegram, Sent, User};
use support::{Daemon, TestDb, test_db};

const POLICY: &str = r#"
[heartbeat]
interval = "500ms"

[worker]
max_attempts = 1

[telegram]
chat_messages_per_second = 20
command_burst = 50
proposal_burst = 20

[templates.draft]
risk = "low"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "write", kind = "shell", run = ["sh", "-c", "echo cost=2 > \"$OPSLOOP_OUTPUT\""] } ]

[budgets.writing]
limit = 2.0
period = "day"
templates = ["draft"]
warn_at = 0.8
"#;

const ADA: i64 = 1001; // admin
const ALF: i64 = 1002; // admin
const BOB: i64 = 3001; // approver

fn user(id: i64) -> User {
    let name = match id {
        ADA => "Ada",
        ALF => "Alf",
        _ => "Bob",
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

impl World {
    async fn say(&self, id: i64, text: &str) {
        self.fake.send_text(Chat::private(id), user(id), text);
    }

    async fn any_text(&self, chat: i64, words: &str) -> bool {
        self.fake
            .wait_for(Duration::from_secs(20), |f| {
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

fn button_data(m: &Sent) -> Option<String> {
    let markup = m.reply_markup.as_ref()?.to_string();
    let start = markup.find("bud:")?;
    let rest = &markup[start..];
    let end = rest.find('"').unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_are_told_and_only_an_admins_raise_tap_raises() {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    opsloop::store::users::grant(
        &db.pool,
        BOB,
        "approver".parse().expect("role"),
        opsloop::domain::vocab::Source::Cli,
        "test",
    )
    .await
    .expect("grant");
    let daemon = Daemon::start(&db, &fake, POLICY, &format!("{ADA},{ALF}"));
    let w = World {
        db,
        fake,
        _daemon: daemon,
    };
    for id in [ADA, ALF, BOB] {
        w.say(id, "/start").await;
        assert!(w.any_text(id, "Hi").await, "no answer to /start for {id}");
    }

    // One mission spends the whole budget: both admins are told of the warning and the
    // exhaustion (whatever notify.events says); the approver is not.
    w.say(BOB, "/propose draft n=1").await;
    let mut copies = Vec::new();
    for admin in [ADA, ALF] {
        w.message(admin, "<b>budget writing</b> at its warning: spent 2 of 2")
            .await;
        let exhausted = w.message(admin, "<b>budget writing</b> is exhausted").await;
        assert!(
            exhausted.text.contains("spent 2 of 2 this day"),
            "{}",
            exhausted.text
        );
        assert!(button_data(&exhausted).is_some(), "{exhausted:?}");
        copies.push((admin, exhausted));
    }
    assert!(!w.any_text(BOB, "budget writing").await);
    let data = button_data(&copies[0].1).expect("the Raise button");
    assert!(data.len() <= 64 && data.ends_with(":0:writing"), "{data}");

    // The gate refuses the next proposal, in the chat too.
    w.say(BOB, "/propose draft n=2").await;
    assert!(w.any_text(BOB, "budget writing is exhausted").await);

    // A non-admin's tap is refused and changes nothing.
    let answer = w.tap(BOB, copies[0].1.message_id, &data).await;
    assert!(answer.contains("needs the admin role"), "{answer}");
    assert_eq!(
        w.scalar("SELECT count(*) FROM ops_agent_events WHERE kind = 'budget.raised'")
            .await,
        0
    );
    assert_eq!(
        w.scalar("SELECT raises::bigint FROM ops_budget_periods")
            .await,
        0
    );
    // A stranger's too.
    let query = w.fake.tap(
        Chat::private(777),
        User::new(777, "Eve"),
        copies[0].1.message_id,
        &data,
    );
    assert!(
        w.fake
            .wait_for(Duration::from_secs(10), |f| f
                .callback_answers()
                .iter()
                .any(|(q, t)| *q == query
                    && t.as_deref().is_some_and(|t| t.contains("Not authorized"))))
            .await
    );

    // Stale and malformed buttons: told so, nothing changes.
    for (bad, told) in [
        ("bud:20200101:0:writing", "period of budget writing is over"),
        ("bud:20200101:0:gone", "no longer in the policy"),
        ("bud:nonsense", "not one of mine"),
    ] {
        let answer = w.tap(ADA, copies[0].1.message_id, bad).await;
        assert!(answer.contains(told), "{bad}: {answer}");
    }
    assert_eq!(
        w.scalar("SELECT count(*) FROM ops_agent_events WHERE kind = 'budget.raised'")
            .await,
        0
    );

    // An admin's tap raises by half the limit, answered at once; every copy is edited
    // (no button, who raised it); a second tap is told it was already raised.
    let answer = w.tap(ADA, copies[0].1.message_id, &data).await;
    assert!(answer.contains("raised by 1"), "{answer}");
    assert!(answer.contains("limit now 3"), "{answer}");
    for (admin, original) in &copies {
        assert!(
            w.fake
                .wait_for(Duration::from_secs(15), |f| {
                    f.sent_messages(*admin).iter().any(|m| {
                        m.message_id == original.message_id
                            && m.text.contains("raised by Ada")
                            && m.reply_markup.is_none()
                    })
                })
                .await,
            "exhausted message in chat {admin} not edited: {:#?}",
            w.fake.sent_messages(*admin)
        );
    }
    let answer = w.tap(ALF, copies[1].1.message_id, &data).await;
    assert!(answer.contains("already raised by tg:1001"), "{answer}");
    assert_eq!(
        w.scalar("SELECT count(*) FROM ops_agent_events WHERE kind = 'budget.raised'")
            .await,
        1
    );

    // Work goes through again; /budgets shows it.
    w.say(BOB, "/propose draft n=3").await;
    assert!(w.any_text(BOB, "proposal #3 approved").await);
    w.say(BOB, "/budgets").await;
    assert!(w.any_text(BOB, "<b>writing</b> ·").await);
}
