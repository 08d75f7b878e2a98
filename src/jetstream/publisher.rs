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
//! The publisher neither spawns nor reads signals; the pipeline drives it.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError as NatsPublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, Context};

use crate::events::mapping::DomainEvent;
use crate::position::EventId;
use std::str::FromStr as _;
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
        "event {event_id} for {table} (key {key}) is {size} bytes, over max_event_bytes = {limit}: raise max_event_bytes (and the NATS max_payload), or in the table's [[source.table]] mapping exclude the large column or set oversized = \"omit\" or \"truncate\" with oversized_columns"
    )]
    Oversized {
        event_id: EventId,
        table: String,
        key: String,
        size: usize,
        limit: usize,
    },
}

impl PublishError {
    /// Whether the chain broke (a lost or rejected publish), as opposed to a transport
    /// error. Both are retried by rebuilding the pipeline.
    pub fn is_chain_break(&self) -> bool {
        matches!(
            self,
            PublishError::Ack { source, .. } if source.kind() == PublishErrorKind::WrongLastSequence
        ) || matches!(self, PublishError::OutOfSequence { .. })
    }
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, NatsPublishError>> + Send>>;

struct InFlight {
    ack: AckFuture,
    event_id: EventId,
    expected_seq: u64,
}

/// An acknowledged publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub event_id: EventId,
    pub seq: u64,
}

pub struct Publisher {
    js: Context,
    stream: String,
    window: usize,
    in_flight: VecDeque<InFlight>,
    /// The stream's last sequence once every publish sent so far is stored.
    last_sent_seq: u64,
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
            .build(client);
        Publisher {
            js,
            stream,
            window: window.max(1),
            in_flight: VecDeque::with_capacity(window),
            last_sent_seq: tail_seq,
        }
    }

    pub fn has_capacity(&self) -> bool {
        self.in_flight.len() < self.window
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends one event without waiting for its ack.
    pub async fn publish(&mut self, event: DomainEvent) -> Result<(), PublishError> {
        let mut msg = PublishMessage::build()
            .payload(event.payload.into())
            .message_id(&event.msg_id)
            .expected_last_sequence(self.last_sent_seq);
        for (name, value) in &event.headers {
            // `Nats-*` headers steer JetStream (a stray Nats-Msg-Id would break
            // exactly-once); names and values NATS cannot carry would panic the client.
            let parsed = (
                async_nats::HeaderName::from_str(name),
                async_nats::HeaderValue::from_str(value),
            );
            match parsed {
                (Ok(n), Ok(v)) if !name.to_ascii_lowercase().starts_with("nats-") => {
                    msg = msg.header(n, v);
                }
                _ => {
                    warn!(event_id = %event.id, header = %name, "outbox header not published: names starting with Nats- are reserved, and names may not hold ':', spaces or control characters, values no line breaks")
                }
            }
        }
        let ack = self
            .js
            .send_publish(event.subject.clone(), msg)
            .await
            .map_err(|source| PublishError::Send {
                event_id: event.id.clone(),
                subject: event.subject,
                source,
            })?;
        self.in_flight.push_back(InFlight {
            ack: ack.into_future(),
            event_id: event.id,
            expected_seq: self.last_sent_seq + 1,
        });
        self.last_sent_seq += 1;
        Ok(())
    }

    /// Waits for the oldest in-flight ack. Cancel-safe: the ack future stays queued
    /// until it completes. Pending forever when nothing is in flight, so it can sit in
    /// a `select!` guarded by `in_flight() > 0`.
    pub async fn next_ack(&mut self) -> Result<Acked, PublishError> {
        let Some(front) = self.in_flight.front_mut() else {
            return std::future::pending().await;
        };
        let result = (&mut front.ack).await;
        // The front entry is removed only after its future completed.
        let done = self
            .in_flight
            .pop_front()
            .expect("front entry exists: it was just polled to completion");
        let ack = result.map_err(|source| PublishError::Ack {
            event_id: done.event_id.clone(),
            source,
        })?;
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
        Ok(Acked {
            event_id: done.event_id,
            seq: ack.sequence,
        })
    }
}
