//! Row changes to domain events. Pure: a decoded change plus what we know of its table
//! in, one `DomainEvent` (subject, id, encoded CloudEvent) out.
//!
//! The default mapping (the only one until mapping rules land, issue 4): event type
//! `<table>.<created|updated|deleted|truncated>`, subject
//! `<source>.<table>.<created|updated|deleted|truncated>`. Tables outside the `public`
//! schema are named `<schema>_<table>` in types and subjects, so one table is always one
//! subject token.

use bytes::Bytes;
use serde::Serialize;

use crate::events::envelope::{self, EnvelopeFields};
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
    /// Indices of the key columns: the primary key, or the replica identity columns
    /// for a table without one.
    pub key: Vec<usize>,
    /// The table's token in event types and subjects.
    pub token: String,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
        }
    }

    /// The default event name.
    pub fn event_name(self) -> &'static str {
        match self {
            Operation::Insert => "created",
            Operation::Update => "updated",
            Operation::Delete => "deleted",
            Operation::Truncate => "truncated",
        }
    }
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
    pub payload: Bytes,
}

/// A tuple that does not match its table's column list: a protocol violation or a
/// relation cache bug, never a value problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("row of {table} has {got} columns but its relation message listed {expected}")]
pub struct ShapeError {
    pub table: String,
    pub expected: usize,
    pub got: usize,
}

/// Builds the default domain event for one row change.
pub fn map_change(
    tx: &TxContext<'_>,
    index: u64,
    table: &Table,
    change: &RowChange<'_>,
) -> Result<DomainEvent, ShapeError> {
    for tuple in change.new.into_iter().chain(change.old.map(|(_, t)| t)) {
        if tuple.0.len() != table.columns.len() {
            return Err(ShapeError {
                table: table.qualified_name(),
                expected: table.columns.len(),
                got: tuple.0.len(),
            });
        }
    }
    let old_full = match change.old {
        Some((OldKind::Full, t)) => Some(t),
        _ => None,
    };
    let row = |tuple, only, fill_from| RowJson::new(table, tuple, only, fill_from);
    // On an UPDATE that changes the key, the event's key is the new one and `before`
    // carries the old.
    let key = match change.new.or(change.old.map(|(_, t)| t)) {
        Some(t) if !table.key.is_empty() => Some(row(t, Some(&table.key), None)),
        _ => None,
    };
    let before = change.old.map(|(kind, t)| match kind {
        OldKind::Full => row(t, None, None),
        OldKind::Key => row(t, Some(&table.key), None),
    });
    let after = change.new.map(|t| row(t, None, old_full));
    let unchanged_toast = match &after {
        Some(a) => a.unchanged_columns(),
        None => Vec::new(),
    };
    let qualified = table.qualified_name();
    let data = Data {
        op: change.op.as_str(),
        table: &qualified,
        key,
        before,
        after,
        unchanged_toast,
    };
    Ok(build(tx, index, &table.token, change.op, &data))
}

/// Builds the event for one table of a TRUNCATE.
pub fn map_truncate(tx: &TxContext<'_>, index: u64, table: &Table) -> DomainEvent {
    let qualified = table.qualified_name();
    let data = Data {
        op: Operation::Truncate.as_str(),
        table: &qualified,
        key: None,
        before: None,
        after: None,
        unchanged_toast: Vec::new(),
    };
    build(tx, index, &table.token, Operation::Truncate, &data)
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
) -> DomainEvent {
    let id = EventId {
        source: source.to_string(),
        commit_lsn: Lsn(new_slot_start.0.saturating_sub(1)),
        index: u64::MAX,
    };
    let msg_id = id.to_string();
    let data = serde_json::json!({
        "op": "reset",
        "new_slot_lsn": new_slot_start.to_string(),
        "old_slot_confirmed_flush_lsn": old_confirmed.map(|l| l.to_string()),
        "last_stored_commit_lsn": last_stored.map(|l| l.to_string()),
    });
    let time = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let lsn_text = id.commit_lsn.to_string();
    let payload = envelope::encode(&EnvelopeFields {
        id: &msg_id,
        source,
        event_type: "tidemark.reset",
        subject: "tidemark",
        time: &time,
        commit_lsn: &lsn_text,
        xid: 0,
        index: u64::MAX,
        data: &data,
    });
    DomainEvent {
        id,
        msg_id,
        subject: format!("{source}._tidemark.reset"),
        event_type: "tidemark.reset".into(),
        payload,
    }
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
}

fn build(
    tx: &TxContext<'_>,
    index: u64,
    token: &str,
    op: Operation,
    data: &Data<'_>,
) -> DomainEvent {
    let id = EventId {
        source: tx.source.to_string(),
        commit_lsn: tx.commit_lsn,
        index,
    };
    let msg_id = id.to_string();
    let event_type = format!("{token}.{}", op.event_name());
    let subject = format!("{}.{token}.{}", tx.source, op.event_name());
    let payload = envelope::encode(&EnvelopeFields {
        id: &msg_id,
        source: tx.source,
        event_type: &event_type,
        subject: token,
        time: tx.time,
        commit_lsn: tx.commit_lsn_text,
        xid: tx.xid,
        index,
        data,
    });
    DomainEvent {
        id,
        msg_id,
        subject,
        event_type,
        payload,
    }
}

/// The columns of a tuple, serialized as a JSON object straight from the wire bytes.
/// `only` restricts it to some columns (the key); `fill_from` supplies unchanged TOAST
/// values from a full old row. Unchanged TOAST values that cannot be filled are left
/// out of the object and named in `unchanged_toast`, so a consumer never mistakes them
/// for NULL.
struct RowJson<'a> {
    table: &'a Table,
    tuple: &'a Tuple,
    only: Option<&'a [usize]>,
    fill_from: Option<&'a Tuple>,
}

impl<'a> RowJson<'a> {
    fn new(
        table: &'a Table,
        tuple: &'a Tuple,
        only: Option<&'a [usize]>,
        fill_from: Option<&'a Tuple>,
    ) -> Self {
        RowJson {
            table,
            tuple,
            only,
            fill_from,
        }
    }

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

    fn indices(&self) -> Box<dyn Iterator<Item = usize> + 'a> {
        match self.only {
            Some(idx) => Box::new(idx.iter().copied()),
            None => Box::new(0..self.table.columns.len()),
        }
    }

    fn unchanged_columns(&self) -> Vec<&'a str> {
        self.indices()
            .filter(|i| matches!(self.value(*i), ColumnValue::UnchangedToast))
            .map(|i| self.table.columns[i].name.as_str())
            .collect()
    }
}

impl Serialize for RowJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for i in self.indices() {
            let col = &self.table.columns[i];
            match self.value(i) {
                ColumnValue::Null => map.serialize_entry(&col.name, &())?,
                ColumnValue::Text(b) => map.serialize_entry(
                    &col.name,
                    &JsonText {
                        kind: &col.kind,
                        text: b,
                    },
                )?,
                ColumnValue::Binary(b) => {
                    use base64::Engine as _;
                    map.serialize_entry(
                        &col.name,
                        &base64::engine::general_purpose::STANDARD.encode(b),
                    )?
                }
                ColumnValue::UnchangedToast => {}
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            key: vec![0],
            token: "orders".into(),
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
        )
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
        )
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
        )
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
        )
        .unwrap();
        let v = decode(&ev);
        assert_eq!(ev.subject, "store.orders.deleted");
        assert_eq!(v["data"]["key"], json!({"id": 7}));
        assert_eq!(v["data"]["after"], Value::Null);

        let ev = map_truncate(&tx(), 2, &orders());
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
