//! The source stage: everything that speaks to PostgreSQL. `replication` is the
//! walsender session, `catalog` the ordinary session for checks and setup,
//! `pgoutput` and `values` the pure decoding of what replication sends.

pub(crate) mod catalog;
pub(crate) mod params;
pub(crate) mod pgoutput;
pub(crate) mod replication;
pub mod signal;
pub(crate) mod sqlstate;
pub(crate) mod tls;
pub mod values;
pub mod version;
