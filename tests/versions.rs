//! What differs by PostgreSQL version, on the server the run uses
//! (`TIDEMARK_PG_BINDIR`; `scripts/test.sh` runs this file on every version from 12
//! to 18) and on PostgreSQL 11 (`TIDEMARK_PG11_BINDIR`), which is refused.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use support::*;

/// PostgreSQL 11's binaries: from `scripts/pg-versions.sh 11`. Missing, the test fails
/// with the command that installs them.
fn pg11_bindir() -> PathBuf {
    let dir = std::env::var("TIDEMARK_PG11_BINDIR").unwrap_or_else(|_| {
        panic!(
            "TIDEMARK_PG11_BINDIR is not set: run `bash scripts/pg-versions.sh 11` and set it to the bin directory it prints (scripts/test.sh does)"
        )
    });
    PathBuf::from(dir)
}

/// Below 12, `run` stops at once (exit 1, no retries) and `check` fails, each naming
/// the version and what to do; nothing is created in the database.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_11_is_refused_by_name_by_run_and_check() {
    let pg = PgServer::start_from(pg11_bindir(), &[]);
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let db = pg.create_db("store").await;
    db.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
        .await
        .unwrap();
    let cfg = write_config(dir.path(), &pg, &nats, &SourceSpec::new("store", "store"));
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("FAIL [store] server: PostgreSQL 11.")
            && out.contains("tidemark needs PostgreSQL 12 or newer"),
        "{out}{err}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_refused(&["PostgreSQL 11.", "is not supported"]);
    let made = db
        .query_one(
            "SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_slots)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(made.get::<_, i64>(0), 0, "nothing was created");
}

/// Markers reach the stream on every version: on 14+ as logical messages (no
/// signal table is made), before 14 as rows of the signal table, which stays empty,
/// is never published as data, and is left out of `all_tables`. Heartbeats and an
/// initial snapshot work either way; `check` says which path the server takes.
#[tokio::test(flavor = "multi_thread")]
async fn markers_travel_as_messages_on_14_and_as_signal_rows_before() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text);
         INSERT INTO orders SELECT g, 'placed' FROM generate_series(1, 500) g;",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .snapshot("initial")
            .set("snapshot_chunk_size", 100)
            .set("heartbeat_interval_secs", 1),
    );
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("ok   [store] server: PostgreSQL {}.", pg_major())),
        "{out}"
    );
    let old = pg_major() < 14;
    assert_eq!(
        out.contains("signal table"),
        old,
        "check names the signal table only where it is used: {out}"
    );
    if old {
        assert!(
            out.contains("will be created by `run`")
                && out.contains("no logical messages in pgoutput"),
            "{out}"
        );
    }

    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let nc = nats.client().await;
    wait_job_done(&nc, "store", "orders", Duration::from_secs(120), || {
        tm.log()
    })
    .await;
    db.batch_execute("UPDATE orders SET status = 'shipped' WHERE id <= 10")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let events = loop {
        let events = read_stream(&nc, "STORE").await;
        let beats = events
            .iter()
            .filter(|e| e.subject == "store._tidemark.heartbeat")
            .count();
        let updates = events
            .iter()
            .filter(|e| e.body["type"] == "orders.updated")
            .count();
        if beats >= 2 && updates == 10 {
            break events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "heartbeats ({beats}) and updates ({updates}) did not arrive: {}",
            tm.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_exactly_once(&events);
    let reads = events
        .iter()
        .filter(|e| e.body["type"] == "orders.read")
        .count();
    assert_eq!(reads, 500, "each row read once");
    assert!(
        events
            .iter()
            .all(|e| !e.subject.contains("signal") && e.body["data"]["table"] != "signal"),
        "no signal row is published as data"
    );
    let signal = db
        .query_one("SELECT to_regclass('tidemark.signal') IS NOT NULL", &[])
        .await
        .unwrap()
        .get::<_, bool>(0);
    assert_eq!(signal, old, "the signal table exists only before 14");
    if old {
        let rows: i64 = db
            .query_one("SELECT count(*) FROM tidemark.signal", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 0, "each marker row is deleted as it is written");
        let published: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'tidemark_store' AND schemaname = 'tidemark'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(published, 1, "the signal table is in the publication");
    }
    tm.terminate(Duration::from_secs(30));
}

/// Before 14, without a signal table (a role that may not create one): `check` says
/// what is lost and how to fix it; with an initial snapshot due, `run` stops naming
/// the fix; with `snapshot = "never"` the changes stream all the same, heartbeats
/// off, said in the log. `[[source.message]]` is refused before 14. On 14+ the same
/// role streams with messages and needs no table.
#[tokio::test(flavor = "multi_thread")]
async fn without_its_signal_table_an_old_server_streams_changes_and_says_what_is_lost() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, status text);
         INSERT INTO orders VALUES (1, 'placed');
         CREATE ROLE cdc LOGIN REPLICATION;
         GRANT SELECT ON orders TO cdc;
         REVOKE CREATE ON DATABASE store FROM PUBLIC;
         REVOKE CREATE ON SCHEMA public FROM PUBLIC;
         CREATE PUBLICATION tidemark_store FOR TABLE orders;",
    )
    .await
    .unwrap();
    let old = pg_major() < 14;
    let spec = SourceSpec::new("store", "store")
        .tables(&["orders"])
        .set("create_publication", false)
        .set("heartbeat_interval_secs", 1)
        .postgres("user", "cdc");
    let cfg = write_config(dir.path(), &pg, &nats, &spec.clone().snapshot("initial"));
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg_arg]);
    if old {
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            out.contains("FAIL [store] signal table")
                && out.contains("may not create it")
                && out.contains("CREATE TABLE IF NOT EXISTS \"tidemark\".\"signal\"")
                && out.contains("snapshot = \"never\""),
            "{out}"
        );
        let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
        tm.wait_refused(&[
            "the initial snapshot (snapshot = \"initial\") cannot run",
            "could not create its signal table",
        ]);
    } else {
        assert_eq!(code, 0, "{out}{err}");
        assert!(!out.contains("signal table"), "{out}");
    }

    // Changes only: they stream on every version.
    let cfg = write_config(dir.path(), &pg, &nats, &spec.clone().snapshot("never"));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    tm.wait_streaming();
    db.batch_execute(
        "INSERT INTO orders VALUES (2, 'placed'); UPDATE orders SET status = 'paid' WHERE id = 2",
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_until(
        "the changes in the stream",
        Duration::from_secs(60),
        || async {
            let events = read_stream(&nc, "STORE").await;
            events
                .iter()
                .filter(|e| {
                    e.body["type"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("orders."))
                })
                .count()
                == 2
        },
    )
    .await;
    assert_eq!(tm.log().contains("heartbeats are off"), old, "{}", tm.log());
    tm.terminate(Duration::from_secs(30));

    // Logical messages as events: refused before 14, at start, with the alternative.
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &spec
            .snapshot("never")
            .sections("[[source.message]]\nprefix = \"domain\"\n"),
    );
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code == 1, old, "{out}{err}");
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark3.log"));
    if old {
        assert!(
            out.contains("FAIL [store] message prefix \"domain\""),
            "{out}"
        );
        tm.wait_refused(&["cannot send logical decoding messages", "[[source.outbox]]"]);
    } else {
        tm.wait_streaming();
        db.batch_execute("SELECT pg_logical_emit_message(true, 'domain', '{\"type\":\"Hello\"}')")
            .await
            .unwrap();
        wait_event(&nc, "STORE", "the message", Duration::from_secs(60), |e| {
            e.body["type"] == "domain"
        })
        .await;
        tm.terminate(Duration::from_secs(30));
    }
}

/// PostgreSQL 18 can publish stored generated columns: a snapshot row then carries
/// them as the live events do, so both have the same columns and schema hash. Before
/// 18 (and on 18 without `publish_generated_columns`) neither carries them.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_rows_and_live_events_carry_the_same_generated_columns() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, qty int, doubled int GENERATED ALWAYS AS (qty * 2) STORED);
         INSERT INTO items (id, qty) SELECT g, g FROM generate_series(1, 50) g;",
    )
    .await
    .unwrap();
    let with = db
        .batch_execute(
            "CREATE PUBLICATION tidemark_store FOR TABLE items WITH (publish_generated_columns = stored)",
        )
        .await;
    let published = pg_major() >= 18;
    match &with {
        Ok(()) => assert!(published, "publish_generated_columns before 18"),
        Err(e) => {
            assert!(!published, "{e}");
            db.batch_execute("CREATE PUBLICATION tidemark_store FOR TABLE items")
                .await
                .unwrap();
        }
    }
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["items"])
            .snapshot("initial"),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let nc = nats.client().await;
    wait_job_done(&nc, "store", "items", Duration::from_secs(120), || tm.log()).await;
    db.batch_execute("INSERT INTO items (id, qty) VALUES (51, 51)")
        .await
        .unwrap();
    let events = wait_event(&nc, "STORE", "the insert", Duration::from_secs(60), |e| {
        e.body["type"] == "items.created"
    })
    .await;
    let read = events
        .iter()
        .find(|e| e.body["type"] == "items.read" && e.body["data"]["after"]["id"] == 7)
        .expect("row 7 read");
    let created = events
        .iter()
        .find(|e| e.body["type"] == "items.created")
        .unwrap();
    let cols = |e: &StoredEvent| {
        let mut k: Vec<String> = e.body["data"]["after"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    };
    let want: Vec<&str> = if published {
        vec!["doubled", "id", "qty"]
    } else {
        vec!["id", "qty"]
    };
    assert_eq!(cols(read), want, "{}", read.body);
    assert_eq!(cols(created), want, "{}", created.body);
    if published {
        assert_eq!(read.body["data"]["after"]["doubled"], 14);
        assert_eq!(created.body["data"]["after"]["doubled"], 102);
    }
    assert_eq!(
        read.body["schemahash"], created.body["schemahash"],
        "the same schema hash"
    );
    tm.terminate(Duration::from_secs(30));
}
