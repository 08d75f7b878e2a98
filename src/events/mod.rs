//! The model stage: row changes to domain events (`mapping`) in a CloudEvents envelope
//! (`envelope`). Pure code: no I/O, no clocks.

pub mod envelope;
pub mod json;
pub mod mapping;
pub mod operation;
pub mod reserved;
pub mod rules;
pub mod schema;
