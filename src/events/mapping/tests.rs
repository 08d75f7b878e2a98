use super::*;
use crate::events::rules::{Choice, Literal, OutboxSpec, RuleSpec, TableSpec, Template};
use bytes::Bytes;
use serde_json::{Value, json};

pub(super) fn text(s: &str) -> ColumnValue {
    ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

pub(super) fn orders() -> Table {
    Table {
        relation_id: 1,
        schema: "public".into(),
        name: "orders".into(),
        qualified: "public.orders".into(),
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

pub(super) fn tx() -> TxContext<'static> {
    TxContext {
        source: "store",
        commit_lsn: Lsn(0x16B3748),
        xid: 900,
        commit_lsn_text: "0/16B3748",
        time: "2000-01-01T00:00:00Z",
    }
}

pub(super) fn decode(ev: &DomainEvent) -> Value {
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

pub(super) fn change<'a>(
    op: Operation,
    old: Option<&'a Tuple>,
    new: Option<&'a Tuple>,
) -> RowChange<'a> {
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
    assert_eq!(event_type(&ev), "OrderPlaced");
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
    assert_eq!(event_type(&ev), "OrderPaid");
    // The first matching rule wins: paid -> shipped is a transition the first rule names.
    let ev = map(change(Operation::Update, Some(&paid), Some(&shipped))).unwrap();
    assert_eq!(event_type(&ev), "OrderShipped");
    let ev = map(change(Operation::Update, Some(&packed), Some(&shipped))).unwrap();
    assert_eq!(event_type(&ev), "OrderShipped");
    // new -> shipped matches no rule: the update default is drop.
    assert!(map(change(Operation::Update, Some(&new), Some(&shipped))).is_none());
    // Status unchanged: no rule, dropped.
    let note_changed = row("7", "paid", "other");
    assert!(map(change(Operation::Update, Some(&paid), Some(&note_changed))).is_none());
    // Delete keeps the default type.
    let ev = map(change(Operation::Delete, Some(&paid), None)).unwrap();
    assert_eq!(event_type(&ev), "orders.deleted");
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
    let c =
        TablePlan::default_for(&[("id", 23), ("status", 25), ("note", 1043)], "orders").fingerprint;
    assert_eq!(a.len(), 8);
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_eq!(
        a,
        TablePlan::default_for(&[("id", 23), ("status", 25), ("note", 25)], "orders").fingerprint
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
        qualified: "public.outbox".into(),
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
    assert_eq!(event_type(&ev), "OrderPlaced");
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
    assert_eq!(event_type(&ev), "StockReserved");
    assert_eq!(ev.subject, "store.domain.StockReserved");
    assert_eq!(
        decode(&ev)["data"],
        json!({"type": "StockReserved", "sku": "A"})
    );
    // Not JSON: kept as a string, typed by the prefix.
    let ev = map_message(&tx(), 3, &spec, b"plain text");
    assert_eq!(event_type(&ev), "domain");
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
    assert_eq!(event_type(&ev), "orders.created");
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
            "dataschema": format!("urn:tidemark:store:orders.created:{}", ev_hash(&ev)),
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

/// The CloudEvents `type` of an encoded event.
fn event_type(ev: &DomainEvent) -> String {
    let v: serde_json::Value = serde_json::from_slice(&ev.payload).unwrap_or_default();
    v["type"].as_str().unwrap_or_default().to_string()
}
