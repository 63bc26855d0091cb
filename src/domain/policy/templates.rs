//! `[templates.NAME]`: risk, params and steps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use regex::Regex;

use super::read::{self, Ctx, Fields, Val};
use super::talk::{Steps, ask, condition};
use super::{
    MAX_PRIORITY, MIN_PRIORITY, PRIORITY_PARAM, ParamSpec, Risk, StepTemplate, Template,
    TemplateName,
};
use crate::domain::steps::{StepKind, StepSpec};

pub(super) const ANCHOR_START: &str = "^(?:";
pub(super) const ANCHOR_END: &str = ")$";

/// Every template key seen (even a broken one), with its params (`None` when the
/// param's own spec is broken), so cross references do not cascade into noise.
pub(super) type Known = BTreeMap<String, BTreeMap<String, Option<ParamSpec>>>;

#[derive(Default)]
pub(super) struct Parsed {
    pub templates: BTreeMap<TemplateName, Template>,
    pub known: Known,
}

/// Compile a param pattern so that it must match the whole value.
pub(super) fn compile_anchored(source: &str) -> Result<Regex, String> {
    // Compile it alone first: `a)(b` would otherwise slip through the wrapping group.
    Regex::new(source).map_err(|e| regex_error(source, e))?;
    Regex::new(&format!("{ANCHOR_START}{source}{ANCHOR_END}")).map_err(|e| regex_error(source, e))
}

fn regex_error(source: &str, e: regex::Error) -> String {
    let why = match &e {
        regex::Error::Syntax(s) => s
            .lines()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or_else(|| s.lines().last().unwrap_or("syntax error"))
            .to_string(),
        regex::Error::CompiledTooBig(_) => "pattern too big".to_string(),
        other => other.to_string(),
    };
    format!("invalid regex {source:?}: {why}")
}

pub(super) fn unknown_template(name: &str, known: &Known) -> String {
    let names: Vec<&str> = known.keys().map(String::as_str).collect();
    match read::closest(name, &names) {
        Some(near) => format!("unknown template {name:?} (did you mean {near}?)"),
        None if names.is_empty() => format!("unknown template {name:?} (no templates defined)"),
        None => format!("unknown template {name:?} (defined: {})", names.join(", ")),
    }
}

fn valid_param_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

pub(super) fn valid_event_kind(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && s.len() <= 64
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
}

pub(super) fn templates(ctx: &mut Ctx, v: &Val) -> Parsed {
    let mut out = Parsed::default();
    let Some(table) = v.get_ref().as_table() else {
        read::type_error(ctx, v, "templates", "a table of templates");
        return out;
    };
    for (key, value) in table.iter() {
        let key_str: &str = key.get_ref();
        let path = read::child("templates", key_str);
        let name = TemplateName::parse(key_str)
            .map_err(|e| ctx.problem(&key.span(), &path, e))
            .ok();
        let mut params = BTreeMap::new();
        let template = template(ctx, value, &path, name, &mut params);
        out.known.insert(key_str.to_string(), params);
        if let Some(t) = template {
            out.templates.insert(t.name.clone(), t);
        }
    }
    out
}

fn template(
    ctx: &mut Ctx,
    v: &Val,
    path: &str,
    name: Option<TemplateName>,
    params: &mut BTreeMap<String, Option<ParamSpec>>,
) -> Option<Template> {
    let known = ["description", "risk", "priority", "params", "steps"];
    let f = Fields::new(ctx, v, path, &known)?;
    let description = f.string(ctx, "description").unwrap_or_default();
    let priority = match f.get("priority") {
        None => Some(0),
        Some(pv) => priority(ctx, pv, &f.path("priority")),
    };
    let risk = f.required(ctx, "risk").and_then(|rv| {
        let path = f.path("risk");
        let s = read::string(ctx, rv, &path)?;
        s.parse::<Risk>()
            .map_err(|e| ctx.problem(&rv.span(), &path, e))
            .ok()
    });
    if let Some(pv) = f.get("params") {
        param_table(ctx, pv, &f.path("params"), params);
    }
    let steps = match f.required(ctx, "steps") {
        Some(sv) => steps(ctx, sv, &f.path("steps"), params),
        None => Vec::new(),
    };
    Some(Template {
        name: name?,
        description,
        risk: risk?,
        priority: priority?,
        params: params
            .iter()
            .filter_map(|(k, s)| Some((k.clone(), s.clone()?)))
            .collect(),
        steps,
    })
}

fn param_table(ctx: &mut Ctx, v: &Val, path: &str, out: &mut BTreeMap<String, Option<ParamSpec>>) {
    let Some(table) = v.get_ref().as_table() else {
        read::type_error(ctx, v, path, "a table of params");
        return;
    };
    for (key, value) in table.iter() {
        let name: &str = key.get_ref();
        let path = read::child(path, name);
        if !valid_param_name(name) {
            let message = format!("invalid param name {name:?} (lowercase letter, then a-z 0-9 _)");
            ctx.problem(&key.span(), &path, message);
        } else if name == PRIORITY_PARAM {
            let message =
                "priority is not a valid param name: `priority=N` sets a proposal's priority";
            ctx.problem(&key.span(), &path, message);
        }
        let spec = param(ctx, value, &path);
        out.insert(name.to_string(), spec);
    }
}

/// A template's priority: an integer from -100 to 100.
fn priority(ctx: &mut Ctx, v: &Val, path: &str) -> Option<i32> {
    let n = read::integer(ctx, v, path)?;
    match i32::try_from(n) {
        Ok(n) if (MIN_PRIORITY..=MAX_PRIORITY).contains(&n) => Some(n),
        _ => {
            let message = format!("{n} is out of range ({MIN_PRIORITY}..={MAX_PRIORITY})");
            ctx.problem(&v.span(), path, message);
            None
        }
    }
}

fn param(ctx: &mut Ctx, v: &Val, path: &str) -> Option<ParamSpec> {
    let f = Fields::new(ctx, v, path, &["pattern", "help", "default"])?;
    let help = f.string(ctx, "help").unwrap_or_default();
    let default = f.string(ctx, "default");
    let pv = f.required(ctx, "pattern")?;
    let source = read::string(ctx, pv, &f.path("pattern"))?;
    let pattern = compile_anchored(&source)
        .map_err(|e| ctx.problem(&pv.span(), &f.path("pattern"), e))
        .ok()?;
    let spec = ParamSpec {
        pattern,
        help,
        default,
    };
    if let (Some(d), Some(dv)) = (&spec.default, f.get("default"))
        && !spec.matches(d)
    {
        let message = format!("default {d:?} does not match {}", spec.pattern_source());
        ctx.problem(&dv.span(), &f.path("default"), message);
    }
    Some(spec)
}

fn steps(
    ctx: &mut Ctx,
    v: &Val,
    path: &str,
    params: &BTreeMap<String, Option<ParamSpec>>,
) -> Vec<StepTemplate> {
    let Some(items) = read::array(ctx, v, path) else {
        return Vec::new();
    };
    if items.is_empty() {
        ctx.problem(&v.span(), path, "a template needs at least one step");
    }
    let mut names = BTreeSet::new();
    // Every step's name, in order (a broken step's too), so references are checked
    // against the steps before each one.
    let order: Vec<Option<String>> = items
        .iter()
        .map(|item| {
            item.get_ref()
                .as_table()
                .and_then(|t| t.get("name"))
                .and_then(|n| n.get_ref().as_str())
                .map(str::to_string)
        })
        .collect();
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let earlier: Vec<&str> = order[..i].iter().flatten().map(String::as_str).collect();
            let all: Vec<&str> = order.iter().flatten().map(String::as_str).collect();
            let steps = Steps {
                earlier: &earlier,
                all: &all,
            };
            step(
                ctx,
                item,
                &format!("{path}[{i}]"),
                params,
                &mut names,
                &steps,
            )
        })
        .collect()
}

const COMMON: &[&str] = &["name", "kind", "max_attempts", "when"];
const ASK: &[&str] = &["question", "choices", "reply", "timeout", "default", "to"];
const SHELL: &[&str] = &["run", "cwd", "env", "timeout"];
const HTTP: &[&str] = &[
    "method", "url", "headers", "json", "body", "expect", "timeout",
];
const SLEEP: &[&str] = &["for"];
const EMIT: &[&str] = &["event", "payload"];
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];

fn step(
    ctx: &mut Ctx,
    v: &Val,
    path: &str,
    params: &BTreeMap<String, Option<ParamSpec>>,
    names: &mut BTreeSet<String>,
    steps: &Steps,
) -> Option<StepTemplate> {
    let Some(table) = v.get_ref().as_table() else {
        read::type_error(ctx, v, path, "a table (one step)");
        return None;
    };
    let kind = match table.get("kind") {
        None => {
            ctx.problem(&v.span(), &read::child(path, "kind"), "missing key kind");
            None
        }
        Some(kv) => {
            let kpath = read::child(path, "kind");
            read::string(ctx, kv, &kpath).and_then(|s| {
                let kind = StepKind::parse(&s);
                if kind.is_none() {
                    let message = format!(
                        "unknown step kind {s:?} (expected shell, http, sleep, noop, emit or ask)"
                    );
                    ctx.problem(&kv.span(), &kpath, message);
                }
                kind
            })
        }
    };
    let extra: Vec<&str> = match kind {
        Some(StepKind::Shell) => SHELL.to_vec(),
        Some(StepKind::Http) => HTTP.to_vec(),
        Some(StepKind::Sleep) => SLEEP.to_vec(),
        Some(StepKind::Noop) => Vec::new(),
        Some(StepKind::Emit) => EMIT.to_vec(),
        Some(StepKind::Ask) => ASK.to_vec(),
        // Unknown kind: accept every step key rather than pile up noise.
        None => [SHELL, HTTP, SLEEP, EMIT, ASK].concat(),
    };
    let known = [COMMON, &extra].concat();
    let f = Fields::new(ctx, v, path, &known)?;
    let name = f.required(ctx, "name").and_then(|nv| {
        let npath = f.path("name");
        let name = read::string(ctx, nv, &npath)?;
        if name.trim().is_empty() || name.len() > 64 {
            ctx.problem(&nv.span(), &npath, "step name must be 1 to 64 characters");
        } else if !names.insert(name.clone()) {
            let message = format!("duplicate step name {name:?}");
            ctx.problem(&nv.span(), &npath, message);
        }
        Some(name)
    });
    let max_attempts = f.u32_in(ctx, "max_attempts", 1, 1000);
    let spec = match kind? {
        StepKind::Shell => shell(ctx, &f)?,
        StepKind::Http => http(ctx, &f)?,
        StepKind::Sleep => StepSpec::Sleep {
            for_ms: millis(
                f.required(ctx, "for")
                    .and_then(|d| read::duration(ctx, d, &f.path("for")))?,
            ),
        },
        StepKind::Noop => StepSpec::Noop,
        StepKind::Emit => emit(ctx, &f)?,
        StepKind::Ask => ask(ctx, &f)?,
    };
    let name = name?;
    let when = f
        .get("when")
        .and_then(|wv| condition(ctx, wv, &f.path("when"), steps, &name));
    for r in spec.references() {
        if let Some(message) = steps.refusal(&r, &name) {
            let needle = format!("{{{r}}}");
            let span = match ctx.text(&f.span).find(&needle) {
                Some(i) => f.span.start + i..f.span.start + i + needle.len(),
                None => f.span.clone(),
            };
            ctx.problem(&span, path, message);
        }
    }
    for p in spec.placeholders() {
        if !params.contains_key(&p) {
            let needle = format!("{{{p}}}");
            let span = match ctx.text(&f.span).find(&needle) {
                Some(i) => f.span.start + i..f.span.start + i + needle.len(),
                None => f.span.clone(),
            };
            ctx.problem(
                &span,
                path,
                format!("step {name} uses undeclared param {needle}"),
            );
        }
    }
    Some(StepTemplate {
        name,
        spec,
        max_attempts,
        when,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn timeout(ctx: &mut Ctx, f: &Fields) -> Option<u64> {
    f.duration(ctx, "timeout", Duration::from_millis(1))
        .map(millis)
}

fn shell(ctx: &mut Ctx, f: &Fields) -> Option<StepSpec> {
    let cwd = f.string(ctx, "cwd");
    let env = f
        .get("env")
        .and_then(|v| read::string_map(ctx, v, &f.path("env")))
        .unwrap_or_default();
    let timeout_ms = timeout(ctx, f);
    let rv = f.required(ctx, "run")?;
    let run: Vec<String> = read::strings(ctx, rv, &f.path("run"))?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    if run.first().is_none_or(|p| p.is_empty()) {
        let message = "run must be a non-empty argv array, e.g. [\"./deploy.sh\", \"{tag}\"]";
        ctx.problem(&rv.span(), &f.path("run"), message);
    }
    Some(StepSpec::Shell {
        run,
        cwd,
        env,
        timeout_ms,
    })
}

fn http(ctx: &mut Ctx, f: &Fields) -> Option<StepSpec> {
    let headers = f
        .get("headers")
        .and_then(|v| read::string_map(ctx, v, &f.path("headers")))
        .unwrap_or_default();
    let json = f
        .get("json")
        .and_then(|v| read::json(ctx, v, &f.path("json")));
    let body = f.string(ctx, "body");
    if let (Some(_), Some(bv)) = (f.get("json"), f.get("body")) {
        ctx.problem(&bv.span(), &f.path("body"), "set json or body, not both");
    }
    let mut expect = Vec::new();
    if let Some(ev) = f.get("expect") {
        let path = f.path("expect");
        for (i, item) in read::array(ctx, ev, &path)
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(n) = read::u32_in(ctx, item, &format!("{path}[{i}]"), 100, 599) {
                expect.push(u16::try_from(n).unwrap_or(599));
            }
        }
    }
    let timeout_ms = timeout(ctx, f);
    let method = f.required(ctx, "method").and_then(|mv| {
        let path = f.path("method");
        let m = read::string(ctx, mv, &path)?.to_ascii_uppercase();
        if !METHODS.contains(&m.as_str()) {
            let message = format!(
                "unknown HTTP method {m:?} (expected GET, POST, PUT, PATCH, DELETE or HEAD)"
            );
            ctx.problem(&mv.span(), &path, message);
        }
        Some(m)
    });
    let url = f.required(ctx, "url").and_then(|uv| {
        let path = f.path("url");
        let url = read::string(ctx, uv, &path)?;
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            let message = format!("url {url:?} must start with http:// or https://");
            ctx.problem(&uv.span(), &path, message);
        }
        Some(url)
    });
    Some(StepSpec::Http {
        method: method?,
        url: url?,
        headers,
        json,
        body,
        expect,
        timeout_ms,
    })
}

fn emit(ctx: &mut Ctx, f: &Fields) -> Option<StepSpec> {
    let payload = match f.get("payload") {
        Some(pv) => serde_json::Value::Object(read::json_object(ctx, pv, &f.path("payload"))?),
        None => serde_json::Value::Object(serde_json::Map::new()),
    };
    let ev = f.required(ctx, "event")?;
    let path = f.path("event");
    let event = read::string(ctx, ev, &path)?;
    if !valid_event_kind(&event) {
        let message =
            format!("invalid event kind {event:?} (lowercase letter, then a-z 0-9 _ . -)");
        ctx.problem(&ev.span(), &path, message);
    }
    Some(StepSpec::Emit { event, payload })
}
