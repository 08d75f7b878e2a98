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
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(SCHEMA).await.unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    let nc = nats.client().await;
    // The slot exists once tidemark streams; changes before that would not be captured.
    tm.wait_streaming();

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
        (
            "store.customers.created",
            "customers.created",
            json!({"op": "insert", "table": "public.customers", "key": {"id": 1}, "before": null, "after": {"id": 1, "name": "Zoë ✓ 東京", "email": null}}),
        ),
        (
            "store.customers.created",
            "customers.created",
            json!({"op": "insert", "table": "public.customers", "key": {"id": 2}, "before": null, "after": {"id": 2, "name": "Bob", "email": "bob@example.com"}}),
        ),
        (
            "store.order_items.created",
            "order_items.created",
            json!({"op": "insert", "table": "public.order_items", "key": {"order_id": 10, "line": 1}, "before": null, "after": {"order_id": 10, "line": 1, "sku": "SKU-1", "qty": 2}}),
        ),
        (
            "store.order_items.created",
            "order_items.created",
            json!({"op": "insert", "table": "public.order_items", "key": {"order_id": 10, "line": 2}, "before": null, "after": {"order_id": 10, "line": 2, "sku": "SKU-2", "qty": 1}}),
        ),
        (
            "store.customers.updated",
            "customers.updated",
            json!({"op": "update", "table": "public.customers", "key": {"id": 1}, "before": null, "after": {"id": 1, "name": "Zoë ✓ 東京", "email": "zoe@example.com"}}),
        ),
        (
            "store.order_items.updated",
            "order_items.updated",
            json!({"op": "update", "table": "public.order_items", "key": {"order_id": 10, "line": 2}, "before": null, "after": {"order_id": 10, "line": 2, "sku": "SKU-2", "qty": 5}}),
        ),
        (
            "store.customers.updated",
            "customers.updated",
            json!({"op": "update", "table": "public.customers", "key": {"id": 3}, "before": {"id": 2}, "after": {"id": 3, "name": "Bob", "email": "bob@example.com"}}),
        ),
        (
            "store.audit_log.created",
            "audit_log.created",
            json!({"op": "insert", "table": "public.audit_log", "key": {"at": "2024-05-06T07:08:09Z", "message": big}, "before": null, "after": {"at": "2024-05-06T07:08:09Z", "message": big}}),
        ),
        (
            "store.audit_log.updated",
            "audit_log.updated",
            json!({"op": "update", "table": "public.audit_log", "key": {"at": "2024-05-06T07:08:09Z", "message": "short"}, "before": {"at": "2024-05-06T07:08:09Z", "message": big}, "after": {"at": "2024-05-06T07:08:09Z", "message": "short"}}),
        ),
        (
            "store.audit_log.deleted",
            "audit_log.deleted",
            json!({"op": "delete", "table": "public.audit_log", "key": {"at": "2024-05-06T07:08:09Z", "message": "short"}, "before": {"at": "2024-05-06T07:08:09Z", "message": "short"}, "after": null}),
        ),
        (
            "store.order_items.deleted",
            "order_items.deleted",
            json!({"op": "delete", "table": "public.order_items", "key": {"order_id": 10, "line": 1}, "before": {"order_id": 10, "line": 1}, "after": null}),
        ),
        (
            "store.order_items.truncated",
            "order_items.truncated",
            json!({"op": "truncate", "table": "public.order_items", "key": null, "before": null, "after": null}),
        ),
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
    assert_eq!(
        events.len(),
        50_000,
        "the stream must hold exactly the 50,000 changes"
    );
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
        let indices: Vec<u64> = group
            .iter()
            .map(|e| e.body["txindex"].as_u64().unwrap())
            .collect();
        assert_eq!(
            indices,
            (0..100).collect::<Vec<u64>>(),
            "indices in transaction {t}"
        );
        got.sort();
        assert_eq!(got, keys, "keys of transaction {t}");
    }
}

enum Disruption {
    KillTidemark,
    RestartNats,
    RestartPostgres,
    /// Through a proxy: every connection to Postgres (replication included) is cut.
    CutPostgres,
    /// Through a proxy: bytes to and from Postgres stop for three seconds.
    StallPostgres,
    /// Through a proxy: the NATS connection is cut.
    CutNats,
    /// Through a proxy: bytes to and from NATS stop for three seconds.
    StallNats,
}

async fn backlog_survives(disruption: Disruption) {
    let mut pg = PgServer::start();
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tidemark.log");
    let db = pg.create_db("store").await;
    db.batch_execute("CREATE TABLE items (id int PRIMARY KEY, qty int, note text)")
        .await
        .unwrap();
    // Both servers are reached through proxies that can cut or stall connections.
    let pg_proxy = Proxy::start(pg.port).await;
    let nats_port: u16 = nats.url().rsplit(':').next().unwrap().parse().unwrap();
    let nats_proxy = Proxy::start(nats_port).await;
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["items"])
            .set("publish_window", 256)
            .through_pg_proxy(&pg_proxy)
            .through_nats_proxy(&nats_proxy),
    );

    // First run creates the slot and the stream; stop it to build a backlog.
    let mut tm = Tidemark::run(&cfg, &log);
    tm.wait_streaming();
    assert!(tm.terminate(Duration::from_secs(30)).success());
    db.batch_execute(BACKLOG).await.unwrap();
    let end = current_lsn(&db).await;
    drop(db);

    let nc = nats.client().await;
    let mut tm = Tidemark::run(&cfg, &log);
    let at = wait_stream_count(&nc, "STORE", 5_000, Duration::from_secs(60), || tm.log()).await;
    assert!(
        at < 50_000,
        "the backlog drained before the disruption ({at} events): make it larger"
    );
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
        Disruption::CutPostgres => pg_proxy.cut(),
        Disruption::CutNats => nats_proxy.cut(),
        Disruption::StallPostgres | Disruption::StallNats => {
            let proxy = match disruption {
                Disruption::StallPostgres => &pg_proxy,
                _ => &nats_proxy,
            };
            proxy.stall();
            tokio::time::sleep(Duration::from_secs(3)).await;
            proxy.resume();
        }
    }
    // Everything is stored once the slot confirms the end of the backlog.
    wait_confirmed(
        &pg,
        "store",
        "tidemark_store",
        end,
        Duration::from_secs(120),
        || tm.log(),
    )
    .await;
    let nc = nats.client().await;
    let events = read_stream(&nc, "STORE").await;
    assert_backlog(&events);
    assert!(
        tm.is_running(),
        "tidemark must recover on its own:\n{}",
        tm.log()
    );
    let text = tm.log();
    match disruption {
        // The restarted process resumed from a stream that already held events.
        Disruption::KillTidemark => assert!(text.contains("last_event=Some"), "{text}"),
        // The client saw the outage; it either rode it out (publishes buffered across
        // the reconnect, the sequence chain guarding against loss) or rebuilt.
        Disruption::RestartNats => assert!(
            text.contains("disconnected")
                || text.contains("rebuilding from the slot and the stream"),
            "{text}"
        ),
        // The replication connection died with the server: the pipeline rebuilt.
        Disruption::RestartPostgres | Disruption::CutPostgres => {
            assert!(
                text.contains("rebuilding from the slot and the stream"),
                "{text}"
            )
        }
        // A cut NATS connection is seen by the client, which reconnects (or the
        // pipeline rebuilds).
        Disruption::CutNats => assert!(
            text.contains("disconnected")
                || text.contains("rebuilding from the slot and the stream"),
            "{text}"
        ),
        // A stall only delays: the same connections carry on.
        Disruption::StallPostgres | Disruption::StallNats => {}
    }
    assert!(tm.terminate(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_backlog_then_restart_stores_each_change_exactly_once() {
    backlog_survives(Disruption::KillTidemark).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_postgres_connection_mid_backlog_loses_and_repeats_nothing() {
    backlog_survives(Disruption::CutPostgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_postgres_connection_mid_backlog_loses_and_repeats_nothing() {
    backlog_survives(Disruption::StallPostgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_nats_connection_mid_backlog_loses_and_repeats_nothing() {
    backlog_survives(Disruption::CutNats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_nats_connection_mid_backlog_loses_and_repeats_nothing() {
    backlog_survives(Disruption::StallNats).await;
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
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE quiet (id int PRIMARY KEY); CREATE TABLE busy (id serial PRIMARY KEY, v text);").await.unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").tables(&["quiet"]),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let before = confirmed_flush(&db, "tidemark_store").await.unwrap();
    for i in 0..200 {
        db.execute("INSERT INTO busy (v) VALUES ($1)", &[&format!("row {i}")])
            .await
            .unwrap();
    }
    let after_churn = current_lsn(&db).await;
    assert!(after_churn > before);
    wait_confirmed(
        &pg,
        "store",
        "tidemark_store",
        after_churn,
        Duration::from_secs(60),
        || tm.log(),
    )
    .await;
    let nc = nats.client().await;
    assert_eq!(
        stream_count(&nc, "STORE").await,
        0,
        "busy is not published: no events"
    );
}

// ---------------------------------------------------------------------------------
// Values: one column per supported type, checked against the expected JSON.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_type_arrives_as_the_expected_json() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE DOMAIN positive AS int CHECK (VALUE > 0);
         CREATE TABLE vals (
           id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
           f_nan float8, f_inf float8, f_ninf float4, n numeric, t text, vc varchar(10), bp char(3),
           nm name, u uuid, j json, jb jsonb, d date, tm time, tmtz timetz, ts timestamp,
           tstz timestamptz, by bytea, ai int[], at text[], a2 int[][], ab bool[], an numeric[],
           ajb jsonb[], ats timestamptz[], m mood, am mood[], dom positive, nul text, big_i8 int8
         );",
    )
    .await
    .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute(
        r#"INSERT INTO vals VALUES (
           1, true, -32768, 2147483647, -9223372036854775808, 1.5, 0.1,
           'NaN', 'Infinity', '-Infinity', 12345678901234567890.000000000000000001, 'héllo "wörld" ✓', 'short', 'ab',
           'a_name', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"k": [1, "two", null]}', '{"z": 1, "a": {"b": true}}',
           '2024-02-29', '13:14:15.5', '13:14:15+02', '2024-01-02 03:04:05.123456',
           '2024-01-02 03:04:05.5+01', '\x00ff10', '{1,NULL,3}', '{"a b","c,d","e\"f",NULL,"NULL"}', '{{1,2},{3,4}}',
           '{t,f}', '{1.10,NaN}', ARRAY['{"x":1}'::jsonb, '[2]'::jsonb], ARRAY['2024-01-02 03:04:05+00'::timestamptz],
           'happy', '{happy,sad}', 7, NULL, 9007199254740993
        )"#,
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    let after = &events[0].body["data"]["after"];
    let expected = json!({
        "id": 1, "b": true, "i2": -32768, "i4": 2147483647, "i8": -9223372036854775808i64,
        "f4": 1.5, "f8": 0.1, "f_nan": "NaN", "f_inf": "Infinity", "f_ninf": "-Infinity",
        "n": "12345678901234567890.000000000000000001", "t": "héllo \"wörld\" ✓", "vc": "short", "bp": "ab ",
        "nm": "a_name", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": {"k": [1, "two", null]}, "jb": {"a": {"b": true}, "z": 1},
        "d": "2024-02-29", "tm": "13:14:15.5", "tmtz": "13:14:15+02:00",
        "ts": "2024-01-02T03:04:05.123456", "tstz": "2024-01-02T02:04:05.5Z",
        "by": "AP8Q", "ai": [1, null, 3], "at": ["a b", "c,d", "e\"f", null, "NULL"], "a2": [[1, 2], [3, 4]],
        "ab": [true, false], "an": ["1.10", "NaN"], "ajb": [{"x": 1}, [2]], "ats": ["2024-01-02T03:04:05Z"],
        "m": "happy", "am": ["happy", "sad"], "dom": 7, "nul": null, "big_i8": 9007199254740993i64
    });
    for (k, v) in expected.as_object().unwrap() {
        assert_eq!(&after[k], v, "column {k}");
    }
    assert_eq!(
        after.as_object().unwrap().len(),
        expected.as_object().unwrap().len(),
        "{after:#}"
    );
}

// ---------------------------------------------------------------------------------
// Authentication over the replication connection.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_md5_and_cleartext_logins_stream_and_a_wrong_password_is_named() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         SET password_encryption = 'scram-sha-256';
         CREATE ROLE pw_scram LOGIN REPLICATION SUPERUSER PASSWORD 'secret-scram';
         CREATE ROLE pw_plain LOGIN REPLICATION SUPERUSER PASSWORD 'secret-plain';
         SET password_encryption = 'md5';
         CREATE ROLE pw_md5 LOGIN REPLICATION SUPERUSER PASSWORD 'secret-md5';",
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    for (n, (user, password)) in [
        ("pw_scram", "secret-scram"),
        ("pw_md5", "secret-md5"),
        ("pw_plain", "secret-plain"),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("s{n}");
        std::fs::write(
            dir.path().join(format!("{name}.pw")),
            format!("{password}\n"),
        )
        .unwrap();
        let cfg = write_config(
            dir.path(),
            &pg,
            &nats,
            &SourceSpec::new(&name, "store")
                .tables(&["t"])
                .postgres("user", *user)
                .postgres("password_file", format!("{name}.pw")),
        );
        let mut tm = Tidemark::run(&cfg, &dir.path().join(format!("{name}.log")));
        wait_for(
            &format!("{user} to stream"),
            Duration::from_secs(30),
            || {
                assert!(tm.is_running(), "{user}: {}", tm.log());
                tm.log().contains("streaming").then_some(())
            },
        );
        db.execute("INSERT INTO t VALUES ($1)", &[&(n as i32)])
            .await
            .unwrap();
        wait_stream_count(
            &nc,
            &name.to_uppercase(),
            1,
            Duration::from_secs(30),
            || tm.log(),
        )
        .await;
        assert!(tm.terminate(Duration::from_secs(30)).success());
    }

    // A wrong password: `check` says which login failed, `run` stops with exit 1.
    std::fs::write(dir.path().join("bad.pw"), "nope").unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("bad", "store")
            .tables(&["t"])
            .postgres("user", "pw_scram")
            .postgres("password_file", "bad.pw"),
    );
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL [bad] postgres: cannot connect to postgres at 127.0.0.1:"),
        "{out}"
    );
    assert!(
        out.contains("password authentication failed for user \"pw_scram\""),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("bad.log"));
    let status = tm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", tm.log());
    assert!(
        tm.log()
            .contains("password authentication failed for user \"pw_scram\""),
        "{}",
        tm.log()
    );
}

// ---------------------------------------------------------------------------------
// Bad input: each gets a message that says what to do, and nothing is streamed.
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_key_is_named_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tidemark.toml");
    std::fs::write(
        &cfg,
        "[nats]\nservers = [\"nats://127.0.0.1:4222\"]\n\n[[source]]\nname = \"store\"\npublication = \"p\"\nslot = \"s\"\nall_tables = true\nslot_nam = \"typo\"\n[source.postgres]\nhost = \"h\"\ndbname = \"d\"\nuser = \"u\"\n[source.stream]\nname = \"S\"\n",
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let (code, _, err) = tidemark_cmd(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 2, "{err}");
        let want = format!(
            "error: {}:9: source[0].slot_nam: unknown field `slot_nam`",
            cfg.display()
        );
        assert!(err.starts_with(&want), "{cmd}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused_with_the_fix() {
    let pg = PgServer::start_with(&[("wal_level", "replica")]);
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    pg.create_db("store")
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL [store] wal_level: wal_level is \"replica\", not \"logical\": set wal_level = logical in postgresql.conf"), "{out}");
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    assert_eq!(tm.wait_exit(Duration::from_secs(30)).code(), Some(1));
    assert!(
        tm.log()
            .contains("wal_level is \"replica\", not \"logical\""),
        "{}",
        tm.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_publication_with_creation_disabled_is_refused() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").set("create_publication", false),
    );
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL [store] publication \"tidemark_store\": publication \"tidemark_store\" does not exist and create_publication = false: run CREATE PUBLICATION \"tidemark_store\" FOR TABLE"), "{out}");
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    assert_eq!(tm.wait_exit(Duration::from_secs(30)).code(), Some(1));
    assert!(
        tm.log()
            .contains("does not exist and create_publication = false"),
        "{}",
        tm.log()
    );
    // Nothing was created behind the operator's back.
    let slots = db
        .query("SELECT 1 FROM pg_replication_slots", &[])
        .await
        .unwrap();
    assert!(slots.is_empty());
    // The operator's publication leaves deletes and truncates out: said by both.
    db.batch_execute(
        "CREATE PUBLICATION tidemark_store FOR TABLE t WITH (publish = 'insert, update')",
    )
    .await
    .unwrap();
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok   [store] publication \"tidemark_store\": exists, publishes 1 table(s); warning: it does not publish delete, truncate, so those changes never reach the stream"), "{out}");
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    tm.wait_streaming();
    assert!(
        tm.log()
            .contains("the publication does not publish these operations"),
        "{}",
        tm.log()
    );
    let status = tm.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", tm.log());
}

/// A partitioned table (orders split by region) as a legacy store has it: its
/// snapshot and its live changes are the table's events (subject, `table`, key),
/// never its partitions', whatever partition a row is in or moves to, partitions
/// added later included; a restart streams on. A publication the operator made
/// that sends the partitions' names is refused with the fix, by `check` and `run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_streams_as_itself_never_as_its_partitions() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    if pg_major() < 13 {
        return partitioned_tables_on_12(pg, nats, dir, db).await;
    }
    db.batch_execute(
        "CREATE TABLE orders (id bigint, region text NOT NULL, total int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
         CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us');
         INSERT INTO orders SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g FROM generate_series(1, 6) g;
         CREATE PUBLICATION tidemark_store FOR TABLE orders;",
    )
    .await
    .unwrap();
    let spec = SourceSpec::new("store", "store")
        .tables(&["orders"])
        .snapshot("initial");
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &spec.clone().set("create_publication", false),
    );
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL [store] table \"public\".\"orders\": publication \"tidemark_store\" sends the changes of partitioned table \"public\".\"orders\" under each partition's name"), "{out}");
    assert!(
        out.contains(
            "ALTER PUBLICATION \"tidemark_store\" SET (publish_via_partition_root = true)"
        ),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("refused.log"));
    assert_eq!(tm.wait_exit(Duration::from_secs(30)).code(), Some(1));
    assert!(
        tm.log().contains("publish_via_partition_root = true"),
        "{}",
        tm.log()
    );

    // Managed by tidemark (the default), the publication is set to publish via the root.
    let cfg = write_config(dir.path(), &pg, &nats, &spec);
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("will be set to publish_via_partition_root = true"),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    let nc = nats.client().await;
    // The snapshot first, so that the order of the events below is known.
    wait_stream_count(&nc, "STORE", 6, Duration::from_secs(30), || tm.log()).await;
    db.batch_execute(
        "INSERT INTO orders VALUES (7, 'eu', 7);
         UPDATE orders SET total = 0 WHERE id = 2;
         UPDATE orders SET region = 'us' WHERE id = 4;
         DELETE FROM orders WHERE id = 6;
         CREATE TABLE orders_apac PARTITION OF orders FOR VALUES IN ('apac');
         INSERT INTO orders VALUES (8, 'apac', 8);",
    )
    .await
    .unwrap();
    wait_stream_count(&nc, "STORE", 12, Duration::from_secs(30), || tm.log()).await;
    let status = tm.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", tm.log());
    // A restart finds the table published (it looped on ALTER PUBLICATION ADD TABLE
    // when the publication listed the partitions).
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute("UPDATE orders SET total = 9 WHERE id = 8; TRUNCATE orders;")
        .await
        .unwrap();
    wait_stream_count(&nc, "STORE", 14, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let got: Vec<(String, String, Value)> = summarize(&events)
        .into_iter()
        .map(|(subject, _, data)| (subject, data["table"].to_string(), data["key"].clone()))
        .collect();
    let table = json!("public.orders").to_string();
    let key = |id: i64, region: &str| json!({"id": id, "region": region});
    let mut expected: Vec<(String, String, Value)> = (1..=6)
        .map(|g| {
            let region = if g % 2 == 0 { "eu" } else { "us" };
            (
                "store.orders.read".to_string(),
                table.clone(),
                key(g, region),
            )
        })
        .collect();
    for (op, k) in [
        ("created", key(7, "eu")),
        ("updated", key(2, "eu")),
        // A row moving to another partition: deleted from one, inserted in the other.
        ("deleted", key(4, "eu")),
        ("created", key(4, "us")),
        ("deleted", key(6, "eu")),
        ("created", key(8, "apac")),
        ("updated", key(8, "apac")),
        ("truncated", Value::Null),
    ] {
        expected.push((format!("store.orders.{op}"), table.clone(), k));
    }
    assert_eq!(got, expected, "{}", tm.log());
    let status = tm.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", tm.log());
}

/// Relations no slot can stream: an UNLOGGED table (its changes are not in the WAL),
/// a materialized view, and a partitioned table whose partition has no replica
/// identity, each named in `tables`: `check` fails and `run` stops,
/// each with the fix (`run` looped on Postgres's refusal before). With `all_tables`
/// the unlogged table is left out, said by `check`, and the rest streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlogged_tables_and_views_are_refused_with_the_fix() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE UNLOGGED TABLE cache (id int PRIMARY KEY, v text);
         CREATE TABLE t (id int PRIMARY KEY);
         CREATE MATERIALIZED VIEW mv AS SELECT 1 AS x;
         CREATE TABLE hist (at int, v text) PARTITION BY RANGE (at);
         ALTER TABLE hist REPLICA IDENTITY FULL;
         CREATE TABLE hist_1 PARTITION OF hist FOR VALUES FROM (0) TO (100);
         INSERT INTO hist VALUES (1, 'a');",
    )
    .await
    .unwrap();
    for (tables, fix) in [
        // A keyless partitioned table whose partition keeps the default identity:
        // publishing it would break the application's UPDATEs of that partition.
        (
            vec!["hist"],
            if pg_major() >= 13 {
                "table \"public\".\"hist_1\" has no primary key and REPLICA IDENTITY DEFAULT: publishing it would make PostgreSQL reject UPDATE and DELETE on it"
            } else {
                // PostgreSQL 12 cannot publish a partitioned table at all.
                "cannot stream a partitioned table"
            },
        ),
        (
            vec!["t", "cache"],
            "table \"public\".\"cache\" is UNLOGGED: its changes are not written to the WAL, so no replication slot can stream them; run ALTER TABLE \"public\".\"cache\" SET LOGGED",
        ),
        (
            vec!["mv"],
            "\"public\".\"mv\" is a materialized view, not a table: logical replication streams tables only",
        ),
    ] {
        let spec = SourceSpec::new("store", "store").tables(&tables);
        let cfg = write_config(dir.path(), &pg, &nats, &spec);
        let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("FAIL [store] ") && l.contains(fix)),
            "{out}"
        );
        let mut tm = Tidemark::run(&cfg, &dir.path().join("refused.log"));
        assert_eq!(
            tm.wait_exit(Duration::from_secs(30)).code(),
            Some(1),
            "{}",
            tm.log()
        );
        assert!(tm.log().contains(fix), "{}", tm.log());
    }
    db.execute("UPDATE hist SET v = 'b'", &[])
        .await
        .expect("the application's UPDATEs keep working");
    db.batch_execute("ALTER TABLE hist_1 REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok   [store] table \"public\".\"cache\": warning: UNLOGGED, so not streamed"),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    let nc = nats.client().await;
    tm.wait_streaming();
    db.batch_execute("INSERT INTO cache VALUES (1, 'x'); INSERT INTO t VALUES (1);")
        .await
        .unwrap();
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
    let status = tm.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", tm.log());
    let events = read_stream(&nc, "STORE").await;
    let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
    assert_eq!(subjects, ["store.t.created"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_and_table_without_replica_identity_are_explained() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE no_key (v text)")
        .await
        .unwrap();

    // A table whose UPDATEs Postgres would reject once published.
    let spec = SourceSpec::new("store", "store").tables(&["no_key"]);
    let cfg = write_config(dir.path(), &pg, &nats, &spec);
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("table \"public\".\"no_key\" has no primary key and REPLICA IDENTITY DEFAULT"),
        "{out}"
    );
    assert!(
        out.contains("ALTER TABLE \"public\".\"no_key\" REPLICA IDENTITY FULL"),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("t.log"));
    assert_eq!(tm.wait_exit(Duration::from_secs(30)).code(), Some(1));
    db.execute("UPDATE no_key SET v = 'still works'", &[])
        .await
        .expect("the application's UPDATEs keep working");

    // Nothing listens on this port.
    let cfg = write_config(dir.path(), &pg, &nats, &spec.postgres("port", free_port()));
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL [store] postgres: cannot connect to postgres at 127.0.0.1:"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_ready_source_and_changes_nothing() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
        .await
        .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").tables(&["orders"]),
    );
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "ok   [store] wal_level: logical",
        "ok   [store] publication \"tidemark_store\": will be created",
        "ok   [store] table \"public\".\"orders\": replica identity default, key (id); will be added to the publication",
        "ok   [store] slot \"tidemark_store\": will be created",
        "ok   [store] stream \"STORE\": will be created",
        "ok   [store] plan public.orders: key: id; schema hash ",
        "ok   [store] plan public.orders: columns: id, status",
        "ok   [store] plan public.orders: insert -> orders.created, subject store.orders.created",
        "ok   [store] plan public.orders: update -> orders.updated, subject store.orders.updated",
        "ok   [store] plan public.orders: delete -> orders.deleted, subject store.orders.deleted",
        "ok   [store] plan public.orders: warning: status can be TOASTed",
        "ok   [store] would stream to stream \"STORE\"",
        "ok   [store] max_slot_wal_keep_size: warning: unlimited",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let slots = db
        .query("SELECT 1 FROM pg_replication_slots", &[])
        .await
        .unwrap();
    let pubs = db.query("SELECT 1 FROM pg_publication", &[]).await.unwrap();
    assert!(
        slots.is_empty() && pubs.is_empty(),
        "check must not create anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_row_stops_the_source_naming_table_and_key_and_skips_nothing() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        .await
        .unwrap();
    let spec = SourceSpec::new("store", "store").set("max_event_bytes", 2048);
    let cfg = write_config(dir.path(), &pg, &nats, &spec);
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO notes VALUES (1, 'small')")
        .await
        .unwrap();
    let before_big = current_lsn(&db).await;
    db.batch_execute(&format!(
        "INSERT INTO notes VALUES (42, '{}')",
        "y".repeat(5000)
    ))
    .await
    .unwrap();
    db.batch_execute("INSERT INTO notes VALUES (2, 'after the big one')")
        .await
        .unwrap();
    let status = tm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", tm.log());
    let log = tm.log();
    assert!(
        log.contains("for public.notes (key {\"id\":42}) is "),
        "{log}"
    );
    assert!(log.contains("over max_event_bytes = 2048"), "{log}");
    // The small row before it is stored; nothing at or after the big one is, and the
    // slot was not confirmed past it, so a restart with a higher limit sends it again.
    let nc = nats.client().await;
    let events = read_stream(&nc, "STORE").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body["data"]["key"], json!({"id": 1}));
    let confirmed = confirmed_flush(&db, "tidemark_store").await.unwrap();
    assert!(
        confirmed <= before_big,
        "confirmed {confirmed} past the oversized row at {before_big}"
    );
    write_config(dir.path(), &pg, &nats, &spec.set("max_event_bytes", 100000));
    let tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    wait_stream_count(&nc, "STORE", 3, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let keys: Vec<Value> = events
        .iter()
        .map(|e| e.body["data"]["key"]["id"].clone())
        .collect();
    assert_eq!(keys, vec![json!(1), json!(42), json!(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_confirms_the_last_transaction_and_exits_0() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    // A long status interval: the final status update on SIGTERM is what confirms.
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").set("status_interval_secs", 3600),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 2000)")
        .await
        .unwrap();
    let end = current_lsn(&db).await;
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 2000, Duration::from_secs(30), || tm.log()).await;
    let status = tm.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", tm.log());
    assert!(
        tm.log().contains("stopped; final flush LSN sent"),
        "{}",
        tm.log()
    );
    let confirmed = confirmed_flush(&db, "tidemark_store").await.unwrap();
    assert!(
        confirmed >= end,
        "confirmed {confirmed}, wanted at least {end}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_a_unix_socket() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let socket_dir = pg.data_dir().parent().unwrap().to_path_buf();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").postgres("host", socket_dir.as_path()),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_stands_by_and_takes_over_exactly_once() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE items (id int PRIMARY KEY, qty int, note text)")
        .await
        .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["items"])
            .set("publish_window", 256),
    );
    let mut first = Tidemark::run(&cfg, &dir.path().join("first.log"));
    wait_for(
        "the first instance to stream",
        Duration::from_secs(30),
        || first.log().contains("streaming").then_some(()),
    );
    let second = Tidemark::run(&cfg, &dir.path().join("second.log"));
    wait_for(
        "the second instance to stand by",
        Duration::from_secs(30),
        || {
            second
                .log()
                .contains("is in use by another process")
                .then_some(())
        },
    );
    db.batch_execute(BACKLOG).await.unwrap();
    let end = current_lsn(&db).await;
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 5_000, Duration::from_secs(60), || first.log()).await;
    first.kill9();
    let killed = std::time::Instant::now();
    wait_for(
        "the second instance to take over",
        Duration::from_secs(60),
        || second.log().contains("streaming").then_some(()),
    );
    let takeover = killed.elapsed();
    eprintln!("standby takeover: streaming {takeover:?} after kill -9 of the active instance");
    wait_confirmed(
        &pg,
        "store",
        "tidemark_store",
        end,
        Duration::from_secs(120),
        || second.log(),
    )
    .await;
    let events = read_stream(&nc, "STORE").await;
    assert_backlog(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_stream_and_unreachable_nats_are_explained() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let nc = nats.client().await;
    async_nats::jetstream::new(nc.clone())
        .create_stream(async_nats::jetstream::stream::Config {
            name: "STORE".into(),
            subjects: vec!["other.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let spec = SourceSpec::new("store", "store");
    let cfg = write_config(dir.path(), &pg, &nats, &spec);
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    assert_eq!(
        tm.wait_exit(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        tm.log()
    );
    assert!(
        tm.log().contains("stream \"STORE\" exists but captures subjects [\"other.>\"], not \"store.>\": change the config to match"),
        "{}",
        tm.log()
    );

    let spec = spec.nats_servers(vec![format!("nats://127.0.0.1:{}", free_port())]);
    let cfg = write_config(dir.path(), &pg, &nats, &spec);
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL [store] nats: cannot connect to NATS at nats://127.0.0.1:"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_the_new_shape_after_alter_table_mid_stream() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute(
        "INSERT INTO t VALUES (1, 'x');
         ALTER TABLE t ADD COLUMN qty int DEFAULT 5;
         INSERT INTO t VALUES (2, 'y', 7);
         ALTER TABLE t DROP COLUMN a;
         UPDATE t SET qty = 9 WHERE id = 1;
         ALTER TABLE t RENAME COLUMN qty TO amount;
         ALTER TABLE t ALTER COLUMN amount TYPE numeric;
         DELETE FROM t WHERE id = 2;
         INSERT INTO t VALUES (3, 1.5);",
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 5, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let rows: Vec<Value> = events
        .iter()
        .map(|e| e.body["data"]["after"].clone())
        .collect();
    assert_eq!(
        rows,
        vec![
            json!({"id": 1, "a": "x"}),
            json!({"id": 2, "a": "y", "qty": 7}),
            json!({"id": 1, "qty": 9}),
            Value::Null,
            json!({"id": 3, "amount": "1.5"}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_is_not_silently_recreated_over_a_stream_with_events() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("first.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
    assert!(tm.terminate(Duration::from_secs(30)).success());
    db.batch_execute("SELECT pg_drop_replication_slot('tidemark_store')")
        .await
        .unwrap();
    db.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();

    let mut tm = Tidemark::run(&cfg, &dir.path().join("second.log"));
    assert_eq!(
        tm.wait_exit(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        tm.log()
    );
    assert!(
        tm.log().contains("replication slot \"tidemark_store\" does not exist, but stream \"STORE\" has stored events of this source (up to sequence 1, commit LSN "),
        "{}",
        tm.log()
    );
    let slots = db
        .query("SELECT 1 FROM pg_replication_slots", &[])
        .await
        .unwrap();
    assert!(slots.is_empty(), "no new slot behind the operator's back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_chain_of_positions_and_fails_for_a_missing_slot() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    for i in 1..=3 {
        db.execute("INSERT INTO t VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 3, Duration::from_secs(30), || tm.log()).await;
    assert!(tm.terminate(Duration::from_secs(30)).success());
    let end = confirmed_flush(&db, "tidemark_store").await.unwrap();
    let events = read_stream(&nc, "STORE").await;
    // A durable consumer that has read nothing: 3 pending.
    let js = async_nats::jetstream::new(nc.clone());
    js.get_stream("STORE")
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("projector".into()),
            ..Default::default()
        })
        .await
        .unwrap();

    let (code, out, err) = tidemark_cmd(&["status", "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("status --json prints JSON");
    let s = &v[0];
    assert_eq!(s["source"], "store");
    assert_eq!(s["problems"], json!([]));
    assert_eq!(s["postgres"]["slot"]["active"], false);
    assert_eq!(
        s["postgres"]["slot"]["confirmed_flush_lsn"],
        end.to_string()
    );
    assert!(
        s["postgres"]["slot"]["retained_wal_bytes"]
            .as_i64()
            .unwrap()
            >= 0
    );
    assert_eq!(s["stream"]["messages"], 3);
    assert_eq!(s["stream"]["first_seq"], 1);
    assert_eq!(s["stream"]["last_seq"], 3);
    assert_eq!(s["stream"]["first_lsn"], events[0].body["commitlsn"]);
    assert_eq!(s["stream"]["last_lsn"], events[2].body["commitlsn"]);
    assert_eq!(
        s["stream"]["consumers"],
        json!([{"name": "projector", "ack_floor_seq": 0, "pending": 3}])
    );

    let (code, out, _) = tidemark_cmd(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("  slot      confirmed flush {end}")),
        "{out}"
    );
    assert!(out.contains("  stream    3 messages  seq 1..3"), "{out}");
    assert!(
        out.contains("  consumer  projector  ack floor 0  pending 3"),
        "{out}"
    );

    db.batch_execute("SELECT pg_drop_replication_slot('tidemark_store')")
        .await
        .unwrap();
    let (code, out, _) = tidemark_cmd(&["status", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  slot      MISSING"), "{out}");
    assert!(
        out.contains("  PROBLEM   replication slot \"tidemark_store\" does not exist"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------
// Replay from a log position.
// ---------------------------------------------------------------------------------

/// The commit LSN and id of the message at `seq`.
async fn event_at(nc: &async_nats::Client, seq: u64) -> (tidemark::position::Lsn, String, Value) {
    let js = async_nats::jetstream::new(nc.clone());
    let m = js
        .get_stream("STORE")
        .await
        .unwrap()
        .get_raw_message(seq)
        .await
        .unwrap();
    let id = m
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .unwrap()
        .as_str()
        .to_string();
    let body: Value = serde_json::from_slice(&m.payload).unwrap();
    (
        body["commitlsn"].as_str().unwrap().parse().unwrap(),
        id,
        body,
    )
}

fn replay_lines(cfg: &std::path::Path, args: &[&str]) -> (i32, Vec<Value>, String) {
    let mut all = vec!["replay", "--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = tidemark_cmd(&all);
    let lines = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("each stdout line is an event"))
        .collect();
    (code, lines, err)
}

/// The number of reads the replay used to locate its range, from its summary.
fn reads(stderr: &str) -> u64 {
    let at = stderr
        .find("start located in ")
        .unwrap_or_else(|| panic!("no summary in {stderr}"));
    stderr[at + 17..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_lsn_sequence_and_time_gives_exact_slices_found_by_binary_search() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute(
        "DO $$ BEGIN FOR t IN 0..999 LOOP
           INSERT INTO t SELECT t * 100 + g FROM generate_series(0, 99) g; COMMIT;
         END LOOP; END $$;",
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 100_000, Duration::from_secs(180), || tm.log()).await;
    assert!(tm.terminate(Duration::from_secs(30)).success());

    // The transaction that starts at sequence 50,001 (100 events per transaction).
    let (mid_lsn, mid_id, mid_body) = event_at(&nc, 50_001).await;
    let (prev_lsn, _, _) = event_at(&nc, 50_000).await;
    assert!(prev_lsn < mid_lsn);
    let lsn = mid_lsn.to_string();
    let (code, lines, err) = replay_lines(&cfg, &["--from-lsn", &lsn, "--to-lsn", &lsn]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines.len(), 100, "exactly the one transaction");
    assert_eq!(lines[0]["id"], mid_id.as_str());
    assert_eq!(lines[99]["id"], format!("store:{lsn}:99"));
    assert!(err.contains("sequences 50001..50100"), "{err}");
    // Logarithmic in the stream size: two searches of at most ⌈log2(100000)⌉ + 1 reads.
    assert!(reads(&err) <= 36, "{err}");

    // A position between two transactions starts at the next one.
    let between = tidemark::position::Lsn(mid_lsn.0 - 1).to_string();
    let (code, lines, err) = replay_lines(&cfg, &["--from-lsn", &between, "--to-seq", "50001"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"], mid_id.as_str());

    // Both edges: before the first event (nothing was cut, so from the start), and
    // from a sequence to the newest.
    let (code, lines, err) = replay_lines(&cfg, &["--from-lsn", "0/1", "--to-seq", "100"]);
    assert_eq!((code, lines.len()), (0, 100), "{err}");
    assert_eq!(lines[0]["txindex"], 0);
    let (code, lines, err) = replay_lines(&cfg, &["--from-seq", "99901"]);
    assert_eq!((code, lines.len()), (0, 100), "{err}");
    let (_, last_id, _) = event_at(&nc, 100_000).await;
    assert_eq!(lines[99]["id"], last_id.as_str());

    // By commit time: the transaction committed at that time, and nothing before it.
    let time = mid_body["time"].as_str().unwrap();
    let (code, lines, err) = replay_lines(&cfg, &["--from-time", time, "--to-seq", "50100"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines[0]["id"], mid_id.as_str(), "{err}");
    assert_eq!(lines.len(), 100);

    // After the newest event.
    let (newest, _, _) = event_at(&nc, 100_000).await;
    let after = tidemark::position::Lsn(newest.0 + 1).to_string();
    let (code, lines, err) = replay_lines(&cfg, &["--from-lsn", &after]);
    assert_eq!((code, lines.len()), (1, 0));
    assert!(
        err.contains(&format!(
            "LSN {after} is after the newest stored event (sequence 100000"
        )),
        "{err}"
    );

    // Retention cut the head: positions before the oldest stored event are refused.
    async_nats::jetstream::new(nc.clone())
        .get_stream("STORE")
        .await
        .unwrap()
        .purge()
        .sequence(1001)
        .await
        .unwrap();
    let (code, _, err) = replay_lines(&cfg, &["--from-seq", "5"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("sequence 5 is before the oldest stored event (sequence 1001, commit LSN "),
        "{err}"
    );
    let (code, _, err) = replay_lines(&cfg, &["--from-lsn", "0/1"]);
    assert_eq!(code, 1);
    assert!(err.contains("retention removed older events"), "{err}");
    let (code, lines, err) = replay_lines(&cfg, &["--to-seq", "1100"]);
    assert_eq!((code, lines.len()), (0, 100), "{err}");

    // A malformed LSN is a usage error that quotes it.
    let (code, _, err) = replay_lines(&cfg, &["--from-lsn", "0/XYZ"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid LSN \"0/XYZ\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_filters_by_subject_type_and_table_and_follows_new_events() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, s text); CREATE TABLE notes (id int PRIMARY KEY);")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute(
        "INSERT INTO orders VALUES (1, 'a'), (2, 'b');
         INSERT INTO notes VALUES (1);
         UPDATE orders SET s = 'c' WHERE id = 1;
         INSERT INTO notes VALUES (2);",
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 5, Duration::from_secs(30), || tm.log()).await;

    let ids = |lines: &[Value]| -> Vec<String> {
        lines
            .iter()
            .map(|l| format!("{}:{}", l["type"].as_str().unwrap(), l["data"]["key"]["id"]))
            .collect()
    };
    // The last match comes before the end of the stream: the replay still ends.
    let (code, lines, err) = replay_lines(&cfg, &["--subject", "store.orders.>"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        ids(&lines),
        vec!["orders.created:1", "orders.created:2", "orders.updated:1"]
    );
    let (code, lines, err) =
        replay_lines(&cfg, &["--subject", "store.*.created", "--table", "notes"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ids(&lines), vec!["notes.created:1", "notes.created:2"]);
    let (code, lines, err) = replay_lines(
        &cfg,
        &["--type", "orders.updated", "--type", "notes.created"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        ids(&lines),
        vec!["notes.created:1", "orders.updated:1", "notes.created:2"]
    );
    let (code, lines, err) = replay_lines(&cfg, &["--subject", "store.nothing.>"]);
    assert_eq!((code, lines.len()), (0, 0), "{err}");

    // --follow: stored events, then new ones as they are stored.
    let mut child = std::process::Command::new(Tidemark::bin())
        .args([
            "replay",
            "--config",
            cfg.to_str().unwrap(),
            "--follow",
            "--table",
            "orders",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("a stored event");
    }
    db.batch_execute("INSERT INTO notes VALUES (3); INSERT INTO orders VALUES (9, 'new');")
        .await
        .unwrap();
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the new event arrives while following");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["data"]["key"], json!({"id": 9}));
    assert!(
        child.try_wait().unwrap().is_none(),
        "--follow keeps running"
    );
    child.kill().unwrap();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_republishes_exactly_once_and_prints_a_pretty_view() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO orders SELECT generate_series(1, 300)")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 300, Duration::from_secs(30), || tm.log()).await;

    // Without a stream for the prefix: a clear error.
    let (code, _, err) = replay_lines(&cfg, &["--republish", "copy"]);
    assert_eq!(code, 1);
    assert!(err.contains("no stream captures copy.>"), "{err}");

    // A private copy, republished twice (the second run also after new events): each
    // event is there once, in order, under the prefix, with the original id.
    async_nats::jetstream::new(nc.clone())
        .create_stream(async_nats::jetstream::stream::Config {
            name: "COPY".into(),
            subjects: vec!["copy.>".into()],
            // No duplicate window to lean on: exactly-once comes from the tail rule.
            duplicate_window: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .unwrap();
    let (code, lines, err) = replay_lines(&cfg, &["--republish", "copy", "--to-seq", "200"]);
    assert_eq!((code, lines.len()), (0, 0), "{err}");
    assert!(err.contains("(200 republished, 0 already there)"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, _, err) = replay_lines(&cfg, &["--republish", "copy"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("(100 republished, 200 already there)"),
        "{err}"
    );
    let copy = read_stream(&nc, "COPY").await;
    let original = read_stream(&nc, "STORE").await;
    assert_eq!(copy.len(), 300);
    assert_exactly_once(&copy);
    for (c, o) in copy.iter().zip(&original) {
        assert_eq!(c.msg_id, o.msg_id);
        assert_eq!(c.subject, format!("copy.{}", o.subject));
    }

    // The human view: one line per event, with sequence, type and key.
    let (code, out, _) = tidemark_cmd(&[
        "replay",
        "--config",
        cfg.to_str().unwrap(),
        "--pretty",
        "--to-seq",
        "2",
    ]);
    assert_eq!(code, 0);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].starts_with("#1 ")
            && rows[0].contains("orders.created")
            && rows[0].ends_with("key={\"id\":1}"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_drop_refuses_an_active_slot_unless_forced() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;

    let c = cfg.to_str().unwrap();
    let (code, _, err) = tidemark_cmd(&["slot", "drop", "--config", c]);
    assert_eq!(code, 1);
    assert!(
        err.contains("replication slot \"tidemark_store\" is active (pid "),
        "{err}"
    );
    assert!(err.contains("pass --force"), "{err}");
    assert!(
        confirmed_flush(&db, "tidemark_store").await.is_some(),
        "the slot is still there"
    );

    let (code, out, err) = tidemark_cmd(&["slot", "drop", "--config", c, "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("dropped replication slot \"tidemark_store\""),
        "{out}"
    );
    // The running tidemark lost its slot; with events in the stream it stops rather
    // than starting over in silence.
    assert_eq!(
        tm.wait_exit(Duration::from_secs(60)).code(),
        Some(1),
        "{}",
        tm.log()
    );
    assert!(
        tm.log()
            .contains("does not exist, but stream \"STORE\" has stored events"),
        "{}",
        tm.log()
    );
    let (code, _, err) = tidemark_cmd(&["slot", "drop", "--config", c]);
    assert_eq!(code, 1);
    assert!(
        err.contains("replication slot \"tidemark_store\" does not exist"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_with_confirmation_starts_a_source_over_purging_or_keeping_the_stream() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("first.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 2, Duration::from_secs(30), || tm.log()).await;
    assert!(tm.terminate(Duration::from_secs(30)).success());

    let c = cfg.to_str().unwrap();
    let (code, _, err) = tidemark_cmd(&["reset", "--config", c]);
    assert_eq!(code, 2);
    assert!(err.contains("Pass --purge-stream --yes"), "{err}");
    assert_eq!(
        stream_count(&nc, "STORE").await,
        2,
        "nothing happened without confirmation"
    );

    let (code, out, err) = tidemark_cmd(&["reset", "--config", c, "--purge-stream", "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("dropped replication slot \"tidemark_store\""),
        "{out}"
    );
    assert!(
        out.contains("purged 2 events from stream \"STORE\""),
        "{out}"
    );
    assert_eq!(stream_count(&nc, "STORE").await, 0);
    assert!(confirmed_flush(&db, "tidemark_store").await.is_none());

    // A deliberate fresh start: run creates a new slot and streams from then on.
    let mut tm = Tidemark::run(&cfg, &dir.path().join("second.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].seq, 3, "sequences go on after a purge");
    assert_eq!(events[0].body["data"]["key"], json!({"id": 3}));
    assert!(tm.terminate(Duration::from_secs(30)).success());

    // Keep the stream instead: a marker records the discontinuity, and the next run
    // streams after it, exactly once.
    db.batch_execute("INSERT INTO t VALUES (4)").await.unwrap(); // lost: no slot will see it
    let (code, out, err) = tidemark_cmd(&["reset", "--config", c, "--keep-stream", "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("kept stream \"STORE\"; reset marker store:"),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("third.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (5)").await.unwrap();
    wait_stream_count(&nc, "STORE", 3, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    let kinds: Vec<String> = events
        .iter()
        .map(|e| e.body["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, vec!["t.created", "tidemark.reset", "t.created"]);
    assert_eq!(events[1].subject, "store._tidemark.reset");
    assert_eq!(events[1].body["data"]["op"], "reset");
    assert_eq!(events[2].body["data"]["key"], json!({"id": 5}));
    let positions: Vec<(tidemark::position::Lsn, u64)> = events
        .iter()
        .map(|e| {
            e.msg_id
                .parse::<tidemark::position::EventId>()
                .unwrap()
                .position()
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
}

/// PostgreSQL 12 cannot publish a partitioned table: a listed one is refused by
/// `check` and `run` (no retries) with the fix; its partitions listed instead stream
/// under their own names, and `all_tables` streams the partitions.
async fn partitioned_tables_on_12(
    pg: PgServer,
    nats: NatsServer,
    dir: tempfile::TempDir,
    db: tokio_postgres::Client,
) {
    db.batch_execute(
        "CREATE TABLE orders (id bigint, region text NOT NULL, total int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
         CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us');",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").tables(&["orders"]),
    );
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL [store] table \"public\".\"orders\": PostgreSQL 12.")
            && out.contains("list the partitions of"),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_refused(&["cannot stream a partitioned table"]);
    // Under all_tables, the partitions stream as tables of their own.
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO orders VALUES (1, 'eu', 10), (2, 'us', 20)")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_until(
        "both partitions' inserts",
        Duration::from_secs(60),
        || async {
            let mut types: Vec<String> = read_stream(&nc, "STORE")
                .await
                .iter()
                .map(|e| e.body["type"].as_str().unwrap_or("").to_string())
                .collect();
            types.sort();
            types == ["orders_eu.created", "orders_us.created"]
        },
    )
    .await;
    tm.terminate(Duration::from_secs(30));
}
