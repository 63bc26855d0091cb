//! `[[reactions]]` and `[[triggers]]`, checked against the templates they propose.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use serde_json::Value;

use super::read::{self, Ctx, Entry, Fields, Val};
use super::templates::{Known, unknown_template};
use super::{EventPattern, ParamSpec, Reaction, TemplateName, Trigger};
use crate::domain::steps::placeholders_in;

/// Subset match: every key of `want` (recursively, for objects) is in `have` with an
/// equal value; other values must be equal.
pub fn payload_contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| payload_contains(hv, wv))),
        _ => have == want,
    }
}

/// The items of `reactions` / `triggers`: `[[reactions]]` or an inline array.
fn items<'a, 'i>(ctx: &mut Ctx, v: &'a Val<'i>, path: &str) -> &'a [Val<'i>] {
    read::array(ctx, v, path).unwrap_or_default()
}

/// A rule's `name`: required, non-empty, unique among its kind.
fn rule_name(ctx: &mut Ctx, f: &Fields, what: &str, seen: &mut BTreeSet<String>) -> Option<String> {
    let v = f.required(ctx, "name")?;
    let path = f.path("name");
    let name = read::string(ctx, v, &path)?;
    if name.trim().is_empty() || name.len() > 64 {
        ctx.problem(
            &v.span(),
            &path,
            format!("{what} name must be 1 to 64 characters"),
        );
    } else if !seen.insert(name.clone()) {
        ctx.problem(&v.span(), &path, format!("duplicate {what} name {name:?}"));
    }
    Some(name)
}

/// `propose`: a template that exists. Returns its name and declared params.
fn propose<'k>(
    ctx: &mut Ctx,
    f: &Fields,
    known: &'k Known,
) -> Option<(TemplateName, &'k BTreeMap<String, Option<ParamSpec>>)> {
    let v = f.required(ctx, "propose")?;
    let path = f.path("propose");
    let s = read::string(ctx, v, &path)?;
    let Some(params) = known.get(&s) else {
        ctx.problem(&v.span(), &path, unknown_template(&s, known));
        return None;
    };
    let name = TemplateName::parse(&s).ok()?;
    Some((name, params))
}

/// `params`: keys must be params of the template; `required` missing ones are reported.
fn params(
    ctx: &mut Ctx,
    f: &Fields,
    template: Option<&(TemplateName, &BTreeMap<String, Option<ParamSpec>>)>,
    rule: &str,
) -> Option<Vec<Entry>> {
    let entries = match f.get("params") {
        Some(v) => read::entries(ctx, v, &f.path("params"))?,
        None => Vec::new(),
    };
    let Some((tname, declared)) = template else {
        return Some(entries);
    };
    for e in &entries {
        if !declared.contains_key(&e.key) {
            let names: Vec<&str> = declared.keys().map(String::as_str).collect();
            let takes = if names.is_empty() {
                "no params".to_string()
            } else {
                names.join(", ")
            };
            let message = format!(
                "{} is not a param of template {tname} (it takes {takes})",
                e.key
            );
            ctx.problem(
                &e.key_span,
                &read::child(&f.path("params"), &e.key),
                message,
            );
        }
    }
    let span: Range<usize> = f.get("params").map_or(f.span.clone(), |v| v.span());
    for (name, spec) in declared.iter() {
        let required = spec.as_ref().is_some_and(ParamSpec::required);
        if required && !entries.iter().any(|e| &e.key == name) {
            let message = format!("{rule} does not set required param {name} of template {tname}");
            ctx.problem(&span, &f.path("params"), message);
        }
    }
    Some(entries)
}

const REACTION_KEYS: &[&str] = &[
    "name",
    "on",
    "where",
    "propose",
    "params",
    "cooldown",
    "probability",
];

pub(super) fn reactions(ctx: &mut Ctx, v: &Val, known: &Known) -> Vec<Reaction> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, item) in items(ctx, v, "reactions").iter().enumerate() {
        let path = format!("reactions[{i}]");
        if let Some(r) = reaction(ctx, item, &path, known, &mut seen) {
            out.push(r);
        }
    }
    out
}

fn reaction(
    ctx: &mut Ctx,
    v: &Val,
    path: &str,
    known: &Known,
    seen: &mut BTreeSet<String>,
) -> Option<Reaction> {
    let f = Fields::new(ctx, v, path, REACTION_KEYS)?;
    let name = rule_name(ctx, &f, "reaction", seen);
    let on = f.required(ctx, "on").and_then(|ov| {
        let p = f.path("on");
        let s = read::string(ctx, ov, &p)?;
        EventPattern::parse(&s)
            .map_err(|e| ctx.problem(&ov.span(), &p, e))
            .ok()
    });
    let r#where = match f.get("where") {
        Some(wv) => read::json_object(ctx, wv, &f.path("where")),
        None => Some(serde_json::Map::new()),
    };
    let cooldown = f.duration(ctx, "cooldown", std::time::Duration::ZERO);
    let probability = match f.get("probability") {
        Some(pv) => {
            let p = f.path("probability");
            let x = read::number(ctx, pv, &p);
            if x.is_some_and(|x| !(0.0..=1.0).contains(&x)) {
                ctx.problem(&pv.span(), &p, "probability must be between 0 and 1");
            }
            x
        }
        None => Some(1.0),
    };
    let template = propose(ctx, &f, known);
    let label = format!("reaction {}", name.as_deref().unwrap_or("?"));
    let entries = params(ctx, &f, template.as_ref(), &label);
    for e in entries.iter().flatten() {
        for ph in placeholders_in(&e.value) {
            let ok = ph.starts_with("payload.") && ph.len() > "payload.".len()
                || matches!(ph.as_str(), "kind" | "id" | "source");
            if !ok {
                let message = format!(
                    "unknown placeholder {{{ph}}} (use {{payload.FIELD}}, {{kind}}, {{id}} or {{source}})"
                );
                let p = read::child(&f.path("params"), &e.key);
                ctx.problem(&e.value_span, &p, message);
            }
        }
    }
    Some(Reaction {
        name: name?,
        on: on?,
        r#where: r#where?,
        propose: template?.0,
        params: entries?.into_iter().map(|e| (e.key, e.value)).collect(),
        cooldown,
        probability: probability?,
    })
}

pub(super) fn triggers(ctx: &mut Ctx, v: &Val, known: &Known) -> Vec<Trigger> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, item) in items(ctx, v, "triggers").iter().enumerate() {
        let path = format!("triggers[{i}]");
        if let Some(t) = trigger(ctx, item, &path, known, &mut seen) {
            out.push(t);
        }
    }
    out
}

fn trigger(
    ctx: &mut Ctx,
    v: &Val,
    path: &str,
    known: &Known,
    seen: &mut BTreeSet<String>,
) -> Option<Trigger> {
    let keys = ["name", "cron", "tz", "propose", "params"];
    let f = Fields::new(ctx, v, path, &keys)?;
    let name = rule_name(ctx, &f, "trigger", seen);
    let cron = f.required(ctx, "cron").and_then(|cv| {
        let p = f.path("cron");
        let s = read::string(ctx, cv, &p)?;
        match croner::parser::CronParser::new().parse(&s) {
            Ok(c) => Some((c, s)),
            Err(e) => {
                let message = format!("invalid cron {s:?}: {e} (e.g. \"0 9 * * *\")");
                ctx.problem(&cv.span(), &p, message);
                None
            }
        }
    });
    let tz = match f.get("tz") {
        Some(tv) => {
            let p = f.path("tz");
            read::string(ctx, tv, &p).and_then(|s| {
                s.parse::<chrono_tz::Tz>()
                    .map_err(|_| {
                        let message =
                            format!("unknown time zone {s:?} (e.g. \"UTC\", \"Europe/Berlin\")");
                        ctx.problem(&tv.span(), &p, message)
                    })
                    .ok()
            })
        }
        None => Some(chrono_tz::UTC),
    };
    let template = propose(ctx, &f, known);
    let label = format!("trigger {}", name.as_deref().unwrap_or("?"));
    let entries = params(ctx, &f, template.as_ref(), &label);
    if let (Some(entries), Some((_, declared))) = (&entries, &template) {
        for e in entries {
            if let Some(Some(spec)) = declared.get(&e.key)
                && !spec.matches(&e.value)
            {
                let p = read::child(&f.path("params"), &e.key);
                ctx.problem(&e.value_span, &p, spec.mismatch(&e.key, &e.value));
            }
        }
    }
    let (cron, cron_source) = cron?;
    Some(Trigger {
        name: name?,
        cron,
        cron_source,
        tz: tz?,
        propose: template?.0,
        params: entries?.into_iter().map(|e| (e.key, e.value)).collect(),
    })
}
