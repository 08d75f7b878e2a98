//! Reading the stream: an ordered consumer from just after a checkpoint, the next
//! message with an idle bound, and an event's envelope parsed or refused.

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
    cfg: &ProjectionConfig,
    checkpoint: u64,
) -> Result<pull::Ordered, Box<dyn std::error::Error + Send + Sync>> {
    let stream = js.get_stream(&cfg.stream).await?;
    let legacy = format!("tidemark_{}", cfg.name);
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

/// An event as a rebuild reads it. What the live projection could not read went to the
/// dead-letter subject (when set) and is passed over again; otherwise it stops the
/// rebuild, named, as it stopped the live projection.
pub(super) fn rebuild_parse(
    cfg: &ProjectionConfig,
    msg: &jetstream::Message,
    seq: u64,
    wanted: bool,
) -> Result<(serde_json::Value, String, String), ProjectionError> {
    match parse_event(&msg.payload) {
        Ok(parsed) => Ok(parsed),
        Err(_) if !wanted || cfg.dead_letter.is_some() => {
            Ok((serde_json::Value::Null, String::new(), String::new()))
        }
        Err(reason) => Err(ProjectionError::Poison {
            projection: cfg.name.clone(),
            event_id: "(unreadable)".into(),
            subject: msg.subject.to_string(),
            seq,
            reason,
        }),
    }
}

/// How long the live loops wait for the next event before they count as caught up.
pub(super) const IDLE: Duration = Duration::from_millis(500);

/// The next message of an ordered read, `None` when nothing came within `IDLE`.
pub(super) async fn next_message(
    messages: &mut pull::Ordered,
    projection: &str,
) -> Result<Option<jetstream::Message>, ProjectionError> {
    match tokio::time::timeout(IDLE, messages.next()).await {
        Err(_) => Ok(None),
        Ok(Some(Ok(m))) => Ok(Some(m)),
        Ok(Some(Err(e))) => Err(nats_error(projection, "read events")(Box::new(e))),
        Ok(None) => Err(nats_error(projection, "read events")(
            "the stream's consumer ended".into(),
        )),
    }
}

/// An event's envelope as the live loops need it. A payload that is not a tidemark
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
