//! Proposals, gates and approvals against a real PostgreSQL (issue 2, "Done when" 2).

mod support;

use opsloop::domain::error::OpsError;
use opsloop::engine::approvals::{self, Decision};
use opsloop::engine::proposals::{self, NewProposal, ProposalStatus, Source};
use support::{TestDb, policy, request, test_db};

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect(sql)
}

/// `who` decides proposal `id` from the CLI, with no reason.
async fn decide(
    db: &TestDb,
    pol: &opsloop::domain::policy::Policy,
    id: i64,
    who: &str,
    decision: Decision,
) -> Result<approvals::Decided, OpsError> {
    approvals::decide(&db.pool, pol, id, who, decision, None, "cli").await
}

async fn events_of(db: &TestDb, proposal: i64) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM ops_agent_events WHERE proposal_id = $1 ORDER BY id")
        .bind(proposal)
        .fetch_all(&db.pool)
        .await
        .expect("events")
}

#[tokio::test]
async fn low_risk_is_approved_at_once_with_its_mission_and_steps() {
    let db = test_db().await;
    let p = proposals::propose(
        &db.pool,
        &policy(),
        request("hello", &[("name", "ada")], "cli:ann"),
    )
    .await
    .expect("propose");
    assert_eq!(p.status, ProposalStatus::Approved);
    let mission = p.mission_id.expect("mission created");
    let steps: Vec<(i32, String, serde_json::Value)> = sqlx::query_as(
        "SELECT seq, status, spec FROM ops_mission_steps WHERE mission_id = $1 ORDER BY seq",
    )
    .bind(mission)
    .fetch_all(&db.pool)
    .await
    .expect("steps");
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].1, "queued");
    // The param was substituted into one argv element.
    assert_eq!(steps[0].2["run"], serde_json::json!(["echo", "hello ada"]));
    assert_eq!(
        events_of(&db, p.id).await,
        ["proposal.created", "proposal.approved", "mission.started"]
    );
}

#[tokio::test]
async fn defaults_fill_missing_optional_params() {
    let db = test_db().await;
    let p = proposals::propose(&db.pool, &policy(), request("hello", &[], "cli:ann"))
        .await
        .expect("propose");
    let params: serde_json::Value =
        sqlx::query_scalar("SELECT params FROM ops_mission_proposals WHERE id = $1")
            .bind(p.id)
            .fetch_one(&db.pool)
            .await
            .expect("params");
    assert_eq!(params, serde_json::json!({"name": "world"}));
}

#[tokio::test]
async fn high_risk_waits_for_one_approval() {
    let db = test_db().await;
    let p = proposals::propose(
        &db.pool,
        &policy(),
        request("deploy", &[("tag", "v1.2.3")], "cli:ann"),
    )
    .await
    .expect("propose");
    assert_eq!(p.status, ProposalStatus::Pending);
    assert_eq!(p.mission_id, None);
    assert_eq!(count(&db, "SELECT count(*) FROM ops_missions").await, 0);

    let d = decide(&db, &policy(), p.id, "cli:bob", Decision::Approve)
        .await
        .expect("approve");
    assert_eq!(d.status, ProposalStatus::Approved);
    let mission = d.mission_id.expect("mission");
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM ops_mission_steps WHERE mission_id = $1 ORDER BY seq",
    )
    .bind(mission)
    .fetch_all(&db.pool)
    .await
    .expect("steps");
    assert_eq!(statuses, ["queued", "waiting"]);
    assert_eq!(
        events_of(&db, p.id).await,
        ["proposal.created", "proposal.approved", "mission.started"]
    );
}

#[tokio::test]
async fn red_needs_two_distinct_approvers_and_refuses_the_proposer() {
    let db = test_db().await;
    let p = proposals::propose(
        &db.pool,
        &policy(),
        request("wipe", &[("target", "cache")], "cli:ann"),
    )
    .await
    .expect("propose");
    assert_eq!(p.status, ProposalStatus::Pending);
    assert_eq!(p.approvals_needed, 2);

    let own = decide(&db, &policy(), p.id, "cli:ann", Decision::Approve).await;
    assert!(
        matches!(own, Err(OpsError::Refused(ref m)) if m.contains("proposed by you")),
        "{own:?}"
    );

    let first = decide(&db, &policy(), p.id, "cli:bob", Decision::Approve)
        .await
        .expect("bob");
    assert_eq!(
        (first.status, first.approvals),
        (ProposalStatus::Pending, 1)
    );
    assert_eq!(first.mission_id, None);

    // The same person again: counted once.
    let again = decide(&db, &policy(), p.id, "cli:bob", Decision::Approve)
        .await
        .expect("bob again");
    assert_eq!(
        (again.status, again.approvals, again.counted),
        (ProposalStatus::Pending, 1, false)
    );
    assert_eq!(count(&db, "SELECT count(*) FROM ops_missions").await, 0);

    let second = decide(&db, &policy(), p.id, "cli:carol", Decision::Approve)
        .await
        .expect("carol");
    assert_eq!(
        (second.status, second.approvals),
        (ProposalStatus::Approved, 2)
    );
    assert!(second.mission_id.is_some());
    let decided_by: String =
        sqlx::query_scalar("SELECT decided_by FROM ops_mission_proposals WHERE id = $1")
            .bind(p.id)
            .fetch_one(&db.pool)
            .await
            .expect("decided_by");
    assert_eq!(decided_by, "cli:bob, cli:carol");
}

#[tokio::test]
async fn reject_decides_and_later_decisions_are_refused_with_who_decided() {
    let db = test_db().await;
    let p = proposals::propose(
        &db.pool,
        &policy(),
        request("deploy", &[("tag", "v1.0.0")], "cli:ann"),
    )
    .await
    .expect("propose");
    let r = approvals::decide(
        &db.pool,
        &policy(),
        p.id,
        "cli:bob",
        Decision::Reject,
        Some("not today"),
        "cli",
    )
    .await
    .expect("reject");
    assert_eq!(r.status, ProposalStatus::Rejected);
    assert_eq!(count(&db, "SELECT count(*) FROM ops_missions").await, 0);
    let late = decide(&db, &policy(), p.id, "cli:carol", Decision::Approve).await;
    match late {
        Err(OpsError::Refused(m)) => assert!(
            m.contains("already rejected") && m.contains("cli:bob"),
            "{m}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        events_of(&db, p.id).await,
        ["proposal.created", "proposal.rejected"]
    );
}

#[tokio::test]
async fn expired_proposals_cannot_be_approved() {
    let db = test_db().await;
    let p = proposals::propose(
        &db.pool,
        &policy(),
        request("deploy", &[("tag", "v1.0.0")], "cli:ann"),
    )
    .await
    .expect("propose");
    sqlx::query(
        "UPDATE ops_mission_proposals SET expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(p.id)
    .execute(&db.pool)
    .await
    .expect("age it");
    let late = decide(&db, &policy(), p.id, "cli:bob", Decision::Approve).await;
    assert!(
        matches!(late, Err(OpsError::Refused(ref m)) if m.contains("expired")),
        "{late:?}"
    );
    assert_eq!(
        events_of(&db, p.id).await,
        ["proposal.created", "proposal.expired"]
    );
    assert_eq!(count(&db, "SELECT count(*) FROM ops_missions").await, 0);
}

/// A refused proposal is recorded as rejected with the gate's reason, and no mission.
async fn assert_refused(
    db: &TestDb,
    req: NewProposal,
    gate: &str,
    words: &str,
) -> proposals::Proposed {
    let missions_before = count(db, "SELECT count(*) FROM ops_missions").await;
    let p = proposals::propose(&db.pool, &policy(), req)
        .await
        .expect("propose");
    assert_eq!(p.status, ProposalStatus::Rejected, "{p:?}");
    let reason = p.reason.clone().unwrap_or_default();
    assert!(reason.contains(words), "{gate}: {reason}");
    let (status, decided_by): (String, String) =
        sqlx::query_as("SELECT status, decided_by FROM ops_mission_proposals WHERE id = $1")
            .bind(p.id)
            .fetch_one(&db.pool)
            .await
            .expect("row");
    assert_eq!(
        (status.as_str(), decided_by),
        ("rejected", format!("gate:{gate}"))
    );
    assert_eq!(
        count(db, "SELECT count(*) FROM ops_missions").await,
        missions_before
    );
    assert_eq!(
        events_of(db, p.id).await,
        ["proposal.created", "proposal.rejected"]
    );
    p
}

#[tokio::test]
async fn dedupe_refuses_with_the_existing_id_while_pending_or_running() {
    let db = test_db().await;
    let first = proposals::propose(
        &db.pool,
        &policy(),
        request("deploy", &[("tag", "v1.0.0")], "cli:ann"),
    )
    .await
    .expect("first");
    let dup = assert_refused(
        &db,
        request("deploy", &[("tag", "v1.0.0")], "cli:bob"),
        "dedupe",
        "duplicate",
    )
    .await;
    assert_eq!(dup.existing_id, Some(first.id));
    // Different params are not a duplicate.
    let other = proposals::propose(
        &db.pool,
        &policy(),
        request("deploy", &[("tag", "v2.0.0")], "cli:ann"),
    )
    .await
    .expect("other");
    assert_eq!(other.status, ProposalStatus::Pending);
    // Once approved, its running mission still blocks duplicates.
    decide(&db, &policy(), first.id, "cli:bob", Decision::Approve)
        .await
        .expect("approve");
    let dup = assert_refused(
        &db,
        request("deploy", &[("tag", "v1.0.0")], "cli:bob"),
        "dedupe",
        "running",
    )
    .await;
    assert_eq!(dup.existing_id, Some(first.id));
}

#[tokio::test]
async fn max_pending_refuses_new_proposals() {
    let db = test_db().await;
    for i in 0..5 {
        let tag = format!("v1.0.{i}");
        let p = proposals::propose(
            &db.pool,
            &policy(),
            request("deploy", &[("tag", &tag)], "cli:ann"),
        )
        .await
        .expect("pending");
        assert_eq!(p.status, ProposalStatus::Pending);
    }
    assert_refused(
        &db,
        request("deploy", &[("tag", "v9.9.9")], "cli:ann"),
        "max_pending",
        "max_pending = 5",
    )
    .await;
}

#[tokio::test]
async fn daily_cap_cooldown_and_max_running_refuse() {
    let db = test_db().await;
    let pol = policy();
    for n in ["1", "2"] {
        proposals::propose(&db.pool, &pol, request("capped", &[("n", n)], "cli:ann"))
            .await
            .expect("capped");
    }
    assert_refused(
        &db,
        request("capped", &[("n", "3")], "cli:ann"),
        "daily_cap",
        "daily_cap = 2",
    )
    .await;

    proposals::propose(&db.pool, &pol, request("cool", &[("n", "1")], "cli:ann"))
        .await
        .expect("cool");
    assert_refused(
        &db,
        request("cool", &[("n", "2")], "cli:ann"),
        "cooldown",
        "next one allowed in",
    )
    .await;

    proposals::propose(&db.pool, &pol, request("single", &[("n", "1")], "cli:ann"))
        .await
        .expect("single");
    assert_refused(
        &db,
        request("single", &[("n", "2")], "cli:ann"),
        "max_running",
        "max_running = 1",
    )
    .await;
}

#[tokio::test]
async fn pause_refuses_reactions_and_triggers_but_accepts_people() {
    let db = test_db().await;
    let mut conn = db.pool.acquire().await.expect("conn");
    assert!(
        opsloop::engine::gates::set_paused(
            &mut conn,
            true,
            opsloop::domain::vocab::Source::Cli,
            "cli:ann"
        )
        .await
        .expect("pause")
    );
    drop(conn);
    let mut auto = request("hello", &[("name", "bot")], "reaction:x");
    auto.source = Source::Reaction;
    assert_refused(&db, auto, "paused", "paused").await;
    let mut trig = request("hello", &[("name", "cron")], "trigger:x");
    trig.source = Source::Trigger;
    assert_refused(&db, trig, "paused", "paused").await;
    // A person's low-risk proposal is approved and its mission created; steps wait for resume.
    let p = proposals::propose(
        &db.pool,
        &policy(),
        request("hello", &[("name", "ann")], "cli:ann"),
    )
    .await
    .expect("propose");
    assert_eq!(p.status, ProposalStatus::Approved);
    assert!(p.mission_id.is_some());
}

#[tokio::test]
async fn a_template_paused_after_failures_refuses() {
    let db = test_db().await;
    let mut conn = db.pool.acquire().await.expect("conn");
    opsloop::engine::gates::pause_template(&mut conn, "hello", 2)
        .await
        .expect("pause template");
    drop(conn);
    assert_refused(
        &db,
        request("hello", &[("name", "ann")], "cli:ann"),
        "template_paused",
        "paused after 2",
    )
    .await;
    let mut conn = db.pool.acquire().await.expect("conn");
    assert!(
        opsloop::engine::gates::resume_template(
            &mut conn,
            "hello",
            opsloop::domain::vocab::Source::Cli,
            "test"
        )
        .await
        .expect("resume")
    );
    drop(conn);
    let p = proposals::propose(
        &db.pool,
        &policy(),
        request("hello", &[("name", "ann")], "cli:ann"),
    )
    .await
    .expect("propose");
    assert_eq!(p.status, ProposalStatus::Approved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_last_approvals_create_exactly_one_mission() {
    let db = test_db().await;
    for round in 0..10 {
        let p = proposals::propose(
            &db.pool,
            &policy(),
            request("wipe", &[("target", "x")], &format!("cli:p{round}")),
        )
        .await
        .expect("propose");
        decide(&db, &policy(), p.id, "cli:first", Decision::Approve)
            .await
            .expect("first");
        // The last needed approver taps on two devices, and a third person at the same moment.
        let taps = ["cli:second", "cli:second", "cli:third"].map(|who| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                approvals::decide(&pool, &policy(), p.id, who, Decision::Approve, None, "cli").await
            })
        });
        let mut approved = 0;
        for tap in taps {
            if let Ok(d) = tap.await.expect("join")
                && d.mission_id.is_some()
            {
                approved += 1;
            }
        }
        assert_eq!(
            approved, 1,
            "round {round}: exactly one tap created the mission"
        );
        let missions: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ops_missions WHERE proposal_id = $1")
                .bind(p.id)
                .fetch_one(&db.pool)
                .await
                .expect("count");
        assert_eq!(missions, 1);
        // Each round's proposal is then out of the way (its mission "finished").
        sqlx::query("UPDATE ops_missions SET status = 'succeeded' WHERE proposal_id = $1")
            .bind(p.id)
            .execute(&db.pool)
            .await
            .expect("finish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_proposals_are_deduplicated() {
    let db = test_db().await;
    let pol = std::sync::Arc::new(policy());
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (pool, pol) = (db.pool.clone(), pol.clone());
            tokio::spawn(async move {
                proposals::propose(
                    &pool,
                    &pol,
                    request("deploy", &[("tag", "v3.0.0")], &format!("cli:{i}")),
                )
                .await
            })
        })
        .collect();
    let mut pending = 0;
    for t in tasks {
        if t.await.expect("join").expect("propose").status == ProposalStatus::Pending {
            pending += 1;
        }
    }
    assert_eq!(pending, 1);
}

#[tokio::test]
async fn a_proposal_and_its_events_commit_or_roll_back_together() {
    let db = test_db().await;
    let pol = policy();
    let req = request("hello", &[("name", "ann")], "cli:ann");
    let (template, params) = proposals::validate(&pol, &req).expect("valid");
    let mut tx = db.pool.begin().await.expect("begin");
    let p = proposals::propose_in(&mut tx, &pol, template, params, &req)
        .await
        .expect("propose");
    assert!(p.mission_id.is_some());
    tx.rollback().await.expect("rollback");
    for table in [
        "ops_mission_proposals",
        "ops_missions",
        "ops_mission_steps",
        "ops_agent_events",
    ] {
        assert_eq!(
            count(&db, &format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
}

#[tokio::test]
async fn every_state_change_has_its_event() {
    let db = test_db().await;
    let pol = policy();
    let low = proposals::propose(
        &db.pool,
        &pol,
        request("hello", &[("name", "a")], "cli:ann"),
    )
    .await
    .expect("low");
    let high = proposals::propose(
        &db.pool,
        &pol,
        request("deploy", &[("tag", "v1.0.0")], "cli:ann"),
    )
    .await
    .expect("high");
    let rej = proposals::propose(
        &db.pool,
        &pol,
        request("deploy", &[("tag", "v1.0.1")], "cli:ann"),
    )
    .await
    .expect("rej");
    decide(&db, &policy(), high.id, "cli:bob", Decision::Approve)
        .await
        .expect("approve");
    decide(&db, &policy(), rej.id, "cli:bob", Decision::Reject)
        .await
        .expect("reject");
    opsloop::engine::missions::cancel(&db.pool, low.mission_id.expect("m"), "cli:ann", "cli")
        .await
        .expect("cancel");
    // Every row's status is matched by an event of that kind.
    let missing: i64 = count(
        &db,
        "SELECT count(*) FROM ops_mission_proposals p WHERE NOT EXISTS (
            SELECT 1 FROM ops_agent_events e WHERE e.proposal_id = p.id AND e.kind = 'proposal.' || CASE p.status WHEN 'pending' THEN 'created' ELSE p.status END)",
    )
    .await;
    assert_eq!(missing, 0);
    let missing: i64 = count(
        &db,
        "SELECT count(*) FROM ops_missions m WHERE NOT EXISTS (
            SELECT 1 FROM ops_agent_events e WHERE e.mission_id = m.id AND e.kind = 'mission.' || CASE m.status WHEN 'running' THEN 'started' ELSE m.status END)",
    )
    .await;
    assert_eq!(missing, 0);
    let cancelled: Vec<String> =
        sqlx::query_scalar("SELECT status FROM ops_mission_steps WHERE mission_id = $1")
            .bind(low.mission_id)
            .fetch_all(&db.pool)
            .await
            .expect("steps");
    assert!(cancelled.iter().all(|s| s == "cancelled"), "{cancelled:?}");
}

/// The test policy with high-risk templates behind each gate about missions, and a
/// template whose param takes any text.
fn gated_policy() -> opsloop::domain::policy::Policy {
    let source = format!(
        "{}{}",
        support::POLICY.replace("max_pending = 5", "max_pending = 50"),
        r#"
[gates.templates.one_at_a_time]
max_running = 1

[gates.templates.once_a_day]
daily_cap = 1

[gates.templates.hourly]
cooldown = "1h"

[templates.one_at_a_time]
risk = "high"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "s", kind = "noop" } ]

[templates.once_a_day]
risk = "high"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "s", kind = "noop" } ]

[templates.hourly]
risk = "high"
params.n = { pattern = '^\d+$', help = "a number" }
steps = [ { name = "s", kind = "noop" } ]

[templates.note]
risk = "low"
params.text = { pattern = '^.*$', help = "any text" }
steps = [ { name = "s", kind = "noop" } ]
"#
    );
    match opsloop::domain::policy::parse(&source) {
        Ok(p) => p,
        Err(problems) => panic!("gated policy: {problems:?}"),
    }
}

async fn status_of(db: &TestDb, proposal: i64) -> String {
    sqlx::query_scalar("SELECT status FROM ops_mission_proposals WHERE id = $1")
        .bind(proposal)
        .fetch_one(&db.pool)
        .await
        .expect("status")
}

async fn approvals_of(db: &TestDb, proposal: i64) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT actor FROM ops_proposal_approvals WHERE proposal_id = $1 ORDER BY id",
    )
    .bind(proposal)
    .fetch_all(&db.pool)
    .await
    .expect("approvals")
}

/// A refused approval: the gate's reason, and the proposal still pending, unapproved.
async fn assert_approval_gated(
    db: &TestDb,
    pol: &opsloop::domain::policy::Policy,
    id: i64,
    says: &str,
) {
    let before = count(db, "SELECT count(*) FROM ops_agent_events").await;
    let d = approvals::decide(&db.pool, pol, id, "cli:bob", Decision::Approve, None, "cli").await;
    match d {
        Err(OpsError::Refused(m)) => {
            assert!(m.contains(says), "{m}");
            assert!(m.contains(&format!("proposal #{id} stays pending")), "{m}");
        }
        other => panic!("approval of #{id} should be refused by {says:?}: {other:?}"),
    }
    assert_eq!(status_of(db, id).await, "pending");
    assert!(
        approvals_of(db, id).await.is_empty(),
        "the approval is not recorded"
    );
    assert_eq!(
        count(db, "SELECT count(*) FROM ops_agent_events").await,
        before,
        "a refused approval writes no event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_approvals_never_run_more_than_max_running() {
    let db = test_db().await;
    let pol = std::sync::Arc::new(gated_policy());
    for round in 0..3 {
        let mut ids = Vec::new();
        for i in 0..8 {
            let n = format!("{round}{i}");
            let p = proposals::propose(
                &db.pool,
                &pol,
                request("one_at_a_time", &[("n", &n)], "cli:ann"),
            )
            .await
            .expect("propose");
            // Gates at proposal time count missions, and none runs yet.
            assert_eq!(p.status, ProposalStatus::Pending, "round {round}");
            ids.push(p.id);
        }
        let taps: Vec<_> = ids
            .iter()
            .map(|&id| {
                let (pool, pol) = (db.pool.clone(), pol.clone());
                tokio::spawn(async move {
                    approvals::decide(&pool, &pol, id, "cli:bob", Decision::Approve, None, "cli")
                        .await
                })
            })
            .collect();
        let (mut approved, mut refused) = (0, 0);
        for tap in taps {
            match tap.await.expect("join") {
                Ok(d) if d.mission_id.is_some() => approved += 1,
                Err(OpsError::Refused(m)) if m.contains("max_running = 1") => refused += 1,
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!((approved, refused), (1, 7), "round {round}");
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM ops_missions WHERE template = 'one_at_a_time' AND status = 'running'"
            )
            .await,
            1,
            "round {round}: exactly one mission runs"
        );
        let waiting: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM ops_mission_proposals WHERE id = ANY($1) AND status = 'pending' ORDER BY id",
        )
        .bind(&ids)
        .fetch_all(&db.pool)
        .await
        .expect("pending");
        assert_eq!(waiting.len(), 7, "round {round}: the refused stay pending");
        // Once the mission is over, a refused proposal can be approved after all.
        sqlx::query(
            "UPDATE ops_missions SET status = 'succeeded' WHERE template = 'one_at_a_time'",
        )
        .execute(&db.pool)
        .await
        .expect("finish");
        let later = decide(&db, &pol, waiting[0], "cli:bob", Decision::Approve)
            .await
            .expect("approved later");
        assert!(later.mission_id.is_some());
        sqlx::query(
            "UPDATE ops_missions SET status = 'succeeded' WHERE template = 'one_at_a_time'",
        )
        .execute(&db.pool)
        .await
        .expect("finish");
        for &id in &waiting[1..] {
            decide(&db, &pol, id, "cli:bob", Decision::Reject)
                .await
                .expect("reject the rest");
        }
    }
}

/// Two pending proposals of `template`; approving the first uses up its cap, so the
/// second's approval is refused with `words`; once `shift` has moved the first mission
/// back in time, the same approval goes through.
async fn gate_is_checked_again_at_approval(template: &str, words: &str, shift: &str) {
    let db = test_db().await;
    let pol = gated_policy();
    let mut ids = Vec::new();
    for n in ["1", "2"] {
        let p = proposals::propose(&db.pool, &pol, request(template, &[("n", n)], "cli:ann"))
            .await
            .expect("propose");
        assert_eq!(p.status, ProposalStatus::Pending);
        ids.push(p.id);
    }
    let approve = |id| decide(&db, &pol, id, "cli:bob", Decision::Approve);
    approve(ids[0]).await.expect("first approved");
    assert_approval_gated(&db, &pol, ids[1], words).await;
    sqlx::query(shift).execute(&db.pool).await.expect("shift");
    let d = approve(ids[1])
        .await
        .expect("approved once the gate allows");
    assert!(d.mission_id.is_some());
}

#[tokio::test]
async fn daily_cap_is_checked_again_at_approval() {
    // The next UTC day (the mission moved to yesterday) the same proposal is approved.
    gate_is_checked_again_at_approval(
        "once_a_day",
        "daily_cap = 1",
        "UPDATE ops_missions SET created_at = created_at - interval '1 day'",
    )
    .await;
}

#[tokio::test]
async fn cooldown_is_checked_again_at_approval() {
    gate_is_checked_again_at_approval(
        "hourly",
        "next one allowed in",
        "UPDATE ops_missions SET created_at = created_at - interval '2 hours'",
    )
    .await;
}

#[tokio::test]
async fn a_template_paused_after_its_proposal_is_refused_at_approval() {
    let db = test_db().await;
    let pol = gated_policy();
    let p = proposals::propose(
        &db.pool,
        &pol,
        request("deploy", &[("tag", "v1.0.0")], "cli:ann"),
    )
    .await
    .expect("propose");
    assert_eq!(p.status, ProposalStatus::Pending);
    let mut conn = db.pool.acquire().await.expect("conn");
    opsloop::engine::gates::pause_template(&mut conn, "deploy", 2)
        .await
        .expect("pause template");
    drop(conn);
    assert_approval_gated(&db, &pol, p.id, "paused after 2 failed missions").await;
    let mut conn = db.pool.acquire().await.expect("conn");
    opsloop::engine::gates::resume_template(
        &mut conn,
        "deploy",
        opsloop::domain::vocab::Source::Cli,
        "test",
    )
    .await
    .expect("resume");
    drop(conn);
    let d = decide(&db, &pol, p.id, "cli:bob", Decision::Approve)
        .await
        .expect("approved after resume");
    assert!(d.mission_id.is_some());
}

#[tokio::test]
async fn the_second_red_approval_is_gated_and_the_first_is_kept() {
    let db = test_db().await;
    let pol = gated_policy();
    let p = proposals::propose(
        &db.pool,
        &pol,
        request("wipe", &[("target", "cache")], "cli:ann"),
    )
    .await
    .expect("propose");
    decide(&db, &pol, p.id, "cli:bob", Decision::Approve)
        .await
        .expect("bob");
    let mut conn = db.pool.acquire().await.expect("conn");
    opsloop::engine::gates::pause_template(&mut conn, "wipe", 3)
        .await
        .expect("pause template");
    drop(conn);
    let carol = decide(&db, &pol, p.id, "cli:carol", Decision::Approve).await;
    assert!(
        matches!(carol, Err(OpsError::Refused(ref m)) if m.contains("template_paused")),
        "{carol:?}"
    );
    assert_eq!(status_of(&db, p.id).await, "pending");
    assert_eq!(approvals_of(&db, p.id).await, ["cli:bob"]);
}

#[tokio::test]
async fn one_person_in_any_spelling_is_one_approver_and_never_their_own() {
    let db = test_db().await;
    let pol = policy();
    let p = proposals::propose(
        &db.pool,
        &pol,
        request("wipe", &[("target", "cache")], "alice"),
    )
    .await
    .expect("propose");
    for me in [
        "Alice",
        " ALICE",
        "alice ",
        "\u{ff41}\u{ff4c}\u{ff49}\u{ff43}\u{ff45}",
    ] {
        let own = decide(&db, &pol, p.id, me, Decision::Approve).await;
        assert!(
            matches!(own, Err(OpsError::Refused(ref m)) if m.contains("proposed by you")),
            "{me:?}: {own:?}"
        );
    }
    let bob = decide(&db, &pol, p.id, "Bob", Decision::Approve)
        .await
        .expect("bob");
    assert!(bob.counted);
    let again = decide(&db, &pol, p.id, " BOB", Decision::Approve)
        .await
        .expect("bob again");
    assert!(
        !again.counted,
        "the same person, spelled otherwise, counts once"
    );
    assert_eq!(
        (again.approvals, again.status),
        (1, ProposalStatus::Pending)
    );
    let carol = decide(&db, &pol, p.id, "carol", Decision::Approve)
        .await
        .expect("carol");
    assert_eq!(carol.status, ProposalStatus::Approved);
    // Stored normalized: the unique index is one row per person.
    assert_eq!(approvals_of(&db, p.id).await, ["bob", "carol"]);
}

#[tokio::test]
async fn rows_stored_before_normalization_still_compare_as_people() {
    let db = test_db().await;
    let pol = policy();
    // Written by an older opsloop: the proposer and an approver as typed.
    let p = proposals::propose(
        &db.pool,
        &pol,
        request("wipe", &[("target", "cache")], "Ann"),
    )
    .await
    .expect("propose");
    sqlx::query(
        "INSERT INTO ops_proposal_approvals (proposal_id, actor, decision) VALUES ($1, 'Bob', 'approve')",
    )
    .bind(p.id)
    .execute(&db.pool)
    .await
    .expect("old approval");
    let own = decide(&db, &pol, p.id, "ann", Decision::Approve).await;
    assert!(matches!(own, Err(OpsError::Refused(_))), "{own:?}");
    let bob = decide(&db, &pol, p.id, "bob", Decision::Approve)
        .await
        .expect("bob");
    assert!(!bob.counted);
    assert_eq!((bob.approvals, bob.status), (1, ProposalStatus::Pending));
    let carol = decide(&db, &pol, p.id, "carol", Decision::Approve)
        .await
        .expect("carol");
    assert_eq!(carol.status, ProposalStatus::Approved);
}

#[tokio::test]
async fn bad_names_and_nul_characters_are_bad_input_and_change_nothing() {
    let db = test_db().await;
    let pol = gated_policy();
    let p = proposals::propose(
        &db.pool,
        &pol,
        request("deploy", &[("tag", "v1.0.0")], "cli:ann"),
    )
    .await
    .expect("propose");
    let before = count(&db, "SELECT count(*) FROM ops_agent_events").await;
    for (who, reason, says) in [
        ("", None, "empty"),
        ("bo\u{7}b", None, "control character"),
        ("bo\u{200b}b", None, "invisible"),
        ("bob", Some("not\u{0}now"), "\\u0000"),
    ] {
        let decision = if reason.is_some() {
            Decision::Reject
        } else {
            Decision::Approve
        };
        let d = approvals::decide(&db.pool, &pol, p.id, who, decision, reason, "cli").await;
        assert!(
            matches!(d, Err(OpsError::BadInput(ref m)) if m.contains(says)),
            "{who:?}: {d:?}"
        );
    }
    assert_eq!(status_of(&db, p.id).await, "pending");
    assert!(approvals_of(&db, p.id).await.is_empty());
    // A param pattern that lets anything through still cannot store U+0000.
    let nul = proposals::propose(
        &db.pool,
        &pol,
        request("note", &[("text", "a\u{0}b")], "cli:ann"),
    )
    .await;
    assert!(
        matches!(nul, Err(OpsError::BadInput(ref m)) if m.contains("param \"text\" contains \\u0000")),
        "{nul:?}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM ops_agent_events").await,
        before
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM ops_mission_proposals").await,
        1
    );
}
