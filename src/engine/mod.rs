//! The loop: proposals through gates and approvals into missions, the worker and its
//! executors, the heartbeat with reactions and triggers, and the outbox to Telegram.

pub mod approvals;
pub mod budgets;
pub mod executors;
pub mod gates;
pub mod heartbeat;
pub mod keys;
pub mod missions;
pub mod notify;
pub mod proposals;
pub mod questions;
pub mod reactions;
pub mod retention;
pub mod status;
pub mod telemetry;
pub mod triggers;
pub mod worker;
