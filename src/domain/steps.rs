//! What a step does: the kinds of docs/policy.md and their stored spec.
//!
//! A `StepSpec` is what a template declares (with `{param}` placeholders) and, after
//! substitution, what `ops_mission_steps.spec` holds. Durations are stored as
//! milliseconds so the JSON is plain.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::outputs::{self, Outputs, REF_PREFIX};
use super::vocab::Audience;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    Shell,
    Http,
    Sleep,
    Noop,
    Emit,
    Ask,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Shell => "shell",
            StepKind::Http => "http",
            StepKind::Sleep => "sleep",
            StepKind::Noop => "noop",
            StepKind::Emit => "emit",
            StepKind::Ask => "ask",
        }
    }

    pub fn parse(s: &str) -> Option<StepKind> {
        Some(match s {
            "shell" => StepKind::Shell,
            "http" => StepKind::Http,
            "sleep" => StepKind::Sleep,
            "noop" => StepKind::Noop,
            "emit" => StepKind::Emit,
            "ask" => StepKind::Ask,
            _ => return None,
        })
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step's work. Tagged by `kind`, as in the policy file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StepSpec {
    /// An argv, never run through a shell.
    Shell {
        run: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    Http {
        method: String,
        url: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        headers: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        json: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
        /// Accepted response statuses; empty means any 2xx.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        expect: Vec<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    Sleep {
        for_ms: u64,
    },
    Noop,
    Emit {
        event: String,
        #[serde(default)]
        payload: Value,
    },
    /// A question to people; the step is `asking` until it is answered.
    Ask {
        question: String,
        /// The allowed answers; empty means free text (`pattern`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        choices: Vec<String>,
        /// Free text must match it, whole.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pattern: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        help: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<String>,
        #[serde(default = "approvers")]
        to: Audience,
    },
}

fn approvers() -> Audience {
    Audience::Approvers
}

impl StepSpec {
    pub fn kind(&self) -> StepKind {
        match self {
            StepSpec::Shell { .. } => StepKind::Shell,
            StepSpec::Http { .. } => StepKind::Http,
            StepSpec::Sleep { .. } => StepKind::Sleep,
            StepSpec::Noop => StepKind::Noop,
            StepSpec::Emit { .. } => StepKind::Emit,
            StepSpec::Ask { .. } => StepKind::Ask,
        }
    }

    /// Replace `{name}` in every string of the spec with the param's value. Values
    /// were matched against the template's patterns before this is called, and each
    /// lands inside one string (one argv element, one header), never split or
    /// re-parsed. `{{` and `}}` are literal braces.
    ///
    /// A spec that refers to earlier steps' outputs (`{steps.NAME.KEY}`) is finished
    /// when its step is claimed (`resolve`), so here it keeps its references and its
    /// escapes, and the param values put in are escaped: a value is never read again
    /// as a reference.
    pub fn substitute(&self, params: &BTreeMap<String, String>) -> StepSpec {
        let keep = !self.references().is_empty();
        self.map_strings(|s| {
            substitute_with(s, keep, |name| {
                if keep {
                    params
                        .get(name)
                        .map(|v| v.replace('{', "{{").replace('}', "}}"))
                } else {
                    params.get(name).cloned()
                }
            })
        })
    }

    /// Put earlier steps' outputs into a spec `substitute` kept references in (at
    /// claim time). The error names the first reference that has no value.
    pub fn resolve(&self, outputs: &Outputs) -> Result<StepSpec, String> {
        let missing = std::cell::RefCell::new(None);
        let spec = self.map_strings(|s| {
            substitute_str(s, |name| {
                if !name.starts_with(REF_PREFIX) {
                    return None;
                }
                match outputs::lookup(name, outputs) {
                    Ok(v) => Some(outputs::as_text(&v)),
                    Err(e) => {
                        missing.borrow_mut().get_or_insert(e);
                        None
                    }
                }
            })
        });
        match missing.into_inner() {
            Some(e) => Err(e),
            None => Ok(spec),
        }
    }

    /// The spec as a person should read it before it runs: escapes undone, references
    /// shown as written.
    pub fn display(&self) -> StepSpec {
        if self.references().is_empty() {
            return self.clone();
        }
        self.map_strings(|s| substitute_str(s, |_| None))
    }

    /// What the step will run, in one line for a person deciding: a shell step's argv,
    /// an http step's method and URL, an ask step's question.
    pub fn summary(&self) -> String {
        let shown = self.display();
        match &shown {
            StepSpec::Shell { run, .. } => run
                .iter()
                .map(|a| {
                    if a.is_empty() || a.contains(char::is_whitespace) || a.contains('"') {
                        format!("{a:?}")
                    } else {
                        a.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            StepSpec::Http { method, url, .. } => format!("{method} {url}"),
            StepSpec::Sleep { for_ms } => format!("{}s", *for_ms as f64 / 1000.0),
            StepSpec::Noop => String::new(),
            StepSpec::Emit { event, .. } => event.clone(),
            StepSpec::Ask {
                question, choices, ..
            } => {
                if choices.is_empty() {
                    question.clone()
                } else {
                    format!("{question} [{}]", choices.join(" | "))
                }
            }
        }
    }

    /// Every `{steps.NAME.KEY}` this spec refers to (the placeholder's inside).
    pub fn references(&self) -> Vec<String> {
        let mut all = Vec::new();
        if let Ok(value) = serde_json::to_value(self.without_pattern().0) {
            collect_placeholders(&value, &mut all);
        }
        all.retain(|p| p.starts_with(REF_PREFIX));
        all.sort();
        all.dedup();
        all
    }

    /// Every `{name}` param this spec refers to, for validation against declared params.
    pub fn placeholders(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(value) = serde_json::to_value(self.without_pattern().0) {
            collect_placeholders(&value, &mut out);
        }
        out.retain(|p| !p.starts_with(REF_PREFIX));
        out.sort();
        out.dedup();
        out
    }

    /// Apply `f` to the strings a spec's placeholders may be in: all of them but an
    /// `ask` step's pattern, a regex whose braces are its own.
    fn map_strings(&self, f: impl Fn(&str) -> String) -> StepSpec {
        let (spec, pattern) = self.without_pattern();
        let mut value = match serde_json::to_value(&spec) {
            Ok(v) => v,
            Err(_) => return self.clone(),
        };
        map_value(&mut value, &f);
        let mut mapped: StepSpec = serde_json::from_value(value).unwrap_or(spec);
        if let StepSpec::Ask { pattern: p, .. } = &mut mapped {
            *p = pattern;
        }
        mapped
    }

    fn without_pattern(&self) -> (StepSpec, Option<String>) {
        let mut spec = self.clone();
        let pattern = match &mut spec {
            StepSpec::Ask { pattern, .. } => pattern.take(),
            _ => None,
        };
        (spec, pattern)
    }
}

/// Apply `f` to every string value (not to keys).
fn map_value(value: &mut Value, f: &impl Fn(&str) -> String) {
    match value {
        Value::String(s) => *s = f(s),
        Value::Array(items) => items.iter_mut().for_each(|v| map_value(v, f)),
        Value::Object(map) => map.values_mut().for_each(|v| map_value(v, f)),
        _ => {}
    }
}

fn collect_placeholders(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.extend(placeholders_in(s)),
        Value::Array(items) => items.iter().for_each(|v| collect_placeholders(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_placeholders(v, out)),
        _ => {}
    }
}

/// Expand `{name}` placeholders in `template` with `lookup`; unknown names are left
/// as written. `{{`/`}}` are literal braces. Shared by steps (params) and reactions
/// (event payload paths).
pub fn substitute_str(template: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    substitute_with(template, false, lookup)
}

/// `substitute_str`, or with `keep_escapes` a pass that leaves `{{`/`}}` as they are (a
/// later pass reads them).
fn substitute_with(
    template: &str,
    keep_escapes: bool,
    lookup: impl Fn(&str) -> Option<String>,
) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(if keep_escapes { &tail[..2] } else { &tail[..1] });
            rest = &tail[2..];
        } else if tail.starts_with('{') {
            match tail.find('}') {
                Some(end) => {
                    let name = &tail[1..end];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => out.push_str(&tail[..=end]),
                    }
                    rest = &tail[end + 1..];
                }
                None => {
                    out.push_str(tail);
                    rest = "";
                }
            }
        } else {
            out.push('}');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The names of the `{name}` placeholders in one string.
pub fn placeholders_in(template: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            rest = &tail[2..];
        } else if tail.starts_with('{') {
            match tail.find('}') {
                Some(end) => {
                    names.push(tail[1..end].to_string());
                    rest = &tail[end + 1..];
                }
                None => break,
            }
        } else {
            rest = &tail[1..];
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_keeps_values_inside_one_string() {
        let spec = StepSpec::Shell {
            run: vec!["echo".into(), "{msg}".into(), "{{literal}}".into()],
            cwd: None,
            env: BTreeMap::from([("TAG".into(), "release-{tag}".into())]),
            timeout_ms: None,
        };
        let params = BTreeMap::from([
            ("msg".to_string(), "a b; rm -rf /".to_string()),
            ("tag".to_string(), "v1".to_string()),
        ]);
        let StepSpec::Shell { run, env, .. } = spec.substitute(&params) else {
            panic!("kind changed");
        };
        assert_eq!(run, vec!["echo", "a b; rm -rf /", "{literal}"]);
        assert_eq!(env["TAG"], "release-v1");
        assert_eq!(spec.placeholders(), vec!["msg", "tag"]);
    }

    #[test]
    fn unknown_placeholders_stay() {
        assert_eq!(
            substitute_str("{a}-{b}", |n| (n == "a").then(|| "x".into())),
            "x-{b}"
        );
        assert_eq!(placeholders_in("{a}{{b}}{c"), vec!["a"]);
    }
}
