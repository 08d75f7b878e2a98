//! Integration tests of the source pipeline's edges (real PostgreSQL, real nats-server):
//! messages that yield several events against a full publish window, transaction
//! marks, the server's size limit, and shutdown in a stalled state.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Regression (issue 14): a multi-table TRUNCATE sent each relation's event into a
/// full window, and the task that would read the acks was the one waiting: the source
/// hung for good, and SIGTERM did not end it. Every window size must stream all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_table_truncate_streams_everything_whatever_the_window() {
    let Rig { pg, nats, dir, .. } = Rig::start().await;
    let nc = nats.client().await;
    for window in [1usize, 4, 1024] {
        let name = format!("w{window}");
        let db = pg.create_db(&name).await;
        db.batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);
             CREATE TABLE c (id int PRIMARY KEY); CREATE TABLE d (id int PRIMARY KEY);",
        )
        .await
        .unwrap();
        let cfg = write_config(
            dir.path(),
            &pg,
            &nats,
            &SourceSpec::new(&name, &name).set("publish_window", window),
        );
        let mut tm = Tidemark::run(&cfg, &dir.path().join(format!("{name}.log")));
        tm.wait_streaming();
        db.batch_execute(
            "INSERT INTO a SELECT generate_series(1, 1000);
             INSERT INTO b SELECT generate_series(1, 1000);
             INSERT INTO c SELECT generate_series(1, 1000);
             INSERT INTO d SELECT generate_series(1, 1000);",
        )
        .await
        .unwrap();
        db.batch_execute("TRUNCATE a, b, c, d").await.unwrap();
        db.batch_execute("INSERT INTO a SELECT generate_series(1, 500)")
            .await
            .unwrap();
        let stream = name.to_uppercase();
        wait_stream_count(&nc, &stream, 4_504, Duration::from_secs(60), || tm.log()).await;
        let events = read_stream(&nc, &stream).await;
        assert_eq!(events.len(), 4_504, "window {window}");
        assert_exactly_once(&events);
        let truncates: Vec<_> = events
            .iter()
            .filter(|e| {
                e.body["type"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with(".truncated")
            })
            .collect();
        assert_eq!(truncates.len(), 4, "window {window}: one event per table");
        // The transaction of the TRUNCATE ends once, on its last event.
        let lasts = truncates
            .iter()
            .filter(|e| e.body["txlast"] == serde_json::json!(true))
            .count();
        assert_eq!(lasts, 1, "window {window}");
        let started = Instant::now();
        let status = tm.terminate(Duration::from_secs(20));
        assert!(status.success(), "window {window}: {}", tm.log());
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}

/// Regression (issue 14): with transaction_events the summary is the transaction's
/// last event, and only it carries txlast = true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_with_its_summary_ends_once() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").set("transaction_events", true),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (1), (2), (3)")
        .await
        .unwrap();
    db.batch_execute("INSERT INTO t VALUES (4)").await.unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 6, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    let marks: Vec<(String, bool)> = events
        .iter()
        .map(|e| {
            (
                e.body["type"].as_str().unwrap_or("").to_string(),
                e.body["txlast"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let t = |s: &str, last| (s.to_string(), last);
    assert_eq!(
        marks,
        vec![
            t("t.created", false),
            t("t.created", false),
            t("t.created", false),
            t("tidemark.transaction", true),
            t("t.created", false),
            t("tidemark.transaction", true),
        ]
    );
}

/// Regression (issue 14): the server's max_payload counts headers too. An event
/// under max_event_bytes whose headers push it over the server's limit stopped
/// nothing: every attempt was refused and rebuilt. It now stops the source, named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_servers_limit_with_its_headers_stops_the_source_named() {
    let pg = PgServer::start();
    // A small max_payload, so a modest row reaches it.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 4096\n").unwrap();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let db = pg.create_db("store").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
        .await
        .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").set("max_event_bytes", 4096),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (1, 'small')")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
    // The envelope around a one-row body: what the row's text adds to it is its length.
    let first = read_stream(&nc, "STORE").await;
    let overhead = serde_json::to_string(&first[0].body).unwrap().len() - "small".len();
    // A payload 40 bytes under the limit: over it only with the headers.
    let body = "x".repeat(4096 - 40 - overhead);
    db.execute("INSERT INTO t VALUES (2, $1)", &[&body])
        .await
        .unwrap();
    let status = tm.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "{}", tm.log());
    let log = tm.log();
    assert!(log.contains("max_payload = 4096"), "{log}");
    assert!(log.contains("bytes of headers"), "{log}");
    assert_eq!(
        stream_count(&nc, "STORE").await,
        1,
        "the event before it is stored"
    );
}

/// SIGTERM while nothing can be stored (nats-server frozen mid-backlog, the window
/// full) ends the process within the drain deadline (the ack timeout), exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_stalled_ends_within_the_drain_timeout() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);")
        .await
        .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").set("publish_window", 4),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    tm.wait_streaming();
    let nc = nats.client().await;
    db.batch_execute("INSERT INTO a SELECT generate_series(1, 20000)")
        .await
        .unwrap();
    wait_stream_count(&nc, "STORE", 100, Duration::from_secs(30), || tm.log()).await;
    let pid = nats.pid().expect("nats pid") as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // A TRUNCATE of two tables lands behind the backlog, in the frozen window.
    db.batch_execute("TRUNCATE a, b").await.unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    // ack_timeout_secs = 5 in the test config: the drain waits at most that.
    let status = tm.terminate(Duration::from_secs(15));
    let took = started.elapsed();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(status.success(), "exit {status:?}: {}", tm.log());
    assert!(
        took < Duration::from_secs(12),
        "took {took:?}: {}",
        tm.log()
    );
}

/// Regression (issue 14): the replication socket had no receive timeout, so a silent
/// connection (a half-open TCP connection, a stalled network path) was noticed only by
/// the OS. Now silence past `replication_timeout_secs` (a reply requested at half of
/// it) drops the connection and rebuilds, and nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replication_connection_is_dropped_and_rebuilt() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let proxy = Proxy::start(pg.port).await;
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .set("replication_timeout_secs", 4)
            .through_pg_proxy(&proxy),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 100, Duration::from_secs(30), || tm.log()).await;
    // The path goes silent: connections stay open, nothing passes.
    proxy.stall();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tm.log().contains("sent nothing for") {
        assert!(Instant::now() < deadline, "never noticed:\n{}", tm.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.resume();
    db.batch_execute("INSERT INTO t SELECT generate_series(101, 200)")
        .await
        .unwrap();
    wait_stream_count(&nc, "STORE", 200, Duration::from_secs(60), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert_eq!(events.len(), 200);
    assert_exactly_once(&events);
    assert!(tm.is_running(), "{}", tm.log());
}

/// The stream emptied (purged by hand, or every event aged out) while the slot stays:
/// the transactions stored but not yet confirmed to Postgres come again from the slot,
/// and with nothing in the stream to compare them with they would be stored twice.
/// The last stored event's id is kept durably before each confirmation, so they are
/// known as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_stream_does_not_take_stored_transactions_again() {
    emptied_stream(false).await;
}

/// The same, once JetStream's duplicate window has forgotten the ids: the recorded
/// tail alone says what was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_stream_past_the_duplicate_window_does_not_take_them_again() {
    emptied_stream(true).await;
}

async fn emptied_stream(past_duplicate_window: bool) {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut spec = SourceSpec::new("store", "store")
        .tables(&["t"])
        .set("status_interval_secs", 3600);
    if past_duplicate_window {
        spec = spec.stream("duplicate_window_secs", 1);
    }
    let cfg = write_config(dir.path(), &pg, &nats, &spec);
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let nc = nats.client().await;
    let mut stored_lsn = None;
    for round in 0..5 {
        db.batch_execute(&format!(
            "INSERT INTO t SELECT g, 'r{round}' FROM generate_series({}, {}) g",
            round * 10 + 1,
            round * 10 + 10
        ))
        .await
        .unwrap();
        stored_lsn = Some(current_lsn(&db).await);
        wait_stream_count(
            &nc,
            "STORE",
            (round as u64 + 1) * 10,
            Duration::from_secs(30),
            || tm.log(),
        )
        .await;
    }
    // Stored, and not confirmed (the status interval is an hour): what a crash leaves.
    let confirmed = confirmed_flush(&db, "tidemark_store").await;
    assert!(
        confirmed < stored_lsn,
        "precondition: the last transactions are not yet confirmed ({confirmed:?} vs {stored_lsn:?})"
    );
    let js = async_nats::jetstream::new(nc.clone());
    if past_duplicate_window {
        // The last stored event is recorded within a second, confirmed or not.
        let kv = js.get_key_value("tidemark_store").await.unwrap();
        wait_until(
            "the stored tail to be recorded",
            Duration::from_secs(10),
            || {
                let kv = kv.clone();
                async move {
                    kv.get("tail").await.ok().flatten().is_some_and(|v| {
                        serde_json::from_slice::<serde_json::Value>(&v)
                            .ok()
                            .and_then(|v| v["seq"].as_u64())
                            == Some(50)
                    })
                }
            },
        )
        .await;
    }
    tm.kill9();
    js.get_stream("STORE").await.unwrap().purge().await.unwrap();
    assert_eq!(stream_count(&nc, "STORE").await, 0);
    if past_duplicate_window {
        // A time window, not a condition: JetStream forgets ids after it.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }

    let tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    db.batch_execute("INSERT INTO t VALUES (1000, 'after')")
        .await
        .unwrap();
    // The slot sends in commit order: anything sent again comes before this row.
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events = read_stream(&nc, "STORE").await;
        if events
            .iter()
            .any(|e| e.body["data"]["after"]["v"] == "after")
        {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "the new row was not streamed\n{}",
            tm.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after: Vec<&str> = events
        .iter()
        .map(|e| e.body["data"]["after"]["v"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        after,
        vec!["after"],
        "stored transactions came again\n{}",
        tm.log()
    );
}

/// pgbench initialised while tidemark streams a FOR ALL TABLES publication: its tables
/// appear mid-stream, are loaded (COPY) before they have a key, get their primary keys
/// by ALTER TABLE, then take TPC-B transactions. The source keeps streaming, and the
/// stream folds (by the rows' own columns) to every table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_initialised_while_streaming_folds_to_its_tables() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    pgbench(&pg, "store", &["-i", "-s", "1", "-q"]);
    pgbench(&pg, "store", &["-T", "2", "-c", "2", "-n"]);
    wait_caught_up(
        &pg,
        &db,
        "store",
        "tidemark_store",
        Duration::from_secs(180),
        || tm.log(),
    )
    .await;
    assert!(tm.is_running(), "{}", tm.log());
    let nc = nats.client().await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    for (table, id, bal) in [
        ("pgbench_accounts", "aid", "abalance"),
        ("pgbench_tellers", "tid", "tbalance"),
        ("pgbench_branches", "bid", "bbalance"),
    ] {
        let mut folded: std::collections::BTreeMap<i64, i64> = Default::default();
        for e in &events {
            let d = &e.body["data"];
            if d["table"] != format!("public.{table}") {
                continue;
            }
            match d["op"].as_str() {
                Some("insert" | "update") => {
                    folded.insert(
                        d["after"][id].as_i64().unwrap_or(-1),
                        d["after"][bal].as_i64().unwrap_or(-1),
                    );
                }
                Some("delete") => {
                    folded.remove(&d["before"][id].as_i64().unwrap_or(-1));
                }
                Some("truncate") => folded.clear(),
                _ => {}
            }
        }
        let want: std::collections::BTreeMap<i64, i64> = db
            .query(
                &format!("SELECT {id}::bigint, {bal}::bigint FROM {table}"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(folded.len(), want.len(), "{table}: rows");
        assert!(folded == want, "{table}: the fold differs from the table");
    }
    let history = db
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    let streamed = events
        .iter()
        .filter(|e| e.body["type"] == "pgbench_history.created")
        .count() as i64;
    assert_eq!(streamed, history, "history rows");
}

/// Postgres behind a TCP proxy (pgbouncer, HAProxy, a Kubernetes service) that closes
/// connections it cannot serve: a TLS negotiation (sslmode prefer) that ends early is a
/// network failure, tried again, not a TLS problem for the operator. While every second
/// connection is closed at once (the catalog session passes, the replication session
/// meets the closed one), the source keeps trying; then it streams again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_closes_connections_is_retried_not_fatal() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let proxy = Proxy::start(pg.port).await;
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").through_pg_proxy(&proxy),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    tm.wait_streaming();
    proxy.flaky(true);
    proxy.cut();
    // Several attempts meet the closed connections.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(tm.is_running(), "{}", tm.log());
    proxy.flaky(false);
    db.batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 100, Duration::from_secs(60), || tm.log()).await;
    assert!(tm.is_running(), "{}", tm.log());
}
