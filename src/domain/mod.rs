//! The ground floor: the loop's vocabulary, errors, configuration, outside input and the
//! policy file, as plain types. Nothing here touches the database.

pub mod budgets;
pub mod config;
pub mod error;
pub mod input;
pub mod keys;
pub mod outputs;
pub mod policy;
pub mod steps;
pub mod vocab;
