//! The worker: runs a source's jobs one chunk at a time, resuming after crashes.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::SourceConfig;
use crate::position::{Lsn, StreamTail};
use crate::postgres::catalog::Catalog;
use crate::postgres::replication::quote_ident;
use tokio_postgres::error::SqlState;

use super::*;

/// What a worker needs to know of its attempt: the `run` its watermarks carry, and the
/// stream's tail at start, to tell how much of a chunk placed before a crash is stored.
#[derive(Clone, Debug)]
pub struct Resume {
    pub run: String,
    pub tail: StreamTail,
    /// The key (`data.key`) of the tail event.
    pub tail_key: Option<serde_json::Value>,
    /// Why watermarks cannot reach the stream on this server (PostgreSQL 12 or 13
    /// without its signal table), if they cannot: every job fails with it.
    pub no_signals: Option<String>,
}

/// Runs the source's backfills, one chunk at a time, until `cancel` fires. Hands
/// each chunk to the pipeline through `chunks` and waits until its events are stored.
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
        let permanent = err.fails_the_job();
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
/// `Placement`): the whole chunk, a prefix of it, or nothing. `tail_key` is the text of
/// the stream's last event's key (`stored_key_text`), to go on after a stored prefix.
pub(super) fn settle_placed(
    job: &mut Job,
    placed: &Placement,
    resume: &Resume,
    tail_key: Option<Vec<Option<String>>>,
) {
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
    let key = match (tail.last_event, tail_key) {
        (Some((l, index)), Some(key)) if l == lsn => Some((key, index - placed.first_index + 1)),
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

/// The text of a stored event's key (its `data.key`), as the chunk reads compare it:
/// directly for the types whose JSON is their text; otherwise Postgres reads the JSON
/// back into the table's row type (bytea from base64 first), and the result counts
/// only if a row with exactly that key is in the table, so a value that did not come
/// back exactly is never used (the chunk is then read again, as before).
pub(super) async fn stored_key_text(
    db: &Catalog,
    job: &Job,
    columns: &[(String, String)],
    key: &serde_json::Value,
) -> Option<Vec<Option<String>>> {
    if let Some(text) = key_text(key, &job.key, columns) {
        return Some(text);
    }
    let mut record = serde_json::Map::new();
    for name in &job.key {
        let ty = columns.iter().find(|(n, _)| n == name)?.1.as_str();
        let value = match (ty, key.get(name)?) {
            ("bytea", serde_json::Value::String(b64)) => {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
                let mut hex = String::with_capacity(2 + bytes.len() * 2);
                hex.push_str("\\x");
                for b in bytes {
                    hex.push_str(&format!("{b:02x}"));
                }
                serde_json::Value::String(hex)
            }
            (_, v) => v.clone(),
        };
        record.insert(name.clone(), value);
    }
    let table = format!("{}.{}", quote_ident(&job.schema), quote_ident(&job.table));
    let of_record: Vec<String> = job
        .key
        .iter()
        .map(|k| format!("(x.r).{}", quote_ident(k)))
        .collect();
    let of_table: Vec<String> = job
        .key
        .iter()
        .map(|k| format!("t.{}", quote_ident(k)))
        .collect();
    let sql = format!(
        "SELECT {}, EXISTS (SELECT 1 FROM {table} t WHERE ({}) = ({})) \
         FROM (SELECT json_populate_record(NULL::{table}, $1::text::json) AS r) x",
        of_record
            .iter()
            .map(|c| format!("{c}::text"))
            .collect::<Vec<_>>()
            .join(", "),
        of_table.join(", "),
        of_record.join(", "),
    );
    let json = serde_json::Value::Object(record).to_string();
    let row = match db.client().query_one(&sql, &[&json]).await {
        Ok(row) => row,
        Err(e) => {
            debug!(table = %job.qualified(), error = %e, "the stored key could not be read back");
            return None;
        }
    };
    let found: bool = row.try_get(job.key.len()).ok()?;
    if !found {
        return None;
    }
    (0..job.key.len())
        .map(|i| row.try_get::<_, Option<String>>(i).ok())
        .collect()
}

/// A key's JSON form (an event's `data.key`) as the text Postgres reads it, for the
/// types whose JSON form is their text form; `None` for others.
pub(super) fn key_text(
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

pub(super) async fn run_jobs(
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
        if let Some(why) = &resume.no_signals {
            return Err(BackfillError::NoSignals { why: why.clone() });
        }
        if catalog.is_none() {
            catalog = Some(reader(&cfg.postgres).await?);
        }
        let Some(db) = catalog.as_ref() else { continue };
        let (relid, mut columns, estimate, mut row_filter) =
            read_shape(db, cfg, &job.schema, &job.table).await?;
        if let Some(k) = job
            .key
            .iter()
            .find(|k| !columns.iter().any(|(c, _)| c == *k))
        {
            return Err(BackfillError::KeyNotPublished {
                table: job.qualified(),
                column: k.clone(),
            });
        }
        if job.state == JobState::Pending {
            job.state = JobState::Running;
            job.started_at = Some(now());
            job.rows_estimate = estimate;
            job.end_key = max_key(db, &job, row_filter.as_deref()).await?;
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
                let tail_key = match &resume.tail_key {
                    Some(key) => stored_key_text(db, &job, &columns, key).await,
                    None => None,
                };
                settle_placed(&mut job, &placed, resume, tail_key);
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
            if superseded(progress, &job).await? {
                break;
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
            emit_watermark(db, &cfg.signal_table, &mark("low")).await?;
            let ChunkRead { rows, in_progress } = match read_chunk(
                db,
                &job,
                &columns,
                row_filter.as_deref(),
            )
            .await
            {
                Ok(read) => read,
                // A column dropped since the columns were looked up: look again and
                // read the chunk again (a new low watermark replaces this one's window).
                Err(BackfillError::Read { source, .. })
                    if source.code() == Some(&SqlState::UNDEFINED_COLUMN) && retries < 100 =>
                {
                    retries += 1;
                    warn!(table = %job.qualified(), chunk = chunk_no, error = %source, "the table's columns changed under the backfill; reading the chunk again");
                    (_, columns, _, row_filter) =
                        read_shape(db, cfg, &job.schema, &job.table).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
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
                in_progress,
            };
            if chunks.send((chunk, done_tx)).await.is_err() {
                return Ok(());
            }
            emit_watermark(db, &cfg.signal_table, &mark("high")).await?;
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                o = done_rx => o,
            };
            match outcome {
                Ok(ChunkOutcome::Stored { published, skipped }) => {
                    retries = 0;
                    if superseded(progress, &job).await? {
                        break;
                    }
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
                    // The read may have missed a column added (or retyped) since the
                    // columns were looked up: look again, or every read misses it.
                    (_, columns, _, row_filter) =
                        read_shape(db, cfg, &job.schema, &job.table).await?;
                    // Under heavy write load a read can miss a just-committed
                    // transaction several times in a row: give that many more tries.
                    if retries > 100 {
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

/// Whether the table's job record is another job now (the table was dropped and
/// created again, and a backfill of the new one queued): this one stops, and writes
/// nothing over the new one.
async fn superseded(progress: &Progress, job: &Job) -> Result<bool, BackfillError> {
    let current = progress.get(&job.schema, &job.table).await?;
    if current.as_ref().is_some_and(|j| j.id == job.id) {
        return Ok(false);
    }
    info!(table = %job.qualified(), job = %job.id, "backfill job replaced by a newer one for the table; leaving it");
    Ok(true)
}
