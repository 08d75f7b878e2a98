//! The NATS KV target: revision-conditional writes per key, the applied position in
//! the positions bucket as the checkpoint, and rebuilds into a new bucket.

use super::engine::{Incoming, Position, Refused, Target, Tx};
use super::kv_key::{old_key, render_key};
use super::*;

/// The field a KV projection keeps in each value: the stream sequence of the event
/// that wrote it, so a redelivered older event is never applied over it.
pub const KV_SEQ_FIELD: &str = "_tidemark_seq";

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
            // A clear deletes key by key.
            KvOp::Delete | KvOp::Clear => match live {
                Some(e) => match kv.delete_expect_revision(key, Some(e.revision)).await {
                    Ok(()) => false,
                    Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision => true,
                    Err(err) => return Err(KvFailure::of_update(err)),
                },
                None => return Ok(()),
            },
            KvOp::Put | KvOp::Merge => {
                let mut value = match (op, &stored) {
                    (KvOp::Merge, Some(m)) => m.clone(),
                    _ => serde_json::Map::new(),
                };
                for (field, path) in fields {
                    // A value the event leaves out (an unchanged TOASTed one) is the
                    // one the key holds, never null.
                    if left_out(event, path) {
                        if let Some(v) = stored.as_ref().and_then(|m| m.get(field)) {
                            value.insert(field.clone(), v.clone());
                        }
                        continue;
                    }
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

/// A NATS KV target: events applied to keys of a bucket, each write conditional on the
/// key's revision and skipped where the key already holds this event or a later one.
/// Live, the applied position in the positions bucket is the checkpoint; rebuilding,
/// the new bucket is swapped in by writing its name with the position.
pub(super) struct KvTarget {
    cfg: ProjectionConfig,
    kv: jetstream::kv::Store,
    positions: jetstream::kv::Store,
    checkpoint: Position,
    /// The revision of the projection's position entry: every write of it is
    /// conditional on it, so a swap is never overwritten.
    revision: u64,
    /// The bucket recorded with each position: a swapped-in one, or the one being
    /// rebuilt.
    bucket: Option<String>,
    /// Rebuilding: the bucket readers used before (for the log).
    rebuilding: Option<String>,
}

impl KvTarget {
    /// The live target: the bucket a rebuild may have swapped in (else the configured
    /// one, created when missing), from the projection's position.
    pub(super) async fn live(
        cfg: &ProjectionConfig,
        js: &jetstream::Context,
        bucket: &str,
    ) -> Result<KvTarget, ProjectionError> {
        let nats_err = |what: &str| nats_error(&cfg.name, what);
        let positions = positions(js, &cfg.stream)
            .await
            .map_err(|e| nats_err("open the positions bucket")(e.into()))?;
        let (start, revision) = position_entry(&positions, &cfg.name).await;
        let name = start.bucket.clone().unwrap_or_else(|| bucket.to_string());
        let kv = match js.get_key_value(&name).await {
            Ok(kv) => kv,
            Err(_) => create_bucket(js, cfg, &name, "create the bucket").await?,
        };
        info!(seq = start.seq, bucket = %name, "projecting into KV");
        Ok(KvTarget {
            cfg: cfg.clone(),
            kv,
            positions,
            checkpoint: Position {
                seq: start.seq,
                lsn: start.lsn,
            },
            revision,
            bucket: start.bucket,
            rebuilding: None,
        })
    }

    /// A rebuild's target: a new bucket, read into from the start of the stream.
    pub(super) async fn rebuild(
        cfg: &ProjectionConfig,
        js: &jetstream::Context,
        configured: &str,
    ) -> Result<KvTarget, ProjectionError> {
        let nats_err = |what: &str| nats_error(&cfg.name, what);
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let bucket = format!("{configured}_{stamp}");
        let kv = create_bucket(js, cfg, &bucket, "create the new bucket").await?;
        let positions = positions(js, &cfg.stream)
            .await
            .map_err(|e| nats_err("open the positions bucket")(e.into()))?;
        Ok(KvTarget {
            cfg: cfg.clone(),
            kv,
            positions,
            checkpoint: Position::default(),
            revision: 0,
            bucket: Some(bucket),
            rebuilding: Some(configured.to_string()),
        })
    }
}

/// A read model's bucket, with the replicas of the stream it is built from.
async fn create_bucket(
    js: &jetstream::Context,
    cfg: &ProjectionConfig,
    bucket: &str,
    what: &str,
) -> Result<jetstream::kv::Store, ProjectionError> {
    js.create_key_value(jetstream::kv::Config {
        bucket: bucket.to_string(),
        history: 1,
        num_replicas: stream_replicas(js, &cfg.stream).await,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_error(&cfg.name, what)(Box::new(e)))
}

impl Target for KvTarget {
    const ATOMIC: bool = false;
    type Tx<'a> = KvTx<'a>;

    fn checkpoint(&self) -> Position {
        self.checkpoint.clone()
    }

    async fn begin(&mut self) -> Result<KvTx<'_>, ProjectionError> {
        Ok(KvTx {
            target: self,
            batch: Vec::with_capacity(KV_BATCH),
        })
    }
}

/// Events read while more were waiting, applied together: each key's writes in
/// stream order and different keys' at once (each write waits for its answer).
pub(super) struct KvTx<'a> {
    target: &'a mut KvTarget,
    batch: Vec<Incoming>,
}

impl Tx for KvTx<'_> {
    async fn apply(&mut self, event: Incoming) -> Result<Vec<Refused>, ProjectionError> {
        if event.wanted {
            self.batch.push(event);
        }
        if self.batch.len() < KV_BATCH {
            return Ok(Vec::new());
        }
        self.settle().await
    }

    async fn settle(&mut self) -> Result<Vec<Refused>, ProjectionError> {
        let batch = std::mem::take(&mut self.batch);
        apply_kv_batch(&self.target.cfg, &self.target.kv, batch).await
    }

    fn whole_txs(&self) -> usize {
        0
    }

    async fn commit(self, at: &Position, _urgent: bool) -> Result<(), ProjectionError> {
        if self.target.rebuilding.is_some() {
            return Ok(());
        }
        let t = self.target;
        let position = Applied {
            seq: at.seq,
            lsn: at.lsn.clone(),
            bucket: t.bucket.clone(),
        };
        match write_position(&t.positions, &t.cfg.name, &position, t.revision).await {
            Ok(r) => {
                t.revision = r;
                t.checkpoint = at.clone();
                Ok(())
            }
            // A rebuild swapped a new bucket in: continue from its position.
            Err(e) => {
                debug!(error = %e, "the position moved under the projection");
                Err(ProjectionError::Moved(at.seq))
            }
        }
    }

    /// Points the projection's position at the new bucket once it holds at least what
    /// the live one does (readers never see the model go back), unless the live
    /// projector wrote its position meanwhile (then it is tried again later).
    async fn swap(&mut self, at: &Position, events: u64) -> Result<bool, ProjectionError> {
        let t = &mut *self.target;
        let Some(configured) = &t.rebuilding else {
            return Ok(false);
        };
        let (current, revision) = position_entry(&t.positions, &t.cfg.name).await;
        if current.seq > at.seq {
            return Ok(false);
        }
        let position = Applied {
            seq: at.seq,
            lsn: at.lsn.clone(),
            bucket: t.bucket.clone(),
        };
        if write_position(&t.positions, &t.cfg.name, &position, revision)
            .await
            .is_err()
        {
            return Ok(false);
        }
        let old = current.bucket.unwrap_or_else(|| configured.clone());
        let bucket = t.bucket.as_deref().unwrap_or_default();
        info!(projection = %t.cfg.name, bucket, old = %old, events, "KV rebuild swapped in; delete the old bucket when its readers have moved");
        Ok(true)
    }
}

/// One write of a key: the event's index in its batch, the operation and its fields.
type KeyWrite<'a> = (usize, KvOp, &'a [(String, EventPath)]);

/// Events in one live batch, at most, and keys written at once.
const KV_BATCH: usize = 256;
const KV_KEYS_AT_ONCE: usize = 64;

/// Applies a batch of events, each key's writes in stream order and different keys'
/// concurrently, and returns the events refused (by their own doing: a key that
/// cannot be made, a value the server refuses), in stream order. Without a
/// dead-letter subject the batch is cut before an event known to fail (a key that
/// cannot be made), so nothing after it is written. A write that fails only when
/// tried may leave later events of other keys of the batch written; the position
/// stays before it, and the sequence each value keeps makes their writes on the next
/// attempt no-ops.
async fn apply_kv_batch(
    cfg: &ProjectionConfig,
    kv: &jetstream::kv::Store,
    mut batch: Vec<Incoming>,
) -> Result<Vec<Refused>, ProjectionError> {
    // A clear touches every key: the writes before it are done first, and those after
    // it (its event's other handlers too) after it.
    if let Some(c) = batch.iter().position(|e| !clears(cfg, e).is_empty()) {
        let mut after = batch.split_off(c);
        let rest = after.split_off(1);
        // `after` is the clear's event alone.
        let mut refused = Box::pin(apply_kv_batch(cfg, kv, batch)).await?;
        let stop = |r: &Vec<Refused>| !r.is_empty() && cfg.dead_letter.is_none();
        if stop(&refused) {
            return Ok(refused);
        }
        for event in &after {
            refused.extend(clear(cfg, kv, event).await?);
        }
        if stop(&refused) {
            return Ok(refused);
        }
        refused.extend(apply_kv_batch_without_clears(cfg, kv, after).await?);
        if stop(&refused) {
            return Ok(refused);
        }
        refused.extend(Box::pin(apply_kv_batch(cfg, kv, rest)).await?);
        return Ok(refused);
    }
    apply_kv_batch_without_clears(cfg, kv, batch).await
}

/// The prefixes an event's clear handlers delete the keys of.
fn clears(cfg: &ProjectionConfig, e: &Incoming) -> Vec<String> {
    cfg.handlers
        .iter()
        .filter(|h| h.types.contains(&e.event_type))
        .filter_map(|h| match &h.action {
            Action::Kv {
                op: KvOp::Clear,
                key,
                ..
            } => Some(
                key.iter()
                    .map(|p| match p {
                        KeyPart::Lit(l) => l.as_str(),
                        KeyPart::Path(_) => "",
                    })
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Deletes every key under the event's clear prefixes that an earlier event wrote
/// (a key a later event wrote, applied before a crash, stays: see `apply_kv`), 64
/// keys at once. The keys are listed as they are deleted, never held all at once.
async fn clear(
    cfg: &ProjectionConfig,
    kv: &jetstream::kv::Store,
    e: &Incoming,
) -> Result<Vec<Refused>, ProjectionError> {
    let nats = |what: &'static str| move |err: String| nats_error(&cfg.name, what)(err.into());
    let mut refused = Vec::new();
    for prefix in clears(cfg, e) {
        let keys = kv
            .keys()
            .await
            .map_err(|err| nats("list the KV read model's keys")(err.to_string()))?;
        let mut deletes = std::pin::pin!(
            keys.filter_map(|k| {
                let prefix = prefix.clone();
                async move {
                    match k {
                        Ok(k) if !k.starts_with(&prefix) => None,
                        other => Some(other),
                    }
                }
            })
            .map(|k| async move {
                let k = k.map_err(|err| KvFailure::Nats(err.to_string()))?;
                apply_kv(kv, KvOp::Clear, &k, &[], &e.event, e.seq).await
            })
            .buffer_unordered(KV_KEYS_AT_ONCE)
        );
        while let Some(done) = deletes.next().await {
            match done {
                Ok(()) => {}
                Err(KvFailure::Event(reason)) => refused.push(e.refused(reason, 0)),
                Err(KvFailure::Nats(reason)) => {
                    return Err(nats("clear the KV read model")(reason));
                }
            }
        }
    }
    Ok(refused)
}

/// Applies a batch of events without clears (see `apply_kv_batch`).
async fn apply_kv_batch_without_clears(
    cfg: &ProjectionConfig,
    kv: &jetstream::kv::Store,
    batch: Vec<Incoming>,
) -> Result<Vec<Refused>, ProjectionError> {
    // Each key's writes, in stream order, keys in the order first written.
    let mut keys: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut writes: Vec<(String, Vec<KeyWrite<'_>>)> = Vec::new();
    let mut failed: Vec<(usize, String)> = Vec::new();
    let mut cut = batch.len();
    for (i, e) in batch.iter().enumerate() {
        for h in cfg
            .handlers
            .iter()
            .filter(|h| h.types.contains(&e.event_type))
        {
            let Action::Kv { op, key, value } = &h.action else {
                continue;
            };
            if *op == KvOp::Clear {
                continue;
            }
            match render_key(key, &e.event) {
                Ok(k) => {
                    let mut write = |k: String, op: KvOp, fields| {
                        let slot = *keys.entry(k.clone()).or_insert_with(|| {
                            writes.push((k, Vec::new()));
                            writes.len() - 1
                        });
                        writes[slot].1.push((i, op, fields));
                    };
                    // An UPDATE that changed the row's key: the value under the old
                    // key goes, or the model would hold the row twice.
                    if *op != KvOp::Delete
                        && let Some(old) = old_key(key, &e.event, &k)
                    {
                        write(old, KvOp::Delete, &[]);
                    }
                    write(k, *op, value.as_slice());
                }
                Err(reason) => failed.push((i, reason)),
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
    failed.sort_by_key(|(i, _)| *i);
    Ok(failed
        .into_iter()
        .map(|(i, reason)| batch[i].refused(reason, 0))
        .collect())
}

/// The bucket a KV projection's readers should read: the one a rebuild swapped in,
/// else the configured one.
pub async fn kv_bucket(js: &jetstream::Context, projection: &str, configured: &str) -> String {
    applied(js, projection)
        .await
        .and_then(|a| a.bucket)
        .unwrap_or_else(|| configured.to_string())
}
