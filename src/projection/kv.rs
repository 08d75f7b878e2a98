//! The NATS KV target: revision-conditional writes per key, the applied position in
//! the positions bucket as the checkpoint, and rebuilds into a new bucket.

use super::engine::{Incoming, Position, Refused, Target, Tx};
use super::*;

/// The field a KV projection keeps in each value: the stream sequence of the event
/// that wrote it, so a redelivered older event is never applied over it.
pub const KV_SEQ_FIELD: &str = "_tidemark_seq";

/// A KV key from its template, or why it cannot be made. Each value taken from the
/// event is written with `push_key_value`, so any value makes a key (an email's `@`, a
/// time's `:`); the template's literal parts are written as they are.
pub(super) fn render_key(parts: &[KeyPart], event: &serde_json::Value) -> Result<String, String> {
    let mut out = String::new();
    for p in parts {
        match p {
            KeyPart::Lit(l) => out.push_str(l),
            KeyPart::Path(path) => match param(event, path).0 {
                Some(v) => push_key_value(&mut out, &v),
                None => return Err(format!("{} is missing from the event", path.join("."))),
            },
        }
    }
    let valid = !out.is_empty()
        && !out.starts_with('.')
        && !out.ends_with('.')
        && !out.contains("..")
        && out.chars().all(key_char);
    if valid {
        Ok(out)
    } else {
        Err(format!(
            "{out:?} is not a valid KV key (empty, or a '.' at its start or end or next to another)"
        ))
    }
}

/// A value as it stands in a KV read model's key (see `push_key_value`): what a reader
/// in Rust uses to find a row's entry, e.g. `format!("user.{}", kv_key_value(email))`.
pub fn kv_key_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    push_key_value(&mut out, value);
    out
}

/// The characters a NATS KV key may hold.
fn key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '=' | '.')
}

/// Writes a value into a key, escaped so that any value is a valid part of a key and
/// two values never make the same key: each UTF-8 byte of a character a key cannot
/// hold, of `=` itself, and of a `.` that starts or ends the value or follows another
/// `.` (a key has no empty token), is written `=` and two uppercase hex digits
/// (`a@b.com` is `a=40b.com`, `10:30` is `10=3A30`). Letters, digits, `-`, `_`, `/`
/// and other dots stay as they are, so a value that was a valid key keeps its text
/// (unless it holds `=`). Reading a key back: `=XY` is the byte 0xXY, anything else is
/// itself.
pub(super) fn push_key_value(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = value.as_bytes();
    for (i, c) in value.char_indices() {
        let plain = match c {
            '=' => false,
            '.' => i > 0 && i + 1 < bytes.len() && bytes[i - 1] != b'.' && bytes[i + 1] != b'.',
            c => key_char(c),
        };
        if plain {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push('=');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
}

/// The key an event's row had before an UPDATE that changed its key: the template with
/// each `data.after.<column>` or `data.key.<column>` read from `data.before`. None when
/// the template takes nothing from the row, the event has no old key (`before` holds
/// it only when the key changed, or the whole old row), or the key is the same.
pub(super) fn old_key(parts: &[KeyPart], event: &serde_json::Value, new: &str) -> Option<String> {
    let mut from_row = false;
    let before: Vec<KeyPart> = parts
        .iter()
        .map(|p| match p {
            KeyPart::Path(path) => match path.as_slice() {
                [data, part, column] if data == "data" && (part == "after" || part == "key") => {
                    from_row = true;
                    KeyPart::Path(vec![data.clone(), "before".into(), column.clone()])
                }
                _ => p.clone(),
            },
            KeyPart::Lit(_) => p.clone(),
        })
        .collect();
    if !from_row {
        return None;
    }
    render_key(&before, event).ok().filter(|old| old != new)
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Reads an escaped key value back (the inverse of `push_key_value`).
    fn unescape(key: &str) -> Option<String> {
        let mut bytes = Vec::new();
        let mut rest = key.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'=' {
                let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &tail[2..];
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        String::from_utf8(bytes).ok()
    }

    #[test]
    fn key_values_are_escaped_into_valid_keys() {
        let esc = kv_key_value;
        assert_eq!(esc("a@b.com"), "a=40b.com");
        assert_eq!(
            esc("2026-01-01 10:30:00+00"),
            "2026-01-01=2010=3A30=3A00=2B00"
        );
        assert_eq!(esc("12.50"), "12.50");
        assert_eq!(esc("eu-west_1/x"), "eu-west_1/x");
        assert_eq!(esc("a=b"), "a=3Db");
        assert_eq!(esc(".5"), "=2E5");
        assert_eq!(esc("5."), "5=2E");
        assert_eq!(esc("a..b"), "a=2E=2Eb");
        assert_eq!(esc("é"), "=C3=A9");
        assert_eq!(esc(""), "");
        let path = |p: &str| KeyPart::Path(p.split('.').map(str::to_string).collect());
        let parts = vec![KeyPart::Lit("user.".into()), path("data.after.email")];
        let event = |email: &str| json!({"data": {"after": {"email": email}}});
        assert_eq!(
            render_key(&parts, &event("ann@example.com")).as_deref(),
            Ok("user.ann=40example.com")
        );
        // An empty value leaves the key ending in a dot: said, not sent.
        assert!(render_key(&parts, &event("")).is_err());
        let middle = vec![path("data.after.email"), KeyPart::Lit(".x".into())];
        assert!(render_key(&middle, &event("")).is_err());
    }

    proptest::proptest! {
        /// Any non-empty value makes a valid key, read back to the value: two values
        /// never share a key.
        #[test]
        fn any_value_escapes_to_a_valid_key_that_reads_back(value in "\\PC{1,12}|[.=a@:]{1,8}") {
            let mut key = String::from("k.");
            push_key_value(&mut key, &value);
            proptest::prop_assert!(is_valid_kv_key(&key), "{key:?}");
            proptest::prop_assert!(!key.contains(".."), "{key:?}");
            proptest::prop_assert_eq!(unescape(&key[2..]), Some(value));
        }
    }

    /// NATS's own rule for a key (async-nats checks it before a put).
    fn is_valid_kv_key(key: &str) -> bool {
        !key.is_empty() && !key.starts_with('.') && !key.ends_with('.') && key.chars().all(key_char)
    }

    #[test]
    fn the_old_key_of_an_update_that_changed_the_key() {
        let path = |p: &str| KeyPart::Path(p.split('.').map(str::to_string).collect());
        let parts = vec![
            KeyPart::Lit("order.".into()),
            path("data.after.id"),
            KeyPart::Lit(".".into()),
            path("data.key.region"),
        ];
        let event = |before: serde_json::Value| {
            json!({"data": {"key": {"id": 2, "region": "eu"}, "before": before,
                            "after": {"id": 2, "region": "eu"}}})
        };
        let old = |before| old_key(&parts, &event(before), "order.2.eu");
        assert_eq!(
            old(json!({"id": 1, "region": "eu"})).as_deref(),
            Some("order.1.eu")
        );
        assert_eq!(old(json!({"id": 2, "region": "eu", "total": 1})), None);
        assert_eq!(old(json!(null)), None);
        assert_eq!(old(json!({"id": 1})), None);
        // A key that takes nothing from the row has no old one.
        let fixed = vec![KeyPart::Lit("all.".into()), path("type")];
        assert_eq!(old_key(&fixed, &event(json!({"id": 1})), "all.x"), None);
    }
}
