//! The tables' owners: each table's statements live in exactly one module here, one
//! small named statement per state transition.

pub mod events;
pub mod policy;
pub mod users;
