//! tidemark: a change-data-capture bridge from PostgreSQL logical replication to NATS
//! JetStream, exactly once and in commit order.
//!
//! Stages, each its own module: `config` (TOML to a validated `Config`), `postgres`
//! (replication session, catalog, pgoutput decoding, values), `events` (row changes to
//! CloudEvents), `jetstream` (provisioning and the ordered publisher), `position` (LSNs,
//! event ids and the exactly-once rule) and `pipeline` (one source, wired, crash-only).
//! `cli` holds the commands the binary runs.

pub mod backfill;
pub mod cli;
pub mod config;
pub mod error;
pub mod events;
pub mod jetstream;
pub mod policy;
pub mod position;
pub mod postgres;
pub mod projection;
pub mod replay;
pub mod secret;
pub mod source;
pub mod status;
pub mod telemetry;
