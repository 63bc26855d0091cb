//! `[budgets.NAME]` (design §11): a spending limit per UTC day or month over some
//! templates and/or agents' proposals, with its warning threshold.

use std::collections::BTreeMap;

use super::read::{self, Ctx, Fields, Val};
use super::templates::Known;
use crate::domain::budgets::{self, Amount, Period};

/// What `warn_at` is when a budget does not say.
pub const DEFAULT_WARN_AT: &str = "0.8";

/// One budget of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub name: String,
    /// Per period, before this period's raises.
    pub limit: Amount,
    pub period: Period,
    /// Template patterns (`*` any run of characters).
    pub templates: Vec<String>,
    /// Agents: their proposals are those `proposed_by = agent:NAME`.
    pub agents: Vec<String>,
    /// The warning is written once spent reaches `warn_at × limit` (0 < warn_at ≤ 1).
    pub warn_at: Amount,
}

impl Budget {
    /// Does a proposal of `template` by `proposed_by` fall in this budget? (Once, however
    /// many of its patterns and agents match.)
    pub fn covers(&self, template: &str, proposed_by: &str) -> bool {
        self.templates
            .iter()
            .any(|p| super::glob(p.as_bytes(), template.as_bytes()))
            || self
                .agents
                .iter()
                .any(|a| budgets::agent_actor(a) == proposed_by)
    }
}

pub(super) fn budgets(ctx: &mut Ctx, v: &Val, templates: &Known) -> BTreeMap<String, Budget> {
    let mut out = BTreeMap::new();
    let Some(table) = v.get_ref().as_table() else {
        read::type_error(ctx, v, "budgets", "a table of budgets");
        return out;
    };
    for (key, value) in table.iter() {
        let name = key.get_ref().as_ref();
        let path = read::child("budgets", name);
        let name_ok = budgets::valid_name(name);
        if !name_ok {
            ctx.problem(
                &key.span(),
                &path,
                format!(
                    "invalid budget name {:?} (lowercase letter, then up to 31 of a-z 0-9 _ -)",
                    name.chars().take(40).collect::<String>()
                ),
            );
        }
        if let Some(budget) = budget(ctx, value, &path, name, templates)
            && name_ok
        {
            out.insert(name.to_string(), budget);
        }
    }
    out
}

fn budget(ctx: &mut Ctx, v: &Val, path: &str, name: &str, known: &Known) -> Option<Budget> {
    let fields = ["limit", "period", "templates", "agents", "warn_at"];
    let f = Fields::new(ctx, v, path, &fields)?;
    let limit = f
        .required(ctx, "limit")
        .and_then(|v| amount(ctx, v, &f.path("limit"), false));
    let period = f.required(ctx, "period").and_then(|v| {
        let s = read::string(ctx, v, &f.path("period"))?;
        Period::parse(&s)
            .map_err(|e| ctx.problem(&v.span(), &f.path("period"), e))
            .ok()
    });
    let warn_at = match f.get("warn_at") {
        None => Amount::parse(DEFAULT_WARN_AT).ok(),
        Some(v) => amount(ctx, v, &f.path("warn_at"), true),
    };
    let templates = patterns(ctx, &f, "templates", known);
    let agents = agents(ctx, &f);
    if f.get("templates").is_none() && f.get("agents").is_none() {
        ctx.problem(
            &f.span,
            path,
            "a budget needs a scope: templates = [\"pattern*\", …] and/or agents = [\"name\", …]",
        );
        return None;
    }
    Some(Budget {
        name: name.to_string(),
        limit: limit?,
        period: period?,
        templates: templates?,
        agents: agents?,
        warn_at: warn_at?,
    })
}

/// A limit (more than zero) or a warn_at (more than zero, at most one), written as a
/// TOML number; its literal text is kept as the exact decimal.
fn amount(ctx: &mut Ctx, v: &Val, path: &str, fraction: bool) -> Option<Amount> {
    let n = read::number(ctx, v, path)?;
    let (ok, must) = if fraction {
        (n > 0.0 && n <= 1.0, "more than 0 and at most 1")
    } else {
        (n > 0.0, "more than zero")
    };
    if !ok {
        ctx.problem(
            &v.span(),
            path,
            format!("{n} is out of range: it must be {must}"),
        );
        return None;
    }
    // The double's full decimal text (Display never uses an exponent): `5.0` is 5.
    match Amount::parse(&format!("{n}")) {
        Ok(a) => Some(a),
        Err(e) => {
            ctx.problem(&v.span(), path, e);
            None
        }
    }
}

fn patterns(ctx: &mut Ctx, f: &Fields, key: &str, known: &Known) -> Option<Vec<String>> {
    let Some(v) = f.get(key) else {
        return Some(Vec::new());
    };
    let path = f.path(key);
    let items = read::strings(ctx, v, &path)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, (p, span)) in items.into_iter().enumerate() {
        let at = format!("{path}[{i}]");
        let shape = (1..=64).contains(&p.len())
            && p.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '*')
            });
        if !shape {
            ctx.problem(
                &span,
                &at,
                format!("invalid template pattern {p:?} (1 to 64 of a-z 0-9 _ - and * wildcards)"),
            );
            ok = false;
        } else if !known
            .keys()
            .any(|t| super::glob(p.as_bytes(), t.as_bytes()))
        {
            ctx.problem(&span, &at, format!("pattern {p:?} matches no template"));
            ok = false;
        } else {
            out.push(p);
        }
    }
    ok.then_some(out)
}

fn agents(ctx: &mut Ctx, f: &Fields) -> Option<Vec<String>> {
    let Some(v) = f.get("agents") else {
        return Some(Vec::new());
    };
    let path = f.path("agents");
    let items = read::strings(ctx, v, &path)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, (a, span)) in items.into_iter().enumerate() {
        if budgets::valid_name(&a) {
            out.push(a);
        } else {
            ctx.problem(
                &span,
                &format!("{path}[{i}]"),
                format!(
                    "invalid agent name {a:?} (lowercase letter, then up to 31 of a-z 0-9 _ -)"
                ),
            );
            ok = false;
        }
    }
    ok.then_some(out)
}
