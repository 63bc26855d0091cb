//! The outbox under faults, and the Telegram poller's takeover (issue 4 "Done when" 3,
//! issue 5 "Done when" 1), with real `opsloop run` processes and the fake Bot API.

mod support;

use std::time::{Duration, Instant};

use support::fake_telegram::{Chat, FakeTelegram, Fault, User};
use support::{Daemon, test_db};

const GROUP: i64 = -100_500;
const ANN: i64 = 2001;
const ADMIN: i64 = 1001;

fn policy(per_chat: u32) -> String {
    format!(
        r#"
[notify]
chats = [{GROUP}]
events = ["burst.*"]

[telegram]
chat_messages_per_second = {per_chat}
group_messages_per_minute = 6000
messages_per_second = 100
command_burst = 50

[templates.noop]
risk = "low"
steps = [ {{ name = "n", kind = "noop" }} ]
"#
    )
}

/// The `n` of each burst message in a chat, in the order the chat shows them.
fn burst_numbers(fake: &FakeTelegram, chat: i64) -> Vec<i64> {
    fake.sent_messages(chat)
        .iter()
        .filter(|m| m.text.contains("burst.one"))
        .filter_map(|m| {
            let start = m.text.find("&quot;n&quot;:")? + "&quot;n&quot;:".len();
            let digits: String = m.text[start..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_survives_429s_500s_drops_and_a_restart_exactly_once_in_order() {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let per_chat = 20;
    let policy = policy(per_chat);
    opsloop::store::users::grant(
        &db.pool,
        ANN,
        "viewer".parse().expect("role"),
        opsloop::domain::vocab::Source::Cli,
        "test",
    )
    .await
    .expect("grant");
    let mut daemon = Daemon::start(&db, &fake, &policy, &ADMIN.to_string());
    fake.send_text(Chat::private(ANN), User::new(ANN, "Ann"), "/subscribe");
    assert!(
        fake.wait_for(Duration::from_secs(15), |f| f
            .sent_messages(ANN)
            .iter()
            .any(|m| m.text.contains("Subscribed")))
            .await
    );

    // Telegram misbehaves for a while.
    fake.fail_next("sendmessage", 3, Fault::TooManyRequests { retry_after: 1 });
    fake.fail_next("sendmessage", 2, Fault::Drop);
    fake.fail_next("sendmessage", 1, Fault::ServerError);
    for n in 0..200 {
        opsloop::store::events::emit_user(
            &db.pool,
            "burst.one",
            "test",
            serde_json::json!({ "n": n }),
        )
        .await
        .expect("emit");
    }
    // Restart in the middle.
    assert!(
        fake.wait_for(Duration::from_secs(60), |f| burst_numbers(f, GROUP).len()
            >= 60)
            .await
    );
    daemon.signal(libc::SIGTERM);
    let _daemon = Daemon::start(&db, &fake, &policy, &ADMIN.to_string());

    let done = fake
        .wait_for(Duration::from_secs(120), |f| {
            burst_numbers(f, GROUP).len() >= 200 && burst_numbers(f, ANN).len() >= 200
        })
        .await;
    let expected: Vec<i64> = (0..200).collect();
    for chat in [GROUP, ANN] {
        assert!(
            done,
            "chat {chat} got {} of 200",
            burst_numbers(&fake, chat).len()
        );
        assert_eq!(
            burst_numbers(&fake, chat),
            expected,
            "chat {chat}: each once, in order"
        );
    }
    // The fake records a message before the sender marks its row sent: give the last
    // marks a moment to land.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let statuses = loop {
        let statuses: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM ops_notifications GROUP BY status ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .expect("statuses");
        if statuses.len() == 1 || std::time::Instant::now() > deadline {
            break statuses;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(statuses.len(), 1, "every row sent: {statuses:?}");
    // Never faster than the per-chat limit. Counted over one-second windows rather than
    // between neighbours, so scheduling jitter on a busy machine cannot fail it; the
    // slack covers that jitter and the limiter starting afresh after the restart.
    for chat in [GROUP, ANN] {
        let times = fake.send_times(chat);
        let busiest = times
            .iter()
            .enumerate()
            .map(|(i, start)| {
                times[i..]
                    .iter()
                    .take_while(|t| t.duration_since(*start) < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0);
        assert!(
            busiest <= per_chat as usize + 2,
            "chat {chat}: {busiest} messages within one second (limit {per_chat})"
        );
    }
    // The 429s were honoured: nothing was sent to that chat within retry_after of a 429.
    let requests = fake.requests();
    for (i, r) in requests.iter().enumerate().filter(|(_, r)| r.status == 429) {
        let chat = r.chat_id();
        let next = requests[i + 1..]
            .iter()
            .find(|n| n.method == "sendmessage" && n.chat_id() == chat && n.status == 200);
        if let Some(next) = next {
            assert!(
                next.at.duration_since(r.at) >= Duration::from_millis(950),
                "retry_after ignored"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_process_takes_over_polling_when_the_holder_dies() {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let policy = policy(20);
    let mut first = Daemon::start(&db, &fake, &policy, &ADMIN.to_string());
    let admin = User::new(ADMIN, "Ada");
    fake.send_text(Chat::private(ADMIN), admin.clone(), "/whoami");
    assert!(
        fake.wait_for(Duration::from_secs(15), |f| f.sent_messages(ADMIN).len()
            == 1)
            .await
    );
    let _second = Daemon::start(&db, &fake, &policy, &ADMIN.to_string());
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.signal(libc::SIGKILL);
    let killed = Instant::now();
    fake.send_text(Chat::private(ADMIN), admin.clone(), "/whoami");
    assert!(
        fake.wait_for(Duration::from_secs(20), |f| f.sent_messages(ADMIN).len()
            == 2)
            .await,
        "nobody took over"
    );
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "takeover took {took:?}");
    // Each update was handled once.
    fake.send_text(Chat::private(ADMIN), admin, "/whoami");
    assert!(
        fake.wait_for(Duration::from_secs(10), |f| f.sent_messages(ADMIN).len()
            == 3)
            .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.sent_messages(ADMIN).len(), 3);
}

/// One message per second per chat, as Telegram allows, two per second in all (so the
/// chats compete for the global limit), one template that needs an approval.
const PROMPT_POLICY: &str = r#"
[approval]
ttl = "1h"

[telegram]
messages_per_second = 2

[templates.deploy]
risk = "high"
params.tag = { pattern = '^v\d+$', help = "a tag" }
steps = [ { name = "n", kind = "noop" } ]
"#;

/// A daemon with PROMPT_POLICY; the admin (and Ann, a viewer) have started the bot.
async fn started(db: &support::TestDb, fake: &FakeTelegram) -> Daemon {
    opsloop::store::users::grant(
        &db.pool,
        ANN,
        "viewer".parse().expect("role"),
        opsloop::domain::vocab::Source::Cli,
        "test",
    )
    .await
    .expect("grant");
    let daemon = Daemon::start(db, fake, PROMPT_POLICY, &ADMIN.to_string());
    for (id, name) in [(ADMIN, "Ada"), (ANN, "Ann")] {
        fake.send_text(Chat::private(id), User::new(id, name), "/start");
        assert!(
            fake.wait_for(Duration::from_secs(15), |f| f.sent_messages(id).len() == 1)
                .await,
            "no answer to /start for {id}"
        );
    }
    daemon
}

async fn propose_deploy(db: &support::TestDb, tag: &str) -> i64 {
    let policy = opsloop::domain::policy::parse(PROMPT_POLICY).expect("policy");
    let proposed = support::propose(&db.pool, &policy, "deploy", &[("tag", tag)]).await;
    proposed.id
}

fn prompts(fake: &FakeTelegram, chat: i64, proposal: i64) -> Vec<support::fake_telegram::Sent> {
    fake.sent_messages(chat)
        .into_iter()
        .filter(|m| m.text.contains(&format!("proposal #{proposal}</b>")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_chat_does_not_hold_back_a_prompt_to_another() {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let _daemon = started(&db, &fake).await;
    let mut conn = db.pool.acquire().await.expect("conn");
    for n in 0..40 {
        opsloop::engine::notify::enqueue_text(&mut conn, ANN, &format!("busy {n}"))
            .await
            .expect("enqueue");
    }
    let mark = fake.requests().len();
    propose_deploy(&db, "v1").await;
    assert!(
        fake.wait_for(Duration::from_secs(60), |f| !prompts(f, ADMIN, 1)
            .is_empty())
            .await,
        "no prompt"
    );
    let requests = fake.requests();
    let prompt = requests
        .iter()
        .position(|r| {
            r.method == "sendmessage"
                && r.status == 200
                && r.chat_id() == Some(ADMIN)
                && r.body["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("proposal #1</b>"))
        })
        .expect("the prompt's request");
    let busy_between = requests[mark..prompt]
        .iter()
        .filter(|r| r.method == "sendmessage" && r.status == 200 && r.chat_id() == Some(ANN))
        .count();
    assert!(
        busy_between <= 3,
        "{busy_between} of the busy chat's messages went out after the prompt was queued and before it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prompt_sent_twice_after_a_lost_answer_is_edited_in_both_places() {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let _daemon = started(&db, &fake).await;
    let admin = User::new(ADMIN, "Ada");

    // Telegram takes the prompt, and its answer is lost: the sender sends it again.
    fake.fail_next("sendmessage", 1, Fault::LoseResponse);
    let first = propose_deploy(&db, "v1").await;
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| prompts(f, ADMIN, first).len()
            == 2)
            .await,
        "{:?}",
        fake.sent_messages(ADMIN)
    );
    // Recorded a moment after the fake shows it: two attempts.
    let mut row = (0, String::new());
    for _ in 0..100 {
        row = sqlx::query_as(
            "SELECT attempts, status FROM ops_notifications
             WHERE chat_id = $1 AND subject = 'proposal:' || $2 ORDER BY id LIMIT 1",
        )
        .bind(ADMIN)
        .bind(first)
        .fetch_one(&db.pool)
        .await
        .expect("row");
        if row.1 == "sent" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((row.0, row.1.as_str()), (2, "sent"));
    // A tap on the copy whose answer was lost decides, and both copies show it.
    let lost = prompts(&fake, ADMIN, first)[0].clone();
    assert!(lost.reply_markup.is_some());
    let query = fake.tap(
        Chat::private(ADMIN),
        admin.clone(),
        lost.message_id,
        &format!("a:{first}"),
    );
    assert!(
        fake.wait_for(Duration::from_secs(15), |f| f
            .callback_answers()
            .iter()
            .any(
                |(q, t)| *q == query && t.as_deref().is_some_and(|t| t.contains("approved"))
            ))
        .await,
        "{:?}",
        fake.callback_answers()
    );
    let decided = |f: &FakeTelegram, proposal: i64| {
        let p = prompts(f, ADMIN, proposal);
        p.len() == 2
            && p.iter()
                .all(|m| m.text.contains("approved</b>") && m.reply_markup.is_none())
    };
    assert!(
        fake.wait_for(Duration::from_secs(15), |f| decided(f, first))
            .await,
        "{:?}",
        prompts(&fake, ADMIN, first)
    );

    // Decided elsewhere: the copy we know is edited; the other is edited once tapped.
    fake.fail_next("sendmessage", 1, Fault::LoseResponse);
    let second = propose_deploy(&db, "v2").await;
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| prompts(f, ADMIN, second).len()
            == 2)
            .await
    );
    let policy = opsloop::domain::policy::parse(PROMPT_POLICY).expect("policy");
    opsloop::engine::approvals::decide(
        &db.pool,
        &policy,
        second,
        "cli:ops",
        opsloop::engine::approvals::Decision::Approve,
        None,
        "cli",
    )
    .await
    .expect("approve");
    assert!(
        fake.wait_for(Duration::from_secs(15), |f| prompts(f, ADMIN, second)
            .iter()
            .any(|m| m.text.contains("approved</b>")))
            .await
    );
    let stale = prompts(&fake, ADMIN, second)
        .into_iter()
        .find(|m| m.reply_markup.is_some())
        .expect("the copy we had no record of");
    let query = fake.tap(
        Chat::private(ADMIN),
        admin,
        stale.message_id,
        &format!("a:{second}"),
    );
    assert!(
        fake.wait_for(Duration::from_secs(15), |f| f
            .callback_answers()
            .iter()
            .any(|(q, t)| *q == query
                && t.as_deref().is_some_and(|t| t.contains("already approved"))))
            .await,
        "{:?}",
        fake.callback_answers()
    );
    assert!(
        fake.wait_for(Duration::from_secs(15), |f| decided(f, second))
            .await,
        "{:?}",
        prompts(&fake, ADMIN, second)
    );
    // The last edit is recorded a moment after the fake shows it.
    let mut open: i64 = -1;
    for _ in 0..100 {
        open = sqlx::query_scalar("SELECT count(*) FROM ops_notifications WHERE status <> 'sent'")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open, 0, "nothing pending or failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_in_flight_is_marked_and_sent_again_after_a_crash() {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let mut daemon = started(&db, &fake).await;
    fake.fail_next("sendmessage", 1, Fault::Slow(Duration::from_secs(60)));
    let mut conn = db.pool.acquire().await.expect("conn");
    opsloop::engine::notify::enqueue_text(&mut conn, ANN, "hello in flight")
        .await
        .expect("enqueue");
    assert!(
        fake.wait_for(Duration::from_secs(15), |f| f.requests().iter().any(|r| r
            .method
            == "sendmessage"
            && r.status == 0
            && r.chat_id() == Some(ANN)))
            .await
    );
    let row = || async {
        let row: (String, i32, Option<String>) = sqlx::query_as(
            "SELECT status, attempts, error FROM ops_notifications
             WHERE chat_id = $1 AND body->>'text' = 'hello in flight'",
        )
        .bind(ANN)
        .fetch_one(&db.pool)
        .await
        .expect("row");
        row
    };
    // While Telegram is being called, the row says so.
    let (status, attempts, error) = row().await;
    assert_eq!((status.as_str(), attempts), ("pending", 1));
    assert!(error.is_some_and(|e| e.starts_with("in flight")));
    // The sender dies mid-call; the next one sends it again (at least once).
    daemon.signal(libc::SIGKILL);
    let _daemon = Daemon::start(&db, &fake, PROMPT_POLICY, &ADMIN.to_string());
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| f
            .sent_messages(ANN)
            .iter()
            .any(|m| m.text == "hello in flight"))
            .await
    );
    for _ in 0..100 {
        if row().await.0 == "sent" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, attempts, error) = row().await;
    assert_eq!((status.as_str(), attempts, error), ("sent", 2, None));
}
