//! The plain sections: approval, gates, worker, heartbeat, notify, retention, telegram.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::domain::keys::KeyName;

use super::read::{self, Ctx, Fields, Val};
use super::templates::Known;
use super::{
    AgentGates, ApprovalPolicy, Backoff, EventPattern, GatesPolicy, HeartbeatPolicy, NotifyPolicy,
    RetentionPolicy, Risk, TelegramPolicy, TemplateGates, TemplateName, TierRule, WorkerPolicy,
};

const ZERO: Duration = Duration::ZERO;
const SECOND: Duration = Duration::from_secs(1);

pub(super) fn approval(ctx: &mut Ctx, v: &Val) -> ApprovalPolicy {
    let mut out = ApprovalPolicy::default();
    let known = ["ttl", "remind", "auto_approve", "high", "red"];
    let Some(f) = Fields::new(ctx, v, "approval", &known) else {
        return out;
    };
    if let Some(d) = f.duration(ctx, "ttl", SECOND) {
        out.ttl = d;
    }
    out.remind = f.duration(ctx, "remind", SECOND);
    if let Some(v) = f.get("auto_approve") {
        let path = f.path("auto_approve");
        if let Some(items) = read::strings(ctx, v, &path) {
            out.auto_approve.clear();
            for (i, (s, span)) in items.into_iter().enumerate() {
                match s.parse::<Risk>() {
                    Ok(r) if !out.auto_approve.contains(&r) => out.auto_approve.push(r),
                    Ok(_) => {}
                    Err(e) => ctx.problem(&span, &format!("{path}[{i}]"), e),
                }
            }
        }
    }
    if let Some(v) = f.get("high") {
        out.high = tier(ctx, v, &f.path("high"), TierRule::HIGH);
    }
    if let Some(v) = f.get("red") {
        out.red = tier(ctx, v, &f.path("red"), TierRule::RED);
    }
    out
}

fn tier(ctx: &mut Ctx, v: &Val, path: &str, default: TierRule) -> TierRule {
    let mut out = default;
    let Some(f) = Fields::new(ctx, v, path, &["approvals", "self_approval"]) else {
        return out;
    };
    if let Some(n) = f.u32_in(ctx, "approvals", 1, 10) {
        out.approvals = n;
    }
    if let Some(b) = f.boolean(ctx, "self_approval") {
        out.self_approval = b;
    }
    out
}

pub(super) fn gates(ctx: &mut Ctx, v: &Val, templates: &Known) -> GatesPolicy {
    let mut out = GatesPolicy::default();
    let known = ["max_pending", "pause_after_failures", "templates", "agents"];
    let Some(f) = Fields::new(ctx, v, "gates", &known) else {
        return out;
    };
    if let Some(n) = f.u32_in(ctx, "max_pending", 1, u32::MAX) {
        out.max_pending = n;
    }
    if let Some(n) = f.u32_in(ctx, "pause_after_failures", 0, u32::MAX) {
        out.pause_after_failures = n;
    }
    if let Some(v) = f.get("templates") {
        let path = f.path("templates");
        out.templates = template_gates(ctx, v, &path, templates);
    }
    if let Some(v) = f.get("agents") {
        let path = f.path("agents");
        out.agents = agent_gates(ctx, v, &path);
    }
    out
}

/// `[gates.agents.NAME]`: limits on the proposals of `agent:NAME` (design §11). The
/// names are key names; a key need not exist yet (keys live in the database).
fn agent_gates(ctx: &mut Ctx, v: &Val, path: &str) -> BTreeMap<String, AgentGates> {
    let mut out = BTreeMap::new();
    let Some(table) = v.get_ref().as_table() else {
        read::type_error(ctx, v, path, "a table of agents (key names)");
        return out;
    };
    for (key, value) in table.iter() {
        let name = key.get_ref().as_ref();
        let path = read::child(path, name);
        if let Err(e) = KeyName::parse(name) {
            ctx.problem(&key.span(), &path, e.to_string());
        }
        let known = ["max_pending", "daily_cap"];
        let Some(f) = Fields::new(ctx, value, &path, &known) else {
            continue;
        };
        let gates = AgentGates {
            max_pending: f.u32_in(ctx, "max_pending", 1, u32::MAX),
            daily_cap: f.u32_in(ctx, "daily_cap", 1, u32::MAX),
        };
        out.insert(name.to_string(), gates);
    }
    out
}

fn template_gates(
    ctx: &mut Ctx,
    v: &Val,
    path: &str,
    templates: &Known,
) -> BTreeMap<TemplateName, TemplateGates> {
    let mut out = BTreeMap::new();
    let Some(table) = v.get_ref().as_table() else {
        read::type_error(ctx, v, path, "a table of templates");
        return out;
    };
    for (key, value) in table.iter() {
        let name = key.get_ref().as_ref();
        let path = read::child(path, name);
        if !templates.contains_key(name) {
            let message = super::templates::unknown_template(name, templates);
            ctx.problem(&key.span(), &path, message);
        }
        let known = ["daily_cap", "cooldown", "max_running"];
        let Some(f) = Fields::new(ctx, value, &path, &known) else {
            continue;
        };
        let gates = TemplateGates {
            daily_cap: f.u32_in(ctx, "daily_cap", 1, u32::MAX),
            cooldown: f.duration(ctx, "cooldown", ZERO),
            max_running: f.u32_in(ctx, "max_running", 1, u32::MAX),
        };
        if let Ok(name) = TemplateName::parse(name) {
            out.insert(name, gates);
        }
    }
    out
}

pub(super) fn worker(ctx: &mut Ctx, v: &Val) -> WorkerPolicy {
    let mut out = WorkerPolicy::default();
    let known = ["concurrency", "lease", "max_attempts", "backoff"];
    let Some(f) = Fields::new(ctx, v, "worker", &known) else {
        return out;
    };
    if let Some(n) = f.u32_in(ctx, "concurrency", 1, 256) {
        out.concurrency = n;
    }
    if let Some(d) = f.duration(ctx, "lease", SECOND) {
        out.lease = d;
    }
    if let Some(n) = f.u32_in(ctx, "max_attempts", 1, 1000) {
        out.max_attempts = n;
    }
    if let Some(v) = f.get("backoff") {
        let path = f.path("backoff");
        if let Some(b) = Fields::new(ctx, v, &path, &["base", "max"]) {
            let base = b.duration(ctx, "base", ZERO);
            let max = b.duration(ctx, "max", ZERO);
            let backoff = Backoff {
                base: base.unwrap_or(out.backoff.base),
                max: max.unwrap_or(out.backoff.max),
            };
            if backoff.base > backoff.max {
                let message = format!(
                    "base ({}) is longer than max ({})",
                    humantime::format_duration(backoff.base),
                    humantime::format_duration(backoff.max)
                );
                ctx.problem(&b.span, &path, message);
            }
            out.backoff = backoff;
        }
    }
    out
}

pub(super) fn heartbeat(ctx: &mut Ctx, v: &Val) -> HeartbeatPolicy {
    let mut out = HeartbeatPolicy::default();
    let known = ["interval", "event_batch", "reaction_batch"];
    let Some(f) = Fields::new(ctx, v, "heartbeat", &known) else {
        return out;
    };
    if let Some(d) = f.duration(ctx, "interval", Duration::from_millis(10)) {
        out.interval = d;
    }
    if let Some(n) = f.u32_in(ctx, "event_batch", 1, 100_000) {
        out.event_batch = n;
    }
    if let Some(n) = f.u32_in(ctx, "reaction_batch", 1, 100_000) {
        out.reaction_batch = n;
    }
    out
}

pub(super) fn notify(ctx: &mut Ctx, v: &Val) -> NotifyPolicy {
    let mut out = NotifyPolicy::default();
    let Some(f) = Fields::new(ctx, v, "notify", &["chats", "events"]) else {
        return out;
    };
    if let Some(v) = f.get("chats") {
        let path = f.path("chats");
        if let Some(items) = read::array(ctx, v, &path) {
            out.chats = items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| read::integer(ctx, item, &format!("{path}[{i}]")))
                .collect();
        }
    }
    if let Some(v) = f.get("events") {
        let path = f.path("events");
        if let Some(items) = read::strings(ctx, v, &path) {
            out.events.clear();
            for (i, (s, span)) in items.into_iter().enumerate() {
                match EventPattern::parse(&s) {
                    Ok(p) => out.events.push(p),
                    Err(e) => ctx.problem(&span, &format!("{path}[{i}]"), e),
                }
            }
        }
    }
    out
}

pub(super) fn retention(ctx: &mut Ctx, v: &Val) -> RetentionPolicy {
    let mut out = RetentionPolicy::default();
    let known = [
        "missions",
        "events",
        "reactions",
        "action_runs",
        "notifications",
        "batch",
    ];
    let Some(f) = Fields::new(ctx, v, "retention", &known) else {
        return out;
    };
    out.missions = f.duration(ctx, "missions", SECOND);
    out.events = f.duration(ctx, "events", SECOND);
    out.reactions = f.duration(ctx, "reactions", SECOND);
    out.action_runs = f.duration(ctx, "action_runs", SECOND);
    out.notifications = f.duration(ctx, "notifications", SECOND);
    if let Some(n) = f.u32_in(ctx, "batch", 1, 1_000_000) {
        out.batch = n;
    }
    out
}

pub(super) fn telegram(ctx: &mut Ctx, v: &Val) -> TelegramPolicy {
    let mut out = TelegramPolicy::default();
    let known = [
        "messages_per_second",
        "chat_messages_per_second",
        "group_messages_per_minute",
        "commands_per_minute",
        "command_burst",
        "proposals_per_minute",
        "proposal_burst",
    ];
    let Some(f) = Fields::new(ctx, v, "telegram", &known) else {
        return out;
    };
    let fields: [(&str, &mut u32); 7] = [
        ("messages_per_second", &mut out.messages_per_second),
        (
            "chat_messages_per_second",
            &mut out.chat_messages_per_second,
        ),
        (
            "group_messages_per_minute",
            &mut out.group_messages_per_minute,
        ),
        ("commands_per_minute", &mut out.commands_per_minute),
        ("command_burst", &mut out.command_burst),
        ("proposals_per_minute", &mut out.proposals_per_minute),
        ("proposal_burst", &mut out.proposal_burst),
    ];
    for (key, slot) in fields {
        if let Some(n) = f.u32_in(ctx, key, 1, 10_000) {
            *slot = n;
        }
    }
    out
}
