//! The Bot API stalling mid-answer (issue 14): every call about one chat gets its
//! headers and half a body, then nothing. The outbox keeps delivering to the other
//! chats meanwhile (a sender that waited on the stalled call would hold them for the
//! HTTP client's 40 s timeout on every attempt).

mod support;

use std::time::{Duration, Instant};

use support::fake_telegram::FakeTelegram;
use support::{Daemon, test_db};

const STALLED: i64 = -100_601;
const OTHERS: [i64; 2] = [-100_602, -100_603];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chat_whose_calls_stall_mid_answer_holds_back_no_other_chat() {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let policy = format!(
        r#"
[notify]
chats = [{STALLED}, {}, {}]
events = ["burst.*"]

[templates.noop]
risk = "low"
steps = [ {{ name = "n", kind = "noop" }} ]
"#,
        OTHERS[0], OTHERS[1]
    );
    fake.stall_chat(STALLED);
    let _daemon = Daemon::start(&db, &fake, &policy, "1001");
    // Up (its policy applied, so the events below notify the chats).
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| f
            .requests()
            .iter()
            .any(|r| r.method == "getupdates"))
            .await,
        "the daemon never polled"
    );
    let burst = 5;
    for n in 0..burst {
        opsloop::store::events::emit_user(
            &db.pool,
            "burst.one",
            "test",
            serde_json::json!({ "n": n }),
        )
        .await
        .expect("emit");
    }
    let started = Instant::now();
    // Generous, yet shorter than one stalled call's timeout (40 s).
    let delivered = fake
        .wait_for(Duration::from_secs(35), |f| {
            OTHERS.iter().all(|chat| {
                f.sent_messages(*chat)
                    .iter()
                    .filter(|m| m.text.contains("burst.one"))
                    .count()
                    >= burst
            })
        })
        .await;
    let counts: Vec<usize> = OTHERS
        .iter()
        .map(|c| fake.sent_messages(*c).len())
        .collect();
    let seen: Vec<(String, Option<i64>, u16)> = fake
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.chat_id(), r.status))
        .collect();
    assert!(
        delivered,
        "requests {seen:?}; the other chats got {counts:?} of {burst} messages while {STALLED} stalled"
    );
    println!(
        "with one chat stalled mid-answer, the other chats got all {burst} messages {:?} after the burst",
        started.elapsed()
    );
    let stalled_calls = fake
        .requests()
        .iter()
        .filter(|r| r.chat_id() == Some(STALLED))
        .count();
    assert!(stalled_calls >= 1, "the stalled chat was tried");
}
