//! `[templates.NAME]`: risk, params and steps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use regex::Regex;

use super::read::{self, Ctx, Fields, Val};
use super::{ParamSpec, Risk, StepTemplate, Template, TemplateName};
use crate::domain::outputs::{self, Condition};
use crate::domain::steps::{StepKind, StepSpec};
use crate::domain::vocab::Audience;

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
    let known = ["description", "risk", "params", "steps"];
    let f = Fields::new(ctx, v, path, &known)?;
    let description = f.string(ctx, "description").unwrap_or_default();
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
        }
        let spec = param(ctx, value, &path);
        out.insert(name.to_string(), spec);
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

/// The step names a step may refer to (those before it) and all of them (to say
/// "later" rather than "unknown").
struct Steps<'a> {
    earlier: &'a [&'a str],
    all: &'a [&'a str],
}

impl Steps<'_> {
    /// Why `{inner}` (a `steps.NAME.KEY` reference) is not allowed in step `own`.
    fn refusal(&self, inner: &str, own: &str) -> Option<String> {
        if outputs::split_ref(inner, self.earlier).is_some() {
            return None;
        }
        let name = |names: &[&str]| outputs::split_ref(inner, names).map(|(n, _)| n.to_string());
        Some(match name(self.all) {
            Some(n) if n == own => format!("step {own} refers to its own output {{{inner}}}"),
            Some(n) => format!(
                "step {own} refers to {{{inner}}}, but step {n} runs later; only earlier steps' outputs exist"
            ),
            None => {
                let rest = inner.strip_prefix(outputs::REF_PREFIX).unwrap_or(inner);
                if rest.contains('.') {
                    format!(
                        "step {own} refers to {{{inner}}}: no earlier step has that name (steps before it: {})",
                        if self.earlier.is_empty() {
                            "none".to_string()
                        } else {
                            self.earlier.join(", ")
                        }
                    )
                } else {
                    format!("step {own}: {{{inner}}} needs the form {{steps.NAME.KEY}}")
                }
            }
        })
    }
}

const COMMON: &[&str] = &["name", "kind", "max_attempts", "when"];
const ASK: &[&str] = &["question", "choices", "reply", "timeout", "default", "to"];
/// Buttons in one message stay usable on a phone.
const MAX_CHOICES: usize = 20;
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

/// `when = { "steps.NAME.KEY" = value | [values] }`; values compare as text.
fn condition(ctx: &mut Ctx, v: &Val, path: &str, steps: &Steps, own: &str) -> Option<Condition> {
    let Some(table) = v.get_ref().as_table() else {
        read::type_error(
            ctx,
            v,
            path,
            "a table like { \"steps.NAME.KEY\" = \"value\" }",
        );
        return None;
    };
    if table.is_empty() {
        ctx.problem(
            &v.span(),
            path,
            "when needs at least one \"steps.NAME.KEY\" = value",
        );
        return None;
    }
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (key, value) in table.iter() {
        let reference: &str = key.get_ref();
        let kpath = read::child(path, reference);
        if let Some(message) = steps.refusal(reference, own) {
            ctx.problem(&key.span(), &kpath, message);
            ok = false;
        }
        let wanted = match read::json(ctx, value, &kpath) {
            Some(serde_json::Value::Array(items)) if !items.is_empty() => {
                items.iter().map(outputs::as_text).collect()
            }
            Some(serde_json::Value::Array(_)) => {
                ctx.problem(&value.span(), &kpath, "an empty list of values never holds");
                ok = false;
                Vec::new()
            }
            Some(serde_json::Value::Object(_)) => {
                read::type_error(ctx, value, &kpath, "a value or a list of values");
                ok = false;
                Vec::new()
            }
            Some(other) => vec![outputs::as_text(&other)],
            None => {
                ok = false;
                Vec::new()
            }
        };
        out.insert(reference.to_string(), wanted);
    }
    ok.then_some(Condition(out))
}

fn ask(ctx: &mut Ctx, f: &Fields) -> Option<StepSpec> {
    let question = f.required(ctx, "question").and_then(|qv| {
        let path = f.path("question");
        let q = read::string(ctx, qv, &path)?;
        if q.trim().is_empty() || q.chars().count() > 1000 {
            ctx.problem(&qv.span(), &path, "a question must be 1 to 1000 characters");
        }
        Some(q)
    });
    let mut choices = Vec::new();
    if let Some(cv) = f.get("choices") {
        let path = f.path("choices");
        let items = read::strings(ctx, cv, &path).unwrap_or_default();
        if items.is_empty() || items.len() > MAX_CHOICES {
            let message = format!("choices must list 1 to {MAX_CHOICES} answers");
            ctx.problem(&cv.span(), &path, message);
        }
        for (choice, span) in items {
            if choice.trim().is_empty() || choice.chars().count() > 64 {
                ctx.problem(&span, &path, "a choice must be 1 to 64 characters");
            } else if choices.contains(&choice) {
                let message = format!("choice {choice:?} is listed twice");
                ctx.problem(&span, &path, message);
            } else {
                choices.push(choice);
            }
        }
    }
    let (mut pattern, mut help, mut regex) = (None, None, None);
    if let Some(rv) = f.get("reply") {
        let path = f.path("reply");
        if let Some(rf) = Fields::new(ctx, rv, &path, &["pattern", "help"]) {
            help = rf.string(ctx, "help");
            if let Some(pv) = rf.required(ctx, "pattern") {
                let ppath = rf.path("pattern");
                if let Some(source) = read::string(ctx, pv, &ppath) {
                    match compile_anchored(&source) {
                        Ok(r) => regex = Some(r),
                        Err(e) => ctx.problem(&pv.span(), &ppath, e),
                    }
                    pattern = Some(source);
                }
            }
        }
    }
    match (f.get("choices"), f.get("reply")) {
        (Some(_), Some(rv)) => ctx.problem(
            &rv.span(),
            &f.path("reply"),
            "set choices or reply, not both",
        ),
        (None, None) => ctx.problem(
            &f.span,
            &f.path("choices"),
            "an ask step needs choices = [...] or reply = { pattern = '...' }",
        ),
        _ => {}
    }
    let timeout_ms = timeout(ctx, f);
    let to = f.get("to").and_then(|tv| {
        let path = f.path("to");
        let s = read::string(ctx, tv, &path)?;
        s.parse::<Audience>()
            .map_err(|_| {
                let message =
                    format!("unknown audience {s:?} (expected proposer, approvers or operators)");
                ctx.problem(&tv.span(), &path, message)
            })
            .ok()
    });
    let default = f.string(ctx, "default");
    if let (Some(d), Some(dv)) = (&default, f.get("default")) {
        let valid = if choices.is_empty() {
            regex.as_ref().is_none_or(|r| r.is_match(d))
        } else {
            choices.contains(d)
        };
        if !valid {
            let allowed = if choices.is_empty() {
                format!("it must match {}", pattern.as_deref().unwrap_or(""))
            } else {
                format!("it must be one of {}", choices.join(", "))
            };
            let message = format!("default {d:?} is not a valid answer: {allowed}");
            ctx.problem(&dv.span(), &f.path("default"), message);
        }
    }
    if default.is_some() && timeout_ms.is_none() {
        let message = "a default is given at the timeout: set timeout too";
        ctx.problem(&f.span, &f.path("default"), message);
    }
    Some(StepSpec::Ask {
        question: question?,
        choices,
        pattern,
        help,
        timeout_ms,
        default,
        to: to.unwrap_or(Audience::Approvers),
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn timeout(ctx: &mut Ctx, f: &Fields) -> Option<u64> {
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
