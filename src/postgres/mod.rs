//! The source stage: everything that speaks to PostgreSQL. `replication` is the
//! walsender session, `catalog` the ordinary session for checks and setup,
//! `pgoutput` and `values` the pure decoding of what replication sends.

pub mod catalog;
pub mod params;
pub mod pgoutput;
pub mod replication;
pub mod sqlstate;
pub mod tls;
pub mod values;
