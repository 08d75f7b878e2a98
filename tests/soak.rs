//! A seeded soak: a random mix of workload and faults against real Postgres and real
//! nats-server, then every promise checked at once. `SOAK_SEED` replays a schedule
//! (the seed is printed first), `SOAK_SECS` sets how long the workload runs.
//! `scripts/soak.sh [--seed N] [--minutes M]` runs it; `scripts/test.sh` runs a short one.
//!
//! Workload: a keyed table with an initial snapshot, a non-idempotent Postgres read
//! model (a counter and a running sum) and a NATS KV read model over it; a
//! composite-key table with now and then a large transaction; a keyless insert-only
//! table (REPLICA IDENTITY FULL); a partitioned table whose rows move between
//! partitions; a table with TOASTed values, DDL on it (add, drop,
//! retype a column) and one `tidemark backfill` of it under writes; outbox rows and
//! `pg_logical_emit_message` in the same transactions; multi-table TRUNCATEs and
//! `TRUNCATE ... CASCADE`; a table swapped for a rebuilt copy now and then (create,
//! copy, drop, rename: a new OID under its name); pgbench's TPC-B script as a
//! concurrent writer (its history table has no key). Faults: kill -9 of `run` and of `project`, SIGTERM with an
//! immediate restart, nats-server restart, Postgres fast and immediate restart, TCP
//! cuts and stalls of the source's Postgres and NATS connections through a proxy.
//! Checks: the stream folds to every table (keyless ones as multisets), event ids
//! unique and rising, each snapshot row read once, each outbox row and message once,
//! both read models equal the store, and every SIGTERM ended the process in time.

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
CREATE TABLE pings (n int PRIMARY KEY);
CREATE TABLE outbox (id bigserial PRIMARY KEY, aggregate_type text NOT NULL,
  aggregate_id text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent (id));
CREATE TABLE ship (id int, zone int NOT NULL, qty int NOT NULL, PRIMARY KEY (id, zone)) PARTITION BY LIST (zone);
CREATE TABLE ship_0 PARTITION OF ship FOR VALUES IN (0);
CREATE TABLE ship_1 PARTITION OF ship FOR VALUES IN (1);
CREATE TABLE ship_2 PARTITION OF ship DEFAULT;
INSERT INTO ship SELECT g, g % 4, g % 11 FROM generate_series(1, 3000) g;
CREATE TABLE swap (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO swap SELECT g, g FROM generate_series(1, 500) g;
";

/// Every published table the fold is compared with; the keyless ones as multisets.
const TABLES: &[&str] = &[
    "acct",
    "lines",
    "log",
    "docs",
    "pings",
    "parent",
    "child",
    "ship",
    "swap",
    "pgbench_accounts",
    "pgbench_tellers",
    "pgbench_branches",
    "pgbench_history",
];
const KEYLESS: &[&str] = &["public.log", "public.pgbench_history"];

fn sections(pg: &PgServer) -> String {
    format!(
        r#"
[[source.outbox]]
table = "outbox"

[[source.message]]
prefix = "soak"
type_field = "type"

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

[[projection]]
name = "acct_kv"
source = "soak"
kv_bucket = "ACCT_VIEW"

[[projection.on]]
type = ["acct.created", "acct.read", "acct.updated"]
kv = "put"
key = "acct.{{data.after.id}}"
value = {{ bal = "data.after.bal" }}

[[projection.on]]
type = "acct.deleted"
kv = "delete"
key = "acct.{{data.key.id}}"
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
        let keyless = KEYLESS.contains(&table);
        let rows = keyed.entry(table.to_string()).or_default();
        let bag = tables.entry(table.to_string()).or_default();
        match data["op"].as_str() {
            Some("insert" | "update" | "read") if keyless => {
                *bag.entry(shape(&data["after"])).or_default() += 1;
            }
            Some("insert" | "update" | "read") => {
                let key = data["key"].to_string();
                // An UPDATE that changes the key (a partitioned row moved within its
                // partition) leaves no row under the old key, which `before` carries.
                let old = match (data["key"].as_object(), data["before"].as_object()) {
                    (Some(k), Some(b)) if k.keys().all(|c| b.contains_key(c)) => {
                        let old: serde_json::Map<String, Value> =
                            k.keys().map(|c| (c.clone(), b[c].clone())).collect();
                        Value::Object(old).to_string()
                    }
                    _ => key.clone(),
                };
                let prev = rows.remove(&old);
                let mut after = data["after"].clone();
                // A TOASTed value the update left alone is not sent: it is the
                // previous one.
                if let (Some(cols), Some(prev)) = (data["unchanged_toast"].as_array(), prev) {
                    for c in cols.iter().filter_map(|c| c.as_str()) {
                        after[c] = prev[c].clone();
                    }
                }
                rows.insert(key, after);
            }
            Some("delete") if keyless => {
                *bag.entry(shape(&data["before"])).or_default() -= 1;
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
        if KEYLESS.contains(&table.as_str()) {
            continue;
        }
        let bag = tables.entry(table).or_default();
        bag.clear();
        for row in rows.values() {
            *bag.entry(shape(row)).or_default() += 1;
        }
    }
    for bag in tables.values_mut() {
        bag.retain(|_, n| *n != 0);
    }
    tables
}

/// A row as JSON text without its NULL columns (a column added mid-stream is NULL in
/// rows written before it, which their events do not list) and without pgbench's
/// `mtime` (a timestamp, whose JSON text differs from `row_to_json`'s).
fn shape(row: &Value) -> String {
    match row.as_object() {
        Some(m) => {
            let kept: serde_json::Map<String, Value> = m
                .iter()
                .filter(|(k, v)| !v.is_null() && *k != "mtime")
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
        *out.entry(shape(&v)).or_default() += 1;
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
    // pgbench's tables (20,000 of its 100,000 accounts, so the debug build's snapshot
    // stays short; its updates of the others change nothing, and its keyless history
    // grows all the same) join the initial snapshot.
    pgbench(&pg, "store", &["-i", "-s", "1", "-q"]);
    db.batch_execute("DELETE FROM pgbench_accounts WHERE aid > 20000; ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let rm = pg.create_db("rm").await;
    rm.batch_execute("CREATE TABLE stats (n bigint NOT NULL, total bigint NOT NULL); INSERT INTO stats VALUES (0, 0);")
        .await
        .unwrap();
    // The source's Postgres and every NATS connection go through proxies that cut and
    // stall on the schedule; the read model's database and the checks go direct.
    let pg_proxy = std::sync::Arc::new(Proxy::start(pg.port).await);
    let nats_proxy = std::sync::Arc::new(Proxy::start(nats.port).await);
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("soak", "store")
            .snapshot("initial")
            .set("snapshot_chunk_size", 500)
            .set("publish_window", 64)
            .set("replication_timeout_secs", 4)
            .sections(&sections(&pg))
            .through_pg_proxy(&pg_proxy)
            .through_nats_proxy(&nats_proxy),
    );
    let cfg_arg = cfg.to_str().unwrap().to_string();
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
    wait_job_done(&nc, "soak", "acct", Duration::from_secs(180), || {
        format!("seed {seed}: acct snapshot\n{}", run.log())
    })
    .await;
    let started = Instant::now();
    let mut step = 0u64;
    let mut next_id = 100_000i64;
    let mut next_order = 0i64;
    let mut next_ping = 0i64;
    let mut next_parent = 0i64;
    let mut columns = 0;
    let mut db = db;
    let mut reconnect = false;
    let mut pgbench_run: Option<std::process::Child> = None;
    // One CLI backfill of `docs` at a random moment (so each of its rows may be read
    // once), retried at a later step when it could not be queued.
    let mut backfill_next = started + Duration::from_secs(rng.below(secs.max(1) * 2 / 3));
    let mut backfill_split: Option<u64> = None;
    while started.elapsed() < Duration::from_secs(secs) {
        step += 1;
        if reconnect {
            db = pg.client("store").await;
            reconnect = false;
        }
        // Pace: the workload may not outrun the source for good (a debug build on a
        // loaded machine drains less than it writes), or a long soak tests a backlog,
        // not the mix. Past 64 MiB of unconfirmed WAL, writes and faults wait until the
        // source is within 16 MiB (it must get there in a while: that is checked too).
        if step.is_multiple_of(100) && slot_lag(&db).await > 64 << 20 {
            eprintln!(
                "step {step}: the source is behind by more than 64 MiB; pausing the workload"
            );
            let deadline = Instant::now() + Duration::from_secs(600);
            while slot_lag(&db).await > 16 << 20 {
                assert!(
                    Instant::now() < deadline,
                    "seed {seed}, step {step}: the source did not catch up within 600 s\n{}",
                    tail(&run.log(), 200)
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if backfill_split.is_none() && Instant::now() >= backfill_next {
            // Every read of the initial snapshot's job of docs is stored before that job
            // is done, and a new job is refused until then: so the reads up to this
            // sequence are the first job's, those after it the CLI backfill's.
            let before = stream_last_seq(&nc, "SOAK").await;
            match (before > 0).then(|| {
                tidemark_cmd_within(
                    &[
                        "backfill",
                        "--config",
                        &cfg_arg,
                        "--table",
                        "docs",
                        "--no-wait",
                    ],
                    Duration::from_secs(60),
                )
            }) {
                Some(Some((0, _, _))) => {
                    eprintln!("step {step}: backfill of docs queued after sequence {before}");
                    backfill_split = Some(before);
                }
                other => {
                    eprintln!("step {step}: backfill not queued: {other:?}");
                    backfill_next = Instant::now() + Duration::from_secs(2);
                }
            }
        }
        if pgbench_run
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
        {
            pgbench_run = None;
        }
        let what = rng.below(100);
        let sql = match what {
            0..=24 => {
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
            25..=39 => {
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
            40..=49 => format!(
                "INSERT INTO log SELECT {step}, 'm' || (g % 3) FROM generate_series(1, {}) g",
                1 + rng.below(4)
            ),
            50..=59 => {
                // Hex of md5s compresses only to about half: past 2 kB it is stored
                // out of line (TOAST), so updates that leave it alone send it unchanged.
                let id = rng.below(50);
                let salt = rng.next();
                let n = 100 + rng.below(300);
                format!(
                    "INSERT INTO docs (id, body) VALUES ({id}, (SELECT string_agg(md5(x::text || '{salt}'), '') FROM generate_series(1, {n}) AS s(x))) ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body"
                )
            }
            60..=61 => "TRUNCATE lines, log".to_string(),
            62 => "TRUNCATE parent CASCADE".to_string(),
            63 => {
                // Added columns stay NULL, so a dropped one leaves nothing behind in
                // the fold.
                match (columns, rng.below(3)) {
                    (0, _) | (_, 0) => {
                        columns += 1;
                        format!("ALTER TABLE docs ADD COLUMN c{columns} int")
                    }
                    (_, 1) => format!("ALTER TABLE docs ALTER COLUMN c{columns} TYPE bigint"),
                    _ => {
                        columns -= 1;
                        format!("ALTER TABLE docs DROP COLUMN c{}", columns + 1)
                    }
                }
            }
            64..=65 => "UPDATE docs SET id = id WHERE id < 5".to_string(),
            66..=69 => {
                // An outbox row and a message in the transaction that records them.
                next_ping += 1;
                format!(
                    "BEGIN; INSERT INTO pings VALUES ({next_ping}); \
                     INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     VALUES ('ping', '{next_ping}', 'PingRecorded', '{{\"n\": {next_ping}}}'); \
                     SELECT pg_logical_emit_message(true, 'soak', '{{\"type\": \"Pinged\", \"n\": {next_ping}}}'); \
                     COMMIT;"
                )
            }
            70..=72 => {
                next_parent += 1;
                format!(
                    "BEGIN; INSERT INTO parent VALUES ({next_parent}); \
                     INSERT INTO child SELECT {next_parent} * 10 + g, {next_parent} FROM generate_series(1, {}) g; COMMIT;",
                    1 + rng.below(3)
                )
            }
            79..=82 => {
                // The partitioned table: rows changed in place, moved to another
                // partition (a delete and an insert), added, removed.
                let id = 1 + rng.below(3500);
                match rng.below(4) {
                    0 => format!("UPDATE ship SET qty = qty + 1 WHERE id = {id}"),
                    1 => format!("UPDATE ship SET zone = (zone + 1) % 5 WHERE id = {id}"),
                    2 => format!(
                        "INSERT INTO ship VALUES ({id}, {}, 1) ON CONFLICT DO NOTHING",
                        rng.below(5)
                    ),
                    _ => format!("DELETE FROM ship WHERE id = {id}"),
                }
            }
            83 => {
                // A migration that swaps in a rebuilt table (a new OID under the
                // name): tidemark publishes swap's truncated event and reads it again.
                let gone = rng.below(50);
                eprintln!("step {step}: swap");
                format!(
                    "BEGIN; CREATE TABLE swap_s{step} (id int PRIMARY KEY, v int NOT NULL); \
                     INSERT INTO swap_s{step} SELECT id, v + 1 FROM swap WHERE id % 50 <> {gone}; \
                     DROP TABLE swap; ALTER TABLE swap_s{step} RENAME TO swap; COMMIT;"
                )
            }
            84..=85 => {
                let id = 1 + rng.below(600);
                match rng.below(3) {
                    0 => format!("UPDATE swap SET v = v + 1 WHERE id = {id}"),
                    1 => format!("INSERT INTO swap VALUES ({id}, 0) ON CONFLICT DO NOTHING"),
                    _ => format!("DELETE FROM swap WHERE id = {id}"),
                }
            }
            73..=74 => {
                if pgbench_run.is_none() {
                    let t = (1 + rng.below(3)).to_string();
                    let c = (1 + rng.below(3)).to_string();
                    pgbench_run = pgbench_cmd(&pg, "store", &["-T", &t, "-c", &c, "-n"])
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .ok();
                }
                continue;
            }
            75..=78 => {
                let fault = rng.below(10);
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
                            tail(&run.log(), 200)
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
                    5 => {
                        pg.restart_immediate();
                        reconnect = true;
                    }
                    6 => pg_proxy.cut(),
                    7 => nats_proxy.cut(),
                    8 => {
                        // A stall of one side for 0.5 to 8 s, lifted in the background
                        // while the workload goes on (past replication_timeout_secs and
                        // ack_timeout_secs now and then).
                        let proxy = if rng.below(2) == 0 {
                            pg_proxy.clone()
                        } else {
                            nats_proxy.clone()
                        };
                        let ms = 500 + rng.below(7_500);
                        proxy.stall();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            proxy.resume();
                        });
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
    pg_proxy.resume();
    nats_proxy.resume();
    if let Some(mut c) = pgbench_run.take()
        && wait_exit(&mut c, Duration::from_secs(60)).is_none()
    {
        let _ = c.kill();
        let _ = c.wait();
    }
    if reconnect {
        db = pg.client("store").await;
    }
    eprintln!("soak seed {seed}: {step} steps; checking");
    // Every fault is followed by a restart: a process that is gone now stopped on its
    // own, and nothing it should have sent will come.
    let when = format!("during the workload (before step {step}'s checks)");
    still_running(&mut run, "run", seed, &when);
    still_running(&mut project, "project", seed, &when);
    let nc = nats.client().await;
    // First the backlog the faults left (a long soak leaves a long one for a debug
    // build), then every snapshot and backfill to its end (done; a failed one fails
    // the soak), then what their chunks added: everything committed is stored once the
    // slot confirms the current end of WAL.
    let grace = Duration::from_secs(300 + secs / 2);
    // The last swap is seen within tidemark's 2 s look at the names: once swap's OID
    // is recorded, its truncated event is in the WAL and its backfill queued.
    let swap_oid: u32 = db
        .query_one("SELECT 'swap'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + grace;
    while !swap_recorded(&nc, swap_oid).await {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: swap's OID {swap_oid} never recorded\n{}",
            tail(&run.log(), 200)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_caught_up(&pg, &db, "store", "tidemark_soak", grace, || {
        format!("seed {seed}\n{}", tail(&run.log(), 200))
    })
    .await;
    let deadline = Instant::now() + grace;
    loop {
        let open = open_jobs(&nc).await;
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline && !open.iter().any(|j| j["state"] == "failed"),
            "seed {seed}: backfills not done: {open:?}\n{}",
            tail(&run.log(), 200)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_caught_up(&pg, &db, "store", "tidemark_soak", grace, || {
        format!("seed {seed}\n{}", tail(&run.log(), 200))
    })
    .await;
    let events = read_stream(&nc, "SOAK").await;
    // The workload leaves acct alone until its snapshot is done: its 3,000 rows are
    // each read once (the check below), and none is missing.
    let acct_reads = events
        .iter()
        .filter(|e| e.body["type"] == "acct.read")
        .count();
    if acct_reads != 3000 {
        let mut types: BTreeMap<String, u64> = BTreeMap::new();
        for e in &events {
            *types.entry(e.body["type"].to_string()).or_default() += 1;
        }
        panic!(
            "seed {seed}: {acct_reads} acct.read events for 3,000 rows; the stream's {} events by type: {types:?}",
            events.len()
        );
    }
    assert_exactly_once(&events);
    // Snapshot rows of keyed tables: each read at most once per job. Every table has
    // one job (its initial snapshot) except docs, which may have two: the initial
    // snapshot's (rows docs held by the time the worker got to it), and the CLI
    // backfill's, whose reads all come after the sequence it was queued at.
    let mut reads: BTreeMap<String, u32> = BTreeMap::new();
    for e in events.iter().filter(|e| {
        let d = &e.body["data"];
        // A keyless table's key is its whole row, which two rows may share. A swapped
        // table is read again by each swap's job, and a chunk of the job a swap
        // replaced may still land after it.
        d["op"] == "read"
            && !KEYLESS.contains(&d["table"].as_str().unwrap_or_default())
            && d["table"] != "public.swap"
    }) {
        let d = &e.body["data"];
        let job = if d["table"] == "public.docs" && backfill_split.is_some_and(|s| e.seq > s) {
            "backfill"
        } else {
            "snapshot"
        };
        *reads
            .entry(format!("{} {} ({job})", d["table"], d["key"]))
            .or_default() += 1;
    }
    let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).take(3).collect();
    assert!(
        twice.is_empty(),
        "seed {seed}: snapshot rows stored twice, e.g. {twice:?}"
    );
    let folded = fold(&events);
    for table in TABLES {
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
            // The table's last events and the log lines that name it.
            let table_name = format!("public.{table}");
            let last: Vec<String> = events
                .iter()
                .filter(|e| e.body["data"]["table"] == table_name.as_str())
                .map(|e| format!("{} {} {}", e.seq, e.body["id"], e.body["data"]["op"]))
                .collect();
            let log = run.log();
            let named: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(&format!("{table}\"")) || l.contains(&format!("{table} ")))
                .collect();
            panic!(
                "seed {seed}: the stream does not fold to table {table} ({} rows vs {}): first difference: {}\nits last events: {:?}\nthe log on it:\n{}",
                got.values().sum::<i64>(),
                want.values().sum::<i64>(),
                first.unwrap_or_default(),
                &last[last.len().saturating_sub(8)..],
                named[named.len().saturating_sub(40)..].join("\n")
            );
        }
    }
    // Each committed outbox row and message once: the tables record which committed.
    let mut outbox: BTreeMap<String, u32> = BTreeMap::new();
    let mut pinged: BTreeMap<i64, u32> = BTreeMap::new();
    for e in &events {
        if let Some(id) = e.body["outboxid"].as_str() {
            *outbox.entry(id.to_string()).or_default() += 1;
        }
        if e.body["type"] == "Pinged" {
            *pinged
                .entry(e.body["data"]["n"].as_i64().unwrap_or(-1))
                .or_default() += 1;
        }
    }
    let want_outbox: BTreeMap<String, u32> = db
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), 1))
        .collect();
    assert_eq!(
        outbox, want_outbox,
        "seed {seed}: outbox events (by outboxid) differ from the outbox table"
    );
    let want_pinged: BTreeMap<i64, u32> = db
        .query("SELECT n::bigint FROM pings", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0), 1))
        .collect();
    assert_eq!(
        pinged, want_pinged,
        "seed {seed}: emitted messages differ from the pings table"
    );
    // The read models equal the same aggregate from the store (on a new connection:
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
            tail(&project.log(), 200)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let want_kv: BTreeMap<String, i64> = db
        .query("SELECT id, bal FROM acct", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (format!("acct.{}", r.get::<_, i32>(0)), r.get::<_, i64>(1)))
        .collect();
    let js = async_nats::jetstream::new(nc.clone());
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let got = kv_balances(&js).await;
        if got == want_kv {
            break;
        }
        if Instant::now() > deadline {
            let first = want_kv
                .iter()
                .find(|(k, v)| got.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}: store {v}, KV {:?}", got.get(k)))
                .or_else(|| {
                    got.keys()
                        .find(|k| !want_kv.contains_key(*k))
                        .map(|k| format!("{k}: in KV only"))
                });
            panic!(
                "seed {seed}: the KV read model ({} keys) never equalled acct ({} rows): first difference: {}\n{}",
                got.len(),
                want_kv.len(),
                first.unwrap_or_default(),
                tail(&project.log(), 200)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    still_running(&mut run, "run", seed, "during the checks");
    still_running(&mut project, "project", seed, "during the checks");
    let st = run.terminate(Duration::from_secs(30));
    assert!(st.success(), "seed {seed}: {}", tail(&run.log(), 200));
}

/// Bytes of WAL the soak's slot has not confirmed (0 when it cannot be read: Postgres
/// restarting).
async fn slot_lag(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 'tidemark_soak'",
        &[],
    )
    .await
    .map_or(0, |r| r.get(0))
}

/// The last `n` lines of a log (a long soak's whole log is too long to read).
/// Fails the soak, naming the process and showing its log's tail, when `process`
/// stopped on its own (every fault is followed by a restart).
fn still_running(process: &mut Tidemark, name: &str, seed: u64, when: &str) {
    assert!(
        process.is_running(),
        "seed {seed}: `tidemark {name}` stopped on its own {when}:\n{}",
        tail(&process.log(), 200)
    );
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The stream's last sequence (0 when it cannot be read).
async fn stream_last_seq(nc: &async_nats::Client, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(nc.clone());
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map_or(0, |i| i.state.last_sequence),
        Err(_) => 0,
    }
}

/// The soak source's backfill records that are not done.
/// Whether the source recorded `oid` as swap's (see `src/source/recreated.rs`).
async fn swap_recorded(nc: &async_nats::Client, oid: u32) -> bool {
    let js = async_nats::jetstream::new(nc.clone());
    let Ok(kv) = js.get_key_value("tidemark_soak").await else {
        return false;
    };
    let Ok(Some(v)) = kv.get("table_oids").await else {
        return false;
    };
    serde_json::from_slice::<Value>(&v).is_ok_and(|r| {
        r["tables"]
            .as_array()
            .is_some_and(|t| t.iter().any(|e| e[1] == "swap" && e[2] == oid))
    })
}

async fn open_jobs(nc: &async_nats::Client) -> Vec<Value> {
    use futures_util::StreamExt;
    let js = async_nats::jetstream::new(nc.clone());
    let Ok(kv) = js.get_key_value("tidemark_soak").await else {
        return vec![Value::String("no tidemark_soak bucket".into())];
    };
    let Ok(mut keys) = kv.keys().await else {
        return vec![Value::String("cannot list tidemark_soak".into())];
    };
    let mut names = Vec::new();
    while let Some(Ok(k)) = keys.next().await {
        names.push(k);
    }
    let mut open = Vec::new();
    for k in names.iter().filter(|k| k.starts_with("backfill.")) {
        if let Ok(Some(v)) = kv.get(k).await
            && let Ok(j) = serde_json::from_slice::<Value>(&v)
            && j["state"] != "done"
        {
            open.push(j);
        }
    }
    open
}

/// The KV read model: key to `bal`.
async fn kv_balances(js: &async_nats::jetstream::Context) -> BTreeMap<String, i64> {
    use futures_util::StreamExt;
    let mut out = BTreeMap::new();
    let Ok(kv) = js.get_key_value("ACCT_VIEW").await else {
        return out;
    };
    let Ok(mut keys) = kv.keys().await else {
        return out;
    };
    let mut names = Vec::new();
    while let Some(Ok(k)) = keys.next().await {
        names.push(k);
    }
    for k in names {
        if let Ok(Some(v)) = kv.get(&k).await
            && let Ok(j) = serde_json::from_slice::<Value>(&v)
            && let Some(bal) = j["bal"].as_i64()
        {
            out.insert(k, bal);
        }
    }
    out
}
