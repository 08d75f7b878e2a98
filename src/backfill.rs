//! Backfills: the rows a table already holds, sent through the same stream as live
//! changes, without locks, long transactions or a second slot.
//!
//! The algorithm is DBLog's watermarks. A worker reads a table in key order, one chunk
//! at a time. Around each chunk's SELECT it writes a low and a high watermark into the
//! WAL (`pg_logical_emit_message`). The pipeline sees them in the replication stream:
//! between the two it notes the keys of the table that live changes touched, and at the
//! high watermark it publishes the chunk's rows minus those keys, as `<table>.read`
//! events at that point of the stream. A row changed inside the window is represented by
//! its live event, which is newer; every other row's value is current at the high
//! watermark. Folding the stream by key therefore gives the table.
//!
//! Progress lives in a NATS KV bucket (`tidemark_<source>`), one entry per table, and
//! moves only after JetStream stored a chunk's events; a restarted or standby tidemark
//! resumes at the chunk after the last stored one. A chunk whose events were cut off by a
//! crash is read again at a new position (its partly stored events stay valid where
//! they are).

use std::time::Duration;

use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{PostgresConfig, SourceConfig};
use crate::position::{Lsn, StreamTail};
use crate::postgres::catalog::{Catalog, CatalogError};
use crate::postgres::replication::quote_ident;

/// The logical message prefix of watermarks; reserved.
pub use crate::events::reserved::WATERMARK_PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("backfill progress in NATS KV bucket {bucket:?}: {what}")]
    Progress {
        bucket: String,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "table {table} has no primary key, so it cannot be read in key order: give it one, or name a unique key in its mapping ([[source.table]] name = \"{table}\", key = [\"...\"])"
    )]
    NoKey { table: String },
    #[error(
        "the key ({key}) named for {table} in its mapping cannot page the table: {reason}; a snapshot read by it would lose or repeat rows: name the primary key, or columns that a unique index covers and that are NOT NULL"
    )]
    KeyNotUnique {
        table: String,
        key: String,
        reason: &'static str,
    },
    #[error("backfill of {table} failed reading a chunk")]
    Read {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Done,
    Failed,
}

/// One table's backfill, as stored in the KV bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub schema: String,
    pub table: String,
    /// Why: "initial snapshot", "backfill", "resync".
    pub reason: String,
    /// An SQL condition limiting the rows (`--where`).
    pub filter: Option<String>,
    pub key: Vec<String>,
    pub chunk_size: u64,
    pub state: JobState,
    /// The key of the last row of the last stored chunk, as text.
    pub last_key: Option<Vec<Option<String>>>,
    /// The largest key when the job started: rows inserted later arrive as live
    /// changes, so the backfill stops here and always ends.
    #[serde(default)]
    pub end_key: Option<Vec<Option<String>>>,
    pub chunks_done: u64,
    pub rows_done: u64,
    pub rows_estimate: u64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub updated_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// The stream the job's rows go to, as `<name>@<creation time>`: a job never
    /// resumes into another stream (one deleted and made again keeps its name, not
    /// its creation time). `None` for jobs written before jobs were bound, and for
    /// jobs queued before the stream existed; those are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
}

impl Job {
    pub fn new(
        schema: &str,
        table: &str,
        key: Vec<String>,
        reason: &str,
        filter: Option<String>,
        chunk_size: u64,
    ) -> Job {
        let now = now();
        Job {
            id: format!(
                "{}-{}",
                time::OffsetDateTime::now_utc().unix_timestamp_nanos(),
                kv_token(table)
            ),
            schema: schema.into(),
            table: table.into(),
            reason: reason.into(),
            filter,
            key,
            chunk_size,
            state: JobState::Pending,
            last_key: None,
            end_key: None,
            chunks_done: 0,
            rows_done: 0,
            rows_estimate: 0,
            created_at: now,
            started_at: None,
            updated_at: None,
            finished_at: None,
            error: None,
            stream: None,
        }
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Rows per second since the job started, and the seconds left at that rate.
    pub fn rate_and_eta(&self) -> (f64, Option<f64>) {
        let parse = |t: &Option<String>| {
            t.as_deref().and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
        };
        let (Some(start), Some(end)) = (
            parse(&self.started_at),
            parse(&self.finished_at).or_else(|| parse(&self.updated_at)),
        ) else {
            return (0.0, None);
        };
        let secs = (end - start).as_seconds_f64();
        if secs <= 0.0 {
            return (0.0, None);
        }
        let rate = self.rows_done as f64 / secs;
        let left = self.rows_estimate.saturating_sub(self.rows_done) as f64;
        let eta = (rate > 0.0 && self.state == JobState::Running).then(|| left / rate);
        (rate, eta)
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A KV key token for a name: characters KV keys do not allow become `_`.
fn kv_token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The KV bucket holding a source's backfill progress.
pub fn bucket_name(source: &str) -> String {
    format!("tidemark_{}", kv_token(source))
}

/// The durable record of a source's backfills.
#[derive(Clone)]
pub struct Progress {
    kv: jetstream::kv::Store,
    bucket: String,
    /// The stream binding jobs must carry (see `Job::stream`), once known.
    stream: Option<String>,
}

/// A stream's binding for jobs: its name and creation time.
pub fn stream_binding(info: &jetstream::stream::Info) -> String {
    format!(
        "{}@{}",
        info.config.name,
        info.created.unix_timestamp_nanos()
    )
}

impl Progress {
    /// Opens the source's bucket, creating it when missing with `replicas` (the
    /// stream's): the progress is as durable as the stream it belongs to.
    pub async fn open(
        js: &jetstream::Context,
        source: &str,
        replicas: usize,
    ) -> Result<Progress, BackfillError> {
        let bucket = bucket_name(source);
        let err = |what: &str| {
            let bucket = bucket.clone();
            let what = what.to_string();
            move |e: Box<dyn std::error::Error + Send + Sync>| BackfillError::Progress {
                bucket,
                what,
                source: e,
            }
        };
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(jetstream::kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    description: "tidemark backfill progress".into(),
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| err("create the bucket")(Box::new(e)))?,
        };
        Ok(Progress {
            kv,
            bucket,
            stream: None,
        })
    }

    /// Opens the source's bucket bound to its stream, when the stream exists (jobs
    /// queued before it does are bound by the first `run`).
    pub async fn open_for_stream(
        js: &jetstream::Context,
        source: &str,
        stream: &str,
        replicas: usize,
    ) -> Result<Progress, BackfillError> {
        let progress = Progress::open(js, source, replicas).await?;
        Ok(match js.get_stream(stream).await {
            Ok(s) => progress.bind(stream_binding(s.cached_info())),
            Err(_) => progress,
        })
    }

    /// Binds the record to a stream: jobs made for another stream are passed over
    /// (and logged), and jobs written from now on carry the binding.
    pub fn bind(mut self, stream: String) -> Progress {
        self.stream = Some(stream);
        self
    }

    /// Whether a job belongs to the bound stream.
    fn belongs(&self, job: &Job) -> bool {
        match (&self.stream, &job.stream) {
            (Some(bound), Some(made_for)) if bound != made_for => {
                warn!(table = %job.qualified(), job = %job.id, made_for = %made_for, stream = %bound, "backfill job of another stream dropped (that stream was deleted and made again); a new initial snapshot or `tidemark backfill` reads the table for this one");
                false
            }
            _ => true,
        }
    }

    /// Opens the bucket if it exists.
    pub async fn existing(js: &jetstream::Context, source: &str) -> Option<Progress> {
        let bucket = bucket_name(source);
        js.get_key_value(&bucket).await.ok().map(|kv| Progress {
            kv,
            bucket,
            stream: None,
        })
    }

    fn key(schema: &str, table: &str) -> String {
        format!("backfill.{}.{}", kv_token(schema), kv_token(table))
    }

    fn error(
        &self,
        what: &str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> BackfillError {
        BackfillError::Progress {
            bucket: self.bucket.clone(),
            what: what.to_string(),
            source: Box::new(e),
        }
    }

    /// The stream sequence `tidemark reset --purge-stream` last purged at.
    pub async fn purged_at(&self) -> Result<Option<u64>, BackfillError> {
        let value = self
            .kv
            .get("reset.purged_seq")
            .await
            .map_err(|e| self.error("read the purge record", e))?;
        Ok(value.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
    }

    /// Records that the stream was purged at `seq`.
    pub async fn set_purged_at(&self, seq: u64) -> Result<(), BackfillError> {
        self.kv
            .put("reset.purged_seq", seq.to_string().into())
            .await
            .map_err(|e| self.error("write the purge record", e))?;
        Ok(())
    }

    pub async fn get(&self, schema: &str, table: &str) -> Result<Option<Job>, BackfillError> {
        let value = self
            .kv
            .get(Self::key(schema, table))
            .await
            .map_err(|e| self.error("read a job", e))?;
        Ok(value
            .and_then(|v| serde_json::from_slice::<Job>(&v).ok())
            .filter(|job| self.belongs(job)))
    }

    pub async fn put(&self, job: &Job) -> Result<(), BackfillError> {
        let mut job = job.clone();
        if job.stream.is_none() {
            job.stream = self.stream.clone();
        }
        let value = serde_json::to_vec(&job).map_err(|e| self.error("encode a job", e))?;
        self.kv
            .put(Self::key(&job.schema, &job.table), value.into())
            .await
            .map_err(|e| self.error("write a job", e))?;
        Ok(())
    }

    fn placement_key(schema: &str, table: &str) -> String {
        format!("placed.{}.{}", kv_token(schema), kv_token(table))
    }

    /// Records where a chunk's rows go, before any of them is sent.
    pub async fn put_placement(
        &self,
        schema: &str,
        table: &str,
        placement: &Placement,
    ) -> Result<(), BackfillError> {
        let value =
            serde_json::to_vec(placement).map_err(|e| self.error("encode a placement", e))?;
        self.kv
            .put(Self::placement_key(schema, table), value.into())
            .await
            .map_err(|e| self.error("write a placement", e))?;
        Ok(())
    }

    /// Where the table's last chunk went, if recorded.
    pub async fn placement(
        &self,
        schema: &str,
        table: &str,
    ) -> Result<Option<Placement>, BackfillError> {
        let value = self
            .kv
            .get(Self::placement_key(schema, table))
            .await
            .map_err(|e| self.error("read a placement", e))?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Every job, oldest first.
    pub async fn jobs(&self) -> Result<Vec<Job>, BackfillError> {
        use futures_util::TryStreamExt;
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| self.error("list jobs", e))?,
            Err(e) => return Err(self.error("list jobs", e)),
        };
        let mut jobs = Vec::new();
        for key in keys.iter().filter(|k| k.starts_with("backfill.")) {
            let value = self
                .kv
                .get(key.as_str())
                .await
                .map_err(|e| self.error("read a job", e))?;
            let Some(job) = value.and_then(|v| serde_json::from_slice::<Job>(&v).ok()) else {
                continue;
            };
            if self.belongs(&job) {
                jobs.push(job);
            } else if let Err(e) = self.kv.delete(key.as_str()).await {
                // Passed over again next time; nothing else depends on it.
                debug!(error = %e, "could not remove another stream's backfill job");
            }
        }
        jobs.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(jobs)
    }
}

/// A watermark as written into the WAL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    pub backfill: String,
    pub chunk: u64,
    /// "low" or "high".
    pub mark: String,
    /// The table's OID (the relation id in the replication stream).
    pub relid: u32,
    /// The key columns the chunk is read in order of.
    pub key: Vec<String>,
    /// The attempt that wrote it. After a restart the slot sends the watermarks of
    /// earlier processes again; they belong to no chunk read now, so the pipeline
    /// passes over them instead of matching them (by job and chunk number) to a chunk
    /// read now, which would place it in the wrong window or have it read again.
    #[serde(default)]
    pub run: String,
}

/// A chunk of rows read between a low and a high watermark.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub job_id: String,
    pub chunk: u64,
    pub relid: u32,
    /// Column names, in the order of each row's values.
    pub columns: Vec<String>,
    /// Each row's values as Postgres writes them (text output), None for NULL.
    pub rows: Vec<Vec<Option<String>>>,
    /// The job's table, for the placement record.
    pub schema: String,
    pub table: String,
    /// The key of its last row, and whether it was a full chunk (more may follow).
    pub last_key: Option<Vec<Option<String>>>,
    pub full: bool,
}

/// Where a chunk's rows went in the stream, written by the pipeline before it sends
/// any of them: the transaction of the chunk's high watermark (`commit_lsn`) and the
/// event indexes its rows take there (`first_index..end_index`).
///
/// Why: the worker records a chunk as done only once its rows are stored, so a crash
/// in between (while the rows are being stored, or after) left a chunk that was
/// stored in full or in part, and read again: its rows twice. With this record and
/// the stream's tail (read at start, like the live exactly-once rule), a restart
/// knows how much of the chunk is stored. All of it: the job moves on. A prefix: the
/// job moves on after the last stored row (its key from the tail event). None: the
/// chunk is read again. Live changes need nothing of the kind, because the slot sends
/// the same transaction again; a chunk's rows exist only in the process that read them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub job: String,
    pub chunk: u64,
    /// The attempt that placed it (see `Watermark::run`).
    pub run: String,
    /// The high watermark transaction's commit LSN, `X/Y`.
    pub commit_lsn: String,
    pub first_index: u64,
    pub end_index: u64,
    /// Rows read (published or dropped for newer live changes).
    pub rows_read: u64,
    pub last_key: Option<Vec<Option<String>>>,
    pub full: bool,
}

/// What became of a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// Its events are stored: `published` rows, `skipped` dropped for newer live changes.
    Stored { published: u64, skipped: u64 },
    /// Read it again (the table's shape changed, or its window was not seen).
    Retry(String),
}

pub type ChunkSender = mpsc::Sender<(Chunk, oneshot::Sender<ChunkOutcome>)>;
pub type ChunkReceiver = mpsc::Receiver<(Chunk, oneshot::Sender<ChunkOutcome>)>;

/// The key columns a table is read in order of: the mapping's key, else the primary key.
/// A mapping's key must be one the table can be paged by: unique (a unique index
/// without a condition covers it) and NOT NULL. Otherwise rows sharing a key would be
/// lost at chunk borders, and a NULL would end the read at once.
pub async fn key_columns(
    catalog: &Catalog,
    cfg: &SourceConfig,
    schema: &str,
    table: &str,
    primary_key: &[String],
) -> Result<Vec<String>, BackfillError> {
    let mapped = cfg
        .mappings
        .iter()
        .find(|m| m.schema == schema && m.table == table)
        .and_then(|m| m.key.clone());
    match mapped {
        Some(k) if k == primary_key => Ok(k),
        Some(k) => {
            let row = catalog
                .client()
                .query_one(
                    "SELECT \
                       (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND NOT a.attisdropped \
                          AND a.attnotnull AND a.attname::text = ANY($3::text[])), \
                       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique \
                          AND i.indpred IS NULL AND i.indexprs IS NULL AND NOT EXISTS ( \
                            SELECT 1 FROM unnest(i.indkey::int2[]) k JOIN pg_attribute a \
                              ON a.attrelid = c.oid AND a.attnum = k \
                            WHERE NOT (a.attname::text = ANY($3::text[])))) \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2",
                    &[&schema, &table, &k],
                )
                .await
                .map_err(|source| CatalogError::Query {
                    what: "check a mapping's key",
                    source,
                })?;
            let not_null: i64 = row.get(0);
            let unique: bool = row.get(1);
            let reason = match (unique, not_null as usize == k.len()) {
                (true, true) => return Ok(k),
                (false, _) => "no unique index covers it",
                (true, false) => "a column of it may be NULL",
            };
            Err(BackfillError::KeyNotUnique {
                table: format!("{schema}.{table}"),
                key: k.join(", "),
                reason,
            })
        }
        None if !primary_key.is_empty() => Ok(primary_key.to_vec()),
        None => Err(BackfillError::NoKey {
            table: format!("{schema}.{table}"),
        }),
    }
}

/// A connection for reading chunks with the session settings the replication
/// connection uses, so a value reads as the same text both ways.
async fn reader(cfg: &PostgresConfig) -> Result<Catalog, BackfillError> {
    let catalog = Catalog::connect(cfg).await?;
    catalog
        .client()
        .batch_execute(
            "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET bytea_output = 'hex';
             SET extra_float_digits = 1; SET IntervalStyle = 'iso_8601'; SET lc_monetary = 'C';
             SET standard_conforming_strings = on; SET client_encoding = 'UTF8';
             SET application_name = 'tidemark-backfill'",
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "set up the backfill session",
            source,
        })?;
    Ok(catalog)
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn emit_watermark(catalog: &Catalog, wm: &Watermark) -> Result<(), BackfillError> {
    let content = serde_json::to_string(wm).unwrap_or_default();
    catalog
        .client()
        .simple_query(&format!(
            "SELECT pg_logical_emit_message(true, {}, {})",
            literal(WATERMARK_PREFIX),
            literal(&content)
        ))
        .await
        .map_err(|source| CatalogError::Query {
            what: "write a backfill watermark",
            source,
        })?;
    Ok(())
}

/// Reads one chunk: the rows after `last_key` in key order.
async fn read_chunk(
    catalog: &Catalog,
    job: &Job,
    columns: &[(String, String)],
) -> Result<Vec<Vec<Option<String>>>, BackfillError> {
    let table = format!("{}.{}", quote_ident(&job.schema), quote_ident(&job.table));
    let select: Vec<String> = columns.iter().map(|(n, _)| quote_ident(n)).collect();
    let key: Vec<String> = job.key.iter().map(|k| quote_ident(k)).collect();
    let values = |vals: &[Option<String>]| -> String {
        job.key
            .iter()
            .zip(vals)
            .map(|(k, v)| {
                let ty = columns
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, t)| t.as_str())
                    .unwrap_or("text");
                match v {
                    Some(v) => format!("{}::{ty}", literal(v)),
                    None => "NULL".into(),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut conds = Vec::new();
    if let Some(last) = &job.last_key {
        conds.push(format!("({}) > ({})", key.join(", "), values(last)));
    }
    if let Some(end) = &job.end_key {
        conds.push(format!("({}) <= ({})", key.join(", "), values(end)));
    }
    if let Some(f) = &job.filter {
        conds.push(format!("({f})"));
    }
    let sql = format!(
        "SELECT {} FROM {table}{} ORDER BY {} LIMIT {}",
        select.join(", "),
        if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        },
        key.join(", "),
        job.chunk_size
    );
    let messages = catalog
        .client()
        .simple_query(&sql)
        .await
        .map_err(|source| BackfillError::Read {
            table: job.qualified(),
            source,
        })?;
    let mut rows = Vec::new();
    for m in messages {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            rows.push(
                (0..columns.len())
                    .map(|i| r.get(i).map(str::to_string))
                    .collect(),
            );
        }
    }
    Ok(rows)
}

/// The largest key (within the job's filter) now, or None for no rows.
async fn max_key(
    catalog: &Catalog,
    job: &Job,
) -> Result<Option<Vec<Option<String>>>, BackfillError> {
    let table = format!("{}.{}", quote_ident(&job.schema), quote_ident(&job.table));
    let key: Vec<String> = job.key.iter().map(|k| quote_ident(k)).collect();
    let desc: Vec<String> = key.iter().map(|k| format!("{k} DESC")).collect();
    let filter = job
        .filter
        .as_ref()
        .map(|f| format!(" WHERE ({f})"))
        .unwrap_or_default();
    let sql = format!(
        "SELECT {} FROM {table}{filter} ORDER BY {} LIMIT 1",
        key.join(", "),
        desc.join(", ")
    );
    let messages = catalog
        .client()
        .simple_query(&sql)
        .await
        .map_err(|source| BackfillError::Read {
            table: job.qualified(),
            source,
        })?;
    Ok(messages.into_iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(
            (0..key.len())
                .map(|i| r.get(i).map(str::to_string))
                .collect(),
        ),
        _ => None,
    }))
}

/// Column names and type names of a table, in attribute order (dropped and generated
/// columns left out, as the replication stream leaves them out).
async fn table_columns(
    catalog: &Catalog,
    dbname: &str,
    schema: &str,
    table: &str,
) -> Result<(u32, Vec<(String, String)>, u64), CatalogError> {
    let rows = catalog
        .client()
        .query(
            "SELECT c.oid, a.attname::text, format_type(a.atttypid, a.atttypmod), c.reltuples::float8 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "backfill table columns",
            source,
        })?;
    let Some(first) = rows.first() else {
        return Err(CatalogError::TableMissing {
            table: format!("{schema}.{table}"),
            dbname: dbname.to_string(),
        });
    };
    let oid: u32 = first.get(0);
    let estimate: f64 = first.get(3);
    Ok((
        oid,
        rows.iter().map(|r| (r.get(1), r.get(2))).collect(),
        estimate.max(0.0) as u64,
    ))
}

/// Runs the source's backfills, one chunk at a time, until `cancel` fires. Hands
/// each chunk to the pipeline through `chunks` and waits until its events are stored.
/// What a worker needs to know of its attempt: the `run` its watermarks carry, and the
/// stream's tail at start, to tell how much of a chunk placed before a crash is stored.
#[derive(Clone, Debug)]
pub struct Resume {
    pub run: String,
    pub tail: StreamTail,
    /// The key (`data.key`) of the tail event.
    pub tail_key: Option<serde_json::Value>,
}

pub async fn run_worker(
    cfg: SourceConfig,
    progress: Progress,
    chunks: ChunkSender,
    resume: Resume,
    cancel: CancellationToken,
) -> Result<(), BackfillError> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut current: Option<Job> = None;
        let err = match run_jobs(&cfg, &progress, &chunks, &resume, &cancel, &mut current).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        // A problem with the job itself (its table is gone, its key or condition no
        // longer works) fails the job, said loudly; anything else pauses and retries.
        let permanent = matches!(
            &err,
            BackfillError::Read { .. }
                | BackfillError::NoKey { .. }
                | BackfillError::KeyNotUnique { .. }
                | BackfillError::Catalog(CatalogError::TableMissing { .. })
        );
        match current {
            Some(job) if permanent => {
                let mut job = progress
                    .get(&job.schema, &job.table)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(job);
                tracing::error!(table = %job.qualified(), error = %crate::error::ErrorChain(&err), "backfill failed: fix the cause and run `tidemark backfill` again");
                job.state = JobState::Failed;
                job.error = Some(crate::error::ErrorChain(&err).to_string());
                job.updated_at = Some(now());
                if let Err(e) = progress.put(&job).await {
                    warn!(error = %e, "could not record the failed backfill");
                }
            }
            _ => {
                warn!(error = %crate::error::ErrorChain(&err), wait_ms = backoff.as_millis() as u64, "backfill paused; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Moves a job past what an earlier process stored of its chunk `placed` (see
/// `Placement`): the whole chunk, a prefix of it, or nothing.
fn settle_placed(job: &mut Job, placed: &Placement, resume: &Resume, columns: &[(String, String)]) {
    let Ok(lsn) = placed.commit_lsn.parse::<Lsn>() else {
        return;
    };
    let tail = &resume.tail;
    let all = placed.end_index == placed.first_index || tail.is_stored(lsn, placed.end_index - 1);
    if all {
        job.chunks_done += 1;
        job.rows_done += placed.rows_read;
        if placed.last_key.is_some() {
            job.last_key = placed.last_key.clone();
        }
        job.updated_at = Some(now());
        if !placed.full {
            job.state = JobState::Done;
            job.finished_at = job.updated_at.clone();
        }
        info!(table = %job.qualified(), chunk = placed.chunk, "backfill chunk stored before the restart: not read again");
        return;
    }
    if !tail.is_stored(lsn, placed.first_index) {
        // Nothing of it is stored: it is read again, as if never read.
        return;
    }
    // A prefix is stored, and the stream's last event is its last row: go on after
    // that row's key.
    let key = match (tail.last_event, &resume.tail_key) {
        (Some((l, index)), Some(key)) if l == lsn => {
            key_text(key, &job.key, columns).map(|k| (k, index - placed.first_index + 1))
        }
        _ => None,
    };
    match key {
        Some((key, stored)) => {
            job.chunks_done += 1;
            job.rows_done += stored;
            job.last_key = Some(key);
            job.updated_at = Some(now());
            info!(table = %job.qualified(), chunk = placed.chunk, count = stored, "backfill chunk partly stored before the restart: going on after its last stored row");
        }
        None => {
            warn!(table = %job.qualified(), chunk = placed.chunk, "backfill chunk partly stored before the restart, and the key of its last stored row cannot be read back: the chunk is read again, so some of its rows are sent twice")
        }
    }
}

/// A key's JSON form (an event's `data.key`) as the text Postgres reads it, for the
/// types whose JSON form is their text form; `None` for others.
fn key_text(
    key: &serde_json::Value,
    columns_of_key: &[String],
    columns: &[(String, String)],
) -> Option<Vec<Option<String>>> {
    columns_of_key
        .iter()
        .map(|name| {
            let ty = columns.iter().find(|(n, _)| n == name)?.1.as_str();
            let textual = matches!(
                ty,
                "smallint" | "integer" | "bigint" | "text" | "uuid" | "boolean" | "date" | "citext"
            ) || ty.starts_with("numeric")
                || ty.starts_with("character")
                || ty.starts_with("timestamp");
            if !textual {
                return None;
            }
            match key.get(name)? {
                serde_json::Value::Null => Some(None),
                serde_json::Value::String(s) => Some(Some(s.clone())),
                serde_json::Value::Number(n) => Some(Some(n.to_string())),
                serde_json::Value::Bool(b) => Some(Some(b.to_string())),
                _ => None,
            }
        })
        .collect()
}

async fn run_jobs(
    cfg: &SourceConfig,
    progress: &Progress,
    chunks: &ChunkSender,
    resume: &Resume,
    cancel: &CancellationToken,
    current: &mut Option<Job>,
) -> Result<(), BackfillError> {
    let run = resume.run.as_str();
    let mut catalog: Option<Catalog> = None;
    loop {
        *current = None;
        let jobs = progress.jobs().await?;
        let Some(mut job) = jobs
            .into_iter()
            .find(|j| matches!(j.state, JobState::Pending | JobState::Running))
        else {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            }
        };
        *current = Some(job.clone());
        if catalog.is_none() {
            catalog = Some(reader(&cfg.postgres).await?);
        }
        let Some(db) = catalog.as_ref() else { continue };
        let (relid, columns, estimate) =
            table_columns(db, &cfg.postgres.dbname, &job.schema, &job.table).await?;
        if job.state == JobState::Pending {
            job.state = JobState::Running;
            job.started_at = Some(now());
            job.rows_estimate = estimate;
            job.end_key = max_key(db, &job).await?;
            if job.end_key.is_none() {
                job.state = JobState::Done;
                job.finished_at = job.started_at.clone();
                progress.put(&job).await?;
                info!(table = %job.qualified(), "backfill done: no rows");
                continue;
            }
            progress.put(&job).await?;
            info!(table = %job.qualified(), reason = %job.reason, estimate, "backfill started");
        } else {
            if let Some(placed) = progress.placement(&job.schema, &job.table).await?
                && placed.job == job.id
                && placed.chunk == job.chunks_done
                && placed.run != run
            {
                settle_placed(&mut job, &placed, resume, &columns);
                progress.put(&job).await?;
                if job.state == JobState::Done {
                    info!(table = %job.qualified(), rows = job.rows_done, "backfill done (its last chunk was stored before the restart)");
                    continue;
                }
            }
            info!(table = %job.qualified(), chunk = job.chunks_done, rows = job.rows_done, "backfill resumed");
        }
        let mut retries = 0;
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            let chunk_no = job.chunks_done;
            let mark = |m: &str| Watermark {
                backfill: job.id.clone(),
                chunk: chunk_no,
                mark: m.into(),
                relid,
                key: job.key.clone(),
                run: run.to_string(),
            };
            emit_watermark(db, &mark("low")).await?;
            let rows = read_chunk(db, &job, &columns).await?;
            debug!(table = %job.qualified(), chunk = chunk_no, count = rows.len(), "backfill chunk read");
            let full = rows.len() as u64 >= job.chunk_size;
            let last_key: Option<Vec<Option<String>>> = rows.last().map(|row| {
                job.key
                    .iter()
                    .map(|k| {
                        columns
                            .iter()
                            .position(|(n, _)| n == k)
                            .and_then(|i| row[i].clone())
                    })
                    .collect()
            });
            let (done_tx, done_rx) = oneshot::channel();
            let chunk = Chunk {
                job_id: job.id.clone(),
                chunk: chunk_no,
                relid,
                columns: columns.iter().map(|(n, _)| n.clone()).collect(),
                rows,
                schema: job.schema.clone(),
                table: job.table.clone(),
                last_key: last_key.clone(),
                full,
            };
            if chunks.send((chunk, done_tx)).await.is_err() {
                return Ok(());
            }
            emit_watermark(db, &mark("high")).await?;
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                o = done_rx => o,
            };
            match outcome {
                Ok(ChunkOutcome::Stored { published, skipped }) => {
                    retries = 0;
                    job.chunks_done += 1;
                    job.rows_done += published + skipped;
                    if last_key.is_some() {
                        job.last_key = last_key;
                    }
                    job.updated_at = Some(now());
                    if !full {
                        job.state = JobState::Done;
                        job.finished_at = job.updated_at.clone();
                    }
                    progress.put(&job).await?;
                    if !full {
                        let (rate, _) = job.rate_and_eta();
                        info!(table = %job.qualified(), rows = job.rows_done, chunks = job.chunks_done, rate = rate as u64, "backfill done");
                        break;
                    }
                }
                Ok(ChunkOutcome::Retry(reason)) => {
                    retries += 1;
                    warn!(table = %job.qualified(), chunk = chunk_no, reason = %reason, "backfill chunk read again");
                    if retries > 10 {
                        job.state = JobState::Failed;
                        job.error = Some(format!("chunk {chunk_no} could not be placed: {reason}"));
                        progress.put(&job).await?;
                        break;
                    }
                }
                // The pipeline went away: this attempt is over.
                Err(_) => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_from_the_job_times() {
        let mut j = Job::new("public", "orders", vec!["id".into()], "backfill", None, 100);
        j.state = JobState::Running;
        j.started_at = Some("2026-01-01T00:00:00Z".into());
        j.updated_at = Some("2026-01-01T00:00:10Z".into());
        j.rows_done = 1000;
        j.rows_estimate = 3000;
        let (rate, eta) = j.rate_and_eta();
        assert_eq!(rate, 100.0);
        assert_eq!(eta, Some(20.0));
    }

    #[test]
    fn watermarks_round_trip_as_json() {
        let w = Watermark {
            backfill: "1-orders".into(),
            chunk: 3,
            mark: "high".into(),
            relid: 16384,
            key: vec!["id".into()],
            run: "4242-0/16B3748-1".into(),
        };
        let text = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<Watermark>(&text).unwrap(), w);
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(kv_token("odd name.x"), "odd_name_x");
    }
}
