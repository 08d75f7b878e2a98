//! The config file as written: serde structs that mirror the TOML, with spans kept
//! on the values that are checked later, so an issue names its line.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) nats: Spanned<RawNats>,
    #[serde(default)]
    pub(super) source: Vec<Spanned<RawSource>>,
    #[serde(default)]
    pub(super) projection: Vec<Spanned<RawProjection>>,
    pub(super) metrics: Option<Spanned<RawMetrics>>,
}

/// `[metrics]`: the Prometheus and health endpoints.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Spanned<String>,
    pub(super) project_listen: Option<Spanned<String>>,
    pub(super) ready_max_lag_secs: Option<Spanned<u64>>,
}

/// `[[projection]]`: a read model built from a source's stream.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProjection {
    pub(super) name: Spanned<String>,
    pub(super) source: Spanned<String>,
    pub(super) subjects: Option<Spanned<Vec<String>>>,
    pub(super) dead_letter: Option<Spanned<String>>,
    pub(super) tables: Option<Spanned<Vec<String>>>,
    pub(super) postgres: Option<Spanned<RawPostgres>>,
    pub(super) kv_bucket: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) on: Vec<Spanned<RawHandler>>,
}

/// `[[projection.on]]`: what events of some types do to the read model.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHandler {
    #[serde(rename = "type")]
    pub(super) types: Spanned<toml::Value>,
    pub(super) sql: Option<Spanned<String>>,
    pub(super) params: Option<Spanned<Vec<String>>>,
    pub(super) upsert: Option<Spanned<String>>,
    pub(super) delete: Option<Spanned<String>>,
    pub(super) key: Option<Spanned<toml::Value>>,
    pub(super) columns: Option<Spanned<toml::Table>>,
    pub(super) kv: Option<Spanned<String>>,
    pub(super) value: Option<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNats {
    pub(super) servers: Spanned<Vec<String>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) password_env: Option<Spanned<String>>,
    pub(super) password_file: Option<Spanned<String>>,
    pub(super) token_env: Option<Spanned<String>>,
    pub(super) token_file: Option<Spanned<String>>,
    pub(super) credentials_file: Option<Spanned<String>>,
    pub(super) nkey_seed_env: Option<Spanned<String>>,
    pub(super) nkey_seed_file: Option<Spanned<String>>,
    pub(super) connect_timeout_secs: Option<Spanned<u64>>,
    pub(super) tls_ca_file: Option<Spanned<String>>,
    pub(super) tls_required: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) name: Spanned<String>,
    pub(super) postgres: Spanned<RawPostgres>,
    pub(super) publication: Spanned<String>,
    pub(super) slot: Spanned<String>,
    pub(super) tables: Option<Spanned<Vec<String>>>,
    pub(super) all_tables: Option<Spanned<bool>>,
    pub(super) create_publication: Option<bool>,
    pub(super) create_slot: Option<bool>,
    pub(super) stream: Spanned<RawStream>,
    pub(super) publish_window: Option<Spanned<u64>>,
    pub(super) max_event_bytes: Option<Spanned<u64>>,
    pub(super) max_row_bytes: Option<Spanned<u64>>,
    pub(super) ack_timeout_secs: Option<Spanned<u64>>,
    pub(super) status_interval_secs: Option<Spanned<u64>>,
    pub(super) restart_backoff_initial_ms: Option<Spanned<u64>>,
    pub(super) restart_backoff_max_secs: Option<Spanned<u64>>,
    pub(super) atomic_transactions: Option<bool>,
    pub(super) snapshot: Option<Spanned<String>>,
    pub(super) snapshot_chunk_size: Option<Spanned<u64>>,
    pub(super) snapshot_tables: Option<Spanned<Vec<String>>>,
    pub(super) transaction_events: Option<bool>,
    pub(super) atomic_batch_max: Option<Spanned<u64>>,
    pub(super) heartbeat_interval_secs: Option<Spanned<u64>>,
    pub(super) stall_after_secs: Option<Spanned<u64>>,
    pub(super) replication_timeout_secs: Option<Spanned<u64>>,
    pub(super) warn_retained_wal_bytes: Option<Spanned<u64>>,
    pub(super) signal_table: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) table: Vec<Spanned<RawTable>>,
    #[serde(default)]
    pub(super) outbox: Vec<Spanned<RawOutbox>>,
    #[serde(default)]
    pub(super) message: Vec<Spanned<RawMessage>>,
}

/// `[[source.table]]`: how one table's changes become domain events.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTable {
    pub(super) name: Spanned<String>,
    pub(super) key: Option<Spanned<Vec<String>>>,
    pub(super) include: Option<Spanned<Vec<String>>>,
    pub(super) exclude: Option<Spanned<Vec<String>>>,
    pub(super) rename: Option<Spanned<toml::Table>>,
    pub(super) subject: Option<Spanned<String>>,
    pub(super) attributes: Option<Spanned<toml::Table>>,
    pub(super) insert: Option<Spanned<toml::Value>>,
    pub(super) update: Option<Spanned<toml::Value>>,
    pub(super) delete: Option<Spanned<toml::Value>>,
    pub(super) truncate: Option<Spanned<toml::Value>>,
    pub(super) read: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(super) rule: Vec<Spanned<RawRule>>,
    pub(super) oversized: Option<Spanned<String>>,
    pub(super) oversized_columns: Option<Spanned<Vec<String>>>,
}

/// `[[source.table.rule]]`: a condition and the event it picks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) on: Option<Spanned<toml::Value>>,
    pub(super) changed: Option<Spanned<Vec<String>>>,
    pub(super) new: Option<Spanned<toml::Table>>,
    pub(super) old: Option<Spanned<toml::Table>>,
    pub(super) event: Option<Spanned<String>>,
    pub(super) drop: Option<Spanned<bool>>,
}

/// `[[source.outbox]]`: a transactional outbox table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbox {
    pub(super) table: Spanned<String>,
    pub(super) id_column: Option<Spanned<String>>,
    pub(super) aggregate_type_column: Option<Spanned<String>>,
    pub(super) aggregate_id_column: Option<Spanned<String>>,
    pub(super) event_type_column: Option<Spanned<String>>,
    pub(super) payload_column: Option<Spanned<String>>,
    pub(super) headers_column: Option<Spanned<String>>,
    pub(super) subject: Option<Spanned<String>>,
}

/// `[[source.message]]`: logical decoding messages with a prefix.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMessage {
    pub(super) prefix: Spanned<String>,
    pub(super) event_type: Option<Spanned<String>>,
    pub(super) type_field: Option<Spanned<String>>,
    pub(super) subject: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPostgres {
    pub(super) host: Spanned<String>,
    pub(super) port: Option<Spanned<u64>>,
    pub(super) dbname: Spanned<String>,
    pub(super) user: Spanned<String>,
    pub(super) password_env: Option<Spanned<String>>,
    pub(super) password_file: Option<Spanned<String>>,
    pub(super) connect_timeout_secs: Option<Spanned<u64>>,
    pub(super) sslmode: Option<Spanned<String>>,
    pub(super) sslrootcert: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStream {
    pub(super) name: Spanned<String>,
    pub(super) subjects: Option<Spanned<Vec<String>>>,
    pub(super) storage: Option<Spanned<String>>,
    pub(super) replicas: Option<Spanned<u64>>,
    pub(super) max_age_secs: Option<Spanned<u64>>,
    pub(super) max_bytes: Option<Spanned<u64>>,
    pub(super) duplicate_window_secs: Option<Spanned<u64>>,
}

// ---------------------------------------------------------------------------------
// The validated model.
// ---------------------------------------------------------------------------------
