//! Integration tests of the core bridge against a real PostgreSQL (wal_level=logical)
//! and a real nats-server with JetStream, each started by the test on free loopback
//! ports in temporary directories.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const SCHEMA: &str = r#"
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE order_items (order_id int, line int, sku text, qty int, PRIMARY KEY (order_id, line));
CREATE TABLE audit_log (at timestamptz, message text);
ALTER TABLE audit_log REPLICA IDENTITY FULL;
"#;

/// Events with the parts a test compares: (subject, type, data).
fn summarize(events: &[StoredEvent]) -> Vec<(String, String, Value)> {
    events
        .iter()
        .map(|e| {
            (
                e.subject.clone(),
                e.body["type"].as_str().unwrap_or_default().to_string(),
                e.body["data"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operation_on_several_tables_arrives_once_in_commit_order() {
    let pg = PgServer::start();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let db = pg.create_db("store").await;
    db.batch_execute(SCHEMA).await.unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    let nc = nats.client().await;
    // The slot exists once tidemark streams; changes before that would not be captured.
    wait_for("tidemark to stream", Duration::from_secs(30), || {
        tm.log().contains("streaming").then_some(())
    });

    let big = "x".repeat(100_000);
    db.batch_execute(&format!(
        "BEGIN;
         INSERT INTO customers VALUES (1, 'Zoë ✓ 東京', NULL), (2, 'Bob', 'bob@example.com');
         INSERT INTO order_items VALUES (10, 1, 'SKU-1', 2), (10, 2, 'SKU-2', 1);
         COMMIT;
         UPDATE customers SET email = 'zoe@example.com' WHERE id = 1;
         UPDATE order_items SET qty = 5 WHERE order_id = 10 AND line = 2;
         UPDATE customers SET id = 3 WHERE id = 2;
         INSERT INTO audit_log VALUES ('2024-05-06 07:08:09+00', '{big}');
         UPDATE audit_log SET message = 'short';
         DELETE FROM audit_log;
         DELETE FROM order_items WHERE order_id = 10 AND line = 1;
         TRUNCATE order_items;"
    ))
    .await
    .unwrap();

    wait_stream_count(&nc, "STORE", 12, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let got = summarize(&events);
    let expected = vec![
        ("store.customers.created", "customers.created", json!({"op": "insert", "table": "public.customers", "key": {"id": 1}, "before": null, "after": {"id": 1, "name": "Zoë ✓ 東京", "email": null}})),
        ("store.customers.created", "customers.created", json!({"op": "insert", "table": "public.customers", "key": {"id": 2}, "before": null, "after": {"id": 2, "name": "Bob", "email": "bob@example.com"}})),
        ("store.order_items.created", "order_items.created", json!({"op": "insert", "table": "public.order_items", "key": {"order_id": 10, "line": 1}, "before": null, "after": {"order_id": 10, "line": 1, "sku": "SKU-1", "qty": 2}})),
        ("store.order_items.created", "order_items.created", json!({"op": "insert", "table": "public.order_items", "key": {"order_id": 10, "line": 2}, "before": null, "after": {"order_id": 10, "line": 2, "sku": "SKU-2", "qty": 1}})),
        ("store.customers.updated", "customers.updated", json!({"op": "update", "table": "public.customers", "key": {"id": 1}, "before": null, "after": {"id": 1, "name": "Zoë ✓ 東京", "email": "zoe@example.com"}})),
        ("store.order_items.updated", "order_items.updated", json!({"op": "update", "table": "public.order_items", "key": {"order_id": 10, "line": 2}, "before": null, "after": {"order_id": 10, "line": 2, "sku": "SKU-2", "qty": 5}})),
        ("store.customers.updated", "customers.updated", json!({"op": "update", "table": "public.customers", "key": {"id": 3}, "before": {"id": 2}, "after": {"id": 3, "name": "Bob", "email": "bob@example.com"}})),
        ("store.audit_log.created", "audit_log.created", json!({"op": "insert", "table": "public.audit_log", "key": {"at": "2024-05-06T07:08:09Z", "message": big}, "before": null, "after": {"at": "2024-05-06T07:08:09Z", "message": big}})),
        ("store.audit_log.updated", "audit_log.updated", json!({"op": "update", "table": "public.audit_log", "key": {"at": "2024-05-06T07:08:09Z", "message": "short"}, "before": {"at": "2024-05-06T07:08:09Z", "message": big}, "after": {"at": "2024-05-06T07:08:09Z", "message": "short"}})),
        ("store.audit_log.deleted", "audit_log.deleted", json!({"op": "delete", "table": "public.audit_log", "key": {"at": "2024-05-06T07:08:09Z", "message": "short"}, "before": {"at": "2024-05-06T07:08:09Z", "message": "short"}, "after": null})),
        ("store.order_items.deleted", "order_items.deleted", json!({"op": "delete", "table": "public.order_items", "key": {"order_id": 10, "line": 1}, "before": {"order_id": 10, "line": 1}, "after": null})),
        ("store.order_items.truncated", "order_items.truncated", json!({"op": "truncate", "table": "public.order_items", "key": null, "before": null, "after": null})),
    ];
    // Compare one by one for a readable failure.
    assert_eq!(got.len(), 12, "event count; got {got:#?}");
    for (i, (g, e)) in got.iter().zip(expected.iter()).enumerate() {
        assert_eq!((g.0.as_str(), g.1.as_str()), (e.0, e.1), "event {i}");
        assert_eq!(g.2, e.2, "data of event {i}");
    }
    // The two inserts of the first transaction share its commit LSN, with indices 0..3.
    let first_lsn = events[0].body["commitlsn"].clone();
    for (i, e) in events[..4].iter().enumerate() {
        assert_eq!(e.body["commitlsn"], first_lsn);
        assert_eq!(e.body["txindex"], json!(i));
        assert_eq!(e.body["specversion"], "1.0");
        assert_eq!(e.body["source"], "/tidemark/store");
    }
    let status = tm.terminate(Duration::from_secs(30));
    assert!(status.success(), "tidemark exit: {status:?}\n{}", tm.log());
}
