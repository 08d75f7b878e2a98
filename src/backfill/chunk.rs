//! What passes between the worker and the pipeline: watermarks, chunks, placements.

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

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
    /// Transactions running (invisible) when the rows were read, by xid (low 32 bits).
    pub in_progress: Vec<u32>,
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

/// The snapshot a new slot exports, read for the tables that have no key (they cannot
/// be paged, so DBLog's chunks cannot read them). Their rows are published as one
/// synthetic transaction just before the slot's consistent point, before anything of
/// the slot is streamed; the slot is consumed only once they are stored (`done`).
///
/// A crash before that leaves the slot unconsumed and the snapshot gone: the next
/// start drops the slot, makes a new one and publishes again, each table's rows after
/// a `truncated` event, so a consumer's fold discards the rows of the cut-off try.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consistent {
    /// The slot it was taken for.
    pub slot: String,
    /// The slot's consistent point, once the slot exists.
    pub at: Option<String>,
    /// Every row stored.
    pub done: bool,
}

/// The last event a source stored, kept with each confirmation to Postgres (before
/// it), for when the stream no longer holds it: emptied by hand or aged out while the
/// slot stays, the transactions stored but not yet confirmed come again from the slot
/// with nothing in the stream to compare them with. Valid only for the same database
/// system, slot and stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTail {
    pub system_id: String,
    pub slot: String,
    /// The stream binding (name and creation time).
    pub stream: Option<String>,
    /// The last stored event: its commit LSN, index and stream sequence.
    pub commit_lsn: String,
    pub index: u64,
    pub seq: u64,
}
