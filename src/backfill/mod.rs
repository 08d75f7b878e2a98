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

use crate::postgres::catalog::CatalogError;

/// The logical message prefix of watermarks; reserved.
pub use crate::events::reserved::WATERMARK_PREFIX;

mod chunk;
mod job;
mod progress;
mod read;
mod worker;

pub use chunk::{
    Chunk, ChunkOutcome, ChunkReceiver, ChunkSender, Consistent, Placement, StoredTail, Watermark,
};
pub use job::{Job, JobState};
pub use progress::{Progress, TableOids, bucket_name, stream_binding};
pub use read::{key_columns, read_shape, reader};
pub use worker::{Resume, run_worker};
#[allow(unused_imports)]
use {chunk::*, job::*, progress::*, read::*};

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
    #[error(
        "the key column {column} of {table} is not in the publication's column list, so the table cannot be read in key order as the stream sends it: add the column to the publication's column list (ALTER PUBLICATION ... SET TABLE ...), or name a published unique key in the table's mapping"
    )]
    KeyNotPublished { table: String, column: String },
    #[error("backfills cannot run: {why}")]
    NoSignals { why: String },
    #[error("backfill of {table} failed reading a chunk")]
    Read {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
}
impl BackfillError {
    /// Whether the job itself cannot go on (its table is gone, its key no longer pages
    /// it, its statement fails by its own doing), so it is marked failed for the
    /// operator; anything else (a lost connection, a server shutting down or
    /// restarting, NATS away) pauses the worker and the job resumes where it was.
    pub fn fails_the_job(&self) -> bool {
        match self {
            BackfillError::NoKey { .. }
            | BackfillError::KeyNotUnique { .. }
            | BackfillError::KeyNotPublished { .. }
            | BackfillError::NoSignals { .. }
            | BackfillError::Catalog(CatalogError::TableMissing { .. }) => true,
            BackfillError::Read { source, .. } => source
                .code()
                .is_some_and(|c| !crate::postgres::sqlstate::is_transient(c.code())),
            _ => false,
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
        assert_eq!(snapshot_in_progress("10:20:12,15"), vec![12, 15]);
        assert_eq!(snapshot_in_progress("10:20:"), Vec::<u32>::new());
        // Epoch-extended xids keep their low 32 bits, as the stream names them.
        assert_eq!(
            snapshot_in_progress("4294967306:4294967310:4294967307"),
            vec![11]
        );
    }
}
