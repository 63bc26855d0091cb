//! Walking the spanned TOML tree by hand: every reader reports its own problem (with
//! location and path) and returns `None`, so one pass gathers every problem.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Problem;

pub(super) type Val<'i> = Spanned<DeValue<'i>>;

pub(super) struct Ctx<'s> {
    src: &'s str,
    line_starts: Vec<usize>,
    pub problems: Vec<Problem>,
}

impl<'s> Ctx<'s> {
    pub fn new(src: &'s str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(src.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Ctx {
            src,
            line_starts,
            problems: Vec::new(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn location(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let column = self
            .src
            .get(start..offset)
            .map_or(offset.saturating_sub(start), |s| s.chars().count());
        (line, column + 1)
    }

    pub fn problem(&mut self, span: &Range<usize>, path: &str, message: impl Into<String>) {
        let (line, column) = self.location(span.start);
        self.problems.push(Problem {
            line,
            column,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// The source text of a span (empty when out of range).
    pub fn text(&self, span: &Range<usize>) -> &'s str {
        self.src.get(span.clone()).unwrap_or("")
    }
}

pub(super) fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub(super) fn type_error(ctx: &mut Ctx, v: &Val, path: &str, expected: &str) {
    let found = v.get_ref().type_str();
    ctx.problem(
        &v.span(),
        path,
        format!("expected {expected}, found {found}"),
    );
}

/// A table being read: unknown keys are reported when it is opened.
pub(super) struct Fields<'a, 'i> {
    pub table: &'a DeTable<'i>,
    pub span: Range<usize>,
    pub path: String,
}

impl<'a, 'i> Fields<'a, 'i> {
    pub fn new(ctx: &mut Ctx, v: &'a Val<'i>, path: &str, known: &[&str]) -> Option<Self> {
        let DeValue::Table(table) = v.get_ref() else {
            type_error(ctx, v, path, "a table");
            return None;
        };
        for (key, _) in table.iter() {
            let name = key.get_ref().as_ref();
            if !known.contains(&name) {
                let mut message = format!("unknown key {name}");
                match closest(name, known) {
                    Some(near) => message.push_str(&format!(" (did you mean {near}?)")),
                    None if !known.is_empty() => {
                        message.push_str(&format!(" (expected one of {})", known.join(", ")))
                    }
                    None => {}
                }
                ctx.problem(&key.span(), &child(path, name), message);
            }
        }
        Some(Fields {
            table,
            span: v.span(),
            path: path.to_string(),
        })
    }

    pub fn get(&self, key: &str) -> Option<&'a Val<'i>> {
        self.table.get(key)
    }

    pub fn path(&self, key: &str) -> String {
        child(&self.path, key)
    }

    pub fn required(&self, ctx: &mut Ctx, key: &str) -> Option<&'a Val<'i>> {
        let v = self.get(key);
        if v.is_none() {
            ctx.problem(&self.span, &self.path(key), format!("missing key {key}"));
        }
        v
    }

    pub fn string(&self, ctx: &mut Ctx, key: &str) -> Option<String> {
        self.get(key).and_then(|v| string(ctx, v, &self.path(key)))
    }

    pub fn boolean(&self, ctx: &mut Ctx, key: &str) -> Option<bool> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                type_error(ctx, v, &self.path(key), "true or false");
                None
            }
        }
    }

    pub fn u32_in(&self, ctx: &mut Ctx, key: &str, min: u32, max: u32) -> Option<u32> {
        self.get(key)
            .and_then(|v| u32_in(ctx, v, &self.path(key), min, max))
    }

    /// A humantime duration of at least `min`.
    pub fn duration(&self, ctx: &mut Ctx, key: &str, min: Duration) -> Option<Duration> {
        let v = self.get(key)?;
        let path = self.path(key);
        let d = duration(ctx, v, &path)?;
        if d < min {
            let min = humantime::format_duration(min);
            ctx.problem(&v.span(), &path, format!("must be at least {min}"));
            return None;
        }
        Some(d)
    }
}

pub(super) fn string(ctx: &mut Ctx, v: &Val, path: &str) -> Option<String> {
    match v.get_ref() {
        DeValue::String(s) => storable(ctx, v.span(), path, s).then(|| s.to_string()),
        _ => {
            type_error(ctx, v, path, "a string");
            None
        }
    }
}

/// PostgreSQL cannot store a `"\u0000"` escape's NUL (steps, payloads and params end
/// up in jsonb): refused here with its location rather than when a mission is created.
fn storable(ctx: &mut Ctx, span: Range<usize>, path: &str, text: &str) -> bool {
    match crate::domain::input::storable_text(text, "the string") {
        Ok(()) => true,
        Err(e) => {
            ctx.problem(&span, path, e.to_string());
            false
        }
    }
}

fn storable_key(ctx: &mut Ctx, key: &Spanned<std::borrow::Cow<str>>, path: &str) -> bool {
    let name: &str = key.get_ref();
    match crate::domain::input::storable_text(name, "the key") {
        Ok(()) => true,
        Err(e) => {
            // The path shows the key escaped, so the message itself holds no NUL.
            ctx.problem(
                &key.span(),
                &child(path, &format!("{name:?}")),
                e.to_string(),
            );
            false
        }
    }
}

pub(super) fn integer(ctx: &mut Ctx, v: &Val, path: &str) -> Option<i64> {
    match v.get_ref() {
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Some(n),
            Err(_) => {
                ctx.problem(&v.span(), path, "integer out of range");
                None
            }
        },
        _ => {
            type_error(ctx, v, path, "an integer");
            None
        }
    }
}

pub(super) fn u32_in(ctx: &mut Ctx, v: &Val, path: &str, min: u32, max: u32) -> Option<u32> {
    let n = integer(ctx, v, path)?;
    match u32::try_from(n) {
        Ok(n) if (min..=max).contains(&n) => Some(n),
        _ if max == u32::MAX => {
            ctx.problem(
                &v.span(),
                path,
                format!("{n} is out of range (at least {min})"),
            );
            None
        }
        _ => {
            ctx.problem(
                &v.span(),
                path,
                format!("{n} is out of range ({min}..={max})"),
            );
            None
        }
    }
}

pub(super) fn number(ctx: &mut Ctx, v: &Val, path: &str) -> Option<f64> {
    match v.get_ref() {
        DeValue::Float(f) => {
            let n = f.as_str().parse::<f64>().ok().filter(|f| f.is_finite());
            if n.is_none() {
                ctx.problem(&v.span(), path, "expected a finite number");
            }
            n
        }
        DeValue::Integer(_) => integer(ctx, v, path).map(|n| n as f64),
        _ => {
            type_error(ctx, v, path, "a number");
            None
        }
    }
}

pub(super) fn duration(ctx: &mut Ctx, v: &Val, path: &str) -> Option<Duration> {
    let s = string(ctx, v, path)?;
    match humantime::parse_duration(s.trim()) {
        Ok(d) => Some(d),
        Err(e) => {
            let message =
                format!("invalid duration {s:?}: {e} (write e.g. \"90s\", \"5m\", \"24h\")");
            ctx.problem(&v.span(), path, message);
            None
        }
    }
}

pub(super) fn array<'a, 'i>(ctx: &mut Ctx, v: &'a Val<'i>, path: &str) -> Option<&'a [Val<'i>]> {
    match v.get_ref() {
        DeValue::Array(items) => Some(items),
        _ => {
            type_error(ctx, v, path, "an array");
            None
        }
    }
}

/// An array of strings, each with its span.
pub(super) fn strings(ctx: &mut Ctx, v: &Val, path: &str) -> Option<Vec<(String, Range<usize>)>> {
    let items = array(ctx, v, path)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match string(ctx, item, &format!("{path}[{i}]")) {
            Some(s) => out.push((s, item.span())),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// One `key = "value"` entry of a table of strings.
pub(super) struct Entry {
    pub key: String,
    pub key_span: Range<usize>,
    pub value: String,
    pub value_span: Range<usize>,
}

/// A table of string values, in source order.
pub(super) fn entries(ctx: &mut Ctx, v: &Val, path: &str) -> Option<Vec<Entry>> {
    let DeValue::Table(table) = v.get_ref() else {
        type_error(ctx, v, path, "a table of strings");
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (key, value) in table.iter() {
        if !storable_key(ctx, key, path) {
            ok = false;
            continue;
        }
        let key_path = child(path, key.get_ref());
        match string(ctx, value, &key_path) {
            Some(s) => out.push(Entry {
                key: key.get_ref().to_string(),
                key_span: key.span(),
                value: s,
                value_span: value.span(),
            }),
            None => ok = false,
        }
    }
    out.sort_by_key(|e| e.key_span.start);
    ok.then_some(out)
}

pub(super) fn string_map(ctx: &mut Ctx, v: &Val, path: &str) -> Option<BTreeMap<String, String>> {
    entries(ctx, v, path).map(|es| es.into_iter().map(|e| (e.key, e.value)).collect())
}

/// Any TOML value as JSON (datetimes become strings).
pub(super) fn json(ctx: &mut Ctx, v: &Val, path: &str) -> Option<serde_json::Value> {
    use serde_json::Value;
    Some(match v.get_ref() {
        DeValue::String(_) => Value::String(string(ctx, v, path)?),
        DeValue::Integer(_) => Value::from(integer(ctx, v, path)?),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::String(d.to_string()),
        DeValue::Float(f) => {
            let n = f.as_str().parse::<f64>().ok();
            match n.and_then(serde_json::Number::from_f64) {
                Some(n) => Value::Number(n),
                None => {
                    ctx.problem(&v.span(), path, "number not representable in JSON");
                    return None;
                }
            }
        }
        DeValue::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                out.push(json(ctx, item, &format!("{path}[{i}]"))?);
            }
            Value::Array(out)
        }
        DeValue::Table(_) => Value::Object(json_object(ctx, v, path)?),
    })
}

pub(super) fn json_object(
    ctx: &mut Ctx,
    v: &Val,
    path: &str,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let DeValue::Table(table) = v.get_ref() else {
        type_error(ctx, v, path, "a table");
        return None;
    };
    let mut out = serde_json::Map::new();
    let mut ok = true;
    for (key, value) in table.iter() {
        if !storable_key(ctx, key, path) {
            ok = false;
            continue;
        }
        let key_path = child(path, key.get_ref());
        match json(ctx, value, &key_path) {
            Some(j) => {
                out.insert(key.get_ref().to_string(), j);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// The known word nearest to a misspelling, if it is near enough to be a suggestion.
pub(super) fn closest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(word, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
