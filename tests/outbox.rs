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
    opsloop::users::grant(
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
        opsloop::events::emit_user(&db.pool, "burst.one", "test", serde_json::json!({ "n": n }))
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
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM ops_notifications GROUP BY status ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .expect("statuses");
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
