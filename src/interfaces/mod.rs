//! The ways in: the CLI, the Telegram bot, HTTP, and the processes that compose the
//! loop (`run`, `worker`, `doctor`, `bench`). They call the engine and the stores;
//! they never write SQL that changes state.

pub mod bench;
pub mod bot;
pub mod cli;
pub mod daemon;
pub mod doctor;
pub mod http;
pub mod logging;
