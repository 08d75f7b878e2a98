//! Row changes to domain events. Pure: a decoded change plus what we know of its table
//! in, one `DomainEvent` (subject, id, encoded CloudEvent) out.
//!
//! The default mapping (the only one until mapping rules land, issue 4): event type
//! `<table>.<created|updated|deleted|truncated>`, subject
//! `<source>.<table>.<created|updated|deleted|truncated>`. Tables outside the `public`
//! schema are named `<schema>_<table>` in types and subjects, so one table is always one
//! subject token.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::events::envelope::{self, EnvelopeFields};
use crate::position::{EventId, Lsn};
use crate::postgres::pgoutput::{ColumnValue, OldKind, PgTimestamp, ReplicaIdentity, Tuple};
use crate::postgres::values::{TypeKind, text_to_json};

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

/// The transaction an event belongs to.
#[derive(Clone, Copy, Debug)]
pub struct TxContext<'a> {
    pub source: &'a str,
    pub commit_lsn: Lsn,
    pub xid: u32,
    pub commit_time: PgTimestamp,
}

/// A domain event ready to publish.
#[derive(Clone, Debug)]
pub struct DomainEvent {
    pub id: EventId,
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
    let mut data = Map::new();
    data.insert("op".into(), Value::String(change.op.as_str().into()));
    data.insert("table".into(), Value::String(table.qualified_name()));

    let old_full = match change.old {
        Some((OldKind::Full, t)) => Some(t),
        _ => None,
    };
    let key_source = change.new.or(change.old.map(|(_, t)| t));
    let key = match key_source {
        Some(t) if !table.key.is_empty() => {
            // On an UPDATE that changes the key, the event's key is the new one and
            // `before` carries the old.
            Value::Object(row_object(
                table,
                t,
                Some(&table.key),
                None,
                &mut Vec::new(),
            ))
        }
        _ => Value::Null,
    };
    data.insert("key".into(), key);

    let before = match change.old {
        Some((OldKind::Full, t)) => {
            Value::Object(row_object(table, t, None, None, &mut Vec::new()))
        }
        Some((OldKind::Key, t)) => Value::Object(row_object(
            table,
            t,
            Some(&table.key),
            None,
            &mut Vec::new(),
        )),
        None => Value::Null,
    };
    data.insert("before".into(), before);

    let mut unchanged = Vec::new();
    let after = match change.new {
        Some(t) => Value::Object(row_object(table, t, None, old_full, &mut unchanged)),
        None => Value::Null,
    };
    data.insert("after".into(), after);
    if !unchanged.is_empty() {
        data.insert(
            "unchanged_toast".into(),
            Value::Array(unchanged.into_iter().map(Value::String).collect()),
        );
    }

    Ok(build(
        tx,
        index,
        &table.token,
        change.op,
        Value::Object(data),
    ))
}

/// Builds the event for one table of a TRUNCATE.
pub fn map_truncate(tx: &TxContext<'_>, index: u64, table: &Table) -> DomainEvent {
    let mut data = Map::new();
    data.insert("op".into(), Value::String("truncate".into()));
    data.insert("table".into(), Value::String(table.qualified_name()));
    data.insert("key".into(), Value::Null);
    data.insert("before".into(), Value::Null);
    data.insert("after".into(), Value::Null);
    build(
        tx,
        index,
        &table.token,
        Operation::Truncate,
        Value::Object(data),
    )
}

fn build(tx: &TxContext<'_>, index: u64, token: &str, op: Operation, data: Value) -> DomainEvent {
    let id = EventId {
        source: tx.source.to_string(),
        commit_lsn: tx.commit_lsn,
        index,
    };
    let event_type = format!("{token}.{}", op.event_name());
    let subject = format!("{}.{token}.{}", tx.source, op.event_name());
    let payload = envelope::encode(&EnvelopeFields {
        id: &id,
        source: tx.source,
        event_type: &event_type,
        subject: token,
        time: tx.commit_time,
        xid: tx.xid,
        data: &data,
    });
    DomainEvent {
        id,
        subject,
        event_type,
        payload,
    }
}

/// The columns of a tuple as a JSON object. `only` restricts it to some columns (the
/// key); `fill_from` supplies unchanged TOAST values from a full old row. Unchanged
/// TOAST values that cannot be filled are left out of the object and named in
/// `unchanged`, so a consumer never mistakes them for NULL.
fn row_object(
    table: &Table,
    tuple: &Tuple,
    only: Option<&[usize]>,
    fill_from: Option<&Tuple>,
    unchanged: &mut Vec<String>,
) -> Map<String, Value> {
    let mut obj = Map::new();
    let mut put = |i: usize| {
        let col = &table.columns[i];
        let mut value = &tuple.0[i];
        if matches!(value, ColumnValue::UnchangedToast)
            && let Some(old) = fill_from.and_then(|t| t.0.get(i))
            && !matches!(old, ColumnValue::UnchangedToast)
        {
            value = old;
        }
        let json = match value {
            ColumnValue::Null => Value::Null,
            ColumnValue::Text(b) => text_to_json(&col.kind, b),
            ColumnValue::Binary(b) => {
                use base64::Engine as _;
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
            ColumnValue::UnchangedToast => {
                unchanged.push(col.name.clone());
                return;
            }
        };
        obj.insert(col.name.clone(), json);
    };
    match only {
        Some(idx) => idx.iter().copied().for_each(&mut put),
        None => (0..table.columns.len()).for_each(&mut put),
    }
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            commit_time: PgTimestamp(0),
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
