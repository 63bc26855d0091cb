//! Who is talking, what they may do, and how fast.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use teloxide::types::User as TgUser;

use crate::domain::policy::TelegramPolicy;
use crate::engine::notify::escape;
use crate::store::users::{self, Role, User};

/// A stranger is told "not authorized" at most once per this window; what they send
/// meanwhile is dropped, not queued, so a flood costs the outbox one message.
pub const STRANGER_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Answers to all strangers together, per minute: many accounts flooding at once cost
/// the outbox at most this much (a stranger not answered now is answered later).
const STRANGER_ANSWERS_PER_MINUTE: u32 = 30;

pub struct Limiter {
    any: DefaultKeyedRateLimiter<i64>,
    propose: DefaultKeyedRateLimiter<i64>,
    /// Users already told to slow down since their last accepted command.
    told: Mutex<HashSet<i64>>,
    /// When each stranger was last answered.
    strangers: Mutex<HashMap<i64, Instant>>,
    stranger_answers: DefaultDirectRateLimiter,
}

fn quota(per_minute: u32, burst: u32) -> Quota {
    let nz = |n: u32| NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(nz(per_minute)).allow_burst(nz(burst))
}

/// What the limiter says about one command.
pub enum Pace {
    Ok,
    /// Over the limit; tell them (once).
    TellToSlowDown,
    /// Over the limit and already told: ignore.
    Ignore,
}

impl Limiter {
    pub fn new(limits: &TelegramPolicy) -> Limiter {
        Limiter {
            any: RateLimiter::keyed(quota(limits.commands_per_minute, limits.command_burst)),
            propose: RateLimiter::keyed(quota(limits.proposals_per_minute, limits.proposal_burst)),
            told: Mutex::new(HashSet::new()),
            strangers: Mutex::new(HashMap::new()),
            stranger_answers: RateLimiter::direct(quota(
                STRANGER_ANSWERS_PER_MINUTE,
                STRANGER_ANSWERS_PER_MINUTE,
            )),
        }
    }

    /// Whether to answer this stranger now (at most once per `STRANGER_WINDOW`).
    pub fn stranger(&self, user: i64) -> bool {
        let now = Instant::now();
        let Ok(mut answered) = self.strangers.lock() else {
            return false;
        };
        if answered
            .get(&user)
            .is_some_and(|at| now.duration_since(*at) < STRANGER_WINDOW)
        {
            return false;
        }
        if self.stranger_answers.check().is_err() {
            return false;
        }
        if answered.len() >= 1024 {
            answered.retain(|_, at| now.duration_since(*at) < STRANGER_WINDOW);
        }
        answered.insert(user, now);
        true
    }

    /// Any command.
    pub fn command(&self, user: i64) -> Pace {
        self.pace(user, self.any.check_key(&user).is_ok())
    }

    /// A valid proposal, about to be created (bad input costs nothing, so it is not counted).
    pub fn proposal(&self, user: i64) -> Pace {
        self.pace(user, self.propose.check_key(&user).is_ok())
    }

    fn pace(&self, user: i64, allowed: bool) -> Pace {
        let Ok(mut told) = self.told.lock() else {
            return Pace::Ok;
        };
        if allowed {
            told.remove(&user);
            Pace::Ok
        } else if told.insert(user) {
            Pace::TellToSlowDown
        } else {
            Pace::Ignore
        }
    }
}

/// The actor name of a Telegram user in proposals and approvals.
pub fn actor(user: &TgUser) -> String {
    format!("tg:{}", user.id.0)
}

pub fn display_name(user: &TgUser) -> String {
    let mut name = user.full_name();
    if name.trim().is_empty() {
        name = user
            .username
            .clone()
            .unwrap_or_else(|| user.id.0.to_string());
    }
    name.chars().take(64).collect()
}

/// What a stranger is told, and nothing more.
pub fn not_authorized(id: i64) -> String {
    format!(
        "⛔ Not authorized. Your Telegram id is <code>{id}</code>; an admin can <code>/grant {id} viewer</code>."
    )
}

/// Refusal text when `user` lacks `needed` (None when allowed).
pub fn refuse(user: Option<&User>, id: i64, needed: Role) -> Option<String> {
    match user.and_then(User::role) {
        None => Some(not_authorized(id)),
        Some(role) if role < needed => Some(format!(
            "⛔ Not allowed: this needs the {needed} role; you are {}.",
            escape(role.as_str())
        )),
        Some(_) => None,
    }
}

pub async fn seen(
    pool: &sqlx::PgPool,
    user: &TgUser,
    private: bool,
) -> crate::domain::error::OpsResult<Option<User>> {
    users::seen(pool, user.id.0 as i64, &display_name(user), private).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stranger_is_answered_once_per_window() {
        let limits = Limiter::new(&TelegramPolicy::default());
        assert!(limits.stranger(6666));
        for _ in 0..40 {
            assert!(!limits.stranger(6666), "the rest of a flood is dropped");
        }
        assert!(limits.stranger(7777), "another stranger is answered");
    }
}
