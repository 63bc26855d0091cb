//! A fake Telegram Bot API server for end-to-end tests of a real teloxide bot.
//!
//! Serves `{url}bot{TOKEN}/{method}` on 127.0.0.1 with the real wire format
//! (`{"ok":true,"result":...}` / `{"ok":false,"error_code":N,"description":...}`), JSON or
//! form-urlencoded bodies. Use `Bot::new(fake.token()).set_api_url(fake.url())`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A Telegram user (someone talking to the bot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub first_name: String,
    pub username: Option<String>,
}

impl User {
    pub fn new(id: i64, first_name: &str) -> User {
        let (first_name, username) = (first_name.to_owned(), None);
        User {
            id,
            first_name,
            username,
        }
    }
    pub fn with_username(mut self, username: &str) -> User {
        self.username = Some(username.to_owned());
        self
    }
    fn json(&self) -> Value {
        json!({"id": self.id, "is_bot": false, "first_name": self.first_name,
            "username": self.username, "language_code": "en"})
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatKind {
    Private,
    Group { title: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chat {
    pub id: i64,
    pub kind: ChatKind,
}

impl Chat {
    pub fn private(id: i64) -> Chat {
        let kind = ChatKind::Private;
        Chat { id, kind }
    }
    pub fn group(id: i64, title: &str) -> Chat {
        let kind = ChatKind::Group {
            title: title.to_owned(),
        };
        Chat { id, kind }
    }
}

/// A fault injected into requests (see `fail_next`, `set_fault_for`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 with `parameters.retry_after` (teloxide: `RequestError::RetryAfter`).
    TooManyRequests { retry_after: u32 },
    /// HTTP 500 `{"ok":false,"error_code":500,"description":"Internal Server Error"}`.
    /// teloxide sleeps 10 s after any 5xx before returning the error.
    ServerError,
    /// Wait, then answer normally.
    Slow(Duration),
    /// Close the connection without answering (teloxide: `RequestError::Network`).
    Drop,
    /// Carry the request out (a sendMessage is recorded, the message is in the chat),
    /// then close the connection without answering: a lost response.
    LoseResponse,
    /// 409 "Conflict: terminated by other getUpdates request; ...".
    Conflict,
    /// Any other error, e.g. `Api { code: 403, description: "Forbidden: bot was blocked by the user".into() }`.
    Api { code: u16, description: String },
}

/// One request the bot made.
#[derive(Clone, Debug)]
pub struct Request {
    /// Lowercased method name, e.g. `sendmessage`.
    pub method: String,
    /// Parameters as JSON (form values are strings).
    pub body: Value,
    /// When the request arrived.
    pub at: Instant,
    /// HTTP status answered; 0 while pending or when dropped.
    pub status: u16,
}

impl Request {
    pub fn chat_id(&self) -> Option<i64> {
        int(&self.body, "chat_id")
    }
}

/// Current state of a message the bot sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Sent {
    pub message_id: i64,
    /// Raw text as sent or last edited (HTML tags included).
    pub text: String,
    /// `None` when there is no keyboard (never sent, or removed by an edit).
    pub reply_markup: Option<Value>,
    pub parse_mode: Option<String>,
    pub edits: u32,
    pub date: i64,
}

#[derive(Default)]
struct St {
    updates: VecDeque<(i64, Value)>,
    next_update: i64,
    next_msg: HashMap<i64, i64>,
    sent: BTreeMap<(i64, i64), Sent>,
    chats: HashMap<i64, Chat>,
    users: HashMap<i64, User>,
    requests: Vec<Request>,
    callbacks: Vec<String>,
    answers: Vec<(String, Option<String>)>,
    once: Vec<(String, usize, Fault)>,
    persistent: HashMap<String, Fault>,
    /// Chats whose requests are answered with half a body, then nothing.
    stalled_chats: std::collections::HashSet<i64>,
    poll_gen: u64,
    commands: Value,
}

struct Shared {
    st: Mutex<St>,
    notify: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct FakeTelegram {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for FakeTelegram {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TOKEN: &str = "123456:TEST-TOKEN";
const CONFLICT: &str = "Conflict: terminated by other getUpdates request; \
                        make sure that only one bot instance is running";
const NOT_MODIFIED: &str = "Bad Request: message is not modified: specified new message content \
    and reply markup are exactly the same as a current content and reply markup of the message";

impl FakeTelegram {
    pub const BOT_ID: i64 = 123456;
    pub const BOT_USERNAME: &'static str = "opsloop_test_bot";

    pub async fn start() -> FakeTelegram {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (next_update, commands) = (1000, json!([]));
        let st = Mutex::new(St {
            next_update,
            commands,
            ..St::default()
        });
        let shared = Arc::new(Shared {
            st,
            notify: Notify::new(),
        });
        let app = Router::new()
            .route("/{token}/{method}", axum::routing::any(handle))
            .with_state(shared.clone());
        let svc = app.into_make_service_with_connect_info::<Conn>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, svc).await;
        });
        FakeTelegram { shared, addr, task }
    }

    /// Base URL for `Bot::set_api_url`: `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> reqwest::Url {
        reqwest::Url::parse(&format!("http://{}/", self.addr)).expect("url")
    }

    pub fn token(&self) -> &str {
        TOKEN
    }

    /// Makes a chat known without an update: a private chat counts as started (the bot
    /// may write there); a group's title shows in `chat` objects.
    pub fn register_chat(&self, chat: Chat) {
        self.shared.lock().chats.insert(chat.id, chat);
    }

    /// Queues a text message from `from` in `chat` (a private chat is then started);
    /// returns its update_id. Text starting with `/` gets a `bot_command` entity.
    pub fn send_text(&self, chat: Chat, from: User, text: &str) -> i64 {
        let mut st = self.shared.lock();
        let id = next_msg_id(&mut st, chat.id);
        let mut msg = json!({"message_id": id, "date": now(), "chat": chat_json(&chat, Some(&from)),
            "from": from.json(), "text": text});
        if text.starts_with('/') {
            let cmd = text.split_whitespace().next().unwrap_or("");
            let len = cmd.encode_utf16().count();
            msg["entities"] = json!([{"type": "bot_command", "offset": 0, "length": len}]);
        }
        st.users.insert(from.id, from);
        st.chats.insert(chat.id, chat);
        self.push_update(st, "message", msg)
    }

    /// Queues a text message from `from` replying to the bot's message `reply_to`.
    pub fn send_reply(&self, chat: Chat, from: User, text: &str, reply_to: i64) -> i64 {
        let mut st = self.shared.lock();
        let replied = st
            .sent
            .get(&(chat.id, reply_to))
            .map(|s| message_json(&st, chat.id, s));
        let id = next_msg_id(&mut st, chat.id);
        let mut msg = json!({"message_id": id, "date": now(), "chat": chat_json(&chat, Some(&from)),
            "from": from.json(), "text": text});
        if let Some(r) = replied {
            msg["reply_to_message"] = r;
        }
        st.users.insert(from.id, from);
        st.chats.insert(chat.id, chat);
        self.push_update(st, "message", msg)
    }

    /// Queues a callback query: `from` taps a button with `data` on the bot's message
    /// `message_id` in `chat`. Returns the callback query id.
    pub fn tap(&self, chat: Chat, from: User, message_id: i64, data: &str) -> String {
        let mut st = self.shared.lock();
        let cb_id = (4_000_000_000_000_000_000u64 + st.callbacks.len() as u64).to_string();
        st.callbacks.push(cb_id.clone());
        st.users.insert(from.id, from.clone());
        st.chats.entry(chat.id).or_insert_with(|| chat.clone());
        let message = match st.sent.get(&(chat.id, message_id)) {
            Some(s) => message_json(&st, chat.id, s),
            // date 0 = an inaccessible message, as Telegram sends for old/deleted ones
            None => json!({"chat": chat_json(&chat, None), "message_id": message_id, "date": 0}),
        };
        let q = json!({"id": cb_id, "from": from.json(), "message": message,
            "chat_instance": format!("ci{}", chat.id), "data": data});
        self.push_update(st, "callback_query", q);
        cb_id
    }

    fn push_update(&self, mut st: MutexGuard<'_, St>, kind: &str, payload: Value) -> i64 {
        st.next_update += 1;
        let id = st.next_update;
        let mut update = json!({ "update_id": id });
        update[kind] = payload;
        st.updates.push_back((id, update));
        drop(st);
        self.shared.notify.notify_waiters();
        id
    }

    /// Every request received so far (including faulted and rejected ones), in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Arrival times of the successful `sendMessage` requests to `chat_id`.
    pub fn send_times(&self, chat_id: i64) -> Vec<Instant> {
        let st = self.shared.lock();
        let sent = |r: &&Request| r.method == "sendmessage" && r.status == 200;
        let sent_here = |r: &&Request| sent(r) && r.chat_id() == Some(chat_id);
        st.requests.iter().filter(sent_here).map(|r| r.at).collect()
    }

    /// Current state of the bot's (not deleted) messages in `chat_id`, by message_id.
    pub fn sent_messages(&self, chat_id: i64) -> Vec<Sent> {
        let st = self.shared.lock();
        let range = st.sent.range((chat_id, i64::MIN)..=(chat_id, i64::MAX));
        range.map(|(_, s)| s.clone()).collect()
    }

    /// `(callback query id, text)` of every successful answerCallbackQuery, in order.
    pub fn callback_answers(&self) -> Vec<(String, Option<String>)> {
        self.shared.lock().answers.clone()
    }

    /// The `commands` of the last setMyCommands (`[]` before).
    pub fn commands(&self) -> Value {
        self.shared.lock().commands.clone()
    }

    /// Updates queued and not yet confirmed by a getUpdates `offset`.
    pub fn pending_updates(&self) -> usize {
        self.shared.lock().updates.len()
    }

    /// Polls `f` every 20 ms until it holds (true) or `timeout` passes (false).
    pub async fn wait_for<F: Fn(&FakeTelegram) -> bool>(&self, timeout: Duration, f: F) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if f(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Applies `fault` to the next `n` requests of `method` (any case; "*" = any method).
    pub fn fail_next(&self, method: &str, n: usize, fault: Fault) {
        let method = method.to_ascii_lowercase();
        self.shared.lock().once.push((method, n, fault));
    }

    /// Every request about `chat_id` gets its status line, headers and half a body, then
    /// nothing more: a connection that stalls mid-answer (until the client gives up).
    pub fn stall_chat(&self, chat_id: i64) {
        self.shared.lock().stalled_chats.insert(chat_id);
    }

    /// Applies `fault` to every request of `method` ("*" = any) until cleared with `None`.
    /// One-shot faults from `fail_next` take precedence.
    pub fn set_fault_for(&self, method: &str, fault: Option<Fault>) {
        let (mut st, method) = (self.shared.lock(), method.to_ascii_lowercase());
        match fault {
            Some(f) => st.persistent.insert(method, f),
            None => st.persistent.remove(&method),
        };
    }
}

fn now() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH);
    since_epoch.map_or(0, |d| d.as_secs() as i64)
}

/// Message ids are per chat, shared by the users' and the bot's messages.
fn next_msg_id(st: &mut St, chat_id: i64) -> i64 {
    let n = st.next_msg.entry(chat_id).or_insert(0);
    *n += 1;
    *n
}

fn chat_json(chat: &Chat, user: Option<&User>) -> Value {
    match (&chat.kind, user.filter(|u| u.id == chat.id)) {
        (ChatKind::Group { title }, _) => json!({"id": chat.id, "type": "group", "title": title}),
        (ChatKind::Private, Some(u)) => json!({"id": chat.id, "type": "private",
            "first_name": u.first_name, "username": u.username}),
        (ChatKind::Private, None) => json!({"id": chat.id, "type": "private"}),
    }
}

fn message_json(st: &St, chat_id: i64, s: &Sent) -> Value {
    let chat = st
        .chats
        .get(&chat_id)
        .cloned()
        .unwrap_or_else(|| match chat_id {
            1.. => Chat::private(chat_id),
            _ => Chat::group(chat_id, &format!("chat {chat_id}")),
        });
    let from = json!({"id": FakeTelegram::BOT_ID, "is_bot": true, "first_name": "Opsloop Test",
        "username": FakeTelegram::BOT_USERNAME});
    let mut v = json!({"message_id": s.message_id, "from": from, "date": s.date, "text": s.text,
        "chat": chat_json(&chat, st.users.get(&chat_id))});
    // Telegram shows only inline keyboards in a message (not force_reply).
    if let Some(m) = s
        .reply_markup
        .as_ref()
        .filter(|m| m.get("inline_keyboard").is_some())
    {
        v["reply_markup"] = m.clone();
    }
    if s.edits > 0 {
        v["edit_date"] = json!(now());
    }
    v
}

/// `Ok(result)` or `Err((status, error body))`.
type Reply = Result<Value, (u16, Value)>;

fn fail<T>(code: u16, description: &str) -> Result<T, (u16, Value)> {
    let body = json!({"ok": false, "error_code": code, "description": description});
    Err((code, body))
}

fn fault_reply(fault: &Fault) -> Reply {
    match fault {
        Fault::TooManyRequests { retry_after: n } => {
            fail(429, &format!("Too Many Requests: retry after {n}")).map_err(|(c, mut v)| {
                v["parameters"] = json!({ "retry_after": n });
                (c, v)
            })
        }
        Fault::Conflict => fail(409, CONFLICT),
        Fault::Api { code, description } => fail(*code, description),
        _ => fail(500, "Internal Server Error"),
    }
}

fn int(p: &Value, key: &str) -> Option<i64> {
    match p.get(key)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn string(p: &Value, key: &str) -> Option<String> {
    match p.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        v => Some(v.to_string()),
    }
}

/// A JSON-valued parameter (nested in JSON bodies, a JSON string in form bodies).
fn json_param(p: &Value, key: &str) -> Option<Value> {
    match p.get(key)? {
        Value::String(s) => serde_json::from_str(s).ok(),
        Value::Null => None,
        v => Some(v.clone()),
    }
}

fn params(headers: &HeaderMap, body: &[u8]) -> Value {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let is_form = ct
        .unwrap_or("")
        .starts_with("application/x-www-form-urlencoded");
    if is_form && let Ok(mut url) = reqwest::Url::parse("http://x/") {
        url.set_query(Some(&String::from_utf8_lossy(body)));
        let pairs = url
            .query_pairs()
            .map(|(k, v)| (k.into(), Value::String(v.into())));
        return Value::Object(pairs.collect());
    }
    let parsed = serde_json::from_slice::<Value>(body).ok();
    Value::Object(
        parsed
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default(),
    )
}

const TAGS: &str =
    "b strong i em u ins s strike del a code pre tg-spoiler span blockquote tg-emoji";

/// Checks Telegram HTML like the real API (supported, balanced tags; `<` must be escaped)
/// and returns the visible length as Telegram counts it: UTF-16 code units.
fn html_len(s: &str) -> Result<usize, String> {
    let (mut n, mut i, mut open) = (0, 0, Vec::<&str>::new());
    while let Some(c) = s[i..].chars().next() {
        if c == '<' {
            let end = s[i..]
                .find('>')
                .ok_or(format!("Can't find end of the tag at byte offset {i}"))?;
            let tag = &s[i + 1..i + end];
            if let Some(name) = tag.strip_prefix('/').map(str::trim) {
                if open.pop() != Some(name) {
                    return Err(format!(
                        "Unmatched end tag \"</{name}>\" at byte offset {i}"
                    ));
                }
            } else {
                let name = tag.split_whitespace().next().unwrap_or("");
                if !TAGS.split(' ').any(|t| t == name) {
                    return Err(format!(
                        "Unsupported start tag \"{name}\" at byte offset {i}"
                    ));
                }
                open.push(name);
            }
            i += end + 1;
            continue;
        }
        let entity = s[i..]
            .find(';')
            .filter(|j| c == '&' && *j <= 10)
            .filter(|j| {
                let e = &s[i + 1..i + j];
                let num = |d: &str, radix| !d.is_empty() && u32::from_str_radix(d, radix).is_ok();
                matches!(e, "lt" | "gt" | "amp" | "quot")
                    || e.strip_prefix("#x").is_some_and(|d| num(d, 16))
                    || e.strip_prefix('#').is_some_and(|d| num(d, 10))
            });
        n += match entity {
            Some(j) => decoded_entity(&s[i + 1..i + j]).map_or(1, char::len_utf16),
            None => c.len_utf16(),
        };
        i += entity.map_or(c.len_utf8(), |j| j + 1);
    }
    match open.pop() {
        Some(tag) => Err(format!(
            "Can't find end tag corresponding to start tag \"{tag}\""
        )),
        None => Ok(n),
    }
}

fn decoded_entity(e: &str) -> Option<char> {
    let code = match e.strip_prefix("#x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
        None => e.strip_prefix('#')?.parse().ok()?,
    };
    char::from_u32(code)
}

/// Validates text, parse_mode and reply_markup like the real API; returns the keyboard
/// (`None` when absent or empty).
fn check_content(
    p: &Value,
    text: &str,
    parse_mode: Option<&str>,
) -> Result<Option<Value>, (u16, Value)> {
    let len = match parse_mode.map(str::to_ascii_lowercase).as_deref() {
        Some("html") => match html_len(text) {
            Ok(n) => n,
            Err(e) => return fail(400, &format!("Bad Request: can't parse entities: {e}")),
        },
        _ => text.encode_utf16().count(),
    };
    if text.trim().is_empty() || len == 0 {
        return fail(400, "Bad Request: message text is empty");
    }
    if len > 4096 {
        return fail(400, "Bad Request: message is too long");
    }
    let markup = json_param(p, "reply_markup");
    let rows = markup
        .as_ref()
        .and_then(|m| m["inline_keyboard"].as_array());
    let buttons: Vec<&Value> = rows
        .into_iter()
        .flatten()
        .filter_map(Value::as_array)
        .flatten()
        .collect();
    let bad_data = |b: &&Value| {
        b["callback_data"]
            .as_str()
            .is_some_and(|d| d.is_empty() || d.len() > 64)
    };
    if buttons.iter().any(bad_data) {
        return fail(400, "Bad Request: BUTTON_DATA_INVALID");
    }
    let no_buttons = buttons.is_empty();
    Ok(markup.filter(|m| m.get("inline_keyboard").is_none() || !no_buttons))
}

fn dispatch(sh: &Shared, method: &str, p: &Value) -> Reply {
    let mut st = sh.lock();
    let key = (
        int(p, "chat_id").unwrap_or(0),
        int(p, "message_id").unwrap_or(0),
    );
    match method {
        "getme" => Ok(
            json!({"id": FakeTelegram::BOT_ID, "is_bot": true, "first_name": "Opsloop Test",
            "username": FakeTelegram::BOT_USERNAME, "can_join_groups": true, "can_read_all_group_messages": false,
            "supports_inline_queries": false, "can_connect_to_business": false, "has_main_web_app": false}),
        ),
        "sendmessage" => {
            let chat_id = key.0;
            if chat_id == 0 {
                return fail(400, "Bad Request: chat not found");
            }
            if chat_id > 0 && !st.chats.contains_key(&chat_id) {
                return fail(
                    403,
                    "Forbidden: bot can't initiate conversation with a user",
                );
            }
            let (text, parse_mode) = (
                string(p, "text").unwrap_or_default(),
                string(p, "parse_mode"),
            );
            let reply_markup = check_content(p, &text, parse_mode.as_deref())?;
            let (message_id, date) = (next_msg_id(&mut st, chat_id), now());
            let s = Sent {
                message_id,
                text,
                reply_markup,
                parse_mode,
                edits: 0,
                date,
            };
            let v = message_json(&st, chat_id, &s);
            st.sent.insert((chat_id, message_id), s);
            Ok(v)
        }
        "editmessagetext" | "editmessagereplymarkup" => {
            let Some(old) = st.sent.get(&key).cloned() else {
                return fail(400, "Bad Request: message to edit not found");
            };
            let (text, parse_mode) = match method {
                "editmessagetext" => (
                    string(p, "text").unwrap_or_default(),
                    string(p, "parse_mode"),
                ),
                _ => (old.text.clone(), old.parse_mode.clone()),
            };
            let reply_markup = check_content(p, &text, parse_mode.as_deref())?;
            if text == old.text && reply_markup == old.reply_markup {
                return fail(400, NOT_MODIFIED);
            }
            let edits = old.edits + 1;
            let s = Sent {
                text,
                reply_markup,
                parse_mode,
                edits,
                ..old
            };
            let v = message_json(&st, key.0, &s);
            st.sent.insert(key, s);
            Ok(v)
        }
        "deletemessage" => match st.sent.remove(&key) {
            Some(_) => Ok(json!(true)),
            None => fail(400, "Bad Request: message to delete not found"),
        },
        "answercallbackquery" => {
            let id = string(p, "callback_query_id").unwrap_or_default();
            if !st.callbacks.contains(&id) {
                let d = "Bad Request: query is too old and response timeout expired or query id is invalid";
                return fail(400, d);
            }
            st.answers.push((id, string(p, "text")));
            Ok(json!(true))
        }
        "setmycommands" => {
            st.commands = json_param(p, "commands").unwrap_or(json!([]));
            Ok(json!(true))
        }
        "deletewebhook" => Ok(json!(true)),
        "getwebhookinfo" => {
            let pending = st.updates.len();
            Ok(json!({"url": "", "has_custom_certificate": false, "pending_update_count": pending}))
        }
        _ => fail(404, "Not Found: method not found"),
    }
}

/// Long poll: confirms updates below `offset`, then answers as soon as there are
/// updates or after `timeout` s (≤ 30). A newer getUpdates ends it with 409, like Telegram.
async fn get_updates(sh: &Shared, p: &Value) -> Reply {
    let limit = int(p, "limit").unwrap_or(100).clamp(1, 100) as usize;
    let timeout = int(p, "timeout").unwrap_or(0).clamp(0, 30) as u64;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let my_gen = {
        let mut st = sh.lock();
        if let Some(offset) = int(p, "offset") {
            st.updates.retain(|(id, _)| *id >= offset);
        }
        st.poll_gen += 1;
        st.poll_gen
    };
    sh.notify.notify_waiters();
    loop {
        let notified = sh.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let st = sh.lock();
            if st.poll_gen != my_gen {
                return fail(409, CONFLICT);
            }
            let updates: Vec<Value> = st
                .updates
                .iter()
                .take(limit)
                .map(|(_, u)| u.clone())
                .collect();
            if !updates.is_empty() || Instant::now() >= deadline {
                return Ok(Value::Array(updates));
            }
        }
        let _ = tokio::time::timeout_at(deadline.into(), notified).await;
    }
}

fn take_fault(st: &mut St, method: &str) -> Option<Fault> {
    for m in [method, "*"] {
        if let Some(i) = st.once.iter().position(|(fm, n, _)| fm == m && *n > 0) {
            st.once[i].1 -= 1;
            let fault = st.once[i].2.clone();
            st.once.retain(|(_, n, _)| *n > 0);
            return Some(fault);
        }
    }
    let fault = st.persistent.get(method).or_else(|| st.persistent.get("*"));
    fault.cloned()
}

async fn handle(
    State(sh): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path((token, method)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (method, body, at) = (
        method.to_ascii_lowercase(),
        params(&headers, &body),
        Instant::now(),
    );
    let token_ok = token.strip_prefix("bot") == Some(TOKEN);
    let (idx, fault) = {
        let mut st = sh.lock();
        let fault = if token_ok {
            take_fault(&mut st, &method)
        } else {
            None
        };
        let (method, body, status) = (method.clone(), body.clone(), 0);
        st.requests.push(Request {
            method,
            body,
            at,
            status,
        });
        (st.requests.len() - 1, fault)
    };
    let stalled = token_ok
        && int(&body, "chat_id").is_some_and(|chat| sh.lock().stalled_chats.contains(&chat));
    if stalled {
        let half = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
            b"{\"ok\":true,\"result\":{\"message_id\":",
        ))]);
        let body = axum::body::Body::from_stream(futures::StreamExt::chain(
            half,
            futures::stream::pending(),
        ));
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(body)
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    if fault == Some(Fault::Drop) {
        drop_connection(conn);
        return StatusCode::OK.into_response();
    }
    if let Some(Fault::Slow(d)) = fault {
        tokio::time::sleep(d).await;
    }
    let reply = match fault {
        _ if !token_ok => fail(401, "Unauthorized"),
        Some(Fault::LoseResponse) => {
            let _ = dispatch(&sh, &method, &body);
            drop_connection(conn);
            return StatusCode::OK.into_response();
        }
        Some(ref f) if !matches!(f, Fault::Slow(_)) => fault_reply(f),
        _ if method == "getupdates" => get_updates(&sh, &body).await,
        _ => dispatch(&sh, &method, &body),
    };
    let (status, v) = reply.map_or_else(|e| e, |r| (200, json!({"ok": true, "result": r})));
    sh.lock().requests[idx].status = status;
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(v)).into_response()
}

/// The connection's socket, so `Fault::Drop` can close it without answering (unix only).
#[derive(Clone, Copy)]
struct Conn(RawFd);

impl Connected<IncomingStream<'_, TcpListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Conn(stream.io().as_raw_fd())
    }
}

fn drop_connection(conn: Conn) {
    // SAFETY: the fd is the live connection serving the current request (hyper keeps it open
    // until this handler returns); ManuallyDrop never closes it; shutdown just ends the stream.
    let stream = ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(conn.0) });
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
