//! The source loop: one `select!` over shutdown, acks, status updates, heartbeats and
//! new WAL, and the publish path every event takes (`emit` -> `send`, which makes room
//! in the window first, so no message ever waits on an ack only it could read).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use super::error::SourceError;
use super::flush::FlushTracker;
use super::window::{RecentCommits, Window};
use crate::backfill::{ChunkOutcome, ChunkReceiver};
use crate::config::SourceConfig;
use crate::error::ErrorChain;
use crate::events::mapping::{DomainEvent, Table};
use crate::jetstream::publisher::{Acked, PublishError, Publisher, header_bytes};
use crate::position::{EventId, Lsn, StreamTail};
use crate::postgres::catalog::Catalog;
use crate::postgres::pgoutput;
use crate::postgres::replication::{ReplicationMessage, ReplicationStream};
use crate::postgres::values::TypeRegistry;
use crate::telemetry::{SourceLabel, Telemetry};

/// A chunk waiting for its rows to be stored, and what to tell its worker then.
pub(super) type ChunkReply = (tokio::sync::oneshot::Sender<ChunkOutcome>, ChunkOutcome);

/// The transaction being received.
pub(super) struct OpenTx {
    pub(super) final_lsn: Lsn,
    pub(super) xid: u32,
    pub(super) next_index: u64,
    /// Events mapped so far (stored before a restart or not).
    pub(super) events: u64,
    /// The commit time, Unix seconds.
    pub(super) commit_time: Option<f64>,
    /// Texts shared by every event of the transaction.
    pub(super) lsn_text: String,
    pub(super) time_text: String,
}

pub(super) struct Pipeline<'a> {
    pub(super) tel: std::sync::Arc<Telemetry>,
    pub(super) label: SourceLabel,
    /// `tel.bytes` for this source, looked up once (it counts every event sent).
    pub(super) bytes_sent: prometheus_client::metrics::counter::Counter,
    /// When something was last stored.
    pub(super) last_progress: Instant,
    /// When the oldest unanswered heartbeat was written.
    pub(super) heartbeat_pending: Option<Instant>,
    /// Heartbeat events published and not yet acked.
    pub(super) heartbeat_ids: VecDeque<EventId>,
    pub(super) stalled: bool,
    pub(super) wal_warned: bool,
    pub(super) cfg: &'a SourceConfig,
    pub(super) catalog: Catalog,
    pub(super) repl: ReplicationStream,
    pub(super) publisher: Publisher,
    pub(super) tail: StreamTail,
    pub(super) relations: HashMap<u32, Table>,
    pub(super) types: TypeRegistry,
    pub(super) tx: Option<OpenTx>,
    /// The open transaction's latest event, held back until the next one (or the
    /// commit) shows whether it is the transaction's last.
    pub(super) held: Option<DomainEvent>,
    /// Chunks the backfill worker read, waiting for their high watermark.
    pub(super) chunks: ChunkReceiver,
    /// The open watermark window, between a chunk's low and high watermark.
    pub(super) window: Option<Window>,
    /// The latest transactions' commit LSNs, for chunk reads (see `RecentCommits`).
    pub(super) recent: RecentCommits,
    /// The chunk published in the open transaction (at its high watermark).
    pub(super) chunk_in_tx: Option<ChunkReply>,
    /// Sent, acked, committed: what may be confirmed, and which chunks are stored.
    pub(super) flush: FlushTracker<ChunkReply>,
    pub(super) skipped: u64,
    /// The server's `max_payload`: headers and payload of one message together.
    pub(super) max_payload: usize,
    pub(super) sent_flush: Lsn,
    /// When the replication connection last sent something (or could not be read
    /// because the window was full).
    pub(super) last_received: Instant,
    /// The `run` of this attempt's backfill watermarks.
    pub(super) watermark_run: String,
    /// The source's backfill record, for chunk placements.
    pub(super) progress: crate::backfill::Progress,
    /// The database system's identifier (IDENTIFY_SYSTEM), for the stored tail.
    pub(super) system_id: String,
    /// The last event stored (its id and stream sequence), and the last one recorded
    /// as the stored tail.
    pub(super) last_acked: Option<(EventId, u64)>,
    pub(super) tail_recorded: Option<EventId>,
    /// The record being written, if any.
    pub(super) tail_task:
        Option<tokio::task::JoinHandle<Result<(), crate::backfill::BackfillError>>>,
    /// A failure of the tables' watch that an operator must fix (see `recreated`).
    pub(super) recreated_failed: tokio::sync::oneshot::Receiver<SourceError>,
    /// The signal table as the stream described it (its rows are markers, never data).
    pub(super) signal_rel: Option<crate::postgres::signal::SignalRelation>,
    /// Whether markers reach the stream here (false: PostgreSQL 12 or 13 without the
    /// signal table; no heartbeats then).
    pub(super) signals_ok: bool,
}

impl Pipeline<'_> {
    pub(super) async fn run(&mut self, cancel: &CancellationToken) -> Result<(), SourceError> {
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
        // One shutdown future for the whole loop: made anew for each message, it cost
        // a registration and a drop each time.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        loop {
            // 1. Shutdown: stop reading WAL and drain. Checked here first (an atomic
            // load); the future below only wakes the loop when nothing else is ready,
            // so it is not polled for every message.
            if cancel.is_cancelled() {
                return self.drain().await;
            }
            tokio::select! {
                biased;
                // 2. Acks: free window room and move the flush LSN.
                ack = self.publisher.next_ack(), if self.publisher.awaiting_acks() > 0 => {
                    self.on_ack(ack?);
                }
                // 3. Periodic standby status, so Postgres can recycle WAL.
                _ = status_tick.tick() => {
                    if let Ok(err) = self.recreated_failed.try_recv() {
                        if let Err(settle_err) = self.settle().await {
                            debug!(error = %ErrorChain(&settle_err), "could not confirm before stopping; the next start resends from the slot");
                        }
                        return Err(err);
                    }
                    self.check_silence().await?;
                    self.record_tail();
                    if last_status.elapsed() >= self.cfg.status_interval {
                        self.send_status(false).await?;
                        self.observe_slot().await;
                        last_status = Instant::now();
                    } else if self.flush.flush() != self.sent_flush {
                        // Confirmed as soon as it moves (at most once a tick, a second):
                        // a status update is one small message, and after a crash the
                        // slot then sends again at most a second of what the stream
                        // holds, so a restart streams new changes within seconds.
                        self.send_status(false).await?;
                    }
                    self.check_stall();
                }
                // 3b. A heartbeat through the WAL, so progress is proven end to end.
                _ = heartbeat.tick(), if self.cfg.heartbeat_interval.is_some() && self.signals_ok => {
                    self.send_heartbeat().await;
                }
                // 4. New WAL, only while the publish window has room (backpressure).
                msg = self.repl.next(), if self.publisher.has_capacity() => {
                    self.last_received = Instant::now();
                    let handled = match msg {
                        // One message can wait a while (a full window waits for acks
                        // before each event it sends): shutdown cuts it short. What
                        // it sent is settled by the drain; its transaction's commit
                        // was not recorded, so nothing of it is confirmed.
                        Ok(msg) => tokio::select! {
                            biased;
                            // Most messages are handled in one poll; shutdown is
                            // looked at only when one waits.
                            handled = self.handle(msg) => Some(handled),
                            _ = &mut cancelled => None,
                        },
                        Err(e) => Some(Err(e.into())),
                    };
                    let Some(handled) = handled else {
                        return self.drain().await;
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
                // Shutdown, when the loop would otherwise sleep (see 1).
                _ = &mut cancelled => return self.drain().await,
                // 5. Nothing else is ready: the publish held back goes out asking for
                // its ack (see the publisher's DESIGN note).
                _ = std::future::ready(()), if self.publisher.has_deferred() => {
                    self.publisher.flush().await?;
                }
            }
        }
    }

    /// Awaits acks until the publish window has room.
    /// A replication connection silent for half of `replication_timeout` is asked
    /// for a reply (walsender answers a reply request with a keepalive at once);
    /// silent for all of it, it is presumed dead (a half-open TCP connection is
    /// otherwise noticed only by the OS, after many minutes). Time with a full window
    /// does not count: the connection is not read then.
    async fn check_silence(&mut self) -> Result<(), SourceError> {
        if !self.publisher.has_capacity() {
            self.last_received = Instant::now();
            return Ok(());
        }
        let silent = self.last_received.elapsed();
        if silent >= self.cfg.replication_timeout {
            return Err(SourceError::Silent {
                secs: silent.as_secs(),
            });
        }
        if silent >= self.cfg.replication_timeout / 2 {
            self.send_status(true).await?;
        }
        Ok(())
    }

    pub(super) async fn make_room(&mut self) -> Result<(), SourceError> {
        if !self.publisher.has_capacity() {
            // Every publish then asks for an ack that will come.
            self.publisher.flush().await?;
        }
        while !self.publisher.has_capacity() && self.publisher.awaiting_acks() > 0 {
            let ack = self.publisher.next_ack().await?;
            self.on_ack(ack);
        }
        Ok(())
    }

    /// Everything an ack means, on every path that takes one (the loop, making room,
    /// settling): metrics, progress, heartbeats, the flush LSN and stored chunks.
    pub(super) fn on_ack(&mut self, ack: Acked) {
        trace!(event_id = %ack.event_id, seq = ack.seq, count = ack.count, "acked");
        self.observe(&ack);
        self.last_acked = Some((ack.event_id.clone(), ack.seq));
        self.last_progress = Instant::now();
        if self.heartbeat_acked(&ack) {
            self.heartbeat_pending = None;
        }
        for (reply, outcome) in self.flush.on_ack(ack.count) {
            // The worker may have stopped with its attempt; nothing waits then.
            let _ = reply.send(outcome);
        }
    }

    pub(super) async fn send_status(&mut self, reply: bool) -> Result<(), SourceError> {
        let flush = self.flush.flush();
        self.tel
            .flushed_lsn
            .get_or_create(&self.label)
            .set(flush.0 as i64);
        self.record_tail();
        // Write is reported as the flush LSN: walsender pings an idle client only
        // while the client's write position is behind what it sent, and those pings
        // are what lets a quiet publication confirm past other tables' churn.
        self.repl.send_status(flush, flush, reply).await?;
        if flush != self.sent_flush {
            debug!(lsn = %flush, count = self.flush.acked_count(), "flush LSN confirmed");
            self.sent_flush = flush;
        }
        Ok(())
    }

    /// Records the last stored event, when it moved (see `backfill::StoredTail`), on
    /// every status tick (at most a second apart) and with every status update. In the
    /// background, one write at a time: NATS being slow or away never holds up the
    /// loop (its stall alarm, its status updates); a failed write is tried again.
    pub(super) fn record_tail(&mut self) {
        if let Some(task) = &self.tail_task {
            if !task.is_finished() {
                return;
            }
            if let Some(task) = self.tail_task.take()
                && !matches!(
                    futures_util::FutureExt::now_or_never(task),
                    Some(Ok(Ok(())))
                )
            {
                debug!("could not record the stored tail; trying again");
                self.tail_recorded = None;
            }
        }
        let Some(record) = self.tail_record() else {
            return;
        };
        let progress = self.progress.clone();
        self.tail_task = Some(tokio::spawn(async move {
            progress.put_stored_tail(&record).await
        }));
    }

    /// The stored tail to record, when it moved since the last record; marks it
    /// recorded.
    fn tail_record(&mut self) -> Option<crate::backfill::StoredTail> {
        let (id, seq) = self.last_acked.as_ref()?;
        if self.tail_recorded.as_ref() == Some(id) {
            return None;
        }
        self.tail_recorded = Some(id.clone());
        Some(crate::backfill::StoredTail {
            system_id: self.system_id.clone(),
            slot: self.cfg.slot.clone(),
            stream: None,
            commit_lsn: id.commit_lsn.to_string(),
            index: id.index,
            seq: *seq,
        })
    }

    pub(super) async fn handle(&mut self, msg: ReplicationMessage) -> Result<(), SourceError> {
        match msg {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.tel
                    .lag_bytes
                    .get_or_create(&self.label)
                    .set(wal_end.0.saturating_sub(self.flush.flush().0) as i64);
                // Nothing in flight and no open transaction: everything the server
                // decoded up to wal_end is stored, so it can be confirmed.
                let moved = self.flush.idle_advance(wal_end, self.tx.is_some());
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

    /// Queues an event of the open transaction: the one held before it is sent, and
    /// this one is held until the next event or the commit says whether it is last.
    pub(super) async fn emit(&mut self, mut event: DomainEvent) -> Result<(), SourceError> {
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
                table: event.origin.to_string(),
                key: event_key(&event),
                size: event.payload.len(),
                limit: self.cfg.max_event_bytes,
                event_id: event.id,
            }
            .into());
        }
        // The server's limit counts the headers too: a message over it would be
        // refused on every attempt, so it stops the source here, named.
        let headers = header_bytes(&event);
        if self.max_payload > 0 && event.payload.len() + headers > self.max_payload {
            return Err(PublishError::OversizedOnWire {
                table: event.origin.to_string(),
                key: event_key(&event),
                size: event.payload.len(),
                headers,
                max_payload: self.max_payload,
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
    pub(super) async fn send(&mut self, event: DomainEvent, last: bool) -> Result<(), SourceError> {
        // Every send makes room first: a message that yields several events (a
        // multi-table TRUNCATE, a chunk, a commit with its summary) never sends into
        // a full window, where it would wait on acks only this task reads.
        self.make_room().await?;
        trace!(event_id = %event.id, subject = %event.subject, "publish");
        self.bytes_sent.inc_by(event.payload.len() as u64);
        let open = self.publisher.open_batch_len();
        if self.cfg.atomic_transactions && (open > 0 || !last) {
            let commit = last || open + 1 >= self.cfg.atomic_batch_max as u64;
            self.publisher.publish_batched(event, commit).await?;
        } else {
            self.publisher.publish(event).await?;
        }
        self.flush.sent();
        Ok(())
    }

    /// Shutdown: no more WAL is read; settle in-flight publishes and say so.
    pub(super) async fn drain(&mut self) -> Result<(), SourceError> {
        // A held event belongs to a transaction whose commit never arrived: it is
        // not sent (the slot resends the whole transaction on the next start).
        self.held = None;
        self.publisher.abandon_batch();
        self.settle().await?;
        // The last record, waited for (2 s at most): a stop leaves it exact.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        if let Some(task) = self.tail_task.take()
            && !matches!(
                tokio::time::timeout_at(deadline, task).await,
                Ok(Ok(Ok(())))
            )
        {
            self.tail_recorded = None;
        }
        if let Some(record) = self.tail_record() {
            let put = self.progress.put_stored_tail(&record);
            if !matches!(tokio::time::timeout_at(deadline, put).await, Ok(Ok(()))) {
                debug!("could not record the stored tail at the stop");
            }
        }
        info!(lsn = %self.flush.flush(), count = self.flush.sent_count(), skipped = self.skipped, "stopped; final flush LSN sent");
        Ok(())
    }

    /// Waits (bounded by the ack timeout) for in-flight acks, confirms every
    /// transaction they complete, and sends a status update.
    pub(super) async fn settle(&mut self) -> Result<(), SourceError> {
        let deadline = tokio::time::Instant::now() + self.cfg.ack_timeout;
        if let Err(e) = self.publisher.flush().await {
            warn!(error = %ErrorChain(&e), "publish failed while settling; the rest will be resent on the next start");
        }
        while self.publisher.awaiting_acks() > 0 {
            match tokio::time::timeout_at(deadline, self.publisher.next_ack()).await {
                Ok(Ok(ack)) => self.on_ack(ack),
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
