//! The policy file (docs/policy.md): parsing with every problem located, and the typed
//! policy the daemon runs on.
//!
//! `parse` walks the spanned TOML tree by hand so that one pass reports every problem
//! (unknown keys, wrong types, bad durations, regexes, crons, cross references), each
//! with its line, column and dotted path.
//!
//! Long because it holds the policy's types, one per section, side by side: the parser
//! (`read`, `sections`, `templates`, `rules`) is already split out.

mod budgets;
mod read;
mod rules;
mod sections;
mod talk;
mod templates;
#[cfg(test)]
mod tests;
mod usage;

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::steps::StepSpec;
use crate::domain::vocab::EventKind;

pub use budgets::{Budget, DEFAULT_WARN_AT};
pub use rules::payload_contains;

/// One problem in a policy file, located at the offending key or value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Dotted path, e.g. `templates.deploy.steps[1].url`; empty for syntax errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: ", self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Problem {}

impl Problem {
    /// `file:line:col: path: message`, as compilers print it, so editors can jump there.
    pub fn located(&self, file: &std::path::Path) -> String {
        format!(
            "{}:{}:{}: {}: {}",
            file.display(),
            self.line,
            self.column,
            self.path,
            self.message
        )
    }
}

/// Parse and validate a policy file. On failure, every problem found, in source order.
pub fn parse(source: &str) -> Result<Policy, Vec<Problem>> {
    let mut ctx = read::Ctx::new(source);
    let (root, errors) = toml::de::DeTable::parse_recoverable(source);
    if !errors.is_empty() {
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_string();
            ctx.problem(&span, "", message);
        }
        return Err(finish(ctx.problems));
    }
    let root = toml::Spanned::new(root.span(), toml::de::DeValue::Table(root.into_inner()));
    let policy = build(&mut ctx, &root);
    if ctx.problems.is_empty() {
        Ok(policy)
    } else {
        Err(finish(ctx.problems))
    }
}

fn finish(mut problems: Vec<Problem>) -> Vec<Problem> {
    problems.sort_by_key(|p| (p.line, p.column));
    problems.dedup();
    problems
}

const SECTIONS: &[&str] = &[
    "approval",
    "gates",
    "worker",
    "heartbeat",
    "notify",
    "retention",
    "telegram",
    "templates",
    "reactions",
    "triggers",
    "budgets",
];

fn build(ctx: &mut read::Ctx, root: &read::Val) -> Policy {
    let mut policy = Policy::default();
    let Some(f) = read::Fields::new(ctx, root, "", SECTIONS) else {
        return policy;
    };
    let parsed = match f.get("templates") {
        Some(v) => templates::templates(ctx, v),
        None => templates::Parsed::default(),
    };
    if let Some(v) = f.get("approval") {
        policy.approval = sections::approval(ctx, v);
    }
    if let Some(v) = f.get("gates") {
        policy.gates = sections::gates(ctx, v, &parsed.known);
    }
    if let Some(v) = f.get("worker") {
        policy.worker = sections::worker(ctx, v);
    }
    if let Some(v) = f.get("heartbeat") {
        policy.heartbeat = sections::heartbeat(ctx, v);
    }
    if let Some(v) = f.get("notify") {
        policy.notify = sections::notify(ctx, v);
    }
    if let Some(v) = f.get("retention") {
        policy.retention = sections::retention(ctx, v);
    }
    if let Some(v) = f.get("telegram") {
        policy.telegram = sections::telegram(ctx, v);
    }
    if let Some(v) = f.get("reactions") {
        policy.reactions = rules::reactions(ctx, v, &parsed.known);
    }
    if let Some(v) = f.get("triggers") {
        policy.triggers = rules::triggers(ctx, v, &parsed.known);
    }
    if let Some(v) = f.get("budgets") {
        policy.budgets = budgets::budgets(ctx, v, &parsed.known);
    }
    policy.templates = parsed.templates;
    policy
}

/// `[telegram]`: how fast the bot may write (defaults: Telegram's limits) and how fast
/// each person may command it. Read when the daemon starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelegramPolicy {
    pub messages_per_second: u32,
    pub chat_messages_per_second: u32,
    pub group_messages_per_minute: u32,
    pub commands_per_minute: u32,
    pub command_burst: u32,
    pub proposals_per_minute: u32,
    pub proposal_burst: u32,
}

impl Default for TelegramPolicy {
    fn default() -> Self {
        TelegramPolicy {
            messages_per_second: 30,
            chat_messages_per_second: 1,
            group_messages_per_minute: 20,
            commands_per_minute: 30,
            command_burst: 10,
            proposals_per_minute: 6,
            proposal_burst: 3,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub approval: ApprovalPolicy,
    pub gates: GatesPolicy,
    pub worker: WorkerPolicy,
    pub heartbeat: HeartbeatPolicy,
    pub notify: NotifyPolicy,
    pub retention: RetentionPolicy,
    pub telegram: TelegramPolicy,
    pub templates: BTreeMap<TemplateName, Template>,
    pub reactions: Vec<Reaction>,
    pub triggers: Vec<Trigger>,
    /// `[budgets.NAME]`, by name.
    pub budgets: BTreeMap<String, Budget>,
}

impl Policy {
    pub fn template(&self, name: &str) -> Option<&Template> {
        self.templates.get(name)
    }

    /// Gates of one template (all `None` when the policy sets none).
    pub fn template_gates(&self, name: &str) -> TemplateGates {
        self.gates.templates.get(name).cloned().unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    Low,
    High,
    Red,
}

impl Risk {
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::High => "high",
            Risk::Red => "red",
        }
    }
}

impl FromStr for Risk {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "low" => Ok(Risk::Low),
            "high" => Ok(Risk::High),
            "red" => Ok(Risk::Red),
            _ => Err(format!("unknown risk {s:?} (expected low, high or red)")),
        }
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A template's name: `^[a-z][a-z0-9_-]{0,63}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateName(String);

impl TemplateName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut chars = s.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && s.len() <= 64
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if ok {
            Ok(TemplateName(s.to_string()))
        } else {
            Err(format!(
                "invalid template name {s:?} (lowercase letter, then up to 63 of a-z 0-9 _ -)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TemplateName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TemplateName::parse(&s)
    }
}

impl From<TemplateName> for String {
    fn from(n: TemplateName) -> String {
        n.0
    }
}

impl Borrow<str> for TemplateName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event kind with `*` wildcards; `*` matches any run of characters, dots included.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventPattern(String);

impl EventPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = (1..=64).contains(&s.len())
            && s.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '*' | '-')
            });
        if ok {
            Ok(EventPattern(s.to_string()))
        } else {
            Err(format!(
                "invalid event pattern {s:?} (1 to 64 of a-z 0-9 _ . - and * wildcards)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, kind: &str) -> bool {
        glob(self.0.as_bytes(), kind.as_bytes())
    }
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard match with single backtrack point: linear enough for 64 chars.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl TryFrom<String> for EventPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        EventPattern::parse(&s)
    }
}

impl From<EventPattern> for String {
    fn from(p: EventPattern) -> String {
        p.0
    }
}

impl fmt::Display for EventPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalPolicy {
    pub ttl: Duration,
    /// A proposal still pending (a question still open) after this long gets one
    /// reminder, a new message to the same chats.
    pub remind: Option<Duration>,
    pub auto_approve: Vec<Risk>,
    pub high: TierRule,
    pub red: TierRule,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        ApprovalPolicy {
            ttl: Duration::from_secs(24 * 3600),
            remind: None,
            auto_approve: vec![Risk::Low],
            high: TierRule::HIGH,
            red: TierRule::RED,
        }
    }
}

impl ApprovalPolicy {
    pub fn rule(&self, risk: Risk) -> TierRule {
        match risk {
            Risk::Low => TierRule::LOW,
            Risk::High => self.high,
            Risk::Red => self.red,
        }
    }

    pub fn auto_approves(&self, risk: Risk) -> bool {
        self.auto_approve.contains(&risk)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierRule {
    /// Distinct approvers needed, 1..=10.
    pub approvals: u32,
    /// Whether the proposer may be one of them.
    pub self_approval: bool,
}

impl TierRule {
    pub const LOW: TierRule = TierRule {
        approvals: 1,
        self_approval: true,
    };
    pub const HIGH: TierRule = TierRule {
        approvals: 1,
        self_approval: true,
    };
    pub const RED: TierRule = TierRule {
        approvals: 2,
        self_approval: false,
    };
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatesPolicy {
    pub max_pending: u32,
    /// Consecutive failed missions that pause a template; 0 = off.
    pub pause_after_failures: u32,
    pub templates: BTreeMap<TemplateName, TemplateGates>,
    /// By key name: limits on the proposals of `agent:NAME`.
    pub agents: BTreeMap<String, AgentGates>,
}

impl Default for GatesPolicy {
    fn default() -> Self {
        GatesPolicy {
            max_pending: 50,
            pause_after_failures: 2,
            templates: BTreeMap::new(),
            agents: BTreeMap::new(),
        }
    }
}

/// One agent's limits (design §11); people are not bound by them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentGates {
    /// Its proposals pending at once.
    pub max_pending: Option<u32>,
    /// Its proposals created per UTC day (those a gate refused do not count).
    pub daily_cap: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateGates {
    /// Missions per UTC day.
    pub daily_cap: Option<u32>,
    /// Since the last mission of this template.
    pub cooldown: Option<Duration>,
    pub max_running: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerPolicy {
    pub concurrency: u32,
    pub lease: Duration,
    pub max_attempts: u32,
    pub backoff: Backoff,
}

impl Default for WorkerPolicy {
    fn default() -> Self {
        WorkerPolicy {
            concurrency: 4,
            lease: Duration::from_secs(300),
            max_attempts: 3,
            backoff: Backoff::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// `min(base·2^(attempt-1), max)` without jitter; attempt counts from 1.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatPolicy {
    pub interval: Duration,
    pub event_batch: u32,
    pub reaction_batch: u32,
}

impl Default for HeartbeatPolicy {
    fn default() -> Self {
        HeartbeatPolicy {
            interval: Duration::from_secs(15),
            event_batch: 100,
            reaction_batch: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NotifyPolicy {
    pub chats: Vec<i64>,
    pub events: Vec<EventPattern>,
}

impl Default for NotifyPolicy {
    fn default() -> Self {
        let events = ["proposal.*", "mission.*", EventKind::StepFailed.as_str()];
        NotifyPolicy {
            chats: Vec::new(),
            events: events.iter().map(|e| EventPattern(e.to_string())).collect(),
        }
    }
}

impl NotifyPolicy {
    /// Whether an event kind is one people are notified of.
    pub fn wants(&self, kind: &str) -> bool {
        self.events.iter().any(|p| p.matches(kind))
    }
}

/// How long finished rows are kept; `None` = forever.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionPolicy {
    pub missions: Option<Duration>,
    pub events: Option<Duration>,
    pub reactions: Option<Duration>,
    pub action_runs: Option<Duration>,
    pub notifications: Option<Duration>,
    /// Rows deleted per statement.
    pub batch: u32,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            missions: None,
            events: None,
            reactions: None,
            action_runs: None,
            notifications: None,
            batch: 1000,
        }
    }
}

/// The range of priorities (design §12): higher is claimed first.
pub const MIN_PRIORITY: i32 = -100;
pub const MAX_PRIORITY: i32 = 100;
/// `priority=N` in a proposal (`/propose … priority=N`) sets its priority, so no
/// template may take a param of that name.
pub const PRIORITY_PARAM: &str = "priority";

#[derive(Debug, Clone)]
pub struct Template {
    pub name: TemplateName,
    pub description: String,
    pub risk: Risk,
    /// Its proposals' priority unless one overrides it (-100..=100, default 0).
    pub priority: i32,
    pub params: BTreeMap<String, ParamSpec>,
    pub steps: Vec<StepTemplate>,
}

/// A declared param. `pattern` is compiled anchored (`^(?:…)$`), so `is_match` is a
/// full match; `pattern_source()` gives the text as written.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub pattern: regex::Regex,
    pub help: String,
    /// No default: the param is required.
    pub default: Option<String>,
}

/// Compile a pattern that must match a whole value (params, answers to questions).
pub fn anchored_regex(source: &str) -> Result<regex::Regex, String> {
    templates::compile_anchored(source)
}

#[derive(Debug, Clone)]
pub struct StepTemplate {
    pub name: String,
    pub spec: StepSpec,
    /// Overrides `worker.max_attempts` for this step.
    pub max_attempts: Option<u32>,
    /// `when`: the step runs only if this holds over earlier outputs, else it is skipped.
    pub when: Option<crate::domain::outputs::Condition>,
}

#[derive(Debug, Clone)]
pub struct Reaction {
    pub name: String,
    pub on: EventPattern,
    /// Subset match on the event payload.
    pub r#where: serde_json::Map<String, serde_json::Value>,
    pub propose: TemplateName,
    /// Values may hold `{payload.a.b}`, `{kind}`, `{id}`, `{source}`.
    pub params: BTreeMap<String, String>,
    pub cooldown: Option<Duration>,
    /// 0..=1, default 1.
    pub probability: f64,
}

#[derive(Debug, Clone)]
pub struct Trigger {
    pub name: String,
    pub cron: croner::Cron,
    /// The cron expression as written.
    pub cron_source: String,
    pub tz: chrono_tz::Tz,
    pub propose: TemplateName,
    pub params: BTreeMap<String, String>,
}
