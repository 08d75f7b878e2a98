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
use crate::policy::{Policy, Recovery};
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
    /// The Rust consumer API's application failed, or its applier is gone; the
    /// consumer reports the application's own error.
    #[error("the consumer's apply function failed")]
    Handler,
    /// The checkpoint moved under us (a rebuild was swapped in): start again from it.
    #[error("the checkpoint moved to stream sequence {0} (a rebuild was swapped in)")]
    Moved(u64),
}

impl Policy for ProjectionError {
    /// The projection's own failures; the adapters' are decided by `policy`.
    fn recovery(&self) -> Recovery {
        match self {
            // An event no retry applies, or a dead-letter subject that takes nothing.
            ProjectionError::Poison { .. }
            | ProjectionError::DeadLetter { .. }
            | ProjectionError::Handler => Recovery::Fatal,
            ProjectionError::Catalog(e) => e.recovery(),
            ProjectionError::Provision(e) => e.recovery(),
            // A lost read-model connection or NATS outage; and the restarts the loop
            // itself asks for (set aside, isolate, moved).
            ProjectionError::Database { .. }
            | ProjectionError::Nats { .. }
            | ProjectionError::SetAside(_)
            | ProjectionError::Isolate(_)
            | ProjectionError::Moved(_) => Recovery::Retry,
        }
    }
}

mod consumer;
mod engine;
mod kv;
mod kv_key;
mod pg_text;
mod postgres;
mod read;
mod rebuild;
mod sql;

pub use consumer::{Apply, Consumer, ConsumerError, Event};
use kv::*;
pub use kv::{KV_SEQ_FIELD, kv_bucket};
pub use kv_key::kv_key_value;
use postgres::*;
use read::*;
pub use rebuild::{RebuildStats, rebuild};
pub use sql::handler_sql;
use sql::*;

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

/// The positions bucket, created when missing with the replicas of `stream` (the
/// stream the projection reads): a position is as durable as the events it points at.
async fn positions(js: &jetstream::Context, stream: &str) -> Result<jetstream::kv::Store, String> {
    match js.get_key_value(POSITIONS_BUCKET).await {
        Ok(kv) => Ok(kv),
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: POSITIONS_BUCKET.into(),
                history: 1,
                description: "tidemark projections' applied positions".into(),
                num_replicas: stream_replicas(js, stream).await,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string()),
    }
}

/// The replica count of a stream (1 when it cannot be read): buckets tidemark makes
/// beside a stream get the same.
async fn stream_replicas(js: &jetstream::Context, stream: &str) -> usize {
    match js.get_stream(stream).await {
        Ok(s) => s.cached_info().config.num_replicas.max(1),
        Err(_) => 1,
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
            if err.recovery() == Recovery::Fatal {
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

/// The event a failure is about: enough to name it, and to set it aside.
struct Origin {
    seq: u64,
    event_id: String,
    subject: String,
    payload: bytes::Bytes,
}

impl Origin {
    fn poison(self, projection: &str, reason: String) -> ProjectionError {
        ProjectionError::Poison {
            projection: projection.to_string(),
            event_id: self.event_id,
            subject: self.subject,
            seq: self.seq,
            reason,
        }
    }
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
    projection: &str,
    subject: &str,
    origin: &Origin,
    reason: &str,
) -> Result<(), ProjectionError> {
    let (event_id, seq) = (origin.event_id.as_str(), origin.seq);
    let fail = |r: String| ProjectionError::DeadLetter {
        projection: projection.to_string(),
        event_id: event_id.to_string(),
        subject: subject.to_string(),
        reason: r,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Tidemark-Projection", projection);
    headers.insert(
        "Tidemark-Reason",
        reason.replace(['\r', '\n'], " ").as_str(),
    );
    headers.insert("Tidemark-Subject", origin.subject.as_str());
    headers.insert("Tidemark-Stream-Sequence", seq.to_string().as_str());
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{event_id}:dead:{projection}").as_str(),
    );
    let ack = js
        .publish_with_headers(subject.to_string(), headers, origin.payload.clone())
        .await
        .map_err(|e| fail(e.to_string()))?;
    ack.await.map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// One attempt of a live projection: its target opened at its checkpoint, then the
/// engine until cancelled or an error.
async fn attempt(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    cancel: &CancellationToken,
    set_aside: &mut HashSet<u64>,
    careful_until: u64,
    tel: &crate::telemetry::Telemetry,
) -> Result<(), ProjectionError> {
    let nats_err = |what: &str| nats_error(&cfg.name, what);
    let nc = provision::connect(nats, &format!("tidemark-projection-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let spec = engine::Spec::from(cfg);
    let mode = engine::Mode::Live(engine::Live {
        cancel,
        set_aside,
        careful_until,
        tel: Some(tel),
    });
    match &cfg.target {
        Target::Kv { bucket } => {
            let mut target = KvTarget::live(cfg, &js, bucket).await?;
            engine::run(&spec, &js, &mut target, mode).await?;
        }
        Target::Postgres(pg) => {
            let client = catalog::connect_client(pg, "tidemark-projection").await?;
            let checkpoint = read_checkpoint(&client, &cfg.name).await?;
            let positions = positions(&js, &cfg.stream)
                .await
                .map_err(|e| nats_err("open the positions bucket")(e.into()))?;
            info!(seq = checkpoint.seq, lsn = ?checkpoint.lsn, "projecting");
            let role = postgres::Role::Live {
                positions: Box::new(positions),
                last_published: Instant::now() - Duration::from_secs(1),
            };
            let mut target = PgTarget::new(cfg, client, checkpoint, role).await?;
            engine::run(&spec, &js, &mut target, mode).await?;
        }
    }
    Ok(())
}

/// The connection a projection applies through (for tests and the Rust API).
pub async fn connect(cfg: &PostgresConfig) -> Result<tokio_postgres::Client, CatalogError> {
    catalog::connect_client(cfg, "tidemark-projection").await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The projection's own rows of the policy table.
    #[test]
    fn poison_stops_and_restarts_retry() {
        let poison = ProjectionError::Poison {
            projection: "p".into(),
            event_id: "e".into(),
            subject: "s".into(),
            seq: 3,
            reason: "r".into(),
        };
        assert_eq!(poison.recovery(), Recovery::Fatal);
        for restart in [
            ProjectionError::SetAside(1),
            ProjectionError::Isolate(1),
            ProjectionError::Moved(1),
        ] {
            assert_eq!(restart.recovery(), Recovery::Retry, "{restart}");
        }
        let refused = ProjectionError::Catalog(CatalogError::TlsRefused {
            target: "h:5432".into(),
            mode: "require",
        });
        assert_eq!(refused.recovery(), Recovery::Fatal);
    }
}
