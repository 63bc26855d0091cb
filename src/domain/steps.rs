//! What a step does: the kinds of docs/policy.md and their stored spec.
//!
//! A `StepSpec` is what a template declares (with `{param}` placeholders) and, after
//! substitution, what `ops_mission_steps.spec` holds. Durations are stored as
//! milliseconds so the JSON is plain.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    Shell,
    Http,
    Sleep,
    Noop,
    Emit,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Shell => "shell",
            StepKind::Http => "http",
            StepKind::Sleep => "sleep",
            StepKind::Noop => "noop",
            StepKind::Emit => "emit",
        }
    }

    pub fn parse(s: &str) -> Option<StepKind> {
        Some(match s {
            "shell" => StepKind::Shell,
            "http" => StepKind::Http,
            "sleep" => StepKind::Sleep,
            "noop" => StepKind::Noop,
            "emit" => StepKind::Emit,
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
}

impl StepSpec {
    pub fn kind(&self) -> StepKind {
        match self {
            StepSpec::Shell { .. } => StepKind::Shell,
            StepSpec::Http { .. } => StepKind::Http,
            StepSpec::Sleep { .. } => StepKind::Sleep,
            StepSpec::Noop => StepKind::Noop,
            StepSpec::Emit { .. } => StepKind::Emit,
        }
    }

    /// Replace `{name}` in every string of the spec with the param's value. Values
    /// were matched against the template's patterns before this is called, and each
    /// lands inside one string (one argv element, one header), never split or
    /// re-parsed. `{{` and `}}` are literal braces.
    pub fn substitute(&self, params: &BTreeMap<String, String>) -> StepSpec {
        let mut value = match serde_json::to_value(self) {
            Ok(v) => v,
            Err(_) => return self.clone(),
        };
        substitute_value(&mut value, params);
        serde_json::from_value(value).unwrap_or_else(|_| self.clone())
    }

    /// Every `{name}` this spec refers to, for validation against declared params.
    pub fn placeholders(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(value) = serde_json::to_value(self) {
            collect_placeholders(&value, &mut out);
        }
        out.sort();
        out.dedup();
        out
    }
}

fn substitute_value(value: &mut Value, params: &BTreeMap<String, String>) {
    match value {
        Value::String(s) => *s = substitute_str(s, |name| params.get(name).cloned()),
        Value::Array(items) => items.iter_mut().for_each(|v| substitute_value(v, params)),
        Value::Object(map) => map.values_mut().for_each(|v| substitute_value(v, params)),
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
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
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
