//! opsloop: a Telegram bot in front of an orchestration daemon. See ARCHITECTURE.md.
//!
//! The folders are the layers, each using only those below it:
//! `domain` (vocabulary, policy, no database) → `db` (connections, locks) →
//! `store` (each table's owner) → `engine` (the loop) → `interfaces` (cli, bot, http, daemon).

pub mod db;
pub mod domain;
pub mod engine;
pub mod interfaces;
pub mod store;

// Transitional: the old flat paths, until every import names its layer.
pub use domain::{config, error, input, policy, steps};
pub use engine::{
    approvals, executors, gates, heartbeat, missions, notify, proposals, reactions, retention,
    status, telemetry, triggers, worker,
};
pub use interfaces::{bench, bot, cli, daemon, doctor, http, logging};
pub use store::{events, users};
