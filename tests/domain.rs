//! Integration tests of domain events (mapping rules, the transactional outbox,
//! emitted messages, transaction boundaries, schema changes) against a real
//! PostgreSQL and a real nats-server, each started by the test.

#![recursion_limit = "256"]

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
        // A transaction summary, when there is one, is the last event and alone
        // carries the mark (issue 14: the last data event used to carry it too).
        let n = list.len();
        for (i, e) in list.iter().enumerate() {
            assert_eq!(
                e.body["txlast"].as_bool(),
                Some(i + 1 >= n),
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
        &SourceSpec::new("store", "store")
            .tables(&["customers", "orders", "order_items", "inventory"])
            .sections(STORE_MAPPING),
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
        &SourceSpec::new("store", "store")
            .tables(&["customers", "orders", "order_items", "inventory"])
            .sections(&mapping),
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
    if pg_major() < 14 {
        // No logical messages before 14: the message section is refused at start,
        // with the outbox as the way (versions.rs covers the rest of this path).
        db.batch_execute("CREATE TABLE stock (sku text PRIMARY KEY, reserved int NOT NULL)")
            .await
            .unwrap();
        let cfg = write_config(
            dir.path(),
            &pg,
            &nats,
            &SourceSpec::new("store", "store")
                .tables(&["stock"])
                .sections("[[source.message]]\nprefix = \"domain\"\n"),
        );
        let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
        tm.wait_refused(&["[[source.outbox]]"]);
        return;
    }
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
        &SourceSpec::new("store", "store")
            .tables(&["outbox", "stock"])
            .set("publish_window", 64)
            .set("transaction_events", true)
            .sections(OUTBOX_SECTIONS),
    );
    let log = dir.path().join("tidemark.log");
    let mut tm = Tidemark::run(&cfg, &log);
    tm.wait_streaming();
    assert!(tm.terminate(Duration::from_secs(30)).success());

    // A backlog: each transaction writes an outbox row and deletes it at once, changes
    // the stock, and emits a message under the configured prefix and one under another.
    const N: usize = 3000;
    // Per transaction: the outbox event, the stock update, the message, the summary.
    const PER_TX: usize = 4;
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
        at < (PER_TX * N) as u64,
        "the backlog drained before the kill ({at} events): make it larger"
    );
    tm.kill9();
    let mut tm = Tidemark::run(&cfg, &log);
    wait_stream_count(
        &nc,
        "STORE",
        (PER_TX * N) as u64,
        Duration::from_secs(120),
        || tm.log(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = read_stream(&nc, "STORE").await;
    assert_eq!(events.len(), PER_TX * N, "{}", tm.log());
    assert_exactly_once(&events);
    let txs = assert_transaction_marks(&events);
    for (i, tx) in txs.iter().enumerate() {
        assert_eq!(
            tx,
            &[
                "OrderPlaced",
                "stock.updated",
                "StockReserved",
                "tidemark.transaction"
            ],
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
    for (i, chunk) in events.chunks(PER_TX).enumerate() {
        let (outbox, stock, message, summary) = (&chunk[0], &chunk[1], &chunk[2], &chunk[3]);
        assert_eq!(summary.subject, "store._tidemark.tx");
        assert_eq!(summary.body["data"]["events"], 3);
        // One past the last change: insert 0, delete 1, stock 2, message 3, other 4.
        assert_eq!(summary.body["txindex"], 5);
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
    let spec = SourceSpec::new("store", "store")
        .tables(&["parcels"])
        .sections(sections);
    let cfg = write_config(dir.path(), &pg, &nats, &spec);
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
    let spec = spec.sections(
        r#"
[[source.table]]
name = "parcels"
insert = "ParcelRegistered"

[[source.table.rule]]
on = "update"
drop = true
"#,
    );
    write_config(dir.path(), &pg, &nats, &spec);
    let tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    wait_stream_count(&nc, "STORE", 6, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_eq!(
        events[5].body["data"]["after"],
        json!({"id": 5, "grams": "3"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_builtin_type_family_arrives_as_the_expected_json() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    // Multiranges and numeric infinities came in PostgreSQL 14: before, those columns
    // are text, with the same values as text.
    let old = pg_major() < 14;
    let kinds = |sql: &str| {
        if old {
            sql.replace("mr int4multirange, mre nummultirange", "mr text, mre text")
                .replace("n_inf numeric, n_ninf numeric", "n_inf text, n_ninf text")
        } else {
            sql.to_string()
        }
    };
    db.batch_execute(&kinds(
        r#"CREATE TYPE address AS (street text, zip int, tags text[]);
         CREATE TYPE floatrange AS RANGE (subtype = float8);
         CREATE DOMAIN email AS text CHECK (VALUE LIKE '%@%');
         CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE TABLE kinds (
           id int PRIMARY KEY, iv interval, mo money, ip inet, cd cidr, mac macaddr, mac8 macaddr8,
           bt bit(4), vb varbit, x xml, tsv tsvector, tsq tsquery,
           pt point, ln line, ls lseg, bx box, pth path, pthc path, pg polygon, ci circle,
           r4 int4range, r8 int8range, rn numrange, rts tsrange, rtz tstzrange, rd daterange,
           rempty int4range, runb int4range, mr int4multirange, mre nummultirange, rf floatrange,
           dm email, comp address, en mood,
           n_nan numeric, n_inf numeric, n_ninf numeric, ts_inf timestamp, ts_ninf timestamptz, ttz timetz,
           a_iv interval[], a_ip inet[], a_pt point[], a_bx box[], a_r int4range[], a_comp address[],
           a_en mood[], a_mo money[], a_dm email[]
         );"#,
    ))
    .await
    .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute(
        r#"INSERT INTO kinds VALUES (
           1, '1 year 2 months 3 days 04:05:06.5', '-1234.56', '192.168.0.1/24', '10.0.0.0/8',
           '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', B'1010', B'101', '<a>1</a>',
           'a fat cat', 'fat & rat',
           '(1.5,2)', '{1,-1,0}', '[(0,0),(1,1)]', '(1,1),(0,0)', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(2,0))',
           '((0,0),(1,1),(1,0))', '<(1,2),3>',
           '[1,10)', '(1,5]', '[1.5,2.5]', '["2024-01-01 00:00","2024-01-02 00:00")', '[2024-01-01 00:00+00,)',
           '[2024-01-01,2024-02-01)', 'empty', '(,5)', '{[1,3),[5,7)}', '{}', '[1.5,2.5)',
           'a@b', ROW('Main St, 1', 12345, ARRAY['x', 'y "q"']), 'sad',
           'NaN', 'Infinity', '-Infinity', 'infinity', '-infinity', '23:59:59.999-05:30',
           ARRAY['1 day'::interval, '2 hours'], '{10.0.0.1,::1}', ARRAY[point(1,2), point(3,4)],
           ARRAY[box '(1,1),(0,0)', box '(3,3),(2,2)'], ARRAY['[1,2)'::int4range, 'empty'],
           ARRAY[ROW('a', 1, NULL)::address], '{happy,sad}', ARRAY['1.50'::money], ARRAY['x@y'::email]
        )"#,
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    let after = &events[0].body["data"]["after"];
    let p = |x: f64, y: f64| json!({"x": x, "y": y});
    let range = |l: Value, u: Value, li: bool, ui: bool| json!({"lower": l, "upper": u, "lower_inc": li, "upper_inc": ui});
    let mut expected = json!({
        "id": 1, "iv": "P1Y2M3DT4H5M6.5S", "mo": "-1234.56", "ip": "192.168.0.1/24", "cd": "10.0.0.0/8",
        "mac": "08:00:2b:01:02:03", "mac8": "08:00:2b:01:02:03:04:05", "bt": "1010", "vb": "101",
        "x": "<a>1</a>", "tsv": "'a' 'cat' 'fat'", "tsq": "'fat' & 'rat'",
        "pt": p(1.5, 2.0), "ln": {"a": 1.0, "b": -1.0, "c": 0.0},
        "ls": [p(0.0, 0.0), p(1.0, 1.0)], "bx": [p(1.0, 1.0), p(0.0, 0.0)],
        "pth": {"closed": false, "points": [p(0.0, 0.0), p(1.0, 1.0), p(2.0, 0.0)]},
        "pthc": {"closed": true, "points": [p(0.0, 0.0), p(1.0, 1.0), p(2.0, 0.0)]},
        "pg": [p(0.0, 0.0), p(1.0, 1.0), p(1.0, 0.0)], "ci": {"x": 1.0, "y": 2.0, "radius": 3.0},
        "r4": range(json!(1), json!(10), true, false),
        "r8": range(json!(2), json!(6), true, false),
        "rn": range(json!("1.5"), json!("2.5"), true, true),
        "rts": range(json!("2024-01-01T00:00:00"), json!("2024-01-02T00:00:00"), true, false),
        "rtz": range(json!("2024-01-01T00:00:00Z"), Value::Null, true, false),
        "rd": range(json!("2024-01-01"), json!("2024-02-01"), true, false),
        "rempty": {"empty": true},
        "runb": range(Value::Null, json!(5), false, false),
        "mr": [range(json!(1), json!(3), true, false), range(json!(5), json!(7), true, false)],
        "mre": [],
        "rf": range(json!(1.5), json!(2.5), true, false),
        "dm": "a@b", "comp": {"street": "Main St, 1", "zip": 12345, "tags": ["x", "y \"q\""]}, "en": "sad",
        "n_nan": "NaN", "n_inf": "Infinity", "n_ninf": "-Infinity",
        "ts_inf": "infinity", "ts_ninf": "-infinity", "ttz": "23:59:59.999-05:30",
        "a_iv": ["P1D", "PT2H"], "a_ip": ["10.0.0.1", "::1"], "a_pt": [p(1.0, 2.0), p(3.0, 4.0)],
        "a_bx": [[p(1.0, 1.0), p(0.0, 0.0)], [p(3.0, 3.0), p(2.0, 2.0)]],
        "a_r": [range(json!(1), json!(2), true, false), {"empty": true}],
        "a_comp": [{"street": "a", "zip": 1, "tags": null}], "a_en": ["happy", "sad"], "a_mo": ["1.50"],
        "a_dm": ["x@y"]
    });
    if old {
        expected["mr"] = json!("{[1,3),[5,7)}");
        expected["mre"] = json!("{}");
    }
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&after[k], v, "column {k}");
    }
    assert_eq!(
        after.as_object().unwrap().len(),
        expected.as_object().unwrap().len(),
        "{after:#}"
    );
}

/// Property tests of the array, range and composite parsers against the text real
/// Postgres writes for generated values.
#[test]
fn text_parsers_read_what_postgres_writes() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use tidemark::postgres::values::{RangeText, parse_array, parse_composite, parse_range};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pg = PgServer::start();
    let db = rt.block_on(pg.create_db("props"));
    rt.block_on(db.batch_execute(
        r#"CREATE TYPE trio AS (a text, b text, c int);
           CREATE TYPE textrange AS RANGE (subtype = text, collation = "C");"#,
    ))
    .unwrap();
    // Characters that need quoting or escaping in some literal, plus ordinary ones.
    let text = || {
        proptest::string::string_regex(r#"[a-zA-Z0-9 "\\{}(),;\[\]é✓\t]{0,8}|NULL|null"#).unwrap()
    };
    // A runner counts the cases it has passed, so each property gets its own.
    let runner = || {
        TestRunner::new(Config {
            cases: 200,
            failure_persistence: None,
            ..Config::default()
        })
    };
    let arrays = proptest::collection::vec(proptest::option::of(text()), 0..6);
    runner()
        .run(&arrays, |items| {
            let row = rt
                .block_on(db.query_one("SELECT $1::text[]::text", &[&items]))
                .unwrap();
            let out: String = row.get(0);
            let parsed =
                parse_array(&out, b',').map_err(|e| TestCaseError::fail(format!("{out}: {e}")))?;
            let want = tidemark::postgres::values::ArrayNode::List(
                items
                    .iter()
                    .map(|i| tidemark::postgres::values::ArrayNode::Element(i.clone()))
                    .collect(),
            );
            prop_assert_eq!(parsed, want, "postgres wrote {}", out);
            Ok(())
        })
        .unwrap();
    let trios = (
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(any::<i32>()),
    );
    runner()
        .run(&trios, |(a, b, c)| {
            let row = rt
                .block_on(db.query_one(
                    "SELECT ROW($1::text, $2::text, $3::int)::trio::text",
                    &[&a, &b, &c],
                ))
                .unwrap();
            let out: String = row.get(0);
            let parsed =
                parse_composite(&out).map_err(|e| TestCaseError::fail(format!("{out}: {e}")))?;
            prop_assert_eq!(
                parsed,
                vec![a.clone(), b.clone(), c.map(|c| c.to_string())],
                "postgres wrote {}",
                out
            );
            Ok(())
        })
        .unwrap();
    let ranges = (
        proptest::option::of(text()),
        proptest::option::of(text()),
        any::<bool>(),
        any::<bool>(),
    );
    runner()
        .run(&ranges, |(lo, hi, li, ui)| {
            let (lo, hi) = match (lo, hi) {
                (Some(a), Some(b)) if a.as_bytes() > b.as_bytes() => (Some(b), Some(a)),
                other => other,
            };
            let flags = format!(
                "{}{}",
                if li { '[' } else { '(' },
                if ui { ']' } else { ')' }
            );
            let row = rt
                .block_on(db.query_one(
                    "SELECT textrange($1, $2, $3)::text, isempty(textrange($1, $2, $3))",
                    &[&lo, &hi, &flags],
                ))
                .unwrap();
            let out: String = row.get(0);
            let empty: bool = row.get(1);
            let parsed = parse_range(out.as_bytes(), &mut 0)
                .map_err(|e| TestCaseError::fail(format!("{out}: {e}")))?;
            let want = if empty {
                RangeText::Empty
            } else {
                RangeText::Bounds {
                    lower_inc: li && lo.is_some(),
                    upper_inc: ui && hi.is_some(),
                    lower: lo.clone(),
                    upper: hi.clone(),
                }
            };
            prop_assert_eq!(parsed, want, "postgres wrote {}", out);
            Ok(())
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_batches_store_a_transaction_whole_across_a_kill_9() {
    const BEFORE: u64 = 3000;
    const BIG: u64 = 5000;
    const AFTER: u64 = 1000;
    const BATCH: u64 = 50;
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE ticks (id int PRIMARY KEY);
         CREATE TABLE lines (id int PRIMARY KEY, qty int);",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        // One batch in flight at a time keeps the big transaction in flight long
        // enough to be killed in the middle of it.
        &SourceSpec::new("store", "store")
            .tables(&["ticks", "lines"])
            .set("atomic_transactions", true)
            .set("atomic_batch_max", 50)
            .set("publish_window", 50),
    );
    let log = dir.path().join("tidemark.log");
    let mut tm = Tidemark::run(&cfg, &log);
    tm.wait_streaming();
    assert!(tm.terminate(Duration::from_secs(30)).success());
    // Each statement on its own, so the procedures' COMMITs end real transactions.
    for sql in [
        format!(
            "DO $$ BEGIN FOR i IN 1..{BEFORE} LOOP INSERT INTO ticks VALUES (i); COMMIT; END LOOP; END $$"
        ),
        format!("INSERT INTO lines SELECT g, g % 7 FROM generate_series(1, {BIG}) g"),
        format!(
            "DO $$ BEGIN FOR i IN {BEFORE} + 1..{BEFORE} + {AFTER} LOOP INSERT INTO ticks VALUES (i); COMMIT; END LOOP; END $$"
        ),
    ] {
        db.batch_execute(&sql).await.unwrap();
    }

    // Kill tidemark three times while the big transaction is being published. What
    // the stream holds at rest is whole batches of it: the batch that was open at the
    // kill is dropped by the server, never stored in part.
    let nc = nats.client().await;
    let mut kills = Vec::new();
    let mut threshold = BEFORE;
    for _ in 0..3 {
        let mut tm = Tidemark::run(&cfg, &log);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let c = stream_count(&nc, "STORE").await;
            if c > threshold {
                tm.kill9();
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{}", tm.log());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at_rest = stream_count(&nc, "STORE").await;
        kills.push(at_rest);
        if at_rest >= BEFORE + BIG {
            break;
        }
        assert_eq!(
            (at_rest - BEFORE) % BATCH,
            0,
            "part of a batch is stored after a kill: {at_rest} events"
        );
        threshold = at_rest + 5 * BATCH;
    }
    assert!(
        kills[0] < BEFORE + BIG,
        "the big transaction was stored before the first kill ({kills:?}): slow the publisher down"
    );
    let tm = Tidemark::run(&cfg, &log);
    wait_stream_count(
        &nc,
        "STORE",
        BEFORE + BIG + AFTER,
        Duration::from_secs(120),
        || tm.log(),
    )
    .await;

    let events = read_stream(&nc, "STORE").await;
    assert_eq!(events.len() as u64, BEFORE + BIG + AFTER);
    assert_exactly_once(&events);
    let big: Vec<&StoredEvent> = events
        .iter()
        .filter(|e| e.subject.starts_with("store.lines."))
        .collect();
    assert_eq!(big.len() as u64, BIG);
    let lsn = &big[0].body["commitlsn"];
    for (i, e) in big.iter().enumerate() {
        assert_eq!(&e.body["commitlsn"], lsn);
        assert_eq!(e.body["txindex"], i as u64);
        assert_eq!(e.body["txlast"], i as u64 == BIG - 1, "txlast of event {i}");
        assert_eq!(e.body["data"]["after"]["id"], i as u64 + 1);
    }
    assert!(tm.log().contains("last_event=Some"), "{}", tm.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_are_filled_or_listed_never_null() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE docs_full (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs_full REPLICA IDENTITY FULL;
         CREATE TABLE docs_default (id int PRIMARY KEY, title text, body text);
         -- Keep the long bodies out of line and uncompressed, so they are TOASTed.
         ALTER TABLE docs_full ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE docs_default ALTER COLUMN body SET STORAGE EXTERNAL;",
    )
    .await
    .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let body: String = (0..20_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    for t in ["docs_full", "docs_default"] {
        db.execute(&format!("INSERT INTO {t} VALUES (1, 'v1', $1)"), &[&body])
            .await
            .unwrap();
        db.batch_execute(&format!("UPDATE {t} SET title = 'v2' WHERE id = 1"))
            .await
            .unwrap();
    }
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 4, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    let full_update = &events[1].body["data"];
    assert_eq!(full_update["after"]["title"], "v2");
    assert_eq!(full_update["after"]["body"].as_str(), Some(body.as_str()));
    assert!(full_update.get("unchanged_toast").is_none());
    let default_update = &events[3].body["data"];
    assert_eq!(default_update["after"]["title"], "v2");
    assert!(
        default_update["after"].get("body").is_none(),
        "an unchanged TOAST value must not appear (least of all as null): {default_update}"
    );
    assert_eq!(default_update["unchanged_toast"], json!(["body"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_rows_shrink_the_configured_column_and_are_marked() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE notes (id int PRIMARY KEY, title text, body text);
         CREATE TABLE attachments (id int PRIMARY KEY, name text, blob bytea);",
    )
    .await
    .unwrap();
    let sections = r#"
[[source.table]]
name = "notes"
oversized = "truncate"
oversized_columns = ["body"]

[[source.table]]
name = "attachments"
oversized = "omit"
oversized_columns = ["blob"]
"#;
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["notes", "attachments"])
            .set("max_event_bytes", 4096)
            .sections(sections),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let long = "ü".repeat(10_000);
    db.execute("INSERT INTO notes VALUES (1, 'short', 'fits')", &[])
        .await
        .unwrap();
    db.execute("INSERT INTO notes VALUES (2, 'long', $1)", &[&long])
        .await
        .unwrap();
    db.execute(
        "INSERT INTO attachments VALUES (3, 'big.bin', $1)",
        &[&vec![7u8; 50_000]],
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 3, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_eq!(events[0].body["data"]["after"]["body"], "fits");
    assert!(events[0].body["data"].get("truncated").is_none());
    let cut = &events[1].body["data"];
    let kept = cut["after"]["body"].as_str().unwrap();
    assert!(
        !kept.is_empty() && kept.len() < long.len(),
        "{} bytes kept",
        kept.len()
    );
    assert!(
        long.starts_with(kept),
        "a cut keeps the start, on a character boundary"
    );
    assert_eq!(cut["truncated"], json!(["body"]));
    assert_eq!(cut["after"]["title"], "long");
    let omitted = &events[2].body["data"];
    assert!(omitted["after"].get("blob").is_none());
    assert_eq!(omitted["omitted"], json!(["blob"]));
    assert_eq!(omitted["after"]["name"], "big.bin");
    for e in &events {
        let size = serde_json::to_vec(&e.body).unwrap().len();
        assert!(size <= 4096, "{size} bytes");
    }
    assert!(tm.is_running(), "{}", tm.log());
}
