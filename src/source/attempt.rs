//! One attempt: the start-up checks (wal_level, grants, publication, mapping rules,
//! slot, stream, what the stream already holds), then the pipeline until it ends.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::consistent::ConsistentRead;
use super::error::SourceError;
use super::flush::FlushTracker;
use super::pipeline::Pipeline;
use super::plan::plan_tables;
use crate::backfill::{self, BackfillError};
use crate::config::{NatsConfig, SnapshotMode, SourceConfig};
use crate::jetstream::disruption::{Disruptions, LeaderWatch};
use crate::jetstream::provision::{self, ProvisionError};
use crate::jetstream::publisher::Publisher;
use crate::position::Lsn;
use crate::postgres::catalog::{Catalog, CatalogError};
use crate::postgres::replication::{ReplicationConnection, ReplicationError};
use crate::postgres::values::TypeRegistry;
use crate::postgres::version::IDLE_SLOT_TIMEOUT_RISK;
use crate::telemetry::Telemetry;

pub(super) async fn run_attempt(
    cfg: &SourceConfig,
    nats: &NatsConfig,
    cancel: &CancellationToken,
    tel: &std::sync::Arc<Telemetry>,
) -> Result<(), SourceError> {
    // Postgres: catalog checks and setup.
    let catalog = Catalog::connect(&cfg.postgres).await?;
    catalog.check_version()?;
    let pg_version = catalog.version();
    catalog.check_wal_level().await?;
    for m in &cfg.messages {
        catalog.check_messages(&m.prefix)?;
    }
    let wanted = match &cfg.tables {
        crate::config::TableSelection::All => catalog.all_tables(&cfg.signal_table).await?,
        crate::config::TableSelection::Listed(t) => t.clone(),
    };
    catalog.check_grants(&wanted).await?;
    let tables = catalog
        .ensure_publication(
            &cfg.publication,
            &cfg.tables,
            cfg.create_publication,
            &cfg.signal_table,
        )
        .await?;
    for t in &tables {
        if let Some((table, identity)) = t.identity_problem() {
            warn!(%table, identity, "table has no usable replica identity: PostgreSQL rejects its UPDATEs and DELETEs while it is published");
        }
    }
    if let Some(p) = catalog.publication(&cfg.publication).await?
        && !p.unpublished.is_empty()
    {
        warn!(publication = %cfg.publication, unpublished = %p.unpublished.join(", "), "the publication does not publish these operations: their changes never reach the stream, and read models drift from the tables; ALTER PUBLICATION ... SET (publish = 'insert, update, delete, truncate')");
    }
    if let Some(secs) = catalog.idle_slot_timeout_secs().await
        && secs > 0
    {
        warn!(secs, slot = %cfg.slot, "idle_replication_slot_timeout is set: {IDLE_SLOT_TIMEOUT_RISK}");
    }
    // Markers (watermarks, heartbeats, `wait`, table markers): messages on 14+, rows
    // of the signal table before.
    let no_signals = crate::postgres::signal::ensure(
        &catalog,
        &cfg.signal_table,
        &cfg.publication,
        cfg.create_publication,
    )
    .await?;
    if let Some(why) = &no_signals {
        warn!(version = %pg_version, "{why}");
    }
    // Mapping rules must fit the live tables before anything streams.
    plan_tables(&catalog, cfg, &tables).await?;
    let slot = catalog.slot(&cfg.slot).await?;
    match &slot {
        Some(s) => catalog.check_slot(&cfg.slot, s)?,
        None if !cfg.create_slot => {
            return Err(CatalogError::SlotMissing {
                slot: cfg.slot.clone(),
            }
            .into());
        }
        None => {}
    }

    // NATS: the stream and what it already holds.
    let disruptions = Disruptions::new();
    let client =
        provision::connect_watched(nats, &format!("tidemark-{}", cfg.name), &disruptions).await?;
    let max_payload = client.server_info().max_payload;
    if max_payload > 0 && cfg.max_event_bytes > max_payload {
        return Err(ProvisionError::PayloadLimit {
            max_payload,
            max_event_bytes: cfg.max_event_bytes,
        }
        .into());
    }
    let version = client.server_info().version;
    if cfg.atomic_transactions && !provision::supports_atomic_batches(&version) {
        return Err(ProvisionError::AtomicUnsupported { version }.into());
    }
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = provision::ensure_stream(&js, &cfg.stream).await?;
    let _leader_watch = LeaderWatch::start(&client, &cfg.stream.name, &disruptions).await;
    let mut tail = provision::read_tail(&mut stream, &cfg.name).await?;
    let tail_key = provision::last_event_key(&stream, &tail).await;
    let progress = backfill::Progress::open(&js, &cfg.name, cfg.stream.replicas)
        .await?
        .bind(backfill::stream_binding(stream.cached_info()));
    // A new slot starts at the current WAL position: if the stream ever stored this
    // source's events, whatever happened between them and now would be missing in
    // silence. Refuse, and say so. The one exception is a stream that `tidemark reset
    // --purge-stream` emptied (it records the sequence it purged at): a deliberate fresh
    // start. A stream whose events all aged out is not one.
    // A start that made a slot for a consistent snapshot and was cut off before its
    // rows were stored never read the slot: drop it and take the snapshot again.
    let mut slot = slot;
    let mut again = false;
    if let Some(c) = progress.consistent().await?
        && !c.done
        && c.slot == cfg.slot
    {
        let at: Option<Lsn> = c.at.as_deref().and_then(|a| a.parse().ok());
        let unread = match (&slot, at) {
            (Some(s), Some(at)) => s.confirmed_flush.is_none_or(|f| f <= at),
            _ => true,
        };
        if unread {
            if slot.is_some() {
                warn!(slot = %cfg.slot, "the consistent snapshot of the tables without a key was cut off before its rows were stored; the slot was never read: dropping it to take the snapshot again");
                catalog.drop_slot(&cfg.slot).await?;
                slot = None;
            }
            again = true;
        } else {
            warn!(slot = %cfg.slot, "the consistent snapshot record says unfinished, but the slot was read past it; leaving the slot as it is");
            progress
                .put_consistent(&backfill::Consistent { done: true, ..c })
                .await?;
        }
    }
    if slot.is_none() && tail.last_seq > 0 && !again {
        let purged_here =
            tail.last_event.is_none() && progress.purged_at().await? == Some(tail.last_seq);
        if !purged_here {
            return Err(SourceError::SlotLost {
                slot: cfg.slot.clone(),
                stream: cfg.stream.name.clone(),
                last_seq: tail.last_seq,
                last_lsn: tail.last_event.map(|(l, _)| l),
            });
        }
    }

    // Backfills: a new slot with snapshot = "initial" starts with a backfill of every
    // streamed table; the jobs are written before the slot exists, so a crash in
    // between cannot lose them.
    if let Some(why) = &no_signals
        && slot.is_none()
        && cfg.snapshot == SnapshotMode::Initial
        && !tables.is_empty()
    {
        return Err(CatalogError::NoSignals {
            needed_for: "the initial snapshot (snapshot = \"initial\")",
            why: why.clone(),
            or: "or set snapshot = \"never\" to stream changes only, without the rows from before",
        }
        .into());
    }
    let keyless = if slot.is_none() && cfg.snapshot == SnapshotMode::Initial {
        queue_initial_snapshot(&catalog, cfg, &progress, &tables).await?
    } else {
        Vec::new()
    };

    // Replication.
    let mut conn = ReplicationConnection::connect(&cfg.postgres, cfg.max_row_bytes).await?;
    let ident = conn.identify_system().await?;
    debug!(system_id = %ident.system_id, timeline = ident.timeline, "replication session identified");
    // A stream that no longer holds its last event (emptied by hand, aged out) over a
    // slot that stayed: the recorded tail says what was stored, so the transactions
    // the slot sends again are not stored twice.
    if slot.is_some()
        && tail.last_event.is_none()
        && let Some(rec) = progress.stored_tail().await?
        && rec.system_id == ident.system_id
        && rec.slot == cfg.slot
        && rec.seq <= tail.last_seq
        && let Ok(lsn) = rec.commit_lsn.parse::<Lsn>()
    {
        info!(commit_lsn = %lsn, index = rec.index, seq = rec.seq, "the stream no longer holds its last event; the recorded tail says what was stored");
        tail.last_event = Some((lsn, rec.index));
    }
    let mut consistent = None;
    if slot.is_none() && (!keyless.is_empty() || again) {
        // The record first: a crash from here on is seen by the next start.
        let mut record = backfill::Consistent {
            slot: cfg.slot.clone(),
            at: None,
            done: false,
        };
        progress.put_consistent(&record).await?;
        let (at, snapshot) = conn.create_slot_exporting(&cfg.slot).await?;
        info!(lsn = %at, tables = keyless.len(), "replication slot created with a consistent snapshot for the tables without a key");
        record.at = Some(at.to_string());
        // Imported before the replication connection's next command, as it must be.
        let reader = backfill::reader(&cfg.postgres).await?;
        reader
            .client()
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
                crate::postgres::replication::quote_literal(&snapshot)
            ))
            .await
            .map_err(|source| CatalogError::Query {
                what: "import the slot's snapshot",
                source,
            })?;
        progress.put_consistent(&record).await?;
        consistent = Some((
            ConsistentRead {
                reader,
                tables: keyless.clone(),
                at,
                again,
                batch: cfg.snapshot_chunk_size.clamp(1, 100_000) as usize,
            },
            record,
        ));
    } else if slot.is_none() {
        let at = conn.create_slot(&cfg.slot).await?;
        info!(lsn = %at, "replication slot created");
    }
    let repl = match conn
        .start_replication(
            &cfg.slot,
            &cfg.publication,
            Lsn::ZERO,
            pg_version.logical_messages(),
        )
        .await
    {
        Ok(r) => r,
        // The slot went away between the check above and now (dropped by hand, say):
        // the same refusal as a slot found missing, when the stream holds events.
        Err(ReplicationError::Server(e)) if e.code == "42704" && tail.last_seq > 0 => {
            return Err(SourceError::SlotLost {
                slot: cfg.slot.clone(),
                stream: cfg.stream.name.clone(),
                last_seq: tail.last_seq,
                last_lsn: tail.last_event.map(|(l, _)| l),
            });
        }
        Err(ReplicationError::Server(e)) if e.code == "55006" => {
            let pid = catalog
                .slot(&cfg.slot)
                .await
                .ok()
                .flatten()
                .and_then(|s| s.active_pid);
            return Err(SourceError::SlotBusy {
                slot: cfg.slot.clone(),
                pid,
            });
        }
        // A server that refuses what START_REPLICATION asks (an option or a feature
        // it lacks) refuses it again on every retry.
        Err(ReplicationError::Server(e)) if refused_start(&e) => {
            return Err(SourceError::StartRefused {
                version: pg_version.to_string(),
                message: e.message.clone(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    // Tables swapped for new ones (a new OID under the name) while tidemark was away;
    // looked at only once the slot is this process's (a standby waiting for it must
    // not handle them too).
    let table_oids =
        super::recreated::at_start(&catalog, cfg, &progress, &tables, slot.is_none()).await?;
    let confirmed = catalog
        .slot(&cfg.slot)
        .await?
        .and_then(|s| s.confirmed_flush)
        .unwrap_or(Lsn::ZERO);
    info!(
        lsn = %confirmed,
        server_lsn = %ident.xlog_pos,
        seq = tail.last_seq,
        last_event = ?tail.last_event,
        "streaming"
    );
    tel.set_streaming(&cfg.name, true);

    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel(1);
    // Names this attempt's watermarks (see `backfill::Watermark::run`): the process,
    // the attempt and the time, unique across restarts.
    let watermark_run = format!(
        "{}-{}-{}",
        std::process::id(),
        confirmed,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let worker_cancel = cancel.child_token();
    let worker = tokio::spawn(
        backfill::run_worker(
            cfg.clone(),
            progress.clone(),
            chunk_tx,
            backfill::Resume {
                run: watermark_run.clone(),
                tail: tail.clone(),
                tail_key,
                no_signals: no_signals.clone(),
            },
            worker_cancel.clone(),
        )
        .instrument(info_span!("backfill")),
    );
    let _worker = TaskGuard {
        cancel: worker_cancel,
        task: worker,
    };
    let (watch_failed, recreated_failed) = tokio::sync::oneshot::channel();
    let watch_cancel = cancel.child_token();
    let watch = tokio::spawn(
        super::recreated::watch(
            cfg.clone(),
            progress.clone(),
            table_oids,
            watch_failed,
            watch_cancel.clone(),
        )
        .instrument(info_span!("tables")),
    );
    if no_signals.is_some() && cfg.heartbeat_interval.is_some() {
        warn!(
            "heartbeats are off: they travel as markers, which cannot reach the stream here (see above)"
        );
    }
    let _watch = TaskGuard {
        cancel: watch_cancel,
        task: watch,
    };
    let publisher = Publisher::new(
        client,
        cfg.stream.name.clone(),
        tail.last_seq,
        cfg.publish_window,
        cfg.ack_timeout,
    );
    let mut publisher = publisher;
    publisher.watch(&disruptions);
    if tail.last_event.is_none() && tail.last_seq > 0 && !cfg.atomic_transactions {
        // Emptied or aged out: what the slot sends again may be stored already. (Not
        // in atomic mode: a batch's duplicate is not one event's.)
        publisher.set_careful();
    }
    let label = Telemetry::label(&cfg.name);
    let mut p = Pipeline {
        tel: tel.clone(),
        bytes_sent: tel.bytes.get_or_create(&label).clone(),
        label,
        last_progress: Instant::now(),
        heartbeat_pending: None,
        heartbeat_ids: VecDeque::new(),
        stalled: false,
        wal_warned: false,
        cfg,
        catalog,
        repl,
        publisher,
        tail,
        relations: HashMap::new(),
        types: TypeRegistry::default(),
        tx: None,
        held: None,
        chunks: chunk_rx,
        window: None,
        recent: super::window::RecentCommits::new(100_000),
        chunk_in_tx: None,
        flush: FlushTracker::new(confirmed),
        watermark_run,
        progress,
        last_received: Instant::now(),
        system_id: ident.system_id.clone(),
        last_acked: None,
        tail_recorded: None,
        tail_task: None,
        skipped: 0,
        max_payload,
        sent_flush: confirmed,
        recreated_failed,
        signal_rel: None,
        signals_ok: no_signals.is_none(),
    };
    if let Some((read, record)) = consistent {
        p.consistent_read(read, cancel).await?;
        p.progress
            .put_consistent(&backfill::Consistent {
                done: true,
                ..record
            })
            .await?;
        info!("consistent snapshot of the tables without a key stored");
    }
    p.run(cancel).await
}

/// Whether START_REPLICATION failed on what the server cannot do (an option or
/// protocol feature it does not know), not on its state: no retry changes that.
fn refused_start(e: &crate::postgres::replication::ServerError) -> bool {
    match e.code.as_str() {
        // feature_not_supported, invalid_parameter_value, syntax_error
        "0A000" | "22023" | "42601" => true,
        // pgoutput's `elog(ERROR, "unrecognized pgoutput option: ...")` has no code
        // of its own (internal_error): told by the text pgoutput writes.
        "XX000" => e.message.starts_with("unrecognized pgoutput option"),
        _ => false,
    }
}

/// Ends a task of the attempt (the backfill worker, the tables' watch) with it.
struct TaskGuard<T> {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<T>,
}

impl<T> Drop for TaskGuard<T> {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
    }
}

/// Writes a backfill job for every table an initial snapshot reads (outbox tables
/// excepted); the tables without a key (by OID) are left to the slot's consistent
/// snapshot.
async fn queue_initial_snapshot(
    catalog: &Catalog,
    cfg: &SourceConfig,
    progress: &backfill::Progress,
    tables: &[crate::postgres::catalog::TableInfo],
) -> Result<Vec<u32>, SourceError> {
    let mut jobs = Vec::new();
    let mut keyless = Vec::new();
    for t in tables {
        if !super::recreated::snapshot_reads(cfg, &t.schema, &t.name) {
            continue;
        }
        // A table that cannot be read in key order loses only its own snapshot: its
        // live changes stream like every other table's, and `check` says the same.
        let key = match backfill::key_columns(catalog, cfg, &t.schema, &t.name, &t.primary_key)
            .await
        {
            Ok(key) => key,
            Err(BackfillError::NoKey { .. }) => {
                info!(table = %t.qualified(), "no key: read from the new slot's consistent snapshot");
                keyless.push(t.oid);
                continue;
            }
            Err(err @ BackfillError::KeyNotUnique { .. }) => {
                error!(table = %t.qualified(), error = %err, "initial snapshot of this table skipped; its changes stream from now on; once its mapping names a usable key, run `tidemark backfill` for it");
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        jobs.push(backfill::Job::new(
            &t.schema,
            &t.name,
            key,
            "initial snapshot",
            None,
            cfg.snapshot_chunk_size,
        ));
    }
    // The slot is new, so a job already recorded for a table was made for an earlier
    // slot (a crash before the slot was made leaves jobs that never ran): its
    // progress says nothing about this slot's stream, and resuming it would leave
    // rows out. Every table starts over.
    for job in jobs {
        if let Some(old) = progress.get(&job.schema, &job.table).await? {
            info!(table = %job.qualified(), job = %old.id, state = ?old.state, "an earlier slot's backfill job replaced by this slot's initial snapshot");
        }
        progress.put(&job).await?;
        info!(table = %job.qualified(), "initial snapshot queued");
    }
    Ok(keyless)
}

#[cfg(test)]
mod tests {
    use super::refused_start;
    use crate::postgres::replication::ServerError;

    fn server(code: &str, message: &str) -> ServerError {
        ServerError {
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// What PostgreSQL 12 and 13 said to `"messages" 'true'` stops the source; a
    /// server shutting down or an internal error of another kind is retried.
    #[test]
    fn a_start_the_server_cannot_do_is_refused_for_good() {
        assert!(refused_start(&server(
            "XX000",
            "unrecognized pgoutput option: messages"
        )));
        assert!(refused_start(&server(
            "0A000",
            "client sent proto_version=9 but server only supports protocol 4 or lower"
        )));
        assert!(refused_start(&server("42601", "syntax error")));
        assert!(!refused_start(&server("XX000", "could not read block 7")));
        assert!(!refused_start(&server("57P01", "terminating connection")));
        assert!(!refused_start(&server("55006", "slot is active")));
    }
}
