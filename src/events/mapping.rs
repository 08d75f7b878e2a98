//! Row changes to domain events. Pure: a decoded change plus what we know of its table
//! in, at most one `DomainEvent` (subject, id, encoded CloudEvent) out.
//!
//! How a table's changes map is its `TablePlan` (see `rules`): by default, event type
//! `<table>.<created|updated|deleted|truncated>` and subject
//! `<source>.<table>.<created|updated|deleted|truncated>`; mapping rules in the config
//! pick domain event types, drop changes, shape the columns and the subject. Tables
//! outside the `public` schema are named `<schema>_<table>`, so one table is always one
//! subject token. An outbox table's inserted rows become their own events, and emitted
//! logical messages with a configured prefix become events (`map_message`).

pub use crate::events::operation::Operation;
use serde::Serialize;

use crate::events::envelope::{self, EnvelopeFields};
use crate::events::rules::{Bound, MessageSpec, OutColumn, OversizedPlan, TablePlan};
use crate::position::{EventId, Lsn};
use crate::postgres::pgoutput::{ColumnValue, OldKind, ReplicaIdentity, Tuple};
use crate::postgres::values::{JsonText, TypeKind};

/// What the mapper needs to know of one table's columns.
#[derive(Clone, Debug, PartialEq)]
pub struct TableColumn {
    pub name: String,
    pub type_oid: u32,
    pub kind: TypeKind,
}

/// One published table as the replication stream last described it.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    pub relation_id: u32,
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<TableColumn>,
    /// The table's token in event types and subjects.
    pub token: String,
    /// How its changes become events.
    pub plan: TablePlan,
}

impl Table {
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// The subject token for a table: `<table>` in `public`, `<schema>_<table>` elsewhere.
/// Characters NATS does not allow in a token (space, `.`, `*`, `>`) become `_`.
pub fn table_token(schema: &str, name: &str) -> String {
    let raw = if schema == "public" {
        name.to_string()
    } else {
        format!("{schema}_{name}")
    };
    token(&raw)
}

/// `raw` as one subject token.
pub fn token(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_whitespace() || matches!(c, '.' | '*' | '>') || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// One row change as decoded, borrowing the tuples.
#[derive(Clone, Copy, Debug)]
pub struct RowChange<'a> {
    pub op: Operation,
    pub old: Option<(OldKind, &'a Tuple)>,
    pub new: Option<&'a Tuple>,
}

/// The transaction an event belongs to, with the texts every event of it shares
/// formatted once.
#[derive(Clone, Copy, Debug)]
pub struct TxContext<'a> {
    pub source: &'a str,
    pub commit_lsn: Lsn,
    pub xid: u32,
    /// The commit LSN as `X/Y`.
    pub commit_lsn_text: &'a str,
    /// The commit time, RFC 3339.
    pub time: &'a str,
}

/// A domain event ready to publish.
#[derive(Clone, Debug)]
pub struct DomainEvent {
    pub id: EventId,
    /// `id` as text: the CloudEvents id and the `Nats-Msg-Id`.
    pub msg_id: String,
    pub subject: String,
    pub event_type: String,
    /// The table it came from (`schema.table`), or the message prefix: for messages.
    pub origin: String,
    pub payload: Vec<u8>,
    /// Where the `txlast` value sits in `payload`, to mark the transaction's last event.
    pub txlast_at: Option<usize>,
    /// Headers to publish with it (from an outbox row's headers column).
    pub headers: Vec<(String, String)>,
    /// Its transaction's commit time, Unix seconds (for latency metrics).
    pub commit_time: Option<f64>,
}

impl DomainEvent {
    /// Marks this as the last event of its transaction: `"txlast":false` becomes
    /// `"txlast":true ` in place (same length, still valid JSON).
    pub fn mark_last(&mut self) {
        if let Some(at) = self.txlast_at
            && self.payload.get(at..at + 5) == Some(b"false")
        {
            self.payload[at..at + 5].copy_from_slice(b"true ");
        }
    }
}

/// A change that cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// A tuple that does not match its table's column list: a protocol violation or a
    /// relation cache bug, never a value problem.
    #[error("row of {table} has {got} columns but its relation message listed {expected}")]
    Shape {
        table: String,
        expected: usize,
        got: usize,
    },
}

/// How to make an oversized row fit, on a second try.
#[derive(Clone, Copy, Debug)]
pub struct Shrink<'a> {
    pub plan: &'a OversizedPlan,
    /// Truncate mode: the most bytes a listed value keeps.
    pub max_value_bytes: usize,
}

/// Builds the event for one row change, or `None` when the plan drops it.
pub fn map_change(
    tx: &TxContext<'_>,
    index: u64,
    table: &Table,
    change: &RowChange<'_>,
    shrink: Option<Shrink<'_>>,
) -> Result<Option<DomainEvent>, MapError> {
    for tuple in change.new.into_iter().chain(change.old.map(|(_, t)| t)) {
        if tuple.0.len() != table.columns.len() {
            return Err(MapError::Shape {
                table: table.qualified_name(),
                expected: table.columns.len(),
                got: tuple.0.len(),
            });
        }
    }
    let plan = &table.plan;
    if let Some(outbox) = &plan.outbox {
        return Ok(match (change.op, change.new) {
            (Operation::Insert, Some(new)) => Some(map_outbox(tx, index, table, outbox, new)),
            // The outbox pattern: only inserts are events; the application may update
            // or delete its rows afterwards.
            _ => None,
        });
    }
    let old_tuple = change.old.map(|(_, t)| t);
    let (event_type, event_name) = match plan.choose(change.op, old_tuple, change.new) {
        Bound::Drop => return Ok(None),
        Bound::Event { ty, name } => (ty.as_str(), name.as_str()),
    };
    let old_full = match change.old {
        Some((OldKind::Full, t)) => Some(t),
        _ => None,
    };
    let row = |tuple, cols, fill_from| RowJson {
        table,
        tuple,
        cols,
        fill_from,
        shrink,
    };
    // On an UPDATE that changes the key, the event's key is the new one and `before`
    // carries the old.
    let key_tuple = change.new.or(old_tuple);
    let key = match key_tuple {
        Some(t) if !plan.key.is_empty() => Some(row(t, &plan.key, None)),
        _ => None,
    };
    let before = change.old.map(|(kind, t)| match kind {
        OldKind::Full => row(t, &plan.columns, None),
        OldKind::Key => row(t, &plan.key, None),
    });
    let after = change.new.map(|t| row(t, &plan.columns, old_full));
    let unchanged_toast = match &after {
        Some(a) => a.unchanged_columns(),
        None => Vec::new(),
    };
    let (omitted, truncated) = match shrink {
        Some(s) => {
            let mut names = after.as_ref().map(|r| r.shrunk()).unwrap_or_default();
            for n in before.as_ref().map(|r| r.shrunk()).unwrap_or_default() {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
            match s.plan {
                OversizedPlan::Truncate(_) => (Vec::new(), names),
                _ => (names, Vec::new()),
            }
        }
        None => (Vec::new(), Vec::new()),
    };
    let qualified = table.qualified_name();
    let data = Data {
        op: change.op.as_str(),
        table: &qualified,
        key,
        before,
        after,
        unchanged_toast,
        omitted,
        truncated,
    };
    let subject = subject_for(tx, table, change.op, event_name, key_tuple);
    Ok(Some(build(
        tx,
        index,
        event_type.to_string(),
        subject,
        &table.token,
        qualified.clone(),
        Some(&plan.fingerprint),
        change.op == Operation::Read,
        &attrs(&plan.attributes),
        &data,
    )))
}

fn attrs(list: &[(String, String)]) -> Vec<(&str, &str)> {
    list.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn subject_for(
    tx: &TxContext<'_>,
    table: &Table,
    op: Operation,
    event_name: &str,
    key: Option<&Tuple>,
) -> String {
    match &table.plan.subject {
        None => {
            let mut s = format!("{}.{}.", tx.source, table.token);
            s.push_str(&token(event_name));
            s
        }
        Some(t) => t.render(|var, out| match var {
            "source" => out.push_str(tx.source),
            "schema" => out.push_str(&table.schema),
            "table" => out.push_str(&table.token),
            "event" => out.push_str(event_name),
            "op" => out.push_str(op.as_str()),
            other => {
                let col = other.strip_prefix("key.").unwrap_or(other);
                let k = table
                    .plan
                    .key
                    .iter()
                    .find(|k| k.name == col || table.columns[k.index].name == col);
                if let Some(ColumnValue::Text(b)) = k.and_then(|k| key?.0.get(k.index)) {
                    out.push_str(&String::from_utf8_lossy(b));
                }
            }
        }),
    }
}

/// Builds the event for one table of a TRUNCATE, or `None` when the plan drops it.
pub fn map_truncate(tx: &TxContext<'_>, index: u64, table: &Table) -> Option<DomainEvent> {
    if table.plan.outbox.is_some() {
        return None;
    }
    let (event_type, event_name) = match table.plan.choose(Operation::Truncate, None, None) {
        Bound::Drop => return None,
        Bound::Event { ty, name } => (ty.clone(), name.clone()),
    };
    let qualified = table.qualified_name();
    let data = Data {
        op: Operation::Truncate.as_str(),
        table: &qualified,
        key: None,
        before: None,
        after: None,
        unchanged_toast: Vec::new(),
        omitted: Vec::new(),
        truncated: Vec::new(),
    };
    let subject = subject_for(tx, table, Operation::Truncate, &event_name, None);
    Some(build(
        tx,
        index,
        event_type,
        subject,
        &table.token,
        qualified.clone(),
        Some(&table.plan.fingerprint),
        false,
        &attrs(&table.plan.attributes),
        &data,
    ))
}

fn text_value(tuple: &Tuple, i: usize) -> Option<String> {
    match tuple.0.get(i) {
        Some(ColumnValue::Text(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// An outbox row's event: its type, aggregate and payload come from the row.
fn map_outbox(
    tx: &TxContext<'_>,
    index: u64,
    table: &Table,
    outbox: &crate::events::rules::OutboxPlan,
    new: &Tuple,
) -> DomainEvent {
    let event_type = text_value(new, outbox.event_type).unwrap_or_else(|| "unknown".into());
    let aggregate_type = text_value(new, outbox.aggregate_type).unwrap_or_default();
    let aggregate_id = text_value(new, outbox.aggregate_id).unwrap_or_default();
    let outbox_id = text_value(new, outbox.id).unwrap_or_default();
    let subject = outbox.subject.render(|var, out| match var {
        "source" => out.push_str(tx.source),
        "table" => out.push_str(&table.token),
        "aggregate_type" => out.push_str(&aggregate_type),
        "aggregate_id" => out.push_str(&aggregate_id),
        "event" => out.push_str(&event_type),
        _ => {}
    });
    let payload = match new.0.get(outbox.payload) {
        Some(ColumnValue::Text(b)) => Payload::Raw(b),
        _ => Payload::Null,
    };
    let headers = outbox
        .headers
        .and_then(|h| text_value(new, h))
        .and_then(|h| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&h).ok())
        .map(|m| {
            m.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, v)
                })
                .collect()
        })
        .unwrap_or_default();
    let ext = [
        ("aggregatetype", aggregate_type.as_str()),
        ("aggregateid", aggregate_id.as_str()),
        ("outboxid", outbox_id.as_str()),
    ];
    let mut ev = build(
        tx,
        index,
        event_type,
        subject,
        &aggregate_id,
        table.qualified_name(),
        None,
        false,
        &ext,
        &payload,
    );
    ev.headers = headers;
    ev
}

/// A message's or outbox row's content as `data`: embedded when it is JSON, a string
/// otherwise, so nothing is lost.
enum Payload<'a> {
    Raw(&'a [u8]),
    Null,
}

impl Serialize for Payload<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::Raw(b) => match serde_json::from_slice::<&serde_json::value::RawValue>(b) {
                Ok(raw) => raw.serialize(s),
                Err(_) => s.serialize_str(&String::from_utf8_lossy(b)),
            },
            Payload::Null => s.serialize_unit(),
        }
    }
}

/// Builds the event for an emitted logical message with a configured prefix.
pub fn map_message(
    tx: &TxContext<'_>,
    index: u64,
    spec: &MessageSpec,
    content: &[u8],
) -> DomainEvent {
    let from_field = spec.type_field.as_ref().and_then(|f| {
        let v: serde_json::Value = serde_json::from_slice(content).ok()?;
        v.get(f)?.as_str().map(str::to_string)
    });
    let event_type = from_field
        .or_else(|| spec.event_type.clone())
        .unwrap_or_else(|| spec.prefix.clone());
    let subject = spec.subject.render(|var, out| match var {
        "source" => out.push_str(tx.source),
        "prefix" => out.push_str(&spec.prefix),
        "event" => out.push_str(&event_type),
        _ => {}
    });
    let ext = [("messageprefix", spec.prefix.as_str())];
    build(
        tx,
        index,
        event_type,
        subject,
        &spec.prefix,
        spec.prefix.clone(),
        None,
        false,
        &ext,
        &Payload::Raw(content),
    )
}

/// A `tidemark.heartbeat` event (`heartbeat_interval_secs`): proof that changes flow
/// from the WAL to the stream even while the published tables are quiet.
pub fn heartbeat_event(tx: &TxContext<'_>, index: u64) -> DomainEvent {
    let data = serde_json::json!({"op": "heartbeat"});
    build(
        tx,
        index,
        "tidemark.heartbeat".into(),
        format!("{}._tidemark.heartbeat", tx.source),
        "heartbeat",
        "heartbeat".into(),
        None,
        false,
        &[],
        &data,
    )
}

/// A `tidemark.sync` event (`tidemark wait` writes the message): every projection
/// reads it, so its applied commit LSN passes the waiter's position.
pub fn sync_event(tx: &TxContext<'_>, index: u64) -> DomainEvent {
    let data = serde_json::json!({"op": "sync"});
    build(
        tx,
        index,
        "tidemark.sync".into(),
        format!("{}._tidemark.sync", tx.source),
        "sync",
        "sync".into(),
        None,
        false,
        &[],
        &data,
    )
}

/// The per-transaction summary (`transaction_events = true`): published after the
/// transaction's last event on `<source>._tidemark.tx`, with the number of events the
/// transaction published. Its index is one past the transaction's last change.
pub fn transaction_summary(tx: &TxContext<'_>, index: u64, events: u64) -> DomainEvent {
    let data = serde_json::json!({
        "op": "commit",
        "xid": tx.xid,
        "commit_lsn": tx.commit_lsn_text,
        "events": events,
    });
    let mut ev = build(
        tx,
        index,
        "tidemark.transaction".into(),
        format!("{}._tidemark.tx", tx.source),
        "transaction",
        "transaction".into(),
        None,
        false,
        &[],
        &data,
    );
    ev.mark_last();
    ev
}

/// The event that marks where a source started over with a new slot while keeping
/// its stream (`tidemark reset --keep-stream`). Changes committed between the last
/// stored event and the new slot's start are not in the stream; consumers that need
/// them must rebuild. Its position, `(new slot start - 1, u64::MAX)`, sorts after
/// every event stored before and before every change the new slot sends, so the
/// exactly-once rule needs no special case.
pub fn reset_marker(
    source: &str,
    new_slot_start: Lsn,
    old_confirmed: Option<Lsn>,
    last_stored: Option<Lsn>,
    reason: &str,
) -> DomainEvent {
    let commit_lsn = Lsn(new_slot_start.0.saturating_sub(1));
    let data = serde_json::json!({
        "op": "reset",
        "reason": reason,
        "new_slot_lsn": new_slot_start.to_string(),
        "old_slot_confirmed_flush_lsn": old_confirmed.map(|l| l.to_string()),
        "last_stored_commit_lsn": last_stored.map(|l| l.to_string()),
    });
    let time = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let lsn_text = commit_lsn.to_string();
    let tx = TxContext {
        source,
        commit_lsn,
        xid: 0,
        commit_lsn_text: &lsn_text,
        time: &time,
    };
    let mut ev = build(
        &tx,
        u64::MAX,
        "tidemark.reset".into(),
        format!("{source}._tidemark.reset"),
        "tidemark",
        "tidemark".into(),
        None,
        false,
        &[],
        &data,
    );
    ev.mark_last();
    ev
}

/// The `data` of a row event.
#[derive(Serialize)]
struct Data<'a> {
    op: &'static str,
    table: &'a str,
    key: Option<RowJson<'a>>,
    before: Option<RowJson<'a>>,
    after: Option<RowJson<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unchanged_toast: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    omitted: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    truncated: Vec<&'a str>,
}

#[allow(clippy::too_many_arguments)]
fn build<D: Serialize>(
    tx: &TxContext<'_>,
    index: u64,
    event_type: String,
    subject: String,
    ce_subject: &str,
    origin: String,
    schema: Option<&str>,
    snapshot: bool,
    extensions: &[(&str, &str)],
    data: &D,
) -> DomainEvent {
    let id = EventId {
        source: tx.source.to_string(),
        commit_lsn: tx.commit_lsn,
        index,
    };
    let msg_id = id.to_string();
    let (payload, txlast_at) = envelope::encode(&EnvelopeFields {
        id: &msg_id,
        source: tx.source,
        event_type: &event_type,
        subject: ce_subject,
        time: tx.time,
        commit_lsn: tx.commit_lsn_text,
        xid: tx.xid,
        index,
        schema,
        snapshot,
        extensions,
        data,
    });
    DomainEvent {
        id,
        msg_id,
        subject,
        event_type,
        origin,
        payload,
        txlast_at,
        headers: Vec::new(),
        commit_time: None,
    }
}

/// The columns of a tuple, serialized as a JSON object straight from the wire bytes.
/// `cols` says which columns under which names; `fill_from` supplies unchanged TOAST
/// values from a full old row. Unchanged TOAST values that cannot be filled are left
/// out of the object and named in `unchanged_toast`, so a consumer never mistakes them
/// for NULL. `shrink` leaves out or cuts the columns an oversized plan names.
struct RowJson<'a> {
    table: &'a Table,
    tuple: &'a Tuple,
    cols: &'a [OutColumn],
    fill_from: Option<&'a Tuple>,
    shrink: Option<Shrink<'a>>,
}

impl<'a> RowJson<'a> {
    fn value(&self, i: usize) -> &'a ColumnValue {
        let value = &self.tuple.0[i];
        if matches!(value, ColumnValue::UnchangedToast)
            && let Some(old) = self.fill_from.and_then(|t| t.0.get(i))
            && !matches!(old, ColumnValue::UnchangedToast)
        {
            return old;
        }
        value
    }

    fn unchanged_columns(&self) -> Vec<&'a str> {
        self.cols
            .iter()
            .filter(|c| matches!(self.value(c.index), ColumnValue::UnchangedToast))
            .map(|c| c.name.as_str())
            .collect()
    }

    /// What shrinking does to column `i`: None = untouched, Some(None) = omitted,
    /// Some(Some(n)) = cut to `n` bytes.
    fn shrink_of(&self, i: usize, value: &ColumnValue) -> Option<Option<usize>> {
        let s = self.shrink?;
        match s.plan {
            OversizedPlan::Fail => None,
            OversizedPlan::Omit(cols) => cols.contains(&i).then_some(None),
            OversizedPlan::Truncate(cols) if cols.contains(&i) => {
                let kind = &self.table.columns[i].kind;
                match value {
                    ColumnValue::Text(b) if matches!(kind, TypeKind::Text | TypeKind::Unknown) => {
                        (b.len() > s.max_value_bytes).then_some(Some(s.max_value_bytes))
                    }
                    ColumnValue::Text(_) | ColumnValue::Binary(_) => Some(None),
                    _ => None,
                }
            }
            OversizedPlan::Truncate(_) => None,
        }
    }

    /// Names of the columns shrinking changed.
    fn shrunk(&self) -> Vec<&'a str> {
        self.cols
            .iter()
            .filter(|c| self.shrink_of(c.index, self.value(c.index)).is_some())
            .map(|c| c.name.as_str())
            .collect()
    }
}

/// Cuts `b` to at most `n` bytes on a UTF-8 character boundary.
fn cut(b: &[u8], n: usize) -> &[u8] {
    let mut end = n.min(b.len());
    while end > 0 && end < b.len() && (b[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    &b[..end]
}

impl Serialize for RowJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for c in self.cols {
            let col = &self.table.columns[c.index];
            let value = self.value(c.index);
            let text = match (value, self.shrink_of(c.index, value)) {
                (_, Some(None)) => continue,
                (ColumnValue::Text(b), Some(Some(n))) => cut(b, n),
                (ColumnValue::Text(b), None) => b,
                (ColumnValue::Null, _) => {
                    map.serialize_entry(&c.name, &())?;
                    continue;
                }
                (ColumnValue::Binary(b), _) => {
                    use base64::Engine as _;
                    map.serialize_entry(
                        &c.name,
                        &base64::engine::general_purpose::STANDARD.encode(b),
                    )?;
                    continue;
                }
                (ColumnValue::UnchangedToast, _) => continue,
            };
            map.serialize_entry(
                &c.name,
                &JsonText {
                    kind: &col.kind,
                    text,
                },
            )?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::rules::{Choice, Literal, OutboxSpec, RuleSpec, TableSpec, Template};
    use bytes::Bytes;
    use serde_json::{Value, json};

    fn text(s: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn orders() -> Table {
        Table {
            relation_id: 1,
            schema: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                TableColumn {
                    name: "id".into(),
                    type_oid: 23,
                    kind: TypeKind::Int,
                },
                TableColumn {
                    name: "status".into(),
                    type_oid: 25,
                    kind: TypeKind::Text,
                },
                TableColumn {
                    name: "note".into(),
                    type_oid: 25,
                    kind: TypeKind::Text,
                },
            ],
            token: "orders".into(),
            plan: TablePlan::default_for(&[("id", 23), ("status", 25), ("note", 25)], "orders"),
        }
    }

    fn tx() -> TxContext<'static> {
        TxContext {
            source: "store",
            commit_lsn: Lsn(0x16B3748),
            xid: 900,
            commit_lsn_text: "0/16B3748",
            time: "2000-01-01T00:00:00Z",
        }
    }

    fn decode(ev: &DomainEvent) -> Value {
        serde_json::from_slice(&ev.payload).unwrap()
    }

    fn ev_hash(ev: &DomainEvent) -> String {
        decode(ev)["schemahash"].as_str().unwrap().to_string()
    }

    /// `orders` with REPLICA IDENTITY FULL and a mapping.
    fn mapped_orders(spec: &TableSpec) -> Result<Table, crate::events::rules::BindError> {
        let cols: Vec<(String, u32)> = vec![
            ("id".into(), 23),
            ("status".into(), 25),
            ("note".into(), 25),
        ];
        let plan = crate::events::rules::bind(
            &crate::events::rules::LiveTable {
                qualified: "public.orders",
                token: "orders",
                columns: &cols,
                replica_identity: ReplicaIdentity::Full,
                default_key: &[0],
            },
            Some(spec),
            None,
        )?;
        Ok(Table {
            replica_identity: ReplicaIdentity::Full,
            plan,
            ..orders()
        })
    }

    fn change<'a>(op: Operation, old: Option<&'a Tuple>, new: Option<&'a Tuple>) -> RowChange<'a> {
        RowChange {
            op,
            old: old.map(|t| (OldKind::Full, t)),
            new,
        }
    }

    fn row(id: &str, status: &str, note: &str) -> Tuple {
        Tuple(vec![text(id), text(status), text(note)])
    }

    fn store_spec() -> TableSpec {
        let mut spec = TableSpec {
            schema: "public".into(),
            table: "orders".into(),
            line: 7,
            rename: vec![("id".into(), "order_id".into())],
            exclude: vec!["note".into()],
            subject: Some(
                Template::parse(
                    "{source}.order.{event}.{key.id}",
                    crate::events::rules::TABLE_PLACEHOLDERS,
                )
                .unwrap(),
            ),
            attributes: vec![("aggregate".into(), "order".into())],
            ..TableSpec::default()
        };
        spec.events[0] = Some(Choice::Event("OrderPlaced".into()));
        spec.events[1] = Some(Choice::Drop);
        spec.rules = vec![
            RuleSpec {
                ops: vec![Operation::Update],
                changed: vec!["status".into()],
                new: vec![("status".into(), vec![Literal::Text("shipped".into())])],
                old: vec![(
                    "status".into(),
                    vec![Literal::Text("paid".into()), Literal::Text("packed".into())],
                )],
                choice: Choice::Event("OrderShipped".into()),
            },
            RuleSpec {
                ops: vec![Operation::Update],
                changed: vec!["status".into()],
                new: vec![("status".into(), vec![Literal::Text("paid".into())])],
                old: vec![],
                choice: Choice::Event("OrderPaid".into()),
            },
        ];
        spec
    }

    #[test]
    fn rules_pick_domain_events_in_order_and_drop_the_rest() {
        let t = mapped_orders(&store_spec()).unwrap();
        let map = |c: RowChange<'_>| map_change(&tx(), 0, &t, &c, None).unwrap();

        let placed = row("7", "new", "n");
        let ev = map(change(Operation::Insert, None, Some(&placed))).unwrap();
        assert_eq!(ev.event_type, "OrderPlaced");
        assert_eq!(ev.subject, "store.order.OrderPlaced.7");
        let v = decode(&ev);
        assert_eq!(v["aggregate"], "order");
        assert_eq!(v["data"]["after"], json!({"order_id": 7, "status": "new"}));
        assert_eq!(v["data"]["key"], json!({"order_id": 7}));

        let (new, paid, packed, shipped) = (
            row("7", "new", "n"),
            row("7", "paid", "n"),
            row("7", "packed", "n"),
            row("7", "shipped", "n"),
        );
        let ev = map(change(Operation::Update, Some(&new), Some(&paid))).unwrap();
        assert_eq!(ev.event_type, "OrderPaid");
        // The first matching rule wins: paid -> shipped is a transition the first rule names.
        let ev = map(change(Operation::Update, Some(&paid), Some(&shipped))).unwrap();
        assert_eq!(ev.event_type, "OrderShipped");
        let ev = map(change(Operation::Update, Some(&packed), Some(&shipped))).unwrap();
        assert_eq!(ev.event_type, "OrderShipped");
        // new -> shipped matches no rule: the update default is drop.
        assert!(map(change(Operation::Update, Some(&new), Some(&shipped))).is_none());
        // Status unchanged: no rule, dropped.
        let note_changed = row("7", "paid", "other");
        assert!(map(change(Operation::Update, Some(&paid), Some(&note_changed))).is_none());
        // Delete keeps the default type.
        let ev = map(change(Operation::Delete, Some(&paid), None)).unwrap();
        assert_eq!(ev.event_type, "orders.deleted");
        assert_eq!(ev.subject, "store.order.deleted.7");
    }

    #[test]
    fn a_rule_naming_an_unknown_or_old_column_is_refused_with_names() {
        let mut spec = store_spec();
        spec.rules[1].new[0].0 = "stauts".into();
        let err = mapped_orders(&spec).unwrap_err().to_string();
        assert!(
            err.contains("public.orders")
                && err.contains("\"stauts\"")
                && err.contains("rule 2")
                && err.contains("config line 7"),
            "{err}"
        );

        let cols: Vec<(String, u32)> = vec![
            ("id".into(), 23),
            ("status".into(), 25),
            ("note".into(), 25),
        ];
        let err = crate::events::rules::bind(
            &crate::events::rules::LiveTable {
                qualified: "public.orders",
                token: "orders",
                columns: &cols,
                replica_identity: ReplicaIdentity::Default,
                default_key: &[0],
            },
            Some(&store_spec()),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("REPLICA IDENTITY FULL"), "{err}");
    }

    #[test]
    fn the_schema_hash_follows_the_shape() {
        let a = orders().plan.fingerprint;
        let b = TablePlan::default_for(&[("id", 23), ("status", 25)], "orders").fingerprint;
        let c = TablePlan::default_for(&[("id", 23), ("status", 25), ("note", 1043)], "orders")
            .fingerprint;
        assert_eq!(a.len(), 8);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a,
            TablePlan::default_for(&[("id", 23), ("status", 25), ("note", 25)], "orders")
                .fingerprint
        );
    }

    #[test]
    fn marking_the_last_event_keeps_valid_json() {
        let new = row("7", "new", "n");
        let mut ev = map_change(
            &tx(),
            0,
            &orders(),
            &change(Operation::Insert, None, Some(&new)),
            None,
        )
        .unwrap()
        .unwrap();
        let len = ev.payload.len();
        ev.mark_last();
        assert_eq!(ev.payload.len(), len);
        assert_eq!(decode(&ev)["txlast"], true);
    }

    #[test]
    fn outbox_rows_become_their_own_events_and_only_inserts_count() {
        let cols: Vec<(String, u32)> = [
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
        ]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                if *n == "payload" || *n == "headers" {
                    3802
                } else {
                    25
                },
            )
        })
        .collect();
        let spec = OutboxSpec {
            schema: "public".into(),
            table: "outbox".into(),
            line: 3,
            id: "id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: "payload".into(),
            headers: Some("headers".into()),
            subject: Template::parse(
                "{source}.{aggregate_type}.{event}",
                crate::events::rules::OUTBOX_PLACEHOLDERS,
            )
            .unwrap(),
        };
        let plan = crate::events::rules::bind(
            &crate::events::rules::LiveTable {
                qualified: "public.outbox",
                token: "outbox",
                columns: &cols,
                replica_identity: ReplicaIdentity::Default,
                default_key: &[0],
            },
            None,
            Some(&spec),
        )
        .unwrap();
        let table = Table {
            relation_id: 2,
            schema: "public".into(),
            name: "outbox".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .map(|(n, t)| TableColumn {
                    name: n.clone(),
                    type_oid: *t,
                    kind: TypeKind::Json,
                })
                .collect(),
            token: "outbox".into(),
            plan,
        };
        let new = Tuple(vec![
            text("e-1"),
            text("order.line"),
            text("42"),
            text("OrderPlaced"),
            text(r#"{"total": 12.5, "items": [1, 2]}"#),
            text(r#"{"trace-id": "abc", "n": 1}"#),
        ]);
        let ev = map_change(
            &tx(),
            4,
            &table,
            &change(Operation::Insert, None, Some(&new)),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(ev.subject, "store.order_line.OrderPlaced");
        assert_eq!(ev.event_type, "OrderPlaced");
        assert_eq!(
            ev.headers,
            vec![
                ("trace-id".to_string(), "abc".to_string()),
                ("n".to_string(), "1".to_string())
            ]
        );
        let v = decode(&ev);
        assert_eq!(v["data"], json!({"total": 12.5, "items": [1, 2]}));
        assert_eq!(v["subject"], "42");
        assert_eq!(v["aggregatetype"], "order.line");
        assert_eq!(v["outboxid"], "e-1");
        assert_eq!(v["id"], "store:0/16B3748:4");
        let deleted = map_change(
            &tx(),
            5,
            &table,
            &change(Operation::Delete, Some(&new), None),
            None,
        )
        .unwrap();
        assert!(deleted.is_none());
    }

    #[test]
    fn messages_become_events_typed_by_config_or_content() {
        let spec = MessageSpec {
            prefix: "domain".into(),
            event_type: None,
            type_field: Some("type".into()),
            subject: Template::parse(
                "{source}.{prefix}.{event}",
                crate::events::rules::MESSAGE_PLACEHOLDERS,
            )
            .unwrap(),
        };
        let ev = map_message(&tx(), 2, &spec, br#"{"type": "StockReserved", "sku": "A"}"#);
        assert_eq!(ev.event_type, "StockReserved");
        assert_eq!(ev.subject, "store.domain.StockReserved");
        assert_eq!(
            decode(&ev)["data"],
            json!({"type": "StockReserved", "sku": "A"})
        );
        // Not JSON: kept as a string, typed by the prefix.
        let ev = map_message(&tx(), 3, &spec, b"plain text");
        assert_eq!(ev.event_type, "domain");
        assert_eq!(decode(&ev)["data"], "plain text");
    }

    #[test]
    fn oversized_rows_shrink_the_columns_the_plan_names() {
        let long = "é".repeat(5000);
        let new = row("7", "new", &long);
        for (mode, want_omitted) in [
            (
                crate::events::rules::Oversized::Omit(vec!["note".into()]),
                true,
            ),
            (
                crate::events::rules::Oversized::Truncate(vec!["note".into()]),
                false,
            ),
        ] {
            let spec = TableSpec {
                schema: "public".into(),
                table: "orders".into(),
                oversized: mode,
                ..TableSpec::default()
            };
            let t = mapped_orders(&spec).unwrap();
            let shrink = Shrink {
                plan: &t.plan.oversized,
                max_value_bytes: 101,
            };
            let ev = map_change(
                &tx(),
                0,
                &t,
                &change(Operation::Insert, None, Some(&new)),
                Some(shrink),
            )
            .unwrap()
            .unwrap();
            let v = decode(&ev);
            if want_omitted {
                assert!(v["data"]["after"].get("note").is_none());
                assert_eq!(v["data"]["omitted"], json!(["note"]));
            } else {
                // Cut on a character boundary: 50 two-byte characters.
                assert_eq!(v["data"]["after"]["note"], "é".repeat(50));
                assert_eq!(v["data"]["truncated"], json!(["note"]));
            }
            assert_eq!(v["data"]["after"]["status"], "new");
        }
    }

    #[test]
    fn insert_becomes_created_event() {
        let new = Tuple(vec![text("7"), text("new"), ColumnValue::Null]);
        let ev = map_change(
            &tx(),
            3,
            &orders(),
            &RowChange {
                op: Operation::Insert,
                old: None,
                new: Some(&new),
            },
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(ev.subject, "store.orders.created");
        assert_eq!(ev.event_type, "orders.created");
        assert_eq!(ev.id.to_string(), "store:0/16B3748:3");
        assert_eq!(
            decode(&ev),
            json!({
                "specversion": "1.0",
                "id": "store:0/16B3748:3",
                "source": "/tidemark/store",
                "type": "orders.created",
                "subject": "orders",
                "time": "2000-01-01T00:00:00Z",
                "datacontenttype": "application/json",
                "commitlsn": "0/16B3748",
                "xid": 900,
                "txindex": 3,
                "schemahash": ev_hash(&ev),
                "txlast": false,
                "data": {
                    "op": "insert",
                    "table": "public.orders",
                    "key": {"id": 7},
                    "before": null,
                    "after": {"id": 7, "status": "new", "note": null}
                }
            })
        );
    }

    #[test]
    fn update_with_key_change_and_unchanged_toast() {
        let old = Tuple(vec![text("7"), ColumnValue::Null, ColumnValue::Null]);
        let new = Tuple(vec![text("8"), text("paid"), ColumnValue::UnchangedToast]);
        let ev = map_change(
            &tx(),
            0,
            &orders(),
            &RowChange {
                op: Operation::Update,
                old: Some((OldKind::Key, &old)),
                new: Some(&new),
            },
            None,
        )
        .unwrap()
        .unwrap();
        let v = decode(&ev);
        assert_eq!(v["type"], "orders.updated");
        assert_eq!(v["data"]["key"], json!({"id": 8}));
        assert_eq!(v["data"]["before"], json!({"id": 7}));
        assert_eq!(v["data"]["after"], json!({"id": 8, "status": "paid"}));
        assert_eq!(v["data"]["unchanged_toast"], json!(["note"]));
    }

    #[test]
    fn unchanged_toast_is_filled_from_a_full_old_row() {
        let old = Tuple(vec![text("7"), text("new"), text("long text")]);
        let new = Tuple(vec![text("7"), text("paid"), ColumnValue::UnchangedToast]);
        let ev = map_change(
            &tx(),
            0,
            &orders(),
            &RowChange {
                op: Operation::Update,
                old: Some((OldKind::Full, &old)),
                new: Some(&new),
            },
            None,
        )
        .unwrap()
        .unwrap();
        let v = decode(&ev);
        assert_eq!(
            v["data"]["after"],
            json!({"id": 7, "status": "paid", "note": "long text"})
        );
        assert_eq!(
            v["data"]["before"],
            json!({"id": 7, "status": "new", "note": "long text"})
        );
        assert!(v["data"].get("unchanged_toast").is_none());
    }

    #[test]
    fn delete_and_truncate() {
        let old = Tuple(vec![text("7"), ColumnValue::Null, ColumnValue::Null]);
        let ev = map_change(
            &tx(),
            1,
            &orders(),
            &RowChange {
                op: Operation::Delete,
                old: Some((OldKind::Key, &old)),
                new: None,
            },
            None,
        )
        .unwrap()
        .unwrap();
        let v = decode(&ev);
        assert_eq!(ev.subject, "store.orders.deleted");
        assert_eq!(v["data"]["key"], json!({"id": 7}));
        assert_eq!(v["data"]["after"], Value::Null);

        let ev = map_truncate(&tx(), 2, &orders()).unwrap();
        assert_eq!(ev.subject, "store.orders.truncated");
        assert_eq!(decode(&ev)["data"]["op"], "truncate");
    }

    #[test]
    fn wrong_tuple_width_is_an_error() {
        let new = Tuple(vec![text("7")]);
        let err = map_change(
            &tx(),
            0,
            &orders(),
            &RowChange {
                op: Operation::Insert,
                old: None,
                new: Some(&new),
            },
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "row of public.orders has 1 columns but its relation message listed 3"
        );
    }

    #[test]
    fn tokens_are_single_subject_tokens() {
        assert_eq!(table_token("public", "orders"), "orders");
        assert_eq!(table_token("sales", "orders"), "sales_orders");
        assert_eq!(table_token("public", "odd name.x*>"), "odd_name_x__");
    }
}
