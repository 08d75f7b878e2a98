//! The publisher: ordered, pipelined, gap-free publishes into one stream.
//!
//! Publishes are pipelined: up to `window` are in flight, and acks are awaited in
//! order (JetStream handles one connection's publishes in order, so acks come back in
//! order). Each publish carries `Nats-Msg-Id` (the event id, for the server's duplicate
//! window) and `Nats-Expected-Last-Sequence` (the sequence the stream must have right
//! before it). Because this publisher is the stream's only writer, the k-th publish
//! after start expects exactly `tail + k - 1`; if one publish is lost or rejected,
//! every one behind it is rejected too, so the stream can never hold a gap.
//!
//! We chain on sequences rather than on `Nats-Expected-Last-Msg-Id`: both make a gap
//! impossible, but the sequence check is the stricter (it also catches any foreign
//! write) and does not depend on the server remembering the last message id.
//!
//! DESIGN: not every publish asks for an ack. Because of the chain, an ack that says
//! "stored at sequence s, as expected" proves that every publish before it was stored
//! at its own expected sequence: one that was refused (or taken as a duplicate) leaves
//! the stream short, and every later publish is refused for the wrong last sequence.
//! So a run of publishes needs only its last one to carry a reply subject. The server
//! then builds and sends one ack per run, and the client keeps one ack future per run,
//! instead of one per event (on a backlog, that was a third of the server's work and
//! most of the client's per-event bookkeeping). A publish asks for its ack when:
//! - it is the `group`-th without one, so acks keep flowing under a backlog;
//! - it fills the window, so the window can always be freed by an ack that will come;
//! - the publisher is careful (one at a time, see `set_careful`);
//! - or nothing follows it for now. For that, the newest publish is held back
//!   (`deferred`) until the next one is sent, or until the caller says the input is
//!   idle (`flush`), or needs acks (`make_room`, settling): then it goes out with a
//!   reply subject. Holding one publish back costs no latency: the source loop flushes
//!   as soon as nothing else is ready.
//!
//! A refused publish without a reply subject fails the next ack (wrong last sequence),
//! and with it the run: the pipeline rebuilds from the stream's tail, as for any other.
//!
//! The publisher neither spawns nor reads signals; the pipeline drives it.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::str::FromStr as _;
use std::time::Duration;

use async_nats::jetstream::context::PublishError as NatsPublishError;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, Context};

use crate::events::mapping::DomainEvent;
use crate::jetstream::disruption::{self, Disruptions};
use crate::position::EventId;
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publish of event {event_id} to {subject} failed")]
    Send {
        event_id: EventId,
        subject: String,
        #[source]
        source: NatsPublishError,
    },
    #[error("JetStream did not store event {event_id}")]
    Ack {
        event_id: EventId,
        #[source]
        source: NatsPublishError,
    },
    #[error(
        "JetStream stored event {event_id} at sequence {got}, expected {expected}: another writer touched stream {stream:?}"
    )]
    OutOfSequence {
        event_id: EventId,
        stream: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "JetStream reported event {event_id} as a duplicate: it was already stored, so the pipeline rebuilds from the stream's tail"
    )]
    Duplicate { event_id: EventId },
    #[error(
        "the ack of event {event_id} may be lost ({in_flight} publishes in flight): the NATS connection dropped or the stream got a new leader after it was sent, so the pipeline resends from the stream's tail"
    )]
    Disrupted { event_id: EventId, in_flight: usize },
    /// A publish that asks for no ack (a run's, or an atomic batch's message).
    #[error("sending event {event_id} to {subject} failed: {reason}")]
    Unanswered {
        event_id: EventId,
        subject: String,
        reason: String,
    },
    #[error(
        "event {event_id} for {table} (key {key}) is {size} bytes, over max_event_bytes = {limit}: raise max_event_bytes (and the NATS max_payload), or in the table's [[source.table]] mapping exclude the large column or set oversized = \"omit\" or \"truncate\" with oversized_columns"
    )]
    Oversized {
        event_id: EventId,
        table: String,
        key: String,
        size: usize,
        limit: usize,
    },
    #[error(
        "event {event_id} for {table} (key {key}) is {size} bytes with {headers} bytes of headers, over the NATS server's max_payload = {max_payload}: lower max_event_bytes below max_payload less the headers (outbox headers count), or raise max_payload in the nats-server config"
    )]
    OversizedOnWire {
        event_id: EventId,
        table: String,
        key: String,
        size: usize,
        headers: usize,
        max_payload: usize,
    },
}

/// An upper bound of the header bytes a publish of `event` carries on the wire: its
/// user headers, `Nats-Msg-Id`, and room for the chain and batch headers.
pub fn header_bytes(event: &DomainEvent) -> usize {
    // "NATS/1.0\r\n" and the closing "\r\n".
    const FRAME: usize = 12;
    // Nats-Expected-Last-Sequence, Nats-Batch-Id, -Sequence and -Commit at their
    // longest, each as "name: value\r\n".
    const CHAIN_AND_BATCH: usize = 48 + 40 + 42 + 22;
    let user: usize = event
        .headers
        .iter()
        .map(|(n, v)| n.len() + v.len() + 4)
        .sum();
    FRAME + CHAIN_AND_BATCH + "Nats-Msg-Id: \r\n".len() + event.msg_id.len() + user
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, NatsPublishError>> + Send>>;

/// One publish awaiting its ack, with the publishes before it that asked for none: a
/// run of events, or a committed atomic batch.
struct InFlight {
    ack: AckFuture,
    /// The event the ack is for (a batch's commit message).
    event_id: EventId,
    /// The stream sequence the ack must report.
    expected_seq: u64,
    /// Events it stores.
    count: u64,
    /// When the run's first publish was sent.
    sent: std::time::Instant,
    /// The event's commit time, Unix seconds.
    commit_time: Option<f64>,
    /// The disruption count when it was sent.
    epoch: u64,
}

/// An acknowledged publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Acked {
    pub event_id: EventId,
    pub seq: u64,
    /// Events stored by it: 1, a run's or a batch's size.
    pub count: u64,
    /// When its first event was sent.
    pub sent: std::time::Instant,
    /// Its (last) event's commit time, Unix seconds.
    pub commit_time: Option<f64>,
}

/// The atomic batch being sent (ADR-50): its messages sit on the server until the
/// commit message stores them all or none.
struct OpenBatch {
    id: String,
    /// Messages sent so far.
    count: u64,
}

/// The newest publish, held back until it is known whether it should ask for an ack.
struct Deferred {
    event_id: EventId,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
    commit_time: Option<f64>,
}

/// Publishes sent without a reply subject since the last one with it.
struct Unreplied {
    count: u64,
    first_sent: std::time::Instant,
}

pub struct Publisher {
    js: Context,
    client: async_nats::Client,
    stream: String,
    window: usize,
    /// At most this many publishes in a row go without a reply subject.
    group: u64,
    in_flight: VecDeque<InFlight>,
    deferred: Option<Deferred>,
    unreplied: Option<Unreplied>,
    /// Events sent and not yet acked, open batch included.
    unacked: usize,
    batch: Option<OpenBatch>,
    /// The stream's last sequence once every publish sent so far is stored.
    last_sent_seq: u64,
    /// See `set_careful`.
    careful: bool,
    /// See `watch`.
    disruptions: Option<tokio::sync::watch::Receiver<u64>>,
}

impl Publisher {
    /// A publisher whose first publish expects the stream to end at `tail_seq`.
    pub fn new(
        client: async_nats::Client,
        stream: String,
        tail_seq: u64,
        window: usize,
        ack_timeout: Duration,
    ) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(ack_timeout)
            .max_ack_inflight(window + 1)
            .build(client.clone());
        Publisher {
            js,
            client,
            stream,
            window: window.max(1),
            group: (window as u64 / 4).clamp(1, 256),
            in_flight: VecDeque::with_capacity(window),
            deferred: None,
            unreplied: None,
            unacked: 0,
            batch: None,
            last_sent_seq: tail_seq,
            careful: false,
            disruptions: None,
        }
    }

    /// Fails a publish still unanswered after a disruption counted in `d` (see
    /// `disruption`), instead of waiting out the ack timeout.
    pub fn watch(&mut self, d: &Disruptions) {
        self.disruptions = Some(d.subscribe());
    }

    fn epoch(&self) -> u64 {
        self.disruptions.as_ref().map_or(0, |rx| *rx.borrow())
    }

    pub fn has_capacity(&self) -> bool {
        // An open batch must be able to reach its commit: careful applies between
        // batches only.
        let careful = self.careful && self.batch.is_none();
        self.unacked < if careful { 1 } else { self.window }
    }

    /// One publish at a time until one is stored anew, and a duplicate counts as
    /// stored: for a stream that no longer holds its last event (emptied, aged out),
    /// where the events the slot sends again cannot be told stored by the tail, but
    /// JetStream's duplicate window still knows their ids.
    pub fn set_careful(&mut self) {
        self.careful = true;
    }

    /// Events sent and not yet stored (an open batch's included).
    pub fn in_flight(&self) -> usize {
        self.unacked
    }

    /// Publishes whose ack is still to come (an open batch and publishes that asked
    /// for no ack have none yet: `flush` sends what makes one come).
    pub fn awaiting_acks(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether a publish is held back (see `flush`).
    pub fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }

    /// Sends the publish held back, asking for its ack, so that everything sent so
    /// far will be acked: for when no further publish follows for now, and before
    /// waiting for acks.
    pub async fn flush(&mut self) -> Result<(), PublishError> {
        match self.deferred.take() {
            Some(d) => self.send_deferred(d, true).await,
            None => Ok(()),
        }
    }

    /// Messages in the open atomic batch.
    pub fn open_batch_len(&self) -> u64 {
        self.batch.as_ref().map_or(0, |b| b.count)
    }

    /// Forgets an open batch that will never be committed (the server drops it after
    /// its idle timeout; nothing of it is stored).
    pub fn abandon_batch(&mut self) {
        if let Some(b) = self.batch.take() {
            // Saturating: a send cut short by shutdown counted in the batch but not
            // in `unacked`.
            self.unacked = self.unacked.saturating_sub(b.count as usize);
        }
    }

    /// The headers of an event other than tidemark's own.
    fn user_headers(event: &DomainEvent) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in &event.headers {
            // `Nats-*` headers steer JetStream (a stray Nats-Msg-Id would break
            // exactly-once); names and values NATS cannot carry would panic the client.
            let parsed = (
                async_nats::HeaderName::from_str(name),
                async_nats::HeaderValue::from_str(value),
            );
            match parsed {
                (Ok(n), Ok(v)) if !name.to_ascii_lowercase().starts_with("nats-") => {
                    headers.insert(n, v);
                }
                _ => {
                    warn!(event_id = %event.id, header = %name, "outbox header not published: names starting with Nats- are reserved, and names may not hold ':', spaces or control characters, values no line breaks")
                }
            }
        }
        headers
    }

    /// Sends one event without waiting for its ack. It is held back until the next
    /// publish or `flush` (see the module's DESIGN note); it counts as in flight.
    pub async fn publish(&mut self, event: DomainEvent) -> Result<(), PublishError> {
        let mut headers = Self::user_headers(&event);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.msg_id);
        let next = Deferred {
            event_id: event.id,
            subject: event.subject,
            headers,
            payload: event.payload.into(),
            commit_time: event.commit_time,
        };
        self.unacked += 1;
        if let Some(d) = self.deferred.replace(next) {
            // The one before asks for its ack when careful, when it ends a run, or
            // when the window is full counting the one just deferred (else only
            // `flush` could free the window).
            let reply = self.careful
                || self.unacked >= self.window
                || self.unreplied.as_ref().map_or(0, |u| u.count) + 1 >= self.group;
            self.send_deferred(d, reply).await?;
        }
        if self.careful {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends the held-back publish, chained to the one before it; with a reply
    /// subject when `reply`, covering every publish sent without one before it.
    async fn send_deferred(&mut self, d: Deferred, reply: bool) -> Result<(), PublishError> {
        let mut headers = d.headers;
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
            itoa::Buffer::new().format(self.last_sent_seq),
        );
        if reply {
            let (count, first_sent) = match self.unreplied.take() {
                Some(u) => (u.count + 1, u.first_sent),
                None => (1, std::time::Instant::now()),
            };
            let msg = PublishMessage::build().headers(headers).payload(d.payload);
            // `send` counts the message as unacked again; it was counted when deferred.
            self.unacked -= 1;
            return self
                .send_counted(
                    d.event_id,
                    d.subject,
                    msg,
                    (count, 1),
                    d.commit_time,
                    first_sent,
                )
                .await;
        }
        // A `Subject` shares its bytes: the clone kept for an error costs no copy.
        let subject = async_nats::Subject::from(d.subject);
        self.client
            .publish_with_headers(subject.clone(), headers, d.payload)
            .await
            .map_err(|e| PublishError::Unanswered {
                event_id: d.event_id.clone(),
                subject: subject.to_string(),
                reason: e.to_string(),
            })?;
        self.last_sent_seq += 1;
        match &mut self.unreplied {
            Some(u) => u.count += 1,
            None => {
                self.unreplied = Some(Unreplied {
                    count: 1,
                    first_sent: std::time::Instant::now(),
                })
            }
        }
        Ok(())
    }

    /// Sends a batch's commit message, which stores `count` events.
    async fn send(
        &mut self,
        event_id: EventId,
        subject: String,
        msg: PublishMessage,
        count: u64,
        commit_time: Option<f64>,
    ) -> Result<(), PublishError> {
        let now = std::time::Instant::now();
        // A batch's messages are chained by its first: the stream moves by all at once.
        self.send_counted(event_id, subject, msg, (count, count), commit_time, now)
            .await
    }

    /// Sends a message with a reply subject whose ack stores `count` events: it and
    /// the ones before it that asked for no ack (or its batch); the stream's last
    /// sequence moves by `advance` with it.
    async fn send_counted(
        &mut self,
        event_id: EventId,
        subject: String,
        msg: PublishMessage,
        (count, advance): (u64, u64),
        commit_time: Option<f64>,
        first_sent: std::time::Instant,
    ) -> Result<(), PublishError> {
        // Counted before the send: a disruption during it fails the publish.
        let epoch = self.epoch();
        let ack = self
            .js
            .send_publish(subject.clone(), msg)
            .await
            .map_err(|source| PublishError::Send {
                event_id: event_id.clone(),
                subject,
                source,
            })?;
        self.in_flight.push_back(InFlight {
            ack: ack.into_future(),
            event_id,
            expected_seq: self.last_sent_seq + advance,
            count,
            sent: first_sent,
            commit_time,
            epoch,
        });
        self.last_sent_seq += advance;
        // Every message sent counts once; the ack of a batch's commit or of a run's
        // last message releases all.
        self.unacked += 1;
        Ok(())
    }

    /// Sends one event as a message of the open atomic batch, starting one if none is
    /// open; `commit` makes it the batch's last message, which stores the whole batch
    /// at once. The first message carries the sequence check for the whole batch.
    pub async fn publish_batched(
        &mut self,
        event: DomainEvent,
        commit: bool,
    ) -> Result<(), PublishError> {
        // What was published before the batch goes first, asking for its ack.
        self.flush().await?;
        let (id, seq) = match &mut self.batch {
            Some(b) => {
                b.count += 1;
                (b.id.clone(), b.count)
            }
            None => {
                let inbox = self.client.new_inbox();
                let id = inbox.rsplit('.').next().unwrap_or(&inbox).to_string();
                self.batch = Some(OpenBatch {
                    id: id.clone(),
                    count: 1,
                });
                (id, 1)
            }
        };
        let mut headers = Self::user_headers(&event);
        headers.insert(async_nats::header::NATS_BATCH_ID, id.as_str());
        headers.insert(
            async_nats::header::NATS_BATCH_SEQUENCE,
            seq.to_string().as_str(),
        );
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.msg_id.as_str());
        if seq == 1 {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
                self.last_sent_seq.to_string().as_str(),
            );
        }
        if commit {
            self.batch = None;
            headers.insert(async_nats::header::NATS_BATCH_COMMIT, "1");
            let msg = PublishMessage::build()
                .headers(headers)
                .payload(event.payload.into());
            return self
                .send(event.id, event.subject, msg, seq, event.commit_time)
                .await;
        }
        let sent = if seq == 1 {
            // The server answers a batch's first message (an empty reply when the
            // batch started, an error otherwise); errors also fail the commit, which
            // is where they are reported.
            let reply = self.client.new_inbox();
            self.client
                .publish_with_reply_and_headers(
                    event.subject.clone(),
                    reply,
                    headers,
                    event.payload.into(),
                )
                .await
        } else {
            self.client
                .publish_with_headers(event.subject.clone(), headers, event.payload.into())
                .await
        };
        sent.map_err(|e| PublishError::Unanswered {
            event_id: event.id.clone(),
            subject: event.subject,
            reason: e.to_string(),
        })?;
        self.unacked += 1;
        Ok(())
    }

    /// Waits for the oldest in-flight ack. Cancel-safe: the ack future stays queued
    /// until it completes. Pending forever when nothing is in flight, so it can sit in
    /// a `select!` guarded by `in_flight() > 0`.
    pub async fn next_ack(&mut self) -> Result<Acked, PublishError> {
        let Some(front) = self.in_flight.front_mut() else {
            return std::future::pending().await;
        };
        let result = match self.disruptions.as_mut() {
            None => (&mut front.ack).await,
            Some(rx) => {
                let epoch = front.epoch;
                tokio::select! {
                    biased;
                    r = &mut front.ack => r,
                    _ = disruption::after(rx, epoch) => {
                        return Err(PublishError::Disrupted {
                            event_id: front.event_id.clone(),
                            in_flight: self.unacked,
                        });
                    }
                }
            }
        };
        // The front entry is removed only after its future completed.
        let done = self
            .in_flight
            .pop_front()
            .expect("front entry exists: it was just polled to completion");
        self.unacked -= done.count as usize;
        let ack = result.map_err(|source| PublishError::Ack {
            event_id: done.event_id.clone(),
            source,
        })?;
        if ack.duplicate && self.careful && done.count == 1 && self.in_flight.is_empty() {
            // Stored before (the duplicate window knows its id), and nothing else is
            // in flight, so the stream's sequence is where it was.
            self.last_sent_seq -= done.count;
            return Ok(Acked {
                event_id: done.event_id,
                seq: self.last_sent_seq,
                count: done.count,
                sent: done.sent,
                commit_time: done.commit_time,
            });
        }
        if ack.duplicate {
            return Err(PublishError::Duplicate {
                event_id: done.event_id,
            });
        }
        if ack.sequence != done.expected_seq {
            return Err(PublishError::OutOfSequence {
                event_id: done.event_id,
                stream: self.stream.clone(),
                expected: done.expected_seq,
                got: ack.sequence,
            });
        }
        self.careful = false;
        Ok(Acked {
            event_id: done.event_id,
            seq: ack.sequence,
            count: done.count,
            sent: done.sent,
            commit_time: done.commit_time,
        })
    }
}
