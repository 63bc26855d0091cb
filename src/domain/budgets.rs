//! Budgets' plain types (design §11): exact decimal amounts, periods, budget names, and
//! the `cost` a step reports in its output.
//!
//! Amounts are never floats: an [`Amount`] is validated decimal text (`12`, `0.25`),
//! carried as text into PostgreSQL `numeric`, where every sum and comparison happens.
//! No decimal crate is needed for that: Rust only checks the text's shape.

use std::fmt;

use serde_json::{Map, Value};

/// The most integer digits an amount may have (a trillion of anything is a typo).
const MAX_INT_DIGITS: usize = 15;
/// The most fractional digits (enough for a double printed in full, `0.30000000000000004`).
const MAX_FRACTION_DIGITS: usize = 20;

/// A non-negative exact decimal: `DIGITS[.DIGITS]`, as text PostgreSQL reads as `numeric`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Amount(String);

impl Amount {
    /// Plain decimal text: `12`, `0.25`, `1000.5`. No sign, exponent, spaces or `_`.
    pub fn parse(text: &str) -> Result<Amount, String> {
        let shown: String = text.chars().take(40).collect();
        if text.starts_with('-') && Amount::parse(&text[1..]).is_ok() {
            return Err(format!("{shown:?} is negative"));
        }
        let (int, fraction) = match text.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (text, None),
        };
        let digits = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
        };
        if !digits(int, MAX_INT_DIGITS) || fraction.is_some_and(|f| !digits(f, MAX_FRACTION_DIGITS))
        {
            return Err(format!(
                "{shown:?} is not a decimal number (digits, optionally a point and more digits; at most {MAX_INT_DIGITS} before the point)"
            ));
        }
        Ok(Amount(text.to_string()))
    }

    /// A JSON number (read as a double, then printed in full without an exponent), or a
    /// JSON string holding plain decimal text (what `key=value` output gives).
    pub fn from_json(value: &Value) -> Result<Amount, String> {
        match value {
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    return Amount::parse(&u.to_string());
                }
                match n.as_f64() {
                    Some(f) if f.is_finite() && f < 0.0 => Err(format!("{n} is negative")),
                    // Display of a double never uses an exponent: 1e-7 is 0.0000001.
                    Some(f) if f.is_finite() => Amount::parse(&format!("{}", f.abs())),
                    _ => Err(format!("{n} is not a finite number")),
                }
            }
            Value::String(s) => Amount::parse(s.trim()),
            other => Err(format!("expected a number, found {}", type_word(other))),
        }
    }

    /// An amount that must be more than zero (a raise, a limit).
    pub fn positive(text: &str) -> Result<Amount, String> {
        let a = Amount::parse(text.trim())?;
        if a.is_zero() {
            return Err(format!("{text:?} is zero; it must be more than zero"));
        }
        Ok(a)
    }

    pub fn is_zero(&self) -> bool {
        self.0.bytes().all(|b| b == b'0' || b == b'.')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn type_word(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
    }
}

/// The key of a step's output that reports what it spent.
pub const COST_KEY: &str = "cost";

/// The `cost` of a step's output: None when it reports none; an error (which fails the
/// attempt) when it is negative, not a number, or not a plain decimal.
pub fn cost_of(output: &Map<String, Value>) -> Result<Option<Amount>, String> {
    match output.get(COST_KEY) {
        None => Ok(None),
        Some(v) => Amount::from_json(v)
            .map(Some)
            .map_err(|e| format!("the output's cost is not a non-negative number: {e}")),
    }
}

/// How long a budget's period lasts: a UTC day or a UTC calendar month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    /// The word the policy, the database (`ops_budget_period`) and the JSON use.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    pub fn parse(s: &str) -> Result<Period, String> {
        match s {
            "day" => Ok(Period::Day),
            "month" => Ok(Period::Month),
            other => Err(format!(
                "unknown period {:?} (expected day or month, UTC)",
                other.chars().take(40).collect::<String>()
            )),
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A budget's (or an agent's) name: `^[a-z][a-z0-9_-]{0,31}$`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// The `proposed_by` of an agent's proposals (the agent keys' contract, design §11).
pub fn agent_actor(agent: &str) -> String {
    format!("agent:{agent}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn amounts_are_plain_decimals() {
        for ok in ["0", "12", "0.25", "1000.5", "000.10"] {
            assert_eq!(Amount::parse(ok).map(|a| a.0), Ok(ok.to_string()), "{ok}");
        }
        for bad in [
            "", "-1", "-0.5", "1e3", "NaN", "inf", "1.", ".5", "1,5", " 1", "+1", "1_000", "0x10",
            "1.2.3", "١",
        ] {
            assert!(Amount::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Amount::parse("-2").unwrap_err().contains("negative"));
        assert!(Amount::parse(&"9".repeat(16)).is_err());
        assert!(Amount::positive("0.00").is_err());
        assert!(Amount::positive("0.01").is_ok());
    }

    #[test]
    fn costs_from_json() {
        let cost = |v: Value| cost_of(json!({ "cost": v }).as_object().unwrap());
        assert_eq!(cost(json!(0.1)).unwrap().unwrap().as_str(), "0.1");
        assert_eq!(cost(json!(3)).unwrap().unwrap().as_str(), "3");
        assert_eq!(cost(json!(1e-7)).unwrap().unwrap().as_str(), "0.0000001");
        assert_eq!(cost(json!("2.50")).unwrap().unwrap().as_str(), "2.50");
        for bad in [
            json!(-1),
            json!(-0.5),
            json!("NaN"),
            json!("cheap"),
            json!(true),
            json!(null),
            json!([1]),
            json!({}),
            json!(1e300),
        ] {
            assert!(cost(bad.clone()).is_err(), "{bad}");
        }
        assert_eq!(cost_of(&Map::new()), Ok(None));
    }

    #[test]
    fn names_and_periods() {
        assert!(valid_name("writing"));
        assert!(valid_name("a-b_2"));
        for bad in ["", "Writing", "1a", "a b", &"a".repeat(33)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(Period::parse("day"), Ok(Period::Day));
        assert!(Period::parse("week").is_err());
    }
}
