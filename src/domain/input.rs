//! Input from outside (command line, chat, HTTP) parsed into what the library takes:
//! one implementation, so every interface refuses the same things the same way.

use std::collections::BTreeMap;

use serde_json::Value;
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

use crate::domain::error::{OpsError, OpsResult};

/// The longest identity, in characters after normalization.
pub const MAX_IDENTITY: usize = 64;

/// A person's name as given (`--as NAME`, `proposed_by`), validated and normalized, so
/// that `alice`, `Alice`, ` ALICE` and `ａｌｉｃｅ` (fullwidth) are one person when the
/// proposer, the approvers and the approvals table compare people. `what` names the
/// input in the message, e.g. `--as NAME`.
///
/// The comparison form follows PRECIS (RFC 8265, RFC 8266): NFKC (width and
/// compatibility forms), Unicode lowercase, NFKC again, and runs of whitespace
/// collapsed to one space, trimmed. Control, invisible formatting (zero-width spaces,
/// bidi overrides), line separators and unassigned code points are refused: they make
/// names that look alike and compare differently.
pub fn identity(raw: &str, what: &str) -> OpsResult<String> {
    let refuse = |why: String| {
        OpsError::bad_input(format!(
            "{what} must be 1 to {MAX_IDENTITY} printable characters ({why})"
        ))
    };
    if let Some(c) = raw.chars().find(|c| !identity_char(*c)) {
        return Err(refuse(format!(
            "{} is {}",
            codepoint(c),
            describe_refused(c)
        )));
    }
    let name = normalize_identity(raw);
    let length = name.chars().count();
    if length == 0 {
        return Err(refuse("it is empty".into()));
    }
    if length > MAX_IDENTITY {
        return Err(refuse(format!("it has {length}")));
    }
    Ok(name)
}

/// The comparison form of an identity (see [`identity`]), for names already stored:
/// never fails, so rows written before names were normalized still compare right.
pub fn normalize_identity(raw: &str) -> String {
    let folded: String = raw
        .nfkc()
        .collect::<String>()
        .to_lowercase()
        .nfkc()
        .collect();
    folded.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether two identities name the same person.
pub fn same_person(a: &str, b: &str) -> bool {
    a == b || normalize_identity(a) == normalize_identity(b)
}

fn identity_char(c: char) -> bool {
    !matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::Unassigned
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

fn describe_refused(c: char) -> &'static str {
    match c.general_category() {
        GeneralCategory::Control => "a control character",
        GeneralCategory::Format => "an invisible formatting character",
        GeneralCategory::Unassigned => "a code point Unicode does not assign",
        _ => "a line or paragraph separator",
    }
}

fn codepoint(c: char) -> String {
    format!("U+{:04X}", u32::from(c))
}

/// What PostgreSQL says about U+0000 in `text` and `jsonb` (strings and object keys alike).
const NUL: &str = "contains \\u0000 (a NUL character), which cannot be stored";

/// Text from outside about to be stored: refused when PostgreSQL cannot store it.
pub fn storable_text(text: &str, what: &str) -> OpsResult<()> {
    if text.contains('\0') {
        return Err(OpsError::bad_input(format!("{what} {NUL}")));
    }
    Ok(())
}

/// JSON from outside about to be stored (event payloads, params, request bodies):
/// refused, naming where, when a string or an object key holds U+0000, which jsonb
/// refuses (the database would answer with an error, not a reason).
pub fn storable_json(value: &Value, what: &str) -> OpsResult<()> {
    match value {
        Value::String(s) => storable_text(s, what),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| storable_json(item, &format!("{what}[{i}]"))),
        Value::Object(map) => map.iter().try_for_each(|(key, item)| {
            let path = json_path(what, key);
            if key.contains('\0') {
                return Err(OpsError::bad_input(format!("the key {path} {NUL}")));
            }
            storable_json(item, &path)
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// `payload.key`, with a key that is not a plain word quoted (and escaped).
fn json_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if plain {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

/// Ids are positive integers; say which kind was expected.
pub fn parse_id(raw: &str, what: &str) -> OpsResult<i64> {
    let trimmed = raw.trim().trim_start_matches('#');
    match trimmed.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(OpsError::bad_input(format!(
            "{raw:?} is not a {what} id (a positive number, like {what} #12 → 12)"
        ))),
    }
}

pub fn parse_telegram_id(raw: &str) -> OpsResult<i64> {
    raw.trim()
        .parse::<i64>()
        .map_err(|_| OpsError::bad_input(format!("{raw:?} is not a Telegram user id (a number)")))
}

/// `key=value` words into params. Malformed words and repeated keys are refused.
pub fn parse_params<S: AsRef<str>>(words: &[S]) -> OpsResult<BTreeMap<String, String>> {
    let mut params = BTreeMap::new();
    for word in words {
        let word = word.as_ref();
        let Some((key, value)) = word.split_once('=') else {
            return Err(OpsError::bad_input(format!(
                "{word:?} is not key=value (params look like tag=v1.4.2)"
            )));
        };
        let key = key.trim();
        let valid_key = !key.is_empty()
            && key.len() <= 64
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_key {
            return Err(OpsError::bad_input(format!(
                "{key:?} is not a param name (letters, digits, _ and -)"
            )));
        }
        if params.insert(key.to_string(), value.to_string()).is_some() {
            return Err(OpsError::bad_input(format!("param {key} is given twice")));
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse_and_refuse() {
        let ok = parse_params(&["tag=v1=2", "msg="]).unwrap_or_default();
        assert_eq!(ok["tag"], "v1=2");
        assert_eq!(ok["msg"], "");
        assert!(parse_params(&["novalue"]).is_err());
        assert!(parse_params(&["=x"]).is_err());
        assert!(parse_params(&["a=1", "a=2"]).is_err());
        assert!(parse_params(&["a;b=1"]).is_err());
    }

    #[test]
    fn one_person_has_one_identity() {
        let alice = identity("alice", "--as NAME").unwrap_or_default();
        assert_eq!(alice, "alice");
        for same in [
            "Alice",
            " ALICE",
            "alice\u{a0}",
            "\u{ff21}\u{ff2c}\u{ff29}\u{ff23}\u{ff25}",
        ] {
            assert_eq!(
                identity(same, "--as NAME").ok(),
                Some(alice.clone()),
                "{same:?}"
            );
            assert!(same_person(same, "alice"), "{same:?}");
        }
        assert_eq!(identity("Ann  Lee", "x").ok().as_deref(), Some("ann lee"));
        assert_eq!(identity("ﬁona", "x").ok().as_deref(), Some("fiona"));
        assert_eq!(identity("tg:12345", "x").ok().as_deref(), Some("tg:12345"));
        assert_eq!(identity("cli:Root", "x").ok().as_deref(), Some("cli:root"));
        assert!(!same_person("alice", "alicia"));
        assert!(!same_person("cli:alice", "alice"));
    }

    #[test]
    fn identities_refuse_empty_control_and_invisible_characters() {
        for (bad, says) in [
            ("", "empty"),
            ("   ", "empty"),
            ("a\u{7}b", "U+0007 is a control character"),
            ("ali\0ce", "U+0000 is a control character"),
            ("alice\n", "control character"),
            (
                "al\u{200b}ice",
                "U+200B is an invisible formatting character",
            ),
            ("\u{202e}ecila", "invisible formatting"),
            ("a\u{2028}b", "line or paragraph separator"),
            ("a\u{378}", "does not assign"),
        ] {
            match identity(bad, "--as NAME") {
                Err(OpsError::BadInput(m)) => {
                    assert!(m.starts_with("--as NAME must be 1 to 64"), "{m}");
                    assert!(m.contains(says), "{bad:?}: {m}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(identity(&"x".repeat(64), "x").is_ok());
        assert!(identity(&"x".repeat(65), "x").is_err());
        // NFKC can lengthen a name; the limit holds after it.
        assert!(identity(&"\u{fdfa}".repeat(4), "x").is_err());
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        // Every assigned, allowed character of the BMP and beyond, alone and after a letter.
        for c in (0..=0x10ffff_u32).filter_map(char::from_u32) {
            if !identity_char(c) {
                continue;
            }
            for text in [c.to_string(), format!("A{c}")] {
                let once = normalize_identity(&text);
                assert_eq!(normalize_identity(&once), once, "{:?}", codepoint(c));
            }
        }
    }

    #[test]
    fn nul_is_refused_in_strings_and_keys_with_where() {
        let ok = serde_json::json!({"a": ["x", 1, null, {"b": true}]});
        assert!(storable_json(&ok, "payload").is_ok());
        let cases = [
            (
                serde_json::json!({"a": "x\u{0}"}),
                "payload.a contains \\u0000",
            ),
            (
                serde_json::json!({"a": [1, {"b": "\u{0}"}]}),
                "payload.a[1].b contains",
            ),
            (
                serde_json::json!({"k\u{0}": 1}),
                "the key payload.\"k\\0\" contains",
            ),
            (serde_json::json!(["\u{0}"]), "payload[0] contains"),
        ];
        for (value, says) in cases {
            match storable_json(&value, "payload") {
                Err(OpsError::BadInput(m)) => {
                    assert!(m.contains(says), "{value}: {m}");
                    assert!(!m.contains('\0'), "the message itself is storable: {m:?}");
                }
                other => panic!("{value}: {other:?}"),
            }
        }
        assert!(storable_text("fine", "reason").is_ok());
        assert!(storable_text("a\0b", "reason").is_err());
    }

    #[test]
    fn ids_must_be_positive_numbers() {
        assert_eq!(parse_id("#12", "proposal").ok(), Some(12));
        assert!(parse_id("abc", "proposal").is_err());
        assert!(parse_id("0", "mission").is_err());
        assert!(parse_id("-3", "mission").is_err());
        assert!(parse_id("99999999999999999999", "mission").is_err());
    }
}
