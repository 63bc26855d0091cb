//! Using a parsed policy: param checks and help, step rendering, reaction matching
//! and param resolution, trigger schedules.

use std::collections::BTreeMap;

use super::{ParamSpec, Reaction, StepTemplate, Template, Trigger, payload_contains, templates};
use crate::domain::steps::substitute_str;

impl ParamSpec {
    /// Compile `pattern` (as written in the policy) anchored to the whole value.
    pub fn new(pattern: &str, help: &str, default: Option<&str>) -> Result<Self, String> {
        let pattern = templates::compile_anchored(pattern)?;
        let spec = ParamSpec {
            pattern,
            help: help.to_string(),
            default: default.map(str::to_string),
        };
        if let Some(d) = &spec.default
            && !spec.matches(d)
        {
            let source = spec.pattern_source();
            return Err(format!("default {d:?} does not match {source}"));
        }
        Ok(spec)
    }

    /// The pattern as written in the policy file.
    pub fn pattern_source(&self) -> &str {
        let s = self.pattern.as_str();
        s.strip_prefix(templates::ANCHOR_START)
            .and_then(|s| s.strip_suffix(templates::ANCHOR_END))
            .unwrap_or(s)
    }

    /// Whether the whole value matches (never a substring match, even for a regex
    /// built by hand without anchors).
    pub fn matches(&self, value: &str) -> bool {
        self.pattern
            .find(value)
            .is_some_and(|m| m.start() == 0 && m.end() == value.len())
    }

    pub fn required(&self) -> bool {
        self.default.is_none()
    }

    /// `param tag: "v1;rm" does not match ^v\d+$ (release tag)`.
    pub fn mismatch(&self, name: &str, value: &str) -> String {
        // Quote the start of an overlong value: the reason must stay readable.
        let shown: String = if value.chars().count() > 80 {
            format!(
                "{:?}… ({} characters)",
                value.chars().take(60).collect::<String>(),
                value.chars().count()
            )
        } else {
            format!("{value:?}")
        };
        let mut line = format!(
            "param {name}: {shown} does not match {}",
            self.pattern_source()
        );
        if !self.help.is_empty() {
            line.push_str(&format!(" ({})", self.help));
        }
        line
    }
}

impl Template {
    /// Check user-supplied params: unknown keys, missing required ones (defaults
    /// filled), each value must match its pattern in full. Every problem, one line each.
    pub fn validate_params(
        &self,
        given: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, Vec<String>> {
        let mut errors = Vec::new();
        for key in given.keys().filter(|k| !self.params.contains_key(*k)) {
            let known: Vec<&str> = self.params.keys().map(String::as_str).collect();
            errors.push(if known.is_empty() {
                format!(
                    "unknown param {key}: template {} takes no params",
                    self.name
                )
            } else {
                format!(
                    "unknown param {key}: template {} takes {}",
                    self.name,
                    known.join(", ")
                )
            });
        }
        let mut out = BTreeMap::new();
        for (name, spec) in &self.params {
            match (given.get(name), &spec.default) {
                (Some(v), _) if spec.matches(v) => {
                    out.insert(name.clone(), v.clone());
                }
                (Some(v), _) => errors.push(spec.mismatch(name, v)),
                (None, Some(d)) => {
                    out.insert(name.clone(), d.clone());
                }
                (None, None) if spec.help.is_empty() => {
                    errors.push(format!("param {name}: missing (required)"))
                }
                (None, None) => errors.push(format!("param {name}: missing ({})", spec.help)),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// One line per param: `tag — release tag, e.g. v1.4.2 (required)`.
    pub fn params_help(&self) -> Vec<String> {
        self.params
            .iter()
            .map(|(name, spec)| {
                let help = if spec.help.is_empty() {
                    format!("matches {}", spec.pattern_source())
                } else {
                    spec.help.clone()
                };
                match &spec.default {
                    Some(d) => format!("{name} — {help} (default {d:?})"),
                    None => format!("{name} — {help} (required)"),
                }
            })
            .collect()
    }

    /// The steps with validated params substituted into their specs.
    pub fn render_steps(&self, params: &BTreeMap<String, String>) -> Vec<StepTemplate> {
        self.steps
            .iter()
            .map(|s| StepTemplate {
                name: s.name.clone(),
                spec: s.spec.substitute(params),
                max_attempts: s.max_attempts,
                when: s.when.clone(),
            })
            .collect()
    }
}

impl Reaction {
    /// Whether an event of this kind and payload fires the rule (before cooldown and
    /// probability).
    pub fn matches(&self, kind: &str, payload: &serde_json::Value) -> bool {
        self.on.matches(kind)
            && self.r#where.iter().all(|(k, want)| {
                payload
                    .get(k)
                    .is_some_and(|have| payload_contains(have, want))
            })
    }

    /// The proposal's params, resolved from the event. Strings are used as they are,
    /// other JSON values in their JSON text; unresolvable placeholders stay as written
    /// (and then fail the template's patterns).
    pub fn resolve_params(
        &self,
        id: i64,
        kind: &str,
        source: &str,
        payload: &serde_json::Value,
    ) -> BTreeMap<String, String> {
        let lookup = |name: &str| -> Option<String> {
            match name {
                "id" => Some(id.to_string()),
                "kind" => Some(kind.to_string()),
                "source" => Some(source.to_string()),
                _ => {
                    let path = name.strip_prefix("payload.")?;
                    let v = path.split('.').try_fold(payload, |v, key| match v {
                        serde_json::Value::Array(items) => items.get(key.parse::<usize>().ok()?),
                        _ => v.get(key),
                    })?;
                    match v {
                        serde_json::Value::String(s) => Some(s.clone()),
                        serde_json::Value::Null => None,
                        other => Some(other.to_string()),
                    }
                }
            }
        };
        self.params
            .iter()
            .map(|(k, v)| (k.clone(), substitute_str(v, lookup)))
            .collect()
    }
}

impl Trigger {
    /// The first fire time strictly after `after`, in UTC.
    pub fn next_after(
        &self,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    }
}
