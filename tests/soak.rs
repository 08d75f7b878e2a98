//! A seeded soak: a random mix of workload and faults against real Postgres and real
//! nats-server, then every promise checked at once. `SOAK_SEED` replays a schedule
//! (the seed is printed first), `SOAK_SECS` sets how long the workload runs.
//! `scripts/soak.sh [--seed N] [--minutes M]` runs it; `scripts/test.sh` runs a short one.
//!
//! Workload: a keyed table with an initial snapshot and a non-idempotent read model
//! (a counter and a running sum), a composite-key table with now and then a large
//! transaction, a keyless insert-only table (REPLICA IDENTITY FULL), a table with
//! TOASTed values, multi-table TRUNCATEs and DDL. Faults: kill -9 of `run` and of
//! `project`, SIGTERM with an immediate restart, nats-server restart, Postgres restart.
//! Checks: the stream folds to the tables (keyless as multisets), event ids unique and
//! rising, each snapshot row read once, the read model equals the SQL aggregate, and
//! every SIGTERM ended the process in time.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// xorshift64*: a small seeded generator, so a seed replays the same schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const STORE: &str = "
CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL);
ALTER TABLE acct REPLICA IDENTITY FULL;
INSERT INTO acct SELECT g, g % 97 FROM generate_series(1, 3000) g;
CREATE TABLE lines (o int, l int, q int NOT NULL, PRIMARY KEY (o, l));
INSERT INTO lines SELECT 0, g, g % 7 FROM generate_series(1, 20000) g;
CREATE TABLE log (at bigint, msg text);
ALTER TABLE log REPLICA IDENTITY FULL;
INSERT INTO log SELECT g, 'before ' || (g % 50) FROM generate_series(1, 3000) g;
CREATE TABLE docs (id int PRIMARY KEY, body text);
";

fn projection(pg: &PgServer) -> String {
    format!(
        r#"
[[projection]]
name = "stats"
source = "soak"

[projection.postgres]
host = "127.0.0.1"
port = {port}
dbname = "rm"
user = "postgres"

[[projection.on]]
type = ["acct.created", "acct.read"]
sql = "UPDATE stats SET n = n + 1, total = total + $1"
params = ["data.after.bal"]

[[projection.on]]
type = "acct.updated"
sql = "UPDATE stats SET total = total - $1 + $2"
params = ["data.before.bal", "data.after.bal"]

[[projection.on]]
type = "acct.deleted"
sql = "UPDATE stats SET n = n - 1, total = total - $1"
params = ["data.before.bal"]

[[projection.on]]
type = "acct.truncated"
sql = "UPDATE stats SET n = 0, total = 0"
"#,
        port = pg.port
    )
}

/// The stream folded per table: keyed tables by key, keyless ones as a multiset.
fn fold(events: &[StoredEvent]) -> BTreeMap<String, BTreeMap<String, i64>> {
    let mut tables: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut keyed: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for e in events {
        let data = &e.body["data"];
        let Some(table) = data["table"].as_str() else {
            continue;
        };
        let keyless = table == "public.log";
        let rows = keyed.entry(table.to_string()).or_default();
        let bag = tables.entry(table.to_string()).or_default();
        match data["op"].as_str() {
            Some("insert" | "update" | "read") if keyless => {
                *bag.entry(without_nulls(&data["after"])).or_default() += 1;
            }
            Some("insert" | "update" | "read") => {
                let key = data["key"].to_string();
                let mut after = data["after"].clone();
                // A TOASTed value the update left alone is not sent: it is the
                // previous one.
                if let (Some(cols), Some(prev)) =
                    (data["unchanged_toast"].as_array(), rows.get(&key))
                {
                    for c in cols.iter().filter_map(|c| c.as_str()) {
                        after[c] = prev[c].clone();
                    }
                }
                rows.insert(key, after);
            }
            Some("delete") if keyless => {
                *bag.entry(without_nulls(&data["before"])).or_default() -= 1;
            }
            Some("delete") => {
                rows.remove(&data["key"].to_string());
            }
            Some("truncate") => {
                rows.clear();
                bag.clear();
            }
            _ => {}
        }
    }
    for (table, rows) in keyed {
        if table == "public.log" {
            continue;
        }
        let bag = tables.entry(table).or_default();
        bag.clear();
        for row in rows.values() {
            *bag.entry(without_nulls(row)).or_default() += 1;
        }
    }
    for bag in tables.values_mut() {
        bag.retain(|_, n| *n != 0);
    }
    tables
}

/// A row as JSON text without its NULL columns: a column added mid-stream is NULL in
/// rows written before it, which their events do not list.
fn without_nulls(row: &Value) -> String {
    match row.as_object() {
        Some(m) => {
            let kept: serde_json::Map<String, Value> = m
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Value::Object(kept).to_string()
        }
        None => row.to_string(),
    }
}

/// A table's rows as JSON text, a multiset (the events' JSON has the same shape for
/// the types used here: integers as numbers, text as strings).
async fn rows(db: &tokio_postgres::Client, table: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for r in db
        .query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
        .await
        .unwrap()
    {
        let v: Value = serde_json::from_str(&r.get::<_, String>(0)).unwrap();
        *out.entry(without_nulls(&v)).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_soak_keeps_every_promise() {
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    println!("soak seed {seed} ({secs} s): SOAK_SEED={seed} replays this schedule");
    eprintln!("soak seed {seed} ({secs} s)");
    let mut rng = Rng(seed);
    let Rig {
        mut pg,
        mut nats,
        dir,
        db,
    } = Rig::start().await;
    db.batch_execute(STORE).await.unwrap();
    let rm = pg.create_db("rm").await;
    rm.batch_execute("CREATE TABLE stats (n bigint NOT NULL, total bigint NOT NULL); INSERT INTO stats VALUES (0, 0);")
        .await
        .unwrap();
    let sections = projection(&pg);
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec {
            snapshot: "initial",
            extra: "snapshot_chunk_size = 500\npublish_window = 64",
            sections: &sections,
            ..SourceSpec::new("soak", "store")
        },
    );
    let slog = dir.path().join("run.log");
    let plog = dir.path().join("project.log");
    let mut run = Tidemark::run(&cfg, &slog);
    let mut project = Tidemark::project(&cfg, &plog);
    // The counter read model counts rows as their reads and creates arrive. A row a
    // live change touches inside its snapshot chunk's window is not read (DBLog: the
    // newer change stands for it), so only an upsert-style read model stays exact
    // through a snapshot under writes to the same rows. The workload on `acct` starts
    // once its snapshot is done; `lines` is snapshotted under writes all along.
    let nc = nats.client().await;
    let js = async_nats::jetstream::new(nc.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state = match js.get_key_value("tidemark_soak").await {
            Ok(kv) => kv
                .get("backfill.public.acct")
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice::<Value>(&v).ok())
                .map(|j| j["state"].clone()),
            Err(_) => None,
        };
        if state.as_ref().and_then(|s| s.as_str()) == Some("done") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: acct snapshot not done\n{}",
            run.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    let mut step = 0u64;
    let mut next_id = 100_000i64;
    let mut next_order = 0i64;
    let mut columns = 0;
    let mut db = db;
    let mut reconnect = false;
    while started.elapsed() < Duration::from_secs(secs) {
        step += 1;
        if reconnect {
            db = pg.client("store").await;
            reconnect = false;
        }
        let what = rng.below(100);
        let sql = match what {
            0..=29 => {
                let n = 1 + rng.below(5);
                let mut s = String::from("BEGIN;");
                for _ in 0..n {
                    match rng.below(3) {
                        0 => {
                            next_id += 1;
                            s.push_str(&format!(
                                "INSERT INTO acct VALUES ({next_id}, {});",
                                rng.below(1000)
                            ));
                        }
                        1 => s.push_str(&format!(
                            "UPDATE acct SET bal = bal + {} WHERE id = {};",
                            rng.below(50),
                            1 + rng.below(next_id as u64)
                        )),
                        _ => s.push_str(&format!(
                            "DELETE FROM acct WHERE id = {};",
                            1 + rng.below(next_id as u64)
                        )),
                    }
                }
                s.push_str("COMMIT;");
                s
            }
            30..=49 => {
                next_order += 1;
                let rows = if rng.below(40) == 0 {
                    10_000 + rng.below(10_000)
                } else {
                    1 + rng.below(20)
                };
                format!(
                    "INSERT INTO lines SELECT {next_order}, g, g % 7 FROM generate_series(1, {rows}) g"
                )
            }
            50..=64 => format!(
                "INSERT INTO log SELECT {step}, 'm' || (g % 3) FROM generate_series(1, {}) g",
                1 + rng.below(4)
            ),
            65..=79 => {
                // Hex of md5s compresses only to about half: past 2 kB it is stored
                // out of line (TOAST), so updates that leave it alone send it unchanged.
                let id = rng.below(50);
                let salt = rng.next();
                let n = 100 + rng.below(300);
                format!(
                    "INSERT INTO docs (id, body) VALUES ({id}, (SELECT string_agg(md5(x::text || '{salt}'), '') FROM generate_series(1, {n}) AS s(x))) ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body"
                )
            }
            80..=82 => "TRUNCATE lines, log".to_string(),
            83 => {
                columns += 1;
                format!("ALTER TABLE docs ADD COLUMN c{columns} int")
            }
            84..=86 => "UPDATE docs SET id = id WHERE id < 5".to_string(),
            87..=89 => {
                let fault = rng.below(6);
                eprintln!("step {step}: fault {fault}");
                match fault {
                    0 => {
                        run.kill9();
                        run = Tidemark::run(&cfg, &slog);
                    }
                    1 => {
                        project.kill9();
                        project = Tidemark::project(&cfg, &plog);
                    }
                    2 => {
                        let t = Instant::now();
                        let st = run.terminate(Duration::from_secs(30));
                        // A process signalled before it set up its handler (just
                        // started) ends by the signal: nothing was in flight yet.
                        let ended = st.success()
                            || std::os::unix::process::ExitStatusExt::signal(&st)
                                == Some(libc::SIGTERM);
                        assert!(
                            ended && t.elapsed() < Duration::from_secs(30),
                            "seed {seed}, step {step}: SIGTERM did not end run in time ({:?}, {st:?})\n{}",
                            t.elapsed(),
                            run.log()
                        );
                        run = Tidemark::run(&cfg, &slog);
                    }
                    3 => {
                        nats.stop();
                        nats.start_again();
                    }
                    4 => {
                        pg.restart();
                        reconnect = true;
                    }
                    _ => {
                        project.kill9();
                        run.kill9();
                        run = Tidemark::run(&cfg, &slog);
                        project = Tidemark::project(&cfg, &plog);
                    }
                }
                continue;
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(rng.below(200))).await;
                continue;
            }
        };
        if let Err(e) = db.batch_execute(&sql).await {
            // Postgres restarting under us. Committed or not, the fold is compared
            // with what the tables hold in the end.
            eprintln!(
                "step {step}: {}",
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_string())
            );
            reconnect = true;
        }
    }
    if reconnect {
        db = pg.client("store").await;
    }
    eprintln!("soak seed {seed}: {step} steps; checking");

    // Everything committed is stored once the slot confirms the current end of WAL.
    let end = current_lsn(&db).await;
    wait_confirmed(
        &pg,
        "store",
        "tidemark_soak",
        end,
        Duration::from_secs(300),
        || run.log(),
    )
    .await;
    let nc = nats.client().await;
    let events = read_stream(&nc, "SOAK").await;
    assert!(
        events.iter().any(|e| e.body["type"] == "lines.read"),
        "seed {seed}: no snapshot of lines"
    );
    assert_exactly_once(&events);
    // Snapshot rows: each read at most once.
    let mut reads: BTreeMap<String, u32> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.body["type"] == "acct.read" || e.body["type"] == "lines.read")
    {
        *reads.entry(e.body["data"]["key"].to_string()).or_default() += 1;
    }
    let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).take(3).collect();
    assert!(
        twice.is_empty(),
        "seed {seed}: snapshot rows stored twice, e.g. {twice:?}"
    );
    let folded = fold(&events);
    for table in ["acct", "lines", "log", "docs"] {
        let want = rows(&db, table).await;
        let got = folded
            .get(&format!("public.{table}"))
            .cloned()
            .unwrap_or_default();
        if got != want {
            let first = want
                .iter()
                .find(|(k, n)| got.get(*k) != Some(n))
                .map(|(k, n)| format!("table has {n} x {k}, stream {:?}", got.get(k)))
                .or_else(|| {
                    got.iter()
                        .find(|(k, _)| !want.contains_key(*k))
                        .map(|(k, n)| format!("stream has {n} x {k}, the table none"))
                });
            panic!(
                "seed {seed}: the stream does not fold to table {table} ({} rows vs {}): first difference: {}",
                got.values().sum::<i64>(),
                want.values().sum::<i64>(),
                first.unwrap_or_default()
            );
        }
    }
    // The read model equals the same aggregate from the store (on a new connection:
    // Postgres restarts ended the first).
    let rm = pg.client("rm").await;
    let want = db
        .query_one(
            "SELECT count(*), coalesce(sum(bal), 0)::bigint FROM acct",
            &[],
        )
        .await
        .unwrap();
    let want: (i64, i64) = (want.get(0), want.get(1));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let got = rm
            .query_one("SELECT n, total FROM stats", &[])
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)));
        if got.as_ref().ok() == Some(&want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the read model {got:?} never equalled the store's aggregate {want:?}\n{}",
            project.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(run.is_running(), "seed {seed}: run stopped\n{}", run.log());
    assert!(
        project.is_running(),
        "seed {seed}: project stopped\n{}",
        project.log()
    );
    let st = run.terminate(Duration::from_secs(30));
    assert!(st.success(), "seed {seed}: {}", run.log());
}
