//! NATS KV read models: revision-conditional writes per key, the applied position in
//! the positions bucket as the checkpoint, and rebuilds into a new bucket.

use super::*;

/// The field a KV projection keeps in each value: the stream sequence of the event
/// that wrote it, so a redelivered older event is never applied over it.
pub const KV_SEQ_FIELD: &str = "_tidemark_seq";

/// A KV key from its template, or why it cannot be made.
pub(super) fn render_key(parts: &[KeyPart], event: &serde_json::Value) -> Result<String, String> {
    let mut out = String::new();
    for p in parts {
        match p {
            KeyPart::Lit(l) => out.push_str(l),
            KeyPart::Path(path) => match param(event, path).0 {
                Some(v) => out.push_str(&v),
                None => return Err(format!("{} is missing from the event", path.join("."))),
            },
        }
    }
    let valid = !out.is_empty()
        && !out.starts_with('.')
        && !out.ends_with('.')
        && out
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '=' | '.'));
    if valid {
        Ok(out)
    } else {
        Err(format!("{out:?} is not a valid KV key"))
    }
}

/// Why a KV write failed: the event's doing (it fails again every time: poison), or
/// NATS's (an outage: start again from the checkpoint, never set the event aside).
pub(super) enum KvFailure {
    Event(String),
    Nats(String),
}

impl KvFailure {
    fn of_update(err: jetstream::kv::UpdateError) -> KvFailure {
        match err.kind() {
            jetstream::kv::UpdateErrorKind::InvalidKey => KvFailure::Event(err.to_string()),
            _ => KvFailure::Nats(err.to_string()),
        }
    }
}

/// Applies one KV operation unless the key already holds this event or a later one.
/// Conditional on the entry's revision: a concurrent writer makes it read again.
pub(super) async fn apply_kv(
    kv: &jetstream::kv::Store,
    op: KvOp,
    key: &str,
    fields: &[(String, EventPath)],
    event: &serde_json::Value,
    seq: u64,
) -> Result<(), KvFailure> {
    for _ in 0..10 {
        let entry = kv
            .entry(key)
            .await
            .map_err(|e| KvFailure::Nats(e.to_string()))?;
        let live = entry
            .as_ref()
            .filter(|e| e.operation == jetstream::kv::Operation::Put);
        let stored: Option<serde_json::Map<String, serde_json::Value>> =
            live.and_then(|e| serde_json::from_slice(&e.value).ok());
        let stored_seq = stored
            .as_ref()
            .and_then(|m| m.get(KV_SEQ_FIELD))
            .and_then(|v| v.as_u64());
        if stored_seq.is_some_and(|s| s >= seq) {
            return Ok(());
        }
        // Each write says whether someone wrote the key meanwhile (by the client's
        // error kinds, not their text): then it is read again.
        use jetstream::kv::{CreateErrorKind, UpdateErrorKind};
        let conflict = match op {
            KvOp::Delete => match live {
                Some(e) => match kv.delete_expect_revision(key, Some(e.revision)).await {
                    Ok(()) => false,
                    Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => true,
                    Err(err) => return Err(KvFailure::of_update(err)),
                },
                None => return Ok(()),
            },
            KvOp::Put | KvOp::Merge => {
                let mut value = match (op, stored) {
                    (KvOp::Merge, Some(m)) => m,
                    _ => serde_json::Map::new(),
                };
                for (field, path) in fields {
                    let mut v = event;
                    for p in path {
                        v = v.get(p).unwrap_or(&serde_json::Value::Null);
                    }
                    value.insert(field.clone(), v.clone());
                }
                value.insert(KV_SEQ_FIELD.into(), serde_json::json!(seq));
                let bytes: bytes::Bytes = serde_json::to_vec(&value)
                    .map_err(|e| {
                        KvFailure::Event(format!("cannot encode the value of {key}: {e}"))
                    })?
                    .into();
                match live {
                    Some(e) => match kv.update(key, bytes, e.revision).await {
                        Ok(_) => false,
                        Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => true,
                        Err(err) => return Err(KvFailure::of_update(err)),
                    },
                    None => match kv.create(key, bytes).await {
                        Ok(_) => false,
                        Err(err) if err.kind() == CreateErrorKind::AlreadyExists => true,
                        Err(err) if err.kind() == CreateErrorKind::InvalidKey => {
                            return Err(KvFailure::Event(err.to_string()));
                        }
                        Err(err) => return Err(KvFailure::Nats(err.to_string())),
                    },
                }
            }
        };
        if !conflict {
            return Ok(());
        }
    }
    Err(KvFailure::Event(format!(
        "key {key} kept changing under the projection"
    )))
}

/// A KV projection: events applied to keys of a bucket, each conditional on the key's
/// revision and skipped where the key already holds this event or a later one. The
/// applied position (in the positions bucket) is the checkpoint.
pub(super) async fn attempt_kv(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    cancel: &CancellationToken,
    bucket: &str,
) -> Result<(), ProjectionError> {
    let nats_err = |what: &str| nats_error(&cfg.name, what);
    let nc = provision::connect(nats, &format!("tidemark-projection-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let positions_kv = positions(&js, &cfg.stream)
        .await
        .map_err(|e| nats_err("open the positions bucket")(e.into()))?;
    // The position, and the bucket a rebuild may have swapped in; its revision makes
    // every later write conditional, so a swap is never overwritten.
    let (start, mut revision) = position_entry(&positions_kv, &cfg.name).await;
    let bucket = start.bucket.clone().unwrap_or_else(|| bucket.to_string());
    let bucket = bucket.as_str();
    let kv = match js.get_key_value(bucket).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(jetstream::kv::Config {
                bucket: bucket.to_string(),
                history: 1,
                num_replicas: stream_replicas(&js, &cfg.stream).await,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err("create the bucket")(Box::new(e)))?,
    };
    let mut checkpoint = start.seq;
    let mut messages = read_after(&js, cfg, checkpoint)
        .await
        .map_err(nats_err("read the stream"))?;
    info!(seq = checkpoint, bucket, "projecting into KV");
    // The end of the last whole source transaction applied and not yet recorded.
    let mut unrecorded: Option<(u64, Option<String>)> = None;
    let mut since_recorded = 0usize;
    // Events read while more were waiting: applied together, each key's writes in
    // stream order and different keys' at once (each write waits for its answer).
    let mut batch: Vec<KvEvent> = Vec::with_capacity(KV_BATCH);
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            m = next_message(&mut messages, &cfg.name) => m?,
        };
        let mut pending = 0;
        if let Some(msg) = msg {
            let info = msg.info().map_err(|e| nats_err("read message info")(e))?;
            let seq = info.stream_sequence;
            pending = info.pending;
            if seq <= checkpoint {
                continue;
            }
            batch.push(KvEvent::read(cfg, msg, seq));
            if pending > 0 && batch.len() < KV_BATCH {
                continue;
            }
        }
        for e in apply_kv_batch(cfg, &js, &kv, std::mem::take(&mut batch)).await? {
            since_recorded += 1;
            if e.event["txlast"].as_bool().unwrap_or(true) {
                unrecorded = Some((e.seq, e.event["commitlsn"].as_str().map(str::to_string)));
            }
        }
        // Record the position once caught up, or after a good number of events.
        if pending > 0 && since_recorded < COMMIT_EVERY {
            continue;
        }
        let Some((seq, lsn)) = unrecorded.take() else {
            continue;
        };
        since_recorded = 0;
        checkpoint = seq;
        let position = Applied {
            seq,
            lsn,
            bucket: start.bucket.clone(),
        };
        match write_position(&positions_kv, &cfg.name, &position, revision).await {
            Ok(r) => revision = r,
            // A rebuild swapped a new bucket in: continue from its position.
            Err(e) => {
                debug!(error = %e, "the position moved under the projection");
                return Err(ProjectionError::Moved(seq));
            }
        }
    }
}

/// One event of a live KV batch.
pub(super) struct KvEvent {
    msg: jetstream::Message,
    seq: u64,
    event_id: String,
    event: serde_json::Value,
    event_type: String,
    /// Whether the projection reads its subject.
    wanted: bool,
    /// Why a wanted event cannot be read at all.
    unreadable: Option<String>,
}

impl KvEvent {
    fn read(cfg: &ProjectionConfig, msg: jetstream::Message, seq: u64) -> KvEvent {
        let wanted = reads(&cfg.subjects, &msg.subject);
        let (parsed, unreadable) = match parse_event(&msg.payload) {
            Ok(parsed) => (parsed, None),
            Err(reason) => (
                (serde_json::Value::Null, String::new(), String::new()),
                // An event this projection does not read need not parse.
                wanted.then_some(reason),
            ),
        };
        let (event, event_id, event_type) = parsed;
        KvEvent {
            msg,
            seq,
            event_id,
            event,
            event_type,
            wanted,
            unreadable,
        }
    }
}

/// One write of a key: the event's index in its batch, the operation and its fields.
type KeyWrite<'a> = (usize, KvOp, &'a [(String, EventPath)]);

/// Events in one live batch, at most, and keys written at once.
const KV_BATCH: usize = 256;
const KV_KEYS_AT_ONCE: usize = 64;

/// Applies a batch of events, each key's writes in stream order and different keys'
/// concurrently, and returns the events applied (or set aside), in order. An event
/// that fails by its own doing goes to the dead-letter subject, or stops the
/// projection naming it; with no dead-letter subject the batch is cut before an event
/// known to fail (unreadable, or a key that cannot be made), so nothing after it is
/// written. A write that fails only when tried may leave later events of other keys
/// of the batch written; the position stays before it, and the sequence each value
/// keeps makes their writes on the next attempt no-ops.
async fn apply_kv_batch(
    cfg: &ProjectionConfig,
    js: &jetstream::Context,
    kv: &jetstream::kv::Store,
    mut batch: Vec<KvEvent>,
) -> Result<Vec<KvEvent>, ProjectionError> {
    // Each key's writes, in stream order, keys in the order first written.
    let mut keys: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut writes: Vec<(String, Vec<KeyWrite<'_>>)> = Vec::new();
    let mut failed: Vec<(usize, String)> = Vec::new();
    let mut cut = batch.len();
    for (i, e) in batch.iter().enumerate() {
        if let Some(reason) = &e.unreadable {
            failed.push((i, reason.clone()));
        }
        if e.wanted {
            for h in cfg
                .handlers
                .iter()
                .filter(|h| h.types.contains(&e.event_type))
            {
                let Action::Kv { op, key, value } = &h.action else {
                    continue;
                };
                match render_key(key, &e.event) {
                    Ok(k) => {
                        let slot = *keys.entry(k.clone()).or_insert_with(|| {
                            writes.push((k, Vec::new()));
                            writes.len() - 1
                        });
                        writes[slot].1.push((i, *op, value.as_slice()));
                    }
                    Err(reason) => failed.push((i, reason)),
                }
            }
        }
        if cfg.dead_letter.is_none() && failed.iter().any(|(f, _)| *f == i) {
            cut = i;
            break;
        }
    }
    type KeyWrites<'a> = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<(usize, String)>, String>> + Send + 'a>,
    >;
    let mut per_key: Vec<KeyWrites<'_>> = Vec::with_capacity(writes.len());
    for (key, ops) in writes {
        let batch = &batch;
        per_key.push(Box::pin(async move {
            let mut failed = Vec::new();
            for (i, op, fields) in ops.into_iter().filter(|(i, ..)| *i < cut) {
                let e = &batch[i];
                match apply_kv(kv, op, &key, fields, &e.event, e.seq).await {
                    Ok(()) => {}
                    Err(KvFailure::Event(reason)) => {
                        failed.push((i, reason));
                        // Later writes of this key wait for the verdict on this one.
                        if cfg.dead_letter.is_none() {
                            break;
                        }
                    }
                    Err(KvFailure::Nats(reason)) => return Err(reason),
                }
            }
            Ok(failed)
        }));
    }
    let answers: Vec<Result<Vec<(usize, String)>, String>> = futures_util::stream::iter(per_key)
        .buffer_unordered(KV_KEYS_AT_ONCE)
        .collect()
        .await;
    for answer in answers {
        match answer {
            Ok(f) => failed.extend(f),
            Err(reason) => {
                return Err(nats_error(&cfg.name, "write the KV read model")(
                    reason.into(),
                ));
            }
        }
    }
    // In stream order: without a dead-letter subject the first one stops the
    // projection, named.
    failed.sort_by_key(|(i, _)| *i);
    for (i, reason) in failed {
        let e = &batch[i];
        kv_refuse(cfg, js, &e.msg, e.event_id.clone(), e.seq, reason).await?;
    }
    batch.truncate(cut);
    Ok(batch)
}

/// Applies the KV handlers of `event_type` to one event, live or in a rebuild; the
/// reason of each handler that failed by the event's doing. A NATS failure ends the
/// attempt instead.
async fn apply_kv_handlers(
    cfg: &ProjectionConfig,
    kv: &jetstream::kv::Store,
    event: &serde_json::Value,
    event_type: &str,
    seq: u64,
) -> Result<Vec<String>, ProjectionError> {
    let mut failed = Vec::new();
    for h in cfg
        .handlers
        .iter()
        .filter(|h| h.types.iter().any(|t| t == event_type))
    {
        let Action::Kv { op, key, value } = &h.action else {
            continue;
        };
        let applied = match render_key(key, event) {
            Ok(k) => apply_kv(kv, *op, &k, value, event, seq).await,
            Err(e) => Err(KvFailure::Event(e)),
        };
        match applied {
            Ok(()) => {}
            Err(KvFailure::Event(reason)) => failed.push(reason),
            Err(KvFailure::Nats(reason)) => {
                return Err(nats_error(&cfg.name, "write the KV read model")(
                    reason.into(),
                ));
            }
        }
    }
    Ok(failed)
}

/// A KV event that cannot be applied: to the dead-letter subject (and on), or the
/// projection stops naming it.
pub(super) async fn kv_refuse(
    cfg: &ProjectionConfig,
    js: &jetstream::Context,
    msg: &jetstream::Message,
    event_id: String,
    seq: u64,
    reason: String,
) -> Result<(), ProjectionError> {
    let origin = Origin {
        seq,
        event_id,
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
    };
    let Some(subject) = &cfg.dead_letter else {
        return Err(origin.poison(cfg, reason));
    };
    dead_letter(js, cfg, subject, &origin, &reason).await?;
    warn!(event_id = %origin.event_id, seq, dead_letter = %subject, reason = %reason, "event set aside to the dead-letter subject");
    Ok(())
}

/// The bucket a KV projection's readers should read: the one a rebuild swapped in,
/// else the configured one.
pub async fn kv_bucket(js: &jetstream::Context, projection: &str, configured: &str) -> String {
    applied(js, projection)
        .await
        .and_then(|a| a.bucket)
        .unwrap_or_else(|| configured.to_string())
}

/// Rebuilds a KV projection into a new bucket from the start of the stream, then
/// swaps it in by writing its name and position to the projection's entry in
/// `tidemark_projections`, conditional on the entry's revision: the live projector
/// follows the swap; readers resolve the bucket with `kv_bucket` (or `status`). The
/// old bucket is left for the operator to delete.
pub(super) async fn rebuild_kv(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    configured: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<RebuildStats, ProjectionError> {
    let nats_err = |what: &str| nats_error(&cfg.name, what);
    let nc = provision::connect(nats, &format!("tidemark-rebuild-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let bucket = format!("{configured}_{stamp}");
    let kv = js
        .create_key_value(jetstream::kv::Config {
            bucket: bucket.clone(),
            history: 1,
            num_replicas: stream_replicas(&js, &cfg.stream).await,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err("create the new bucket")(Box::new(e)))?;
    let positions_kv = positions(&js, &cfg.stream)
        .await
        .map_err(|e| nats_err("open the positions bucket")(e.into()))?;
    let mut messages = read_after(&js, cfg, 0)
        .await
        .map_err(nats_err("read the stream"))?;
    // Points the projection's position at the new bucket once it holds at least what
    // the live one does (readers never see the model go back), unless the live
    // projector wrote its position meanwhile (then it is tried again later).
    let swap = async |seq: u64, lsn: Option<String>, events: u64| -> bool {
        let (current, revision) = position_entry(&positions_kv, &cfg.name).await;
        if current.seq > seq {
            return false;
        }
        let position = Applied {
            seq,
            lsn,
            bucket: Some(bucket.clone()),
        };
        let swapped = write_position(&positions_kv, &cfg.name, &position, revision)
            .await
            .is_ok();
        if swapped {
            let old = current.bucket.unwrap_or_else(|| configured.to_string());
            info!(projection = %cfg.name, bucket = %bucket, old = %old, events, "KV rebuild swapped in; delete the old bucket when its readers have moved");
        }
        swapped
    };
    let (mut seq_done, mut lsn_done, mut events) = (0u64, None, 0u64);
    let mut at_tx_end = true;
    let started = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(nats_err("read the stream")(Box::new(e))),
            Ok(None) => return Err(nats_err("read the stream")("the stream ended".into())),
            Err(_) => {
                // Quiet: swap at a transaction's end.
                if at_tx_end && swap(seq_done, lsn_done.clone(), events).await {
                    return Ok(RebuildStats {
                        events,
                        seq: seq_done,
                        swap_ms: started.elapsed().as_millis(),
                    });
                }
                continue;
            }
        };
        let info = msg.info().map_err(|e| nats_err("read message info")(e))?;
        let seq = info.stream_sequence;
        let wanted = reads(&cfg.subjects, &msg.subject);
        let (event, event_id, event_type) = rebuild_parse(cfg, &msg, seq, wanted)?;
        // Events the live projection set aside are set aside again, silently only
        // when a dead-letter subject has them already.
        let failed = if wanted {
            apply_kv_handlers(cfg, &kv, &event, &event_type, seq).await?
        } else {
            Vec::new()
        };
        if let Some(reason) = failed.into_iter().next()
            && cfg.dead_letter.is_none()
        {
            return Err(ProjectionError::Poison {
                projection: cfg.name.clone(),
                event_id: event_id.clone(),
                subject: msg.subject.to_string(),
                seq,
                reason,
            });
        }
        events += 1;
        at_tx_end = event["txlast"].as_bool().unwrap_or(true);
        if at_tx_end {
            seq_done = seq;
            lsn_done = event["commitlsn"].as_str().map(str::to_string);
        }
        progress(seq, seq + info.pending);
        // Nearly caught up: swap now if the live projection is no further, so a stream
        // that never goes quiet still swaps.
        if at_tx_end
            && info.pending <= super::rebuild::CATCH_UP
            && swap(seq_done, lsn_done.clone(), events).await
        {
            return Ok(RebuildStats {
                events,
                seq: seq_done,
                swap_ms: started.elapsed().as_millis(),
            });
        }
    }
}
