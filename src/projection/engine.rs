//! The projection engine: the one loop over a stream that every read model runs.
//!
//! It owns what every target shares: reading the stream after the checkpoint, the
//! subject filter, parsing (an event that cannot be read is refused with the reason,
//! never skipped in silence), grouping source transactions into database
//! transactions, when to commit, what a refused event means (applied again one
//! transaction at a time, set aside to the dead-letter subject, or the projection
//! stops naming it), metrics, and in a rebuild, when to take the lock and swap.
//!
//! A target only applies events and records positions, behind two traits: [`Target`]
//! opens transactions, [`Tx`] applies into one. The targets are Postgres tables
//! (`postgres.rs`, live and shadow), NATS KV buckets (`kv.rs`, live and a new bucket)
//! and the Rust consumer API (`consumer.rs`).
//!
//! Applying a source transaction never depends on the server's ack wait or ack
//! limits: the stream is read with an ordered consumer (see `read_after`) and the
//! checkpoint lives in the target, so a source transaction of any size streams into
//! one open transaction and nothing is redelivered under it.

use super::*;

/// What a projection is, as the engine needs it.
pub(super) struct Spec<'a> {
    pub(super) name: &'a str,
    pub(super) stream: &'a str,
    /// Subjects it reads (`>`: all of the stream).
    pub(super) subjects: &'a [String],
    /// Where events it cannot apply go; None stops the projection.
    pub(super) dead_letter: Option<&'a str>,
}

impl<'a> From<&'a ProjectionConfig> for Spec<'a> {
    fn from(cfg: &'a ProjectionConfig) -> Spec<'a> {
        Spec {
            name: &cfg.name,
            stream: &cfg.stream,
            subjects: &cfg.subjects,
            dead_letter: cfg.dead_letter.as_deref(),
        }
    }
}

/// One event of the stream, as a target gets it.
pub(super) struct Incoming {
    pub(super) seq: u64,
    pub(super) msg: jetstream::Message,
    /// Whether the projection applies it: its subject is read and it was not set
    /// aside. Targets see the others too (they count for transaction bounds).
    pub(super) wanted: bool,
    /// The envelope (Null for an event the projection does not read and cannot parse).
    pub(super) event: serde_json::Value,
    pub(super) id: String,
    pub(super) event_type: String,
}

impl Incoming {
    /// Whether it ends its source transaction (events without the mark count as whole
    /// transactions).
    pub(super) fn txlast(&self) -> bool {
        self.event["txlast"].as_bool().unwrap_or(true)
    }

    pub(super) fn origin(&self) -> Origin {
        Origin {
            seq: self.seq,
            event_id: self.id.clone(),
            subject: self.msg.subject.to_string(),
            payload: self.msg.payload.clone(),
        }
    }

    pub(super) fn refused(&self, reason: String, whole_txs: usize) -> Refused {
        Refused {
            origin: self.origin(),
            reason,
            whole_txs,
        }
    }
}

/// An event a target cannot apply by its own doing (it would fail again every time).
pub(super) struct Refused {
    pub(super) origin: Origin,
    pub(super) reason: String,
    /// Complete source transactions before it in the open transaction: when there are
    /// some, an atomic target applies again one source transaction at a time, so the
    /// failure is met with everything before it committed.
    pub(super) whole_txs: usize,
}

/// The end of a source transaction: where a target can stand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Position {
    pub(super) seq: u64,
    pub(super) lsn: Option<String>,
}

/// A read model the engine applies to.
#[allow(async_fn_in_trait)]
pub(super) trait Target {
    /// Whether a refused event takes the whole open transaction with it (Postgres:
    /// the engine rolls back and starts again), or only itself (KV: each write stands
    /// alone, and the engine goes on after setting the event aside).
    const ATOMIC: bool;
    type Tx<'a>: Tx
    where
        Self: 'a;
    /// The position to read after.
    fn checkpoint(&self) -> Position;
    /// Opens a transaction. `ProjectionError::Moved` when the checkpoint moved under
    /// the engine (a rebuild was swapped in).
    async fn begin(&mut self) -> Result<Self::Tx<'_>, ProjectionError>;
    /// Nothing came for a while and no transaction is open.
    async fn idle(&mut self) {}
}

/// One open transaction of a target.
#[allow(async_fn_in_trait)]
pub(super) trait Tx {
    /// Applies an event (or sends it: answers may come later). Returns the events
    /// refused so far, in stream order.
    async fn apply(&mut self, event: Incoming) -> Result<Vec<Refused>, ProjectionError>;
    /// Waits until everything applied so far is answered; the events refused.
    async fn settle(&mut self) -> Result<Vec<Refused>, ProjectionError>;
    /// Complete source transactions applied in this transaction so far.
    fn whole_txs(&self) -> usize;
    /// Makes everything applied durable with the position `at` (settled first).
    /// `urgent`: the reader waits for this position (caught up, or a sync event).
    async fn commit(self, at: &Position, urgent: bool) -> Result<(), ProjectionError>;
    /// Rolls back what is open (an atomic target, after a refused event).
    async fn abort(&mut self) -> Result<(), ProjectionError> {
        Ok(())
    }
    /// Rebuild: commits what is open and holds the projection's lock, so the live
    /// projection applies nothing more until the swap. False for a target that
    /// swaps without a lock.
    async fn lock(&mut self) -> Result<bool, ProjectionError> {
        Ok(false)
    }
    /// Rebuild: swaps the rebuilt model in at `at` (settled first). False when it
    /// cannot yet (the live model is further); the rebuild goes on and tries again.
    async fn swap(&mut self, _at: &Position, _events: u64) -> Result<bool, ProjectionError> {
        Ok(false)
    }
}

/// The live mode's state, kept across attempts by the caller.
pub(super) struct Live<'a> {
    pub(super) cancel: &'a CancellationToken,
    /// Events sent to the dead-letter subject, passed over until committed past.
    pub(super) set_aside: &'a mut HashSet<u64>,
    /// Commit after each source transaction up to this stream sequence (a failure
    /// is being isolated).
    pub(super) careful_until: u64,
    pub(super) tel: Option<&'a crate::telemetry::Telemetry>,
}

/// How the engine runs: live (until cancelled, from the checkpoint), or a rebuild (from
/// the start of the stream, until swapped in).
pub(super) enum Mode<'a> {
    Live(Live<'a>),
    Rebuild(&'a mut (dyn FnMut(u64, u64) + Send)),
}

/// How far behind the stream's end a rebuild may be when it takes the projection's
/// lock (or tries to swap): what it applies while the live model waits.
pub(super) const CATCH_UP: u64 = 500;

/// Events applied between commits, at most (a source transaction is never split).
pub(super) const COMMIT_EVERY: usize = 5000;

/// How long a live transaction stays open at most while catching up (committed at the
/// next source transaction's end): a read model behind the stream still moves on to
/// its readers every second, not only every `COMMIT_EVERY` events.
pub(super) const COMMIT_AFTER: Duration = Duration::from_secs(1);

enum Next {
    Message(Box<jetstream::Message>),
    Idle,
    Cancelled,
}

/// Runs the engine over `target` until cancelled (live: `Ok(None)`), swapped in
/// (rebuild: the stats), or an error: one the caller retries after (a lost connection,
/// or a restart the engine asks for: set aside, isolate, moved) or one that stops.
pub(super) async fn run<T: Target>(
    spec: &Spec<'_>,
    js: &jetstream::Context,
    target: &mut T,
    mode: Mode<'_>,
) -> Result<Option<RebuildStats>, ProjectionError> {
    let done = target.checkpoint();
    let messages = read_after(js, spec.stream, spec.name, done.seq)
        .await
        .map_err(nats_error(spec.name, "read the stream"))?;
    let mut engine = Engine {
        spec,
        js,
        mode,
        done,
        messages,
        events: 0,
        until: None,
        started: Instant::now(),
        label: crate::telemetry::ProjectionLabel {
            projection: spec.name.to_string(),
        },
    };
    engine.run(target).await
}

struct Engine<'a, 'm> {
    spec: &'a Spec<'a>,
    js: &'a jetstream::Context,
    mode: Mode<'m>,
    /// The last position committed.
    done: Position,
    messages: pull::Ordered,
    /// Events applied (for a rebuild's report).
    events: u64,
    /// Rebuild, once the lock is held: the stream sequence to apply through before
    /// swapping.
    until: Option<u64>,
    started: Instant,
    label: crate::telemetry::ProjectionLabel,
}

/// What happens after an event.
enum Then {
    /// Keep the transaction open.
    Go,
    /// The transaction was committed.
    Committed,
    /// The rebuild was swapped in.
    Swapped,
}

impl Engine<'_, '_> {
    async fn run<T: Target>(
        &mut self,
        target: &mut T,
    ) -> Result<Option<RebuildStats>, ProjectionError> {
        loop {
            // Nothing open: wait for the next event past the checkpoint.
            let msg = match self.next().await? {
                Next::Cancelled => return Ok(None),
                Next::Message(m) => *m,
                Next::Idle => {
                    if matches!(self.mode, Mode::Rebuild(_)) {
                        // Quiet, and everything read is committed: swap.
                        let mut tx = target.begin().await?;
                        let at = self.done.clone();
                        if self.near_end::<T>(&mut tx, &at, at.seq).await? {
                            return Ok(Some(self.stats()));
                        }
                        tx.commit(&at, false).await?;
                    } else {
                        target.idle().await;
                    }
                    continue;
                }
            };
            if self.seq_of(&msg)?.0 <= self.done.seq {
                continue;
            }
            let mut tx = target.begin().await?;
            let opened = Instant::now();
            let mut next = Some(msg);
            // The last event applied, when it ended its source transaction.
            let mut last_end: Option<Position> = None;
            let mut in_tx = 0usize;
            loop {
                let msg = match next.take() {
                    Some(m) => m,
                    None => match self.next().await? {
                        Next::Cancelled => return Ok(None),
                        Next::Message(m) => *m,
                        Next::Idle => {
                            // Quiet at a transaction's end: commit, or swap.
                            let Some(at) = last_end.clone() else {
                                continue;
                            };
                            if matches!(self.mode, Mode::Rebuild(_)) {
                                // Locked and quiet: what was stored when the lock
                                // was taken is applied; swap here.
                                if self.until.is_some() {
                                    self.until = Some(at.seq);
                                }
                                if self.near_end::<T>(&mut tx, &at, at.seq).await? {
                                    return Ok(Some(self.stats()));
                                }
                                continue;
                            }
                            let refused = tx.settle().await?;
                            self.refused::<T, _>(&mut tx, refused).await?;
                            tx.commit(&at, true).await?;
                            self.committed(&at, 0, in_tx);
                            break;
                        }
                    },
                };
                let (seq, pending) = self.seq_of(&msg)?;
                if seq <= self.done.seq {
                    continue;
                }
                let event = self.read::<T>(&mut tx, msg, seq).await?;
                let end = event.txlast().then(|| Position {
                    seq,
                    lsn: event.event["commitlsn"].as_str().map(str::to_string),
                });
                let urgent = event.event_type == "tidemark.sync";
                let refused = tx.apply(event).await?;
                self.refused::<T, _>(&mut tx, refused).await?;
                in_tx += 1;
                self.events += 1;
                if let Mode::Rebuild(progress) = &mut self.mode {
                    progress(seq, seq + pending);
                }
                // Only a transaction's end is a place to commit or swap at when
                // nothing more comes: an open source transaction's events after it are
                // in the database transaction too.
                last_end = end.clone();
                let Some(at) = end else {
                    continue;
                };
                match self
                    .at_tx_end::<T>(&mut tx, &at, pending, in_tx, opened)
                    .await?
                {
                    Then::Go => {}
                    Then::Swapped => return Ok(Some(self.stats())),
                    Then::Committed => {
                        tx.commit(&at, pending == 0 || urgent).await?;
                        self.committed(&at, pending, in_tx);
                        break;
                    }
                }
            }
        }
    }

    /// Decides at a source transaction's end: keep the transaction open, commit it
    /// (the caller does), or, rebuilding near the stream's end, lock and swap.
    async fn at_tx_end<T: Target>(
        &mut self,
        tx: &mut T::Tx<'_>,
        at: &Position,
        pending: u64,
        in_tx: usize,
        opened: Instant,
    ) -> Result<Then, ProjectionError> {
        match &self.mode {
            Mode::Live(live) => {
                let careful = at.seq <= live.careful_until;
                let old = opened.elapsed() >= COMMIT_AFTER;
                if pending == 0 || in_tx >= COMMIT_EVERY || careful || old {
                    let refused = tx.settle().await?;
                    self.refused::<T, _>(tx, refused).await?;
                    return Ok(Then::Committed);
                }
                Ok(Then::Go)
            }
            Mode::Rebuild(_) => {
                if let Some(until) = self.until {
                    if at.seq >= until && self.near_end::<T>(tx, at, until).await? {
                        return Ok(Then::Swapped);
                    }
                    return Ok(Then::Go);
                }
                if pending <= CATCH_UP {
                    if self.near_end::<T>(tx, at, at.seq + pending).await? {
                        return Ok(Then::Swapped);
                    }
                    return Ok(Then::Go);
                }
                if in_tx >= COMMIT_EVERY {
                    let refused = tx.settle().await?;
                    self.refused::<T, _>(tx, refused).await?;
                    return Ok(Then::Committed);
                }
                Ok(Then::Go)
            }
        }
    }

    /// A commit in live mode: the metrics, and set-aside events committed past.
    fn committed(&mut self, at: &Position, pending: u64, in_tx: usize) {
        self.done = at.clone();
        if let Mode::Live(live) = &mut self.mode {
            live.set_aside.retain(|s| *s > at.seq);
            if let Some(tel) = live.tel {
                tel.projection_applied_seq
                    .get_or_create(&self.label)
                    .set(at.seq as i64);
                tel.projection_behind
                    .get_or_create(&self.label)
                    .set(pending as i64);
                tel.projection_events
                    .get_or_create(&self.label)
                    .inc_by(in_tx as u64);
            }
        }
    }

    /// Rebuild, at a transaction's end near the stream's end: takes the lock (a
    /// target with one), then swaps once everything through `until` is applied.
    async fn near_end<T: Target>(
        &mut self,
        tx: &mut T::Tx<'_>,
        at: &Position,
        until: u64,
    ) -> Result<bool, ProjectionError> {
        let refused = tx.settle().await?;
        self.refused::<T, _>(tx, refused).await?;
        if self.until.is_none() && tx.lock().await? {
            self.until = Some(until);
            self.started = Instant::now();
        }
        if self.until.is_some_and(|u| at.seq < u) {
            return Ok(false);
        }
        if tx.swap(at, self.events).await? {
            self.done = at.clone();
            return Ok(true);
        }
        Ok(false)
    }

    fn stats(&self) -> RebuildStats {
        RebuildStats {
            events: self.events,
            seq: self.done.seq,
            swap_ms: self.started.elapsed().as_millis(),
        }
    }

    /// An event read: parsed, filtered; one the projection reads and cannot parse is
    /// refused here (after the answers to what was sent before it).
    async fn read<T: Target>(
        &mut self,
        tx: &mut T::Tx<'_>,
        msg: jetstream::Message,
        seq: u64,
    ) -> Result<Incoming, ProjectionError> {
        let set_aside = match &self.mode {
            Mode::Live(live) => live.set_aside.contains(&seq),
            Mode::Rebuild(_) => false,
        };
        let wanted = !set_aside && reads(self.spec.subjects, &msg.subject);
        let mut event = Incoming {
            seq,
            msg,
            wanted,
            event: serde_json::Value::Null,
            id: String::new(),
            event_type: String::new(),
        };
        match parse_event(&event.msg.payload) {
            Ok((e, id, ty)) => (event.event, event.id, event.event_type) = (e, id, ty),
            // An event this projection does not read need not parse.
            Err(_) if !wanted => {}
            Err(reason) => {
                let mut refused = tx.settle().await?;
                event.id = "(unreadable)".into();
                refused.push(event.refused(reason, tx.whole_txs()));
                self.refused::<T, _>(tx, refused).await?;
                // Set aside: it counts for the transaction bounds only.
                event.id.clear();
                event.wanted = false;
            }
        }
        Ok(event)
    }

    /// What refused events mean. Live, in an atomic target: the transaction is rolled
    /// back, and the first refused event is isolated (applied again one source
    /// transaction at a time), set aside to the dead-letter subject, or named as the
    /// reason the projection stops. Live, in a target that is not atomic: each is set
    /// aside, or the first stops the projection. Rebuilding: the live projection set
    /// them aside already when a dead-letter subject is set, so they are passed over;
    /// otherwise the first stops the rebuild.
    async fn refused<T: Target, X: Tx>(
        &mut self,
        tx: &mut X,
        refused: Vec<Refused>,
    ) -> Result<(), ProjectionError> {
        let Some(first) = refused.first() else {
            return Ok(());
        };
        let name = self.spec.name;
        let live = match &mut self.mode {
            Mode::Live(live) => live,
            Mode::Rebuild(_) => {
                if self.spec.dead_letter.is_some() {
                    for r in &refused {
                        debug!(seq = r.origin.seq, reason = %r.reason, "passed over (the live projection set it aside)");
                    }
                    return Ok(());
                }
                let first = refused.into_iter().next().map(|r| (r.origin, r.reason));
                let (origin, reason) = first.unwrap_or_else(|| unreachable_refusal(name));
                return Err(origin.poison(name, reason));
            }
        };
        if T::ATOMIC {
            tx.abort().await?;
            if first.whole_txs > 0 {
                return Err(ProjectionError::Isolate(first.origin.seq));
            }
        }
        for r in refused {
            let Some(subject) = self.spec.dead_letter else {
                return Err(r.origin.poison(name, r.reason));
            };
            dead_letter(self.js, name, subject, &r.origin, &r.reason).await?;
            warn!(event_id = %r.origin.event_id, seq = r.origin.seq, dead_letter = %subject, reason = %r.reason, "event set aside to the dead-letter subject");
            if T::ATOMIC {
                live.set_aside.insert(r.origin.seq);
                return Err(ProjectionError::SetAside(r.origin.seq));
            }
        }
        Ok(())
    }

    /// The next message, or idle, or cancelled (live).
    async fn next(&mut self) -> Result<Next, ProjectionError> {
        let wait = if self.until.is_some() {
            Duration::from_millis(200)
        } else {
            IDLE
        };
        let read = tokio::time::timeout(wait, self.messages.next());
        let next = match &self.mode {
            Mode::Live(live) => tokio::select! {
                biased;
                _ = live.cancel.cancelled() => return Ok(Next::Cancelled),
                n = read => n,
            },
            Mode::Rebuild(_) => read.await,
        };
        let err = nats_error(self.spec.name, "read events");
        match next {
            Err(_) => Ok(Next::Idle),
            Ok(Some(Ok(m))) => Ok(Next::Message(Box::new(m))),
            Ok(Some(Err(e))) => Err(err(Box::new(e))),
            Ok(None) => Err(err("the stream's consumer ended".into())),
        }
    }

    /// A message's stream sequence and how many are stored after it.
    fn seq_of(&self, msg: &jetstream::Message) -> Result<(u64, u64), ProjectionError> {
        let info = msg
            .info()
            .map_err(|e| nats_error(self.spec.name, "read message info")(e))?;
        Ok((info.stream_sequence, info.pending))
    }
}

/// A refusal list the caller found non-empty is never empty; named all the same.
fn unreachable_refusal(name: &str) -> (Origin, String) {
    (
        Origin {
            seq: 0,
            event_id: "-".into(),
            subject: "-".into(),
            payload: bytes::Bytes::new(),
        },
        format!("projection {name}: an event was refused without a reason"),
    )
}
