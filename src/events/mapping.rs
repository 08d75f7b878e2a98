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
use std::sync::Arc;

use crate::events::envelope::{self, EnvelopeFields, JsonData};
use crate::events::json;
use crate::events::rules::{Bound, MessageSpec, OversizedPlan, TablePlan};
use crate::position::{EventId, Lsn};
use crate::postgres::pgoutput::{ColumnValue, OldKind, ReplicaIdentity, Tuple};
use crate::postgres::values::TypeKind;

mod markers;
mod row_json;
pub use markers::{heartbeat_event, reset_marker, sync_event, transaction_summary};
use row_json::RowJson;

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
    /// `schema.table`, shared with each of its events (`DomainEvent::origin`).
    pub qualified: Arc<str>,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<TableColumn>,
    /// The table's token in event types and subjects.
    pub token: String,
    /// How its changes become events.
    pub plan: TablePlan,
}

/// `schema.table`, as `Table::qualified` holds it.
pub fn qualified_name(schema: &str, name: &str) -> Arc<str> {
    let mut s = String::with_capacity(schema.len() + name.len() + 1);
    s.push_str(schema);
    s.push('.');
    s.push_str(name);
    s.into()
}

/// The subject token for a table: `<table>` in `public`, `<schema>_<table>` elsewhere.
/// Characters NATS does not allow in a token (space, `.`, `*`, `>`) become `_`.
pub fn table_token(schema: &str, name: &str) -> String {
    let raw = if schema == "public" {
        name.to_string()
    } else {
        format!("{schema}_{name}")
    };
    token(&raw).into_owned()
}

/// `raw` as one subject token.
pub fn token(raw: &str) -> std::borrow::Cow<'_, str> {
    let odd = |c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>') || c.is_control();
    if !raw.chars().any(odd) {
        return std::borrow::Cow::Borrowed(raw);
    }
    raw.chars().map(|c| if odd(c) { '_' } else { c }).collect()
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
    /// The table it came from (`schema.table`), or the message prefix: for messages.
    pub origin: Arc<str>,
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
                table: table.qualified.to_string(),
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
    let json_null = after.as_ref().map(|r| r.json_null_columns());
    let before_json_null = match change.old {
        Some((OldKind::Full, _)) => before.as_ref().map(|r| r.json_null_columns()),
        _ => None,
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
    let data = Data {
        op: change.op.as_str(),
        table: &table.qualified,
        key,
        before,
        after,
        unchanged_toast,
        json_null: json_null.unwrap_or_default(),
        before_json_null: before_json_null.unwrap_or_default(),
        omitted,
        truncated,
    };
    let subject = subject_for(tx, table, change.op, event_name, key_tuple);
    Ok(Some(build(
        tx,
        index,
        event_type,
        subject,
        &table.token,
        table.qualified.clone(),
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
            let name = token(event_name);
            let mut s = String::with_capacity(tx.source.len() + table.token.len() + name.len() + 2);
            s.push_str(tx.source);
            s.push('.');
            s.push_str(&table.token);
            s.push('.');
            s.push_str(&name);
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
    let data = Data {
        op: Operation::Truncate.as_str(),
        table: &table.qualified,
        key: None,
        before: None,
        after: None,
        unchanged_toast: Vec::new(),
        json_null: Vec::new(),
        before_json_null: Vec::new(),
        omitted: Vec::new(),
        truncated: Vec::new(),
    };
    let subject = subject_for(tx, table, Operation::Truncate, &event_name, None);
    Some(build(
        tx,
        index,
        &event_type,
        subject,
        &table.token,
        table.qualified.clone(),
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
        &event_type,
        subject,
        &aggregate_id,
        table.qualified.clone(),
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

impl JsonData for Payload<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Raw(b) => match serde_json::from_slice::<&serde_json::value::RawValue>(b) {
                Ok(raw) => out.extend_from_slice(raw.get().as_bytes()),
                Err(_) => json::text(out, b),
            },
            Payload::Null => out.extend_from_slice(b"null"),
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
        &event_type,
        subject,
        &spec.prefix,
        spec.prefix.as_str().into(),
        None,
        false,
        &ext,
        &Payload::Raw(content),
    )
}

/// The `data` of a row event.
struct Data<'a> {
    op: &'static str,
    table: &'a str,
    key: Option<RowJson<'a>>,
    before: Option<RowJson<'a>>,
    after: Option<RowJson<'a>>,
    /// The lists below are left out when empty.
    unchanged_toast: Vec<&'a str>,
    /// Columns of `after` (and of a full `before`) holding a JSON `null`, not SQL NULL.
    json_null: Vec<&'a str>,
    before_json_null: Vec<&'a str>,
    omitted: Vec<&'a str>,
    truncated: Vec<&'a str>,
}

impl JsonData for Data<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"op\":");
        json::str(out, self.op);
        out.extend_from_slice(b",\"table\":");
        json::str(out, self.table);
        let rows: [(&[u8], &Option<RowJson<'_>>); 3] = [
            (b",\"key\":", &self.key),
            (b",\"before\":", &self.before),
            (b",\"after\":", &self.after),
        ];
        for (name, row) in rows {
            out.extend_from_slice(name);
            match row {
                Some(row) => row.write_json(out),
                None => out.extend_from_slice(b"null"),
            }
        }
        let lists: [(&[u8], &[&str]); 5] = [
            (b",\"unchanged_toast\":[", &self.unchanged_toast),
            (b",\"json_null\":[", &self.json_null),
            (b",\"before_json_null\":[", &self.before_json_null),
            (b",\"omitted\":[", &self.omitted),
            (b",\"truncated\":[", &self.truncated),
        ];
        for (name, list) in lists {
            if list.is_empty() {
                continue;
            }
            out.extend_from_slice(name);
            for (k, item) in list.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                json::str(out, item);
            }
            out.push(b']');
        }
        out.push(b'}');
    }
}

#[allow(clippy::too_many_arguments)]
fn build<D: JsonData + ?Sized>(
    tx: &TxContext<'_>,
    index: u64,
    event_type: &str,
    subject: String,
    ce_subject: &str,
    origin: Arc<str>,
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
    // `id.to_string()`, from the texts at hand (the hot path: no formatter).
    let mut msg_id = String::with_capacity(tx.source.len() + tx.commit_lsn_text.len() + 22);
    msg_id.push_str(tx.source);
    msg_id.push(':');
    msg_id.push_str(tx.commit_lsn_text);
    msg_id.push(':');
    msg_id.push_str(itoa::Buffer::new().format(index));
    debug_assert_eq!(msg_id, id.to_string());
    let (payload, txlast) = envelope::encode(&EnvelopeFields {
        id: &msg_id,
        source: tx.source,
        event_type,
        subject: ce_subject,
        time: tx.time,
        commit_lsn: tx.commit_lsn_text,
        xid: tx.xid,
        index,
        schema,
        // Table events carry their row shape's version; tidemark's markers their
        // format's; outbox and message payloads are the application's.
        dataschema: schema.or_else(|| {
            crate::events::schema::is_marker(event_type)
                .then_some(crate::events::schema::MARKER_VERSION)
        }),
        snapshot,
        extensions,
        data,
    });
    DomainEvent {
        id,
        msg_id,
        subject,
        origin,
        payload,
        txlast_at: Some(txlast),
        headers: Vec::new(),
        commit_time: None,
    }
}

#[cfg(test)]
mod tests;
