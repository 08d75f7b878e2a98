//! `tidemark replay`: reads a source's event log (its JetStream stream) from a position
//! to a position and writes the events as JSON lines on stdout.
//!
//! A position is a commit LSN, a stream sequence or a commit time. LSN and time
//! positions are located by binary search over stream sequences (`Bisect`, pure), so
//! finding the start of a replay reads O(log n) messages, not the stream. The number of
//! reads is reported in the summary on stderr. Stdout carries only events.

use std::io::Write;

use futures_util::StreamExt;
use time::OffsetDateTime;

use crate::config::{NatsConfig, SourceConfig};
use crate::jetstream::provision;
use crate::position::{EventId, Lsn};

/// Where a replay starts or stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// The first event whose commit LSN is at or after this one.
    Lsn(Lsn),
    /// A stream sequence.
    Seq(u64),
    /// The first event committed at or after this time.
    Time(OffsetDateTime),
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Nats(#[from] provision::ProvisionError),
    #[error("stream {stream:?}: {message}")]
    Stream { stream: String, message: String },
    #[error("stream {stream:?} is empty: there is nothing to replay")]
    Empty { stream: String },
    #[error("{position} is before the oldest stored event (sequence {first_seq}{}): retention removed older events; start at or after it", .first_lsn.map(|l| format!(", commit LSN {l}")).unwrap_or_default())]
    BeforeOldest {
        position: String,
        first_seq: u64,
        first_lsn: Option<Lsn>,
    },
    #[error("{position} is after the newest stored event (sequence {last_seq}{}): nothing to replay yet", .last_lsn.map(|l| format!(", commit LSN {l}")).unwrap_or_default())]
    AfterNewest {
        position: String,
        last_seq: u64,
        last_lsn: Option<Lsn>,
    },
    #[error(
        "the replay range is empty: it ends (sequence {end}) before it starts (sequence {start})"
    )]
    EmptyRange { start: u64, end: u64 },
    #[error("message {seq} of stream {stream:?} is not a tidemark event ({reason})")]
    NotAnEvent {
        stream: String,
        seq: u64,
        reason: String,
    },
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Lsn(l) => write!(f, "LSN {l}"),
            Position::Seq(s) => write!(f, "sequence {s}"),
            Position::Time(t) => write!(
                f,
                "time {}",
                t.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_else(|_| t.to_string())
            ),
        }
    }
}

/// Binary search for the first sequence in `[lo, hi]` whose event is at or after a
/// position. Pure: the caller reads the message `probe()` names and reports with
/// `record()`. Finishes after at most ⌈log2(hi - lo + 1)⌉ + 1 probes.
#[derive(Debug, Clone)]
pub struct Bisect {
    lo: u64,
    /// One past the last candidate: `hi + 1` means "no event qualifies".
    hi: u64,
}

impl Bisect {
    pub fn new(lo: u64, hi: u64) -> Self {
        Bisect { lo, hi: hi + 1 }
    }

    /// The sequence to read next, or None when the search is done.
    pub fn probe(&self) -> Option<u64> {
        (self.lo < self.hi).then(|| self.lo + (self.hi - self.lo) / 2)
    }

    /// Reports whether the event at `seq` is at or after the position.
    pub fn record(&mut self, seq: u64, at_or_after: bool) {
        if at_or_after {
            self.hi = seq;
        } else {
            self.lo = seq + 1;
        }
    }

    /// The answer: the first qualifying sequence, or `hi + 1` of the range when none.
    pub fn result(&self) -> u64 {
        self.lo
    }
}

/// Which events a replay emits. Subjects (with NATS wildcards) filter on the server;
/// event types and tables are checked on each event.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub subjects: Vec<String>,
    pub types: Vec<String>,
    /// Qualified names, `schema.table`.
    pub tables: Vec<String>,
}

impl Filter {
    /// Adds a table; a bare name means `public.<name>`.
    pub fn add_table(&mut self, name: &str) {
        if name.contains('.') {
            self.tables.push(name.to_string());
        } else {
            self.tables.push(format!("public.{name}"));
        }
    }

    fn matches(&self, payload: &[u8]) -> bool {
        if self.types.is_empty() && self.tables.is_empty() {
            return true;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return false;
        };
        let type_ok = self.types.is_empty()
            || v["type"]
                .as_str()
                .is_some_and(|t| self.types.iter().any(|x| x == t));
        let table_ok = self.tables.is_empty()
            || v["data"]["table"]
                .as_str()
                .is_some_and(|t| self.tables.iter().any(|x| x == t));
        type_ok && table_ok
    }
}

/// Where replayed events go.
pub enum Sink<'a> {
    /// Each event's JSON on its own line.
    Lines(&'a mut (dyn Write + Send)),
    /// One human-readable line per event.
    Pretty(&'a mut (dyn Write + Send)),
    /// Published again under `<prefix>.<original subject>`.
    Republish(Box<Republisher>),
}

/// Republishes events under a subject prefix, exactly once: the target stream's last
/// republished event says where a previous run stopped (events at or below it are
/// skipped, the pipeline's own rule), and `Nats-Msg-Id` (the original event id) lets
/// the server's duplicate window catch anything else.
pub struct Republisher {
    js: async_nats::jetstream::Context,
    prefix: String,
    last: Option<(Lsn, u64)>,
    in_flight: std::collections::VecDeque<async_nats::jetstream::context::PublishAckFuture>,
    pub published: u64,
    pub skipped: u64,
}

const REPUBLISH_WINDOW: usize = 256;

impl Republisher {
    /// Finds the stream that captures `<prefix>.>` and what it already holds.
    pub async fn new(nats: &NatsConfig, prefix: &str, source: &str) -> Result<Self, ReplayError> {
        let client = provision::connect(nats, "tidemark-republish").await?;
        let js = async_nats::jetstream::new(client);
        let err = |message: String| ReplayError::Stream {
            stream: format!("{prefix}.>"),
            message,
        };
        let name = js
            .stream_by_subject(format!("{prefix}.{source}.republish"))
            .await
            .map_err(|e| {
                err(format!(
                    "no stream captures {prefix}.>: create one first ({e})"
                ))
            })?;
        let mut stream = js.get_stream(&name).await.map_err(|e| err(e.to_string()))?;
        let state = stream
            .info()
            .await
            .map_err(|e| err(e.to_string()))?
            .state
            .clone();
        let mut last = None;
        if state.messages > 0 {
            let m = stream
                .get_raw_message(state.last_sequence)
                .await
                .map_err(|e| err(e.to_string()))?;
            if m.subject.starts_with(&format!("{prefix}.")) {
                last = provision::msg_id(&m.headers)
                    .and_then(|v| v.parse::<EventId>().ok())
                    .filter(|id| id.source == source)
                    .map(|id| id.position());
            }
        }
        Ok(Republisher {
            js,
            prefix: prefix.to_string(),
            last,
            in_flight: Default::default(),
            published: 0,
            skipped: 0,
        })
    }

    async fn publish(
        &mut self,
        subject: &str,
        id: &str,
        payload: bytes::Bytes,
    ) -> Result<(), ReplayError> {
        let err = |message: String| ReplayError::Stream {
            stream: format!("{}.>", self.prefix),
            message,
        };
        if let (Some(last), Ok(eid)) = (self.last, id.parse::<EventId>())
            && eid.position() <= last
        {
            self.skipped += 1;
            return Ok(());
        }
        let ack = self
            .js
            .send_publish(
                format!("{}.{subject}", self.prefix),
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(payload)
                    .message_id(id),
            )
            .await
            .map_err(|e| err(format!("republish {id}: {e}")))?;
        self.in_flight.push_back(ack);
        self.published += 1;
        if self.in_flight.len() >= REPUBLISH_WINDOW {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), ReplayError> {
        if let Some(ack) = self.in_flight.pop_front() {
            ack.await.map_err(|e| ReplayError::Stream {
                stream: format!("{}.>", self.prefix),
                message: format!("republish not acknowledged: {e}"),
            })?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), ReplayError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }
}

impl Sink<'_> {
    async fn write(
        &mut self,
        m: &async_nats::jetstream::Message,
        seq: u64,
    ) -> Result<(), ReplayError> {
        match self {
            Sink::Lines(out) => {
                out.write_all(&m.payload).map_err(ReplayError::Stdout)?;
                out.write_all(b"\n").map_err(ReplayError::Stdout)
            }
            Sink::Pretty(out) => {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                let line = format!(
                    "#{seq:<8} {:<27} {:<24} {:<28} key={}\n",
                    v["time"].as_str().unwrap_or("-"),
                    v["type"].as_str().unwrap_or("-"),
                    v["id"].as_str().unwrap_or("-"),
                    v["data"]["key"]
                );
                out.write_all(line.as_bytes()).map_err(ReplayError::Stdout)
            }
            Sink::Republish(r) => {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(provision::msg_id)
                    .unwrap_or_default()
                    .to_string();
                r.publish(m.subject.as_str(), &id, m.payload.clone()).await
            }
        }
    }

    async fn flush(&mut self, live: bool) -> Result<(), ReplayError> {
        match self {
            Sink::Lines(out) | Sink::Pretty(out) => out.flush().map_err(ReplayError::Stdout),
            Sink::Republish(r) if !live => r.finish().await,
            Sink::Republish(_) => Ok(()),
        }
    }
}

/// What a replay did, for the summary line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayStats {
    /// Messages read to locate the start and end positions.
    pub probes: u64,
    pub emitted: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// The facts of one stored event a search compares.
struct Probe {
    lsn: Lsn,
    time: Option<OffsetDateTime>,
}

struct Log {
    stream: async_nats::jetstream::stream::Stream,
    name: String,
    probes: u64,
}

impl Log {
    async fn read(&mut self, seq: u64) -> Result<Probe, ReplayError> {
        self.probes += 1;
        let msg = self
            .stream
            .get_raw_message(seq)
            .await
            .map_err(|e| ReplayError::Stream {
                stream: self.name.clone(),
                message: format!("read message {seq}: {e}"),
            })?;
        let not_event = |reason: String| ReplayError::NotAnEvent {
            stream: self.name.clone(),
            seq,
            reason,
        };
        let id =
            provision::msg_id(&msg.headers).ok_or_else(|| not_event("no Nats-Msg-Id".into()))?;
        let id: EventId = id.parse().map_err(|e| not_event(format!("{e}")))?;
        let time = serde_json::from_slice::<serde_json::Value>(&msg.payload)
            .ok()
            .and_then(|v| {
                v["time"].as_str().and_then(|t| {
                    OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
                })
            });
        Ok(Probe {
            lsn: id.commit_lsn,
            time,
        })
    }

    /// The first sequence in `[lo, hi]` at or after `pos` (`hi + 1` when none).
    async fn locate(&mut self, pos: &Position, lo: u64, hi: u64) -> Result<u64, ReplayError> {
        if let Position::Seq(s) = pos {
            return Ok(*s);
        }
        let mut b = Bisect::new(lo, hi);
        while let Some(seq) = b.probe() {
            let p = self.read(seq).await?;
            let at_or_after = match pos {
                Position::Lsn(l) => p.lsn >= *l,
                // An event without a readable time sorts first: never skip past it.
                Position::Time(t) => p.time.is_none_or(|pt| pt >= *t),
                Position::Seq(_) => unreachable!("handled above"),
            };
            b.record(seq, at_or_after);
        }
        Ok(b.result())
    }
}

/// Replays events from `from` (default: the oldest stored) up to `to` (inclusive;
/// default: the newest stored) as JSON lines on `out`.
pub async fn replay(
    source: &SourceConfig,
    nats: &NatsConfig,
    from: Option<&Position>,
    to: Option<&Position>,
    filter: &Filter,
    follow: bool,
    out: &mut Sink<'_>,
) -> Result<ReplayStats, ReplayError> {
    let client = provision::connect(nats, "tidemark-replay").await?;
    let js = async_nats::jetstream::new(client);
    let name = source.stream.name.clone();
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| ReplayError::Stream {
            stream: name.clone(),
            message: e.to_string(),
        })?;
    let state = stream
        .info()
        .await
        .map_err(|e| ReplayError::Stream {
            stream: name.clone(),
            message: e.to_string(),
        })?
        .state
        .clone();
    if state.messages == 0 {
        return Err(ReplayError::Empty { stream: name });
    }
    let (first, last) = (state.first_sequence, state.last_sequence);
    let mut log = Log {
        stream,
        name: name.clone(),
        probes: 0,
    };

    // Start. A position before the first stored event is an error only when retention
    // removed events (first > 1); otherwise the replay starts at the first event.
    let Some(from) = from else {
        return emit(&mut log, first, last, to, filter, follow, out).await;
    };
    let start = log.locate(from, first, last).await?;
    if first > 1 {
        let oldest = log.read(first).await?;
        let before_oldest = match from {
            Position::Seq(s) => *s < first,
            Position::Lsn(l) => oldest.lsn > *l,
            Position::Time(t) => oldest.time.is_some_and(|ot| ot > *t),
        };
        if before_oldest {
            return Err(ReplayError::BeforeOldest {
                position: from.to_string(),
                first_seq: first,
                first_lsn: Some(oldest.lsn),
            });
        }
    }
    let start = start.max(first);
    if start > last {
        let last_lsn = log.read(last).await.ok().map(|p| p.lsn);
        return Err(ReplayError::AfterNewest {
            position: from.to_string(),
            last_seq: last,
            last_lsn,
        });
    }
    emit(&mut log, start, last, to, filter, follow, out).await
}

/// Finds the end (the last event at or before `to`) and writes the matching events of
/// `start..=end`, or from `start` on for `follow`.
async fn emit(
    log: &mut Log,
    start: u64,
    last: u64,
    to: Option<&Position>,
    filter: &Filter,
    follow: bool,
    out: &mut Sink<'_>,
) -> Result<ReplayStats, ReplayError> {
    let name = log.name.clone();
    let end = match to {
        None => last,
        Some(Position::Seq(s)) => (*s).min(last),
        // The first event strictly after `to`, minus one.
        Some(Position::Lsn(l)) => {
            log.locate(&Position::Lsn(Lsn(l.0.saturating_add(1))), start, last)
                .await?
                - 1
        }
        Some(Position::Time(t)) => {
            let next = log
                .locate(
                    &Position::Time(*t + time::Duration::nanoseconds(1)),
                    start,
                    last,
                )
                .await?;
            next - 1
        }
    };
    if end < start {
        return Err(ReplayError::EmptyRange { start, end });
    }

    let mut consumer = log
        .stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            filter_subjects: filter.subjects.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| ReplayError::Stream {
            stream: name.clone(),
            message: format!("create consumer: {e}"),
        })?;
    let pending = consumer
        .info()
        .await
        .map_err(|e| ReplayError::Stream {
            stream: name.clone(),
            message: format!("consumer info: {e}"),
        })?
        .num_pending;
    let mut messages = consumer.messages().await.map_err(|e| ReplayError::Stream {
        stream: name.clone(),
        message: format!("consume: {e}"),
    })?;
    let mut stats = ReplayStats {
        probes: log.probes,
        first_seq: start,
        last_seq: start,
        ..Default::default()
    };
    // With a subject filter the last match may come before `end`: stop when the
    // consumer has nothing more pending rather than waiting for a later match.
    if pending == 0 && !follow {
        return Ok(stats);
    }
    // A bar on stderr for long bounded replays; indicatif draws nothing when stderr is
    // not a terminal, so pipes and logs stay clean.
    let bar = if follow {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(end - start + 1),
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {human_pos}/{human_len} events, eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    };
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| ReplayError::Stream {
            stream: name.clone(),
            message: format!("read: {e}"),
        })?;
        let (seq, remaining) = m
            .info()
            .map(|i| (i.stream_sequence, i.pending))
            .unwrap_or((0, 0));
        if seq > end && !follow {
            break;
        }
        if filter.matches(&m.payload) {
            out.write(&m, seq).await?;
            if follow {
                out.flush(true).await?;
            }
            stats.emitted += 1;
        }
        stats.last_seq = seq;
        bar.set_position(seq - start + 1);
        if !follow && (seq >= end || remaining == 0) {
            break;
        }
    }
    bar.finish_and_clear();
    out.flush(false).await?;
    Ok(stats)
}

#[cfg(test)]
mod tests;
