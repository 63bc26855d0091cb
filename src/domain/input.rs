//! Input from outside (command line, chat, HTTP) parsed into what the library takes:
//! one implementation, so every interface refuses the same things the same way.

use std::collections::BTreeMap;

use crate::error::{OpsError, OpsResult};

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
    fn ids_must_be_positive_numbers() {
        assert_eq!(parse_id("#12", "proposal").ok(), Some(12));
        assert!(parse_id("abc", "proposal").is_err());
        assert!(parse_id("0", "mission").is_err());
        assert!(parse_id("-3", "mission").is_err());
        assert!(parse_id("99999999999999999999", "mission").is_err());
    }
}
