//! tidemark: a change-data-capture bridge from PostgreSQL logical replication to NATS
//! JetStream, exactly once and in commit order.
//!
//! The modules, in layers from the bottom (a module names only its own layer or one
//! below; `tests/layers.rs` enforces it):
//! - model, pure: `position` (LSNs, event ids, the exactly-once rule), `events`
//!   (mapping, rules, envelope, reserved names), `postgres::pgoutput` and
//!   `postgres::values` (decoding), `error` (error chains), `secret`;
//! - adapters, each with its own parameter types: `postgres` (replication session,
//!   catalog, TLS, SQLSTATEs), `jetstream` (provisioning, the ordered publisher),
//!   `telemetry` (metrics and probes);
//! - `config`: the TOML file, validated into the adapters' and stages' types;
//! - stages: `source` (one source's pipeline, crash-only), `backfill` (snapshots),
//!   `projection` (read models and the consumer API), `policy` (the one retry, stand by
//!   or stop table they share);
//! - operations: `ops` (slot drop, reset, resync, backfill queueing, read-your-writes),
//!   `replay`, `status`;
//! - `cli`: parses, calls, renders, and maps the outcome to an exit code in one place.
//!
//! The public API for services in Rust is `projection::Consumer` and `config::load`,
//! with `position` (LSNs and event ids). `cli` is public for the binary, and
//! `postgres::values` and `telemetry` for the property and deploy tests; every other
//! module is private to the crate, so what is not used is reported as dead code.

pub(crate) mod backfill;
pub mod cli;
pub mod config;
pub(crate) mod error;
pub(crate) mod events;
pub(crate) mod jetstream;
pub(crate) mod ops;
pub(crate) mod policy;
pub mod position;
pub mod postgres;
pub mod projection;
pub(crate) mod replay;
pub(crate) mod secret;
pub(crate) mod source;
pub(crate) mod status;
pub mod telemetry;
