//! The loop's vocabulary: every event kind opsloop writes, who writes events and
//! proposals, and the status words of proposals, missions and steps (docs/events.md).
//! Each word is spelled once, here; SQL that needs one binds `as_str()`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Declares a closed vocabulary: an enum, its words, `as_str`, `Display`, `FromStr`,
/// serde as the word, and `ALL`.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // pad, not write_str: `{:<10}` aligns a word as it does a string
                f.pad(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;
            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($word => Ok($name::$variant),)+
                    _ => Err(UnknownWord { what: stringify!($name), word: s.to_string() }),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let word = String::deserialize(d)?;
                word.parse().map_err(serde::de::Error::custom)
            }
        }

        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }
            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                let word = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(word.parse()?)
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }
    };
}

/// A word that is not in its vocabulary (a database row written by a newer opsloop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownWord {
    pub what: &'static str,
    pub word: String,
}

impl fmt::Display for UnknownWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} {:?}", self.what, self.word)
    }
}

impl std::error::Error for UnknownWord {}

vocabulary! {
    /// Every event kind opsloop itself writes (docs/events.md). Users' own kinds are
    /// plain validated strings (`events::validate_user_kind`).
    EventKind {
        ProposalCreated = "proposal.created",
        ProposalApproved = "proposal.approved",
        ProposalRejected = "proposal.rejected",
        ProposalExpired = "proposal.expired",
        MissionStarted = "mission.started",
        MissionSucceeded = "mission.succeeded",
        MissionFailed = "mission.failed",
        MissionCancelled = "mission.cancelled",
        MissionRetried = "mission.retried",
        StepStarted = "step.started",
        StepSucceeded = "step.succeeded",
        StepRetrying = "step.retrying",
        StepFailed = "step.failed",
        StepRecovered = "step.recovered",
        StepSkipped = "step.skipped",
        StepProgress = "step.progress",
        QuestionAsked = "question.asked",
        QuestionAnswered = "question.answered",
        QuestionExpired = "question.expired",
        QuestionCancelled = "question.cancelled",
        TemplatePaused = "template.paused",
        TemplateResumed = "template.resumed",
        SystemPaused = "system.paused",
        SystemResumed = "system.resumed",
        SystemKilled = "system.killed",
        BudgetWarning = "budget.warning",
        BudgetExhausted = "budget.exhausted",
        BudgetRaised = "budget.raised",
        PolicyApplied = "policy.applied",
        UserGranted = "user.granted",
        UserRevoked = "user.revoked",
        KeyCreated = "key.created",
        KeyRevoked = "key.revoked",
    }
}

vocabulary! {
    /// Who caused something: where a proposal came from, who wrote an event.
    Source {
        Cli = "cli",
        Telegram = "telegram",
        Http = "http",
        Reaction = "reaction",
        Trigger = "trigger",
        Worker = "worker",
        Heartbeat = "heartbeat",
        Gate = "gate", // a gate refused a proposal
    }
}

impl Source {
    /// Proposals nobody typed: paused means these propose nothing.
    pub fn is_automatic(self) -> bool {
        matches!(self, Source::Reaction | Source::Trigger)
    }
}

vocabulary! {
    ProposalStatus { Pending = "pending", Approved = "approved", Rejected = "rejected", Expired = "expired" }
}

vocabulary! {
    MissionStatus { Running = "running", Succeeded = "succeeded", Failed = "failed", Cancelled = "cancelled" }
}

impl MissionStatus {
    pub fn is_finished(self) -> bool {
        self != MissionStatus::Running
    }
}

vocabulary! {
    StepStatus {
        Waiting = "waiting",
        Queued = "queued",
        Running = "running",
        Asking = "asking",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
        Skipped = "skipped",
    }
}

impl StepStatus {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded
                | StepStatus::Failed
                | StepStatus::Cancelled
                | StepStatus::Skipped
        )
    }
}

vocabulary! {
    QuestionStatus { Open = "open", Answered = "answered", Expired = "expired", Cancelled = "cancelled" }
}

vocabulary! {
    /// Who a question is put to (`to` in a policy's `ask` step, the API's `to`).
    Audience { Proposer = "proposer", Approvers = "approvers", Operators = "operators" }
}

impl From<EventKind> for std::borrow::Cow<'static, str> {
    fn from(kind: EventKind) -> Self {
        std::borrow::Cow::Borrowed(kind.as_str())
    }
}

impl From<Source> for String {
    fn from(source: Source) -> Self {
        source.as_str().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_round_trips_and_is_unique() {
        let mut seen = std::collections::HashSet::new();
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>(), Ok(*k));
            assert!(seen.insert(k.as_str()), "{k} twice");
        }
        assert_eq!(EventKind::ALL.len(), 33);
        for s in StepStatus::ALL {
            assert_eq!(s.as_str().parse::<StepStatus>(), Ok(*s));
        }
        assert!("mission.exploded".parse::<EventKind>().is_err());
    }

    #[test]
    fn a_word_is_padded_like_a_string() {
        // CLI tables align status columns with `{:<10}`.
        assert_eq!(format!("[{:<10}]", MissionStatus::Running), "[running   ]");
        assert_eq!(format!("[{:>6}]", StepStatus::Queued), "[queued]");
    }
}
