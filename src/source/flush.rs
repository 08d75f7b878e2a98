//! The flush tracker: which LSN may be confirmed to Postgres, given what was sent and
//! what JetStream acked. Pure: no I/O, no clocks.
//!
//! Every event sent counts once; every ack releases the events it stored (one, or an
//! atomic batch). A commit is recorded with the count of events sent when it arrived:
//! once the acks reach that count, every event of it and of every transaction before it
//! is stored, and its end LSN may be confirmed. Other waiters (a backfill chunk waiting
//! for its rows to be stored) ride the same count. There is one `on_ack`, and every
//! path that takes an ack goes through it.

use std::collections::VecDeque;

use crate::position::{HighWater, Lsn};

/// A committed transaction not yet confirmed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PendingCommit {
    /// Events sent when its commit arrived.
    sent: u64,
    end_lsn: Lsn,
    /// Its commit time, Unix seconds.
    commit_time: Option<f64>,
}

#[derive(Debug)]
pub(crate) struct FlushTracker<W> {
    sent: u64,
    acked: u64,
    pending: VecDeque<PendingCommit>,
    waiters: VecDeque<(u64, W)>,
    /// Highest LSN whose every event is stored: what is confirmed to Postgres.
    flush: HighWater,
}

impl<W> FlushTracker<W> {
    /// A tracker that starts at the slot's confirmed flush LSN.
    pub(crate) fn new(confirmed: Lsn) -> Self {
        FlushTracker {
            sent: 0,
            acked: 0,
            pending: VecDeque::new(),
            waiters: VecDeque::new(),
            flush: HighWater::new(confirmed),
        }
    }

    /// One event was sent.
    pub(crate) fn sent(&mut self) {
        self.sent += 1;
    }

    /// Events sent so far.
    pub(crate) fn sent_count(&self) -> u64 {
        self.sent
    }

    /// Events stored so far.
    pub(crate) fn acked_count(&self) -> u64 {
        self.acked
    }

    /// A transaction committed: confirmable once everything sent so far is stored.
    pub(crate) fn commit(&mut self, end_lsn: Lsn, commit_time: Option<f64>) {
        self.pending.push_back(PendingCommit {
            sent: self.sent,
            end_lsn,
            commit_time,
        });
        self.confirm();
    }

    /// Registers `waiter`, released once everything sent so far is stored. Returns
    /// the waiters that are released now (this one, if nothing is outstanding).
    pub(crate) fn wait(&mut self, waiter: W) -> Vec<W> {
        self.waiters.push_back((self.sent, waiter));
        self.release()
    }

    /// An ack stored `count` events. Returns the waiters it released.
    pub(crate) fn on_ack(&mut self, count: u64) -> Vec<W> {
        self.acked += count;
        debug_assert!(self.acked <= self.sent, "more events acked than sent");
        self.confirm();
        self.release()
    }

    /// Nothing sent is unacked and no commit waits: everything the server decoded up
    /// to `wal_end` is stored, so the flush LSN may move there (a keepalive while
    /// idle). `open_tx` says whether a transaction is being received.
    pub(crate) fn idle_advance(&mut self, wal_end: Lsn, open_tx: bool) -> bool {
        let idle = !open_tx && self.pending.is_empty() && self.acked == self.sent;
        idle && self.flush.advance(wal_end)
    }

    /// The LSN to confirm.
    pub(crate) fn flush(&self) -> Lsn {
        self.flush.get()
    }

    /// Whether a committed transaction waits for its acks.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The commit time of the oldest committed transaction not yet stored.
    pub(crate) fn oldest_pending_commit_time(&self) -> Option<f64> {
        self.pending.front().and_then(|c| c.commit_time)
    }

    fn confirm(&mut self) {
        while let Some(c) = self.pending.front() {
            if c.sent > self.acked {
                break;
            }
            self.flush.advance(c.end_lsn);
            self.pending.pop_front();
        }
    }

    fn release(&mut self) -> Vec<W> {
        let mut out = Vec::new();
        while self.waiters.front().is_some_and(|(n, _)| *n <= self.acked) {
            if let Some((_, w)) = self.waiters.pop_front() {
                out.push(w);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_commit_is_confirmed_only_when_all_its_events_are_acked() {
        let mut t: FlushTracker<()> = FlushTracker::new(Lsn(10));
        t.sent();
        t.sent();
        t.commit(Lsn(100), None);
        assert_eq!(t.flush(), Lsn(10));
        t.on_ack(1);
        assert_eq!(t.flush(), Lsn(10));
        t.on_ack(1);
        assert_eq!(t.flush(), Lsn(100));
        assert!(!t.has_pending());
    }

    #[test]
    fn a_commit_with_no_new_events_is_confirmed_behind_earlier_ones() {
        let mut t: FlushTracker<()> = FlushTracker::new(Lsn(0));
        t.sent();
        t.commit(Lsn(50), Some(1.0));
        // A transaction whose events were all stored before a restart.
        t.commit(Lsn(60), Some(2.0));
        assert_eq!(t.flush(), Lsn(0));
        assert_eq!(t.oldest_pending_commit_time(), Some(1.0));
        t.on_ack(1);
        assert_eq!(t.flush(), Lsn(60));
    }

    #[test]
    fn idle_keepalives_advance_only_with_nothing_outstanding() {
        let mut t: FlushTracker<()> = FlushTracker::new(Lsn(5));
        assert!(t.idle_advance(Lsn(7), false));
        assert!(!t.idle_advance(Lsn(9), true), "a transaction is open");
        t.sent();
        assert!(!t.idle_advance(Lsn(9), false), "an event is unacked");
        t.on_ack(1);
        assert!(t.idle_advance(Lsn(9), false));
        assert!(!t.idle_advance(Lsn(8), false), "never backwards");
        assert_eq!(t.flush(), Lsn(9));
    }

    #[test]
    fn waiters_are_released_in_order_once_stored() {
        let mut t = FlushTracker::new(Lsn(0));
        assert_eq!(t.wait("empty"), vec!["empty"]);
        t.sent();
        assert!(t.wait("a").is_empty());
        t.sent();
        t.sent();
        assert!(t.wait("b").is_empty());
        assert_eq!(t.on_ack(1), vec!["a"]);
        assert!(t.on_ack(1).is_empty());
        assert_eq!(t.on_ack(1), vec!["b"]);
    }

    proptest! {
        /// Whatever the interleaving of sends, commits and acks (acks in order, as
        /// JetStream gives them), the flush LSN never moves back and never passes a
        /// commit with an unacked event.
        #[test]
        fn flush_never_passes_an_unacked_commit(steps in proptest::collection::vec(0u8..3, 1..200)) {
            let mut t: FlushTracker<()> = FlushTracker::new(Lsn(0));
            let mut commits: Vec<(u64, Lsn)> = Vec::new();
            let mut lsn = 0u64;
            let mut last_flush = Lsn(0);
            for s in steps {
                match s {
                    0 => t.sent(),
                    1 => {
                        lsn += 10;
                        commits.push((t.sent_count(), Lsn(lsn)));
                        t.commit(Lsn(lsn), None);
                    }
                    _ => {
                        if t.acked_count() < t.sent_count() {
                            t.on_ack(1);
                        }
                    }
                }
                prop_assert!(t.flush() >= last_flush);
                last_flush = t.flush();
                let allowed = commits
                    .iter()
                    .filter(|(sent, _)| *sent <= t.acked_count())
                    .map(|(_, l)| *l)
                    .max()
                    .unwrap_or(Lsn(0));
                prop_assert_eq!(t.flush(), allowed);
            }
        }
    }
}
