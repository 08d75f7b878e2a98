//! Integration tests of snapshots and backfills (existing rows through the stream,
//! placed by watermarks) against a real PostgreSQL and a real nats-server.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// Folds a stream into table contents: per table, key -> row.
fn fold(events: &[StoredEvent]) -> BTreeMap<String, BTreeMap<String, Value>> {
    let mut tables: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for e in events {
        let data = &e.body["data"];
        // A reset marker says: what came before may have a gap; rebuild from here.
        if e.body["type"] == "tidemark.reset" {
            tables.clear();
            continue;
        }
        let Some(table) = data["table"].as_str() else {
            continue;
        };
        let rows = tables.entry(table.to_string()).or_default();
        match data["op"].as_str() {
            Some("insert" | "update" | "read") => {
                if let Some(before) = data["before"].as_object()
                    && data["op"] == "update"
                {
                    // A key change moves the row.
                    let old_key = json!({"id": before.get("id")}).to_string();
                    rows.remove(&old_key);
                }
                rows.insert(data["key"].to_string(), data["after"].clone());
            }
            Some("delete") => {
                rows.remove(&data["key"].to_string());
            }
            Some("truncate") => rows.clear(),
            _ => {}
        }
    }
    tables
}

/// A table's rows as the events carry them: key `{"id": n}` -> `{"id", "qty", "note"}`.
async fn table_rows(db: &tokio_postgres::Client, table: &str) -> BTreeMap<String, Value> {
    db.query(
        &format!("SELECT id, qty, note FROM {table} ORDER BY id"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let id: i32 = r.get(0);
        let qty: Option<i32> = r.get(1);
        let note: Option<String> = r.get(2);
        (
            json!({"id": id}).to_string(),
            json!({"id": id, "qty": qty, "note": note}),
        )
    })
    .collect()
}

/// Small transactions of inserts, updates and deletes on `big` until told to stop.
fn churn(
    db: tokio_postgres::Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    start_id: i32,
    max_id: i32,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = start_id;
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = (x % max_id as u64) as i32 + 1;
            let sql = match x % 3 {
                0 => {
                    next += 1;
                    format!("INSERT INTO big VALUES ({next}, 1, 'new {next}')")
                }
                1 => format!("UPDATE big SET qty = qty + 1, note = 'changed' WHERE id = {id}"),
                _ => format!("DELETE FROM big WHERE id = {id}"),
            };
            db.batch_execute(&sql).await.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_snapshot_under_concurrent_writes_folds_to_the_table() {
    const ROWS: i32 = 200_000;
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, qty int, note text);
         INSERT INTO big SELECT g, g % 100, 'row ' || g FROM generate_series(1, {ROWS}) g;
         ANALYZE big;"
    ))
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["big"])
            .snapshot("initial")
            .set("snapshot_chunk_size", 2000),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let writer = churn(pg.client("store").await, stop.clone(), ROWS, ROWS);
    let nc = nats.client().await;
    let done = wait_job_done(&nc, "store", "big", Duration::from_secs(300), || tm.log()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let changes = writer.await.unwrap();
    assert!(
        changes > 100,
        "the workload ran during the snapshot ({changes} changes)"
    );
    assert_eq!(done["reason"], "initial snapshot");
    assert!(done["rows_done"].as_u64().unwrap() >= ROWS as u64 / 2);
    assert!(done["rows_estimate"].as_u64().unwrap() > 0);

    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let reads = events
        .iter()
        .filter(|e| e.body["data"]["op"] == "read")
        .count();
    assert!(reads > 0);
    assert!(
        events
            .iter()
            .filter(|e| e.body["data"]["op"] == "read")
            .all(|e| e.body["snapshot"] == true && e.body["type"] == "big.read"),
        "snapshot rows are big.read events marked snapshot"
    );
    let folded = fold(&events);
    let want = table_rows(&db, "big").await;
    let got = folded.get("public.big").cloned().unwrap_or_default();
    assert_eq!(got.len(), want.len(), "row count");
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "row {k}");
    }
}

/// The chunk numbers a log says were read, in order.
fn chunks_read(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("backfill chunk read"))
        .filter_map(|l| {
            l.split("chunk=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

async fn wait_confirmed_end(pg: &PgServer, db: &tokio_postgres::Client) {
    wait_caught_up(
        pg,
        db,
        "store",
        "tidemark_store",
        Duration::from_secs(120),
        String::new,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_mid_way_resumes_at_the_next_chunk() {
    const ROWS: i32 = 60_000;
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, qty int, note text);
         INSERT INTO big SELECT g, g % 100, 'row ' || g FROM generate_series(1, {ROWS}) g;"
    ))
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["big"])
            .snapshot("initial")
            .set("snapshot_chunk_size", 500),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = churn(pg.client("store").await, stop.clone(), ROWS, ROWS);
    let nc = nats.client().await;
    let log1 = dir.path().join("tidemark1.log");
    let mut tm = Tidemark::run_logging(&cfg, &log1, "tidemark=debug");
    // Kill it once a few chunks are stored.
    let deadline = Instant::now() + Duration::from_secs(120);
    let done_at_kill: u64 = loop {
        let done = backfill_job(&nc, "store", "big")
            .await
            .and_then(|j| j["chunks_done"].as_u64())
            .unwrap_or(0);
        if done >= 5 {
            tm.kill9();
            // A progress write the process sent just before it died may still land
            // after a first read (another connection, so no order between them): read
            // until the record holds still.
            let read = async || {
                backfill_job(&nc, "store", "big").await.unwrap()["chunks_done"]
                    .as_u64()
                    .unwrap()
            };
            let mut last = read().await;
            let settled = loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let now = read().await;
                if now == last {
                    break now;
                }
                last = now;
            };
            break settled;
        }
        assert!(Instant::now() < deadline, "{}", tm.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        done_at_kill < (ROWS / 500) as u64,
        "the backfill ended before the kill"
    );
    let first_run = chunks_read(&std::fs::read_to_string(&log1).unwrap());
    let log2 = dir.path().join("tidemark2.log");
    let tm = Tidemark::run_logging(&cfg, &log2, "tidemark=debug");
    let done = wait_job_done(&nc, "store", "big", Duration::from_secs(300), || tm.log()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let mut second_run = chunks_read(&tm.log());
    assert!(tm.log().contains("backfill resumed"), "{}", tm.log());
    // A chunk is read again at once when a transaction its read could not see had
    // committed before its low watermark (the churn makes that happen now and then).
    second_run.dedup();
    // The restart picks up at the first chunk not stored: it reads no chunk the
    // first run had stored, and reads each later chunk once (but for such retries).
    // The chunk in flight at the kill may have been stored whole before its progress
    // was recorded: the restart then finds it in the stream and moves past it.
    // Or a prefix of it was stored: the restart goes on after its last stored row,
    // as the next chunk.
    let stored_whole = tm.log().lines().any(|l| {
        (l.contains("backfill chunk stored before the restart: not read again")
            || l.contains("backfill chunk partly stored before the restart"))
            && l.split_whitespace()
                .any(|w| w == format!("chunk={done_at_kill}"))
    });
    let resumed_at = done_at_kill + u64::from(stored_whole);
    assert_eq!(
        second_run.first(),
        Some(&resumed_at),
        "first run {first_run:?}, second {second_run:?}"
    );
    let expected: Vec<u64> = (resumed_at..done["chunks_done"].as_u64().unwrap()).collect();
    assert_eq!(second_run, expected);

    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let folded = fold(&events);
    let want = table_rows(&db, "big").await;
    assert_eq!(folded.get("public.big"), Some(&want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_publication_is_backfilled_by_the_cli_while_streaming() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE live (id int PRIMARY KEY, qty int, note text);
         CREATE TABLE late (id int PRIMARY KEY, qty int, note text);
         INSERT INTO late SELECT g, g, 'old ' || g FROM generate_series(1, 5000) g;
         CREATE TABLE nokey (qty int, note text);
         ALTER TABLE nokey REPLICA IDENTITY FULL;
         INSERT INTO nokey VALUES (1, 'x');",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["live"])
            .set("snapshot_chunk_size", 700),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let cfg_arg = cfg.to_str().unwrap();
    // Not published yet: refused, with the fix.
    let (code, _, err) =
        tidemark_cmd(&["backfill", "--config", cfg_arg, "--table", "late", "--wait"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("does not publish public.late") && err.contains("ALTER PUBLICATION"),
        "{err}"
    );
    // A table without a key: refused, naming the table and the fix.
    db.batch_execute("ALTER PUBLICATION tidemark_store ADD TABLE nokey")
        .await
        .unwrap();
    let (code, _, err) = tidemark_cmd(&["backfill", "--config", cfg_arg, "--table", "nokey"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("table public.nokey has no primary key") && err.contains("key = ["),
        "{err}"
    );
    // A bad condition: refused before anything is queued.
    db.batch_execute("ALTER PUBLICATION tidemark_store ADD TABLE late")
        .await
        .unwrap();
    let (code, _, err) = tidemark_cmd(&[
        "backfill", "--config", cfg_arg, "--table", "late", "--where", "nope > 1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--where \"nope > 1\" is not a valid condition"),
        "{err}"
    );

    // Live changes to the table while it is backfilled.
    let writer_db = pg.client("store").await;
    let writer = tokio::spawn(async move {
        for i in 1..=300 {
            writer_db
                .batch_execute(&format!(
                    "UPDATE late SET qty = qty + 1000, note = 'new' WHERE id = {};
                     DELETE FROM late WHERE id = {};
                     INSERT INTO late VALUES ({}, 0, 'inserted');",
                    i * 13 % 5000 + 1,
                    i * 7 % 5000 + 1,
                    10_000 + i
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let (code, out, err) =
        tidemark_cmd(&["backfill", "--config", cfg_arg, "--table", "late", "--wait"]);
    assert_eq!(code, 0, "{out}{err}\n{}", tm.log());
    assert!(err.contains("backfill of public.late done"), "{err}");
    writer.await.unwrap();
    // A second backfill of the same table while one runs would be refused; this one
    // is done, so status shows it.
    let (code, out, _) = tidemark_cmd(&["status", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("backfill  public.late (backfill): done"),
        "{out}"
    );

    wait_confirmed_end(&pg, &db).await;
    let nc = nats.client().await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let folded = fold(&events);
    let want = table_rows(&db, "late").await;
    same_table(folded.get("public.late"), &want, &events, &tm.log());
    assert!(tm.is_running(), "{}", tm.log());
}

/// A folded table equals the table; on a difference, the differing keys and the
/// events of the first of them.
fn same_table(
    got: Option<&BTreeMap<String, Value>>,
    want: &BTreeMap<String, Value>,
    events: &[StoredEvent],
    log: &str,
) {
    let empty = BTreeMap::new();
    let got = got.unwrap_or(&empty);
    if got == want {
        return;
    }
    let differ: Vec<&String> = want
        .keys()
        .chain(got.keys())
        .filter(|k| got.get(*k) != want.get(*k))
        .collect();
    let first = differ.first().map(|k| k.as_str()).unwrap_or("");
    let history: Vec<String> = events
        .iter()
        .filter(|e| {
            serde_json::to_string(&e.body["data"]["key"])
                .ok()
                .as_deref()
                == Some(first)
        })
        .map(|e| format!("{} {} {}", e.seq, e.body["type"], e.body["data"]["after"]))
        .collect();
    let tail: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("chunk") || l.contains("window"))
        .collect();
    panic!(
        "{} keys differ, e.g. {first}: folded {:?}, table {:?}; its events: {history:?}\n{}",
        differ.len(),
        got.get(first),
        want.get(first),
        tail.join("\n")
    );
}

/// A keyless table's rows as a multiset: each row's JSON text, counted.
fn multiset_of(rows: impl IntoIterator<Item = Value>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for r in rows {
        *out.entry(r.to_string()).or_insert(0) += 1;
    }
    out
}

/// Folds a keyless table's events (REPLICA IDENTITY FULL) into a multiset of rows.
fn fold_multiset(events: &[StoredEvent], table: &str) -> BTreeMap<String, i64> {
    let mut rows: BTreeMap<String, i64> = BTreeMap::new();
    for e in events {
        let data = &e.body["data"];
        if data["table"] != table {
            continue;
        }
        let mut add = |row: &Value, n: i64| {
            let count = rows.entry(row.to_string()).or_insert(0);
            *count += n;
        };
        match data["op"].as_str() {
            Some("insert" | "read") => add(&data["after"], 1),
            Some("update") => {
                add(&data["before"], -1);
                add(&data["after"], 1);
            }
            Some("delete") => add(&data["before"], -1),
            Some("truncate") => rows.clear(),
            _ => {}
        }
    }
    rows.retain(|_, n| *n != 0);
    rows
}

/// Two multisets of rows are the same; on a difference, a short account of it.
fn same_rows(got: BTreeMap<String, i64>, want: BTreeMap<String, i64>, log: &str) {
    if got == want {
        return;
    }
    let missing: Vec<_> = want
        .iter()
        .filter(|(r, n)| got.get(*r) != Some(n))
        .take(5)
        .collect();
    let extra: Vec<_> = got
        .iter()
        .filter(|(r, n)| want.get(*r) != Some(n))
        .take(5)
        .collect();
    let tail: String = log
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    panic!(
        "the stream folds to {} distinct rows, the table has {}; missing or miscounted: {missing:?}; extra: {extra:?}\n{tail}",
        got.len(),
        want.len()
    );
}

async fn keyless_rows(db: &tokio_postgres::Client) -> BTreeMap<String, i64> {
    multiset_of(
        db.query("SELECT n, message FROM events_log", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| json!({"n": r.get::<_, Option<i32>>(0), "message": r.get::<_, Option<String>>(1)})),
    )
}

/// A table without a key cannot be paged by DBLog's chunks: a new slot reads it from
/// its own exported snapshot and publishes its rows ahead of everything it streams,
/// so the stream folds to the table (as a multiset) under concurrent writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_snapshot_reads_a_table_without_a_key_from_the_slots_snapshot() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE events_log (n int, message text);
         ALTER TABLE events_log REPLICA IDENTITY FULL;
         INSERT INTO events_log SELECT g % 700, 'row ' || (g % 900) FROM generate_series(1, 5000) g;
         INSERT INTO events_log VALUES (NULL, NULL), (NULL, NULL), (1, 'dup'), (1, 'dup');
         CREATE TABLE codes (code text NOT NULL, v int);
         CREATE UNIQUE INDEX codes_code ON codes (code);
         ALTER TABLE codes REPLICA IDENTITY USING INDEX codes_code;
         INSERT INTO codes VALUES ('a', 1), ('b', 2), ('c', 3);
         CREATE TABLE keyed (id int PRIMARY KEY, qty int, note text);
         INSERT INTO keyed VALUES (1, 1, 'one'), (2, 2, 'two');",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["events_log", "codes", "keyed"])
            .snapshot("initial"),
    );
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("no key: a new slot reads it from its own consistent snapshot"),
        "{out}"
    );
    // Writers go on while the slot is made and the snapshot read.
    let writer = {
        let db = pg.client("store").await;
        tokio::spawn(async move {
            for i in 0..300 {
                db.batch_execute(&format!(
                    "INSERT INTO events_log VALUES ({i}, 'live {i}');                      DELETE FROM events_log WHERE ctid = (SELECT ctid FROM events_log WHERE n = {} LIMIT 1);                      UPDATE events_log SET message = 'moved' WHERE ctid = (SELECT ctid FROM events_log WHERE n = {} LIMIT 1);",
                    i % 700,
                    (i + 350) % 700
                ))
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    writer.await.unwrap();
    db.batch_execute("UPDATE codes SET v = 0 WHERE code = 'a'")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_job_done(&nc, "store", "keyed", Duration::from_secs(60), || tm.log()).await;
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    // The snapshot's rows come first, as one transaction ending in its mark.
    let reads = events
        .iter()
        .take_while(|e| e.body["type"] == "events_log.read" || e.body["type"] == "codes.read")
        .count();
    assert_eq!(reads, 5004 + 3, "{}", tm.log());
    // Each read carries the key its table's live events carry: the whole row under
    // REPLICA IDENTITY FULL, the identity index's columns under USING INDEX.
    for e in &events[..reads] {
        let d = &e.body["data"];
        if d["table"] == "public.codes" {
            assert_eq!(d["key"], json!({"code": d["after"]["code"]}), "{d}");
        } else {
            assert_eq!(d["key"], d["after"], "{d}");
        }
    }
    let live = events
        .iter()
        .find(|e| e.body["type"] == "codes.updated")
        .expect("the update of codes");
    assert_eq!(live.body["data"]["key"], json!({"code": "a"}));
    assert_eq!(events[reads - 1].body["txlast"], json!(true));
    same_rows(
        fold_multiset(&events, "public.events_log"),
        keyless_rows(&db).await,
        &tm.log(),
    );
    let folded = fold(&events);
    assert_eq!(
        folded.get("public.keyed"),
        Some(&table_rows(&db, "keyed").await)
    );
    let mut tm = tm;
    assert!(tm.is_running(), "{}", tm.log());
}

/// Killed while the keyless table's rows are being published, the next start drops
/// the never-read slot, makes a new one and publishes every row again after a
/// `truncated` event: the fold is still the table, and nothing of the stream before
/// is lost or left standing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistent_snapshot_cut_off_by_kill_9_is_taken_again_whole() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE events_log (n int, message text);
         ALTER TABLE events_log REPLICA IDENTITY FULL;
         INSERT INTO events_log SELECT g % 5000, repeat('x', 80) || g FROM generate_series(1, 150000) g;",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["events_log"])
            .snapshot("initial"),
    );
    let nc = nats.client().await;
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    // Killed once some rows are stored and before all are.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut at_kill = 0;
    while Instant::now() < deadline {
        at_kill = stream_count(&nc, "STORE").await;
        if at_kill > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tm.kill9();
    assert!(
        at_kill > 0 && at_kill < 150_000,
        "killed at {at_kill} events\n{}",
        tm.log()
    );
    db.batch_execute(
        "INSERT INTO events_log VALUES (-1, 'after the kill'); DELETE FROM events_log WHERE n = 7",
    )
    .await
    .unwrap();
    let tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    wait_until(
        "the second try to be stored",
        Duration::from_secs(120),
        || {
            let done = tm
                .log()
                .contains("consistent snapshot of the tables without a key stored");
            async move { done }
        },
    )
    .await;
    db.batch_execute("INSERT INTO events_log VALUES (-2, 'after the restart')")
        .await
        .unwrap();
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    assert!(
        events
            .iter()
            .any(|e| e.body["type"] == "events_log.truncated"),
        "the second try starts with a truncated event\n{}",
        tm.log()
    );
    same_rows(
        fold_multiset(&events, "public.events_log"),
        keyless_rows(&db).await,
        &tm.log(),
    );
    assert!(
        tm.log().contains("dropping it to take the snapshot again"),
        "{}",
        tm.log()
    );
    let mut tm = tm;
    assert!(tm.is_running(), "{}", tm.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_stops_the_source_and_resync_brings_the_stream_back_to_the_tables() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, qty int, note text);
         INSERT INTO big SELECT g, g, 'row ' || g FROM generate_series(1, 3000) g;
         CREATE TABLE nokey (qty int, note text);
         ALTER TABLE nokey REPLICA IDENTITY FULL;
         INSERT INTO nokey VALUES (1, 'before');",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["big", "nokey"])
            .snapshot("initial")
            .set("snapshot_chunk_size", 400),
    );
    let nc = nats.client().await;
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark1.log"));
    wait_job_done(&nc, "store", "big", Duration::from_secs(60), || tm.log()).await;
    db.batch_execute("UPDATE big SET qty = -1 WHERE id <= 10")
        .await
        .unwrap();
    wait_confirmed_end(&pg, &db).await;
    assert!(tm.terminate(Duration::from_secs(30)).success());

    // While tidemark is stopped: changes, then the slot is dropped. The changes are
    // lost to the slot: a new one would start after them.
    db.batch_execute(
        "DELETE FROM big WHERE id BETWEEN 100 AND 199;
         UPDATE big SET note = 'changed in the gap' WHERE id BETWEEN 200 AND 299;
         INSERT INTO big VALUES (5000, 0, 'inserted in the gap');
         SELECT pg_drop_replication_slot('tidemark_store');",
    )
    .await
    .unwrap();
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    let status = tm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", tm.log());
    assert!(
        tm.log()
            .contains("does not exist, but stream \"STORE\" has stored events")
            && tm.log().contains("tidemark resync --yes"),
        "{}",
        tm.log()
    );

    let cfg_arg = cfg.to_str().unwrap();
    let (code, _, err) = tidemark_cmd(&["resync", "--config", cfg_arg]);
    assert_eq!(code, 2, "{err}");
    // A published table without a key cannot be paged: it is named with the fix, and
    // every other table is resynced all the same.
    let (code, out, err) = tidemark_cmd(&["resync", "--config", cfg_arg, "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("queued a backfill of 1 table(s)"), "{out}");
    assert!(
        err.contains("warning: table public.nokey has no primary key")
            && err.contains("NOT sent after the marker")
            && err.contains("tidemark backfill --table public.nokey"),
        "{err}"
    );

    let tm = Tidemark::run(&cfg, &dir.path().join("tidemark3.log"));
    // Live changes during the resync's backfill.
    db.batch_execute(
        "UPDATE big SET qty = qty + 1 WHERE id % 97 = 0; DELETE FROM big WHERE id = 3000;
         INSERT INTO nokey VALUES (2, 'after');",
    )
    .await
    .unwrap();
    let done = wait_job_done(&nc, "store", "big", Duration::from_secs(60), || tm.log()).await;
    assert_eq!(done["reason"], "resync");
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let markers: Vec<&StoredEvent> = events
        .iter()
        .filter(|e| e.body["type"] == "tidemark.reset")
        .collect();
    assert_eq!(markers.len(), 1);
    assert_eq!(markers[0].body["data"]["reason"], "resync");
    let folded = fold(&events);
    let want = table_rows(&db, "big").await;
    assert_eq!(folded.get("public.big"), Some(&want));
    // The keyless table's changes from the new slot on are streamed.
    assert!(
        events.iter().any(
            |e| e.body["type"] == "nokey.created" && e.body["data"]["after"]["note"] == "after"
        ),
        "{}",
        tm.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_slot_over_an_aged_out_stream_is_refused_but_a_purged_one_starts_fresh() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, qty int, note text)")
        .await
        .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        // Events age out after a second.
        &SourceSpec::new("store", "store")
            .tables(&["t"])
            .stream("max_age_secs", 1),
    );
    let nc = nats.client().await;
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark1.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (1, 1, 'a')")
        .await
        .unwrap();
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
    assert!(tm.terminate(Duration::from_secs(30)).success());
    wait_for("the event to age out", Duration::from_secs(30), || {
        let nc = nc.clone();
        let count = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(stream_count(&nc, "STORE"))
        })
        .join()
        .unwrap();
        (count == 0).then_some(())
    });
    db.batch_execute("SELECT pg_drop_replication_slot('tidemark_store')")
        .await
        .unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("has stored events of this source (up to sequence 1)"),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    let status = tm.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", tm.log());
    assert!(
        tm.log()
            .contains("has stored events of this source (up to sequence 1)"),
        "{}",
        tm.log()
    );
    // A deliberate fresh start: purge, then run.
    let (code, out, err) = tidemark_cmd(&["reset", "--config", cfg_arg, "--purge-stream", "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark3.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (2, 2, 'b')")
        .await
        .unwrap();
    wait_for("the new event", Duration::from_secs(30), || {
        let nc = nc.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let js = async_nats::jetstream::new(nc);
                let mut s = js.get_stream("STORE").await.ok()?;
                (s.info().await.ok()?.state.last_sequence == 2).then_some(())
            })
        })
        .join()
        .unwrap()
    });
    assert!(tm.is_running(), "{}", tm.log());
}

/// Regression (issue 16): a snapshot job's progress lives in NATS KV, which outlives a
/// database, slot and stream made again. The new slot's initial snapshot "resumed" the
/// old job mid-table and sent only the rest. Now a new slot starts every table over,
/// and a job made for another stream is never resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_slot_and_stream_snapshot_every_row_whatever_the_old_jobs_said() {
    const ROWS: i32 = 20_000;
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(&format!(
        "CREATE TABLE big (id int PRIMARY KEY, qty int, note text);
         INSERT INTO big SELECT g, g % 100, 'row ' || g FROM generate_series(1, {ROWS}) g;"
    ))
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["big"])
            .snapshot("initial")
            .set("snapshot_chunk_size", 500),
    );
    let nc = nats.client().await;
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark1.log"));
    // Stop it part-way through the snapshot.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = backfill_job(&nc, "store", "big")
            .await
            .and_then(|j| j["chunks_done"].as_u64())
            .unwrap_or(0);
        if done >= 4 {
            tm.kill9();
            break;
        }
        assert!(Instant::now() < deadline, "{}", tm.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = backfill_job(&nc, "store", "big").await.unwrap()["chunks_done"]
        .as_u64()
        .unwrap();
    assert!(
        left < (ROWS / 500) as u64,
        "the snapshot ended before the kill"
    );
    // The operator starts over: slot and stream deleted, NATS (and its KV) kept.
    db.batch_execute("SELECT pg_drop_replication_slot('tidemark_store')")
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nc.clone());
    js.delete_stream("STORE").await.unwrap();
    let tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    wait_job_done(&nc, "store", "big", Duration::from_secs(120), || tm.log()).await;
    wait_stream_count(&nc, "STORE", ROWS as u64, Duration::from_secs(60), || {
        tm.log()
    })
    .await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let reads = events
        .iter()
        .filter(|e| e.body["type"] == "big.read")
        .count();
    assert_eq!(
        reads, ROWS as usize,
        "every row read once into the new stream"
    );
    let folded = fold(&events);
    assert_eq!(
        folded.get("public.big"),
        Some(&table_rows(&db, "big").await)
    );
}

/// Regression (issue 16): a kill -9 while a chunk's rows were being stored left a
/// prefix of the chunk in the stream, and the restarted worker read the whole chunk
/// again: the prefix twice. Now the restart goes on after the last stored row, and
/// every row is read into the stream exactly once, through two kills mid-chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rows_are_stored_once_through_kills_mid_chunk() {
    stored_once_through_kills(
        "CREATE TABLE big (id int PRIMARY KEY, qty int, note text);
         INSERT INTO big SELECT g, g % 100, 'row ' || g FROM generate_series(1, 40000) g;",
    )
    .await;
}

/// The same with a key whose JSON is not its text (bytea as base64, an enum, an
/// array): the restart still goes on after the last stored row (it was read again
/// whole, its stored prefix twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rows_with_a_bytea_enum_and_array_key_are_stored_once_through_kills() {
    stored_once_through_kills(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE big (b bytea, m mood, a int[], qty int, note text, PRIMARY KEY (b, m, a));
         INSERT INTO big SELECT decode(lpad(to_hex(g / 3), 8, '0'), 'hex'),
                                (ARRAY['sad', 'ok', 'happy']::mood[])[g % 3 + 1],
                                ARRAY[g % 7, g], g % 100, 'row ' || g
                           FROM generate_series(1, 40000) g;",
    )
    .await;
}

/// A table `big` of 40,000 rows made by `setup`, snapshotted through two kills -9
/// mid-chunk: each row read into the stream once.
async fn stored_once_through_kills(setup: &str) {
    const ROWS: i32 = 40_000;
    const CHUNK: u64 = 4_000;
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(setup).await.unwrap();
    // A small window, so a chunk takes a while to store.
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["big"])
            .snapshot("initial")
            .set("snapshot_chunk_size", CHUNK)
            .set("publish_window", 8),
    );
    let nc = nats.client().await;
    let log = dir.path().join("tidemark.log");
    let mut tm = Tidemark::run(&cfg, &log);
    for round in 1..=2u64 {
        // Kill it with a chunk partly stored: the stream count inside a chunk.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n = stream_count(&nc, "STORE").await;
            let within = n % CHUNK;
            if n > round * CHUNK && (CHUNK / 8..CHUNK * 7 / 8).contains(&within) {
                tm.kill9();
                break;
            }
            assert!(n < ROWS as u64, "the snapshot ended before the kill");
            assert!(Instant::now() < deadline, "{}", tm.log());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tm = Tidemark::run(&cfg, &log);
    }
    wait_job_done(&nc, "store", "big", Duration::from_secs(180), || tm.log()).await;
    wait_stream_count(&nc, "STORE", ROWS as u64, Duration::from_secs(60), || {
        tm.log()
    })
    .await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let mut reads: BTreeMap<String, usize> = BTreeMap::new();
    for e in events.iter().filter(|e| e.body["type"] == "big.read") {
        *reads.entry(e.body["data"]["key"].to_string()).or_default() += 1;
    }
    let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "rows read twice, e.g. {twice:?}");
    assert_eq!(reads.len(), ROWS as usize, "every row read");
    assert!(
        tm.log()
            .contains("partly stored before the restart: going on after its last stored row"),
        "the kill did not land mid-chunk, or the restart did not go on after the stored row:\n{}",
        tm.log()
    );
}

/// Regression (issue 16): a mapping key was used to page a table without checking it
/// could: rows sharing a key were lost at chunk borders, and a NULL ended the read at
/// once. A key that no unique index covers, or that may be NULL, is refused by
/// `backfill` and skipped (loudly) by the initial snapshot, as `check` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_key_that_cannot_page_the_table_is_refused_with_the_fix() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, sku text, code text UNIQUE, ref int NOT NULL UNIQUE);
         INSERT INTO items VALUES (1, 'a', 'x', 10), (2, 'a', NULL, 20);",
    )
    .await
    .unwrap();
    for (key, reason, ok) in [
        ("sku", "no unique index covers it", false),
        ("code", "a column of it may be NULL", false),
        ("ref", "", true),
    ] {
        let name = format!("s{key}");
        db.batch_execute(&format!(
            "CREATE PUBLICATION tidemark_{name} FOR TABLE items"
        ))
        .await
        .unwrap();
        let sections = format!("[[source.table]]\nname = \"items\"\nkey = [\"{key}\"]\n");
        let spec = SourceSpec::new(&name, "store")
            .tables(&["items"])
            .sections(&sections);
        let cfg = write_config(dir.path(), &pg, &nats, &spec);
        let cfg_arg = cfg.to_str().unwrap();
        let (code, out, err) = tidemark_cmd(&["backfill", "--config", cfg_arg, "--table", "items"]);
        if ok {
            assert_eq!(code, 0, "key {key}: {out}{err}");
            continue;
        }
        assert_eq!(code, 1, "key {key}: {out}{err}");
        assert!(
            err.contains(&format!("the key ({key}) named for public.items"))
                && err.contains(reason)
                && err.contains("unique index"),
            "key {key}: {err}"
        );
        // check warns when an initial snapshot would read the table, as run skips it.
        let (_, out, _) = tidemark_cmd(&["check", "--config", cfg_arg]);
        assert!(!out.contains("snapshot public.items"), "{out}");
        write_config(dir.path(), &pg, &nats, &spec.snapshot("initial"));
        let (_, out, _) = tidemark_cmd(&["check", "--config", cfg_arg]);
        assert!(
            out.contains("warning: the initial snapshot skips it: the key") && out.contains(reason),
            "key {key}: {out}"
        );
    }
}

/// pgbench, a workload nobody here wrote: its history table has no key and rows from an
/// earlier run, its accounts (a table in 3 range partitions, `pgbench -i --partitions`;
/// the soak has them unpartitioned) are snapshotted under TPC-B transactions from 4
/// clients, and tidemark is killed -9 twice meanwhile. The stream folds to every
/// table: the balances by key, the history as a multiset, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_under_an_initial_snapshot_and_kill_9s_folds_to_every_table() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    // PostgreSQL 12 cannot publish a partitioned table (bridge.rs tests the refusal).
    if pg_major() >= 13 {
        pgbench(&pg, "store", &["-i", "-s", "1", "-q", "--partitions", "3"]);
    } else {
        pgbench(&pg, "store", &["-i", "-s", "1", "-q"]);
    }
    pgbench(&pg, "store", &["-T", "2", "-c", "2", "-n"]);
    db.batch_execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let history_before: i64 = db
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert!(history_before > 0);
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&[
                "pgbench_accounts",
                "pgbench_tellers",
                "pgbench_branches",
                "pgbench_history",
            ])
            .snapshot("initial"),
    );
    let bench = {
        let mut cmd = pgbench_cmd(&pg, "store", &["-T", "15", "-c", "4", "-j", "2", "-n"]);
        std::thread::spawn(move || cmd.output().unwrap())
    };
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    for (i, wait) in [4u64, 5].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_secs(wait)).await;
        tm.kill9();
        tm = Tidemark::run(&cfg, &dir.path().join(format!("tidemark{i}.log")));
    }
    let out = tokio::task::spawn_blocking(move || bench.join().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nc = nats.client().await;
    for table in ["pgbench_accounts", "pgbench_tellers", "pgbench_branches"] {
        wait_job_done(&nc, "store", table, Duration::from_secs(120), || tm.log()).await;
    }
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);

    pgbench_balances_fold(&db, &events, &tm.log()).await;
    // The history, as a multiset.
    let mut history_folded: BTreeMap<String, i64> = BTreeMap::new();
    for e in &events {
        let data = &e.body["data"];
        let after = &data["after"];
        if data["table"] != "public.pgbench_history" {
            continue;
        }
        match data["op"].as_str() {
            Some("insert" | "read") => {
                let row = json!([after["tid"], after["bid"], after["aid"], after["delta"]]);
                *history_folded.entry(row.to_string()).or_insert(0) += 1;
            }
            Some("truncate") => history_folded.clear(),
            other => panic!("unexpected history op {other:?}"),
        }
    }
    let want_history = multiset_of(
        db.query(
            "SELECT tid::bigint, bid::bigint, aid::bigint, delta::bigint FROM pgbench_history",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            json!([
                r.get::<_, i64>(0),
                r.get::<_, i64>(1),
                r.get::<_, i64>(2),
                r.get::<_, i64>(3)
            ])
        }),
    );
    history_folded.retain(|_, n| *n != 0);
    same_rows(history_folded, want_history, &tm.log());
    assert!(tm.is_running(), "{}", tm.log());
}

/// Postgres shut down (immediate) while a chunk is being read, twice, and a column
/// dropped mid-backfill: the job pauses and resumes each time, never marked failed,
/// and each row is read once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_during_a_chunk_read_and_a_dropped_column_only_pause_a_backfill() {
    let Rig {
        mut pg,
        nats,
        dir,
        db,
    } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, qty int, note text, extra int);
         INSERT INTO big SELECT g, g, 'n' || g, g FROM generate_series(1, 2000) g;",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").set("snapshot_chunk_size", 200),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    // A condition that sleeps per row makes each chunk's read take a while, so the
    // shutdowns and the column drop below land inside one.
    let (code, _, err) = tidemark_cmd(&[
        "backfill",
        "--config",
        cfg.to_str().unwrap(),
        "--table",
        "big",
        "--where",
        "pg_sleep(0.001) IS NOT NULL",
        "--no-wait",
    ]);
    assert_eq!(code, 0, "{err}");
    let nc = nats.client().await;
    for round in 0..2 {
        let admin = pg.client("store").await;
        wait_chunk_read(&admin).await;
        drop(admin);
        pg.restart_immediate();
        let job = backfill_job(&nc, "store", "big").await.unwrap_or_default();
        assert_ne!(job["state"], "failed", "round {round}: {job}\n{}", tm.log());
    }
    // The drop waits for the chunk read in progress; the next read names a column
    // that is gone.
    let db = pg.client("store").await;
    wait_chunk_read(&db).await;
    db.batch_execute("ALTER TABLE big DROP COLUMN extra")
        .await
        .unwrap();
    let done = wait_job_done(&nc, "store", "big", Duration::from_secs(120), || tm.log()).await;
    assert_eq!(done["rows_done"], 2000, "{done}");
    // The worker looked the columns up again: either its next read named the dropped
    // column (an error), or the pipeline saw the chunk's columns differ from the
    // table's and had it read again.
    let log = tm.log();
    assert!(
        log.contains("the table's columns changed under the backfill")
            || log.contains("backfill chunk read again table=public.big chunk=")
                && log.contains("reason=the table's columns changed"),
        "{log}"
    );
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let mut reads: BTreeMap<i64, u32> = BTreeMap::new();
    for e in events.iter().filter(|e| e.body["type"] == "big.read") {
        *reads
            .entry(e.body["data"]["key"]["id"].as_i64().unwrap_or(-1))
            .or_default() += 1;
    }
    assert_eq!(reads.len(), 2000, "rows read");
    assert!(reads.values().all(|n| *n == 1), "a row read twice");
    assert!(tm.log().contains("backfill resumed"), "{}", tm.log());
}

/// Waits until a backfill chunk read of the test above runs.
async fn wait_chunk_read(db: &tokio_postgres::Client) {
    wait_until("a chunk read in progress", Duration::from_secs(60), || async {
        db.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep(0.001)%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .is_ok_and(|r| r.get::<_, i64>(0) > 0)
    })
    .await;
}

/// A column added (or dropped) with no row written since: the source's description of
/// the table is older than the columns a backfill reads (Postgres sends a table's new
/// description only before its next change). The chunk is placed with the columns it
/// was read with, and the stream folds to the table, new column included. Found by the
/// soak (seed 991): the job read its chunk again 100 times and failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_after_a_column_change_with_no_write_since_reads_the_new_columns() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, qty int, gone int);
         INSERT INTO docs SELECT g, g, g FROM generate_series(1, 40) g;",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").tables(&["docs"]),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    // A change, so the source holds the table's description from the stream.
    db.batch_execute("UPDATE docs SET qty = 0 WHERE id = 1")
        .await
        .unwrap();
    wait_confirmed_end(&pg, &db).await;
    db.batch_execute(
        "ALTER TABLE docs ADD COLUMN note text NOT NULL DEFAULT 'fresh';
         ALTER TABLE docs DROP COLUMN gone;",
    )
    .await
    .unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) =
        tidemark_cmd(&["backfill", "--config", cfg_arg, "--table", "docs", "--wait"]);
    assert_eq!(code, 0, "{out}{err}\n{}", tm.log());
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nats.client().await, "STORE").await;
    assert_exactly_once(&events);
    let reads: Vec<&StoredEvent> = events
        .iter()
        .filter(|e| e.body["type"] == "docs.read")
        .collect();
    assert_eq!(reads.len(), 40, "{}", tm.log());
    for e in reads {
        let after = &e.body["data"]["after"];
        assert_eq!(after["note"], "fresh", "{after}");
        assert!(after.get("gone").is_none(), "{after}");
    }
    same_table(
        fold(&events).get("public.docs"),
        &table_rows(&db, "docs").await,
        &events,
        &tm.log(),
    );
    // Live changes after it still map with the table's description from the stream.
    db.batch_execute("UPDATE docs SET note = 'later' WHERE id = 2")
        .await
        .unwrap();
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nats.client().await, "STORE").await;
    same_table(
        fold(&events).get("public.docs"),
        &table_rows(&db, "docs").await,
        &events,
        &tm.log(),
    );
    assert!(tm.is_running(), "{}", tm.log());
}

/// An operator's publication that sends some columns (a column list leaves the
/// password hash out) and some rows (row filters), PostgreSQL 15+: the initial
/// snapshot, of a keyed table in chunks under writes and of a keyless one from the
/// slot's snapshot, and a later `tidemark backfill`, read exactly what the live stream
/// carries. The fold equals the publication's view of each table, and no event
/// anywhere holds a column the publication leaves out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_read_only_the_columns_and_rows_the_publication_sends() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    if pg_major() < 15 {
        // Column lists and row filters came in PostgreSQL 15: the server itself
        // refuses them, and a snapshot reads every column and row, as the stream sends.
        let err = db
            .batch_execute("CREATE TABLE users (id int PRIMARY KEY, email text); CREATE PUBLICATION p FOR TABLE users (id)")
            .await
            .expect_err("a column list before PostgreSQL 15");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::SYNTAX_ERROR),
            "{err}"
        );
        return;
    }
    db.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, email text, pw_hash text, active bool NOT NULL);
         INSERT INTO users SELECT g, 'u' || g || '@x', 'secret' || g, g % 2 = 0 FROM generate_series(1, 3000) g;
         CREATE TABLE audit (at int, who text);
         ALTER TABLE audit REPLICA IDENTITY FULL;
         INSERT INTO audit SELECT g, 'w' || (g % 5) FROM generate_series(1, 400) g;
         CREATE PUBLICATION tidemark_store FOR TABLE users (id, email, active) WHERE (id % 3 <> 0),
           audit WHERE (who <> 'w0');",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["users", "audit"])
            .snapshot("initial")
            .set("create_publication", false)
            .set("snapshot_chunk_size", 500),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    let nc = nats.client().await;
    tm.wait_streaming();
    // Writes while the snapshot reads: the row filter's rows come and go.
    for i in 0..30 {
        db.batch_execute(&format!(
            "UPDATE users SET email = 'new{i}@x', pw_hash = 'changed' WHERE id = {};
             INSERT INTO users VALUES ({}, 'late@x', 'hash', true);
             DELETE FROM users WHERE id = {};
             INSERT INTO audit VALUES ({}, 'w{}');",
            1 + i * 97,
            4000 + i,
            2 + i * 89,
            1000 + i,
            i % 5
        ))
        .await
        .unwrap();
    }
    wait_job_done(&nc, "store", "users", Duration::from_secs(120), || tm.log()).await;
    wait_confirmed_end(&pg, &db).await;
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = tidemark_cmd(&[
        "backfill", "--config", cfg_arg, "--table", "users", "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    for e in &events {
        let text = e.body.to_string();
        assert!(
            !text.contains("pw_hash") && !text.contains("secret"),
            "an event holds a column the publication leaves out: {text}"
        );
    }
    let folded = fold(&events);
    let want_users: BTreeMap<String, Value> = db
        .query(
            "SELECT id, email, active FROM users WHERE id % 3 <> 0 ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let id: i32 = r.get(0);
            (
                json!({"id": id}).to_string(),
                json!({"id": id, "email": r.get::<_, String>(1), "active": r.get::<_, bool>(2)}),
            )
        })
        .collect();
    let got_users = folded.get("public.users").cloned().unwrap_or_default();
    assert_eq!(got_users.len(), want_users.len(), "{}", tm.log());
    assert!(got_users == want_users, "the users fold differs");
    // The keyless table: every read and insert is a row the filter lets through.
    let mut audit: BTreeMap<String, i64> = BTreeMap::new();
    for e in &events {
        let data = &e.body["data"];
        if data["table"] == "public.audit" {
            assert_ne!(data["after"]["who"], "w0", "{data}");
            *audit.entry(data["after"].to_string()).or_default() += 1;
        }
    }
    let want_audit: i64 = db
        .query_one("SELECT count(*) FROM audit WHERE who <> 'w0'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audit.values().sum::<i64>(), want_audit);
    assert!(tm.is_running(), "{}", tm.log());
}

/// Names an ORM or a legacy schema has: a schema and a table in mixed case, key
/// columns with capitals and a space, a table named with a space (written in double
/// quotes in the config) and a column with a quote. The snapshot pages the composite
/// key in chunks of 4, live changes and a CLI backfill name the tables as Postgres
/// does, and each row is read once per job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_and_mixed_case_names_snapshot_stream_and_backfill() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        r#"CREATE SCHEMA "Sales";
         CREATE TABLE "Sales"."OrderItems" ("OrderId" int, "Line No" int, "Sku" text, PRIMARY KEY ("OrderId", "Line No"));
         INSERT INTO "Sales"."OrderItems" SELECT g / 3, g % 3, 'sku' || g FROM generate_series(1, 25) g;
         CREATE TABLE "order lines" (id int PRIMARY KEY, "it's" text);
         INSERT INTO "order lines" VALUES (1, 'a'), (2, 'b');"#,
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["Sales.OrderItems", "\"order lines\""])
            .snapshot("initial")
            .set("snapshot_chunk_size", 4),
    );
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}");
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 27, Duration::from_secs(60), || tm.log()).await;
    db.batch_execute(
        r#"UPDATE "Sales"."OrderItems" SET "Sku" = 'x' WHERE "OrderId" = 1;
           DELETE FROM "order lines" WHERE id = 1;"#,
    )
    .await
    .unwrap();
    let (code, out, err) = tidemark_cmd(&[
        "backfill",
        "--config",
        cfg_arg,
        "--table",
        "Sales.OrderItems",
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    wait_stream_count(&nc, "STORE", 27 + 4 + 25, Duration::from_secs(60), || {
        tm.log()
    })
    .await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let count = |subject: &str, table: &str| {
        events
            .iter()
            .filter(|e| e.subject == subject && e.body["data"]["table"] == table)
            .count()
    };
    assert_eq!(count("store.Sales_OrderItems.read", "Sales.OrderItems"), 50);
    assert_eq!(count("store.order_lines.read", "public.order lines"), 2);
    assert_eq!(
        count("store.Sales_OrderItems.updated", "Sales.OrderItems"),
        3
    );
    assert_eq!(count("store.order_lines.deleted", "public.order lines"), 1);
    let keys: std::collections::BTreeSet<String> = events
        .iter()
        .filter(|e| e.subject == "store.Sales_OrderItems.read")
        .map(|e| e.body["data"]["key"].to_string())
        .collect();
    assert_eq!(keys.len(), 25, "each row read once per job");
    assert!(keys.contains(r#"{"OrderId":8,"Line No":1}"#), "{keys:?}");
    let reread = events
        .iter()
        .rev()
        .find(|e| e.body["data"]["key"] == json!({"OrderId": 1, "Line No": 0}))
        .unwrap();
    assert_eq!(reread.body["data"]["after"]["Sku"], "x");
    assert!(tm.is_running(), "{}", tm.log());
    // A name typed as SQL would fold it: refused, with the table meant.
    let typo = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("typo", "store").tables(&["sales.orderitems"]),
    );
    let (code, out, _) = tidemark_cmd(&["check", "--config", typo.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("table sales.orderitems does not exist in database \"store\": fix the tables list in the config (did you mean \"Sales.OrderItems\"? names are case-sensitive)"),
        "{out}"
    );
}

/// Waits for a backfill of `public.<table>` queued because the table was created
/// again, other than `not` (an earlier one), to be done; returns its id.
async fn wait_recreated_done(
    nc: &async_nats::Client,
    table: &str,
    not: Option<&str>,
    log: impl Fn() -> String,
) -> String {
    wait_reason_done(nc, table, "recreated", not, log).await
}

/// Waits for a backfill of `public.<table>` queued for `reason`, other than `not`, to
/// be done; returns its id.
async fn wait_reason_done(
    nc: &async_nats::Client,
    table: &str,
    reason: &str,
    not: Option<&str>,
    log: impl Fn() -> String,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(job) = backfill_job(nc, "store", table).await
            && job["reason"] == reason
            && job["state"] == "done"
            && job["id"].as_str() != not
        {
            return job["id"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no backfill of {table} for {reason:?} done: {:?}\n{}",
            backfill_job(nc, "store", table).await,
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The balances the stream folds to, per pgbench table and key (a truncated event
/// empties its table), against the tables'.
async fn pgbench_balances_fold(db: &tokio_postgres::Client, events: &[StoredEvent], log: &str) {
    let tables = [
        ("pgbench_accounts", "aid", "abalance"),
        ("pgbench_tellers", "tid", "tbalance"),
        ("pgbench_branches", "bid", "bbalance"),
    ];
    let mut got: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for e in events {
        let data = &e.body["data"];
        let Some(t) = data["table"].as_str() else {
            continue;
        };
        let Some((_, id, bal)) = tables.iter().find(|(n, _, _)| t == format!("public.{n}")) else {
            continue;
        };
        match data["op"].as_str() {
            Some("truncate") => got.retain(|(table, _), _| table != t),
            Some("delete") => panic!("pgbench deletes nothing: {}", e.body),
            _ => {
                if let (Some(k), Some(b)) =
                    (data["after"][id].as_i64(), data["after"][bal].as_i64())
                {
                    got.insert((t.to_string(), k), b);
                }
            }
        }
    }
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for (t, id, bal) in tables {
        for r in db
            .query(&format!("SELECT {id}::bigint, {bal}::bigint FROM {t}"), &[])
            .await
            .unwrap()
        {
            want.insert((format!("public.{t}"), r.get(0)), r.get(1));
        }
    }
    let differ: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .take(5)
        .collect();
    assert!(
        differ.is_empty() && got.len() == want.len(),
        "{} rows folded, {} in the tables; differing: {differ:?}\n{log}",
        got.len(),
        want.len()
    );
}

/// `pgbench -i` drops its tables and creates them again: new OIDs under the same
/// names, which leave a FOR TABLE publication, and Postgres streams nothing of it.
/// Once while tidemark streams (with TPC-B transactions right after it) and once while
/// it is stopped: each time the stream gets each table's truncated event, the table is
/// published again and read again, and the stream folds to the tables. (Before, the new
/// tables' changes were never sent, and a read model kept the old balances.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_dropped_and_created_again_are_truncated_and_read_again() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    pgbench(&pg, "store", &["-i", "-s", "1", "-q"]);
    let tables = ["pgbench_accounts", "pgbench_tellers", "pgbench_branches"];
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&tables)
            .snapshot("initial")
            .set("snapshot_chunk_size", 5000),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let nc = nats.client().await;
    for t in tables {
        wait_job_done(&nc, "store", t, Duration::from_secs(120), || tm.log()).await;
    }
    pgbench(&pg, "store", &["-t", "50", "-c", "2", "-n"]);
    // Recreated while streaming, and written to at once.
    pgbench(&pg, "store", &["-i", "-s", "1", "-q"]);
    pgbench(&pg, "store", &["-t", "100", "-c", "2", "-n"]);
    let mut first = Vec::new();
    for t in tables {
        first.push(wait_recreated_done(&nc, t, None, || tm.log()).await);
    }
    pgbench(&pg, "store", &["-t", "50", "-c", "2", "-n"]);
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    pgbench_balances_fold(&db, &events, &tm.log()).await;

    // Recreated while tidemark is stopped: `check` says what `run` will do.
    tm.terminate(Duration::from_secs(20));
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("dropped and created again"), "{out}");
    pgbench(&pg, "store", &["-i", "-s", "1", "-q"]);
    pgbench(&pg, "store", &["-t", "50", "-c", "2", "-n"]);
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    for t in tables {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("table \"public\".\"{t}\""))
                    && l.contains("dropped and created again since tidemark last ran")),
            "{out}"
        );
    }
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    tm.wait_streaming();
    for (t, first) in tables.iter().zip(&first) {
        wait_recreated_done(&nc, t, Some(first), || tm.log()).await;
    }
    pgbench(&pg, "store", &["-t", "50", "-c", "2", "-n"]);
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    pgbench_balances_fold(&db, &events, &tm.log()).await;
    for t in tables {
        let truncates = events
            .iter()
            .filter(|e| {
                e.body["data"]["table"] == format!("public.{t}")
                    && e.body["data"]["op"] == "truncate"
            })
            .count();
        assert_eq!(truncates, 2, "{t}: one truncated event per recreation");
    }
    assert!(tm.is_running(), "{}", tm.log());
}

/// A migration that swaps in a rebuilt table (create, copy, drop, rename), under
/// `all_tables` (a FOR ALL TABLES publication, which sends the new table's changes
/// from its start, under its first name): the table's truncated event and a backfill
/// make the stream fold to it again, and so do they for a streamed table renamed. A
/// table without a key that is created again gets its truncated event with its rows as
/// `read` events (read in the marker's transaction under a SHARE lock): its rows
/// before the marker (streamed from its creation) are cleared with the old table's,
/// and the fold is the new table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_swapped_in_by_rename_folds_to_the_new_table_under_all_tables() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, qty int, note text);
         INSERT INTO big SELECT g, g, 'old ' || g FROM generate_series(1, 300) g;
         CREATE TABLE notes (msg text);
         ALTER TABLE notes REPLICA IDENTITY FULL;
         INSERT INTO notes VALUES ('old 1'), ('old 2');
         CREATE TABLE quiet (id int PRIMARY KEY, qty int, note text);
         INSERT INTO quiet SELECT g, g, 'old' FROM generate_series(1, 50) g;
         CREATE TABLE moved (id int PRIMARY KEY, qty int, note text);
         INSERT INTO moved SELECT g, g, 'm' FROM generate_series(1, 20) g;",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .set("all_tables", true)
            .snapshot("initial"),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let nc = nats.client().await;
    wait_job_done(&nc, "store", "big", Duration::from_secs(60), || tm.log()).await;
    db.batch_execute(
        "UPDATE big SET qty = 0 WHERE id <= 10;
         BEGIN;
         CREATE TABLE big_new (id int PRIMARY KEY, qty int, note text);
         INSERT INTO big_new SELECT id, qty * 10, 'new ' || id FROM big WHERE id % 2 = 0;
         DROP TABLE big;
         ALTER TABLE big_new RENAME TO big;
         COMMIT;
         INSERT INTO big VALUES (1001, 1, 'after');
         UPDATE big SET note = 'changed' WHERE id = 2;
         DROP TABLE notes;
         CREATE TABLE notes (msg text);
         ALTER TABLE notes REPLICA IDENTITY FULL;
         INSERT INTO notes VALUES ('new 1'), ('new 2'), ('new 3');
         BEGIN;
         CREATE TABLE quiet_new (id int PRIMARY KEY, qty int, note text);
         INSERT INTO quiet_new SELECT id, qty + 1, 'new' FROM quiet WHERE id > 10;
         DROP TABLE quiet;
         ALTER TABLE quiet_new RENAME TO quiet;
         COMMIT;",
    )
    .await
    .unwrap();
    wait_recreated_done(&nc, "big", None, || tm.log()).await;
    // Not written since the swap: the stream described it last under its first name.
    wait_recreated_done(&nc, "quiet", None, || tm.log()).await;
    wait_until("notes' truncated event", Duration::from_secs(30), || {
        let nc = nc.clone();
        async move {
            read_stream(&nc, "STORE")
                .await
                .iter()
                .any(|e| e.body["type"] == "notes.truncated")
        }
    })
    .await;
    db.batch_execute(
        "UPDATE big SET qty = qty + 1 WHERE id <= 20; INSERT INTO notes VALUES ('new 4');",
    )
    .await
    .unwrap();
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let folded = fold(&events);
    let want = table_rows(&db, "big").await;
    assert_eq!(
        folded.get("public.big"),
        Some(&want),
        "big folds to the swapped-in table\n{}",
        tm.log()
    );
    // A table renamed after a change described it, with no change since: its
    // truncated event and a backfill under its new name (its rows so far went out
    // under the old one), and a CLI backfill after it: their reads carry the new name.
    db.batch_execute("UPDATE moved SET qty = 0 WHERE id = 1")
        .await
        .unwrap();
    wait_confirmed_end(&pg, &db).await;
    db.batch_execute("ALTER TABLE moved RENAME TO moved_on")
        .await
        .unwrap();
    wait_reason_done(&nc, "moved_on", "renamed", None, || tm.log()).await;
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = tidemark_cmd(&[
        "backfill", "--config", cfg_arg, "--table", "moved_on", "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nc, "STORE").await;
    let folded = fold(&events);
    assert_eq!(
        folded.get("public.moved_on"),
        Some(&table_rows(&db, "moved_on").await),
        "the renamed table's reads under its new name\n{}",
        tm.log()
    );
    assert!(
        events
            .iter()
            .any(|e| e.body["type"] == "moved_on.truncated"),
        "{}",
        tm.log()
    );
    assert_eq!(
        folded.get("public.quiet"),
        Some(&table_rows(&db, "quiet").await),
        "quiet folds to the swapped-in table, its reads under its name now\n{}",
        tm.log()
    );
    let notes: Vec<String> = events
        .iter()
        .filter(|e| e.body["data"]["table"] == "public.notes")
        .skip_while(|e| e.body["data"]["after"]["msg"] != "new 1")
        .map(|e| {
            format!(
                "{} {}",
                e.body["data"]["op"].as_str().unwrap_or_default(),
                e.body["data"]["after"]["msg"]
            )
        })
        .collect();
    assert_eq!(
        notes,
        [
            "insert \"new 1\"",
            "insert \"new 2\"",
            "insert \"new 3\"",
            "truncate null",
            "read \"new 1\"",
            "read \"new 2\"",
            "read \"new 3\"",
            "insert \"new 4\""
        ],
        "the new keyless table's rows, then its truncated event and its rows again\n{}",
        tm.log()
    );
    assert!(
        tm.log()
            .contains("truncated event marked with the new table's rows")
    );
    assert!(tm.is_running(), "{}", tm.log());
}

/// A listed table without a key, dropped and created again without a replica
/// identity: publishing it would make Postgres refuse its UPDATEs, so the source stops
/// with the `ALTER TABLE` to run (it never adds it). Once the operator sets one and
/// starts tidemark again, the table is published again and gets its truncated event:
/// the old rows go from the fold, the rows the new table got before it was published
/// again are read with that event, and its changes stream after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_table_postgres_cannot_publish_stops_the_source_until_fixed() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, qty int, note text);
         CREATE TABLE notes (msg text);
         ALTER TABLE notes REPLICA IDENTITY FULL;
         INSERT INTO notes VALUES ('old 1'), ('old 2');",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").tables(&["big", "notes"]),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute(
        "INSERT INTO notes VALUES ('old 3');
         DROP TABLE notes;
         CREATE TABLE notes (msg text);
         INSERT INTO big VALUES (1, 1, 'one');",
    )
    .await
    .unwrap();
    let status = tm.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = tm.log();
    assert!(
        log.contains("dropped and created again")
            && log.contains("REPLICA IDENTITY DEFAULT")
            && log.contains("ALTER TABLE \"public\".\"notes\" REPLICA IDENTITY FULL"),
        "{log}"
    );
    // A row written before the table is published again: read with its marker.
    db.batch_execute(
        "ALTER TABLE notes REPLICA IDENTITY FULL; INSERT INTO notes VALUES ('early');",
    )
    .await
    .unwrap();
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    tm.wait_streaming();
    db.batch_execute(
        "INSERT INTO notes VALUES ('new 1'); UPDATE notes SET msg = 'new 2' WHERE msg = 'new 1';",
    )
    .await
    .unwrap();
    wait_confirmed_end(&pg, &db).await;
    let nc = nats.client().await;
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    let notes: Vec<String> = events
        .iter()
        .filter(|e| e.body["data"]["table"] == "public.notes")
        .map(|e| {
            format!(
                "{} {}",
                e.body["data"]["op"].as_str().unwrap_or_default(),
                e.body["data"]["after"]["msg"]
            )
        })
        .collect();
    assert_eq!(
        notes,
        [
            "insert \"old 3\"",
            "truncate null",
            "read \"early\"",
            "insert \"new 1\"",
            "update \"new 2\""
        ],
        "{}",
        tm.log()
    );
    assert!(
        tm.log()
            .contains("truncated event marked with the new table's rows"),
        "{}",
        tm.log()
    );
    assert!(tm.is_running(), "{}", tm.log());
}

/// A recreated table without a key whose rows do not fit in a marker (over half of
/// `max_row_bytes`, the largest message the stream takes) gets the warning instead
/// (under `all_tables`: no truncated event, its rows as they streamed), and the source
/// streams on: a marker that large would have stopped it at that point for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_keyless_table_too_large_for_its_marker_is_warned_about() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE bulk (msg text); ALTER TABLE bulk REPLICA IDENTITY FULL;
         CREATE TABLE tick (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .set("all_tables", true)
            .set("max_row_bytes", 65536),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute(
        "INSERT INTO bulk VALUES ('old');
         DROP TABLE bulk;
         CREATE TABLE bulk (msg text);
         ALTER TABLE bulk REPLICA IDENTITY FULL;
         INSERT INTO bulk SELECT repeat('x', 60) || g FROM generate_series(1, 2000) g;",
    )
    .await
    .unwrap();
    let log = wait_for("the warning", Duration::from_secs(30), || {
        let log = tm.log();
        log.contains("cannot be read again, so no truncated event")
            .then_some(log)
    });
    assert!(!log.contains("marked with the new table's rows"), "{log}");
    db.batch_execute("INSERT INTO tick VALUES (1)")
        .await
        .unwrap();
    wait_confirmed_end(&pg, &db).await;
    let events = read_stream(&nats.client().await, "STORE").await;
    assert_exactly_once(&events);
    assert!(
        events.iter().any(|e| e.body["type"] == "tick.created"),
        "{}",
        tm.log()
    );
    assert!(
        !events.iter().any(|e| e.body["type"] == "bulk.truncated"),
        "{}",
        tm.log()
    );
    assert!(tm.is_running(), "{}", tm.log());
}

/// A table added to a running source's `tables` (tidemark stopped, the config edited,
/// tidemark started again) is read at that start: its truncated event, then its rows,
/// under writes; a keyed table by a backfill, a keyless one in the marker. Taken out and
/// put back, its rows deleted meanwhile go from the fold too. `check` says what `run`
/// will do. (Before, such a table streamed from then on and its rows from before were
/// never sent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_sources_tables_is_read_at_its_next_start() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE first (id int PRIMARY KEY, qty int, note text);
         INSERT INTO first SELECT g, g, 'old' FROM generate_series(1, 100) g;
         CREATE TABLE late (id int PRIMARY KEY, qty int, note text);
         INSERT INTO late SELECT g, g, 'old ' || g FROM generate_series(1, 3000) g;
         CREATE TABLE events_log (n int, message text);
         ALTER TABLE events_log REPLICA IDENTITY FULL;
         INSERT INTO events_log SELECT g % 7, 'before' FROM generate_series(1, 40) g;",
    )
    .await
    .unwrap();
    let spec = |tables: &[&str]| {
        SourceSpec::new("store", "store")
            .tables(tables)
            .snapshot("initial")
            .set("snapshot_chunk_size", 700)
    };
    let configure = |tables: &[&str]| write_config(dir.path(), &pg, &nats, &spec(tables));
    let cfg = configure(&["first"]);
    let cfg_arg = cfg.to_str().unwrap().to_string();
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    let nc = nats.client().await;
    wait_job_done(&nc, "store", "first", Duration::from_secs(60), || tm.log()).await;
    tm.terminate(Duration::from_secs(20));
    db.batch_execute("UPDATE late SET qty = -qty WHERE id % 10 = 0; INSERT INTO events_log VALUES (9, 'meanwhile');")
        .await
        .unwrap();

    // Added to the config.
    configure(&["first", "late", "events_log"]);
    let (code, out, _) = tidemark_cmd(&["check", "--config", &cfg_arg]);
    assert_eq!(code, 0, "{out}");
    for t in ["late", "events_log"] {
        assert!(
            out.lines().any(|l| l.contains(&format!("table \"public\".\"{t}\""))
                && l.contains("new since tidemark last ran: `run` will send its truncated event and read its rows")),
            "{out}"
        );
    }
    assert!(
        !out.lines().any(|l| l.contains("\"first\": new since")),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    tm.wait_streaming();
    // Writes while the added tables are read.
    let writer_db = pg.client("store").await;
    let writer = tokio::spawn(async move {
        for i in 1..=200 {
            writer_db
                .batch_execute(&format!(
                    "UPDATE late SET qty = qty + 1000, note = 'new' WHERE id = {};
                     DELETE FROM late WHERE id = {};
                     INSERT INTO late VALUES ({}, 0, 'inserted');
                     INSERT INTO events_log VALUES ({i}, 'live');",
                    i * 13 % 3000 + 1,
                    i * 7 % 3000 + 1,
                    10_000 + i
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let added = wait_reason_done(&nc, "late", "added", None, || tm.log()).await;
    writer.await.unwrap();
    added_tables_fold(&pg, &db, &nc, &tm.log()).await;
    assert!(
        tm.log()
            .contains("truncated event marked with the new table's rows"),
        "{}",
        tm.log()
    );

    // Taken out, rows deleted meanwhile, put back: the deleted rows leave the fold.
    tm.terminate(Duration::from_secs(20));
    configure(&["first"]);
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark3.log"));
    tm.wait_streaming();
    tm.terminate(Duration::from_secs(20));
    db.batch_execute("DELETE FROM late WHERE id % 3 = 0; DELETE FROM events_log WHERE n = 1;")
        .await
        .unwrap();
    configure(&["first", "late", "events_log"]);
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark4.log"));
    tm.wait_streaming();
    wait_reason_done(&nc, "late", "added", Some(&added), || tm.log()).await;
    db.batch_execute("INSERT INTO first VALUES (1000, 1, 'end')")
        .await
        .unwrap();
    let events = added_tables_fold(&pg, &db, &nc, &tm.log()).await;
    same_table(
        fold(&events).get("public.first"),
        &table_rows(&db, "first").await,
        &events,
        &tm.log(),
    );
    assert!(tm.is_running(), "{}", tm.log());
}

/// Once the slot confirmed the WAL's end: the stream has every event once, and folds
/// to `late` (by key) and to `events_log` (as a multiset). Returns the events.
async fn added_tables_fold(
    pg: &PgServer,
    db: &tokio_postgres::Client,
    nc: &async_nats::Client,
    log: &str,
) -> Vec<StoredEvent> {
    wait_confirmed_end(pg, db).await;
    let events = read_stream(nc, "STORE").await;
    assert_exactly_once(&events);
    same_table(
        fold(&events).get("public.late"),
        &table_rows(db, "late").await,
        &events,
        log,
    );
    same_rows(
        fold_multiset(&events, "public.events_log"),
        keyless_rows(db).await,
        log,
    );
    events
}
