//! Every operator change of state writes its event in the same transaction: done,
//! both are there; the event refused, neither is (a trigger makes the event insert fail).

mod support;

use opsloop::domain::vocab::Source;
use opsloop::store::users::{self, Role};
use support::{POLICY, TestDb, test_db};

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect(sql)
}

async fn events(db: &TestDb, kind: &str) -> Vec<serde_json::Value> {
    sqlx::query_scalar("SELECT payload FROM ops_agent_events WHERE kind = $1 ORDER BY id")
        .bind(kind)
        .fetch_all(&db.pool)
        .await
        .expect("events")
}

/// From now on, writing an event of `kind` fails (and so must its whole transaction).
async fn refuse_events(db: &TestDb, kind: &str) {
    sqlx::query(
        "CREATE FUNCTION test_refuse_event() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.kind = TG_ARGV[0] THEN RAISE EXCEPTION 'refused by the test'; END IF;
           RETURN NEW;
         END $$",
    )
    .execute(&db.pool)
    .await
    .expect("function");
    sqlx::query(&format!(
        "CREATE TRIGGER test_refuse BEFORE INSERT ON ops_agent_events
         FOR EACH ROW EXECUTE FUNCTION test_refuse_event('{kind}')"
    ))
    .execute(&db.pool)
    .await
    .expect("trigger");
}

#[tokio::test]
async fn grant_and_revoke_write_their_events() {
    let db = test_db().await;
    assert!(
        users::grant(&db.pool, 42, Role::Operator, Source::Cli, "cli:ann")
            .await
            .expect("grant")
    );
    // The same role again changes nothing and says nothing.
    assert!(
        !users::grant(&db.pool, 42, Role::Operator, Source::Cli, "cli:ann")
            .await
            .expect("grant again")
    );
    users::grant(&db.pool, 42, Role::Admin, Source::Telegram, "tg:7")
        .await
        .expect("promote");
    let granted = events(&db, "user.granted").await;
    assert_eq!(granted.len(), 2, "{granted:?}");
    assert_eq!(granted[0]["role"], "operator");
    assert_eq!(granted[0]["previous"], serde_json::Value::Null);
    assert_eq!(granted[1]["role"], "admin");
    assert_eq!(granted[1]["previous"], "operator");
    assert_eq!(granted[1]["by"], "tg:7");

    users::revoke(&db.pool, 42, Source::Cli, "cli:ann")
        .await
        .expect("revoke");
    let revoked = events(&db, "user.revoked").await;
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["telegram_id"], 42);
    assert_eq!(revoked[0]["role"], "admin");
    // Revoking someone unknown is refused and writes nothing.
    assert!(
        users::revoke(&db.pool, 42, Source::Cli, "cli:ann")
            .await
            .is_err()
    );
    assert_eq!(events(&db, "user.revoked").await.len(), 1);
}

#[tokio::test]
async fn a_grant_whose_event_fails_is_not_stored() {
    let db = test_db().await;
    users::grant(&db.pool, 42, Role::Viewer, Source::Cli, "cli:ann")
        .await
        .expect("grant");
    refuse_events(&db, "user.granted").await;
    assert!(
        users::grant(&db.pool, 42, Role::Admin, Source::Cli, "cli:ann")
            .await
            .is_err()
    );
    assert!(
        users::grant(&db.pool, 43, Role::Admin, Source::Cli, "cli:ann")
            .await
            .is_err()
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM ops_users WHERE role = 'admin'").await,
        0
    );
    assert_eq!(count(&db, "SELECT count(*) FROM ops_users").await, 1);
}

#[tokio::test]
async fn a_revoke_whose_event_fails_keeps_the_user() {
    let db = test_db().await;
    users::grant(&db.pool, 42, Role::Viewer, Source::Cli, "cli:ann")
        .await
        .expect("grant");
    refuse_events(&db, "user.revoked").await;
    assert!(
        users::revoke(&db.pool, 42, Source::Cli, "cli:ann")
            .await
            .is_err()
    );
    assert_eq!(count(&db, "SELECT count(*) FROM ops_users").await, 1);
}

#[tokio::test]
async fn policy_apply_writes_its_event_or_nothing() {
    let db = test_db().await;
    let v1 = opsloop::store::policy::apply(&db.pool, POLICY, "cli:ann")
        .await
        .expect("apply");
    let applied = events(&db, "policy.applied").await;
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0]["version"], v1);
    assert_eq!(applied[0]["by"], "cli:ann");

    refuse_events(&db, "policy.applied").await;
    let changed = POLICY.replace("max_pending = 5", "max_pending = 6");
    assert!(
        opsloop::store::policy::apply(&db.pool, &changed, "cli:ann")
            .await
            .is_err()
    );
    let stored = opsloop::store::policy::load(&db.pool)
        .await
        .expect("load")
        .expect("a policy");
    assert_eq!(stored.version, v1, "the refused apply left the old version");
    assert!(stored.source.contains("max_pending = 5"));
}

#[tokio::test]
async fn pause_and_resume_write_their_events_once() {
    let db = test_db().await;
    let mut conn = db.pool.acquire().await.expect("conn");
    use opsloop::engine::gates;
    assert!(
        gates::set_paused(&mut conn, true, Source::Cli, "cli:ann")
            .await
            .expect("pause")
    );
    assert!(
        !gates::set_paused(&mut conn, true, Source::Cli, "cli:ann")
            .await
            .expect("pause again")
    );
    assert!(gates::is_paused(&mut conn).await.expect("read"));
    assert!(
        gates::set_paused(&mut conn, false, Source::Telegram, "tg:7")
            .await
            .expect("resume")
    );
    assert!(!gates::is_paused(&mut conn).await.expect("read"));
    let paused: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT source, payload FROM ops_agent_events WHERE kind IN ('system.paused', 'system.resumed') ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("events");
    assert_eq!(paused.len(), 2, "{paused:?}");
    assert_eq!(paused[0].0, "cli");
    assert_eq!(paused[0].1["by"], "cli:ann");
    assert_eq!(paused[1].0, "telegram");
}

#[tokio::test]
async fn a_pause_whose_event_fails_leaves_the_switch_as_it_was() {
    let db = test_db().await;
    refuse_events(&db, "system.paused").await;
    let mut conn = db.pool.acquire().await.expect("conn");
    use opsloop::engine::gates;
    assert!(
        gates::set_paused(&mut conn, true, Source::Cli, "cli:ann")
            .await
            .is_err()
    );
    assert!(!gates::is_paused(&mut conn).await.expect("read"));
}

#[tokio::test]
async fn resuming_a_template_writes_its_event_or_nothing() {
    let db = test_db().await;
    use opsloop::engine::gates;
    let mut conn = db.pool.acquire().await.expect("conn");
    let mut tx = sqlx::Connection::begin(&mut *conn).await.expect("tx");
    gates::pause_template(&mut tx, "hello", 2)
        .await
        .expect("pause template");
    tx.commit().await.expect("commit");
    assert_eq!(events(&db, "template.paused").await.len(), 1);

    refuse_events(&db, "template.resumed").await;
    assert!(
        gates::resume_template(&mut conn, "hello", Source::Cli, "cli:ann")
            .await
            .is_err()
    );
    assert_eq!(
        gates::paused_templates(&mut conn).await.expect("read"),
        vec!["hello".to_string()]
    );
    sqlx::query("DROP TRIGGER test_refuse ON ops_agent_events")
        .execute(&db.pool)
        .await
        .expect("drop trigger");
    assert!(
        gates::resume_template(&mut conn, "hello", Source::Cli, "cli:ann")
            .await
            .expect("resume")
    );
    assert!(
        !gates::resume_template(&mut conn, "hello", Source::Cli, "cli:ann")
            .await
            .expect("resume again")
    );
    let resumed = events(&db, "template.resumed").await;
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0]["by"], "cli:ann");
    assert!(
        gates::paused_templates(&mut conn)
            .await
            .expect("read")
            .is_empty()
    );
}

/// A Telegram display name is anyone's choice, NUL included: it must not make the
/// bot fail to see who wrote.
#[tokio::test]
async fn a_display_name_with_nul_is_stored() {
    let db = test_db().await;
    users::grant(&db.pool, 42, Role::Viewer, Source::Cli, "cli:ann")
        .await
        .expect("grant");
    let user = users::seen(&db.pool, 42, "ev\0il", true)
        .await
        .expect("seen")
        .expect("a user");
    assert_eq!(user.name.as_deref(), Some("ev\u{FFFD}il"));
}
