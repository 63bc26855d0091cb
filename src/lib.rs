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
