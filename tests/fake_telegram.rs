use std::time::{Duration, Instant};

mod support;

use serde_json::json;
use support::fake_telegram::{Chat, FakeTelegram, Fault, User};
use teloxide::prelude::*;
use teloxide::types::{
    CallbackQueryId, InlineKeyboardButton, InlineKeyboardMarkup, MessageEntityKind, MessageId,
    ParseMode, UpdateKind,
};
use teloxide::utils::command::BotCommands;
use teloxide::{ApiError, RequestError};

#[derive(BotCommands, Clone, Debug, PartialEq)]
#[command(rename_rule = "lowercase")]
enum Command {
    Start,
    Propose(String),
}

async fn setup() -> (FakeTelegram, Bot) {
    let fake = FakeTelegram::start().await;
    let bot = Bot::new(fake.token()).set_api_url(fake.url());
    (fake, bot)
}

fn keyboard(data: &str) -> InlineKeyboardMarkup {
    InlineKeyboardMarkup::new(vec![vec![
        InlineKeyboardButton::callback("✅ Approve", data),
        InlineKeyboardButton::callback("❌ Reject", "r:1"),
    ]])
}

#[tokio::test]
async fn get_me() {
    let (fake, bot) = setup().await;
    let me = bot.get_me().await.unwrap();
    assert_eq!(me.username(), FakeTelegram::BOT_USERNAME);
    assert_eq!(me.id.0 as i64, FakeTelegram::BOT_ID);
    assert!(me.is_bot && me.can_join_groups);
    assert!(bot.get_webhook_info().await.unwrap().url.is_none());
    bot.delete_webhook().await.unwrap();
    let reqs = fake.requests();
    assert_eq!(reqs[0].method, "getme");
    assert_eq!(reqs[0].status, 200);
    assert!(fake.url().as_str().ends_with('/'));
}

#[tokio::test]
async fn send_then_edit_removes_keyboard() {
    let (fake, bot) = setup().await;
    let ann = User::new(42, "Ann");
    // Private chats must be started by the user first, like the real API.
    let e = bot.send_message(ChatId(42), "hi").await.unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::Unknown(ref d)) if d.contains("initiate conversation"))
    );
    fake.send_text(Chat::private(42), ann, "/start");

    let msg = bot
        .send_message(ChatId(42), "<b>deploy</b> &lt;x&gt;")
        .parse_mode(ParseMode::Html)
        .reply_markup(keyboard("a:1"))
        .await
        .unwrap();
    assert_eq!(msg.id, MessageId(2)); // the user's /start was message 1
    assert_eq!(msg.chat.id, ChatId(42));
    assert_eq!(msg.from.as_ref().unwrap().id.0 as i64, FakeTelegram::BOT_ID);
    assert_eq!(msg.text(), Some("<b>deploy</b> &lt;x&gt;"));
    assert_eq!(msg.reply_markup().unwrap().inline_keyboard[0].len(), 2);
    let sent = fake.sent_messages(42);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].parse_mode.as_deref(), Some("HTML"));
    assert_eq!(
        sent[0].reply_markup.as_ref().unwrap()["inline_keyboard"][0][0]["callback_data"],
        "a:1"
    );

    let edited = bot
        .edit_message_text(ChatId(42), msg.id, "approved")
        .await
        .unwrap();
    assert_eq!(edited.text(), Some("approved"));
    assert!(edited.reply_markup().is_none());
    let sent = fake.sent_messages(42);
    assert_eq!(
        (
            sent[0].text.as_str(),
            sent[0].reply_markup.is_none(),
            sent[0].edits
        ),
        ("approved", true, 1)
    );
    assert_eq!(sent[0].parse_mode, None);

    let e = bot
        .edit_message_text(ChatId(42), msg.id, "approved")
        .await
        .unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::MessageNotModified)),
        "{e:?}"
    );
    let e = bot
        .edit_message_text(ChatId(42), MessageId(99), "x")
        .await
        .unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::MessageToEditNotFound)),
        "{e:?}"
    );

    bot.edit_message_reply_markup(ChatId(42), msg.id)
        .reply_markup(keyboard("a:2"))
        .await
        .unwrap();
    assert_eq!(fake.sent_messages(42)[0].edits, 2);
    bot.delete_message(ChatId(42), msg.id).await.unwrap();
    assert!(fake.sent_messages(42).is_empty());

    // Groups need no start; HTML and button data are validated.
    let g = bot
        .send_message(ChatId(-100123), "to the group")
        .await
        .unwrap();
    assert_eq!(g.id, MessageId(1));
    let e = bot
        .send_message(ChatId(-100123), "a <script> b")
        .parse_mode(ParseMode::Html)
        .await
        .unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::CantParseEntities(_))),
        "{e:?}"
    );
    let e = bot
        .send_message(ChatId(-100123), "x")
        .reply_markup(keyboard(&"d".repeat(65)))
        .await
        .unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::ButtonDataInvalid)),
        "{e:?}"
    );
    let e = bot
        .send_message(ChatId(-100123), "x".repeat(4097))
        .await
        .unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::MessageIsTooLong)),
        "{e:?}"
    );
    assert_eq!(fake.send_times(-100123).len(), 1);
}

#[tokio::test]
async fn long_poll_returns_injected_command() {
    let (fake, bot) = setup().await;
    let poll = tokio::spawn({
        let bot = bot.clone();
        async move { bot.get_updates().timeout(10).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!poll.is_finished(), "long poll must wait");
    let t0 = Instant::now();
    let ann = User::new(42, "Ann").with_username("ann");
    let uid = fake.send_text(Chat::private(42), ann, "/start");
    let updates = poll.await.unwrap().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the long poll waited out its timeout"
    );
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].id.0 as i64, uid);
    let UpdateKind::Message(msg) = &updates[0].kind else {
        panic!("{:?}", updates[0])
    };
    assert_eq!(msg.text(), Some("/start"));
    assert_eq!(msg.from.as_ref().unwrap().username.as_deref(), Some("ann"));
    assert!(msg.chat.is_private());
    assert_eq!(
        msg.entities().unwrap()[0].kind,
        MessageEntityKind::BotCommand
    );
    assert_eq!(
        Command::parse(msg.text().unwrap(), FakeTelegram::BOT_USERNAME).unwrap(),
        Command::Start
    );

    fake.send_text(
        Chat::group(-100123, "ops"),
        User::new(7, "Bob"),
        "/propose@opsloop_test_bot deploy a=b",
    );
    let updates = bot
        .get_updates()
        .offset(uid as i32 + 1)
        .timeout(5)
        .await
        .unwrap();
    let UpdateKind::Message(msg) = &updates[0].kind else {
        panic!()
    };
    assert!(msg.chat.is_group());
    assert_eq!(msg.chat.title(), Some("ops"));
    let cmd = Command::parse(msg.text().unwrap(), FakeTelegram::BOT_USERNAME).unwrap();
    assert_eq!(cmd, Command::Propose("deploy a=b".into()));

    // Timeout without updates returns an empty list after ~timeout.
    let t0 = Instant::now();
    let none = bot
        .get_updates()
        .offset(updates[0].id.0 as i32 + 1)
        .timeout(1)
        .await
        .unwrap();
    assert!(none.is_empty() && t0.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn callback_tap_round_trip() {
    let (fake, bot) = setup().await;
    let ann = User::new(42, "Ann");
    fake.register_chat(Chat::private(42));
    let msg = bot
        .send_message(ChatId(42), "approve?")
        .reply_markup(keyboard("a:1"))
        .await
        .unwrap();
    let cb = fake.tap(Chat::private(42), ann.clone(), msg.id.0 as i64, "a:1");
    let updates = bot.get_updates().timeout(5).await.unwrap();
    let UpdateKind::CallbackQuery(q) = &updates[0].kind else {
        panic!("{:?}", updates[0])
    };
    assert_eq!(q.id.0, cb);
    assert_eq!(q.data.as_deref(), Some("a:1"));
    assert_eq!(q.from.id.0, 42);
    let m = q.regular_message().expect("accessible message");
    assert_eq!((m.id, m.text()), (msg.id, Some("approve?")));
    assert!(m.reply_markup().is_some());

    bot.answer_callback_query(q.id.clone())
        .text("approved")
        .await
        .unwrap();
    assert_eq!(
        fake.callback_answers(),
        vec![(cb, Some("approved".to_string()))]
    );
    let e = bot
        .answer_callback_query(CallbackQueryId("nope".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::InvalidQueryId)),
        "{e:?}"
    );

    // A tap on an unknown message arrives as an inaccessible message.
    fake.tap(Chat::private(42), ann, 77, "a:2");
    let next = bot
        .get_updates()
        .offset(updates[0].id.0 as i32 + 1)
        .await
        .unwrap();
    let UpdateKind::CallbackQuery(q) = &next[0].kind else {
        panic!()
    };
    assert!(q.regular_message().is_none());
}

#[tokio::test]
async fn too_many_requests_is_retry_after() {
    let (fake, bot) = setup().await;
    fake.fail_next("sendMessage", 1, Fault::TooManyRequests { retry_after: 7 });
    let e = bot.send_message(ChatId(-1), "x").await.unwrap_err();
    assert!(
        matches!(e, RequestError::RetryAfter(s) if s.seconds() == 7),
        "{e:?}"
    );
    bot.send_message(ChatId(-1), "x").await.unwrap();
    let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 200]);
    assert_eq!(fake.send_times(-1).len(), 1);
}

#[tokio::test]
async fn server_error() {
    let (fake, bot) = setup().await;
    fake.fail_next("*", 1, Fault::ServerError);
    let t0 = Instant::now();
    let e = bot.get_me().await.unwrap_err();
    // teloxide itself sleeps 10 s after any 5xx.
    assert!(t0.elapsed() >= Duration::from_secs(10));
    assert!(
        matches!(e, RequestError::Api(ApiError::Unknown(ref d)) if d == "Internal Server Error"),
        "{e:?}"
    );
    assert_eq!(fake.requests()[0].status, 500);
    bot.get_me().await.unwrap();
}

#[tokio::test]
async fn drop_is_network_error() {
    let (fake, bot) = setup().await;
    fake.fail_next("getMe", 2, Fault::Drop);
    for _ in 0..2 {
        let e = bot.get_me().await.unwrap_err();
        assert!(matches!(e, RequestError::Network(_)), "{e:?}");
    }
    bot.get_me().await.unwrap();
    assert_eq!(fake.requests().len(), 3);
}

#[tokio::test]
async fn persistent_slow_and_conflict_faults() {
    let (fake, bot) = setup().await;
    fake.set_fault_for("*", Some(Fault::Slow(Duration::from_millis(300))));
    let t0 = Instant::now();
    bot.get_me().await.unwrap();
    bot.get_me().await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(600));
    fake.set_fault_for("*", None);
    fake.set_fault_for("getupdates", Some(Fault::Conflict));
    let e = bot.get_updates().await.unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::TerminatedByOtherGetUpdates)),
        "{e:?}"
    );
    fake.set_fault_for("getupdates", None);

    // A second concurrent long poll terminates the first one, like the real API.
    let first = tokio::spawn({
        let bot = bot.clone();
        async move { bot.get_updates().timeout(10).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = tokio::spawn({
        let bot = bot.clone();
        async move { bot.get_updates().timeout(1).await }
    });
    let e = first.await.unwrap().unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::TerminatedByOtherGetUpdates)),
        "{e:?}"
    );
    assert!(second.await.unwrap().unwrap().is_empty());
}

#[tokio::test]
async fn offset_confirms_updates() {
    let (fake, bot) = setup().await;
    let ids: Vec<i64> = (0..3)
        .map(|i| fake.send_text(Chat::private(5), User::new(5, "E"), &format!("m{i}")))
        .collect();
    assert!(ids.windows(2).all(|w| w[1] > w[0]));
    assert_eq!(bot.get_updates().await.unwrap().len(), 3);
    assert_eq!(
        bot.get_updates().await.unwrap().len(),
        3,
        "unconfirmed updates are redelivered"
    );
    assert_eq!(bot.get_updates().limit(2).await.unwrap().len(), 2);
    let rest = bot.get_updates().offset(ids[1] as i32 + 1).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id.0 as i64, ids[2]);
    assert_eq!(fake.pending_updates(), 1);
    assert!(
        bot.get_updates()
            .offset(ids[2] as i32 + 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(fake.pending_updates(), 0);
    assert_eq!(
        fake.requests().last().unwrap().body["offset"],
        json!(ids[2] + 1)
    );
}

#[tokio::test]
async fn wrong_token_unknown_method_and_form_bodies() {
    let (fake, _) = setup().await;
    let bad = Bot::new("1:WRONG").set_api_url(fake.url());
    let e = bad.get_me().await.unwrap_err();
    assert!(
        matches!(e, RequestError::Api(ApiError::InvalidToken)),
        "{e:?}"
    );

    let http = reqwest::Client::new();
    let base = format!("{}bot{}", fake.url(), fake.token());
    let r = http
        .post(format!("{base}/noSuchMethod"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"ok": false, "error_code": 404, "description": "Not Found: method not found"})
    );

    fake.register_chat(Chat::private(9));
    let markup = r#"{"inline_keyboard":[[{"text":"ok","callback_data":"k"}]]}"#;
    let form = [
        ("chat_id", "9"),
        ("text", "hello"),
        ("reply_markup", markup),
    ];
    let v: serde_json::Value = http
        .post(format!("{base}/SENDMESSAGE"))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["result"]["text"], "hello");
    let sent = fake.sent_messages(9);
    assert_eq!(
        sent[0].reply_markup.as_ref().unwrap()["inline_keyboard"][0][0]["text"],
        "ok"
    );
}

async fn reply(bot: Bot, msg: Message, cmd: Command) -> ResponseResult<()> {
    bot.send_message(msg.chat.id, format!("got {cmd:?}"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn dispatcher_end_to_end() {
    let (fake, bot) = setup().await;
    bot.set_my_commands(Command::bot_commands()).await.unwrap();
    assert_eq!(fake.commands().as_array().unwrap().len(), 2);
    let handler = Update::filter_message()
        .filter_command::<Command>()
        .endpoint(reply);
    let mut dispatcher = Dispatcher::builder(bot, handler).build();
    let task = tokio::spawn(async move { dispatcher.dispatch().await });
    fake.send_text(Chat::private(42), User::new(42, "Ann"), "/start");
    let ok = fake
        .wait_for(Duration::from_secs(5), |f| !f.sent_messages(42).is_empty())
        .await;
    assert!(ok, "{:?}", fake.requests());
    assert_eq!(fake.sent_messages(42)[0].text, "got Start");
    task.abort();
}
