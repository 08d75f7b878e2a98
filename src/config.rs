//! Configuration: the TOML file, parsed into a raw model, then validated into `Config`,
//! the only form the rest of the program sees.
//!
//! Every problem is reported as `file:line: key: message`, and validation collects all
//! of them before giving up, so an operator fixes a file in one pass. `${VAR}` in the
//! file is replaced by the environment variable before parsing (comments excepted), and
//! a missing variable is named with its line. Passwords never sit in the file: they come
//! from an environment variable or a file, and are `Secret`s that never reach `Debug`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::events::operation::Operation;
use crate::events::rules::{
    Choice, Literal, MESSAGE_PLACEHOLDERS, MessageSpec, OUTBOX_PLACEHOLDERS, OutboxSpec, Oversized,
    RuleSpec, TABLE_PLACEHOLDERS, TableSpec, Template,
};
pub use crate::jetstream::params::{NatsAuth, NatsConfig, Storage, StreamConfig};
pub use crate::postgres::params::{PostgresConfig, SslMode, TableSelection};
pub use crate::secret::Secret;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_issues(.path, .issues))]
    Invalid {
        path: PathBuf,
        issues: Vec<ConfigIssue>,
    },
}

impl ConfigError {
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { issues, .. } => issues,
        }
    }
}

fn render_issues(path: &Path, issues: &[ConfigIssue]) -> String {
    let lines: Vec<String> = issues
        .iter()
        .map(|i| {
            let loc = match i.line {
                Some(l) => format!("{}:{l}", path.display()),
                None => path.display().to_string(),
            };
            if i.key.is_empty() {
                format!("{loc}: {}", i.message)
            } else {
                format!("{loc}: {}: {}", i.key, i.message)
            }
        })
        .collect();
    lines.join("\n")
}

// ---------------------------------------------------------------------------------
// The raw model: what the file says, with spans kept on values checked later.
// ---------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    nats: Spanned<RawNats>,
    #[serde(default)]
    source: Vec<Spanned<RawSource>>,
    #[serde(default)]
    projection: Vec<Spanned<RawProjection>>,
    metrics: Option<Spanned<RawMetrics>>,
}

/// `[metrics]`: the Prometheus and health endpoints.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
    project_listen: Option<Spanned<String>>,
    ready_max_lag_secs: Option<Spanned<u64>>,
}

/// `[[projection]]`: a read model built from a source's stream.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProjection {
    name: Spanned<String>,
    source: Spanned<String>,
    subjects: Option<Spanned<Vec<String>>>,
    dead_letter: Option<Spanned<String>>,
    tables: Option<Spanned<Vec<String>>>,
    postgres: Option<Spanned<RawPostgres>>,
    kv_bucket: Option<Spanned<String>>,
    #[serde(default)]
    on: Vec<Spanned<RawHandler>>,
}

/// `[[projection.on]]`: what events of some types do to the read model.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    #[serde(rename = "type")]
    types: Spanned<toml::Value>,
    sql: Option<Spanned<String>>,
    params: Option<Spanned<Vec<String>>>,
    upsert: Option<Spanned<String>>,
    delete: Option<Spanned<String>>,
    key: Option<Spanned<toml::Value>>,
    columns: Option<Spanned<toml::Table>>,
    kv: Option<Spanned<String>>,
    value: Option<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    servers: Spanned<Vec<String>>,
    user: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    token_env: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    credentials_file: Option<Spanned<String>>,
    nkey_seed_env: Option<Spanned<String>>,
    nkey_seed_file: Option<Spanned<String>>,
    connect_timeout_secs: Option<Spanned<u64>>,
    tls_ca_file: Option<Spanned<String>>,
    tls_required: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Spanned<String>,
    postgres: Spanned<RawPostgres>,
    publication: Spanned<String>,
    slot: Spanned<String>,
    tables: Option<Spanned<Vec<String>>>,
    all_tables: Option<Spanned<bool>>,
    create_publication: Option<bool>,
    create_slot: Option<bool>,
    stream: Spanned<RawStream>,
    publish_window: Option<Spanned<u64>>,
    max_event_bytes: Option<Spanned<u64>>,
    max_row_bytes: Option<Spanned<u64>>,
    ack_timeout_secs: Option<Spanned<u64>>,
    status_interval_secs: Option<Spanned<u64>>,
    restart_backoff_initial_ms: Option<Spanned<u64>>,
    restart_backoff_max_secs: Option<Spanned<u64>>,
    atomic_transactions: Option<bool>,
    snapshot: Option<Spanned<String>>,
    snapshot_chunk_size: Option<Spanned<u64>>,
    snapshot_tables: Option<Spanned<Vec<String>>>,
    transaction_events: Option<bool>,
    atomic_batch_max: Option<Spanned<u64>>,
    heartbeat_interval_secs: Option<Spanned<u64>>,
    stall_after_secs: Option<Spanned<u64>>,
    replication_timeout_secs: Option<Spanned<u64>>,
    warn_retained_wal_bytes: Option<Spanned<u64>>,
    #[serde(default)]
    table: Vec<Spanned<RawTable>>,
    #[serde(default)]
    outbox: Vec<Spanned<RawOutbox>>,
    #[serde(default)]
    message: Vec<Spanned<RawMessage>>,
}

/// `[[source.table]]`: how one table's changes become domain events.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: Spanned<String>,
    key: Option<Spanned<Vec<String>>>,
    include: Option<Spanned<Vec<String>>>,
    exclude: Option<Spanned<Vec<String>>>,
    rename: Option<Spanned<toml::Table>>,
    subject: Option<Spanned<String>>,
    attributes: Option<Spanned<toml::Table>>,
    insert: Option<Spanned<toml::Value>>,
    update: Option<Spanned<toml::Value>>,
    delete: Option<Spanned<toml::Value>>,
    truncate: Option<Spanned<toml::Value>>,
    read: Option<Spanned<toml::Value>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    oversized: Option<Spanned<String>>,
    oversized_columns: Option<Spanned<Vec<String>>>,
}

/// `[[source.table.rule]]`: a condition and the event it picks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    on: Option<Spanned<toml::Value>>,
    changed: Option<Spanned<Vec<String>>>,
    new: Option<Spanned<toml::Table>>,
    old: Option<Spanned<toml::Table>>,
    event: Option<Spanned<String>>,
    drop: Option<Spanned<bool>>,
}

/// `[[source.outbox]]`: a transactional outbox table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    table: Spanned<String>,
    id_column: Option<Spanned<String>>,
    aggregate_type_column: Option<Spanned<String>>,
    aggregate_id_column: Option<Spanned<String>>,
    event_type_column: Option<Spanned<String>>,
    payload_column: Option<Spanned<String>>,
    headers_column: Option<Spanned<String>>,
    subject: Option<Spanned<String>>,
}

/// `[[source.message]]`: logical decoding messages with a prefix.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    prefix: Spanned<String>,
    event_type: Option<Spanned<String>>,
    type_field: Option<Spanned<String>>,
    subject: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    host: Spanned<String>,
    port: Option<Spanned<u64>>,
    dbname: Spanned<String>,
    user: Spanned<String>,
    password_env: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    connect_timeout_secs: Option<Spanned<u64>>,
    sslmode: Option<Spanned<String>>,
    sslrootcert: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    name: Spanned<String>,
    subjects: Option<Spanned<Vec<String>>>,
    storage: Option<Spanned<String>>,
    replicas: Option<Spanned<u64>>,
    max_age_secs: Option<Spanned<u64>>,
    max_bytes: Option<Spanned<u64>>,
    duplicate_window_secs: Option<Spanned<u64>>,
}

// ---------------------------------------------------------------------------------
// The validated model.
// ---------------------------------------------------------------------------------

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// A new slot starts with a backfill of every streamed table.
    Initial,
    /// Only changes from the slot's creation on.
    Never,
}

pub const DEFAULT_PUBLISH_WINDOW: usize = 1024;
/// nats-server's limit on messages in one atomic batch.
pub const DEFAULT_ATOMIC_BATCH_MAX: u64 = 1000;
/// Below nats-server's default `max_payload` (1 MiB), leaving room for headers.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1_000_000;

/// Loads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, &|k| std::env::var(k).ok())
}

/// Parses and validates config text; `env` looks up environment variables.
pub fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let invalid = |issues| ConfigError::Invalid {
        path: path.to_path_buf(),
        issues,
    };
    let text = interpolate(text, env).map_err(invalid)?;
    let raw: RawConfig = {
        let de = toml::Deserializer::parse(&text)
            .map_err(|e| invalid(vec![toml_issue(&text, &e, "")]))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            // Spanned wraps values in a private field whose name shows up in the path.
            let key = e
                .path()
                .to_string()
                .split('.')
                .filter(|seg| !seg.starts_with("$__serde_spanned"))
                .collect::<Vec<_>>()
                .join(".");
            let key = if key.is_empty() || key == "." {
                String::new()
            } else {
                key
            };
            invalid(vec![toml_issue(&text, e.inner(), &key)])
        })?
    };
    let mut v = Validator {
        text: &text,
        issues: Vec::new(),
        env,
        base: path.parent().unwrap_or(Path::new(".")),
    };
    let config = v.config(path, raw);
    if v.issues.is_empty() {
        Ok(config)
    } else {
        Err(invalid(v.issues))
    }
}

fn toml_issue(text: &str, e: &toml::de::Error, key: &str) -> ConfigIssue {
    ConfigIssue {
        line: e.span().map(|s| line_of(text, s.start)),
        key: key.to_string(),
        message: e.message().trim().to_string(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Replaces `${NAME}` with the variable's value, outside comments. Every missing
/// variable is an issue naming it and its line.
fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigIssue>> {
    let mut out = String::with_capacity(text.len());
    let mut issues = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        let mut in_string: Option<char> = None;
        while let Some(c) = rest.chars().next() {
            if in_string.is_none() && c == '#' {
                out.push_str(rest);
                break;
            }
            if c == '"' || c == '\'' {
                in_string = match in_string {
                    None => Some(c),
                    Some(q) if q == c => None,
                    other => other,
                };
            }
            if c == '\\' && in_string == Some('"') && rest.len() > 1 {
                let next = rest[1..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&rest[..1 + next]);
                rest = &rest[1 + next..];
                continue;
            }
            if rest.starts_with("${")
                && let Some(end) = rest.find('}')
            {
                let name = &rest[2..end];
                match env(name) {
                    Some(v) => out.push_str(&v),
                    None => issues.push(ConfigIssue {
                        line: Some(n + 1),
                        key: String::new(),
                        message: format!(
                            "environment variable {name} is not set (the file refers to it as ${{{name}}})"
                        ),
                    }),
                }
                rest = &rest[end + 1..];
                continue;
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(issues)
    }
}

struct Validator<'a> {
    text: &'a str,
    issues: Vec<ConfigIssue>,
    env: &'a dyn Fn(&str) -> Option<String>,
    base: &'a Path,
}

impl Validator<'_> {
    fn issue<T>(&mut self, at: &Spanned<T>, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            line: Some(line_of(self.text, at.span().start)),
            key: key.into(),
            message: message.into(),
        });
    }

    /// A whole number in `range`, or the default when absent.
    fn number(
        &mut self,
        v: &Option<Spanned<u64>>,
        key: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        match v {
            None => default,
            Some(s) if range.contains(s.get_ref()) => *s.get_ref(),
            Some(s) => {
                self.issue(
                    s,
                    key,
                    format!(
                        "{} is out of range: use a value from {} to {}",
                        s.get_ref(),
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    /// A secret from an environment variable or a file; at most one may be given.
    fn secret(
        &mut self,
        env_key: &str,
        env_var: &Option<Spanned<String>>,
        file_key: &str,
        file: &Option<Spanned<String>>,
    ) -> Option<Secret> {
        match (env_var, file) {
            (Some(e), Some(_)) => {
                self.issue(
                    e,
                    env_key,
                    format!("set either {env_key} or {file_key}, not both"),
                );
                None
            }
            (Some(e), None) => match (self.env)(e.get_ref()) {
                Some(v) => Some(Secret::new(v)),
                None => {
                    self.issue(
                        e,
                        env_key,
                        format!("environment variable {} is not set", e.get_ref()),
                    );
                    None
                }
            },
            (None, Some(f)) => {
                let path = self.base.join(f.get_ref());
                match std::fs::read_to_string(&path) {
                    Ok(v) => Some(Secret::new(v.trim_end_matches(['\n', '\r']).to_string())),
                    Err(err) => {
                        self.issue(
                            f,
                            file_key,
                            format!("cannot read {}: {err}", path.display()),
                        );
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }

    fn config(&mut self, path: &Path, raw: RawConfig) -> Config {
        let nats = self.nats(raw.nats);
        if raw.source.is_empty() {
            self.issues.push(ConfigIssue {
                line: None,
                key: "source".into(),
                message: "no [[source]] is configured: add one per database to stream".into(),
            });
        }
        let mut sources = Vec::new();
        let mut names = HashSet::new();
        let mut streams = HashSet::new();
        for (i, s) in raw.source.into_iter().enumerate() {
            let prefix = format!("source[{i}]");
            let src = s.into_inner();
            if !names.insert(src.name.get_ref().clone()) {
                self.issue(&src.name, format!("{prefix}.name"), "duplicate source name");
            }
            if !streams.insert(src.stream.get_ref().name.get_ref().clone()) {
                self.issue(
                    &src.stream.get_ref().name,
                    format!("{prefix}.stream.name"),
                    "another source already writes this stream: each source needs its own stream",
                );
            }
            sources.push(self.source(&prefix, src));
        }
        let mut projections = Vec::new();
        let mut proj_names = HashSet::new();
        for (i, p) in raw.projection.iter().enumerate() {
            let prefix = format!("projection[{i}]");
            if !proj_names.insert(p.get_ref().name.get_ref().clone()) {
                self.issue(
                    &p.get_ref().name,
                    format!("{prefix}.name"),
                    "duplicate projection name",
                );
            }
            if let Some(pc) = self.projection(&prefix, p, &sources) {
                projections.push(pc);
            }
        }
        let metrics = raw.metrics.as_ref().and_then(|m| {
            let m = m.get_ref();
            let ready_max_lag = Duration::from_secs(self.number(
                &m.ready_max_lag_secs,
                "metrics.ready_max_lag_secs",
                60,
                1..=86_400,
            ));
            let project_listen = match &m.project_listen {
                Some(p) => match p.get_ref().parse::<std::net::SocketAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        self.issue(
                            p,
                            "metrics.project_listen",
                            "use an address and port, like \"127.0.0.1:9188\"",
                        );
                        None
                    }
                },
                None => None,
            };
            match m.listen.get_ref().parse::<std::net::SocketAddr>() {
                Ok(listen) => Some(MetricsConfig {
                    listen,
                    project_listen,
                    ready_max_lag,
                }),
                Err(_) => {
                    self.issue(
                        &m.listen,
                        "metrics.listen",
                        "use an address and port, like \"127.0.0.1:9187\" or \"0.0.0.0:9187\"",
                    );
                    None
                }
            }
        });
        Config {
            path: path.to_path_buf(),
            metrics,
            nats,
            projections,
            sources,
        }
    }

    fn path(&mut self, at: &Spanned<impl Sized>, key: &str, text: &str) -> EventPath {
        let parts: Vec<String> = text.split('.').map(str::to_string).collect();
        if text.is_empty() || parts.iter().any(|p| p.is_empty()) {
            self.issue(
                at,
                key,
                format!(
                    "{text:?} is not a path into an event: use dots, like \"data.after.total\""
                ),
            );
        }
        parts
    }

    fn projection(
        &mut self,
        prefix: &str,
        p: &Spanned<RawProjection>,
        sources: &[SourceConfig],
    ) -> Option<ProjectionConfig> {
        let p = p.get_ref();
        let name = p.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            self.issue(
                &p.name,
                format!("{prefix}.name"),
                "use lowercase letters, digits and '_': the name keys its checkpoint and consumer",
            );
        }
        let source = sources.iter().find(|s| &s.name == p.source.get_ref());
        let Some(source) = source else {
            self.issue(
                &p.source,
                format!("{prefix}.source"),
                format!("no [[source]] is named {:?}", p.source.get_ref()),
            );
            return None;
        };
        // A dead letter the source's own stream captures would be stored as one of
        // the source's events: a write into a stream only the source may write, which
        // breaks its sequence chain and stops the source.
        if let Some(d) = &p.dead_letter
            && let Some(covering) = source
                .stream
                .subjects
                .iter()
                .find(|s| crate::jetstream::provision::subject_covers(s, d.get_ref()))
        {
            self.issue(
                d,
                format!("{prefix}.dead_letter"),
                format!(
                    "{:?} is captured by the source's stream {:?} (subject {covering:?}), which only the source may write: use a subject outside it, e.g. \"deadletter.{}\", with a stream of its own",
                    d.get_ref(),
                    source.stream.name,
                    p.name.get_ref()
                ),
            );
        }
        let target = match (&p.postgres, &p.kv_bucket) {
            (Some(pg), None) => Target::Postgres(self.postgres(prefix, pg.get_ref().clone())),
            (None, Some(b)) => {
                let bucket = b.get_ref().clone();
                if bucket.is_empty()
                    || !bucket
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    self.issue(
                        b,
                        format!("{prefix}.kv_bucket"),
                        "a KV bucket name has letters, digits, '_' and '-'",
                    );
                }
                Target::Kv { bucket }
            }
            _ => {
                self.issue(
                    &p.name,
                    format!("{prefix}.postgres"),
                    "give the read model's target: a [projection.postgres] section, or kv_bucket = \"NAME\"",
                );
                return None;
            }
        };
        let kv_target = matches!(target, Target::Kv { .. });
        let mut handlers = Vec::new();
        for (i, h) in p.on.iter().enumerate() {
            let key = format!("{prefix}.on[{i}]");
            let h = h.get_ref();
            let types: Vec<String> = match h.types.get_ref() {
                toml::Value::String(t) => vec![t.clone()],
                toml::Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            if types.is_empty() {
                self.issue(
                    &h.types,
                    format!("{key}.type"),
                    "name the event type(s): type = \"OrderPlaced\" or a list",
                );
            }
            let action = match (&h.sql, &h.upsert, &h.delete) {
                _ if h.kv.is_some() || kv_target => self.kv_handler(&key, h, kv_target),
                (Some(sql), None, None) => {
                    let params = h
                        .params
                        .as_ref()
                        .map(|ps| {
                            ps.get_ref()
                                .iter()
                                .map(|t| self.path(ps, &format!("{key}.params"), t))
                                .collect()
                        })
                        .unwrap_or_default();
                    Some(Action::Sql {
                        sql: sql.get_ref().clone(),
                        params,
                    })
                }
                (None, Some(table), None) => {
                    let keys: Vec<String> = match h.key.as_ref().map(|k| k.get_ref()) {
                        Some(toml::Value::Array(a)) => a
                            .iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect(),
                        _ => Vec::new(),
                    };
                    let mut columns = Vec::new();
                    if let Some(c) = &h.columns {
                        for (col, v) in c.get_ref() {
                            match v.as_str() {
                                Some(path) => {
                                    let path = self.path(c, &format!("{key}.columns.{col}"), path);
                                    columns.push((col.clone(), path));
                                }
                                None => self.issue(
                                    c,
                                    format!("{key}.columns.{col}"),
                                    "a column's value is a path, like \"data.after.id\"",
                                ),
                            }
                        }
                    }
                    if keys.is_empty() || columns.is_empty() {
                        self.issue(table, format!("{key}.upsert"), "an upsert needs key = [\"column\", ...] and columns = { column = \"data.after.x\", ... }");
                    }
                    for k in &keys {
                        if !columns.iter().any(|(c, _)| c == k) {
                            self.issue(
                                table,
                                format!("{key}.key"),
                                format!("key column {k:?} is not in columns"),
                            );
                        }
                    }
                    Some(Action::Upsert {
                        table: table.get_ref().clone(),
                        key: keys,
                        columns,
                    })
                }
                (None, None, Some(table)) => {
                    let mut keys = Vec::new();
                    match h.key.as_ref() {
                        Some(k) => {
                            match k.get_ref() {
                                toml::Value::Table(t) => {
                                    for (col, v) in t {
                                        match v.as_str() {
                                        Some(path) => {
                                            let path = self.path(k, &format!("{key}.key.{col}"), path);
                                            keys.push((col.clone(), path));
                                        }
                                        None => self.issue(k, format!("{key}.key.{col}"), "a key column's value is a path, like \"data.key.id\""),
                                    }
                                    }
                                }
                                _ => self.issue(
                                    k,
                                    format!("{key}.key"),
                                    "a delete's key is a table: key = { id = \"data.key.id\" }",
                                ),
                            }
                        }
                        None => self.issue(
                            table,
                            format!("{key}.key"),
                            "a delete needs key = { column = \"data.key.x\" }",
                        ),
                    }
                    Some(Action::Delete {
                        table: table.get_ref().clone(),
                        key: keys,
                    })
                }
                _ => {
                    self.issue(&h.types, key.clone(), "a handler does one thing: sql = \"...\" (with params), upsert = \"table\", or delete = \"table\"");
                    None
                }
            };
            if let Some(action) = action {
                handlers.push(Handler { types, action });
            }
        }
        if handlers.is_empty() && p.on.is_empty() {
            self.issue(
                &p.name,
                format!("{prefix}.on"),
                "add at least one [[projection.on]] handler",
            );
        }
        let subjects = p
            .subjects
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| vec![format!("{}.>", source.name)]);
        let tables = match &p.tables {
            Some(t) => t.get_ref().clone(),
            None => {
                let mut t: Vec<String> = Vec::new();
                for h in &handlers {
                    if let Action::Upsert { table, .. } | Action::Delete { table, .. } = &h.action
                        && !t.contains(table)
                    {
                        t.push(table.clone());
                    }
                }
                t
            }
        };
        Some(ProjectionConfig {
            name,
            source: source.name.clone(),
            stream: source.stream.name.clone(),
            subjects,
            dead_letter: p.dead_letter.as_ref().map(|d| d.get_ref().clone()),
            target,
            handlers,
            tables,
        })
    }

    fn kv_handler(&mut self, key: &str, h: &RawHandler, kv_target: bool) -> Option<Action> {
        let Some(op_at) = &h.kv else {
            self.issue(
                &h.types,
                key.to_string(),
                "a KV projection's handler says kv = \"put\", \"merge\" or \"delete\"",
            );
            return None;
        };
        if !kv_target {
            self.issue(
                op_at,
                format!("{key}.kv"),
                "kv handlers need kv_bucket = \"NAME\" on the projection",
            );
            return None;
        }
        let op = match op_at.get_ref().as_str() {
            "put" => KvOp::Put,
            "merge" => KvOp::Merge,
            "delete" => KvOp::Delete,
            other => {
                self.issue(
                    op_at,
                    format!("{key}.kv"),
                    format!(
                        "{other:?} is not a KV operation: use \"put\", \"merge\" or \"delete\""
                    ),
                );
                return None;
            }
        };
        let template = match &h.key {
            Some(k) => match k.get_ref() {
                toml::Value::String(t) => t.clone(),
                _ => {
                    self.issue(
                        k,
                        format!("{key}.key"),
                        "a KV key is a template, like \"order.{data.after.id}\"",
                    );
                    return None;
                }
            },
            None => {
                self.issue(
                    &h.types,
                    format!("{key}.key"),
                    "a KV handler needs key = \"order.{data.after.id}\"",
                );
                return None;
            }
        };
        let mut parts = Vec::new();
        let mut rest = template.as_str();
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(KeyPart::Lit(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                self.issue(
                    &h.types,
                    format!("{key}.key"),
                    format!("unclosed '{{' in {template:?}"),
                );
                return None;
            };
            let path = &rest[open + 1..open + close];
            parts.push(KeyPart::Path(path.split('.').map(str::to_string).collect()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(KeyPart::Lit(rest.to_string()));
        }
        let mut value = Vec::new();
        if let Some(v) = &h.value {
            for (field, path) in v.get_ref() {
                match path.as_str() {
                    Some(p) => {
                        let p = self.path(v, &format!("{key}.value.{field}"), p);
                        value.push((field.clone(), p));
                    }
                    None => self.issue(
                        v,
                        format!("{key}.value.{field}"),
                        "a field's value is a path, like \"data.after.status\"",
                    ),
                }
            }
        }
        if op != KvOp::Delete && value.is_empty() {
            self.issue(
                op_at,
                format!("{key}.value"),
                "put and merge need value = { field = \"data.after.x\", ... }",
            );
        }
        Some(Action::Kv {
            op,
            key: parts,
            value,
        })
    }

    fn nats(&mut self, raw: Spanned<RawNats>) -> NatsConfig {
        let n = raw.get_ref();
        if n.servers.get_ref().is_empty() {
            self.issue(
                &n.servers,
                "nats.servers",
                "list at least one server, like \"nats://127.0.0.1:4222\"",
            );
        }
        let password = self.secret(
            "nats.password_env",
            &n.password_env,
            "nats.password_file",
            &n.password_file,
        );
        let token = self.secret(
            "nats.token_env",
            &n.token_env,
            "nats.token_file",
            &n.token_file,
        );
        let nkey = self.secret(
            "nats.nkey_seed_env",
            &n.nkey_seed_env,
            "nats.nkey_seed_file",
            &n.nkey_seed_file,
        );
        let auth = match (&n.user, password, token, &n.credentials_file) {
            (None, None, None, None) if nkey.is_some() => {
                NatsAuth::NKey(nkey.unwrap_or_else(|| Secret::new(String::new())))
            }
            (None, None, None, None) => NatsAuth::None,
            (Some(u), Some(p), None, None) => NatsAuth::UserPassword {
                user: u.get_ref().clone(),
                password: p,
            },
            (None, None, Some(t), None) => NatsAuth::Token(t),
            (None, None, None, Some(c)) => NatsAuth::CredentialsFile(self.base.join(c.get_ref())),
            (Some(u), None, None, None) => {
                if n.password_env.is_none() && n.password_file.is_none() {
                    self.issue(u, "nats.user", "a user needs password_env or password_file");
                }
                NatsAuth::None
            }
            _ => {
                if n.password_env.is_some()
                    || n.password_file.is_some()
                    || n.token_env.is_some()
                    || n.token_file.is_some()
                    || n.credentials_file.is_some()
                    || n.nkey_seed_env.is_some()
                    || n.nkey_seed_file.is_some()
                {
                    self.issue(&raw, "nats", "choose one way to authenticate: user with password, a token, a credentials file, or an NKey seed");
                }
                NatsAuth::None
            }
        };
        NatsConfig {
            servers: n.servers.get_ref().clone(),
            auth,
            connect_timeout: Duration::from_secs(self.number(
                &n.connect_timeout_secs,
                "nats.connect_timeout_secs",
                5,
                1..=600,
            )),
            tls_ca_file: n.tls_ca_file.as_ref().map(|f| self.base.join(f.get_ref())),
            tls_required: n.tls_required.unwrap_or(n.tls_ca_file.is_some()),
        }
    }

    fn source(&mut self, prefix: &str, s: RawSource) -> SourceConfig {
        let name = s.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            self.issue(
                &s.name,
                format!("{prefix}.name"),
                "use letters, digits, '_' and '-' only: the name starts every subject and event id",
            );
        }
        let slot = s.slot.get_ref().clone();
        if slot.is_empty()
            || slot.len() > 63
            || !slot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            self.issue(
                &s.slot,
                format!("{prefix}.slot"),
                "a replication slot name has 1 to 63 lowercase letters, digits or '_'",
            );
        }
        let publication = s.publication.get_ref().clone();
        if publication.is_empty() || publication.len() > 63 {
            self.issue(
                &s.publication,
                format!("{prefix}.publication"),
                "a publication name has 1 to 63 characters",
            );
        }
        let all = s.all_tables.as_ref().map(|a| *a.get_ref());
        let tables = match (&s.tables, all) {
            (Some(t), None | Some(false)) => {
                let mut out = Vec::new();
                if t.get_ref().is_empty() {
                    self.issue(
                        t,
                        format!("{prefix}.tables"),
                        "list at least one table, or set all_tables = true",
                    );
                }
                for name in t.get_ref() {
                    match split_table(name) {
                        Some(pair) => out.push(pair),
                        None => self.issue(
                            t,
                            format!("{prefix}.tables"),
                            format!(
                                "{name:?} is not a table name: use \"table\" or \"schema.table\""
                            ),
                        ),
                    }
                }
                TableSelection::Listed(out)
            }
            (Some(t), Some(true)) => {
                self.issue(
                    t,
                    format!("{prefix}.tables"),
                    "set either tables or all_tables = true, not both",
                );
                TableSelection::All
            }
            (None, Some(true)) => TableSelection::All,
            (None, _) => {
                self.issue(
                    &s.publication,
                    format!("{prefix}.tables"),
                    "say which tables to stream: tables = [\"orders\", ...] or all_tables = true",
                );
                TableSelection::All
            }
        };
        let pg = self.postgres(prefix, s.postgres.into_inner());
        let mut stream = self.stream(prefix, &name, s.stream.into_inner());
        stream.atomic = s.atomic_transactions.unwrap_or(false);
        let mut mappings = Vec::new();
        for (i, t) in s.table.iter().enumerate() {
            if let Some(spec) = self.table_mapping(&format!("{prefix}.table[{i}]"), &name, t) {
                if mappings
                    .iter()
                    .any(|m: &TableSpec| m.schema == spec.schema && m.table == spec.table)
                {
                    self.issue(
                        &t.get_ref().name,
                        format!("{prefix}.table[{i}].name"),
                        "this table already has a mapping: merge the two",
                    );
                }
                if let TableSelection::Listed(list) = &tables
                    && !list.contains(&(spec.schema.clone(), spec.table.clone()))
                {
                    self.issue(
                        &t.get_ref().name,
                        format!("{prefix}.table[{i}].name"),
                        format!(
                            "{}.{} is not in this source's tables: add it there, or remove the mapping",
                            spec.schema, spec.table
                        ),
                    );
                }
                mappings.push(spec);
            }
        }
        let mut outboxes = Vec::new();
        for (i, o) in s.outbox.iter().enumerate() {
            if let Some(spec) = self.outbox(&format!("{prefix}.outbox[{i}]"), &name, o) {
                let mapped = mappings
                    .iter()
                    .any(|m| m.schema == spec.schema && m.table == spec.table);
                if mapped {
                    self.issue(
                        &o.get_ref().table,
                        format!("{prefix}.outbox[{i}].table"),
                        "this table also has a [[source.table]] mapping: an outbox table's rows are published verbatim, so remove one",
                    );
                }
                if let TableSelection::Listed(list) = &tables
                    && !list.contains(&(spec.schema.clone(), spec.table.clone()))
                {
                    self.issue(
                        &o.get_ref().table,
                        format!("{prefix}.outbox[{i}].table"),
                        format!(
                            "{}.{} is not in this source's tables: add it there",
                            spec.schema, spec.table
                        ),
                    );
                }
                outboxes.push(spec);
            }
        }
        let snapshot = match s.snapshot.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "initial")) => SnapshotMode::Initial,
            Some((_, "never")) => SnapshotMode::Never,
            Some((m, other)) => {
                self.issue(
                    m,
                    format!("{prefix}.snapshot"),
                    format!("{other:?} is not a snapshot mode: use \"initial\" or \"never\""),
                );
                SnapshotMode::Never
            }
        };
        let snapshot_chunk_size = self.number(
            &s.snapshot_chunk_size,
            &format!("{prefix}.snapshot_chunk_size"),
            1000,
            1..=100_000,
        );
        let snapshot_tables = s.snapshot_tables.as_ref().map(|list| {
            let mut out = Vec::new();
            for name in list.get_ref() {
                match split_table(name) {
                    Some(pair) => {
                        if let TableSelection::Listed(streamed) = &tables
                            && !streamed.contains(&pair)
                        {
                            self.issue(
                                list,
                                format!("{prefix}.snapshot_tables"),
                                format!("{name:?} is not in this source's tables"),
                            );
                        }
                        out.push(pair);
                    }
                    None => self.issue(
                        list,
                        format!("{prefix}.snapshot_tables"),
                        format!("{name:?} is not a table name: use \"table\" or \"schema.table\""),
                    ),
                }
            }
            out
        });
        let mut messages: Vec<MessageSpec> = Vec::new();
        for (i, m) in s.message.iter().enumerate() {
            if let Some(spec) = self.message(&format!("{prefix}.message[{i}]"), &name, m) {
                if messages.iter().any(|x| x.prefix == spec.prefix) {
                    self.issue(
                        &m.get_ref().prefix,
                        format!("{prefix}.message[{i}].prefix"),
                        "duplicate message prefix",
                    );
                }
                messages.push(spec);
            }
        }
        let publish_window = self.number(
            &s.publish_window,
            &format!("{prefix}.publish_window"),
            DEFAULT_PUBLISH_WINDOW as u64,
            1..=65_536,
        ) as usize;
        let max_event_bytes = self.number(
            &s.max_event_bytes,
            &format!("{prefix}.max_event_bytes"),
            DEFAULT_MAX_EVENT_BYTES as u64,
            1024..=64 * 1024 * 1024,
        ) as usize;
        let atomic_batch_max = self.number(
            &s.atomic_batch_max,
            &format!("{prefix}.atomic_batch_max"),
            DEFAULT_ATOMIC_BATCH_MAX.min(publish_window as u64),
            2..=1000,
        ) as usize;
        if let Some(b) = &s.atomic_batch_max
            && *b.get_ref() as usize > publish_window
        {
            self.issue(
                b,
                format!("{prefix}.atomic_batch_max"),
                format!("a batch must fit in the publish window ({publish_window}): lower it or raise publish_window"),
            );
        }
        let ack_timeout = Duration::from_secs(self.number(
            &s.ack_timeout_secs,
            &format!("{prefix}.ack_timeout_secs"),
            30,
            1..=3600,
        ));
        let status_interval = Duration::from_secs(self.number(
            &s.status_interval_secs,
            &format!("{prefix}.status_interval_secs"),
            10,
            1..=3600,
        ));
        let backoff_initial = Duration::from_millis(self.number(
            &s.restart_backoff_initial_ms,
            &format!("{prefix}.restart_backoff_initial_ms"),
            500,
            10..=600_000,
        ));
        let backoff_max = Duration::from_secs(self.number(
            &s.restart_backoff_max_secs,
            &format!("{prefix}.restart_backoff_max_secs"),
            30,
            1..=3600,
        ));
        // A row that could still become an event: JSON adds column names and quoting,
        // hex bytea shrinks to base64, so twice the event limit plus protocol room; a
        // table that shrinks oversized rows takes rows up to 64 MiB by default.
        let shrinks = mappings.iter().any(|m| m.oversized != Oversized::Fail);
        let default_row = if shrinks {
            (64 * 1024 * 1024).max(max_event_bytes * 2 + 64 * 1024)
        } else {
            max_event_bytes * 2 + 64 * 1024
        };
        let max_row_bytes = self.number(
            &s.max_row_bytes,
            &format!("{prefix}.max_row_bytes"),
            default_row as u64,
            1024..=1024 * 1024 * 1024,
        ) as usize;
        SourceConfig {
            name,
            postgres: pg,
            publication,
            slot,
            tables,
            create_publication: s.create_publication.unwrap_or(true),
            create_slot: s.create_slot.unwrap_or(true),
            stream,
            publish_window,
            max_event_bytes,
            ack_timeout,
            status_interval,
            backoff_initial,
            backoff_max: backoff_max.max(backoff_initial),
            mappings,
            outboxes,
            messages,
            max_row_bytes,
            atomic_transactions: s.atomic_transactions.unwrap_or(false),
            atomic_batch_max,
            transaction_events: s.transaction_events.unwrap_or(false),
            snapshot,
            snapshot_chunk_size,
            snapshot_tables,
            heartbeat_interval: s.heartbeat_interval_secs.as_ref().map(|_| {
                Duration::from_secs(self.number(
                    &s.heartbeat_interval_secs,
                    &format!("{prefix}.heartbeat_interval_secs"),
                    10,
                    1..=86_400,
                ))
            }),
            stall_after: Duration::from_secs(self.number(
                &s.stall_after_secs,
                &format!("{prefix}.stall_after_secs"),
                120,
                1..=86_400,
            )),
            replication_timeout: Duration::from_secs(self.number(
                &s.replication_timeout_secs,
                &format!("{prefix}.replication_timeout_secs"),
                60,
                2..=86_400,
            )),
            warn_retained_wal_bytes: s.warn_retained_wal_bytes.as_ref().map(|_| {
                self.number(
                    &s.warn_retained_wal_bytes,
                    &format!("{prefix}.warn_retained_wal_bytes"),
                    0,
                    1..=u64::MAX,
                )
            }),
        }
    }

    fn template(
        &mut self,
        at: &Spanned<String>,
        key: &str,
        source: &str,
        allowed: &[&str],
    ) -> Option<Template> {
        match Template::parse(at.get_ref(), allowed) {
            Ok(t) if t.starts_with_source(source) => Some(t),
            Ok(_) => {
                self.issue(
                    at,
                    key,
                    format!(
                        "the subject must start with {{source}} or \"{source}.\", so the source's stream captures it"
                    ),
                );
                None
            }
            Err(e) => {
                self.issue(at, key, e);
                None
            }
        }
    }

    fn event_type(&mut self, at: &Spanned<String>, key: &str) -> Option<String> {
        let t = at.get_ref();
        if t.is_empty() || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
            self.issue(at, key, "an event type is a non-empty name without spaces");
            return None;
        }
        Some(t.clone())
    }

    fn choice(&mut self, v: &Spanned<toml::Value>, key: &str) -> Option<Choice> {
        match v.get_ref() {
            toml::Value::String(t) => {
                let at = Spanned::new(v.span(), t.clone());
                self.event_type(&at, key).map(Choice::Event)
            }
            toml::Value::Boolean(false) => Some(Choice::Drop),
            _ => {
                self.issue(
                    v,
                    key,
                    "use an event type (\"OrderPlaced\") or false to publish nothing for this operation",
                );
                None
            }
        }
    }

    fn conditions(
        &mut self,
        t: &Option<Spanned<toml::Table>>,
        key: &str,
    ) -> Vec<(String, Vec<Literal>)> {
        let Some(t) = t else { return Vec::new() };
        let literal = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(Literal::Text(s.clone())),
            toml::Value::Integer(i) => Some(Literal::Int(*i)),
            toml::Value::Float(f) => Some(Literal::Float(*f)),
            toml::Value::Boolean(b) => Some(Literal::Bool(*b)),
            _ => None,
        };
        let mut out = Vec::new();
        for (col, v) in t.get_ref() {
            let set: Option<Vec<Literal>> = match v {
                toml::Value::Array(items) if !items.is_empty() => {
                    items.iter().map(literal).collect()
                }
                other => literal(other).map(|l| vec![l]),
            };
            match set {
                Some(set) => out.push((col.clone(), set)),
                None => self.issue(
                    t,
                    format!("{key}.{col}"),
                    "compare with a string, number or boolean, or a non-empty list of them",
                ),
            }
        }
        out
    }

    fn table_mapping(
        &mut self,
        prefix: &str,
        source: &str,
        t: &Spanned<RawTable>,
    ) -> Option<TableSpec> {
        let line = line_of(self.text, t.span().start);
        let t = t.get_ref();
        let Some((schema, table)) = split_table(t.name.get_ref()) else {
            self.issue(
                &t.name,
                format!("{prefix}.name"),
                "not a table name: use \"table\" or \"schema.table\"",
            );
            return None;
        };
        let mut spec = TableSpec {
            schema,
            table,
            line,
            key: t.key.as_ref().map(|k| k.get_ref().clone()),
            include: t.include.as_ref().map(|k| k.get_ref().clone()),
            exclude: t
                .exclude
                .as_ref()
                .map(|k| k.get_ref().clone())
                .unwrap_or_default(),
            ..TableSpec::default()
        };
        if let Some(k) = &t.key
            && k.get_ref().is_empty()
        {
            self.issue(k, format!("{prefix}.key"), "list at least one key column");
        }
        if let (Some(i), Some(_)) = (&t.include, &t.exclude) {
            self.issue(
                i,
                format!("{prefix}.include"),
                "set include or exclude, not both",
            );
        }
        if let Some(r) = &t.rename {
            for (from, to) in r.get_ref() {
                match to.as_str() {
                    Some(to) if !to.is_empty() => spec.rename.push((from.clone(), to.to_string())),
                    _ => self.issue(
                        r,
                        format!("{prefix}.rename.{from}"),
                        "the new name must be a non-empty string",
                    ),
                }
            }
        }
        if let Some(a) = &t.attributes {
            const RESERVED: &[&str] = &[
                "specversion",
                "id",
                "source",
                "type",
                "subject",
                "time",
                "datacontenttype",
                "dataschema",
                "data",
                "snapshot",
                "commitlsn",
                "xid",
                "txindex",
                "txlast",
                "schemahash",
            ];
            for (name, v) in a.get_ref() {
                let valid = !name.is_empty()
                    && name.len() <= 20
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
                if !valid || RESERVED.contains(&name.as_str()) {
                    self.issue(
                        a,
                        format!("{prefix}.attributes.{name}"),
                        "an attribute name has 1 to 20 lowercase letters or digits (the CloudEvents rule) and is not one of tidemark's own attributes",
                    );
                    continue;
                }
                match v.as_str() {
                    Some(v) => spec.attributes.push((name.clone(), v.to_string())),
                    None => self.issue(
                        a,
                        format!("{prefix}.attributes.{name}"),
                        "an attribute value is a string",
                    ),
                }
            }
        }
        for (op, v) in [
            (Operation::Insert, &t.insert),
            (Operation::Update, &t.update),
            (Operation::Delete, &t.delete),
            (Operation::Truncate, &t.truncate),
            (Operation::Read, &t.read),
        ] {
            if let Some(v) = v {
                spec.events[crate::events::rules::op_slot(op)] =
                    self.choice(v, &format!("{prefix}.{}", op.as_str()));
            }
        }
        for (n, r) in t.rule.iter().enumerate() {
            let key = format!("{prefix}.rule[{n}]");
            let r = r.get_ref();
            let ops = match &r.on {
                None => Vec::new(),
                Some(v) => {
                    let names: Vec<Option<&str>> = match v.get_ref() {
                        toml::Value::String(s) => vec![Some(s.as_str())],
                        toml::Value::Array(a) => a.iter().map(|x| x.as_str()).collect(),
                        _ => vec![None],
                    };
                    let mut ops = Vec::new();
                    for name in names {
                        match name.and_then(Operation::parse) {
                            Some(op) => ops.push(op),
                            None => self.issue(
                                v,
                                format!("{key}.on"),
                                "use \"insert\", \"update\", \"delete\", \"truncate\" or \"read\", or a list of them",
                            ),
                        }
                    }
                    ops
                }
            };
            let choice = match (&r.event, &r.drop) {
                (Some(e), None | Some(Spanned { .. }))
                    if r.drop.as_ref().is_none_or(|d| !*d.get_ref()) =>
                {
                    self.event_type(e, &format!("{key}.event"))
                        .map(Choice::Event)
                }
                (None, Some(d)) if *d.get_ref() => Some(Choice::Drop),
                (Some(e), Some(_)) => {
                    self.issue(
                        e,
                        format!("{key}.event"),
                        "set event or drop = true, not both",
                    );
                    None
                }
                _ => {
                    self.issues.push(ConfigIssue {
                        line: Some(line),
                        key: key.clone(),
                        message: "a rule needs event = \"...\" or drop = true".into(),
                    });
                    None
                }
            };
            let rule = RuleSpec {
                ops,
                changed: r
                    .changed
                    .as_ref()
                    .map(|c| c.get_ref().clone())
                    .unwrap_or_default(),
                new: self.conditions(&r.new, &format!("{key}.new")),
                old: self.conditions(&r.old, &format!("{key}.old")),
                choice: choice.unwrap_or(Choice::Drop),
            };
            spec.rules.push(rule);
        }
        if let Some(subject) = &t.subject {
            spec.subject = self.template(
                subject,
                &format!("{prefix}.subject"),
                source,
                TABLE_PLACEHOLDERS,
            );
        }
        let columns = t
            .oversized_columns
            .as_ref()
            .map(|c| c.get_ref().clone())
            .unwrap_or_default();
        spec.oversized = match t.oversized.as_ref().map(|o| (o, o.get_ref().as_str())) {
            None | Some((_, "fail")) => Oversized::Fail,
            Some((o, mode @ ("omit" | "truncate"))) => {
                if columns.is_empty() {
                    self.issue(
                        o,
                        format!("{prefix}.oversized_columns"),
                        "say which columns may be shortened: oversized_columns = [\"body\"]",
                    );
                }
                if mode == "omit" {
                    Oversized::Omit(columns)
                } else {
                    Oversized::Truncate(columns)
                }
            }
            Some((o, other)) => {
                self.issue(
                    o,
                    format!("{prefix}.oversized"),
                    format!("{other:?} is not a mode: use \"fail\", \"omit\" or \"truncate\""),
                );
                Oversized::Fail
            }
        };
        Some(spec)
    }

    fn outbox(&mut self, prefix: &str, source: &str, o: &Spanned<RawOutbox>) -> Option<OutboxSpec> {
        let line = line_of(self.text, o.span().start);
        let o = o.get_ref();
        let Some((schema, table)) = split_table(o.table.get_ref()) else {
            self.issue(
                &o.table,
                format!("{prefix}.table"),
                "not a table name: use \"table\" or \"schema.table\"",
            );
            return None;
        };
        let col = |c: &Option<Spanned<String>>, default: &str| {
            c.as_ref()
                .map(|c| c.get_ref().clone())
                .unwrap_or_else(|| default.to_string())
        };
        let default_subject = Spanned::new(0..0, "{source}.{aggregate_type}.{event}".to_string());
        let subject_at = o.subject.as_ref().unwrap_or(&default_subject);
        let subject = self.template(
            subject_at,
            &format!("{prefix}.subject"),
            source,
            OUTBOX_PLACEHOLDERS,
        )?;
        Some(OutboxSpec {
            schema,
            table,
            line,
            id: col(&o.id_column, "id"),
            aggregate_type: col(&o.aggregate_type_column, "aggregate_type"),
            aggregate_id: col(&o.aggregate_id_column, "aggregate_id"),
            event_type: col(&o.event_type_column, "event_type"),
            payload: col(&o.payload_column, "payload"),
            headers: o.headers_column.as_ref().map(|h| h.get_ref().clone()),
            subject,
        })
    }

    fn message(
        &mut self,
        prefix: &str,
        source: &str,
        m: &Spanned<RawMessage>,
    ) -> Option<MessageSpec> {
        let m = m.get_ref();
        if m.prefix.get_ref().is_empty() {
            self.issue(
                &m.prefix,
                format!("{prefix}.prefix"),
                "the prefix cannot be empty",
            );
            return None;
        }
        if crate::events::reserved::is_reserved_prefix(m.prefix.get_ref()) {
            self.issue(
                &m.prefix,
                format!("{prefix}.prefix"),
                "this prefix is tidemark's own (backfill watermarks, sync): choose another",
            );
            return None;
        }
        let event_type = match &m.event_type {
            Some(e) => Some(self.event_type(e, &format!("{prefix}.event_type"))?),
            None => None,
        };
        if let (Some(e), Some(_)) = (&m.event_type, &m.type_field) {
            self.issue(
                e,
                format!("{prefix}.event_type"),
                "set event_type or type_field, not both",
            );
        }
        let default_subject = Spanned::new(0..0, "{source}.{prefix}.{event}".to_string());
        let subject_at = m.subject.as_ref().unwrap_or(&default_subject);
        let subject = self.template(
            subject_at,
            &format!("{prefix}.subject"),
            source,
            MESSAGE_PLACEHOLDERS,
        )?;
        Some(MessageSpec {
            prefix: m.prefix.get_ref().clone(),
            event_type,
            type_field: m.type_field.as_ref().map(|f| f.get_ref().clone()),
            subject,
        })
    }

    fn postgres(&mut self, prefix: &str, p: RawPostgres) -> PostgresConfig {
        let port = self.number(
            &p.port,
            &format!("{prefix}.postgres.port"),
            5432,
            1..=65_535,
        ) as u16;
        let password = self.secret(
            &format!("{prefix}.postgres.password_env"),
            &p.password_env,
            &format!("{prefix}.postgres.password_file"),
            &p.password_file,
        );
        if p.host.get_ref().is_empty() {
            self.issue(
                &p.host,
                format!("{prefix}.postgres.host"),
                "set a host name, an address, or a Unix socket directory",
            );
        }
        let sslmode = match p.sslmode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "prefer")) => SslMode::Prefer,
            Some((_, "disable")) => SslMode::Disable,
            Some((_, "require")) => SslMode::Require,
            Some((_, "verify-ca")) => SslMode::VerifyCa,
            Some((_, "verify-full")) => SslMode::VerifyFull,
            Some((m, other)) => {
                self.issue(
                    m,
                    format!("{prefix}.postgres.sslmode"),
                    format!("{other:?} is not an sslmode: use disable, prefer, require, verify-ca or verify-full"),
                );
                SslMode::Prefer
            }
        };
        let sslrootcert = p.sslrootcert.as_ref().map(|r| self.base.join(r.get_ref()));
        if matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            && sslrootcert.is_none()
            && let Some(m) = &p.sslmode
        {
            self.issue(
                m,
                format!("{prefix}.postgres.sslrootcert"),
                "verify-ca and verify-full need sslrootcert: the CA certificate(s) of the server",
            );
        }
        PostgresConfig {
            sslmode,
            sslrootcert,
            host: p.host.into_inner(),
            port,
            dbname: p.dbname.into_inner(),
            user: p.user.into_inner(),
            password,
            connect_timeout: Duration::from_secs(self.number(
                &p.connect_timeout_secs,
                &format!("{prefix}.postgres.connect_timeout_secs"),
                10,
                1..=600,
            )),
        }
    }

    fn stream(&mut self, prefix: &str, source: &str, s: RawStream) -> StreamConfig {
        let name = s.name.get_ref().clone();
        if name.is_empty()
            || name
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            self.issue(
                &s.name,
                format!("{prefix}.stream.name"),
                "a stream name cannot be empty or hold spaces, '.', '*', '>', '/' or '\\'",
            );
        }
        let own = format!("{source}.>");
        let subjects = match &s.subjects {
            None => vec![own.clone()],
            Some(list) => {
                if !list.get_ref().iter().any(|x| x == &own || x == ">") {
                    self.issue(
                        list,
                        format!("{prefix}.stream.subjects"),
                        format!("the stream must capture {own:?}, where this source publishes"),
                    );
                }
                list.get_ref().clone()
            }
        };
        let storage = match s.storage.as_ref().map(|x| x.get_ref().as_str()) {
            None | Some("file") => Storage::File,
            Some("memory") => Storage::Memory,
            Some(other) => {
                let at = s.storage.as_ref().map(|x| x.span());
                if let Some(span) = at {
                    self.issues.push(ConfigIssue {
                        line: Some(line_of(self.text, span.start)),
                        key: format!("{prefix}.stream.storage"),
                        message: format!("{other:?} is not a storage: use \"file\" or \"memory\""),
                    });
                }
                Storage::File
            }
        };
        let replicas =
            self.number(&s.replicas, &format!("{prefix}.stream.replicas"), 1, 1..=5) as usize;
        let max_age = s.max_age_secs.as_ref().map(|_| {
            Duration::from_secs(self.number(
                &s.max_age_secs,
                &format!("{prefix}.stream.max_age_secs"),
                0,
                1..=u64::from(u32::MAX),
            ))
        });
        let max_bytes = s.max_bytes.as_ref().map(|_| {
            self.number(
                &s.max_bytes,
                &format!("{prefix}.stream.max_bytes"),
                0,
                1024..=i64::MAX as u64,
            ) as i64
        });
        // JetStream refuses a duplicate window longer than the retention: the default
        // shrinks to fit, an explicit one that does not fit is an error.
        let default_window = max_age.map_or(120, |a| a.as_secs().clamp(1, 120));
        let duplicate_window = Duration::from_secs(self.number(
            &s.duplicate_window_secs,
            &format!("{prefix}.stream.duplicate_window_secs"),
            default_window,
            1..=86_400,
        ));
        if let (Some(w), Some(age)) = (&s.duplicate_window_secs, max_age)
            && Duration::from_secs(*w.get_ref()) > age
        {
            self.issue(
                w,
                format!("{prefix}.stream.duplicate_window_secs"),
                format!(
                    "must not be longer than max_age_secs ({}): JetStream refuses such a stream",
                    age.as_secs()
                ),
            );
        }
        StreamConfig {
            name,
            subjects,
            storage,
            replicas,
            max_age,
            max_bytes,
            duplicate_window,
            atomic: false,
        }
    }
}

/// `"orders"` is `public.orders`; `"sales.orders"` is schema `sales`.
pub fn split_table(name: &str) -> Option<(String, String)> {
    let valid = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
    match name.split_once('.') {
        None if valid(name) => Some(("public".into(), name.into())),
        Some((schema, table)) if valid(schema) && valid(table) && !table.contains('.') => {
            Some((schema.into(), table.into()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::rules::{Choice, Literal};

    const GOOD: &str = r#"
[nats]
servers = ["nats://127.0.0.1:4222"]

[[source]]
name = "store"
publication = "tidemark_store"
slot = "tidemark_store"
tables = ["orders", "sales.customers"]

[source.postgres]
host = "127.0.0.1"
dbname = "store"
user = "tidemark"
password_env = "STORE_PG_PASSWORD"

[source.stream]
name = "STORE"
"#;

    fn env(k: &str) -> Option<String> {
        match k {
            "STORE_PG_PASSWORD" => Some("s3cret".into()),
            "HOST" => Some("db.internal".into()),
            _ => None,
        }
    }

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("tidemark.toml"), text, &env)
    }

    fn errors(text: &str) -> String {
        parse_str(text).unwrap_err().to_string()
    }

    #[test]
    fn a_dead_letter_subject_the_sources_stream_captures_is_refused() {
        let projection = |dead: &str| {
            format!(
                "{GOOD}\n[[projection]]\nname = \"stats\"\nsource = \"store\"\ndead_letter = \"{dead}\"\nkv_bucket = \"STATS\"\n\n[[projection.on]]\ntype = \"t.created\"\nkv = \"put\"\nkey = \"k.{{data.after.id}}\"\nvalue = {{ id = \"data.after.id\" }}\n"
            )
        };
        let err = errors(&projection("store.dead"));
        assert!(
            err.contains("projection[0].dead_letter")
                && err.contains("captured by the source's stream \"STORE\""),
            "{err}"
        );
        parse_str(&projection("deadletter.stats")).unwrap();
    }

    #[test]
    fn good_config_with_defaults() {
        let c = parse_str(GOOD).unwrap();
        let s = &c.sources[0];
        assert_eq!(s.name, "store");
        assert_eq!(s.postgres.port, 5432);
        assert_eq!(
            s.postgres.password.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert_eq!(
            s.tables,
            TableSelection::Listed(vec![
                ("public".into(), "orders".into()),
                ("sales".into(), "customers".into())
            ])
        );
        assert_eq!(s.stream.subjects, vec!["store.>"]);
        assert_eq!(s.stream.storage, Storage::File);
        assert_eq!(s.publish_window, DEFAULT_PUBLISH_WINDOW);
        assert!(s.create_slot && s.create_publication);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "secret leaked into Debug"
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = GOOD.replace(
            "slot = \"tidemark_store\"",
            "slott = \"x\"\nslot = \"tidemark_store\"",
        );
        let msg = errors(&text);
        assert!(
            msg.starts_with("tidemark.toml:8: source[0].slott: unknown field `slott`"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = GOOD.replace("dbname = \"store\"", "dbname = 5");
        let msg = errors(&text);
        assert!(
            msg.starts_with("tidemark.toml:13: source[0].postgres.dbname: invalid type"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let msg = errors("[nats]\nservers = [\n");
        assert!(msg.starts_with("tidemark.toml:"), "{msg}");
    }

    #[test]
    fn validation_collects_every_problem() {
        let text = GOOD
            .replace("slot = \"tidemark_store\"", "slot = \"Bad-Slot\"")
            .replace("name = \"STORE\"", "name = \"STORE.X\"\nreplicas = 9")
            .replace("STORE_PG_PASSWORD", "MISSING_VAR");
        let err = parse_str(&text).unwrap_err();
        let keys: Vec<&str> = err.issues().iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "source[0].slot",
                "source[0].postgres.password_env",
                "source[0].stream.name",
                "source[0].stream.replicas"
            ],
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("tidemark.toml:8: source[0].slot: a replication slot name"),
            "{msg}"
        );
        assert!(msg.contains("tidemark.toml:15: source[0].postgres.password_env: environment variable MISSING_VAR is not set"), "{msg}");
    }

    const MAPPING: &str = r#"
[[source.table]]
name = "orders"
key = ["id"]
exclude = ["secret"]
rename = { customer_id = "customer" }
subject = "{source}.order.{event}.{key.id}"
attributes = { aggregate = "order" }
insert = "OrderPlaced"
update = false

[[source.table.rule]]
on = ["update"]
changed = ["status"]
old = { status = ["paid", "packed"] }
new = { status = "shipped", express = true, qty = 3 }
event = "OrderShipped"

[[source.table.rule]]
on = "delete"
drop = true

[[source.outbox]]
table = "sales.customers"
payload_column = "body"

[[source.message]]
prefix = "domain"
type_field = "type"
"#;

    #[test]
    fn mappings_outboxes_and_messages_parse() {
        let c = parse_str(&format!("{GOOD}{MAPPING}")).unwrap();
        let s = &c.sources[0];
        let m = &s.mappings[0];
        assert_eq!((m.schema.as_str(), m.table.as_str()), ("public", "orders"));
        assert_eq!(m.key, Some(vec!["id".to_string()]));
        assert_eq!(m.exclude, vec!["secret"]);
        assert_eq!(
            m.rename,
            vec![("customer_id".to_string(), "customer".to_string())]
        );
        assert_eq!(m.events[0], Some(Choice::Event("OrderPlaced".into())));
        assert_eq!(m.events[1], Some(Choice::Drop));
        assert_eq!(m.events[2], None);
        assert_eq!(
            m.attributes,
            vec![("aggregate".to_string(), "order".to_string())]
        );
        assert_eq!(
            m.subject.as_ref().map(|t| t.text.as_str()),
            Some("{source}.order.{event}.{key.id}")
        );
        assert_eq!(m.line, 20, "the [[source.table]] header line");
        let r = &m.rules[0];
        assert_eq!(r.ops, vec![Operation::Update]);
        assert_eq!(r.changed, vec!["status"]);
        assert_eq!(
            r.old,
            vec![(
                "status".to_string(),
                vec![Literal::Text("paid".into()), Literal::Text("packed".into())]
            )]
        );
        assert!(
            r.new
                .contains(&("express".to_string(), vec![Literal::Bool(true)]))
        );
        assert!(r.new.contains(&("qty".to_string(), vec![Literal::Int(3)])));
        assert_eq!(r.choice, Choice::Event("OrderShipped".into()));
        assert_eq!(m.rules[1].choice, Choice::Drop);
        let o = &s.outboxes[0];
        assert_eq!(
            (
                o.schema.as_str(),
                o.table.as_str(),
                o.payload.as_str(),
                o.id.as_str()
            ),
            ("sales", "customers", "body", "id")
        );
        assert_eq!(o.subject.text, "{source}.{aggregate_type}.{event}");
        assert_eq!(s.messages[0].prefix, "domain");
        assert_eq!(s.messages[0].type_field.as_deref(), Some("type"));
        assert!(!s.atomic_transactions && !s.transaction_events);
    }

    #[test]
    fn mapping_mistakes_are_named_with_line_and_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "subject = \"{source}.order.{event}.{key.id}\"",
                "subject = \"{source}.{nope}\"",
                "source[0].table[0].subject: unknown placeholder {nope}",
            ),
            (
                "subject = \"{source}.order.{event}.{key.id}\"",
                "subject = \"orders.{event}\"",
                "source[0].table[0].subject: the subject must start with {source}",
            ),
            (
                "event = \"OrderShipped\"",
                "",
                "source[0].table[0].rule[0]: a rule needs event",
            ),
            (
                "on = [\"update\"]",
                "on = [\"upsert\"]",
                "source[0].table[0].rule[0].on: use \"insert\"",
            ),
            (
                "attributes = { aggregate = \"order\" }",
                "attributes = { Aggregate = \"order\" }",
                "source[0].table[0].attributes.Aggregate: an attribute name",
            ),
            (
                "attributes = { aggregate = \"order\" }",
                "attributes = { txlast = \"x\" }",
                "source[0].table[0].attributes.txlast",
            ),
            (
                "name = \"orders\"\nkey",
                "name = \"invoices\"\nkey",
                "source[0].table[0].name: public.invoices is not in this source's tables",
            ),
            (
                "update = false",
                "update = 3",
                "source[0].table[0].update: use an event type",
            ),
            (
                "insert = \"OrderPlaced\"",
                "insert = \"Order Placed\"",
                "source[0].table[0].insert: an event type is a non-empty name without spaces",
            ),
            (
                "table = \"sales.customers\"",
                "table = \"orders\"",
                "source[0].outbox[0].table: this table also has a [[source.table]] mapping",
            ),
            (
                "new = { status = \"shipped\", express = true, qty = 3 }",
                "new = { status = [] }",
                "source[0].table[0].rule[0].new.status: compare with a string",
            ),
            (
                "update = false",
                "update = false\noversized = \"omit\"",
                "source[0].table[0].oversized_columns: say which columns",
            ),
        ];
        for (from, to, want) in cases {
            let text = format!("{GOOD}{MAPPING}").replacen(from, to, 1);
            assert_ne!(text, format!("{GOOD}{MAPPING}"), "{from} not found");
            let err = errors(&text);
            assert!(err.contains(want), "want {want:?} in:\n{err}");
            assert!(err.contains("tidemark.toml:"), "{err}");
        }
        let atomic = GOOD.replace(
            "tables = [",
            "atomic_transactions = true\natomic_batch_max = 900\npublish_window = 100\ntables = [",
        );
        assert!(
            errors(&atomic).contains(
                "source[0].atomic_batch_max: a batch must fit in the publish window (100)"
            )
        );
    }

    #[test]
    fn the_duplicate_window_fits_the_retention() {
        let short = GOOD.replace("name = \"STORE\"", "name = \"STORE\"\nmax_age_secs = 60");
        let c = parse_str(&short).unwrap();
        assert_eq!(
            c.sources[0].stream.duplicate_window,
            Duration::from_secs(60)
        );
        let err = errors(&short.replace(
            "max_age_secs = 60",
            "max_age_secs = 60\nduplicate_window_secs = 300",
        ));
        assert!(
            err.contains(
                "source[0].stream.duplicate_window_secs: must not be longer than max_age_secs (60)"
            ),
            "{err}"
        );
    }

    #[test]
    fn env_interpolation_and_missing_variable() {
        let c = parse_str(&GOOD.replace("\"127.0.0.1\"", "\"${HOST}\" # not ${NOPE}")).unwrap();
        assert_eq!(c.sources[0].postgres.host, "db.internal");
        let msg = errors(&GOOD.replace("\"127.0.0.1\"", "\"${NOPE}\""));
        assert_eq!(
            msg,
            "tidemark.toml:12: environment variable NOPE is not set (the file refers to it as ${NOPE})"
        );
    }

    #[test]
    fn tables_or_all_tables() {
        let msg = errors(&GOOD.replace("tables = [\"orders\", \"sales.customers\"]", ""));
        assert!(msg.contains("source[0].tables: say which tables"), "{msg}");
        let c = parse_str(&GOOD.replace(
            "tables = [\"orders\", \"sales.customers\"]",
            "all_tables = true",
        ))
        .unwrap();
        assert_eq!(c.sources[0].tables, TableSelection::All);
        let msg = errors(&GOOD.replace("\"sales.customers\"", "\"a.b.c\""));
        assert!(msg.contains("\"a.b.c\" is not a table name"), "{msg}");
    }

    #[test]
    fn subjects_must_cover_the_source() {
        let msg = errors(&GOOD.replace(
            "name = \"STORE\"",
            "name = \"STORE\"\nsubjects = [\"other.>\"]",
        ));
        assert!(msg.contains("the stream must capture \"store.>\""), "{msg}");
    }

    #[test]
    fn no_sources_is_an_error() {
        let msg = errors("[nats]\nservers = [\"nats://x:4222\"]\n");
        assert!(msg.contains("no [[source]] is configured"), "{msg}");
    }
}

#[cfg(test)]
mod example_config {
    /// The shipped example config is valid.
    #[test]
    fn example_config_parses() {
        let path =
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tidemark.toml"));
        let text = std::fs::read_to_string(path).unwrap();
        let cfg = super::parse(path, &text, &|k| {
            (k == "TIDEMARK_PG_PASSWORD").then(|| "pw".to_string())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.sources[0].name, "store");
        assert_eq!(cfg.sources[0].stream.name, "STORE");
        assert_eq!(cfg.sources[0].mappings.len(), 2);
        assert_eq!(cfg.sources[0].messages.len(), 1);
    }
}
