//! Reading the stream: an ordered consumer from just after a checkpoint, and an
//! event's envelope parsed or refused.

use super::*;

/// The stream from just after `checkpoint`, in order, through an ordered consumer.
///
/// Why ordered and not a durable with acks: the checkpoint lives with the read model
/// (a table in its database, or the positions bucket), so the server has nothing to
/// remember. A durable consumer's ack wait and unacked limit would make the server
/// redeliver, or stop delivering, in the middle of a source transaction that is still
/// being applied in one open database transaction: a transaction larger than the
/// limit stalled for good, and one slower than the ack wait applied its redelivered
/// part twice. An ordered consumer has neither: each attempt reads on from its
/// checkpoint, every message once, with flow control bounding what is buffered, and it
/// recreates itself after the last message it saw when it misses one. A durable left
/// by an older tidemark (`tidemark_<projection>`) is removed, so it holds nothing back.
pub(super) async fn read_after(
    js: &jetstream::Context,
    stream: &str,
    projection: &str,
    checkpoint: u64,
) -> Result<pull::Ordered, Box<dyn std::error::Error + Send + Sync>> {
    let stream = js.get_stream(stream).await?;
    let legacy = format!("tidemark_{projection}");
    if stream.consumer_info(&legacy).await.is_ok() {
        stream.delete_consumer(&legacy).await?;
        info!(consumer = %legacy, "removed the projection's old durable consumer: projections read with ordered consumers now");
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: after(checkpoint),
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}

/// The deliver policy that starts right after `checkpoint`.
pub(super) fn after(checkpoint: u64) -> jetstream::consumer::DeliverPolicy {
    if checkpoint == 0 {
        jetstream::consumer::DeliverPolicy::All
    } else {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: checkpoint + 1,
        }
    }
}

/// How long the engine waits for the next event before it counts as caught up.
pub(super) const IDLE: Duration = Duration::from_millis(500);

/// An event's envelope as the engine needs it. A payload that is not a tidemark
/// event (not JSON, or without `id` and `type`) is refused with the reason, never
/// applied as an empty event or skipped in silence.
pub(super) fn parse_event(payload: &[u8]) -> Result<(serde_json::Value, String, String), String> {
    let event: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| format!("the message is not a JSON event: {e}"))?;
    let field = |name: &str| {
        event[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("the message has no {name:?} string: not a tidemark event"))
    };
    let (id, event_type) = (field("id")?, field("type")?);
    Ok((event, id, event_type))
}
