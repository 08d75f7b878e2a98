//! One source's pipeline: replication -> decode -> map -> publish -> flush LSN feedback,
//! and the crash-only loop around it.
//!
//! Every attempt rebuilds from durable state only: the slot resumes at its confirmed
//! flush LSN, the stream's tail says which events are already stored, and those are
//! skipped (`StreamTail::is_stored`). The flush LSN sent to Postgres moves to the end of
//! a transaction only once JetStream has acked every event of it and of all before it.
//! Any error tears the attempt down; retryable ones back off and rebuild, fatal ones
//! (those an operator must fix) stop the source with the fix in the message.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, trace, warn};

use crate::backfill::{self, BackfillError, ChunkOutcome, ChunkReceiver, Watermark};
use crate::config::{NatsConfig, SnapshotMode, SourceConfig};
use crate::error::ErrorChain;
use crate::events::mapping::{
    self, DomainEvent, MapError, Operation, RowChange, Shrink, Table, TableColumn, TxContext,
};
use crate::events::reserved::{HEARTBEAT_PREFIX, SYNC_PREFIX, WATERMARK_PREFIX};
use crate::events::rules::{self, BindError, LiveTable, OversizedPlan, TablePlan};
use crate::jetstream::provision::{self, ProvisionError};
use crate::jetstream::publisher::{PublishError, Publisher};
use crate::position::{HighWater, Lsn, StreamTail};
use crate::postgres::catalog::{Catalog, CatalogError};
use crate::postgres::pgoutput::{self, DecodeError, LogicalMessage, ReplicaIdentity};
use crate::postgres::replication::{
    ReplicationConnection, ReplicationError, ReplicationMessage, ReplicationStream,
};
use crate::postgres::values::TypeRegistry;
use crate::telemetry::Telemetry;

/// Why an attempt ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot decode the replication message at LSN {lsn}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: DecodeError,
    },
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Mapping(#[from] BindError),
    #[error("replication stream out of order: {0}")]
    Protocol(String),
    #[error(
        "replication slot {slot:?} does not exist, but stream {stream:?} has stored events of this source (up to sequence {last_seq}{}): the slot was dropped or lost, so changes committed after the last stored event are missing, and a new slot would only see changes from its creation on; run `tidemark resync --yes` for this source to create a new slot, mark the gap in the stream and backfill every table (or `tidemark reset` to start over)",
        .last_lsn.map(|l| format!(", commit LSN {l}")).unwrap_or_default()
    )]
    SlotLost {
        slot: String,
        stream: String,
        last_seq: u64,
        last_lsn: Option<Lsn>,
    },
    #[error(transparent)]
    Backfill(#[from] BackfillError),
    #[error("replication slot {slot:?} is in use by another process{}; standing by to take over", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    SlotBusy { slot: String, pid: Option<i32> },
}

impl SourceError {
    /// A short name of the error's kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Catalog(_) => "catalog",
            SourceError::Replication(_) => "replication",
            SourceError::Provision(_) => "nats",
            SourceError::Publish(_) => "publish",
            SourceError::Decode { .. } => "decode",
            SourceError::Map(_) => "map",
            SourceError::Mapping(_) => "mapping",
            SourceError::Protocol(_) => "protocol",
            SourceError::SlotLost { .. } => "slot_lost",
            SourceError::SlotBusy { .. } => "slot_busy",
            SourceError::Backfill(_) => "backfill",
        }
    }
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Tear down, back off, rebuild from durable state.
    Retry,
    /// Another process holds the slot: poll for it at a short interval.
    Standby,
    /// The operator must act: stop this source.
    Fatal,
}

impl SourceError {
    /// The one place that decides retry or stop.
    pub fn recovery(&self) -> Recovery {
        use CatalogError as C;
        use ReplicationError as R;
        // SQLSTATEs that no retry can fix: bad password, no such database or role,
        // missing slot, wal_level too low.
        let fatal_code = |code: Option<&str>| matches!(code, Some(c) if c.starts_with("28") || c == "3D000" || c == "42704" || c == "55000");
        match self {
            SourceError::SlotBusy { .. } => Recovery::Standby,
            SourceError::Catalog(e) => match e {
                C::Connect { .. } | C::Query { .. } if fatal_code(e.code()) => Recovery::Fatal,
                // A certificate that does not verify will not start to.
                C::Connect { .. } if ErrorChain(e).to_string().contains("TLS") => Recovery::Fatal,
                C::Connect { .. } | C::Query { .. } => Recovery::Retry,
                _ => Recovery::Fatal,
            },
            SourceError::Replication(e) => match e {
                R::AuthFailed { .. }
                | R::Tls { .. }
                | R::TlsRefused { .. }
                | R::TlsSetup(_)
                | R::PasswordRequired { .. }
                | R::UnsupportedAuth { .. }
                | R::MessageTooLarge { .. } => Recovery::Fatal,
                R::Server(_) if fatal_code(e.code()) => Recovery::Fatal,
                _ => Recovery::Retry,
            },
            SourceError::Provision(e) => match e {
                ProvisionError::Connect { .. } | ProvisionError::JetStream { .. } => {
                    Recovery::Retry
                }
                _ => Recovery::Fatal,
            },
            SourceError::Backfill(BackfillError::NoKey { .. }) => Recovery::Fatal,
            SourceError::Backfill(BackfillError::Catalog(e)) if fatal_code(e.code()) => {
                Recovery::Fatal
            }
            SourceError::Backfill(_) => Recovery::Retry,
            SourceError::Publish(PublishError::Oversized { .. })
            | SourceError::SlotLost { .. }
            | SourceError::Mapping(_) => Recovery::Fatal,
            SourceError::Publish(_)
            | SourceError::Decode { .. }
            | SourceError::Map(_)
            | SourceError::Protocol(_) => Recovery::Retry,
        }
    }
}

/// Runs one source until `cancel` fires (Ok) or a fatal error (Err).
pub async fn run_source(
    cfg: SourceConfig,
    nats: NatsConfig,
    cancel: CancellationToken,
    tel: std::sync::Arc<Telemetry>,
) -> Result<(), SourceError> {
    tel.expect(&cfg.name);
    let span =
        info_span!("source", source = %cfg.name, slot = %cfg.slot, stream = %cfg.stream.name);
    async move {
        let mut backoff = cfg.backoff_initial;
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = run_attempt(&cfg, &nats, &cancel, &tel)
                .instrument(info_span!("attempt", attempt))
                .await;
            tel.set_streaming(&cfg.name, false);
            let err = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            tel.error(&cfg.name, err.kind());
            if err.recovery() == Recovery::Retry {
                tel.restarts.get_or_create(&Telemetry::label(&cfg.name)).inc();
            }
            let wait = match err.recovery() {
                Recovery::Fatal => {
                    error!(error = %ErrorChain(&err), "source stopped: this needs an operator");
                    return Err(err);
                }
                Recovery::Standby => {
                    info!(error = %err, "waiting for the slot");
                    cfg.backoff_initial.min(Duration::from_secs(1))
                }
                Recovery::Retry => {
                    // A long healthy run earns a fresh backoff.
                    if started.elapsed() > cfg.backoff_max * 2 {
                        backoff = cfg.backoff_initial;
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                    warn!(error = %ErrorChain(&err), elapsed_ms = wait.as_millis() as u64, "pipeline failed; rebuilding from the slot and the stream after a pause");
                    wait
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
    .instrument(span)
    .await
}

async fn run_attempt(
    cfg: &SourceConfig,
    nats: &NatsConfig,
    cancel: &CancellationToken,
    tel: &std::sync::Arc<Telemetry>,
) -> Result<(), SourceError> {
    // Postgres: catalog checks and setup.
    let catalog = Catalog::connect(&cfg.postgres).await?;
    catalog.check_wal_level().await?;
    let wanted = match &cfg.tables {
        crate::config::TableSelection::All => catalog.all_tables().await?,
        crate::config::TableSelection::Listed(t) => t.clone(),
    };
    catalog.check_grants(&wanted).await?;
    let tables = catalog
        .ensure_publication(&cfg.publication, &cfg.tables, cfg.create_publication)
        .await?;
    for t in &tables {
        if let Some(identity) = t.identity_problem() {
            warn!(table = %t.qualified(), identity, "table has no usable replica identity: PostgreSQL rejects its UPDATEs and DELETEs while it is published");
        }
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
    let client = provision::connect(nats, &format!("tidemark-{}", cfg.name)).await?;
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
    let tail = provision::read_tail(&mut stream, &cfg.name).await?;
    let progress = backfill::Progress::open(&js, &cfg.name).await?;
    // A new slot starts at the current WAL position: if the stream ever stored this
    // source's events, whatever happened between them and now would be missing in
    // silence. Refuse, and say so. The one exception is a stream that `tidemark reset
    // --purge-stream` emptied (it records the sequence it purged at): a deliberate fresh
    // start. A stream whose events all aged out is not one.
    if slot.is_none() && tail.last_seq > 0 {
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
    if slot.is_none() && cfg.snapshot == SnapshotMode::Initial {
        queue_initial_snapshot(cfg, &progress, &tables).await?;
    }

    // Replication.
    let mut conn = ReplicationConnection::connect(&cfg.postgres, cfg.max_row_bytes).await?;
    let ident = conn.identify_system().await?;
    if slot.is_none() {
        let at = conn.create_slot(&cfg.slot).await?;
        info!(lsn = %at, "replication slot created");
    }
    let repl = match conn
        .start_replication(&cfg.slot, &cfg.publication, Lsn::ZERO)
        .await
    {
        Ok(r) => r,
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
        Err(e) => return Err(e.into()),
    };
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
    let worker_cancel = cancel.child_token();
    let worker = tokio::spawn(
        backfill::run_worker(cfg.clone(), progress, chunk_tx, worker_cancel.clone())
            .instrument(info_span!("backfill")),
    );
    let _worker = WorkerGuard {
        cancel: worker_cancel,
        task: worker,
    };
    let publisher = Publisher::new(
        client,
        cfg.stream.name.clone(),
        tail.last_seq,
        cfg.publish_window,
        cfg.ack_timeout,
    );
    let mut p = Pipeline {
        tel: tel.clone(),
        label: Telemetry::label(&cfg.name),
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
        chunk_in_tx: None,
        chunk_acks: VecDeque::new(),
        pending_commits: VecDeque::new(),
        published: 0,
        acked: 0,
        skipped: 0,
        flush: HighWater::new(confirmed),
        sent_flush: confirmed,
    };
    p.run(cancel).await
}

/// Ends the backfill worker with the attempt.
struct WorkerGuard {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), BackfillError>>,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
    }
}

/// A backfill chunk's window: the keys of its table that live changes touched between
/// the chunk's low and high watermarks.
struct Window {
    job_id: String,
    chunk: u64,
    relid: u32,
    key: Vec<String>,
    changed: HashSet<Vec<Option<bytes::Bytes>>>,
    truncated: bool,
}

/// Writes a backfill job for every table an initial snapshot reads (outbox tables
/// excepted), unless one exists. A table without a usable key stops the start.
async fn queue_initial_snapshot(
    cfg: &SourceConfig,
    progress: &backfill::Progress,
    tables: &[crate::postgres::catalog::TableInfo],
) -> Result<(), SourceError> {
    let mut jobs = Vec::new();
    for t in tables {
        let wanted = match &cfg.snapshot_tables {
            Some(list) => list.contains(&(t.schema.clone(), t.name.clone())),
            None => true,
        };
        let outbox = cfg
            .outboxes
            .iter()
            .any(|o| o.schema == t.schema && o.table == t.name);
        if !wanted || outbox {
            continue;
        }
        let key = backfill::key_columns(cfg, &t.schema, &t.name, &t.primary_key)?;
        jobs.push(backfill::Job::new(
            &t.schema,
            &t.name,
            key,
            "initial snapshot",
            None,
            cfg.snapshot_chunk_size,
        ));
    }
    for job in jobs {
        if progress.get(&job.schema, &job.table).await?.is_none() {
            progress.put(&job).await?;
            info!(table = %job.qualified(), "initial snapshot queued");
        }
    }
    Ok(())
}

/// The transaction being received.
struct OpenTx {
    final_lsn: Lsn,
    xid: u32,
    next_index: u64,
    /// Events mapped so far (stored before a restart or not).
    events: u64,
    /// The commit time, Unix seconds.
    commit_time: Option<f64>,
    /// Texts shared by every event of the transaction.
    lsn_text: String,
    time_text: String,
}

struct Pipeline<'a> {
    tel: std::sync::Arc<Telemetry>,
    label: crate::telemetry::SourceLabel,
    /// When something was last stored.
    last_progress: Instant,
    /// When the oldest unanswered heartbeat was written.
    heartbeat_pending: Option<Instant>,
    /// Heartbeat events published and not yet acked.
    heartbeat_ids: VecDeque<crate::position::EventId>,
    stalled: bool,
    wal_warned: bool,
    cfg: &'a SourceConfig,
    catalog: Catalog,
    repl: ReplicationStream,
    publisher: Publisher,
    tail: StreamTail,
    relations: HashMap<u32, Table>,
    types: TypeRegistry,
    tx: Option<OpenTx>,
    /// The open transaction's latest event, held back until the next one (or the
    /// commit) shows whether it is the transaction's last.
    held: Option<DomainEvent>,
    /// Chunks the backfill worker read, waiting for their high watermark.
    chunks: ChunkReceiver,
    /// The open watermark window, between a chunk's low and high watermark.
    window: Option<Window>,
    /// The chunk published in the open transaction (at its high watermark).
    chunk_in_tx: Option<(tokio::sync::oneshot::Sender<ChunkOutcome>, ChunkOutcome)>,
    /// Chunks waiting for their events' acks: (events published, reply, outcome).
    chunk_acks: VecDeque<(
        u64,
        tokio::sync::oneshot::Sender<ChunkOutcome>,
        ChunkOutcome,
    )>,
    /// Committed transactions not yet confirmed: (events published when the commit
    /// arrived, the commit's end LSN). Confirmable once `acked` reaches the count.
    pending_commits: VecDeque<(u64, Lsn, Option<f64>)>,
    published: u64,
    acked: u64,
    skipped: u64,
    /// Highest LSN whose every event is stored: what we confirm to Postgres.
    flush: HighWater,
    sent_flush: Lsn,
}

impl Pipeline<'_> {
    async fn run(&mut self, cancel: &CancellationToken) -> Result<(), SourceError> {
        let mut status_tick =
            tokio::time::interval(self.cfg.status_interval.min(Duration::from_secs(1)));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = Instant::now();
        let mut heartbeat = tokio::time::interval(
            self.cfg
                .heartbeat_interval
                .unwrap_or(Duration::from_secs(3600)),
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown: stop reading WAL and drain.
                _ = cancel.cancelled() => return self.drain().await,
                // 2. Acks: free window room and move the flush LSN.
                ack = self.publisher.next_ack(), if self.publisher.awaiting_acks() > 0 => {
                    let ack = ack?;
                    trace!(event_id = %ack.event_id, seq = ack.seq, count = ack.count, "acked");
                    self.observe(&ack);
                    self.last_progress = Instant::now();
                    if self.heartbeat_acked(&ack) {
                        self.heartbeat_pending = None;
                    }
                    self.acked += ack.count;
                    self.confirm_acked_commits();
                    self.report_stored_chunks();
                }
                // 3. Periodic standby status, so Postgres can recycle WAL.
                _ = status_tick.tick() => {
                    if last_status.elapsed() >= self.cfg.status_interval {
                        self.send_status(false).await?;
                        self.observe_slot().await;
                        last_status = Instant::now();
                    }
                    self.check_stall();
                }
                // 3b. A heartbeat through the WAL, so progress is proven end to end.
                _ = heartbeat.tick(), if self.cfg.heartbeat_interval.is_some() => {
                    self.send_heartbeat().await;
                }
                // 4. New WAL, only while the publish window has room (backpressure).
                msg = self.repl.next(), if self.publisher.has_capacity() => {
                    let handled = match msg {
                        Ok(msg) => self.handle(msg).await,
                        Err(e) => Err(e.into()),
                    };
                    if let Err(err) = handled {
                        // Store and confirm what was sent before the failure, so a
                        // rebuild (or an operator's fix) resends as little as possible.
                        if let Err(settle_err) = self.settle().await {
                            debug!(error = %ErrorChain(&settle_err), "could not confirm after a failure; the next start resends from the slot");
                        }
                        return Err(err);
                    }
                }
            }
        }
    }

    /// Whether an ack stores a heartbeat event (or one after it).
    fn heartbeat_acked(&mut self, ack: &crate::jetstream::publisher::Acked) -> bool {
        let mut answered = false;
        while let Some(id) = self.heartbeat_ids.front() {
            if (id.commit_lsn, id.index) <= (ack.event_id.commit_lsn, ack.event_id.index) {
                self.heartbeat_ids.pop_front();
                answered = true;
            } else {
                break;
            }
        }
        answered
    }

    /// Writes a heartbeat message into the WAL (its event proves progress when stored).
    async fn send_heartbeat(&mut self) {
        let sent = self
            .catalog
            .client()
            .simple_query(&format!(
                "SELECT pg_logical_emit_message(true, '{HEARTBEAT_PREFIX}', '')"
            ))
            .await;
        match sent {
            Ok(_) => {
                if self.heartbeat_pending.is_none() {
                    self.heartbeat_pending = Some(Instant::now());
                }
            }
            Err(e) => warn!(error = %ErrorChain(&e), "heartbeat not written"),
        }
    }

    /// Says so loudly when progress that should come does not: events in flight or a
    /// heartbeat unanswered for longer than `stall_after`.
    fn check_stall(&mut self) {
        let waiting_since = [
            (self.publisher.in_flight() > 0 || !self.pending_commits.is_empty())
                .then_some(self.last_progress),
            self.heartbeat_pending,
        ]
        .into_iter()
        .flatten()
        .min();
        let stalled = waiting_since.is_some_and(|t| t.elapsed() > self.cfg.stall_after);
        if stalled && !self.stalled {
            error!(
                secs = self.cfg.stall_after.as_secs(),
                in_flight = self.publisher.in_flight(),
                heartbeat_unanswered = self.heartbeat_pending.is_some(),
                "no progress: nothing was stored for longer than stall_after_secs; check NATS and the replication connection"
            );
        } else if !stalled && self.stalled {
            info!("progress again after a stall");
        }
        if stalled != self.stalled {
            self.stalled = stalled;
            self.tel.set_stalled(&self.cfg.name, stalled);
        }
    }

    /// Records an ack in the metrics.
    fn observe(&self, ack: &crate::jetstream::publisher::Acked) {
        let t = &self.tel;
        t.events.get_or_create(&self.label).inc_by(ack.count);
        t.publish_latency
            .get_or_create(&self.label)
            .observe(ack.sent.elapsed().as_secs_f64());
        if let Some(c) = ack.commit_time {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(c);
            t.commit_to_ack
                .get_or_create(&self.label)
                .observe((now - c).max(0.0));
        }
        t.in_flight
            .get_or_create(&self.label)
            .set(self.publisher.in_flight() as i64);
    }

    /// The replication lag in seconds (the oldest committed transaction not yet
    /// stored) and the WAL the slot retains.
    async fn observe_slot(&mut self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let lag = self
            .pending_commits
            .front()
            .and_then(|(_, _, t)| *t)
            .map_or(0.0, |t| (now - t).max(0.0));
        self.tel.set_lag_seconds(&self.cfg.name, lag);
        let retained = self
            .catalog
            .client()
            .query_opt(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            )
            .await;
        if let Ok(Some(row)) = retained
            && let Some(bytes) = row.get::<_, Option<i64>>(0)
        {
            self.tel
                .retained_wal_bytes
                .get_or_create(&self.label)
                .set(bytes);
            if let Some(limit) = self.cfg.warn_retained_wal_bytes {
                let over = bytes.max(0) as u64 > limit;
                if over && !self.wal_warned {
                    warn!(
                        bytes,
                        limit,
                        "the replication slot retains more WAL than warn_retained_wal_bytes: tidemark is behind or stopped publishing, and the disk may fill"
                    );
                }
                self.wal_warned = over;
            }
        }
    }

    /// Tells the backfill worker about chunks whose events are all stored.
    fn report_stored_chunks(&mut self) {
        while let Some((count, _, _)) = self.chunk_acks.front() {
            if *count > self.acked {
                break;
            }
            if let Some((_, reply, outcome)) = self.chunk_acks.pop_front() {
                let _ = reply.send(outcome);
            }
        }
    }

    /// Awaits acks until the publish window has room.
    async fn make_room(&mut self) -> Result<(), SourceError> {
        while !self.publisher.has_capacity() && self.publisher.awaiting_acks() > 0 {
            let ack = self.publisher.next_ack().await?;
            self.acked += ack.count;
            self.confirm_acked_commits();
            self.report_stored_chunks();
        }
        Ok(())
    }

    /// Moves the flush LSN over every commit whose events are all acked.
    fn confirm_acked_commits(&mut self) {
        while let Some(&(count, end_lsn, _)) = self.pending_commits.front() {
            if count > self.acked {
                break;
            }
            self.flush.advance(end_lsn);
            self.pending_commits.pop_front();
        }
    }

    fn idle(&self) -> bool {
        self.tx.is_none() && self.pending_commits.is_empty() && self.publisher.in_flight() == 0
    }

    async fn send_status(&mut self, reply: bool) -> Result<(), SourceError> {
        let flush = self.flush.get();
        self.tel
            .flushed_lsn
            .get_or_create(&self.label)
            .set(flush.0 as i64);
        // Write is reported as the flush LSN: walsender pings an idle client only
        // while the client's write position is behind what it sent, and those pings
        // are what lets a quiet publication confirm past other tables' churn.
        self.repl.send_status(flush, flush, reply).await?;
        if flush != self.sent_flush {
            debug!(lsn = %flush, count = self.acked, "flush LSN confirmed");
            self.sent_flush = flush;
        }
        Ok(())
    }

    async fn handle(&mut self, msg: ReplicationMessage) -> Result<(), SourceError> {
        match msg {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.tel
                    .lag_bytes
                    .get_or_create(&self.label)
                    .set(wal_end.0.saturating_sub(self.flush.get().0) as i64);
                // Nothing in flight and no open transaction: everything the server
                // decoded up to wal_end is stored, so it can be confirmed.
                let moved = self.idle() && self.flush.advance(wal_end);
                if reply_requested || moved {
                    self.send_status(false).await?;
                }
                Ok(())
            }
            ReplicationMessage::XLogData {
                wal_start, data, ..
            } => {
                let msg = pgoutput::decode(data).map_err(|source| SourceError::Decode {
                    lsn: wal_start,
                    source,
                })?;
                self.apply(msg).await
            }
        }
    }

    async fn apply(&mut self, msg: LogicalMessage) -> Result<(), SourceError> {
        match msg {
            LogicalMessage::Begin(b) => {
                if self.tx.is_some() {
                    return Err(SourceError::Protocol("BEGIN inside a transaction".into()));
                }
                debug!(commit_lsn = %b.final_lsn, xid = b.xid, "begin");
                self.tx = Some(OpenTx {
                    final_lsn: b.final_lsn,
                    xid: b.xid,
                    next_index: 0,
                    events: 0,
                    lsn_text: b.final_lsn.to_string(),
                    time_text: b.commit_time.to_rfc3339(),
                    commit_time: Some(b.commit_time.unix_nanos() as f64 / 1e9),
                });
            }
            LogicalMessage::Commit(c) => {
                let tx = self
                    .tx
                    .take()
                    .ok_or_else(|| SourceError::Protocol("COMMIT without BEGIN".into()))?;
                debug!(commit_lsn = %c.commit_lsn, xid = tx.xid, count = tx.next_index, "commit");
                let summary = (self.cfg.transaction_events && tx.events > 0).then(|| {
                    mapping::transaction_summary(
                        &TxContext {
                            source: &self.cfg.name,
                            commit_lsn: tx.final_lsn,
                            xid: tx.xid,
                            commit_lsn_text: &tx.lsn_text,
                            time: &tx.time_text,
                        },
                        tx.next_index,
                        tx.events,
                    )
                });
                let summary = summary.filter(|e| !self.tail.is_stored(e.id.commit_lsn, e.id.index));
                if let Some(mut last) = self.held.take() {
                    last.mark_last();
                    self.send(last, summary.is_none()).await?;
                }
                if let Some(summary) = summary {
                    self.send(summary, true).await?;
                }
                if let Some((reply, outcome)) = self.chunk_in_tx.take() {
                    self.chunk_acks.push_back((self.published, reply, outcome));
                    self.report_stored_chunks();
                }
                self.pending_commits
                    .push_back((self.published, c.end_lsn, tx.commit_time));
                self.confirm_acked_commits();
            }
            LogicalMessage::Relation(r) => {
                let table = self.describe(r).await?;
                self.relations.insert(table.relation_id, table);
            }
            LogicalMessage::Insert { relation_id, new } => {
                self.row(relation_id, Operation::Insert, None, Some(&new))
                    .await?;
            }
            LogicalMessage::Update(u) => {
                let old = u.old.as_ref().map(|(k, t)| (*k, t));
                self.row(u.relation_id, Operation::Update, old, Some(&u.new))
                    .await?;
            }
            LogicalMessage::Delete(d) => {
                let (kind, old) = &d.old;
                self.row(d.relation_id, Operation::Delete, Some((*kind, old)), None)
                    .await?;
            }
            LogicalMessage::Truncate(t) => {
                for rel in t.relation_ids {
                    if let Some(w) = self.window.as_mut()
                        && w.relid == rel
                    {
                        w.truncated = true;
                    }
                    let (_, index) = self.next_index()?;
                    if let Some(event) =
                        mapping::map_truncate(&self.context()?, index, self.table(rel)?)
                    {
                        self.emit(event).await?;
                    }
                }
            }
            LogicalMessage::Message(m) => self.message(m).await?,
            LogicalMessage::Type(_) | LogicalMessage::Origin { .. } => {}
        }
        Ok(())
    }

    /// Claims the next index in the open transaction: (commit LSN, index).
    fn next_index(&mut self) -> Result<(Lsn, u64), SourceError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| SourceError::Protocol("row change outside a transaction".into()))?;
        let index = tx.next_index;
        tx.next_index += 1;
        Ok((tx.final_lsn, index))
    }

    /// The open transaction as the mapper sees it.
    fn context(&self) -> Result<TxContext<'_>, SourceError> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| SourceError::Protocol("row change outside a transaction".into()))?;
        Ok(TxContext {
            source: &self.cfg.name,
            commit_lsn: tx.final_lsn,
            xid: tx.xid,
            commit_lsn_text: &tx.lsn_text,
            time: &tx.time_text,
        })
    }

    fn table(&self, relation_id: u32) -> Result<&Table, SourceError> {
        self.relations.get(&relation_id).ok_or_else(|| {
            SourceError::Protocol(format!(
                "change for relation {relation_id} before its RELATION message"
            ))
        })
    }

    async fn row(
        &mut self,
        relation_id: u32,
        op: Operation,
        old: Option<(pgoutput::OldKind, &pgoutput::Tuple)>,
        new: Option<&pgoutput::Tuple>,
    ) -> Result<(), SourceError> {
        let (_, index) = self.next_index()?;
        if self.window.as_ref().is_some_and(|w| w.relid == relation_id) {
            self.note_window_change(relation_id, old.map(|(_, t)| t), new)?;
        }
        match self.map_row(index, relation_id, op, old, new)? {
            Some(event) => self.emit(event).await,
            None => Ok(()),
        }
    }

    /// Records the keys a live change touched in the open window's table.
    fn note_window_change(
        &mut self,
        relation_id: u32,
        old: Option<&pgoutput::Tuple>,
        new: Option<&pgoutput::Tuple>,
    ) -> Result<(), SourceError> {
        let table = self.table(relation_id)?;
        let Some(w) = self.window.as_ref() else {
            return Ok(());
        };
        let idx: Vec<Option<usize>> = w
            .key
            .iter()
            .map(|k| table.columns.iter().position(|c| &c.name == k))
            .collect();
        let key_of = |t: &pgoutput::Tuple| -> Vec<Option<bytes::Bytes>> {
            idx.iter()
                .map(|i| match i.and_then(|i| t.0.get(i)) {
                    Some(pgoutput::ColumnValue::Text(b)) => Some(b.clone()),
                    _ => None,
                })
                .collect()
        };
        let keys: Vec<_> = old.into_iter().chain(new).map(key_of).collect();
        if let Some(w) = self.window.as_mut() {
            w.changed.extend(keys);
        }
        Ok(())
    }

    /// Maps one row (a change, or a backfill's read) to its event, shrinking it when
    /// it is over the limit and the table's plan allows.
    fn map_row(
        &self,
        index: u64,
        relation_id: u32,
        op: Operation,
        old: Option<(pgoutput::OldKind, &pgoutput::Tuple)>,
        new: Option<&pgoutput::Tuple>,
    ) -> Result<Option<DomainEvent>, SourceError> {
        let tx = self.context()?;
        let table = self.table(relation_id)?;
        let change = RowChange { op, old, new };
        let Some(mut event) = mapping::map_change(&tx, index, table, &change, None)? else {
            return Ok(None);
        };
        // Too large: shrink the columns the table's plan allows, cutting harder
        // until it fits or there is nothing left to cut.
        let limit = self.cfg.max_event_bytes;
        if event.payload.len() > limit && table.plan.oversized != OversizedPlan::Fail {
            let biggest = [new, old.map(|(_, t)| t)]
                .into_iter()
                .flatten()
                .flat_map(|t| t.0.iter())
                .map(|v| match v {
                    pgoutput::ColumnValue::Text(b) | pgoutput::ColumnValue::Binary(b) => b.len(),
                    _ => 0,
                })
                .max()
                .unwrap_or(0);
            let mut cap = biggest.saturating_sub(event.payload.len() - limit + 256);
            for _ in 0..12 {
                let shrink = Shrink {
                    plan: &table.plan.oversized,
                    max_value_bytes: cap,
                };
                if let Some(smaller) =
                    mapping::map_change(&tx, index, table, &change, Some(shrink))?
                {
                    event = smaller;
                }
                if event.payload.len() <= limit || cap == 0 {
                    break;
                }
                cap /= 2;
            }
        }
        Ok(Some(event))
    }

    /// An emitted logical message: an event when its prefix is configured. Every
    /// transactional message takes an index in its transaction, configured or not, so
    /// event ids do not move when the configuration changes.
    async fn message(&mut self, m: pgoutput::EmittedMessage) -> Result<(), SourceError> {
        if m.prefix == HEARTBEAT_PREFIX && m.transactional {
            let (_, index) = self.next_index()?;
            let event = mapping::heartbeat_event(&self.context()?, index);
            self.heartbeat_ids.push_back(event.id.clone());
            return self.emit(event).await;
        }
        if m.prefix == SYNC_PREFIX && m.transactional {
            let (_, index) = self.next_index()?;
            let event = mapping::sync_event(&self.context()?, index);
            return self.emit(event).await;
        }
        if m.prefix == WATERMARK_PREFIX && m.transactional {
            self.next_index()?;
            return match serde_json::from_slice::<Watermark>(&m.content) {
                Ok(wm) => self.watermark(wm).await,
                Err(e) => {
                    warn!(lsn = %m.lsn, error = %e, "unreadable backfill watermark ignored");
                    Ok(())
                }
            };
        }
        let spec = self.cfg.messages.iter().find(|s| s.prefix == m.prefix);
        if !m.transactional {
            match spec {
                Some(_) => {
                    warn!(prefix = %m.prefix, lsn = %m.lsn, "non-transactional logical message ignored: emit it with pg_logical_emit_message(true, ...) so it commits (and is published) with its transaction")
                }
                None => {
                    debug!(prefix = %m.prefix, lsn = %m.lsn, "non-transactional logical message ignored")
                }
            }
            return Ok(());
        }
        let (_, index) = self.next_index()?;
        let Some(spec) = spec else {
            debug!(prefix = %m.prefix, lsn = %m.lsn, "logical message with an unconfigured prefix ignored");
            return Ok(());
        };
        let event = mapping::map_message(&self.context()?, index, spec, &m.content);
        self.emit(event).await
    }

    /// A backfill watermark: the low one opens the chunk's window, the high one
    /// publishes the chunk's rows that no live change touched inside it.
    async fn watermark(&mut self, wm: Watermark) -> Result<(), SourceError> {
        if wm.mark == "low" {
            self.window = Some(Window {
                job_id: wm.backfill,
                chunk: wm.chunk,
                relid: wm.relid,
                key: wm.key,
                changed: HashSet::new(),
                truncated: false,
            });
            return Ok(());
        }
        // Find the chunk; chunks of other windows are stale: have them read again.
        let mut found = None;
        while let Ok((chunk, reply)) = self.chunks.try_recv() {
            if chunk.job_id == wm.backfill && chunk.chunk == wm.chunk {
                found = Some((chunk, reply));
            } else {
                let _ = reply.send(ChunkOutcome::Retry(
                    "its high watermark was not seen".into(),
                ));
            }
        }
        let window = self
            .window
            .take()
            .filter(|w| w.job_id == wm.backfill && w.chunk == wm.chunk);
        // A high watermark without its chunk was written by an earlier process (the
        // slot sends it again after a restart); that chunk is read again.
        let Some((chunk, reply)) = found else {
            debug!(
                chunk = wm.chunk,
                "high watermark of an earlier process's chunk ignored"
            );
            return Ok(());
        };
        let Some(window) = window else {
            let _ = reply.send(ChunkOutcome::Retry("its low watermark was not seen".into()));
            return Ok(());
        };
        if !self.relations.contains_key(&chunk.relid) {
            let relation = catalog_relation(&self.catalog, chunk.relid).await?;
            let table = self.describe(relation).await?;
            self.relations.insert(table.relation_id, table);
        }
        let table = self.table(chunk.relid)?;
        let order: Option<Vec<usize>> = table
            .columns
            .iter()
            .map(|c| chunk.columns.iter().position(|n| n == &c.name))
            .collect();
        let (Some(order), true) = (order, table.columns.len() == chunk.columns.len()) else {
            let _ = reply.send(ChunkOutcome::Retry("the table's columns changed".into()));
            return Ok(());
        };
        let key_idx: Vec<Option<usize>> = window
            .key
            .iter()
            .map(|k| chunk.columns.iter().position(|n| n == k))
            .collect();
        let (mut published, mut skipped) = (0, 0);
        for row in chunk.rows {
            let key: Vec<Option<bytes::Bytes>> = key_idx
                .iter()
                .map(|i| {
                    i.and_then(|i| row.get(i).cloned().flatten())
                        .map(bytes::Bytes::from)
                })
                .collect();
            if window.truncated || window.changed.contains(&key) {
                skipped += 1;
                continue;
            }
            let tuple = pgoutput::Tuple(
                order
                    .iter()
                    .map(|&i| match row.get(i).cloned().flatten() {
                        Some(v) => pgoutput::ColumnValue::Text(bytes::Bytes::from(v)),
                        None => pgoutput::ColumnValue::Null,
                    })
                    .collect(),
            );
            let (_, index) = self.next_index()?;
            if let Some(event) =
                self.map_row(index, chunk.relid, Operation::Read, None, Some(&tuple))?
            {
                self.make_room().await?;
                self.emit(event).await?;
                published += 1;
            } else {
                skipped += 1;
            }
        }
        debug!(
            chunk = wm.chunk,
            published, skipped, "backfill chunk placed"
        );
        self.chunk_in_tx = Some((reply, ChunkOutcome::Stored { published, skipped }));
        Ok(())
    }

    /// Queues an event of the open transaction: the one held before it is sent, and
    /// this one is held until the next event or the commit says whether it is last.
    async fn emit(&mut self, mut event: DomainEvent) -> Result<(), SourceError> {
        if let Some(tx) = self.tx.as_mut() {
            tx.events += 1;
            event.commit_time = tx.commit_time;
        }
        // Stored before a restart: the exactly-once rule skips it.
        if self.tail.is_stored(event.id.commit_lsn, event.id.index) {
            self.skipped += 1;
            return Ok(());
        }
        if event.payload.len() > self.cfg.max_event_bytes {
            return Err(PublishError::Oversized {
                table: event.origin.clone(),
                key: event_key(&event),
                size: event.payload.len(),
                limit: self.cfg.max_event_bytes,
                event_id: event.id,
            }
            .into());
        }
        if let Some(prev) = self.held.replace(event) {
            self.send(prev, false).await?;
        }
        Ok(())
    }

    /// Publishes an event; `last` when it ends its transaction. In atomic mode a
    /// transaction's events go out as one batch (split at `atomic_batch_max`), a
    /// one-event transaction as a plain publish.
    async fn send(&mut self, event: DomainEvent, last: bool) -> Result<(), SourceError> {
        trace!(event_id = %event.id, subject = %event.subject, "publish");
        self.tel
            .bytes
            .get_or_create(&self.label)
            .inc_by(event.payload.len() as u64);
        let open = self.publisher.open_batch_len();
        if self.cfg.atomic_transactions && (open > 0 || !last) {
            let commit = last || open + 1 >= self.cfg.atomic_batch_max as u64;
            self.publisher.publish_batched(event, commit).await?;
        } else {
            self.publisher.publish(event).await?;
        }
        self.published += 1;
        Ok(())
    }

    /// Builds the mapper's view of a table from a RELATION message and the catalog.
    async fn describe(&mut self, r: pgoutput::Relation) -> Result<Table, SourceError> {
        for c in &r.columns {
            if !self.types.is_known(c.type_oid) {
                let kind = self.catalog.resolve_type(c.type_oid).await?;
                self.types.register(c.type_oid, kind);
            }
        }
        let pk = self.catalog.primary_key(r.id).await?;
        let key: Vec<usize> = if pk.is_empty() {
            r.columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_key)
                .map(|(i, _)| i)
                .collect()
        } else {
            pk.iter()
                .filter_map(|name| r.columns.iter().position(|c| &c.name == name))
                .collect()
        };
        let token = mapping::table_token(&r.namespace, &r.name);
        let qualified = format!("{}.{}", r.namespace, r.name);
        let cols: Vec<(String, u32)> = r
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid))
            .collect();
        let plan = bind_plan(
            self.cfg,
            &r.namespace,
            &r.name,
            &LiveTable {
                qualified: &qualified,
                token: &token,
                columns: &cols,
                replica_identity: r.replica_identity,
                default_key: &key,
            },
        )?;
        debug!(table = %qualified, count = r.columns.len(), schema = %plan.fingerprint, "relation");
        Ok(Table {
            relation_id: r.id,
            token,
            schema: r.namespace,
            name: r.name,
            replica_identity: r.replica_identity,
            plan,
            columns: r
                .columns
                .into_iter()
                .map(|c| TableColumn {
                    kind: self.types.kind(c.type_oid),
                    name: c.name,
                    type_oid: c.type_oid,
                })
                .collect(),
        })
    }

    /// Shutdown: no more WAL is read; settle in-flight publishes and say so.
    async fn drain(&mut self) -> Result<(), SourceError> {
        // A held event belongs to a transaction whose commit never arrived: it is
        // not sent (the slot resends the whole transaction on the next start).
        self.held = None;
        self.publisher.abandon_batch();
        self.settle().await?;
        info!(lsn = %self.flush.get(), count = self.published, skipped = self.skipped, "stopped; final flush LSN sent");
        Ok(())
    }

    /// Waits (bounded by the ack timeout) for in-flight acks, confirms every
    /// transaction they complete, and sends a status update.
    async fn settle(&mut self) -> Result<(), SourceError> {
        let deadline = tokio::time::Instant::now() + self.cfg.ack_timeout;
        while self.publisher.awaiting_acks() > 0 {
            match tokio::time::timeout_at(deadline, self.publisher.next_ack()).await {
                Ok(Ok(ack)) => {
                    self.acked += ack.count;
                    self.confirm_acked_commits();
                    self.report_stored_chunks();
                }
                Ok(Err(e)) => {
                    warn!(error = %ErrorChain(&e), "publish failed while settling; the rest will be resent on the next start");
                    break;
                }
                Err(_) => {
                    warn!(
                        count = self.publisher.in_flight(),
                        "acks still outstanding at the drain deadline; they will be resent on the next start"
                    );
                    break;
                }
            }
        }
        self.send_status(false).await
    }
}

/// The event's key as compact JSON, for error messages (never logged: rows stay out
/// of logs, but an operator needs the key to find an oversized row).
fn event_key(event: &DomainEvent) -> String {
    serde_json::from_slice::<serde_json::Value>(&event.payload)
        .ok()
        .map(|v| v["data"]["key"].to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Binds a table's configured mapping (if any) to its live shape.
pub fn bind_plan(
    cfg: &SourceConfig,
    schema: &str,
    name: &str,
    live: &LiveTable<'_>,
) -> Result<TablePlan, BindError> {
    let spec = cfg
        .mappings
        .iter()
        .find(|m| m.schema == schema && m.table == name);
    let outbox = cfg
        .outboxes
        .iter()
        .find(|o| o.schema == schema && o.table == name);
    rules::bind(live, spec, outbox)
}

/// One published table with its live columns and the plan its mapping binds to.
pub struct PlannedTable {
    pub info: crate::postgres::catalog::TableInfo,
    pub columns: Vec<(String, u32)>,
    pub plan: TablePlan,
}

/// Binds every configured mapping to the live tables, so a rule naming a column that
/// does not exist stops the start with the table and column named. A mapping for a
/// table the source does not stream is an error too.
pub async fn plan_tables(
    catalog: &Catalog,
    cfg: &SourceConfig,
    tables: &[crate::postgres::catalog::TableInfo],
) -> Result<Vec<PlannedTable>, SourceError> {
    let streamed =
        |schema: &str, name: &str| tables.iter().any(|t| t.schema == schema && t.name == name);
    for (schema, name, line) in cfg
        .mappings
        .iter()
        .map(|m| (&m.schema, &m.table, m.line))
        .chain(cfg.outboxes.iter().map(|o| (&o.schema, &o.table, o.line)))
    {
        if !streamed(schema, name) {
            return Err(CatalogError::MappedTableNotStreamed {
                table: format!("{schema}.{name}"),
                line,
                publication: cfg.publication.clone(),
            }
            .into());
        }
    }
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        let columns = catalog.columns(t.oid).await?;
        let key: Vec<usize> = if t.primary_key.is_empty() {
            catalog
                .identity_columns(t.oid)
                .await?
                .iter()
                .filter_map(|k| columns.iter().position(|(n, _)| n == k))
                .collect()
        } else {
            t.primary_key
                .iter()
                .filter_map(|k| columns.iter().position(|(n, _)| n == k))
                .collect()
        };
        let qualified = format!("{}.{}", t.schema, t.name);
        let token = mapping::table_token(&t.schema, &t.name);
        let plan = bind_plan(
            cfg,
            &t.schema,
            &t.name,
            &LiveTable {
                qualified: &qualified,
                token: &token,
                columns: &columns,
                replica_identity: ReplicaIdentity::from_char(t.replica_identity),
                default_key: &key,
            },
        )?;
        out.push(PlannedTable {
            info: t.clone(),
            columns,
            plan,
        });
    }
    Ok(out)
}

/// A table's description from the catalog, shaped as the replication stream's
/// RELATION message (for a table no change has described yet).
async fn catalog_relation(
    catalog: &Catalog,
    relid: u32,
) -> Result<pgoutput::Relation, SourceError> {
    let client = catalog.client();
    let row = client
        .query_one(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&relid],
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "describe a backfilled table",
            source,
        })?;
    let ident: String = row.get(2);
    let columns = catalog.columns(relid).await?;
    let key = catalog.primary_key(relid).await?;
    Ok(pgoutput::Relation {
        id: relid,
        namespace: row.get(0),
        name: row.get(1),
        replica_identity: ReplicaIdentity::from_char(ident.chars().next().unwrap_or('d')),
        columns: columns
            .into_iter()
            .map(|(name, type_oid)| pgoutput::Column {
                is_key: key.contains(&name),
                name,
                type_oid,
                type_modifier: -1,
            })
            .collect(),
    })
}
