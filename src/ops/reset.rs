//! `reset`: a new start for a source whose slot is gone or must go, with the stream
//! purged or kept behind a marker at the gap.

use async_nats::jetstream::message::PublishMessage;

use super::OpError;
use crate::config::{NatsConfig, SourceConfig};
use crate::jetstream::provision;
use crate::position::Lsn;
use crate::postgres::catalog::Catalog;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResetMode {
    /// Delete every event in the stream; consumers must rebuild.
    Purge,
    /// Keep the events and publish a `tidemark.reset` marker at the gap.
    Keep,
}

/// What a reset did, step by step, for the CLI to tell.
#[derive(Debug, Default)]
pub(crate) struct ResetReport {
    /// The old slot existed and was dropped.
    pub dropped_slot: bool,
    pub stream: StreamOutcome,
    /// Keep mode: the new slot's start.
    pub created_slot: Option<Lsn>,
}

#[derive(Debug, Default)]
pub(crate) enum StreamOutcome {
    #[default]
    Untouched,
    /// Purge mode: this many events deleted.
    Purged(u64),
    /// Purge mode: there was no stream.
    Missing,
    /// Keep mode: the marker's id and stream sequence.
    Marked { msg_id: String, seq: u64 },
}

/// Drops the slot (the first step: once it is gone, no tidemark can append to the
/// stream), then purges the stream or creates a new slot and marks the gap.
/// `reason` is the marker's reason (`reset`, `resync`).
pub(crate) async fn reset(
    src: &SourceConfig,
    nats: &NatsConfig,
    mode: ResetMode,
    force: bool,
    reason: &str,
) -> Result<ResetReport, OpError> {
    let mut report = ResetReport::default();
    let catalog = Catalog::connect(&src.postgres).await?;
    let old_slot = catalog.slot(&src.slot).await?;
    if old_slot.is_some() {
        super::drop_slot(src, force).await?;
        report.dropped_slot = true;
    }
    let client = provision::connect(nats, "tidemark-reset").await?;
    let js = async_nats::jetstream::new(client);
    match mode {
        ResetMode::Purge => {
            let Ok(mut stream) = js.get_stream(&src.stream.name).await else {
                report.stream = StreamOutcome::Missing;
                return Ok(report);
            };
            let purged = stream.purge().await.map_err(|e| {
                OpError::Nats(format!("cannot purge stream {:?}: {e}", src.stream.name))
            })?;
            // Record where the purge left the stream, so `run` knows the empty stream
            // is a deliberate fresh start rather than aged-out events.
            let last = stream
                .info()
                .await
                .map_err(|e| OpError::Nats(format!("stream info after the purge: {e}")))?
                .state
                .last_sequence;
            crate::backfill::Progress::open(&js, &src.name, src.stream.replicas)
                .await?
                .set_purged_at(last)
                .await?;
            report.stream = StreamOutcome::Purged(purged.purged);
        }
        ResetMode::Keep => {
            // A new slot now, then the marker: its id sorts after every event already
            // stored and before every change the new slot will send.
            let row = catalog
                .client()
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&src.slot],
                )
                .await
                .map_err(|source| OpError::Postgres {
                    what: format!("cannot create replication slot {:?}", src.slot),
                    source,
                })?;
            let start: String = row.get(0);
            let start = start.parse::<Lsn>().map_err(|_| {
                OpError::Refused(format!("postgres returned a malformed slot LSN {start:?}"))
            })?;
            let mut stream = provision::ensure_stream(&js, &src.stream).await?;
            let tail = provision::read_tail(&mut stream, &src.name).await?;
            let marker = crate::events::mapping::reset_marker(
                &src.name,
                start,
                old_slot.and_then(|s| s.confirmed_flush),
                tail.last_event.map(|(l, _)| l),
                reason,
            );
            let ack = js
                .send_publish(
                    marker.subject.clone(),
                    PublishMessage::build()
                        .payload(marker.payload.into())
                        .message_id(&marker.msg_id)
                        .expected_last_sequence(tail.last_seq),
                )
                .await
                .map_err(|e| OpError::Nats(format!("cannot publish the reset marker: {e}")))?
                .await
                .map_err(|e| OpError::Nats(format!("reset marker not stored: {e}")))?;
            report.stream = StreamOutcome::Marked {
                msg_id: marker.msg_id,
                seq: ack.sequence,
            };
            report.created_slot = Some(start);
        }
    }
    Ok(report)
}
