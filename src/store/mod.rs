//! The tables' owners: each table's statements live in exactly one module here, one
//! small named statement per state transition.

pub mod approvals;
pub mod events;
pub mod outbox;
pub mod policy;
pub mod proposals;
pub mod triggers;
pub mod users;
