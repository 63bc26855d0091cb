//! Agent keys (design §11) as plain types: a key's name, its scopes, and the key text
//! itself, which exists only between its creation and the one time it is printed. What
//! is kept and compared is the SHA-256 of the text ([`digest`]).

use rand::TryRngCore;
use rand::rngs::OsRng;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::domain::error::{OpsError, OpsResult};
use crate::domain::policy::EventPattern;

/// Every agent key starts with this, so a leaked one is recognisable (and scanners can
/// find it) and the server can tell an agent key from `OPS_KEY` without a lookup.
pub const PREFIX: &str = "olk_";

/// Random characters after the prefix: 43 of 62 letters and digits, about 256 bits.
const RANDOM_CHARS: usize = 43;

const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A key's name: `^[a-z][a-z0-9_-]{0,31}$`. The agent it names proposes as `agent:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct KeyName(String);

impl KeyName {
    pub fn parse(raw: &str) -> OpsResult<KeyName> {
        let mut chars = raw.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        let rest_ok =
            chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
        if first_ok && rest_ok && raw.len() <= 32 {
            Ok(KeyName(raw.to_string()))
        } else {
            Err(OpsError::bad_input(format!(
                "invalid key name {:?}: 1 to 32 of a-z 0-9 _ -, starting with a letter",
                raw.chars().take(40).collect::<String>()
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identity this agent's proposals, answers and questions carry.
    pub fn principal(&self) -> String {
        format!("agent:{}", self.0)
    }
}

/// What a key may do. Approving is never among them: approvals come from people.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Scopes {
    /// Templates it may propose.
    pub propose: Vec<EventPattern>,
    /// Event kinds it may emit.
    pub emit: Vec<EventPattern>,
    /// May ask questions and answer them.
    pub answer: bool,
    /// May `GET` (missions, questions).
    pub read: bool,
}

impl Scopes {
    /// From the command line's or the table's pattern lists; every bad one is named.
    pub fn parse(
        propose: &[String],
        emit: &[String],
        answer: bool,
        read: bool,
    ) -> OpsResult<Scopes> {
        let mut problems = Vec::new();
        let mut patterns = |raw: &[String], flag: &str| -> Vec<EventPattern> {
            raw.iter()
                .filter_map(|p| {
                    EventPattern::parse(p)
                        .map_err(|e| problems.push(format!("--{flag}: {e}")))
                        .ok()
                })
                .collect()
        };
        let scopes = Scopes {
            propose: patterns(propose, "propose"),
            emit: patterns(emit, "emit"),
            answer,
            read,
        };
        if problems.is_empty() {
            Ok(scopes)
        } else {
            Err(OpsError::bad_input(problems.join("; ")))
        }
    }

    pub fn may_propose(&self, template: &str) -> bool {
        self.propose.iter().any(|p| p.matches(template))
    }

    pub fn may_emit(&self, kind: &str) -> bool {
        self.emit.iter().any(|p| p.matches(kind))
    }

    /// "propose draft*, emit writer.*, answer, read" (or "nothing").
    pub fn describe(&self) -> String {
        let list =
            |ps: &[EventPattern]| ps.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" ");
        let mut parts = Vec::new();
        if !self.propose.is_empty() {
            parts.push(format!("propose {}", list(&self.propose)));
        }
        if !self.emit.is_empty() {
            parts.push(format!("emit {}", list(&self.emit)));
        }
        if self.answer {
            parts.push("answer".to_string());
        }
        if self.read {
            parts.push("read".to_string());
        }
        if parts.is_empty() {
            "nothing".to_string()
        } else {
            parts.join(", ")
        }
    }

    pub fn patterns(list: &[EventPattern]) -> Vec<String> {
        list.iter().map(|p| p.as_str().to_string()).collect()
    }
}

/// A new key's text, from the operating system's CSPRNG: `olk_` and 43 letters and
/// digits (rejection sampling, so every character is equally likely).
pub fn generate() -> OpsResult<String> {
    let mut key = String::with_capacity(PREFIX.len() + RANDOM_CHARS);
    key.push_str(PREFIX);
    let mut buf = [0u8; 64];
    while key.len() < PREFIX.len() + RANDOM_CHARS {
        OsRng
            .try_fill_bytes(&mut buf)
            .map_err(|e| OpsError::Other(anyhow::anyhow!("the OS random source failed: {e}")))?;
        for byte in buf {
            // 248 = 4 × 62: below it, byte % 62 is uniform.
            if byte < 248 && key.len() < PREFIX.len() + RANDOM_CHARS {
                key.push(ALPHABET[usize::from(byte % 62)] as char);
            }
        }
    }
    Ok(key)
}

/// The hex SHA-256 of a key's whole text: what the table keeps and lookups use.
pub fn digest(key: &str) -> String {
    let bytes: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `text` has the shape of an agent key (cheap, before any lookup).
pub fn looks_like_key(text: &str) -> bool {
    text.len() == PREFIX.len() + RANDOM_CHARS
        && text.starts_with(PREFIX)
        && text[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        for ok in [
            "writer",
            "a",
            "scout-2",
            "x_y",
            "abcdefghijklmnopqrstuvwxyz012345",
        ] {
            assert!(KeyName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Writer",
            "2x",
            "-a",
            "a b",
            "a.b",
            "é",
            "abcdefghijklmnopqrstuvwxyz0123456",
        ] {
            assert!(KeyName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            KeyName::parse("writer").unwrap().principal(),
            "agent:writer"
        );
    }

    #[test]
    fn keys_are_random_prefixed_and_recognisable() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert!(looks_like_key(&a), "{a}");
        assert!(!looks_like_key("olk_short"));
        assert!(!looks_like_key(&a.replace("olk_", "olx_")));
        assert_eq!(digest(&a).len(), 64);
        assert_ne!(digest(&a), digest(&b));
    }

    #[test]
    fn scopes_match_patterns_and_name_bad_ones() {
        let s = Scopes::parse(&["draft*".into()], &["writer.*".into()], true, false).unwrap();
        assert!(s.may_propose("draft") && s.may_propose("draft-post"));
        assert!(!s.may_propose("publish"));
        assert!(s.may_emit("writer.done") && !s.may_emit("scout.done"));
        assert_eq!(s.describe(), "propose draft*, emit writer.*, answer");
        let err = Scopes::parse(
            &["Bad Pattern".into()],
            &["ok".into(), "".into()],
            false,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--propose") && err.contains("--emit"), "{err}");
        assert_eq!(Scopes::default().describe(), "nothing");
    }
}
