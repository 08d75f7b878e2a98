//! The validated configuration: the only form the rest of the program sees.

use super::*;

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub nats: NatsConfig,
    pub sources: Vec<SourceConfig>,
    pub projections: Vec<ProjectionConfig>,
    pub metrics: Option<MetricsConfig>,
}

/// Where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: std::net::SocketAddr,
    /// Where `tidemark project` serves its metrics (it runs beside `run`).
    pub project_listen: Option<std::net::SocketAddr>,
    /// `/readyz` says not ready when a source lags more than this.
    pub ready_max_lag: Duration,
}

/// A read model: events of a source's stream applied to tables of a database.
#[derive(Debug, Clone)]
pub struct ProjectionConfig {
    pub name: String,
    pub source: String,
    /// The source's stream.
    pub stream: String,
    /// Subjects it reads (default: the whole stream).
    pub subjects: Vec<String>,
    /// Where events it cannot apply go, with the reason; None stops the projection.
    pub dead_letter: Option<String>,
    /// The target: a Postgres database, or a NATS KV bucket.
    pub target: Target,
    pub handlers: Vec<Handler>,
    /// The read model's tables (what a rebuild rebuilds): `tables`, or the tables the
    /// upsert and delete handlers name.
    pub tables: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Target {
    Postgres(PostgresConfig),
    Kv { bucket: String },
}

impl ProjectionConfig {
    /// The Postgres target, if that is the target.
    pub fn postgres(&self) -> Option<&PostgresConfig> {
        match &self.target {
            Target::Postgres(p) => Some(p),
            Target::Kv { .. } => None,
        }
    }
}

/// A KV key template's parts: text, and paths into the event.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyPart {
    Lit(String),
    Path(EventPath),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvOp {
    /// Replace the value.
    Put,
    /// Set these fields, keep the others.
    Merge,
    Delete,
    /// Delete every key that starts with the handler's key (a literal prefix; every
    /// key when there is none): a `truncated` event.
    Clear,
}

/// What events of some types do.
#[derive(Debug, Clone, PartialEq)]
pub struct Handler {
    pub types: Vec<String>,
    pub action: Action,
}

/// A path into an event, like `data.after.total` (`type`, `id`, `subject`, `time`
/// and `commitlsn` reach the envelope).
pub type EventPath = Vec<String>;

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A parameterised statement; `$1`.. are the params' values as text.
    Sql { sql: String, params: Vec<EventPath> },
    /// Insert or update a row by key: (column, path) pairs.
    Upsert {
        table: String,
        key: Vec<String>,
        columns: Vec<(String, EventPath)>,
    },
    /// Delete the row with this key.
    Delete {
        table: String,
        key: Vec<(String, EventPath)>,
    },
    /// A KV operation on the key the template gives.
    Kv {
        op: KvOp,
        key: Vec<KeyPart>,
        value: Vec<(String, EventPath)>,
    },
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub postgres: PostgresConfig,
    pub publication: String,
    pub slot: String,
    pub tables: TableSelection,
    pub create_publication: bool,
    pub create_slot: bool,
    pub stream: StreamConfig,
    pub publish_window: usize,
    pub max_event_bytes: usize,
    /// The largest replication message (one row change) read into memory.
    pub max_row_bytes: usize,
    pub ack_timeout: Duration,
    pub status_interval: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Mapping rules per table (`[[source.table]]`).
    pub mappings: Vec<TableSpec>,
    /// Outbox tables (`[[source.outbox]]`).
    pub outboxes: Vec<OutboxSpec>,
    /// Logical message prefixes that become events (`[[source.message]]`).
    pub messages: Vec<MessageSpec>,
    /// Publish each transaction as JetStream atomic batches (nats-server 2.12+).
    pub atomic_transactions: bool,
    /// Most events in one atomic batch; larger transactions are split.
    pub atomic_batch_max: usize,
    /// Publish a summary event after each transaction.
    pub transaction_events: bool,
    /// Whether a new slot starts with the existing rows.
    pub snapshot: SnapshotMode,
    /// Rows per backfill chunk.
    pub snapshot_chunk_size: u64,
    /// The tables an initial snapshot reads; None = every streamed table.
    pub snapshot_tables: Option<Vec<(String, String)>>,
    /// Write a heartbeat message into the WAL this often, proving progress end to end.
    pub heartbeat_interval: Option<Duration>,
    /// No progress for this long, while some is expected, is a stall: said loudly.
    pub stall_after: Duration,
    /// Silence on the replication connection after which it is presumed dead (half a
    /// timeout of silence asks the server for a reply).
    pub replication_timeout: Duration,
    /// Warn when the slot retains more WAL than this.
    pub warn_retained_wal_bytes: Option<u64>,
    /// The table whose rows carry tidemark's markers on PostgreSQL 12 and 13, which
    /// have no logical messages in pgoutput: (schema, table), default
    /// `tidemark.signal`.
    pub signal_table: (String, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// A new slot starts with a backfill of every streamed table.
    Initial,
    /// Only changes from the slot's creation on.
    Never,
}
