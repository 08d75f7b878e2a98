//! The event contract: a JSON Schema (2020-12) for every event type a source can
//! publish, derived from the table's columns (their JSON forms from the value table),
//! the mapping (output names, excluded columns, the key, rule-based types) and the
//! CloudEvents envelope. Pure: descriptions in, schema documents out.
//!
//! Each event names its schema in the CloudEvents `dataschema` attribute:
//! `urn:tidemark:<source>:<type>:<version>`, where the version is the table's
//! `schemahash` (it changes with the row's shape) or, for tidemark's own markers, the
//! marker format's number. Outbox and message events carry the application's payload
//! and no `dataschema`.

use serde_json::{Value, json};

use crate::events::operation::Operation;
use crate::postgres::values::{Geo, TypeKind};

/// The `dataschema` URI of an event type at a version.
pub fn dataschema_uri(source: &str, event_type: &str, version: &str) -> String {
    format!("urn:tidemark:{source}:{event_type}:{version}")
}

/// The version of tidemark's marker events' format (`tidemark.*` types).
pub const MARKER_VERSION: &str = "1";

/// The marker event types tidemark itself publishes.
pub const MARKER_TYPES: [&str; 4] = [
    "tidemark.heartbeat",
    "tidemark.sync",
    "tidemark.transaction",
    "tidemark.reset",
];

/// Whether `event_type` is one of tidemark's own markers.
pub fn is_marker(event_type: &str) -> bool {
    MARKER_TYPES.contains(&event_type)
}

/// The file a schema is written to: `<type>.<version>.json`.
pub fn file_name(event_type: &str, version: &str) -> String {
    let safe: String = event_type
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.{version}.json")
}

/// One output column of a table event.
#[derive(Clone, Debug)]
pub struct ColumnShape {
    /// Its name in the event (after the mapping's renames).
    pub name: String,
    pub kind: TypeKind,
    /// NOT NULL in the table.
    pub not_null: bool,
}

/// What a table event's schema is made from.
#[derive(Clone, Debug)]
pub struct TableShape {
    pub source: String,
    /// `schema.table`.
    pub table: String,
    pub event_type: String,
    /// The table's `schemahash`.
    pub version: String,
    /// The operations that publish this type.
    pub ops: Vec<Operation>,
    pub columns: Vec<ColumnShape>,
    pub key: Vec<ColumnShape>,
    /// Static CloudEvents attributes the mapping adds.
    pub attributes: Vec<(String, String)>,
}

/// The JSON form of one value of `kind` (see the README's value table).
pub fn value_schema(kind: &TypeKind) -> Value {
    const NUMERIC: &str = r"^(-?[0-9]+(\.[0-9]+)?|NaN|-?Infinity)$";
    match kind {
        TypeKind::Bool => json!({"type": "boolean"}),
        TypeKind::Int => json!({"type": "integer"}),
        TypeKind::Float => json!({"anyOf": [
            {"type": "number"},
            {"enum": ["NaN", "Infinity", "-Infinity"]}
        ]}),
        TypeKind::Numeric | TypeKind::Money => json!({"type": "string", "pattern": NUMERIC}),
        TypeKind::Json => json!(true),
        TypeKind::Uuid => json!({"type": "string", "format": "uuid"}),
        TypeKind::Timestamp | TypeKind::Timestamptz => json!({"type": "string"}),
        TypeKind::Date | TypeKind::Time | TypeKind::TimeTz => json!({"type": "string"}),
        TypeKind::Bytea => json!({"type": "string", "contentEncoding": "base64"}),
        TypeKind::Text | TypeKind::Unknown => json!({"type": "string"}),
        // Any dimension, with NULLs.
        TypeKind::Array { element, .. } => json!({
            "type": "array",
            "items": {"anyOf": [value_schema(element), {"type": "null"}, {"type": "array"}]}
        }),
        TypeKind::Geometric(g) => match g {
            Geo::Point => json!({
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"]
            }),
            Geo::Line => json!({"type": "object", "required": ["a", "b", "c"]}),
            Geo::Circle => json!({"type": "object", "required": ["x", "y", "radius"]}),
            Geo::Path => json!({"type": "object", "required": ["closed", "points"]}),
            Geo::Lseg | Geo::Box | Geo::Polygon => json!({"type": "array"}),
        },
        TypeKind::Range(_) => json!({"type": "object"}),
        TypeKind::Multirange(_) => json!({"type": "array", "items": {"type": "object"}}),
        TypeKind::Composite(fields) => {
            let props: serde_json::Map<String, Value> = fields
                .iter()
                .map(|(n, k)| (n.clone(), nullable(value_schema(k))))
                .collect();
            json!({"type": "object", "properties": props, "additionalProperties": false})
        }
    }
}

fn nullable(schema: Value) -> Value {
    if schema == json!(true) {
        return schema;
    }
    json!({"anyOf": [schema, {"type": "null"}]})
}

fn column_schema(c: &ColumnShape) -> Value {
    let v = value_schema(&c.kind);
    if c.not_null { v } else { nullable(v) }
}

/// An object of `columns`: the `required` ones must be there, no others may be.
fn row_schema(columns: &[ColumnShape], required: &[&str]) -> Value {
    let props: serde_json::Map<String, Value> = columns
        .iter()
        .map(|c| (c.name.clone(), column_schema(c)))
        .collect();
    json!({
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": false
    })
}

/// The CloudEvents envelope every tidemark event has, with `type`, `data` and the
/// `dataschema` given.
fn envelope(
    id: &str,
    title: &str,
    event_type: &str,
    dataschema: Option<&str>,
    data: Value,
    extra: &[(String, String)],
) -> Value {
    let mut props = json!({
        "specversion": {"const": "1.0"},
        "id": {"type": "string", "pattern": "^.+:[0-9A-F]+/[0-9A-F]+:[0-9]+$"},
        "source": {"type": "string", "pattern": "^/tidemark/"},
        "type": {"const": event_type},
        "subject": {"type": "string"},
        "time": {"type": "string"},
        "datacontenttype": {"const": "application/json"},
        "commitlsn": {"type": "string", "pattern": "^[0-9A-F]+/[0-9A-F]+$"},
        "xid": {"type": "integer", "minimum": 0},
        "txindex": {"type": "integer", "minimum": 0},
        "txlast": {"type": "boolean"},
        "schemahash": {"type": "string"},
        "snapshot": {"const": true},
        "data": data
    });
    if let Some(uri) = dataschema {
        props["dataschema"] = json!({"const": uri});
    }
    for (k, v) in extra {
        props[k.as_str()] = json!({"const": v});
    }
    let mut required = vec![
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "datacontenttype",
        "commitlsn",
        "xid",
        "txindex",
        "txlast",
        "data",
    ];
    if dataschema.is_some() {
        required.push("dataschema");
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": id,
        "title": title,
        "type": "object",
        "properties": props,
        "required": required,
        // Extension attributes a mapping or an outbox adds are strings.
        "additionalProperties": {"type": "string"}
    })
}

/// The schema of one table event type.
pub fn table_event(shape: &TableShape) -> Value {
    let uri = dataschema_uri(&shape.source, &shape.event_type, &shape.version);
    let ops: Vec<&str> = shape.ops.iter().map(|o| o.as_str()).collect();
    let key_names: Vec<&str> = shape.key.iter().map(|c| c.name.as_str()).collect();
    let key = if shape.key.is_empty() {
        json!({"type": "null"})
    } else {
        nullable(row_schema(&shape.key, &key_names))
    };
    // `after` may leave out an unchanged TOASTed value (listed in unchanged_toast) or
    // an oversized one (listed in omitted): only the key is always there.
    let row = nullable(row_schema(&shape.columns, &key_names));
    // `before` is the old key, or the whole old row (REPLICA IDENTITY FULL).
    let before = json!({"anyOf": [{"type": "null"}, row_schema(&shape.columns, &[])]});
    let names = json!({"type": "array", "items": {"type": "string"}});
    let data = json!({
        "type": "object",
        "properties": {
            "op": {"enum": ops},
            "table": {"const": shape.table},
            "key": key,
            "before": before,
            "after": row,
            "unchanged_toast": names,
            "json_null": names,
            "before_json_null": names,
            "omitted": names,
            "truncated": names
        },
        "required": ["op", "table", "key", "before", "after"],
        "additionalProperties": false
    });
    envelope(
        &uri,
        &format!(
            "{} ({} of {}, source {})",
            shape.event_type,
            ops.join(", "),
            shape.table,
            shape.source
        ),
        &shape.event_type,
        Some(&uri),
        data,
        &shape.attributes,
    )
}

/// The marker event types tidemark itself publishes, with their `data` schemas.
pub fn marker_events(source: &str) -> Vec<(String, Value)> {
    let lsn = json!({"type": "string", "pattern": "^[0-9A-F]+/[0-9A-F]+$"});
    let nullable_lsn = json!({"anyOf": [lsn, {"type": "null"}]});
    let markers = [
        (
            "tidemark.heartbeat",
            "proof that changes flow while the tables are quiet",
            json!({"type": "object", "properties": {"op": {"const": "heartbeat"}}, "required": ["op"]}),
        ),
        (
            "tidemark.sync",
            "a read-your-writes position (tidemark wait)",
            json!({"type": "object", "properties": {"op": {"const": "sync"}}, "required": ["op"]}),
        ),
        (
            "tidemark.transaction",
            "a transaction's summary (transaction_events = true)",
            json!({
                "type": "object",
                "properties": {
                    "op": {"const": "commit"},
                    "xid": {"type": "integer"},
                    "commit_lsn": lsn,
                    "events": {"type": "integer", "minimum": 0}
                },
                "required": ["op", "xid", "commit_lsn", "events"]
            }),
        ),
        (
            "tidemark.reset",
            "where the source started over with a new slot",
            json!({
                "type": "object",
                "properties": {
                    "op": {"const": "reset"},
                    "reason": {"type": "string"},
                    "new_slot_lsn": lsn,
                    "old_slot_confirmed_flush_lsn": nullable_lsn,
                    "last_stored_commit_lsn": nullable_lsn
                },
                "required": ["op", "reason", "new_slot_lsn"]
            }),
        ),
    ];
    markers
        .into_iter()
        .map(|(ty, what, data)| {
            let uri = dataschema_uri(source, ty, MARKER_VERSION);
            let doc = envelope(
                &uri,
                &format!("{ty}: {what} (source {source})"),
                ty,
                Some(&uri),
                data,
                &[],
            );
            (ty.to_string(), doc)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> TableShape {
        TableShape {
            source: "store".into(),
            table: "public.orders".into(),
            event_type: "orders.created".into(),
            version: "5c0e6f1b".into(),
            ops: vec![Operation::Insert, Operation::Read],
            columns: vec![
                ColumnShape {
                    name: "id".into(),
                    kind: TypeKind::Int,
                    not_null: true,
                },
                ColumnShape {
                    name: "total".into(),
                    kind: TypeKind::Numeric,
                    not_null: false,
                },
            ],
            key: vec![ColumnShape {
                name: "id".into(),
                kind: TypeKind::Int,
                not_null: true,
            }],
            attributes: vec![("domain".into(), "sales".into())],
        }
    }

    #[test]
    fn a_table_event_names_its_columns_key_type_and_version() {
        let s = table_event(&shape());
        assert_eq!(s["$id"], "urn:tidemark:store:orders.created:5c0e6f1b");
        assert_eq!(s["properties"]["type"]["const"], "orders.created");
        assert_eq!(s["properties"]["dataschema"]["const"], s["$id"]);
        assert_eq!(s["properties"]["domain"]["const"], "sales");
        let data = &s["properties"]["data"];
        assert_eq!(data["properties"]["op"]["enum"], json!(["insert", "read"]));
        assert_eq!(data["properties"]["table"]["const"], "public.orders");
        let after = &data["properties"]["after"]["anyOf"][0];
        assert_eq!(after["properties"]["id"], json!({"type": "integer"}));
        assert_eq!(
            after["properties"]["total"]["anyOf"][1],
            json!({"type": "null"}),
            "a nullable column admits null"
        );
        assert_eq!(after["required"], json!(["id"]));
        assert_eq!(after["additionalProperties"], false);
    }

    #[test]
    fn values_follow_the_value_table() {
        assert_eq!(value_schema(&TypeKind::Bool)["type"], "boolean");
        assert_eq!(value_schema(&TypeKind::Json), json!(true));
        assert_eq!(value_schema(&TypeKind::Bytea)["contentEncoding"], "base64");
        let arr = value_schema(&TypeKind::Array {
            element: Box::new(TypeKind::Int),
            delimiter: b',',
        });
        assert_eq!(arr["type"], "array");
        assert_eq!(arr["items"]["anyOf"][0]["type"], "integer");
        let comp = value_schema(&TypeKind::Composite(vec![("a".into(), TypeKind::Text)]));
        assert_eq!(comp["properties"]["a"]["anyOf"][0]["type"], "string");
    }

    #[test]
    fn markers_have_a_versioned_schema_each() {
        let m = marker_events("store");
        let types: Vec<&str> = m.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            types,
            vec![
                "tidemark.heartbeat",
                "tidemark.sync",
                "tidemark.transaction",
                "tidemark.reset"
            ]
        );
        assert_eq!(m[0].1["$id"], "urn:tidemark:store:tidemark.heartbeat:1");
        assert_eq!(
            file_name("orders.created", "5c0e6f1b"),
            "orders.created.5c0e6f1b.json"
        );
        assert_eq!(file_name("a/b c", "1"), "a_b_c.1.json");
    }
}
