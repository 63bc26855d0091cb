//! What steps hand to each other: a step's `output` (a JSON object), the
//! `{steps.NAME.KEY}` references later steps make to it, and `when` conditions over it.
//! Outputs come from outside (a step's own file), so they are checked like any input.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::input;

/// The most an output may hold (a shell step's `$OPSLOOP_OUTPUT` file).
pub const MAX_OUTPUT: usize = 64 * 1024;

/// The prefix of a reference: `{steps.NAME.KEY}`.
pub const REF_PREFIX: &str = "steps.";

/// The outputs of a mission's finished steps, by step name.
pub type Outputs = BTreeMap<String, Map<String, Value>>;

/// Read an output file's content: one JSON object, or `key=value` lines (a later line
/// for a key wins; blank lines are ignored). Empty is `{}`. The error says why not; a
/// `cost` that is not a non-negative decimal is such an error too (design §11), so a
/// bad cost fails the attempt and is never counted.
pub fn parse_output(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    let map = parse_map(bytes)?;
    super::budgets::cost_of(&map)?;
    Ok(map)
}

fn parse_map(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    if bytes.len() > MAX_OUTPUT {
        return Err(format!(
            "the output file holds {} bytes; at most {MAX_OUTPUT} are allowed",
            bytes.len()
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "the output file is not UTF-8 text (byte {})",
            e.valid_up_to()
        )
    })?;
    if text.contains('\0') {
        return Err("the output file contains a NUL character".into());
    }
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(Map::new());
    }
    if trimmed.starts_with(['{', '[', '"']) || serde_json::from_str::<Value>(trimmed).is_ok() {
        return match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Object(map)) => {
                input::storable_json(&Value::Object(map.clone()), "output")
                    .map_err(|e| e.to_string())?;
                Ok(map)
            }
            Ok(other) => Err(format!(
                "the output file holds a JSON {}; it must be one JSON object or key=value lines",
                json_type(&other)
            )),
            Err(e) => Err(format!("the output file is not valid JSON: {e}")),
        };
    }
    let mut map = Map::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "line {} of the output file is not key=value: {:?}",
                i + 1,
                cut(line)
            ));
        };
        if !valid_key(key) {
            return Err(format!(
                "line {} of the output file: invalid key {:?} (a letter or _, then letters, digits, _; at most 64)",
                i + 1,
                cut(key)
            ));
        }
        map.insert(key.to_string(), Value::String(value.to_string()));
    }
    Ok(map)
}

/// An output key of the `key=value` form: `^[A-Za-z_][A-Za-z0-9_]{0,63}$`.
pub fn valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
        Value::Object(_) => "object",
    }
}

fn cut(s: &str) -> String {
    s.chars().take(60).collect()
}

/// A value as conditions compare it and references insert it: a JSON string by its
/// value, anything else by its JSON text.
pub fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `steps.NAME.KEY` (the placeholder's inside) → (NAME, KEY), NAME being one of
/// `names` (a step name may itself hold dots, so the known names decide the split).
pub fn split_ref<'a>(inner: &'a str, names: &[&str]) -> Option<(&'a str, &'a str)> {
    let rest = inner.strip_prefix(REF_PREFIX)?;
    rest.match_indices('.')
        .map(|(i, _)| (&rest[..i], &rest[i + 1..]))
        .rfind(|(name, key)| !key.is_empty() && names.contains(name))
}

/// The value a reference stands for, or why there is none.
pub fn lookup(inner: &str, outputs: &Outputs) -> Result<Value, String> {
    let names: Vec<&str> = outputs.keys().map(String::as_str).collect();
    let Some((name, key)) = split_ref(inner, &names) else {
        let name = inner.strip_prefix(REF_PREFIX).unwrap_or(inner);
        return Err(format!(
            "{{{inner}}}: no output of a step named in {name:?} (the step did not succeed, or was skipped)"
        ));
    };
    outputs
        .get(name)
        .and_then(|o| o.get(key))
        .cloned()
        .ok_or_else(|| format!("{{{inner}}}: step {name} has no output key {key:?}"))
}

/// `when = { "steps.NAME.KEY" = value | [values] }`: every key must hold one of its
/// values (compared as text).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Condition(pub BTreeMap<String, Vec<String>>);

impl Condition {
    pub fn holds(&self, outputs: &Outputs) -> bool {
        self.0.iter().all(|(reference, wanted)| {
            lookup(reference, outputs).is_ok_and(|have| wanted.contains(&as_text(&have)))
        })
    }

    /// The step names it refers to (for `policy check`), given the names in the template.
    pub fn references(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// A `::progress PERCENT TEXT` line of a shell step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub percent: u8,
    pub text: String,
}

/// Text of a progress line is cut to this many characters.
pub const PROGRESS_TEXT: usize = 200;

impl Progress {
    /// A progress line (without its line end), or None: PERCENT is one to three digits,
    /// at most 100; any other line, `::progress` ones included, is not progress.
    pub fn parse(line: &str) -> Option<Progress> {
        let rest = line.strip_prefix("::progress")?;
        let rest = rest
            .strip_prefix([' ', '\t'])?
            .trim_start_matches([' ', '\t']);
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=3).contains(&digits) {
            return None;
        }
        let (number, text) = rest.split_at(digits);
        if !(text.is_empty() || text.starts_with([' ', '\t'])) {
            return None;
        }
        let percent: u8 = number.parse().ok().filter(|p| *p <= 100)?;
        let text: String = text
            .trim()
            .chars()
            .map(|c| if c == '\0' || c.is_control() { ' ' } else { c })
            .take(PROGRESS_TEXT)
            .collect();
        Some(Progress { percent, text })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn progress_lines_are_strict() {
        let p = Progress::parse("::progress 42 building the thing").unwrap();
        assert_eq!((p.percent, p.text.as_str()), (42, "building the thing"));
        assert_eq!(Progress::parse("::progress 100").unwrap().percent, 100);
        assert_eq!(Progress::parse("::progress 7\tx").unwrap().text, "x");
        for bad in [
            "::progress",
            "::progress ",
            "::progress 101 too much",
            "::progress 1000",
            "::progress -1 x",
            "::progress 5x",
            "::progressive 5 x",
            "::progress x 5",
            "progress 5 x",
            " ::progress 5 x",
        ] {
            assert_eq!(Progress::parse(bad), None, "{bad}");
        }
        let long = format!("::progress 5 {}", "é".repeat(500));
        assert_eq!(
            Progress::parse(&long).unwrap().text.chars().count(),
            PROGRESS_TEXT
        );
        assert_eq!(Progress::parse("::progress 5 a\u{0}b").unwrap().text, "a b");
    }

    #[test]
    fn outputs_are_one_json_object_or_key_value_lines() {
        assert_eq!(parse_output(b"").unwrap(), Map::new());
        assert_eq!(parse_output(b"  \n").unwrap(), Map::new());
        let m = parse_output(br#"{"title": "Hi", "n": 7}"#).unwrap();
        assert_eq!(m["n"], json!(7));
        let m = parse_output(b"title=Hello = world\n\nn=1\nn=2\n").unwrap();
        assert_eq!(m["title"], json!("Hello = world"));
        assert_eq!(m["n"], json!("2"), "a later line wins");
        for (bad, why) in [
            (&b"[1,2]"[..], "array"),
            (b"\"x\"", "string"),
            (b"42", "number"),
            (b"{\"a\": ", "not valid JSON"),
            (b"just words", "not key=value"),
            (b"9x=1", "invalid key"),
            (b"\xff\xfe", "not UTF-8"),
            (b"a=\x00", "NUL"),
        ] {
            let e = parse_output(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let deep = "[".repeat(10_000);
        assert!(parse_output(format!("{{\"a\":{deep}").as_bytes()).is_err());
        let huge = vec![b'a'; MAX_OUTPUT + 1];
        assert!(parse_output(&huge).unwrap_err().contains("at most"));
        assert!(parse_output(br#"{"a\u0000": 1}"#).is_err());
    }

    #[test]
    fn references_and_conditions_read_earlier_outputs() {
        let mut outputs = Outputs::new();
        outputs.insert(
            "draft v1".into(),
            parse_output(br#"{"title": "T", "n": 7}"#).unwrap(),
        );
        assert_eq!(lookup("steps.draft v1.title", &outputs), Ok(json!("T")));
        assert!(
            lookup("steps.draft v1.nope", &outputs)
                .unwrap_err()
                .contains("no output key \"nope\"")
        );
        assert!(lookup("steps.other.title", &outputs).is_err());
        let c = |k: &str, v: &[&str]| {
            Condition(BTreeMap::from([(
                k.to_string(),
                v.iter().map(|s| s.to_string()).collect(),
            )]))
        };
        assert!(
            c("steps.draft v1.n", &["7"]).holds(&outputs),
            "7 matches \"7\""
        );
        assert!(c("steps.draft v1.title", &["X", "T"]).holds(&outputs));
        assert!(!c("steps.draft v1.title", &["X"]).holds(&outputs));
        assert!(
            !c("steps.draft v1.gone", &["T"]).holds(&outputs),
            "a missing key does not hold"
        );
    }
}
