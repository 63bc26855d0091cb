//! The Telegram bot end to end: the real `opsloop run` against the fake Bot API and a
//! real PostgreSQL (issue 4, "Done when" 1, 2 and 4).

mod support;

use std::time::Duration;

use support::fake_telegram::{Chat, FakeTelegram, User};
use support::{Daemon, TestDb, test_db};

const POLICY: &str = r#"
[approval]
ttl = "1h"

[heartbeat]
interval = "500ms"

[notify]
events = ["proposal.*", "mission.*", "step.failed"]

[templates.hello]
description = "Say hello"
risk = "low"
params.name = { pattern = '^[\p{L}a-z0-9 <>&"!?🙂-]{1,40}$', help = "who to greet" }
steps = [ { name = "greet", kind = "shell", run = ["echo", "hello {name}"] } ]

[templates.deploy]
description = "Deploy a tagged release"
risk = "high"
params.tag = { pattern = '^v\d+\.\d+\.\d+$', help = "release tag, e.g. v1.4.2" }
steps = [ { name = "build", kind = "noop" }, { name = "ship", kind = "noop" } ]

[templates.wipe]
description = "Dangerous"
risk = "red"
params.target = { pattern = '^[a-z]+$', help = "what to wipe" }
steps = [ { name = "wipe", kind = "noop" } ]
"#;

const ADMIN: i64 = 1001;
const ANN: i64 = 2001; // operator
const BOB: i64 = 3001; // approver
const CAROL: i64 = 3002; // approver
const VIC: i64 = 4001; // viewer
const EVE: i64 = 6666; // stranger

fn user(id: i64) -> User {
    let name = match id {
        ADMIN => "Ada",
        ANN => "Ann",
        BOB => "Bob",
        CAROL => "Carol",
        VIC => "Vic",
        _ => "Eve",
    };
    User::new(id, name)
}

/// Tests talk faster than people; the limits themselves are tested with their own.
const FAST: &str = r#"
[telegram]
chat_messages_per_second = 20
command_burst = 50
proposal_burst = 20
"#;

fn start_daemon(db: &TestDb, fake: &FakeTelegram, limits: &str) -> Daemon {
    Daemon::start(db, fake, &format!("{POLICY}{limits}"), &ADMIN.to_string())
}

struct World {
    // First: fields drop in order, and the daemon must stop while its database and
    // Bot API are still there (else its last Telegram call waits for the client timeout).
    _daemon: Daemon,
    db: TestDb,
    fake: FakeTelegram,
}

/// A daemon with the users above; every known user has said /start privately.
async fn world() -> World {
    world_with(FAST).await
}

async fn world_with(limits: &str) -> World {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    for (id, role) in [
        (ANN, "operator"),
        (BOB, "approver"),
        (CAROL, "approver"),
        (VIC, "viewer"),
    ] {
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
    let daemon = start_daemon(&db, &fake, limits);
    let w = World {
        db,
        fake,
        _daemon: daemon,
    };
    for id in [ADMIN, ANN, BOB, CAROL, VIC] {
        w.say(id, "/start").await;
        assert!(
            w.last_text_contains(id, "Hi").await,
            "no answer to /start for {id}"
        );
    }
    w
}

impl World {
    async fn say(&self, id: i64, text: &str) {
        self.fake.send_text(Chat::private(id), user(id), text);
    }

    /// Wait until the newest message in `chat` contains `words`.
    async fn last_text_contains(&self, chat: i64, words: &str) -> bool {
        self.fake
            .wait_for(Duration::from_secs(15), |f| {
                f.sent_messages(chat)
                    .last()
                    .is_some_and(|m| m.text.contains(words))
            })
            .await
    }

    async fn any_text_contains(&self, chat: i64, words: &str) -> bool {
        self.fake
            .wait_for(Duration::from_secs(15), |f| {
                f.sent_messages(chat).iter().any(|m| m.text.contains(words))
            })
            .await
    }

    fn prompt_of(&self, chat: i64, proposal: i64) -> Option<support::fake_telegram::Sent> {
        self.fake
            .sent_messages(chat)
            .into_iter()
            .find(|m| m.text.contains(&format!("proposal #{proposal}</b>")))
    }

    async fn wait_prompt(&self, chat: i64, proposal: i64) -> support::fake_telegram::Sent {
        assert!(
            self.fake
                .wait_for(Duration::from_secs(15), |f| f
                    .sent_messages(chat)
                    .iter()
                    .any(|m| m.text.contains(&format!("proposal #{proposal}</b>"))))
                .await,
            "no prompt for proposal #{proposal} in chat {chat}: {:?}",
            self.fake.sent_messages(chat)
        );
        self.prompt_of(chat, proposal).expect("prompt")
    }

    /// Tap a button and wait for its answer.
    async fn tap(&self, id: i64, message_id: i64, data: &str) -> String {
        let query = self.fake.tap(Chat::private(id), user(id), message_id, data);
        let answered = self
            .fake
            .wait_for(Duration::from_secs(10), |f| {
                f.callback_answers().iter().any(|(q, _)| *q == query)
            })
            .await;
        assert!(answered, "tap {data} by {id} was not answered");
        self.fake
            .callback_answers()
            .into_iter()
            .find(|(q, _)| *q == query)
            .and_then(|(_, text)| text)
            .unwrap_or_default()
    }

    async fn mission_status(&self, id: i64) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM ops_missions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await
            .expect("status")
    }

    async fn proposal_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM ops_mission_proposals")
            .fetch_one(&self.db.pool)
            .await
            .expect("count")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_risk_proposal_runs_and_its_card_ends_in_success() {
    let w = world().await;
    w.say(ANN, "/subscribe").await;
    assert!(w.last_text_contains(ANN, "Subscribed").await);
    w.say(ANN, "/propose hello name=ada").await;
    assert!(
        w.any_text_contains(ANN, "proposal #1 approved: mission #1 started")
            .await
    );
    assert!(
        w.any_text_contains(ANN, "mission #1</b> · hello · succeeded")
            .await,
        "{:?}",
        w.fake.sent_messages(ANN)
    );
    // One card per mission, edited rather than sent again.
    let cards: Vec<_> = w
        .fake
        .sent_messages(ANN)
        .into_iter()
        .filter(|m| m.text.contains("mission #1</b>"))
        .collect();
    assert_eq!(cards.len(), 1, "{cards:?}");
    assert_eq!(cards[0].parse_mode.as_deref(), Some("HTML"));
    // setMyCommands registered the command list at start.
    assert!(w.fake.commands().to_string().contains("propose"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_risk_prompts_every_approver_and_a_tap_approves() {
    let w = world().await;
    w.say(ANN, "/propose deploy tag=v1.4.2").await;
    assert!(w.any_text_contains(ANN, "awaits approval").await);
    let bob_prompt = w.wait_prompt(BOB, 1).await;
    let carol_prompt = w.wait_prompt(CAROL, 1).await;
    let admin_prompt = w.wait_prompt(ADMIN, 1).await;
    assert!(bob_prompt.reply_markup.is_some(), "prompt has buttons");
    assert!(
        bob_prompt.text.contains("v1.4.2") && bob_prompt.text.contains("Ann"),
        "{}",
        bob_prompt.text
    );
    assert!(w.prompt_of(ANN, 1).is_none(), "operators get no prompt");
    assert!(w.prompt_of(VIC, 1).is_none(), "viewers get no prompt");

    let answer = w.tap(BOB, bob_prompt.message_id, "a:1").await;
    assert!(
        answer.contains("approved") && answer.contains("mission #1"),
        "{answer}"
    );
    // Every prompt is edited to the outcome, buttons removed.
    for (chat, prompt) in [
        (BOB, &bob_prompt),
        (CAROL, &carol_prompt),
        (ADMIN, &admin_prompt),
    ] {
        let edited = w
            .fake
            .wait_for(Duration::from_secs(15), |f| {
                f.sent_messages(chat).iter().any(|m| {
                    m.message_id == prompt.message_id
                        && m.text.contains("approved</b> by Bob")
                        && m.reply_markup.is_none()
                })
            })
            .await;
        assert!(
            edited,
            "prompt in chat {chat} not edited: {:?}",
            w.prompt_of(chat, 1)
        );
    }
    // A later tap on a decided prompt says so, and who decided.
    let late = w.tap(CAROL, carol_prompt.message_id, "a:1").await;
    assert!(
        late.contains("already approved") && late.contains("tg:3001"),
        "{late}"
    );
    for _ in 0..100 {
        if w.mission_status(1).await.as_deref() == Some("succeeded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(w.mission_status(1).await.as_deref(), Some("succeeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_needs_two_different_approvers_and_refuses_the_proposer() {
    let w = world().await;
    w.say(BOB, "/propose wipe target=cache").await;
    assert!(w.any_text_contains(BOB, "awaits approval: 0/2").await);
    let bob = w.wait_prompt(BOB, 1).await;
    let carol = w.wait_prompt(CAROL, 1).await;
    let own = w.tap(BOB, bob.message_id, "a:1").await;
    assert!(own.contains("proposed by you"), "{own}");
    let first = w
        .tap(ADMIN, w.wait_prompt(ADMIN, 1).await.message_id, "a:1")
        .await;
    assert!(first.contains("1/2"), "{first}");
    assert!(
        w.fake
            .wait_for(Duration::from_secs(15), |f| f
                .sent_messages(CAROL)
                .iter()
                .any(
                    |m| m.message_id == carol.message_id && m.text.contains("1/2 approvals")
                ))
            .await,
        "prompts show 1/2"
    );
    assert_eq!(w.mission_status(1).await, None);
    let second = w.tap(CAROL, carol.message_id, "a:1").await;
    assert!(second.contains("approved"), "{second}");
    assert!(w.mission_status(1).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_and_taps_on_decided_or_expired_prompts() {
    let w = world().await;
    w.say(ANN, "/propose deploy tag=v1.0.0").await;
    let prompt = w.wait_prompt(BOB, 1).await;
    let answer = w.tap(BOB, prompt.message_id, "r:1").await;
    assert!(answer.contains("rejected"), "{answer}");
    assert!(
        w.fake
            .wait_for(Duration::from_secs(15), |f| f
                .sent_messages(CAROL)
                .iter()
                .any(
                    |m| m.text.contains("rejected</b> by Bob") && m.reply_markup.is_none()
                ))
            .await
    );
    let late = w
        .tap(CAROL, w.wait_prompt(CAROL, 1).await.message_id, "a:1")
        .await;
    assert!(late.contains("already rejected (by tg:3001"), "{late}");
    assert_eq!(w.mission_status(1).await, None);

    // An expired proposal: its prompts say so, and a tap is told.
    w.say(ANN, "/propose deploy tag=v2.0.0").await;
    let prompt = w.wait_prompt(BOB, 2).await;
    sqlx::query("UPDATE ops_mission_proposals SET expires_at = now() WHERE id = 2")
        .execute(&w.db.pool)
        .await
        .expect("expire");
    assert!(
        w.fake
            .wait_for(Duration::from_secs(15), |f| f
                .sent_messages(BOB)
                .iter()
                .any(|m| m.message_id == prompt.message_id
                    && m.text.contains("expired")
                    && m.reply_markup.is_none()))
            .await,
        "expired prompt edited"
    );
    let answer = w.tap(BOB, prompt.message_id, "a:2").await;
    assert!(answer.contains("already expired"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_taps_at_once_by_one_approver_count_once() {
    let w = world().await;
    w.say(BOB, "/propose wipe target=disk").await;
    let prompt = w.wait_prompt(CAROL, 1).await;
    let q1 = w
        .fake
        .tap(Chat::private(CAROL), user(CAROL), prompt.message_id, "a:1");
    let q2 = w
        .fake
        .tap(Chat::private(CAROL), user(CAROL), prompt.message_id, "a:1");
    assert!(
        w.fake
            .wait_for(Duration::from_secs(10), |f| {
                let answers = f.callback_answers();
                [&q1, &q2]
                    .iter()
                    .all(|q| answers.iter().any(|(id, _)| id == *q))
            })
            .await
    );
    let approvals: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops_proposal_approvals WHERE proposal_id = 1")
            .fetch_one(&w.db.pool)
            .await
            .expect("count");
    assert_eq!(approvals, 1);
    assert_eq!(
        w.mission_status(1).await,
        None,
        "a red proposal still needs a second person"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_under_privileged_users_are_refused_everywhere() {
    let w = world().await;
    w.say(ANN, "/propose deploy tag=v1.0.0").await;
    let prompt = w.wait_prompt(BOB, 1).await;
    let before = w.proposal_count().await;
    for command in [
        "/start",
        "/help",
        "/propose hello name=x",
        "/approve 1",
        "/reject 1",
        "/pending",
        "/status",
        "/missions",
        "/mission 1",
        "/cancel 1",
        "/templates",
        "/subscribe",
        "/unsubscribe",
        "/whoami",
        "/pause",
        "/resume",
        "/grant 6666 admin",
        "/revoke 1001",
        "/users",
        "/nonsense",
    ] {
        w.say(EVE, command).await;
        assert!(
            w.last_text_contains(EVE, "Not authorized. Your Telegram id is <code>6666</code>")
                .await,
            "{command}"
        );
        let texts: Vec<String> = w
            .fake
            .sent_messages(EVE)
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert!(
            texts.iter().all(|t| t.contains("Not authorized")),
            "a stranger learned something: {texts:?}"
        );
    }
    // A stranger's and a viewer's taps change nothing.
    let eve = w.tap(EVE, prompt.message_id, "a:1").await;
    assert!(eve.contains("Not authorized"), "{eve}");
    let vic = w.tap(VIC, prompt.message_id, "a:1").await;
    assert!(vic.contains("Not allowed"), "{vic}");
    // Forged data from an approver: garbage and overlong strings.
    for forged in ["x:1", "a:abc", "a:-1", &"a:1".repeat(40)] {
        let answer = w.tap(BOB, prompt.message_id, forged).await;
        assert!(answer.contains("not one of mine"), "{forged}: {answer}");
    }
    // Role boundaries.
    for (who, command, refusal) in [
        (VIC, "/propose hello name=x", "needs the operator role"),
        (VIC, "/cancel 1", "needs the operator role"),
        (ANN, "/approve 1", "needs the approver role"),
        (BOB, "/pause", "needs the admin role"),
        (BOB, "/grant 6666 admin", "needs the admin role"),
    ] {
        w.say(who, command).await;
        assert!(w.last_text_contains(who, refusal).await, "{who} {command}");
    }
    assert_eq!(w.proposal_count().await, before);
    let status: String =
        sqlx::query_scalar("SELECT status FROM ops_mission_proposals WHERE id = 1")
            .fetch_one(&w.db.pool)
            .await
            .expect("status");
    assert_eq!(status, "pending");
    assert!(
        opsloop::store::users::get(&w.db.pool, EVE)
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chat_input_is_answered_helpfully_and_changes_nothing() {
    let w = world().await;
    for (command, answer) in [
        ("/frobnicate", "I don't know /frobnicate"),
        ("/propose", "Usage: /propose TEMPLATE"),
        ("/propose nope", "unknown template"),
        ("/propose deploy", "Params of deploy:"),
        ("/propose deploy tag=1.2", "release tag, e.g. v1.4.2"),
        ("/propose deploy tag=v1.2.3; rm -rf /", "not key=value"),
        ("/propose deploy tag=v1.2.3 extra=1", "extra"),
        ("/mission abc", "not a mission id"),
        ("/cancel 99", "no mission #99"),
    ] {
        w.say(ANN, command).await;
        assert!(
            w.last_text_contains(ANN, answer).await,
            "{command}: {:?}",
            w.fake.sent_messages(ANN).last()
        );
    }
    w.say(BOB, "/approve twelve").await;
    assert!(w.last_text_contains(BOB, "not a proposal id").await);
    let long = format!("/propose deploy tag={}", "v".repeat(4000));
    w.say(ANN, &long).await;
    assert!(
        w.last_text_contains(ANN, "does not match").await,
        "{:?}",
        w.fake.sent_messages(ANN).last()
    );
    assert!(
        w.fake
            .sent_messages(ANN)
            .last()
            .is_some_and(|m| m.text.chars().count() < 4096)
    );
    assert_eq!(w.proposal_count().await, 0, "nothing was proposed");
    // HTML metacharacters and emoji in params are escaped, not interpreted.
    w.say(ANN, "/propose hello name=<b>&\"🙂").await;
    assert!(
        w.any_text_contains(ANN, "approved: mission #").await,
        "{:?}",
        w.fake.sent_messages(ANN).last()
    );
    w.say(ANN, "/mission 1").await;
    assert!(
        w.last_text_contains(ANN, "&lt;b&gt;&amp;&quot;🙂").await,
        "{:?}",
        w.fake.sent_messages(ANN).last()
    );
    // In a group, commands for another bot are not ours; ours are answered there.
    let group = Chat::group(-100777, "ops");
    w.fake
        .send_text(group.clone(), user(ANN), "/status@some_other_bot");
    w.fake
        .send_text(group.clone(), user(ANN), "/whoami@opsloop_test_bot");
    assert!(w.last_text_contains(-100777, "role <b>operator</b>").await);
    assert_eq!(
        w.fake.sent_messages(-100777).len(),
        1,
        "{:?}",
        w.fake.sent_messages(-100777)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_past_the_rate_limit_is_told_once() {
    let w = world_with(
        "[telegram]\ncommand_burst = 3\ncommands_per_minute = 1\nchat_messages_per_second = 20\n",
    )
    .await;
    // /start (in world) used one; two more pass, then the limit.
    for _ in 0..6 {
        w.say(VIC, "/whoami").await;
    }
    assert!(w.last_text_contains(VIC, "slow down").await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let texts: Vec<String> = w
        .fake
        .sent_messages(VIC)
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(
        texts.iter().filter(|t| t.contains("slow down")).count(),
        1,
        "{texts:?}"
    );
    assert_eq!(
        texts
            .iter()
            .filter(|t| t.contains("role <b>viewer</b>"))
            .count(),
        2,
        "{texts:?}"
    );
}

/// Index in `requests` of the first accepted sendMessage to `chat` whose text has `words`.
fn first_send(
    requests: &[support::fake_telegram::Request],
    chat: i64,
    words: &str,
) -> Option<usize> {
    requests.iter().position(|r| {
        r.method == "sendmessage"
            && r.status == 200
            && r.chat_id() == Some(chat)
            && r.body["text"].as_str().is_some_and(|t| t.contains(words))
    })
}

fn accepted_sends(requests: &[support::fake_telegram::Request], chat: i64) -> usize {
    requests
        .iter()
        .filter(|r| r.method == "sendmessage" && r.status == 200 && r.chat_id() == Some(chat))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_flood_is_answered_once_and_does_not_hold_back_a_prompt() {
    // One message per second per chat, as Telegram allows, and two per second in all,
    // so that the global limit is what the chats compete for.
    let w = world_with("[telegram]\nmessages_per_second = 2\n").await;
    for _ in 0..40 {
        w.say(EVE, "/status").await;
    }
    assert!(
        w.any_text_contains(EVE, "Not authorized").await,
        "the stranger is told once"
    );
    // Every message of the flood handled (queued, before the fix) before the proposal.
    assert!(
        w.fake
            .wait_for(Duration::from_secs(15), |f| f.pending_updates() == 0)
            .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.say(ANN, "/propose deploy tag=v1.0.0").await;
    w.wait_prompt(ADMIN, 1).await;
    let requests = w.fake.requests();
    let prompt = first_send(&requests, ADMIN, "proposal #1</b>").expect("prompt sent");
    let before = accepted_sends(&requests[..prompt], EVE);
    assert!(
        before <= 2,
        "{before} answers to the stranger went out before the admin's prompt"
    );
    // Nothing more is queued for the stranger.
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ops_notifications WHERE chat_id = $1 AND status = 'pending'",
    )
    .bind(EVE)
    .fetch_one(&w.db.pool)
    .await
    .expect("count");
    assert_eq!(queued, 0);
    let answers = w.fake.sent_messages(EVE).len();
    assert!(
        (1..=2).contains(&answers),
        "the stranger got {answers} answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_too_long_for_one_message_arrives_whole_in_several() {
    let w = world().await;
    let ids: Vec<i64> = (0..150).map(|i| 7_000_000_000 + i).collect();
    for id in &ids {
        opsloop::store::users::grant(
            &w.db.pool,
            *id,
            "viewer".parse().expect("role"),
            opsloop::domain::vocab::Source::Cli,
            "test",
        )
        .await
        .expect("grant");
        // A name as long as people's names get, with characters outside the BMP.
        let name = format!("Someone With A Rather Long Name 🙂 {id}");
        opsloop::store::users::seen(&w.db.pool, *id, &name, false)
            .await
            .expect("name");
    }
    w.say(ADMIN, "/users").await;
    let all_listed = |f: &FakeTelegram| {
        let texts: String = f
            .sent_messages(ADMIN)
            .iter()
            .map(|m| m.text.clone())
            .collect();
        ids.iter()
            .all(|id| texts.contains(&format!("<code>{id}</code>")))
    };
    assert!(
        w.fake.wait_for(Duration::from_secs(30), all_listed).await,
        "the admin did not get the whole list: {:?}",
        w.fake.sent_messages(ADMIN).last()
    );
    let pages: Vec<String> = w
        .fake
        .sent_messages(ADMIN)
        .into_iter()
        .map(|m| m.text)
        .filter(|t| t.contains("Someone With"))
        .collect();
    assert!(pages.len() >= 2, "{} messages", pages.len());
    assert!(
        pages[0].ends_with(&format!("(1/{})", pages.len())),
        "{}",
        pages[0]
    );
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ops_notifications WHERE status = 'failed'")
            .fetch_one(&w.db.pool)
            .await
            .expect("count");
    assert_eq!(failed, 0, "nothing refused by Telegram");
}

/// "Promises kept" 1: a failed `getMe` once left the poller's lock on a pooled
/// connection, where another part of the daemon (the outbox's LISTEN) kept it, so no
/// host ever polled again. Now the poller tries again and polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_starts_after_get_me_failed_once() {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    fake.fail_next(
        "getme",
        1,
        support::fake_telegram::Fault::Api {
            code: 400,
            description: "Bad Request: a test fault".into(),
        },
    );
    let _daemon = start_daemon(&db, &fake, FAST);
    let polled = fake
        .wait_for(Duration::from_secs(60), |f| {
            f.requests().iter().any(|r| r.method == "getupdates")
        })
        .await;
    let methods: Vec<String> = fake.requests().into_iter().map(|r| r.method).collect();
    assert!(polled, "no getUpdates after a failed getMe: {methods:?}");
    assert!(
        methods.iter().filter(|m| *m == "getme").count() >= 2,
        "{methods:?}"
    );
    fake.send_text(Chat::private(ADMIN), user(ADMIN), "/whoami");
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| f
            .sent_messages(ADMIN)
            .iter()
            .any(|m| m.text.contains("role <b>admin</b>")))
            .await,
        "the bot does not answer: {:?}",
        fake.sent_messages(ADMIN)
    );
}
