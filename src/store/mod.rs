//! The tables' owners: each table's statements live in exactly one module here, one
//! small named statement per state transition. A set-based statement that changes
//! several tables at once (a batch and its events) is written by the owner of its main
//! table and takes the other tables' inserts from their owners (`insert_events!`,
//! `insert_runs!`). Exception: `interfaces::bench` seeds scratch databases with raw
//! inserts.

pub mod dead_letters;
pub mod events;
pub mod missions;
pub mod policy;
pub mod reactions;
pub mod runs;
pub mod steps;
pub mod users;
pub mod workers;
