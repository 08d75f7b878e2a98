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

// ---------------------------------------------------------------------------------
// Recovery: a 50,000-change backlog, disrupted in the middle, read back exactly.
// ---------------------------------------------------------------------------------

/// 500 transactions of 100 changes each: blocks of inserts, then an update of an
/// earlier block, then a delete of another. Returns the WAL position after it.
const BACKLOG: &str = r#"
DO $$
BEGIN
  FOR t IN 0..499 LOOP
    IF t % 10 < 8 THEN
      INSERT INTO items SELECT t * 100 + g, g, 'note ' || g FROM generate_series(0, 99) g;
    ELSIF t % 10 = 8 THEN
      UPDATE items SET qty = qty + 1 WHERE id >= (t - 8) * 100 AND id < (t - 7) * 100;
    ELSE
      DELETE FROM items WHERE id >= (t - 9) * 100 AND id < (t - 8) * 100;
    END IF;
    COMMIT;
  END LOOP;
END $$;
"#;

/// What transaction `t` of the backlog must have produced: (op, sorted keys).
fn backlog_expected(t: i64) -> (&'static str, Vec<i64>) {
    match t % 10 {
        0..=7 => ("insert", (t * 100..t * 100 + 100).collect()),
        8 => ("update", ((t - 8) * 100..(t - 7) * 100).collect()),
        _ => ("delete", ((t - 9) * 100..(t - 8) * 100).collect()),
    }
}

/// Checks the stream holds exactly the backlog: 500 transactions in order, each with
/// its 100 changes, nothing else.
fn assert_backlog(events: &[StoredEvent]) {
    assert_eq!(events.len(), 50_000, "the stream must hold exactly the 50,000 changes");
    assert_exactly_once(events);
    let mut groups: Vec<(String, Vec<&StoredEvent>)> = Vec::new();
    for e in events {
        let lsn = e.body["commitlsn"].as_str().unwrap().to_string();
        match groups.last_mut() {
            Some((l, g)) if *l == lsn => g.push(e),
            _ => groups.push((lsn, vec![e])),
        }
    }
    assert_eq!(groups.len(), 500, "transactions");
    for (t, (_, group)) in groups.iter().enumerate() {
        let (op, keys) = backlog_expected(t as i64);
        let mut got: Vec<i64> = group
            .iter()
            .map(|e| {
                assert_eq!(e.body["data"]["op"], op, "op in transaction {t}");
                e.body["data"]["key"]["id"].as_i64().unwrap()
            })
            .collect();
        let indices: Vec<u64> = group.iter().map(|e| e.body["txindex"].as_u64().unwrap()).collect();
        assert_eq!(indices, (0..100).collect::<Vec<u64>>(), "indices in transaction {t}");
        got.sort();
        assert_eq!(got, keys, "keys of transaction {t}");
    }
}

async fn current_lsn(db: &tokio_postgres::Client) -> tidemark::position::Lsn {
    let s: String = db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    s.parse().unwrap()
}

async fn confirmed_flush(db: &tokio_postgres::Client, slot: &str) -> Option<tidemark::position::Lsn> {
    let rows = db
        .query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .ok()?;
    rows.first()?.get::<_, Option<String>>(0)?.parse().ok()
}

async fn wait_confirmed(pg: &PgServer, dbname: &str, slot: &str, at_least: tidemark::position::Lsn, timeout: Duration, log: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // A fresh client each time: the server may have restarted.
        if let Ok((c, conn)) = tokio_postgres::connect(&pg.url(dbname), tokio_postgres::NoTls).await {
            let h = tokio::spawn(conn);
            let got = confirmed_flush(&c, slot).await;
            h.abort();
            if got.is_some_and(|l| l >= at_least) {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!("slot {slot} confirmed {got:?}, wanted {at_least} within {timeout:?}\n{}", log());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

enum Disruption {
    KillTidemark,
    RestartNats,
    RestartPostgres,
}

async fn backlog_survives(disruption: Disruption) {
    let mut pg = PgServer::start();
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tidemark.log");
    let db = pg.create_db("store").await;
    db.batch_execute("CREATE TABLE items (id int PRIMARY KEY, qty int, note text)").await.unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec { tables: "tables = [\"items\"]", extra: "publish_window = 256", ..SourceSpec::new("store", "store") });

    // First run creates the slot and the stream; stop it to build a backlog.
    let mut tm = Tidemark::run(&cfg, &log);
    wait_for("tidemark to stream", Duration::from_secs(30), || tm.log().contains("streaming").then_some(()));
    assert!(tm.terminate(Duration::from_secs(30)).success());
    db.batch_execute(BACKLOG).await.unwrap();
    let end = current_lsn(&db).await;
    drop(db);

    let nc = nats.client().await;
    let mut tm = Tidemark::run(&cfg, &log);
    let at = wait_stream_count(&nc, "STORE", 5_000, Duration::from_secs(60), || tm.log()).await;
    assert!(at < 50_000, "the backlog drained before the disruption ({at} events): make it larger");
    match &disruption {
        Disruption::KillTidemark => {
            tm.kill9();
            tm = Tidemark::run(&cfg, &log);
        }
        Disruption::RestartNats => {
            nats.stop();
            tokio::time::sleep(Duration::from_secs(1)).await;
            nats.start_again();
        }
        Disruption::RestartPostgres => {
            pg.stop();
            tokio::time::sleep(Duration::from_secs(1)).await;
            pg.start_again();
        }
    }
    // Everything is stored once the slot confirms the end of the backlog.
    wait_confirmed(&pg, "store", "tidemark_store", end, Duration::from_secs(120), || tm.log()).await;
    let nc = nats.client().await;
    let events = read_stream(&nc, "STORE").await;
    assert_backlog(&events);
    assert!(tm.is_running(), "tidemark must recover on its own:\n{}", tm.log());
    let text = tm.log();
    match disruption {
        // The restarted process resumed from a stream that already held events.
        Disruption::KillTidemark => assert!(text.contains("last_event=Some"), "{text}"),
        // The client saw the outage; it either rode it out (publishes buffered across
        // the reconnect, the sequence chain guarding against loss) or rebuilt.
        Disruption::RestartNats => assert!(text.contains("disconnected"), "{text}"),
        // The replication connection died with the server: the pipeline rebuilt.
        Disruption::RestartPostgres => {
            assert!(text.contains("rebuilding from the slot and the stream"), "{text}")
        }
    }
    assert!(tm.terminate(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backlog_then_restart_stores_each_change_exactly_once() {
    backlog_survives(Disruption::KillTidemark).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_backlog_recovers_alone_exactly_once() {
    backlog_survives(Disruption::RestartNats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_backlog_recovers_alone_exactly_once() {
    backlog_survives(Disruption::RestartPostgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_published_tables_do_not_pin_wal_while_others_churn() {
    let pg = PgServer::start();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let db = pg.create_db("store").await;
    db.batch_execute("CREATE TABLE quiet (id int PRIMARY KEY); CREATE TABLE busy (id serial PRIMARY KEY, v text);").await.unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec { tables: "tables = [\"quiet\"]", ..SourceSpec::new("store", "store") });
    let tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    wait_for("tidemark to stream", Duration::from_secs(30), || tm.log().contains("streaming").then_some(()));
    let before = confirmed_flush(&db, "tidemark_store").await.unwrap();
    for i in 0..200 {
        db.execute("INSERT INTO busy (v) VALUES ($1)", &[&format!("row {i}")]).await.unwrap();
    }
    let after_churn = current_lsn(&db).await;
    assert!(after_churn > before);
    wait_confirmed(&pg, "store", "tidemark_store", after_churn, Duration::from_secs(60), || tm.log()).await;
    let nc = nats.client().await;
    assert_eq!(stream_count(&nc, "STORE").await, 0, "busy is not published: no events");
}
