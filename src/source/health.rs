//! Health of the running source: heartbeats through the WAL, stall detection, and the
//! metrics of acks, lag and retained WAL.

use std::time::Instant;

use tracing::{error, info, warn};

use super::pipeline::Pipeline;
use crate::error::ErrorChain;
use crate::events::reserved::HEARTBEAT_PREFIX;
use crate::jetstream::publisher::Acked;

/// The longest the source loop waits on a catalog query of its own (heartbeats, the
/// slot's retained WAL).
const CATALOG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Pipeline<'_> {
    /// Whether an ack stores a heartbeat event (or one after it).
    pub(super) fn heartbeat_acked(&mut self, ack: &Acked) -> bool {
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
    pub(super) async fn send_heartbeat(&mut self) {
        // Bounded: an unresponsive database must not hold up the source loop (the
        // replication timeout and stall detection run in it).
        let sent = tokio::time::timeout(
            CATALOG_TIMEOUT,
            self.catalog
                .client()
                .simple_query(&crate::postgres::signal::emit_sql(
                    self.catalog.version(),
                    &self.cfg.signal_table,
                    HEARTBEAT_PREFIX,
                    "",
                )),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {
                if self.heartbeat_pending.is_none() {
                    self.heartbeat_pending = Some(Instant::now());
                }
            }
            Ok(Err(e)) => warn!(error = %ErrorChain(&e), "heartbeat not written"),
            Err(_) => warn!("heartbeat not written: the database did not answer in time"),
        }
    }

    /// Says so loudly when progress that should come does not: events in flight or a
    /// heartbeat unanswered for longer than `stall_after`.
    pub(super) fn check_stall(&mut self) {
        let waiting_since = [
            (self.publisher.in_flight() > 0 || self.flush.has_pending())
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
    pub(super) fn observe(&self, ack: &Acked) {
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
    pub(super) async fn observe_slot(&mut self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let lag = self
            .flush
            .oldest_pending_commit_time()
            .map_or(0.0, |t| (now - t).max(0.0));
        self.tel.set_lag_seconds(&self.cfg.name, lag);
        let retained = tokio::time::timeout(
            CATALOG_TIMEOUT,
            self.catalog.client().query_opt(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            ),
        )
        .await;
        if let Ok(Ok(Some(row))) = retained
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
}
