//! What can go wrong in catalog work, each failure an operator must fix with its fix.

use crate::postgres::replication::quote_ident;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot connect to postgres at {target} as {user:?}")]
    Connect {
        target: String,
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("catalog query failed: {what}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "wal_level is {actual:?}, not \"logical\": set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
    )]
    WalLevel { actual: String },
    #[error(
        "PostgreSQL {version} is not supported: tidemark needs PostgreSQL 12 or newer; upgrade the server (PostgreSQL {version} is past its end of life), or stream from a newer server"
    )]
    UnsupportedVersion { version: String },
    #[error("{needed_for} cannot run: {why}; {or}")]
    NoSignals {
        needed_for: &'static str,
        why: String,
        or: &'static str,
    },
    #[error("PostgreSQL {version} cannot {what}: {why}; {fix}")]
    NeedsNewer {
        version: String,
        what: &'static str,
        why: &'static str,
        fix: String,
    },
    #[error("publication {name:?} does not exist and create_publication = false: run CREATE PUBLICATION {} FOR TABLE ... as an owner of the tables, or set create_publication = true", quote_ident(.name))]
    PublicationMissing { name: String },
    #[error("publication {publication:?} does not publish table {table}: run ALTER PUBLICATION {} ADD TABLE {table}, or set create_publication = true to let tidemark add it", quote_ident(.publication))]
    PublicationLacksTable { publication: String, table: String },
    #[error("publication {publication:?} sends the changes of partitioned table {table} under each partition's name (publish_via_partition_root = false), so they would not be the table's events: run ALTER PUBLICATION {} SET (publish_via_partition_root = true), or set create_publication = true to let tidemark set it", quote_ident(.publication))]
    PublicationByPartitions { publication: String, table: String },
    #[error(
        "config line {line}: a mapping names table {table}, which publication {publication:?} does not stream: add it to the source's tables, or remove the mapping"
    )]
    MappedTableNotStreamed {
        table: String,
        line: usize,
        publication: String,
    },
    #[error(
        "table {table} does not exist in database {dbname:?}: fix the tables list in the config{hint}"
    )]
    TableMissing {
        table: String,
        dbname: String,
        /// A table whose name differs only in case, said as `" (did you mean ...?)"`.
        hint: String,
    },
    #[error(
        "{table} is {what}, not a table: logical replication streams tables only; list the tables it is built from instead"
    )]
    NotATable { table: String, what: &'static str },
    #[error(
        "table {table} is UNLOGGED: its changes are not written to the WAL, so no replication slot can stream them; run ALTER TABLE {table} SET LOGGED, or remove it from the source's tables"
    )]
    Unlogged { table: String },
    #[error(
        "table {table} has no primary key and REPLICA IDENTITY {identity}: publishing it would make PostgreSQL reject UPDATE and DELETE on it; run ALTER TABLE {table} REPLICA IDENTITY FULL (or add a primary key) first"
    )]
    NoReplicaIdentity {
        table: String,
        identity: &'static str,
    },
    #[error(
        "replication slot {slot:?} does not exist and create_slot = false: create it with SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'), or set create_slot = true"
    )]
    SlotMissing { slot: String },
    #[error(
        "replication slot {slot:?} uses output plugin {plugin:?}; tidemark needs pgoutput: drop it or pick another slot name"
    )]
    SlotWrongPlugin { slot: String, plugin: String },
    #[error(
        "replication slot {slot:?} belongs to database {actual:?}, not {expected:?}: pick another slot name"
    )]
    SlotWrongDatabase {
        slot: String,
        actual: String,
        expected: String,
    },
    #[error(
        "replication slot {slot:?} is invalidated (wal_status = lost): PostgreSQL removed WAL it still needed (max_slot_wal_keep_size), so changes made while tidemark was behind are not in the stream; run `tidemark resync --yes` for this source to create a new slot, mark the gap in the stream and backfill every table (or `tidemark reset` to start over)"
    )]
    SlotInvalidated { slot: String },
    #[error(transparent)]
    Tls(#[from] crate::postgres::tls::TlsError),
    #[error(
        "postgres at {target} does not offer TLS, and sslmode = {mode} requires it: enable ssl on the server, or lower sslmode"
    )]
    TlsRefused { target: String, mode: &'static str },
    #[error("role {role:?} lacks {grant}: run {fix} (as a superuser), then start again")]
    MissingGrant {
        role: String,
        grant: String,
        fix: String,
    },
}

impl CatalogError {
    /// The SQLSTATE of an underlying database error, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            CatalogError::Connect { source, .. } | CatalogError::Query { source, .. } => {
                source.code().map(|c| c.code())
            }
            _ => None,
        }
    }
}
