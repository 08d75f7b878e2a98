//! The DBLog window of a backfill chunk: between the chunk's low and high watermark,
//! the keys live changes touch are noted; at the high watermark the chunk's rows that
//! none touched are published as reads, in the transaction of the high watermark.

use std::collections::{HashMap, HashSet, VecDeque};

use tracing::{debug, warn};

use super::error::SourceError;
use super::pipeline::Pipeline;
use crate::backfill::{ChunkOutcome, Placement, Watermark};
use crate::events::mapping::{Operation, Table};
use crate::position::Lsn;
use crate::postgres::pgoutput;

/// A backfill chunk's window: the keys of its table that live changes touched between
/// the chunk's low and high watermarks. Pure: the pipeline feeds it the changes in
/// stream order and asks, at the high watermark, which of the chunk's rows to publish.
pub(super) struct Window {
    pub(super) job_id: String,
    pub(super) chunk: u64,
    pub(super) relid: u32,
    pub(super) key: Vec<String>,
    pub(super) changed: HashSet<Vec<Option<bytes::Bytes>>>,
    pub(super) truncated: bool,
    /// The commit LSN of the low watermark's transaction.
    pub(super) start: Lsn,
}

/// The commit LSNs of the latest transactions the stream carried, by xid (low 32
/// bits), a bounded number of them: enough to tell whether a transaction a chunk's
/// read could not see had committed before the chunk's low watermark.
pub(super) struct RecentCommits {
    order: VecDeque<u32>,
    at: HashMap<u32, Lsn>,
    cap: usize,
}

impl RecentCommits {
    pub(super) fn new(cap: usize) -> Self {
        RecentCommits {
            order: VecDeque::with_capacity(cap.min(1024)),
            at: HashMap::new(),
            cap: cap.max(1),
        }
    }

    pub(super) fn record(&mut self, xid: u32, commit_lsn: Lsn) {
        if self.at.insert(xid, commit_lsn).is_none() {
            self.order.push_back(xid);
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.at.remove(&old);
            }
        }
    }

    /// Whether `xid` committed (in the stream) before `lsn`.
    pub(super) fn committed_before(&self, xid: u32, lsn: Lsn) -> bool {
        self.at.get(&xid).is_some_and(|at| *at < lsn)
    }
}

/// The most keys a window notes: what memory one window may take is bounded by the
/// chunk size, not by the transactions that commit while it is open (one UPDATE of a
/// whole table inside a window would otherwise note every key of it).
pub(super) fn window_max_keys(chunk_size: u64) -> usize {
    (chunk_size as usize).saturating_mul(20).max(100_000)
}

/// A row's key as the window compares it: the key columns' text, NULL as `None`.
pub(super) type RowKey = Vec<Option<bytes::Bytes>>;

impl Window {
    /// The window a low watermark opens; `start` is its transaction's commit LSN.
    pub(super) fn open(
        job_id: String,
        chunk: u64,
        relid: u32,
        key: Vec<String>,
        start: Lsn,
    ) -> Self {
        Window {
            job_id,
            chunk,
            relid,
            key,
            changed: HashSet::new(),
            truncated: false,
            start,
        }
    }

    /// A TRUNCATE of the window's table: no row of the chunk may be published.
    pub(super) fn note_truncate(&mut self) {
        self.truncated = true;
    }

    /// Whether the chunk's row with this key is published at the high watermark: only
    /// when no live change inside the window touched it (the change, newer, stands for
    /// it) and the table was not truncated meanwhile.
    pub(super) fn keeps(&self, key: &RowKey) -> bool {
        !(self.truncated || self.changed.contains(key))
    }

    /// Notes keys a live change touched; false when the window would hold more than
    /// `max` of them: it is then closed, and its chunk read again (its high watermark
    /// finds no window), which is correct and bounded.
    pub(super) fn note(&mut self, keys: impl IntoIterator<Item = RowKey>, max: usize) -> bool {
        self.changed.extend(keys);
        self.changed.len() <= max
    }
}

/// Where each of a table's columns is among a chunk's columns; None when they are
/// not the same columns.
pub(super) fn column_order(table: &Table, columns: &[String]) -> Option<Vec<usize>> {
    if table.columns.len() != columns.len() {
        return None;
    }
    table
        .columns
        .iter()
        .map(|c| columns.iter().position(|n| n == &c.name))
        .collect()
}

impl Pipeline<'_> {
    /// Publishes a row read from the table (its values as Postgres text, `order`
    /// giving each of the table's columns' place in it) as a `read` event at the next
    /// index of the open transaction. False when the mapping publishes nothing for it.
    pub(super) async fn publish_read(
        &mut self,
        relid: u32,
        row: &mut [Option<String>],
        order: &[usize],
    ) -> Result<bool, SourceError> {
        // Each value is taken, not copied (`order` names each column once).
        let tuple = pgoutput::Tuple(
            order
                .iter()
                .map(|&i| match row.get_mut(i).and_then(Option::take) {
                    Some(v) => pgoutput::ColumnValue::Text(bytes::Bytes::from(v)),
                    None => pgoutput::ColumnValue::Null,
                })
                .collect(),
        );
        let (_, index) = self.next_index()?;
        match self.map_row(index, relid, Operation::Read, None, Some(&tuple))? {
            Some(event) => {
                self.emit(event).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A backfill watermark: the low one opens the chunk's window, the high one
    /// publishes the chunk's rows that no live change touched inside it.
    pub(super) async fn watermark(&mut self, wm: Watermark) -> Result<(), SourceError> {
        if wm.run != self.watermark_run {
            debug!(
                chunk = wm.chunk,
                mark = %wm.mark,
                "watermark of an earlier process passed over"
            );
            return Ok(());
        }
        if wm.mark == "low" {
            let start = self.tx.as_ref().map_or(Lsn::ZERO, |t| t.final_lsn);
            self.window = Some(Window::open(wm.backfill, wm.chunk, wm.relid, wm.key, start));
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
        // A transaction that committed before the low watermark but was not yet
        // visible to the read: its change is before the window, and the chunk's row
        // would stand over it. Read the chunk again.
        if chunk
            .in_progress
            .iter()
            .any(|x| self.recent.committed_before(*x, window.start))
        {
            let _ = reply.send(ChunkOutcome::Retry(
                "a transaction committed before its low watermark was not yet visible to its read"
                    .into(),
            ));
            return Ok(());
        }
        self.ensure_described(chunk.relid).await?;
        // A table renamed since the stream last described it (Postgres describes it
        // again only before its next change; a table built under another name and
        // renamed into place has not changed since) is described from the catalog,
        // which names it as the read did: its rows carry its name now.
        if self
            .table(chunk.relid)
            .is_ok_and(|t| t.schema != chunk.schema || t.name != chunk.table)
        {
            let fresh = self.describe_from_catalog(chunk.relid).await?;
            self.relations.insert(chunk.relid, fresh);
        }
        // The stream's description of the table can be older than the columns the
        // chunk was read with: Postgres sends a table's new description only before
        // its next change, so a column added or dropped with no write since is not in
        // it. The read saw the change, so it committed before this high watermark, and
        // the catalog's description (when it names the chunk's columns) is the one at
        // this point of the stream. The chunk's rows are mapped with it; the stream's
        // is kept for the changes that follow, which Postgres describes itself.
        let mut order = column_order(self.table(chunk.relid)?, &chunk.columns);
        let mut kept_description = None;
        if order.is_none() {
            let fresh = self.describe_from_catalog(chunk.relid).await?;
            order = column_order(&fresh, &chunk.columns);
            if order.is_some() {
                debug!(
                    chunk = wm.chunk,
                    "the chunk's rows are mapped with the catalog's description of the table"
                );
                kept_description = self.relations.insert(chunk.relid, fresh);
            }
        }
        let Some(order) = order else {
            let _ = reply.send(ChunkOutcome::Retry("the table's columns changed".into()));
            return Ok(());
        };
        let key_idx: Vec<Option<usize>> = window
            .key
            .iter()
            .map(|k| chunk.columns.iter().position(|n| n == k))
            .collect();
        // Rows live changes touched inside the window are dropped: the changes, newer,
        // stand for them.
        let keep: Vec<bool> = chunk
            .rows
            .iter()
            .map(|row| {
                let key: RowKey = key_idx
                    .iter()
                    .map(|i| {
                        i.and_then(|i| row.get(i).cloned().flatten())
                            .map(bytes::Bytes::from)
                    })
                    .collect();
                window.keeps(&key)
            })
            .collect();
        // Where the rows go, durably, before any of them is sent (see
        // `backfill::Placement`).
        let (commit_lsn, first_index) = self
            .tx
            .as_ref()
            .map(|t| (t.final_lsn, t.next_index))
            .ok_or_else(|| SourceError::Protocol("watermark outside a transaction".into()))?;
        let placement = Placement {
            job: chunk.job_id.clone(),
            chunk: chunk.chunk,
            run: self.watermark_run.clone(),
            commit_lsn: commit_lsn.to_string(),
            first_index,
            end_index: first_index + keep.iter().filter(|k| **k).count() as u64,
            rows_read: chunk.rows.len() as u64,
            last_key: chunk.last_key.clone(),
            full: chunk.full,
        };
        self.progress
            .put_placement(&chunk.schema, &chunk.table, &placement)
            .await?;
        let (mut published, mut skipped) = (0, 0);
        for (mut row, keep) in chunk.rows.into_iter().zip(keep) {
            if !keep {
                skipped += 1;
                continue;
            }
            if self.publish_read(chunk.relid, &mut row, &order).await? {
                published += 1;
            } else {
                skipped += 1;
            }
        }
        if let Some(described) = kept_description {
            self.relations.insert(chunk.relid, described);
        }
        debug!(
            chunk = wm.chunk,
            published, skipped, "backfill chunk placed"
        );
        self.chunk_in_tx = Some((reply, ChunkOutcome::Stored { published, skipped }));
        Ok(())
    }

    /// Records the keys a live change touched in the open window's table.
    pub(super) fn note_window_change(
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
        let key_of = |t: &pgoutput::Tuple| -> RowKey {
            idx.iter()
                .map(|i| match i.and_then(|i| t.0.get(i)) {
                    Some(pgoutput::ColumnValue::Text(b)) => Some(b.clone()),
                    _ => None,
                })
                .collect()
        };
        let keys: Vec<_> = old.into_iter().chain(new).map(key_of).collect();
        let max = window_max_keys(self.cfg.snapshot_chunk_size);
        if let Some(w) = self.window.as_mut()
            && !w.note(keys, max)
        {
            warn!(
                chunk = w.chunk,
                keys = max,
                "more live changes to the table inside a backfill chunk's window than it may note; the chunk is read again"
            );
            self.window = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> RowKey {
        vec![Some(bytes::Bytes::from(vec![n]))]
    }

    #[test]
    fn a_window_notes_keys_up_to_its_bound() {
        let mut w = Window::open("j".into(), 1, 1, vec!["id".into()], Lsn(1));
        assert!(w.note([key(1), key(2)], 3));
        // The same key again takes no room.
        assert!(w.note([key(2), key(3)], 3));
        assert!(!w.note([key(4)], 3));
        assert_eq!(window_max_keys(1_000), 100_000);
        assert_eq!(window_max_keys(50_000), 1_000_000);
    }

    #[test]
    fn recent_commits_remember_a_bounded_number() {
        let mut r = RecentCommits::new(2);
        r.record(10, Lsn(100));
        r.record(11, Lsn(200));
        assert!(r.committed_before(10, Lsn(150)));
        assert!(!r.committed_before(11, Lsn(150)));
        assert!(!r.committed_before(12, Lsn(150)));
        r.record(12, Lsn(300));
        // The oldest is forgotten.
        assert!(!r.committed_before(10, Lsn(150)));
        assert!(r.committed_before(12, Lsn(301)));
    }

    /// A live change in the model below: the keys it touches and what it does.
    #[derive(Debug, Clone)]
    enum Change {
        Upsert(u8, u16),
        Delete(u8),
        /// An UPDATE of the key: the old and the new key are both touched.
        Rekey(u8, u8),
        Truncate,
    }

    /// What the stream carries, folded by a consumer.
    #[derive(Debug)]
    enum Event {
        Set(u8, u16),
        Del(u8),
        Clear,
    }

    fn change() -> impl proptest::strategy::Strategy<Value = Change> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0u8..24, any::<u16>()).prop_map(|(k, v)| Change::Upsert(k, v)),
            3 => (0u8..24).prop_map(Change::Delete),
            2 => (0u8..24, 0u8..24).prop_map(|(a, b)| Change::Rekey(a, b)),
            1 => Just(Change::Truncate),
        ]
    }

    /// Commits one change: the table moves, the stream gets its events, the open
    /// window (if any) notes its keys; a window past its bound closes.
    fn commit(
        c: &Change,
        table: &mut std::collections::BTreeMap<u8, u16>,
        stream: &mut Vec<Event>,
        window: &mut Option<Window>,
        max: usize,
    ) {
        let touched: Vec<u8> = match *c {
            Change::Upsert(k, v) => {
                table.insert(k, v);
                stream.push(Event::Set(k, v));
                vec![k]
            }
            Change::Delete(k) => {
                if table.remove(&k).is_some() {
                    stream.push(Event::Del(k));
                }
                vec![k]
            }
            Change::Rekey(a, b) => match table.get(&a).copied() {
                // Only when the new key is free (a primary key).
                Some(v) if a != b && !table.contains_key(&b) => {
                    table.remove(&a);
                    table.insert(b, v);
                    stream.push(Event::Del(a));
                    stream.push(Event::Set(b, v));
                    vec![a, b]
                }
                _ => vec![],
            },
            Change::Truncate => {
                table.clear();
                stream.push(Event::Clear);
                if let Some(w) = window.as_mut() {
                    w.note_truncate();
                }
                vec![]
            }
        };
        if let Some(w) = window.as_mut()
            && !w.note(touched.iter().map(|k| key(*k)), max)
        {
            *window = None;
        }
    }

    proptest::proptest! {
        /// DBLog with the real window: chunks of the key space are read between their
        /// low and high watermarks while live changes commit before, inside (before and
        /// after the read) and after each window; a window that closes (past its
        /// bound) has its chunk read again. The stream always folds to the table.
        #[test]
        fn chunks_and_live_changes_fold_to_the_table(
            initial in proptest::collection::btree_map(0u8..24, proptest::prelude::any::<u16>(), 0..24),
            changes in proptest::collection::vec(change(), 0..80),
            gaps in proptest::collection::vec((0usize..3, 0usize..4, 0usize..4), 1..40),
            chunk in 1u8..9,
            max in 1usize..12,
        ) {
            let mut table = initial.clone();
            let mut stream: Vec<Event> = Vec::new();
            let mut changes = changes.into_iter();
            let mut gaps = gaps.into_iter().cycle();
            let mut lo = 0u8;
            let mut tries = 0;
            while lo < 24 {
                tries += 1;
                proptest::prop_assert!(tries < 10_000, "the backfill never ended");
                let hi = lo.saturating_add(chunk).min(24);
                let (before, inside, after) = gaps.next().unwrap_or((0, 0, 0));
                let mut none: Option<Window> = None;
                for c in changes.by_ref().take(before) {
                    commit(&c, &mut table, &mut stream, &mut none, max);
                }
                let mut window = Some(Window::open("j".into(), u64::from(lo), 1, vec!["k".into()], Lsn(1)));
                for c in changes.by_ref().take(inside) {
                    commit(&c, &mut table, &mut stream, &mut window, max);
                }
                let rows: Vec<(u8, u16)> = table.range(lo..hi).map(|(k, v)| (*k, *v)).collect();
                for c in changes.by_ref().take(after) {
                    commit(&c, &mut table, &mut stream, &mut window, max);
                }
                // The high watermark: no window means the chunk is read again.
                let Some(w) = window else { continue };
                for (k, v) in rows {
                    if w.keeps(&key(k)) {
                        stream.push(Event::Set(k, v));
                    }
                }
                lo = hi;
            }
            let mut none: Option<Window> = None;
            for c in changes {
                commit(&c, &mut table, &mut stream, &mut none, max);
            }
            // A consumer that started with the snapshot folds the stream.
            let mut folded = std::collections::BTreeMap::new();
            for e in &stream {
                match *e {
                    Event::Set(k, v) => { folded.insert(k, v); }
                    Event::Del(k) => { folded.remove(&k); }
                    Event::Clear => folded.clear(),
                }
            }
            proptest::prop_assert_eq!(folded, table);
        }
    }
}
