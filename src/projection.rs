//! Read-model builders (projections): a source's events applied to tables of another
//! database, exactly once.
//!
//! Each projection reads its source's stream through a JetStream durable consumer and
//! applies each event with the statements its handlers declare. Events of one source
//! transaction are applied in one database transaction, and the same transaction
//! writes the checkpoint (the last applied stream sequence and commit LSN) to
//! `tidemark_checkpoints`. After any crash or redelivery the projection starts again
//! after the checkpoint, so nothing applies twice and nothing is skipped.
//!
//! Read-your-writes: the applied commit LSN is also published to the NATS KV bucket
//! `tidemark_projections`. `tidemark wait` writes a `tidemark.sync` logical message into
//! the source database (which the source publishes as an event every projection reads)
//! and waits until the projection's applied LSN passes the position it was given.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{
    Action, EventPath, KeyPart, KvOp, NatsConfig, PostgresConfig, ProjectionConfig, Target,
};
use crate::error::ErrorChain;
use crate::jetstream::provision::{self, ProvisionError};
use crate::position::Lsn;
use crate::postgres::catalog::{self, CatalogError};
use crate::postgres::replication::quote_ident;

/// The KV bucket holding each projection's applied position.
pub use crate::events::reserved::POSITIONS_BUCKET;
/// The logical message prefix `tidemark wait` writes; the source publishes it as a
/// `tidemark.sync` event on `<source>._tidemark.sync`.
pub use crate::events::reserved::SYNC_PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("projection {projection}: {what}")]
    Database {
        projection: String,
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("projection {projection}: {what}")]
    Nats {
        projection: String,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "projection {projection} cannot apply event {event_id} (stream sequence {seq}, subject {subject}): {reason}; fix the handler or the read model, or set dead_letter to set such events aside"
    )]
    Poison {
        projection: String,
        event_id: String,
        subject: String,
        seq: u64,
        reason: String,
    },
    #[error(
        "projection {projection}: dead-letter publish of event {event_id} to {subject} failed: {reason}; does a stream capture {subject}?"
    )]
    DeadLetter {
        projection: String,
        event_id: String,
        subject: String,
        reason: String,
    },
    /// An event went to the dead-letter subject: the open transaction is rolled back
    /// and applied again without it.
    #[error("event at sequence {0} set aside; applying its transaction again without it")]
    SetAside(u64),
    /// An event failed in a database transaction that also held earlier, complete
    /// source transactions: apply again, committing each source transaction, so the
    /// failure is met with everything before it committed.
    #[error("event at sequence {0} failed; applying again one transaction at a time")]
    Isolate(u64),
    /// The checkpoint moved under us (a rebuild was swapped in): start again from it.
    #[error("the checkpoint moved to stream sequence {0} (a rebuild was swapped in)")]
    Moved(u64),
}

impl ProjectionError {
    fn fatal(&self) -> bool {
        match self {
            ProjectionError::Poison { .. } | ProjectionError::DeadLetter { .. } => true,
            ProjectionError::Catalog(e) => {
                matches!(e.code(), Some(c) if c.starts_with("28") || c == "3D000")
            }
            ProjectionError::Provision(e) => !matches!(
                e,
                ProvisionError::Connect { .. } | ProvisionError::JetStream { .. }
            ),
            _ => false,
        }
    }
}

/// A statement parameter sent as text, so Postgres parses it with the column type's
/// input function (numbers, numeric, timestamps, json, arrays alike).
#[derive(Debug)]
struct TextParam(Option<String>);

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// The value at `path` in an event, as a statement parameter: strings as they are,
/// numbers and booleans as their text, objects and arrays as JSON, null and missing
/// as NULL.
fn param(event: &serde_json::Value, path: &EventPath) -> TextParam {
    let mut v = event;
    for p in path {
        v = match v {
            serde_json::Value::Object(m) => match m.get(p) {
                Some(x) => x,
                None => return TextParam(None),
            },
            serde_json::Value::Array(a) => match p.parse::<usize>().ok().and_then(|i| a.get(i)) {
                Some(x) => x,
                None => return TextParam(None),
            },
            _ => return TextParam(None),
        };
    }
    TextParam(match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    })
}

fn qualified_table(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// The SQL a handler runs, and the event paths of its parameters.
pub fn handler_sql(action: &Action) -> (String, Vec<EventPath>) {
    match action {
        Action::Sql { sql, params } => (sql.clone(), params.clone()),
        Action::Upsert {
            table,
            key,
            columns,
        } => {
            let cols: Vec<String> = columns.iter().map(|(c, _)| quote_ident(c)).collect();
            let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
            let keys: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
            let updates: Vec<String> = columns
                .iter()
                .filter(|(c, _)| !key.contains(c))
                .map(|(c, _)| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
                .collect();
            let on_conflict = if updates.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            (
                format!(
                    "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {on_conflict}",
                    qualified_table(table),
                    cols.join(", "),
                    placeholders.join(", "),
                    keys.join(", ")
                ),
                columns.iter().map(|(_, p)| p.clone()).collect(),
            )
        }
        // KV handlers run no SQL.
        Action::Kv { .. } => (String::new(), Vec::new()),
        Action::Delete { table, key } => {
            let conds: Vec<String> = key
                .iter()
                .enumerate()
                .map(|(i, (c, _))| format!("{} = ${}", quote_ident(c), i + 1))
                .collect();
            (
                format!(
                    "DELETE FROM {} WHERE {}",
                    qualified_table(table),
                    conds.join(" AND ")
                ),
                key.iter().map(|(_, p)| p.clone()).collect(),
            )
        }
    }
}

/// The stream from just after `checkpoint`, in order, through an ordered consumer.
///
/// Why ordered and not a durable with acks: the checkpoint lives with the read model
/// (a table in its database, or the positions bucket), so the server has nothing to
/// remember. A durable consumer's ack wait and unacked limit would make the server
/// redeliver, or stop delivering, in the middle of a source transaction that is still
/// being applied in one open database transaction: a transaction larger than the
/// limit stalled for good, and one slower than the ack wait applied its redelivered
/// part twice. An ordered consumer has neither: each attempt reads on from its
/// checkpoint, every message once, with flow control bounding what is buffered, and it
/// recreates itself after the last message it saw when it misses one. A durable left
/// by an older tidemark (`tidemark_<projection>`) is removed, so it holds nothing back.
async fn read_after(
    js: &jetstream::Context,
    cfg: &ProjectionConfig,
    checkpoint: u64,
) -> Result<pull::Ordered, Box<dyn std::error::Error + Send + Sync>> {
    let stream = js.get_stream(&cfg.stream).await?;
    let legacy = format!("tidemark_{}", cfg.name);
    if stream.consumer_info(&legacy).await.is_ok() {
        stream.delete_consumer(&legacy).await?;
        info!(consumer = %legacy, "removed the projection's old durable consumer: projections read with ordered consumers now");
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: after(checkpoint),
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}

/// The deliver policy that starts right after `checkpoint`.
fn after(checkpoint: u64) -> jetstream::consumer::DeliverPolicy {
    if checkpoint == 0 {
        jetstream::consumer::DeliverPolicy::All
    } else {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: checkpoint + 1,
        }
    }
}

/// An event as a rebuild reads it. What the live projection could not read went to the
/// dead-letter subject (when set) and is passed over again; otherwise it stops the
/// rebuild, named, as it stopped the live projection.
fn rebuild_parse(
    cfg: &ProjectionConfig,
    msg: &jetstream::Message,
    seq: u64,
    wanted: bool,
) -> Result<(serde_json::Value, String, String), ProjectionError> {
    match parse_event(&msg.payload) {
        Ok(parsed) => Ok(parsed),
        Err(_) if !wanted || cfg.dead_letter.is_some() => {
            Ok((serde_json::Value::Null, String::new(), String::new()))
        }
        Err(reason) => Err(ProjectionError::Poison {
            projection: cfg.name.clone(),
            event_id: "(unreadable)".into(),
            subject: msg.subject.to_string(),
            seq,
            reason,
        }),
    }
}

/// How long the live loops wait for the next event before they count as caught up.
const IDLE: Duration = Duration::from_millis(500);

/// The next message of an ordered read, `None` when nothing came within `IDLE`.
async fn next_message(
    messages: &mut pull::Ordered,
    projection: &str,
) -> Result<Option<jetstream::Message>, ProjectionError> {
    match tokio::time::timeout(IDLE, messages.next()).await {
        Err(_) => Ok(None),
        Ok(Some(Ok(m))) => Ok(Some(m)),
        Ok(Some(Err(e))) => Err(nats_error(projection, "read events")(Box::new(e))),
        Ok(None) => Err(nats_error(projection, "read events")(
            "the stream's consumer ended".into(),
        )),
    }
}

/// An event's envelope as the live loops need it. A payload that is not a tidemark
/// event (not JSON, or without `id` and `type`) is refused with the reason, never
/// applied as an empty event or skipped in silence.
fn parse_event(payload: &[u8]) -> Result<(serde_json::Value, String, String), String> {
    let event: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| format!("the message is not a JSON event: {e}"))?;
    let field = |name: &str| {
        event[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("the message has no {name:?} string: not a tidemark event"))
    };
    let (id, event_type) = (field("id")?, field("type")?);
    Ok((event, id, event_type))
}

fn db_error(
    projection: &str,
    what: &str,
) -> impl FnOnce(tokio_postgres::Error) -> ProjectionError + use<> {
    let (projection, what) = (projection.to_string(), what.to_string());
    move |source| ProjectionError::Database {
        projection,
        what,
        source,
    }
}

fn nats_error(
    projection: &str,
    what: &str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> ProjectionError + use<> {
    let (projection, what) = (projection.to_string(), what.to_string());
    move |source| ProjectionError::Nats {
        projection,
        what,
        source,
    }
}

/// Whether a projection reads events on `subject` (its filter is applied by the
/// projection, not the consumer).
fn reads(subjects: &[String], subject: &str) -> bool {
    subjects
        .iter()
        .any(|f| provision::subject_covers(f, subject))
}

/// The statement that records a projection's checkpoint in `table`.
fn upsert_checkpoint(table: &str) -> String {
    format!(
        "INSERT INTO {table} (projection, stream, stream_seq, commit_lsn, updated_at) \
         VALUES ($1, $2, $3, $4, now()) ON CONFLICT (projection) DO UPDATE \
         SET stream = EXCLUDED.stream, stream_seq = EXCLUDED.stream_seq, commit_lsn = EXCLUDED.commit_lsn, updated_at = now()"
    )
}

/// A projection's entry in the positions bucket, and its revision (0 when absent).
async fn position_entry(kv: &jetstream::kv::Store, name: &str) -> (Applied, u64) {
    match kv.entry(name).await {
        Ok(Some(e)) if e.operation == jetstream::kv::Operation::Put => (
            serde_json::from_slice::<Applied>(&e.value).unwrap_or_default(),
            e.revision,
        ),
        _ => (Applied::default(), 0),
    }
}

/// Writes a projection's position entry, conditional on `revision` (0: it must not
/// exist yet). Returns the new revision.
async fn write_position(
    kv: &jetstream::kv::Store,
    name: &str,
    position: &Applied,
    revision: u64,
) -> Result<u64, String> {
    let value: bytes::Bytes = serde_json::to_vec(position).unwrap_or_default().into();
    if revision == 0 {
        kv.create(name, value).await.map_err(|e| e.to_string())
    } else {
        kv.update(name, value, revision)
            .await
            .map_err(|e| e.to_string())
    }
}

/// A projection's applied position, as published in the positions bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub seq: u64,
    pub lsn: Option<String>,
    /// A KV projection's current bucket, once a rebuild swapped a new one in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

async fn positions(js: &jetstream::Context) -> Result<jetstream::kv::Store, String> {
    match js.get_key_value(POSITIONS_BUCKET).await {
        Ok(kv) => Ok(kv),
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: POSITIONS_BUCKET.into(),
                history: 1,
                description: "tidemark projections' applied positions".into(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string()),
    }
}

/// Reads a projection's applied position from the positions bucket.
pub async fn applied(js: &jetstream::Context, projection: &str) -> Option<Applied> {
    let kv = js.get_key_value(POSITIONS_BUCKET).await.ok()?;
    let v = kv.get(projection).await.ok()??;
    serde_json::from_slice(&v).ok()
}

/// Waits until `projection` has applied everything committed before `lsn`: its
/// applied commit LSN reaches `lsn`. Something committed after `lsn` must reach the
/// stream for this to happen; `tidemark wait` writes a sync message to make sure.
pub async fn wait_applied(
    js: &jetstream::Context,
    projection: &str,
    lsn: Lsn,
    timeout: Duration,
) -> Result<Applied, Option<Applied>> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(a) = applied(js, projection).await {
            if a.lsn
                .as_deref()
                .and_then(|l| l.parse::<Lsn>().ok())
                .is_some_and(|l| l >= lsn)
            {
                return Ok(a);
            }
            last = Some(a);
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs one projection until `cancel` fires (Ok) or an error an operator must fix.
pub async fn run_projection(
    cfg: ProjectionConfig,
    nats: NatsConfig,
    cancel: CancellationToken,
    tel: std::sync::Arc<crate::telemetry::Telemetry>,
) -> Result<(), ProjectionError> {
    let span = info_span!("projection", projection = %cfg.name, stream = %cfg.stream);
    async move {
        let mut set_aside: HashSet<u64> = HashSet::new();
        let mut careful_until: u64 = 0;
        let mut backoff = Duration::from_millis(200);
        loop {
            let started = Instant::now();
            let err = match attempt(&cfg, &nats, &cancel, &mut set_aside, careful_until, &tel).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            match err {
                ProjectionError::SetAside(seq) => {
                    debug!(seq, "applying again without the set-aside event");
                    continue;
                }
                ProjectionError::Isolate(seq) => {
                    careful_until = seq;
                    continue;
                }
                ProjectionError::Moved(seq) => {
                    info!(seq, "the checkpoint moved (a rebuild was swapped in); continuing from it");
                    continue;
                }
                _ => {}
            }
            if err.fatal() {
                error!(error = %ErrorChain(&err), "projection stopped: this needs an operator");
                return Err(err);
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_millis(200);
            }
            warn!(error = %ErrorChain(&err), wait_ms = backoff.as_millis() as u64, "projection failed; starting again from its checkpoint");
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
    .instrument(span)
    .await
}

const CHECKPOINTS: &str = "CREATE TABLE IF NOT EXISTS tidemark_checkpoints (
    projection text PRIMARY KEY,
    stream text NOT NULL,
    stream_seq bigint NOT NULL,
    commit_lsn text,
    updated_at timestamptz NOT NULL DEFAULT now())";

/// Events applied between commits, at most (a source transaction is never split).
const COMMIT_EVERY: usize = 500;

async fn attempt(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    cancel: &CancellationToken,
    set_aside: &mut HashSet<u64>,
    careful_until: u64,
    tel: &crate::telemetry::Telemetry,
) -> Result<(), ProjectionError> {
    let label = crate::telemetry::ProjectionLabel {
        projection: cfg.name.clone(),
    };
    let db_err = |what: &str| db_error(&cfg.name, what);
    let nats_err = |what: &str| nats_error(&cfg.name, what);
    let target = match &cfg.target {
        Target::Postgres(pg) => pg,
        Target::Kv { bucket } => return attempt_kv(cfg, nats, cancel, bucket).await,
    };
    let client = catalog::connect_client(target, "tidemark-projection").await?;
    client
        .batch_execute(CHECKPOINTS)
        .await
        .map_err(db_err("create tidemark_checkpoints"))?;
    let row = client
        .query_opt(
            "SELECT stream_seq, commit_lsn FROM tidemark_checkpoints WHERE projection = $1",
            &[&cfg.name],
        )
        .await
        .map_err(db_err("read the checkpoint"))?;
    let mut checkpoint: u64 = row.as_ref().map_or(0, |r| r.get::<_, i64>(0) as u64);
    let mut checkpoint_lsn: Option<String> = row.and_then(|r| r.get(1));
    // Prepare every handler's statement: a handler that does not fit the read model
    // fails here, before anything is applied.
    let mut handlers = Vec::new();
    for h in &cfg.handlers {
        let (sql, params) = handler_sql(&h.action);
        let stmt = client
            .prepare(&sql)
            .await
            .map_err(|e| ProjectionError::Poison {
                projection: cfg.name.clone(),
                event_id: "-".into(),
                subject: "-".into(),
                seq: 0,
                reason: format!(
                    "handler for {:?} does not fit the read model: {}: {sql}",
                    h.types,
                    ErrorChain(&e)
                ),
            })?;
        handlers.push((h.types.clone(), stmt, params));
    }

    let nc = provision::connect(nats, &format!("tidemark-projection-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let kv = positions(&js)
        .await
        .map_err(|e| nats_err("open the positions bucket")(e.into()))?;
    // The consumer starts after the checkpoint every time: the database, not the
    // consumer, says what is applied.
    let mut messages = read_after(&js, cfg, checkpoint)
        .await
        .map_err(nats_err("read the stream"))?;
    info!(seq = checkpoint, lsn = ?checkpoint_lsn, "projecting");

    // The open database transaction (BEGIN sent), and the events applied in it. A
    // dropped connection rolls an open transaction back. A source transaction of any
    // size streams into it event by event; nothing is buffered here.
    let mut open = false;
    let mut in_tx = 0usize;
    // Complete source transactions in the open database transaction.
    let mut whole_txs = 0usize;
    let mut last_published = Instant::now() - Duration::from_secs(1);
    let mut inflight: futures_util::stream::FuturesOrdered<Answer<'_>> =
        futures_util::stream::FuturesOrdered::new();
    loop {
        let msg = tokio::select! {
            biased;
            // An open transaction is rolled back: it is applied again on the next start.
            _ = cancel.cancelled() => return Ok(()),
            m = next_message(&mut messages, &cfg.name) => m?,
        };
        let Some(msg) = msg else {
            // Caught up and quiet: say where the read model stands.
            if !open && last_published.elapsed() > Duration::from_millis(100) {
                publish_position(&kv, &cfg.name, checkpoint, checkpoint_lsn.clone()).await;
                last_published = Instant::now() + Duration::from_secs(5);
            }
            continue;
        };
        let info = msg.info().map_err(|e| nats_err("read message info")(e))?;
        let seq = info.stream_sequence;
        let pending = info.pending;
        if seq <= checkpoint {
            continue;
        }
        if !open {
            client
                .batch_execute("BEGIN")
                .await
                .map_err(db_err("begin"))?;
            // The projection's lock (a rebuild's swap takes it too), and the
            // checkpoint under it: a swap may have moved it.
            let row = client
                .query_one(
                    "SELECT pg_advisory_xact_lock(hashtext($1))::text, \
                     (SELECT stream_seq FROM tidemark_checkpoints WHERE projection = $1)",
                    &[&cfg.name],
                )
                .await
                .map_err(db_err("take the projection's lock"))?;
            let stored = row.get::<_, Option<i64>>(1).unwrap_or(0) as u64;
            if stored != checkpoint {
                client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(db_err("roll back"))?;
                return Err(ProjectionError::Moved(stored));
            }
            open = true;
            in_tx = 0;
            whole_txs = 0;
        }
        let wanted = reads(&cfg.subjects, &msg.subject) && !set_aside.contains(&seq);
        let parsed = parse_event(&msg.payload);
        let origin = |event_id: String| Origin {
            seq,
            event_id,
            subject: msg.subject.to_string(),
            payload: msg.payload.clone(),
        };
        let (event, event_id, event_type) = match &parsed {
            Ok((event, id, ty)) => (event, id.clone(), ty.as_str()),
            // An event this projection does not read need not parse.
            Err(_) if !wanted => (&serde_json::Value::Null, String::new(), ""),
            Err(reason) => {
                let failed = settle_answers(&mut inflight, 0).await.unwrap_or((
                    Sent {
                        origin: origin("(unreadable)".into()),
                        whole_txs,
                    },
                    reason.clone(),
                ));
                drop(inflight);
                return refuse(cfg, &js, &client, failed.0, failed.1, set_aside).await;
            }
        };
        if wanted {
            for (types, stmt, paths) in &handlers {
                if !types.iter().any(|t| t == event_type) {
                    continue;
                }
                let params: Vec<TextParam> = paths.iter().map(|p| param(event, p)).collect();
                let sent = Sent {
                    origin: origin(event_id.clone()),
                    whole_txs,
                };
                let client = &client;
                inflight.push_back(Box::pin(async move {
                    let refs = params.iter().map(|p| p as &(dyn ToSql + Sync));
                    (sent, client.execute_raw(stmt, refs).await)
                }));
            }
            if let Some((failed, reason)) = settle_answers(&mut inflight, PIPELINE).await {
                drop(inflight);
                return refuse(cfg, &js, &client, failed, reason, set_aside).await;
            }
        }
        in_tx += 1;
        let lsn = event["commitlsn"].as_str().map(str::to_string);
        // Commit only at the end of a source transaction (events without the mark
        // count as whole transactions), once caught up or after a good number.
        let tx_end = event["txlast"].as_bool().unwrap_or(true);
        if tx_end {
            whole_txs += 1;
        }
        if tx_end && (pending == 0 || in_tx >= COMMIT_EVERY || seq <= careful_until) {
            if let Some((failed, reason)) = settle_answers(&mut inflight, 0).await {
                drop(inflight);
                return refuse(cfg, &js, &client, failed, reason, set_aside).await;
            }
            client
                .execute(
                    &upsert_checkpoint("tidemark_checkpoints"),
                    &[&cfg.name, &cfg.stream, &(seq as i64), &lsn],
                )
                .await
                .map_err(db_err("write the checkpoint"))?;
            client
                .batch_execute("COMMIT")
                .await
                .map_err(db_err("commit"))?;
            open = false;
            checkpoint = seq;
            checkpoint_lsn = lsn;
            set_aside.retain(|s| *s > seq);
            tel.projection_applied_seq
                .get_or_create(&label)
                .set(seq as i64);
            tel.projection_behind
                .get_or_create(&label)
                .set(pending as i64);
            tel.projection_events
                .get_or_create(&label)
                .inc_by(in_tx as u64);
            let synced = event_type == "tidemark.sync";
            if synced || pending == 0 || last_published.elapsed() > Duration::from_millis(100) {
                publish_position(&kv, &cfg.name, checkpoint, checkpoint_lsn.clone()).await;
                last_published = Instant::now();
            }
        }
    }
}

/// The event a failure is about: enough to name it, and to set it aside.
struct Origin {
    seq: u64,
    event_id: String,
    subject: String,
    payload: bytes::Bytes,
}

impl Origin {
    fn poison(self, cfg: &ProjectionConfig, reason: String) -> ProjectionError {
        ProjectionError::Poison {
            projection: cfg.name.clone(),
            event_id: self.event_id,
            subject: self.subject,
            seq: self.seq,
            reason,
        }
    }
}

/// A handler statement sent and not yet answered: statements are pipelined (sent
/// without waiting for the previous answer; Postgres runs them in order), so a
/// transaction of many events is not one round trip per event.
struct Sent {
    origin: Origin,
    /// Complete source transactions before it in the open database transaction.
    whole_txs: usize,
}

/// Statements in flight at most.
const PIPELINE: usize = 256;

type Answer<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Sent, Result<u64, tokio_postgres::Error>)> + Send + 'a>,
>;

/// Awaits answers until at most `keep` statements are in flight. The first failure
/// (in order: later ones only say the transaction is aborted) is returned.
async fn settle_answers(
    inflight: &mut futures_util::stream::FuturesOrdered<Answer<'_>>,
    keep: usize,
) -> Option<(Sent, String)> {
    while inflight.len() > keep {
        let Some((sent, result)) = inflight.next().await else {
            break;
        };
        if let Err(e) = result {
            return Some((sent, ErrorChain(&e).to_string()));
        }
    }
    None
}

/// Rolls the open transaction back and decides what a failed event means: applied
/// again one source transaction at a time when complete ones shared its database
/// transaction (so it is met with everything before it committed), else set aside to
/// the dead-letter subject, else the projection stops naming it.
async fn refuse(
    cfg: &ProjectionConfig,
    js: &jetstream::Context,
    client: &tokio_postgres::Client,
    failed: Sent,
    reason: String,
    set_aside: &mut HashSet<u64>,
) -> Result<(), ProjectionError> {
    client
        .batch_execute("ROLLBACK")
        .await
        .map_err(db_error(&cfg.name, "roll back"))?;
    let Sent { origin, whole_txs } = failed;
    if whole_txs > 0 {
        return Err(ProjectionError::Isolate(origin.seq));
    }
    let Some(subject) = &cfg.dead_letter else {
        return Err(origin.poison(cfg, reason));
    };
    dead_letter(js, cfg, subject, &origin, &reason).await?;
    warn!(event_id = %origin.event_id, seq = origin.seq, dead_letter = %subject, reason = %reason, "event set aside to the dead-letter subject");
    set_aside.insert(origin.seq);
    Err(ProjectionError::SetAside(origin.seq))
}

async fn publish_position(kv: &jetstream::kv::Store, name: &str, seq: u64, lsn: Option<String>) {
    let value = serde_json::to_vec(&Applied {
        seq,
        lsn,
        bucket: None,
    })
    .unwrap_or_default();
    if let Err(e) = kv.put(name, value.into()).await {
        debug!(error = %e, "could not publish the applied position");
    }
}

async fn dead_letter(
    js: &jetstream::Context,
    cfg: &ProjectionConfig,
    subject: &str,
    origin: &Origin,
    reason: &str,
) -> Result<(), ProjectionError> {
    let (event_id, seq) = (origin.event_id.as_str(), origin.seq);
    let fail = |r: String| ProjectionError::DeadLetter {
        projection: cfg.name.clone(),
        event_id: event_id.to_string(),
        subject: subject.to_string(),
        reason: r,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Tidemark-Projection", cfg.name.as_str());
    headers.insert(
        "Tidemark-Reason",
        reason.replace(['\r', '\n'], " ").as_str(),
    );
    headers.insert("Tidemark-Subject", origin.subject.as_str());
    headers.insert("Tidemark-Stream-Sequence", seq.to_string().as_str());
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{event_id}:dead:{}", cfg.name).as_str(),
    );
    let ack = js
        .publish_with_headers(subject.to_string(), headers, origin.payload.clone())
        .await
        .map_err(|e| fail(e.to_string()))?;
    ack.await.map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// The connection a projection applies through (for tests and the Rust API).
pub async fn connect(cfg: &PostgresConfig) -> Result<tokio_postgres::Client, CatalogError> {
    catalog::connect_client(cfg, "tidemark-projection").await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn upsert_and_delete_sql() {
        let (sql, params) = handler_sql(&Action::Upsert {
            table: "rm.orders".into(),
            key: vec!["id".into()],
            columns: vec![
                (
                    "id".into(),
                    vec!["data".into(), "after".into(), "id".into()],
                ),
                (
                    "status".into(),
                    vec!["data".into(), "after".into(), "status".into()],
                ),
            ],
        });
        assert_eq!(
            sql,
            "INSERT INTO \"rm\".\"orders\" (\"id\", \"status\") VALUES ($1, $2) ON CONFLICT (\"id\") DO UPDATE SET \"status\" = EXCLUDED.\"status\""
        );
        assert_eq!(params.len(), 2);
        let (sql, _) = handler_sql(&Action::Delete {
            table: "orders".into(),
            key: vec![("id".into(), vec!["data".into(), "key".into(), "id".into()])],
        });
        assert_eq!(sql, "DELETE FROM \"orders\" WHERE \"id\" = $1");
    }

    #[test]
    fn params_take_values_as_text() {
        let e = json!({"data": {"after": {"n": 5, "s": "x", "b": true, "o": {"k": 1}, "z": null}}});
        let p = |path: &str| param(&e, &path.split('.').map(str::to_string).collect()).0;
        assert_eq!(p("data.after.n").as_deref(), Some("5"));
        assert_eq!(p("data.after.s").as_deref(), Some("x"));
        assert_eq!(p("data.after.b").as_deref(), Some("true"));
        assert_eq!(p("data.after.o").as_deref(), Some("{\"k\":1}"));
        assert_eq!(p("data.after.z"), None);
        assert_eq!(p("data.after.missing"), None);
    }
}

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildStats {
    pub events: u64,
    pub seq: u64,
    pub swap_ms: u128,
}

fn split_table(t: &str) -> (String, String) {
    match t.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => ("public".to_string(), t.to_string()),
    }
}

/// Rebuilds a projection's tables from the start of the stream into a shadow schema,
/// then, holding the projection's lock, applies the last events and swaps the tables
/// and the checkpoint in one transaction. The live model serves until the swap.
pub async fn rebuild(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    mut progress: impl FnMut(u64, u64),
) -> Result<RebuildStats, ProjectionError> {
    let db_err = |what: &str| db_error(&cfg.name, what);
    let nats_err = |what: &str| nats_error(&cfg.name, what);
    let target = match &cfg.target {
        Target::Kv { bucket } => return rebuild_kv(cfg, nats, bucket, progress).await,
        Target::Postgres(pg) => pg,
    };
    if cfg.tables.is_empty() {
        return Err(ProjectionError::Poison {
            projection: cfg.name.clone(),
            event_id: "-".into(),
            subject: "-".into(),
            seq: 0,
            reason: "no tables to rebuild: name them in the projection (tables = [\"...\"])".into(),
        });
    }

    let client = catalog::connect_client(target, "tidemark-rebuild").await?;
    client
        .batch_execute(CHECKPOINTS)
        .await
        .map_err(db_err("create tidemark_checkpoints"))?;
    // The checkpoint table the live projection uses, named before the search path
    // points at the shadow schema.
    let checkpoints: String = client
        .query_one(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'tidemark_checkpoints'::regclass",
            &[],
        )
        .await
        .map_err(db_err("find tidemark_checkpoints"))?
        .get(0);
    let shadow = quote_ident(&format!("tidemark_rebuild_{}", cfg.name));
    let old = quote_ident(&format!("tidemark_old_{}", cfg.name));
    let tables: Vec<(String, String)> = cfg.tables.iter().map(|t| split_table(t)).collect();
    let mut setup = format!(
        "DROP SCHEMA IF EXISTS {shadow} CASCADE; DROP SCHEMA IF EXISTS {old} CASCADE; CREATE SCHEMA {shadow};"
    );
    let mut schemas: Vec<String> = Vec::new();
    for (schema, name) in &tables {
        setup.push_str(&format!(
            "CREATE TABLE {shadow}.{n} (LIKE {s}.{n} INCLUDING ALL);",
            s = quote_ident(schema),
            n = quote_ident(name)
        ));
        if !schemas.contains(schema) {
            schemas.push(schema.clone());
        }
    }
    // Unqualified table names in the handlers now resolve to the shadow tables.
    let path: Vec<String> = schemas.iter().map(|s| quote_ident(s)).collect();
    setup.push_str(&format!("SET search_path = {shadow}, {};", path.join(", ")));
    client
        .batch_execute(&setup)
        .await
        .map_err(db_err("create the shadow tables"))?;
    let mut handlers = Vec::new();
    for h in &cfg.handlers {
        let (sql, params) = handler_sql(&h.action);
        let stmt = client
            .prepare(&sql)
            .await
            .map_err(db_err("prepare a handler against the shadow tables"))?;
        handlers.push((h.types.clone(), stmt, params));
    }

    let nc = provision::connect(nats, &format!("tidemark-rebuild-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| nats_err("open the stream")(Box::new(e)))?;
    // The consumer reads the whole stream and the subjects filter applies here: a
    // source transaction's last event (its txlast mark) may be on any subject, and
    // the transaction must end where the source's did.
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err("create the rebuild consumer")(Box::new(e)))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| nats_err("read the stream")(Box::new(e)))?;

    let mut applied_seq = 0u64;
    let mut applied_lsn: Option<String> = None;
    let mut events = 0u64;
    let mut open = false;
    let mut at_tx_end = true;
    let mut in_tx = 0usize;
    let mut swapping = false;
    let mut swap_started = Instant::now();
    loop {
        let wait = if swapping { 200 } else { 500 };
        let next = tokio::time::timeout(Duration::from_millis(wait), messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => Some(m),
            Ok(Some(Err(e))) => return Err(nats_err("read the stream")(Box::new(e))),
            Ok(None) => return Err(nats_err("read the stream")("the stream ended".into())),
            Err(_) => None,
        };
        let Some(msg) = msg else {
            // Caught up (at a transaction's end): take the lock and swap.
            if !at_tx_end {
                continue;
            }
            if swapping {
                break;
            }
            if open {
                client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(db_err("commit"))?;
            }
            swap_started = Instant::now();
            client
                .batch_execute("BEGIN")
                .await
                .map_err(db_err("begin the swap"))?;
            client
                .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&cfg.name])
                .await
                .map_err(db_err("take the projection's lock"))?;
            open = true;
            swapping = true;
            continue;
        };
        let info = msg.info().map_err(|e| nats_err("read message info")(e))?;
        let seq = info.stream_sequence;
        let last = info.pending + seq;
        let wanted = reads(&cfg.subjects, &msg.subject);
        let (event, event_id, event_type) = rebuild_parse(cfg, &msg, seq, wanted)?;
        if !open {
            client
                .batch_execute("BEGIN")
                .await
                .map_err(db_err("begin"))?;
            open = true;
            in_tx = 0;
        }
        let skip_failures = cfg.dead_letter.is_some();
        for (types, stmt, paths) in &handlers {
            if !wanted || !types.iter().any(|t| t == &event_type) {
                continue;
            }
            let params: Vec<TextParam> = paths.iter().map(|p| param(&event, p)).collect();
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            if skip_failures {
                client
                    .batch_execute("SAVEPOINT tidemark_event")
                    .await
                    .map_err(db_err("savepoint"))?;
            }
            if let Err(e) = client.execute(stmt, &refs).await {
                if skip_failures {
                    // Set aside before (it went to the dead-letter subject then).
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT tidemark_event")
                        .await
                        .map_err(db_err("roll back to the savepoint"))?;
                    continue;
                }
                return Err(ProjectionError::Poison {
                    projection: cfg.name.clone(),
                    event_id,
                    subject: msg.subject.to_string(),
                    seq,
                    reason: ErrorChain(&e).to_string(),
                });
            }
        }
        events += 1;
        in_tx += 1;
        applied_seq = seq;
        applied_lsn = event["commitlsn"].as_str().map(str::to_string);
        at_tx_end = event["txlast"].as_bool().unwrap_or(true);
        progress(seq, last.max(seq));
        if at_tx_end && !swapping && in_tx >= COMMIT_EVERY {
            client
                .batch_execute("COMMIT")
                .await
                .map_err(db_err("commit"))?;
            open = false;
        }
    }
    // Holding the lock, with everything stored applied: swap tables and checkpoint.
    let mut swap = format!("CREATE SCHEMA {old};");
    for (schema, name) in &tables {
        swap.push_str(&format!(
            "ALTER TABLE {s}.{n} SET SCHEMA {old}; ALTER TABLE {shadow}.{n} SET SCHEMA {s};",
            s = quote_ident(schema),
            n = quote_ident(name)
        ));
    }
    client
        .batch_execute(&swap)
        .await
        .map_err(db_err("swap the tables"))?;
    client
        .execute(
            &upsert_checkpoint(&checkpoints),
            &[&cfg.name, &cfg.stream, &(applied_seq as i64), &applied_lsn],
        )
        .await
        .map_err(db_err("write the checkpoint"))?;
    client
        .batch_execute(&format!(
            "DROP SCHEMA {old} CASCADE; DROP SCHEMA {shadow} CASCADE; COMMIT"
        ))
        .await
        .map_err(db_err("commit the swap"))?;
    let swap_ms = swap_started.elapsed().as_millis();
    if let Ok(kv) = positions(&js).await {
        publish_position(&kv, &cfg.name, applied_seq, applied_lsn).await;
    }
    info!(projection = %cfg.name, events, seq = applied_seq, swap_ms, "rebuilt and swapped in");
    Ok(RebuildStats {
        events,
        seq: applied_seq,
        swap_ms,
    })
}

/// One event as a consumer sees it: the CloudEvents envelope and its data.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct Event {
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub commitlsn: String,
    #[serde(default)]
    pub xid: u32,
    #[serde(default)]
    pub txindex: u64,
    /// True on the last event of its source transaction.
    #[serde(default = "yes")]
    pub txlast: bool,
    #[serde(default)]
    pub data: serde_json::Value,
    /// The stream sequence it is stored at.
    #[serde(skip)]
    pub seq: u64,
}

fn yes() -> bool {
    true
}

/// What a [`Consumer`] hands events to. `apply` runs inside the database transaction
/// that also records the checkpoint: what it writes commits with the checkpoint or not
/// at all. It gets a source transaction's events in order, in slices of at most
/// `Consumer::max_slice`; the database transaction commits after the source
/// transaction's last event.
#[allow(async_fn_in_trait)]
pub trait Apply {
    type Error: std::error::Error + Send + Sync + 'static;
    async fn apply(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), Self::Error>;
}

/// Why a [`Consumer`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError<E: std::error::Error + Send + Sync + 'static> {
    #[error("the read model's database")]
    Database(#[from] tokio_postgres::Error),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("the apply function failed on the transaction ending at event {event_id}")]
    Apply {
        event_id: String,
        #[source]
        source: E,
    },
}

/// A read-model consumer for code that config cannot express: it hands a stream's
/// events to an [`Apply`] and commits its checkpoint in the same Postgres transaction
/// (table `tidemark_checkpoints`, keyed by `name`), so every event applies exactly
/// once across crashes and restarts.
pub struct Consumer {
    js: jetstream::Context,
    stream: String,
    name: String,
    subjects: Vec<String>,
    /// The most events handed to one `apply` call.
    pub max_slice: usize,
}

impl Consumer {
    /// A consumer of `stream` (all of it, or `subjects`) named `name`.
    pub fn new(
        client: async_nats::Client,
        stream: &str,
        name: &str,
        subjects: Vec<String>,
    ) -> Consumer {
        Consumer {
            js: jetstream::new(client),
            stream: stream.to_string(),
            name: name.to_string(),
            subjects,
            max_slice: 500,
        }
    }

    /// Applies events until `cancel` fires.
    pub async fn run<A: Apply>(
        &self,
        client: &mut tokio_postgres::Client,
        app: &mut A,
        cancel: CancellationToken,
    ) -> Result<(), ConsumerError<A::Error>> {
        let nats = |e: &dyn std::fmt::Display| ConsumerError::Nats(e.to_string());
        client.batch_execute(CHECKPOINTS).await?;
        let row = client
            .query_opt(
                "SELECT stream_seq FROM tidemark_checkpoints WHERE projection = $1",
                &[&self.name],
            )
            .await?;
        let checkpoint: u64 = row.map_or(0, |r| r.get::<_, i64>(0) as u64);
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| nats(&e))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: if checkpoint == 0 {
                    jetstream::consumer::DeliverPolicy::All
                } else {
                    jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: checkpoint + 1,
                    }
                },
                ..Default::default()
            })
            .await
            .map_err(|e| nats(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| nats(&e))?;
        loop {
            // One source transaction per database transaction.
            let first = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                m = messages.next() => m,
            };
            let Some(first) = first else {
                return Err(ConsumerError::Nats("the stream's consumer ended".into()));
            };
            let tx = client.transaction().await?;
            let mut slice: Vec<Event> = Vec::new();
            // Set when the transaction's last event is one the subjects leave out.
            let mut checkpoint_at: Option<(i64, String)> = None;
            let mut next = Some(first);
            loop {
                let Some(m) = next.take() else { break };
                let m = m.map_err(|e| nats(&e))?;
                let seq = m.info().map_err(|e| nats(&e))?.stream_sequence;
                let mut event: Event = match serde_json::from_slice(&m.payload) {
                    Ok(e) => e,
                    Err(e) => {
                        return Err(nats(&format!("event at sequence {seq} is not JSON: {e}")));
                    }
                };
                event.seq = seq;
                let last = event.txlast;
                let wanted = self.subjects.is_empty() || reads(&self.subjects, &m.subject);
                if wanted {
                    slice.push(event);
                } else if last {
                    checkpoint_at = Some((seq as i64, event.commitlsn.clone()));
                }
                if last || slice.len() >= self.max_slice {
                    let end = slice.last().map(|e| e.id.clone()).unwrap_or_default();
                    if !slice.is_empty() {
                        app.apply(&tx, &slice)
                            .await
                            .map_err(|source| ConsumerError::Apply {
                                event_id: end,
                                source,
                            })?;
                    }
                    if last {
                        let (seq, lsn) = checkpoint_at.take().unwrap_or_else(|| {
                            slice
                                .last()
                                .map(|e| (e.seq as i64, e.commitlsn.clone()))
                                .unwrap_or_default()
                        });
                        tx.execute(
                            "INSERT INTO tidemark_checkpoints (projection, stream, stream_seq, commit_lsn, updated_at) \
                             VALUES ($1, $2, $3, $4, now()) ON CONFLICT (projection) DO UPDATE \
                             SET stream_seq = EXCLUDED.stream_seq, commit_lsn = EXCLUDED.commit_lsn, updated_at = now()",
                            &[&self.name, &self.stream, &seq, &lsn],
                        )
                        .await?;
                        break;
                    }
                    slice.clear();
                }
                next = messages.next().await;
            }
            tx.commit().await?;
        }
    }
}

/// The field a KV projection keeps in each value: the stream sequence of the event
/// that wrote it, so a redelivered older event is never applied over it.
pub const KV_SEQ_FIELD: &str = "_tidemark_seq";

/// A KV key from its template, or why it cannot be made.
fn render_key(parts: &[KeyPart], event: &serde_json::Value) -> Result<String, String> {
    let mut out = String::new();
    for p in parts {
        match p {
            KeyPart::Lit(l) => out.push_str(l),
            KeyPart::Path(path) => match param(event, path).0 {
                Some(v) => out.push_str(&v),
                None => return Err(format!("{} is missing from the event", path.join("."))),
            },
        }
    }
    let valid = !out.is_empty()
        && !out.starts_with('.')
        && !out.ends_with('.')
        && out
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '=' | '.'));
    if valid {
        Ok(out)
    } else {
        Err(format!("{out:?} is not a valid KV key"))
    }
}

/// Applies one KV operation unless the key already holds this event or a later one.
/// Conditional on the entry's revision: a concurrent writer makes it read again.
async fn apply_kv(
    kv: &jetstream::kv::Store,
    op: KvOp,
    key: &str,
    fields: &[(String, EventPath)],
    event: &serde_json::Value,
    seq: u64,
) -> Result<(), String> {
    for _ in 0..10 {
        let entry = kv.entry(key).await.map_err(|e| e.to_string())?;
        let live = entry
            .as_ref()
            .filter(|e| e.operation == jetstream::kv::Operation::Put);
        let stored: Option<serde_json::Map<String, serde_json::Value>> =
            live.and_then(|e| serde_json::from_slice(&e.value).ok());
        let stored_seq = stored
            .as_ref()
            .and_then(|m| m.get(KV_SEQ_FIELD))
            .and_then(|v| v.as_u64());
        if stored_seq.is_some_and(|s| s >= seq) {
            return Ok(());
        }
        let result = match op {
            KvOp::Delete => match live {
                Some(e) => kv
                    .delete_expect_revision(key, Some(e.revision))
                    .await
                    .map(|_| 0)
                    .map_err(|e| e.to_string()),
                None => return Ok(()),
            },
            KvOp::Put | KvOp::Merge => {
                let mut value = match (op, stored) {
                    (KvOp::Merge, Some(m)) => m,
                    _ => serde_json::Map::new(),
                };
                for (field, path) in fields {
                    let mut v = event;
                    for p in path {
                        v = v.get(p).unwrap_or(&serde_json::Value::Null);
                    }
                    value.insert(field.clone(), v.clone());
                }
                value.insert(KV_SEQ_FIELD.into(), serde_json::json!(seq));
                let bytes: bytes::Bytes = serde_json::to_vec(&value).unwrap_or_default().into();
                match live {
                    Some(e) => kv
                        .update(key, bytes, e.revision)
                        .await
                        .map_err(|e| e.to_string()),
                    None => kv.create(key, bytes).await.map_err(|e| e.to_string()),
                }
            }
        };
        match result {
            Ok(_) => return Ok(()),
            // Someone wrote the key meanwhile: read it again.
            Err(e) if e.contains("wrong last sequence") || e.contains("already exists") => continue,
            Err(e) => return Err(e),
        }
    }
    Err(format!("key {key} kept changing under the projection"))
}

/// A KV projection: events applied to keys of a bucket, each conditional on the key's
/// revision and skipped where the key already holds this event or a later one. The
/// applied position (in the positions bucket) is the checkpoint.
async fn attempt_kv(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    cancel: &CancellationToken,
    bucket: &str,
) -> Result<(), ProjectionError> {
    let nats_err = |what: &str| nats_error(&cfg.name, what);
    let nc = provision::connect(nats, &format!("tidemark-projection-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let positions_kv = positions(&js)
        .await
        .map_err(|e| nats_err("open the positions bucket")(e.into()))?;
    // The position, and the bucket a rebuild may have swapped in; its revision makes
    // every later write conditional, so a swap is never overwritten.
    let (start, mut revision) = position_entry(&positions_kv, &cfg.name).await;
    let bucket = start.bucket.clone().unwrap_or_else(|| bucket.to_string());
    let bucket = bucket.as_str();
    let kv = match js.get_key_value(bucket).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: bucket.to_string(),
                history: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err("create the bucket")(Box::new(e)))?,
    };
    let mut checkpoint = start.seq;
    let mut messages = read_after(&js, cfg, checkpoint)
        .await
        .map_err(nats_err("read the stream"))?;
    info!(seq = checkpoint, bucket, "projecting into KV");
    // The end of the last whole source transaction applied and not yet recorded.
    let mut unrecorded: Option<(u64, Option<String>)> = None;
    let mut since_recorded = 0usize;
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            m = next_message(&mut messages, &cfg.name) => m?,
        };
        let pending = match &msg {
            None => 0,
            Some(msg) => {
                let info = msg.info().map_err(|e| nats_err("read message info")(e))?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                if seq <= checkpoint {
                    continue;
                }
                let wanted = reads(&cfg.subjects, &msg.subject);
                let (event, event_id, event_type) = match parse_event(&msg.payload) {
                    Ok(parsed) => parsed,
                    Err(_) if !wanted => (serde_json::Value::Null, String::new(), String::new()),
                    Err(reason) => {
                        kv_refuse(cfg, &js, msg, "(unreadable)".into(), seq, reason).await?;
                        (serde_json::Value::Null, String::new(), String::new())
                    }
                };
                if wanted {
                    for reason in apply_kv_handlers(cfg, &kv, &event, &event_type, seq).await {
                        kv_refuse(cfg, &js, msg, event_id.clone(), seq, reason).await?;
                    }
                }
                since_recorded += 1;
                if event["txlast"].as_bool().unwrap_or(true) {
                    unrecorded = Some((seq, event["commitlsn"].as_str().map(str::to_string)));
                }
                pending
            }
        };
        // Record the position once caught up, or after a good number of events.
        if pending > 0 && since_recorded < COMMIT_EVERY {
            continue;
        }
        let Some((seq, lsn)) = unrecorded.take() else {
            continue;
        };
        since_recorded = 0;
        checkpoint = seq;
        let position = Applied {
            seq,
            lsn,
            bucket: start.bucket.clone(),
        };
        match write_position(&positions_kv, &cfg.name, &position, revision).await {
            Ok(r) => revision = r,
            // A rebuild swapped a new bucket in: continue from its position.
            Err(e) => {
                debug!(error = %e, "the position moved under the projection");
                return Err(ProjectionError::Moved(seq));
            }
        }
    }
}

/// Applies the KV handlers of `event_type` to one event, live or in a rebuild; the
/// reason of each handler that failed.
async fn apply_kv_handlers(
    cfg: &ProjectionConfig,
    kv: &jetstream::kv::Store,
    event: &serde_json::Value,
    event_type: &str,
    seq: u64,
) -> Vec<String> {
    let mut failed = Vec::new();
    for h in cfg
        .handlers
        .iter()
        .filter(|h| h.types.iter().any(|t| t == event_type))
    {
        let Action::Kv { op, key, value } = &h.action else {
            continue;
        };
        let applied = match render_key(key, event) {
            Ok(k) => apply_kv(kv, *op, &k, value, event, seq).await,
            Err(e) => Err(e),
        };
        if let Err(reason) = applied {
            failed.push(reason);
        }
    }
    failed
}

/// A KV event that cannot be applied: to the dead-letter subject (and on), or the
/// projection stops naming it.
async fn kv_refuse(
    cfg: &ProjectionConfig,
    js: &jetstream::Context,
    msg: &jetstream::Message,
    event_id: String,
    seq: u64,
    reason: String,
) -> Result<(), ProjectionError> {
    let origin = Origin {
        seq,
        event_id,
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
    };
    let Some(subject) = &cfg.dead_letter else {
        return Err(origin.poison(cfg, reason));
    };
    dead_letter(js, cfg, subject, &origin, &reason).await?;
    warn!(event_id = %origin.event_id, seq, dead_letter = %subject, reason = %reason, "event set aside to the dead-letter subject");
    Ok(())
}

/// The bucket a KV projection's readers should read: the one a rebuild swapped in,
/// else the configured one.
pub async fn kv_bucket(js: &jetstream::Context, projection: &str, configured: &str) -> String {
    applied(js, projection)
        .await
        .and_then(|a| a.bucket)
        .unwrap_or_else(|| configured.to_string())
}

/// Rebuilds a KV projection into a new bucket from the start of the stream, then
/// swaps it in by writing its name and position to the projection's entry in
/// `tidemark_projections`, conditional on the entry's revision: the live projector
/// follows the swap; readers resolve the bucket with `kv_bucket` (or `status`). The
/// old bucket is left for the operator to delete.
async fn rebuild_kv(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    configured: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<RebuildStats, ProjectionError> {
    let nats_err = |what: &str| nats_error(&cfg.name, what);
    let nc = provision::connect(nats, &format!("tidemark-rebuild-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let bucket = format!("{configured}_{stamp}");
    let kv = js
        .create_key_value(jetstream::kv::Config {
            bucket: bucket.clone(),
            history: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err("create the new bucket")(Box::new(e)))?;
    let positions_kv = positions(&js)
        .await
        .map_err(|e| nats_err("open the positions bucket")(e.into()))?;
    let stream = js
        .get_stream(&cfg.stream)
        .await
        .map_err(|e| nats_err("open the stream")(Box::new(e)))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err("create the rebuild consumer")(Box::new(e)))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| nats_err("read the stream")(Box::new(e)))?;
    let (mut seq_done, mut lsn_done, mut events) = (0u64, None, 0u64);
    let mut at_tx_end = true;
    let started = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(nats_err("read the stream")(Box::new(e))),
            Ok(None) => return Err(nats_err("read the stream")("the stream ended".into())),
            Err(_) => {
                if !at_tx_end {
                    continue;
                }
                // Caught up: swap, unless the live projector wrote meanwhile.
                let (current, revision) = position_entry(&positions_kv, &cfg.name).await;
                let position = Applied {
                    seq: seq_done,
                    lsn: lsn_done.clone(),
                    bucket: Some(bucket.clone()),
                };
                let swapped = write_position(&positions_kv, &cfg.name, &position, revision)
                    .await
                    .is_ok();
                if swapped {
                    let old = current.bucket.unwrap_or_else(|| configured.to_string());
                    info!(projection = %cfg.name, bucket = %bucket, old = %old, events, "KV rebuild swapped in; delete the old bucket when its readers have moved");
                    return Ok(RebuildStats {
                        events,
                        seq: seq_done,
                        swap_ms: started.elapsed().as_millis(),
                    });
                }
                continue;
            }
        };
        let info = msg.info().map_err(|e| nats_err("read message info")(e))?;
        let seq = info.stream_sequence;
        let wanted = reads(&cfg.subjects, &msg.subject);
        let (event, event_id, event_type) = rebuild_parse(cfg, &msg, seq, wanted)?;
        // Events the live projection set aside are set aside again, silently only
        // when a dead-letter subject has them already.
        let failed = if wanted {
            apply_kv_handlers(cfg, &kv, &event, &event_type, seq).await
        } else {
            Vec::new()
        };
        if let Some(reason) = failed.into_iter().next()
            && cfg.dead_letter.is_none()
        {
            return Err(ProjectionError::Poison {
                projection: cfg.name.clone(),
                event_id: event_id.clone(),
                subject: msg.subject.to_string(),
                seq,
                reason,
            });
        }
        events += 1;
        at_tx_end = event["txlast"].as_bool().unwrap_or(true);
        if at_tx_end {
            seq_done = seq;
            lsn_done = event["commitlsn"].as_str().map(str::to_string);
        }
        progress(seq, seq + info.pending);
    }
}
