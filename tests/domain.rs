//! Integration tests of domain events (mapping rules, the transactional outbox,
//! emitted messages, transaction boundaries, schema changes) against a real
//! PostgreSQL and a real nats-server, each started by the test.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const STORE_SCHEMA: &str = r#"
CREATE TABLE customers (id int PRIMARY KEY, email text NOT NULL, name text, password_hash text);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL, total numeric(10,2) NOT NULL, note text);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE order_items (order_id int, line int, sku text, qty int, PRIMARY KEY (order_id, line));
CREATE TABLE inventory (sku text PRIMARY KEY, on_hand int NOT NULL, reserved int NOT NULL);
ALTER TABLE inventory REPLICA IDENTITY FULL;
"#;

const STORE_MAPPING: &str = r#"
[[source.table]]
name = "customers"
insert = "CustomerRegistered"
update = "CustomerUpdated"
delete = false
exclude = ["password_hash"]

[[source.table]]
name = "orders"
insert = "OrderPlaced"
update = false
delete = false
subject = "{source}.order.{event}.{key.id}"
rename = { customer_id = "customer" }
attributes = { aggregate = "order" }

[[source.table.rule]]
on = "update"
changed = ["status"]
new = { status = "paid" }
event = "OrderPaid"

[[source.table.rule]]
on = "update"
old = { status = ["paid", "packed"] }
new = { status = "shipped" }
event = "OrderShipped"

[[source.table.rule]]
on = "update"
changed = ["status"]
new = { status = "cancelled" }
event = "OrderCancelled"

[[source.table]]
name = "order_items"
insert = "OrderLineAdded"
update = false
delete = "OrderLineRemoved"

[[source.table]]
name = "inventory"
insert = "StockAdded"
update = false

[[source.table.rule]]
on = "update"
changed = ["reserved"]
event = "StockReserved"

[[source.table.rule]]
on = "update"
changed = ["on_hand"]
event = "StockAdjusted"
"#;

/// Groups events by transaction (commit LSN) in stream order and checks that exactly
/// the last event of each carries `txlast`, with indices rising inside it.
fn assert_transaction_marks(events: &[StoredEvent]) -> Vec<Vec<String>> {
    let mut txs: Vec<(String, Vec<&StoredEvent>)> = Vec::new();
    for e in events {
        let lsn = e.body["commitlsn"].as_str().unwrap().to_string();
        match txs.last_mut() {
            Some((l, list)) if *l == lsn => list.push(e),
            _ => txs.push((lsn, vec![e])),
        }
    }
    let mut out = Vec::new();
    for (lsn, list) in &txs {
        let n = list.len();
        for (i, e) in list.iter().enumerate() {
            assert_eq!(
                e.body["txlast"].as_bool(),
                Some(i + 1 == n),
                "txlast of event {i} of {n} in transaction {lsn}: {}",
                e.body
            );
            if i > 0 {
                assert!(
                    e.body["txindex"].as_u64() > list[i - 1].body["txindex"].as_u64(),
                    "txindex must rise within a transaction"
                );
            }
        }
        out.push(
            list.iter()
                .map(|e| e.body["type"].as_str().unwrap().to_string())
                .collect(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_store_maps_to_domain_events_in_commit_order_with_transaction_marks() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(STORE_SCHEMA).await.unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec {
            tables: r#"tables = ["customers", "orders", "order_items", "inventory"]"#,
            sections: STORE_MAPPING,
            ..SourceSpec::new("store", "store")
        },
    );
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "plan public.orders: columns: id, customer_id as customer, status, total, note",
        "plan public.orders: rule 1: on update, status changed, new status in [\"paid\"] -> OrderPaid",
        "plan public.orders: rule 2: on update, old status in [\"paid\", \"packed\"], new status in [\"shipped\"] -> OrderShipped",
        "plan public.orders: otherwise update -> nothing (dropped)",
        "plan public.orders: otherwise insert -> OrderPlaced, subject {source}.order.{event}.{key.id}",
        "plan public.orders: attributes: aggregate=order",
        "plan public.customers: columns: id, email, name\n",
        "plan public.customers: delete -> nothing (dropped)",
        "plan public.customers: warning: email, name can be TOASTed",
        "plan public.order_items: key: order_id, line;",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(
        !out.contains("plan public.orders: warning"),
        "orders has REPLICA IDENTITY FULL: no TOAST warning\n{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    for tx in [
        "INSERT INTO customers VALUES (1, 'ada@example.com', 'Ada', 'secret')",
        "INSERT INTO inventory VALUES ('A', 10, 0), ('B', 5, 0)",
        "BEGIN;
         INSERT INTO orders VALUES (100, 1, 'placed', 30.00, NULL);
         INSERT INTO order_items VALUES (100, 1, 'A', 2), (100, 2, 'B', 1);
         UPDATE inventory SET reserved = reserved + 2 WHERE sku = 'A';
         UPDATE inventory SET reserved = reserved + 1 WHERE sku = 'B';
         COMMIT",
        "UPDATE orders SET status = 'paid' WHERE id = 100",
        // Status unchanged: no rule matches and updates default to nothing.
        "UPDATE orders SET note = 'gift' WHERE id = 100",
        "BEGIN;
         UPDATE orders SET status = 'shipped' WHERE id = 100;
         UPDATE inventory SET on_hand = on_hand - 2, reserved = 0 WHERE sku = 'A';
         COMMIT",
        "BEGIN;
         INSERT INTO orders VALUES (101, 1, 'placed', 5.00, NULL);
         UPDATE orders SET status = 'cancelled' WHERE id = 101;
         COMMIT",
        "BEGIN;
         UPDATE customers SET name = 'Ada L.' WHERE id = 1;
         DELETE FROM order_items WHERE order_id = 100 AND line = 2;
         UPDATE orders SET status = 'placed' WHERE id = 101;
         COMMIT",
        "UPDATE inventory SET on_hand = 20 WHERE sku = 'B'",
    ] {
        db.batch_execute(tx).await.unwrap();
    }
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 14, Duration::from_secs(30), || tm.log()).await;
    // Nothing more arrives: the dropped changes stay dropped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let txs = assert_transaction_marks(&events);
    assert_eq!(
        txs,
        vec![
            vec!["CustomerRegistered"],
            vec!["StockAdded", "StockAdded"],
            vec![
                "OrderPlaced",
                "OrderLineAdded",
                "OrderLineAdded",
                "StockReserved",
                "StockReserved"
            ],
            vec!["OrderPaid"],
            vec!["OrderShipped", "StockReserved"],
            vec!["OrderPlaced", "OrderCancelled"],
            vec!["CustomerUpdated", "OrderLineRemoved"],
            vec!["StockAdjusted"],
        ]
    );
    let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
    assert_eq!(subjects[0], "store.customers.CustomerRegistered");
    assert_eq!(subjects[3], "store.order.OrderPlaced.100");
    assert_eq!(subjects[8], "store.order.OrderPaid.100");
    assert_eq!(subjects[9], "store.order.OrderShipped.100");

    // Column shaping and attributes.
    assert_eq!(
        events[0].body["data"]["after"],
        json!({"id": 1, "email": "ada@example.com", "name": "Ada"})
    );
    let placed = &events[3].body;
    assert_eq!(placed["aggregate"], "order");
    assert_eq!(
        placed["data"]["after"],
        json!({"id": 100, "customer": 1, "status": "placed", "total": "30.00", "note": null})
    );
    let shipped = &events[9].body;
    assert_eq!(shipped["data"]["before"]["status"], "paid");
    assert_eq!(shipped["data"]["after"]["status"], "shipped");
    // Dropped changes keep their index: the OrderLineRemoved event is index 1 of its
    // transaction, after the CustomerUpdated at 0; the order update at 2 was dropped.
    assert_eq!(events[12].body["txindex"], 1);
    // Every table event carries its shape's fingerprint.
    let hashes: std::collections::BTreeSet<&str> = events
        .iter()
        .map(|e| e.body["schemahash"].as_str().unwrap())
        .collect();
    assert_eq!(hashes.len(), 4, "one shape per table: {hashes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_naming_a_missing_column_is_refused_at_start_by_check_and_run() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(STORE_SCHEMA).await.unwrap();
    let mapping = STORE_MAPPING.replace("changed = [\"on_hand\"]", "changed = [\"onhand\"]");
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec {
            tables: r#"tables = ["customers", "orders", "order_items", "inventory"]"#,
            sections: &mapping,
            ..SourceSpec::new("store", "store")
        },
    );
    let line = std::fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .position(|l| l.contains("name = \"inventory\""))
        .unwrap();
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let text = format!("{out}{err}");
    assert!(
        text.contains("public.inventory") && text.contains("\"onhand\"") && text.contains("rule 2"),
        "{text}"
    );
    assert!(
        text.contains(&format!("config line {line}")),
        "the [[source.table]] line ({line}): {text}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    let status = tm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", tm.log());
    assert!(tm.log().contains("\"onhand\""), "{}", tm.log());
    // Nothing was set up or streamed: the slot was never created.
    let slots = db
        .query("SELECT 1 FROM pg_replication_slots", &[])
        .await
        .unwrap();
    assert!(slots.is_empty());
}

const OUTBOX_SECTIONS: &str = r#"
[[source.outbox]]
table = "outbox"
headers_column = "headers"

[[source.message]]
prefix = "domain"
type_field = "type"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_and_emitted_messages_arrive_once_each_across_a_kill_9() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregate_type text NOT NULL,
             aggregate_id text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL, headers jsonb);
         CREATE TABLE stock (sku text PRIMARY KEY, reserved int NOT NULL);
         INSERT INTO stock VALUES ('A', 0);",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec {
            tables: r#"tables = ["outbox", "stock"]"#,
            extra: "publish_window = 64",
            sections: OUTBOX_SECTIONS,
            ..SourceSpec::new("store", "store")
        },
    );
    let log = dir.path().join("tidemark.log");
    let mut tm = Tidemark::run(&cfg, &log);
    tm.wait_streaming();
    assert!(tm.terminate(Duration::from_secs(30)).success());

    // A backlog: each transaction writes an outbox row and deletes it at once, changes
    // the stock, and emits a message under the configured prefix and one under another.
    const N: usize = 3000;
    let mut sql = String::new();
    for i in 0..N {
        sql.push_str(&format!(
            "BEGIN;
             INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers)
                 VALUES (md5('{i}')::uuid, 'order', '{i}', 'OrderPlaced', '{{\"n\": {i}}}', '{{\"trace-id\": \"t{i}\"}}');
             DELETE FROM outbox WHERE id = md5('{i}')::uuid;
             UPDATE stock SET reserved = reserved + 1 WHERE sku = 'A';
             SELECT pg_logical_emit_message(true, 'domain', '{{\"type\": \"StockReserved\", \"n\": {i}}}');
             SELECT pg_logical_emit_message(true, 'other', 'ignored');
             COMMIT;\n"
        ));
    }
    db.batch_execute(&sql).await.unwrap();

    let nc = nats.client().await;
    let mut tm = Tidemark::run(&cfg, &log);
    let at = wait_stream_count(&nc, "STORE", 1500, Duration::from_secs(60), || tm.log()).await;
    assert!(
        at < 3 * N as u64,
        "the backlog drained before the kill ({at} events): make it larger"
    );
    tm.kill9();
    let mut tm = Tidemark::run(&cfg, &log);
    wait_stream_count(&nc, "STORE", 3 * N as u64, Duration::from_secs(120), || {
        tm.log()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = read_stream(&nc, "STORE").await;
    assert_eq!(events.len(), 3 * N, "{}", tm.log());
    assert_exactly_once(&events);
    let txs = assert_transaction_marks(&events);
    for (i, tx) in txs.iter().enumerate() {
        assert_eq!(
            tx,
            &["OrderPlaced", "stock.updated", "StockReserved"],
            "tx {i}"
        );
    }
    let ids: Vec<String> = db
        .query(
            "SELECT md5(g::text)::uuid::text FROM generate_series(0, $1 - 1) g ORDER BY g",
            &[&(N as i32)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (i, chunk) in events.chunks(3).enumerate() {
        let (outbox, stock, message) = (&chunk[0], &chunk[1], &chunk[2]);
        assert_eq!(outbox.subject, "store.order.OrderPlaced");
        assert_eq!(outbox.body["data"], json!({"n": i}));
        assert_eq!(outbox.body["subject"], i.to_string());
        assert_eq!(outbox.body["aggregatetype"], "order");
        assert_eq!(
            outbox.body["outboxid"], ids[i],
            "the row's own id travels with the event"
        );
        assert_eq!(
            outbox.headers,
            vec![("trace-id".to_string(), format!("t{i}"))]
        );
        assert_eq!(stock.body["data"]["after"]["reserved"], i as i64 + 1);
        assert_eq!(message.subject, "store.domain.StockReserved");
        assert_eq!(message.body["data"]["n"], i);
        assert_eq!(message.body["messageprefix"], "domain");
        // Indices: outbox insert 0, its delete 1 (dropped), stock 2, message 3; the
        // unconfigured message takes 4 and publishes nothing.
        assert_eq!(outbox.body["txindex"], 0);
        assert_eq!(stock.body["txindex"], 2);
        assert_eq!(message.body["txindex"], 3);
    }
    assert!(tm.log().contains("last_event=Some"), "{}", tm.log());
    assert!(tm.terminate(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_mid_stream_reshape_events_and_a_rule_on_a_dropped_column_stops_loudly() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE parcels (id int PRIMARY KEY, status text, weight int);
         ALTER TABLE parcels REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let sections = r#"
[[source.table]]
name = "parcels"
insert = "ParcelRegistered"

[[source.table.rule]]
on = "update"
changed = ["status"]
new = { status = "delivered" }
event = "ParcelDelivered"
"#;
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec {
            tables: r#"tables = ["parcels"]"#,
            sections,
            ..SourceSpec::new("store", "store")
        },
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute(
        "INSERT INTO parcels VALUES (1, 'new', 5);
         ALTER TABLE parcels ADD COLUMN carrier text DEFAULT 'dhl';
         INSERT INTO parcels VALUES (2, 'new', 7, 'ups');
         ALTER TABLE parcels RENAME COLUMN weight TO grams;
         UPDATE parcels SET status = 'delivered' WHERE id = 1;
         ALTER TABLE parcels ALTER COLUMN grams TYPE numeric;
         INSERT INTO parcels VALUES (3, 'new', 1.5, 'dpd');
         ALTER TABLE parcels DROP COLUMN carrier;
         INSERT INTO parcels VALUES (4, 'new', 2);",
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 5, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let got: Vec<(String, Value)> = events
        .iter()
        .map(|e| {
            (
                e.body["type"].as_str().unwrap().to_string(),
                e.body["data"]["after"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "ParcelRegistered".into(),
                json!({"id": 1, "status": "new", "weight": 5})
            ),
            (
                "ParcelRegistered".into(),
                json!({"id": 2, "status": "new", "weight": 7, "carrier": "ups"})
            ),
            (
                "ParcelDelivered".into(),
                json!({"id": 1, "status": "delivered", "grams": 5, "carrier": "dhl"})
            ),
            (
                "ParcelRegistered".into(),
                json!({"id": 3, "status": "new", "grams": "1.5", "carrier": "dpd"})
            ),
            (
                "ParcelRegistered".into(),
                json!({"id": 4, "status": "new", "grams": "2"})
            ),
        ]
    );
    // Each shape has its own fingerprint: add, rename, type change, drop.
    let hashes: Vec<&str> = events
        .iter()
        .map(|e| e.body["schemahash"].as_str().unwrap())
        .collect();
    let distinct: std::collections::BTreeSet<&&str> = hashes.iter().collect();
    assert_eq!(distinct.len(), 5, "{hashes:?}");

    // Dropping the column a rule names stops the source at the next change of that
    // table, naming table and column; the change is not lost.
    db.batch_execute(
        "ALTER TABLE parcels DROP COLUMN status;
         INSERT INTO parcels VALUES (5, 3);",
    )
    .await
    .unwrap();
    let status = tm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", tm.log());
    let log = tm.log();
    assert!(
        log.contains("public.parcels") && log.contains("\"status\"") && log.contains("rule 1"),
        "{log}"
    );
    assert_eq!(stream_count(&nc, "STORE").await, 5);
    // The operator removes the rule; the change arrives.
    edit_file(
        &cfg,
        "changed = [\"status\"]\nnew = { status = \"delivered\" }\n",
        "",
    );
    edit_file(&cfg, "event = \"ParcelDelivered\"", "drop = true");
    let tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    wait_stream_count(&nc, "STORE", 6, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_eq!(
        events[5].body["data"]["after"],
        json!({"id": 5, "grams": "3"})
    );
}
