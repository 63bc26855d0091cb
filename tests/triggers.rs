//! Cron triggers across daylight saving time changes ("Promises kept" item 11): the
//! trigger logic over a real database, with the tick's "now" injected.
//!
//! The rule (src/triggers.rs): each wall-clock time a schedule names is one slot, at the
//! first instant it occurs. Europe/Berlin changes on 2025-03-30 at 01:00 UTC (02:00 CET
//! → 03:00 CEST) and on 2025-10-26 at 01:00 UTC (03:00 CEST → 02:00 CET).

mod support;

use chrono::{DateTime, Duration, Utc};
use opsloop::domain::policy::Policy;
use opsloop::engine::triggers;
use support::{TestDb, test_db};

fn at(s: &str) -> DateTime<Utc> {
    s.parse().expect("a UTC time")
}

fn policy(cron: &str) -> Policy {
    let source = format!(
        r#"
[approval]
ttl = "24h"

[templates.nightly]
risk = "high"
steps = [ {{ name = "s", kind = "noop" }} ]

[[triggers]]
name = "nightly"
cron = "{cron}"
tz = "Europe/Berlin"
propose = "nightly"
"#
    );
    match opsloop::domain::policy::parse(&source) {
        Ok(p) => p,
        Err(problems) => panic!("test policy: {problems:?}"),
    }
}

async fn fired(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM ops_mission_proposals WHERE proposed_by = 'trigger:nightly'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("count")
}

async fn last_slot(db: &TestDb) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT last_slot FROM ops_trigger_state WHERE name = 'nightly'")
        .fetch_one(&db.pool)
        .await
        .expect("last_slot")
}

/// Tick at `from`, `from + step`, ... up to `to`; the ticks at which the trigger fired,
/// each with the slot it recorded.
async fn tick_through(
    db: &TestDb,
    policy: &Policy,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Duration,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let mut firings = Vec::new();
    let mut now = from;
    while now <= to {
        let before = fired(db).await;
        triggers::fire_due(&db.pool, policy, now, false)
            .await
            .expect("fire_due");
        if fired(db).await > before {
            firings.push((now, last_slot(db).await));
        }
        now += step;
    }
    firings
}

#[tokio::test]
async fn a_daily_time_repeated_by_fall_back_fires_once_ticking_through_the_night() {
    let db = test_db().await;
    let pol = policy("15 2 * * *");
    let firings = tick_through(
        &db,
        &pol,
        at("2025-10-25T22:00:30Z"),
        at("2025-10-26T04:00:30Z"),
        Duration::minutes(1),
    )
    .await;
    // 02:15 CEST; not again at 02:15 CET (01:15 UTC). The slot is recorded, not the tick.
    assert_eq!(
        firings,
        vec![(at("2025-10-26T00:15:30Z"), at("2025-10-26T00:15:00Z"))]
    );
}

#[tokio::test]
async fn a_daily_time_missed_before_fall_back_fires_once_not_every_tick() {
    let db = test_db().await;
    let pol = policy("15 2 * * *");
    // Seen the day before, then down from before 02:15 CEST until 02:05 CET.
    triggers::fire_due(&db.pool, &pol, at("2025-10-25T12:00:00Z"), false)
        .await
        .expect("first sight");
    let firings = tick_through(
        &db,
        &pol,
        at("2025-10-26T01:05:00Z"),
        at("2025-10-26T03:00:00Z"),
        Duration::seconds(30),
    )
    .await;
    // The missed 02:15 CEST fires once, at restart; its slot is what is recorded.
    assert_eq!(
        firings,
        vec![(at("2025-10-26T01:05:00Z"), at("2025-10-26T00:15:00Z"))],
        "fired more than once"
    );
}

#[tokio::test]
async fn a_daily_time_whose_first_instant_came_before_first_sight_waits_for_tomorrow() {
    let db = test_db().await;
    let pol = policy("15 2 * * *");
    // First seen at 02:05 CET: 02:15 (CEST) has already happened today.
    let firings = tick_through(
        &db,
        &pol,
        at("2025-10-26T01:05:00Z"),
        at("2025-10-26T03:00:00Z"),
        Duration::seconds(30),
    )
    .await;
    assert_eq!(firings, vec![]);
    let tomorrow = tick_through(
        &db,
        &pol,
        at("2025-10-27T01:14:30Z"),
        at("2025-10-27T01:20:00Z"),
        Duration::seconds(30),
    )
    .await;
    assert_eq!(
        tomorrow,
        vec![(at("2025-10-27T01:15:00Z"), at("2025-10-27T01:15:00Z"))]
    );
}

#[tokio::test]
async fn a_daily_time_skipped_by_spring_forward_fires_once_after_the_gap() {
    let db = test_db().await;
    let pol = policy("30 2 * * *");
    let firings = tick_through(
        &db,
        &pol,
        at("2025-03-29T22:00:30Z"),
        at("2025-03-30T04:00:30Z"),
        Duration::minutes(1),
    )
    .await;
    // 02:30 does not exist that day: it fires at 03:00 CEST (01:00 UTC), once.
    assert_eq!(
        firings,
        vec![(at("2025-03-30T01:00:30Z"), at("2025-03-30T01:00:00Z"))]
    );
    // And on the next day at 02:30 CEST as usual.
    let next_day = tick_through(
        &db,
        &pol,
        at("2025-03-31T00:29:30Z"),
        at("2025-03-31T00:35:00Z"),
        Duration::seconds(30),
    )
    .await;
    assert_eq!(
        next_day,
        vec![(at("2025-03-31T00:30:00Z"), at("2025-03-31T00:30:00Z"))]
    );
}

#[tokio::test]
async fn a_daily_time_missed_across_spring_forward_fires_once() {
    let db = test_db().await;
    let pol = policy("30 2 * * *");
    triggers::fire_due(&db.pool, &pol, at("2025-03-29T12:00:00Z"), false)
        .await
        .expect("first sight");
    let firings = tick_through(
        &db,
        &pol,
        at("2025-03-30T02:00:00Z"),
        at("2025-03-30T04:00:00Z"),
        Duration::seconds(30),
    )
    .await;
    assert_eq!(
        firings,
        vec![(at("2025-03-30T02:00:00Z"), at("2025-03-30T01:00:00Z"))]
    );
}

#[tokio::test]
async fn a_repeating_schedule_fires_each_wall_clock_slot_once_across_both_changes() {
    let db = test_db().await;
    let pol = policy("*/30 * * * *");
    let fall_back = tick_through(
        &db,
        &pol,
        at("2025-10-25T23:00:30Z"),
        at("2025-10-26T03:00:30Z"),
        Duration::minutes(1),
    )
    .await;
    // 01:30, 02:00, 02:30 CEST; the repeated 02:00 and 02:30 (CET) are passed over;
    // 03:00, 03:30, 04:00 CET.
    let slots: Vec<DateTime<Utc>> = fall_back.iter().map(|(_, slot)| *slot).collect();
    assert_eq!(
        slots,
        [
            "2025-10-25T23:30:00Z",
            "2025-10-26T00:00:00Z",
            "2025-10-26T00:30:00Z",
            "2025-10-26T02:00:00Z",
            "2025-10-26T02:30:00Z",
            "2025-10-26T03:00:00Z",
        ]
        .map(at)
    );
    let spring_forward = tick_through(
        &db,
        &pol,
        at("2026-03-29T00:00:30Z"),
        at("2026-03-29T02:00:30Z"),
        Duration::minutes(1),
    )
    .await;
    // 01:30 CET, (02:00 and 02:30 do not exist), 03:00, 03:30, 04:00 CEST. The first
    // tick also handles the slots missed since the autumn, once.
    let slots: Vec<DateTime<Utc>> = spring_forward.iter().map(|(_, slot)| *slot).collect();
    assert_eq!(
        slots,
        [
            "2026-03-29T00:00:00Z",
            "2026-03-29T00:30:00Z",
            "2026-03-29T01:00:00Z",
            "2026-03-29T01:30:00Z",
            "2026-03-29T02:00:00Z",
        ]
        .map(at)
    );
}

#[test]
fn the_next_slot_is_always_later_than_the_last() {
    let pol = policy("15 2 * * *");
    let trigger = &pol.triggers[0];
    // From inside the repeated hour (02:05 CET), the next 02:15 is tomorrow's.
    assert_eq!(
        triggers::next_slot(trigger, at("2025-10-26T01:05:00Z")),
        Some(at("2025-10-27T01:15:00Z"))
    );
    // From before the change, it is the first 02:15 (CEST).
    assert_eq!(
        triggers::next_slot(trigger, at("2025-10-25T23:00:00Z")),
        Some(at("2025-10-26T00:15:00Z"))
    );
    let every_minute = policy("* * * * *");
    let trigger = &every_minute.triggers[0];
    let mut slot = at("2025-10-25T23:00:00Z");
    for _ in 0..300 {
        let next = triggers::next_slot(trigger, slot).expect("a next slot");
        assert!(next > slot, "{next} is not after {slot}");
        slot = next;
    }
}
