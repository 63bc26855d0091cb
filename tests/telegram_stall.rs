//! The Bot API stalling mid-answer (issue 14): every call about one chat gets its
//! headers and half a body, then nothing. The outbox keeps delivering to the other
//! chats meanwhile (a sender that waited on the stalled call would hold them for the
//! HTTP client's 40 s timeout on every attempt). And a daemon asked to stop while the
//! Bot API holds its getUpdates stops within the poller's grace.

mod support;

use std::time::{Duration, Instant};

use support::fake_telegram::{FakeTelegram, Fault};
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

/// SIGTERM while the Bot API holds every getUpdates: the daemon still stops within its
/// poller's grace (5 s), not after the HTTP client's 40 s timeout on the poller's last
/// confirming call, and ends cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_bot_api_holds_get_updates_stops_the_daemon_promptly() {
    let db = test_db().await;
    let fake = FakeTelegram::start().await;
    let policy =
        "[templates.noop]\nrisk = \"low\"\nsteps = [ { name = \"n\", kind = \"noop\" } ]\n";
    let mut daemon = Daemon::start(&db, &fake, policy, "1001");
    let polls = |f: &FakeTelegram| {
        f.requests()
            .iter()
            .filter(|r| r.method == "getupdates")
            .count()
    };
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| polls(f) > 0)
            .await,
        "the daemon never polled"
    );
    fake.set_fault_for("getUpdates", Some(Fault::Slow(Duration::from_secs(300))));
    // A poll that started after the fault: the one in flight is held now.
    let before = polls(&fake);
    assert!(
        fake.wait_for(Duration::from_secs(30), |f| polls(f) > before)
            .await,
        "the daemon stopped polling"
    );
    let asked = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = daemon.0.try_wait().expect("wait") {
            break status;
        }
        // Generous against the 5 s grace, yet short of the 40 s it took before.
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "the daemon was still running 30 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("stopped {:?} after SIGTERM", asked.elapsed());
    assert!(status.success(), "{status:?}");
}
