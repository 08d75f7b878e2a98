//! The benchmark (run it with `scripts/bench.sh`; it is not a test and asserts no time).
//!
//! 1. Backlog: writes N row changes (default 200,000) to a store-like table in
//!    transactions of 100 (70 inserts, 20 updates, 10 deletes each), then times tidemark
//!    from process start until JetStream has stored all N. Peak RSS from VmHWM.
//! 2. Ceilings on the same data: draining a second slot with `pg_recvlogical` (what
//!    Postgres can send), and acked publishes of the very same events with a bare
//!    async-nats client and the same window (what NATS can take). tidemark's rate is
//!    printed as a fraction of the slower ceiling.
//! 3. Live load: small transactions at a steady rate while tidemark runs; latency is the
//!    server's store time of each event minus its commit time (commit to ack), p50/p99.
//! 4. One big transaction (default 1,000,000 rows) through a fresh tidemark: events/s
//!    and peak RSS, which shows memory does not grow with the transaction.
//! 5. An initial snapshot of a table (default 1,000,000 rows): rows/s idle, then the
//!    same while pgbench runs about 1,000 TPC-B transactions/s on the same database.
//! 6. The backlog again (default 100,000 changes) into an R3 stream on a 3-node
//!    JetStream cluster on this machine: events/s beside the single server's.
//! 7. Restart: tidemark killed -9 a third into a backlog and started again; the time
//!    from the restart to the first new event stored.
//! 8. Read models: `tidemark project` over the backlog's stream, into a Postgres read
//!    model (an upsert and a delete handler) and into NATS KV: events/s applied.
//!
//! `BENCH_LOG` sets the log filter of the tidemark runs (default `info`; e.g.
//! `info,tidemark=debug` logs each snapshot chunk's read and placement with its time),
//! and `BENCH_KEEP_LOG=DIR` copies the backlog run's and the snapshot runs' logs into DIR.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::*;

struct Args {
    changes: u64,
    big_tx: u64,
    snapshot: u64,
    chunk: u64,
    live_secs: u64,
    live_tps: u64,
    window: usize,
    cluster: u64,
    /// Read models and the restart phase (`--extras 0` skips them).
    extras: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        changes: 200_000,
        big_tx: 1_000_000,
        snapshot: 1_000_000,
        chunk: 5000,
        live_secs: 10,
        live_tps: 200,
        window: 1024,
        cluster: 100_000,
        extras: true,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || -> u64 {
            argv.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage(&format!("{} needs a number", argv[i])))
        };
        match argv[i].as_str() {
            "--changes" => a.changes = val().max(100) / 100 * 100,
            "--big-tx" => a.big_tx = val(),
            "--snapshot" => a.snapshot = val(),
            "--chunk" => a.chunk = val().max(1),
            "--live-secs" => a.live_secs = val(),
            "--live-tps" => a.live_tps = val().max(1),
            "--window" => a.window = val().max(1) as usize,
            "--cluster" => a.cluster = val() / 100 * 100,
            "--extras" => a.extras = val() > 0,
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
        i += 2;
    }
    a
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("error: {msg}");
    }
    eprintln!(
        "usage: bench [--changes N (200000)] [--big-tx ROWS (1000000, 0 skips)] [--snapshot ROWS (1000000, 0 skips)] [--chunk ROWS (5000)] [--live-secs S (10)] [--live-tps T (200)] [--window W (1024)] [--cluster CHANGES (100000, 0 skips): the backlog again on a 3-node cluster, R3] [--extras 0|1 (1): the read models' apply rates and the restart after kill -9]"
    );
    std::process::exit(2)
}

const SCHEMA: &str = "
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL,
                     total numeric(12,2) NOT NULL, note text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE big (id bigint PRIMARY KEY, payload text);
CREATE TABLE live (id bigserial PRIMARY KEY, v int);
CREATE TABLE snap (id bigint PRIMARY KEY, qty int, payload text);
";

/// Transactions of 100 changes: 70 inserts, 20 updates of earlier rows, 10 deletes.
fn backlog_sql(txs: u64) -> String {
    format!(
        "DO $$
         BEGIN
           FOR t IN 0..{last} LOOP
             INSERT INTO orders (id, customer_id, status, total, note)
               SELECT t * 70 + g, g % 50, 'placed', 10.00 + g, 'note for order ' || (t * 70 + g)
               FROM generate_series(0, 69) g;
             UPDATE orders SET status = 'shipped', updated_at = now()
               WHERE id >= t * 70 AND id < t * 70 + 20;
             DELETE FROM orders WHERE id >= t * 70 + 60 AND id < t * 70 + 70;
             COMMIT;
           END LOOP;
         END $$;",
        last = txs - 1
    )
}

async fn lsn(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("current lsn")
        .get(0)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Runs tidemark until the stream holds `n` messages: (elapsed, peak RSS).
async fn run_until(
    cfg: &std::path::Path,
    log: &std::path::Path,
    nc: &async_nats::Client,
    stream: &str,
    n: u64,
) -> (Duration, u64, Tidemark) {
    let start = Instant::now();
    let level = std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".into());
    let tm = Tidemark::run_logging(cfg, log, &level);
    let mut peak = 0;
    loop {
        peak = peak.max(tm.peak_rss_bytes().unwrap_or(0));
        if stream_count(nc, stream).await >= n {
            break;
        }
        if start.elapsed() > Duration::from_secs(1800) {
            panic!(
                "tidemark did not store {n} events in 30 minutes:\n{}",
                tm.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    peak = peak.max(tm.peak_rss_bytes().unwrap_or(0));
    (elapsed, peak, tm)
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let n = args.changes;
    let txs = n / 100;
    println!(
        "tidemark benchmark: {n} changes in {txs} transactions of 100 (70 insert, 20 update, 10 delete)"
    );
    let pg = PgServer::start_with(&[("max_wal_size", "4GB"), ("checkpoint_timeout", "30min")]);
    let nats = NatsServer::start_with(&["-m", "0"]);
    let db = pg.create_db("bench").await;
    db.batch_execute(SCHEMA).await.expect("schema");
    // Separate statements: a slot cannot be created in a transaction that wrote.
    for sql in [
        "CREATE PUBLICATION tidemark_bench FOR TABLE orders, live",
        "SELECT pg_create_logical_replication_slot('tidemark_bench', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('ceiling', 'pgoutput')",
    ] {
        db.batch_execute(sql).await.expect("publication and slots");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("bench", "bench")
            .tables(&["orders", "live"])
            .set("publish_window", args.window),
    );
    // write_config names the publication after the source; the slot likewise.

    let t = Instant::now();
    db.batch_execute(&backlog_sql(txs)).await.expect("backlog");
    let end = lsn(&db).await;
    println!(
        "backlog written in {:.1}s (WAL end {end})",
        t.elapsed().as_secs_f64()
    );

    // Ceiling 1: what Postgres can send, on an identical slot.
    let t = Instant::now();
    let out = Command::new(client_tool(&pg_bindir(), "pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "bench",
        ])
        .args([
            "--slot",
            "ceiling",
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
            "-E",
            &end,
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=tidemark_bench",
        ])
        .output()
        .expect("run pg_recvlogical");
    assert!(
        out.status.success(),
        "pg_recvlogical: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pg_secs = t.elapsed().as_secs_f64();
    let pg_rate = n as f64 / pg_secs;

    // tidemark on the backlog.
    let nc = nats.client().await;
    let log = dir.path().join("tidemark.log");
    let load = Load::start(&nats);
    let (elapsed, peak, mut tm) = run_until(&cfg, &log, &nc, "BENCH", n).await;
    let backlog_load = load.finish();
    let stored_secs = stored_span(&nc, "BENCH", n).await;
    let tm_secs = elapsed.as_secs_f64();
    let tm_rate = n as f64 / tm_secs;
    let (tm_user, tm_sys) = tm.cpu_times().unwrap_or_default();
    let tm_cpu = (tm_user + tm_sys).as_secs_f64();
    if let Ok(keep) = std::env::var("BENCH_KEEP_LOG") {
        let _ = std::fs::copy(&log, format!("{keep}/backlog.log"));
    }

    // Ceiling 2: what NATS can take: the same events, bare client, same window.
    let js = async_nats::jetstream::new(nc.clone());
    let nats_secs = publish_ceiling(&nc, &js, n, args.window, "ceiling", Chain::None).await;
    let nats_rate = n as f64 / nats_secs;
    // Ceiling 3: the same, chained (each publish names the sequence that must precede
    // it), each publish acked.
    let each_secs = publish_ceiling(&nc, &js, n, args.window, "each", Chain::AckEach).await;
    let each_rate = n as f64 / each_secs;
    // Ceiling 4: chained and acked once per run, as tidemark publishes.
    let chained_secs = publish_ceiling(&nc, &js, n, args.window, "chained", Chain::AckRuns).await;
    let chained_rate = n as f64 / chained_secs;

    // Live load: commit-to-ack latency.
    let live = live_latency(&db, &nc, args.live_secs, args.live_tps).await;
    let _ = tm.terminate(Duration::from_secs(60));

    // One big transaction through a fresh source.
    let big = if args.big_tx > 0 {
        Some(big_transaction(&pg, &nats, &db, dir.path(), args.big_tx, args.window).await)
    } else {
        None
    };

    // An initial snapshot of a table through a fresh source.
    let snap = if args.snapshot > 0 {
        Some(
            snapshot(
                &pg,
                &nats,
                &db,
                dir.path(),
                "snap",
                args.snapshot,
                args.chunk,
                args.window,
            )
            .await,
        )
    } else {
        None
    };
    // The same under a pgbench load (TPC-B, about 1,000 transactions/s).
    let snap_load = if args.snapshot > 0 {
        Some(
            snapshot_under_load(
                &pg,
                &nats,
                &db,
                dir.path(),
                args.snapshot,
                args.chunk,
                args.window,
                1_000,
            )
            .await,
        )
    } else {
        None
    };

    // Read models over the backlog's stream.
    let apply = if args.extras {
        Some((
            apply_rate(&pg, &nats, dir.path(), false).await,
            apply_rate(&pg, &nats, dir.path(), true).await,
        ))
    } else {
        None
    };

    // Restart after kill -9 mid-backlog.
    let restart = if args.extras {
        Some(restart_after_kill(&pg, &nats, dir.path(), n.min(100_000), args.window).await)
    } else {
        None
    };

    // The backlog again, into an R3 stream on a 3-node cluster.
    let cluster = if args.cluster > 0 {
        Some(cluster_backlog(&pg, dir.path(), args.cluster, args.window).await)
    } else {
        None
    };

    let ceiling = pg_rate.min(chained_rate);
    println!();
    println!(
        "== results ({} changes, publish window {}) ==",
        n, args.window
    );
    println!("pg_recvlogical ceiling : {pg_rate:>10.0} changes/s ({pg_secs:.2}s)");
    println!("bare NATS ceiling      : {nats_rate:>10.0} events/s  ({nats_secs:.2}s)");
    println!(
        "chained, each acked    : {each_rate:>10.0} events/s  ({each_secs:.2}s; Nats-Msg-Id and expected last sequence, an ack for every publish)"
    );
    println!(
        "chained NATS ceiling   : {chained_rate:>10.0} events/s  ({chained_secs:.2}s; the same, one ack per run of {}, as tidemark publishes)",
        ack_run(args.window)
    );
    println!(
        "tidemark               : {tm_rate:>10.0} events/s  ({tm_secs:.2}s from process start to last ack)"
    );
    println!(
        "tidemark / slower ceiling ({}): {:.0}%",
        if pg_rate < chained_rate {
            "postgres"
        } else {
            "chained nats"
        },
        100.0 * tm_rate / ceiling
    );
    if let Some(secs) = stored_secs {
        // The ceilings are timed from their first publish, with the connection up;
        // this is tidemark timed the same way (its start-up left out).
        println!(
            "tidemark, first to last stored: {:>6.0} events/s  ({secs:.2}s, by the server's store times; {:.0}% of the chained NATS ceiling, which is timed the same way)",
            n as f64 / secs,
            100.0 * n as f64 / secs / chained_rate
        );
    }
    println!(
        "tidemark CPU           : {:>10.2} s user+sys ({:.1} µs per event, {:.1} of it in the kernel; the machine has {} cores shared with postgres and nats-server)",
        tm_cpu,
        tm_cpu * 1e6 / n as f64,
        tm_sys.as_secs_f64() * 1e6 / n as f64,
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1)
    );
    println!("tidemark peak RSS      : {:>10.1} MiB", mib(peak));
    println!("during tidemark's run  : {backlog_load}");
    match live {
        Some((count, p50, p99, max)) => println!(
            "live latency (commit -> stored), {count} events at {} tx/s: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            args.live_tps
        ),
        None => println!("live latency: no events measured"),
    }
    if let Some((rows, secs, rss)) = big {
        println!(
            "one transaction of {rows} rows: {:.0} events/s ({secs:.2}s), peak RSS {:.1} MiB",
            rows as f64 / secs,
            mib(rss)
        );
    }
    if let Some(s) = &snap {
        println!(
            "initial snapshot of a {}-row table (chunks of {}): {:.0} rows/s ({:.2}s), {}",
            s.rows,
            args.chunk,
            s.rows as f64 / s.secs,
            s.secs,
            s.details(chained_rate)
        );
    }
    for (what, (events, took)) in apply.into_iter().flat_map(|(apply_pg, apply_kv)| {
        [
            ("Postgres (upsert/delete handlers)", apply_pg),
            ("NATS KV (put/delete handlers)    ", apply_kv),
        ]
    }) {
        println!(
            "read model in {what}: {:.0} events/s applied ({events} events in {:.2}s)",
            events as f64 / took.as_secs_f64(),
            took.as_secs_f64()
        );
    }
    if let Some((stored_at_kill, first_new)) = restart {
        println!(
            "restart after kill -9 mid-backlog (at {stored_at_kill} events): first new event stored {:.2}s after the new process started",
            first_new.as_secs_f64()
        );
    }
    if let Some((changes, secs, rss)) = cluster {
        println!(
            "3-node cluster, R3 stream: {:.0} events/s ({changes} changes in {secs:.2}s; single server above: {tm_rate:.0}/s), peak RSS {:.1} MiB",
            changes as f64 / secs,
            mib(rss)
        );
    }
    if let Some((s, tps)) = snap_load {
        println!(
            "the same under pgbench ({tps:.0} TPC-B transactions/s): {:.0} rows/s ({:.2}s), {}",
            s.rows as f64 / s.secs,
            s.secs,
            s.details(chained_rate)
        );
    }
}

/// An initial snapshot: a table `table` of `rows` rows, read by a new source (named
/// like the table) in chunks.
#[allow(clippy::too_many_arguments)]
async fn snapshot(
    pg: &PgServer,
    nats: &NatsServer,
    db: &tokio_postgres::Client,
    dir: &std::path::Path,
    table: &str,
    rows: u64,
    chunk: u64,
    window: usize,
) -> Snap {
    db.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, qty int, payload text);
         INSERT INTO {table} SELECT g, g % 1000, repeat('x', 100) FROM generate_series(1, {rows}) g; ANALYZE {table};"
    ))
    .await
    .expect("snapshot table");
    let cfg = write_config(
        dir,
        pg,
        nats,
        &SourceSpec::new(table, "bench")
            .tables(&[table])
            .snapshot("initial")
            .set("publish_window", window)
            .set("snapshot_chunk_size", chunk),
    );
    let nc = nats.client().await;
    let load = Load::start(nats);
    let (elapsed, peak, mut tm) = run_until(
        &cfg,
        &dir.join(format!("{table}.log")),
        &nc,
        &table.to_uppercase(),
        rows,
    )
    .await;
    let load = load.finish();
    let tm_cpu = tm.cpu_time().unwrap_or_default().as_secs_f64();
    let _ = tm.terminate(Duration::from_secs(60));
    if let Ok(keep) = std::env::var("BENCH_KEEP_LOG") {
        let _ = std::fs::copy(
            dir.join(format!("{table}.log")),
            format!("{keep}/{table}.log"),
        );
    }
    Snap {
        rows,
        secs: elapsed.as_secs_f64(),
        peak,
        load,
        tm_cpu,
    }
}

/// What a snapshot run measured.
struct Snap {
    rows: u64,
    secs: f64,
    peak: u64,
    /// How busy nats-server and the machine were.
    load: Load,
    /// tidemark's CPU time (user + system), seconds.
    tm_cpu: f64,
}

impl Snap {
    /// The figures after the rate: peak memory, tidemark's CPU per row, nats-server's
    /// share of a core, and the rate beside the chained publish ceiling.
    fn details(&self, chained_rate: f64) -> String {
        let rate = self.rows as f64 / self.secs;
        format!(
            "peak RSS {:.1} MiB, tidemark {:.1} µs CPU per row, {:.0}% of the chained NATS ceiling; {}",
            mib(self.peak),
            self.tm_cpu * 1e6 / self.rows as f64,
            100.0 * rate / chained_rate,
            self.load
        )
    }
}

/// Seconds between the server's store times of the first and the `n`th message of
/// a stream.
async fn stored_span(nc: &async_nats::Client, stream: &str, n: u64) -> Option<f64> {
    let js = async_nats::jetstream::new(nc.clone());
    let s = js.get_stream(stream).await.ok()?;
    let first = s.get_raw_message(1).await.ok()?.time;
    let last = s.get_raw_message(n).await.ok()?.time;
    Some((last - first).as_seconds_f64())
}

/// How busy nats-server and the whole machine were over a run: the chained ceilings
/// are nats-server's, and on a machine this small the walsender, nats-server and
/// tidemark share the cores, so a run below the ceiling is read beside these.
struct Load {
    nats_pid: Option<u32>,
    at: Instant,
    /// nats-server's CPU seconds at the start, then over the run.
    nats: f64,
    /// The machine's (busy, steal) seconds over all cores at the start, then over the run.
    machine: (f64, f64),
    secs: f64,
}

impl Load {
    fn start(nats: &NatsServer) -> Load {
        let nats_pid = nats.pid();
        Load {
            nats_pid,
            at: Instant::now(),
            nats: Self::nats_cpu(nats_pid),
            machine: Self::machine(),
            secs: 0.0,
        }
    }

    fn finish(self) -> Load {
        let (busy, steal) = Self::machine();
        Load {
            nats: Self::nats_cpu(self.nats_pid) - self.nats,
            machine: (busy - self.machine.0, steal - self.machine.1),
            secs: self.at.elapsed().as_secs_f64(),
            ..self
        }
    }

    fn nats_cpu(pid: Option<u32>) -> f64 {
        pid.and_then(cpu_times_of)
            .map_or(0.0, |(u, s)| (u + s).as_secs_f64())
    }

    /// Seconds of CPU busy (neither idle nor waiting on I/O) and stolen by the host,
    /// over all cores, from the first line of /proc/stat.
    fn machine() -> (f64, f64) {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / hz;
        // user nice system idle iowait irq softirq steal
        let busy = at(0) + at(1) + at(2) + at(5) + at(6);
        (busy, at(7))
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.secs.max(1e-9);
        write!(
            f,
            "nats-server busy {:.2} of a core, the machine {:.2} of {} cores (host steal {:.2})",
            self.nats / secs,
            self.machine.0 / secs,
            std::thread::available_parallelism().map_or(1, |p| p.get()),
            self.machine.1 / secs
        )
    }
}

/// The same snapshot while pgbench runs TPC-B transactions from 4 clients at about
/// `tps` per second on the same database; also the transactions/s pgbench reached.
#[allow(clippy::too_many_arguments)]
async fn snapshot_under_load(
    pg: &PgServer,
    nats: &NatsServer,
    db: &tokio_postgres::Client,
    dir: &std::path::Path,
    rows: u64,
    chunk: u64,
    window: usize,
    tps: u64,
) -> (Snap, f64) {
    pgbench(pg, "bench", &["-i", "-s", "4", "-q"]);
    let mut load = pgbench_cmd(
        pg,
        "bench",
        &[
            "-R",
            &tps.to_string(),
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            "3600",
            "-n",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("start pgbench");
    let count = async || -> i64 {
        db.query_one("SELECT count(*) FROM pgbench_history", &[])
            .await
            .map_or(0, |r| r.get(0))
    };
    // A moment for the load to settle: a time, not a condition.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = count().await;
    let started = Instant::now();
    let snap = snapshot(pg, nats, db, dir, "snap_load", rows, chunk, window).await;
    let reached = (count().await - before) as f64 / started.elapsed().as_secs_f64();
    let _ = load.kill();
    let _ = load.wait();
    (snap, reached)
}

/// Reads (table subject suffix, id, payload) of every event back.
async fn read_raw(
    nc: &async_nats::Client,
    stream: &str,
    n: u64,
) -> Vec<(String, String, bytes::Bytes)> {
    let js = async_nats::jetstream::new(nc.clone());
    let s = js.get_stream(stream).await.expect("stream");
    let consumer = s
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("consumer");
    let mut msgs = consumer.messages().await.expect("messages");
    let mut out = Vec::with_capacity(n as usize);
    while (out.len() as u64) < n {
        let m = msgs.next().await.expect("stream ended").expect("message");
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        out.push((m.subject.to_string(), id, m.payload.clone()));
    }
    out
}

/// Writes small transactions at `tps` for `secs` and measures, for each event, the
/// server's store time minus the commit time in the event.
async fn live_latency(
    db: &tokio_postgres::Client,
    nc: &async_nats::Client,
    secs: u64,
    tps: u64,
) -> Option<(usize, f64, f64, f64)> {
    let js = async_nats::jetstream::new(nc.clone());
    let s = js.get_stream("BENCH").await.ok()?;
    let consumer = s
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: "bench.live.>".into(),
            ..Default::default()
        })
        .await
        .ok()?;
    let mut msgs = consumer.messages().await.ok()?;
    let total = secs * tps;
    let period = Duration::from_secs_f64(1.0 / tps as f64);
    let writer = async {
        let mut tick = tokio::time::interval(period);
        for _ in 0..total {
            tick.tick().await;
            db.execute("INSERT INTO live (v) VALUES (1)", &[])
                .await
                .expect("live insert");
        }
    };
    let reader = async {
        let mut lat = Vec::new();
        while (lat.len() as u64) < total {
            let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(30), msgs.next()).await
            else {
                break;
            };
            let stored = m.info().ok().map(|i| i.published);
            let ev: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            let commit = ev["time"].as_str().and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            });
            if let (Some(stored), Some(commit)) = (stored, commit) {
                lat.push((stored - commit).as_seconds_f64() * 1000.0);
            }
        }
        lat
    };
    let ((), mut lat) = tokio::join!(writer, reader);
    if lat.is_empty() {
        return None;
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    Some((lat.len(), pct(0.5), pct(0.99), lat[lat.len() - 1]))
}

async fn big_transaction(
    pg: &PgServer,
    nats: &NatsServer,
    db: &tokio_postgres::Client,
    dir: &std::path::Path,
    rows: u64,
    window: usize,
) -> (u64, f64, u64) {
    for sql in [
        "CREATE PUBLICATION tidemark_big FOR TABLE big",
        "SELECT pg_create_logical_replication_slot('tidemark_big', 'pgoutput')",
    ] {
        db.batch_execute(sql)
            .await
            .expect("big publication and slot");
    }
    db.batch_execute(&format!(
        "INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, {rows}) g"
    ))
    .await
    .expect("big transaction");
    let cfg = write_config(
        dir,
        pg,
        nats,
        &SourceSpec::new("big", "bench")
            .tables(&["big"])
            .set("publish_window", window),
    );
    let nc = nats.client().await;
    let (elapsed, peak, mut tm) = run_until(&cfg, &dir.join("big.log"), &nc, "BIG", rows).await;
    let _ = tm.terminate(Duration::from_secs(60));
    (rows, elapsed.as_secs_f64(), peak)
}

/// The backlog of `changes` into an R3 stream on a 3-node cluster: (changes, seconds,
/// peak RSS).
async fn cluster_backlog(
    pg: &PgServer,
    dir: &std::path::Path,
    changes: u64,
    window: usize,
) -> (u64, f64, u64) {
    let cluster = NatsCluster::start(3).await;
    orders_backlog(pg, "clustered", changes).await;
    let cfg = write_config(
        dir,
        pg,
        &cluster.nodes[0],
        &SourceSpec::new("clustered", "clustered")
            .tables(&["orders"])
            .set("publish_window", window)
            .stream("replicas", 3)
            .nats_servers(cluster.servers()),
    );
    let nc = cluster.client().await;
    let (elapsed, peak, mut tm) =
        run_until(&cfg, &dir.join("clustered.log"), &nc, "CLUSTERED", changes).await;
    let _ = tm.terminate(Duration::from_secs(60));
    (changes, elapsed.as_secs_f64(), peak)
}

/// A backlog of `changes`, tidemark killed -9 a third of the way, then started again:
/// (events stored at the kill, time from the restart to the first new event stored).
async fn restart_after_kill(
    pg: &PgServer,
    nats: &NatsServer,
    dir: &std::path::Path,
    changes: u64,
    window: usize,
) -> (u64, Duration) {
    orders_backlog(pg, "restart", changes).await;
    let cfg = write_config(
        dir,
        pg,
        nats,
        // The default status interval (10 s), as an operator runs it.
        &SourceSpec::new("restart", "restart")
            .tables(&["orders"])
            .set("publish_window", window)
            .unset("status_interval_secs"),
    );
    let nc = nats.client().await;
    let log = dir.join("restart.log");
    let mut tm = Tidemark::run_logging(&cfg, &log, "info");
    while stream_count(&nc, "RESTART").await < changes / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tm.kill9();
    // Acks in flight at the kill may still land: let them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_kill = stream_count(&nc, "RESTART").await;
    let started = Instant::now();
    let mut tm = Tidemark::run_logging(&cfg, &log, "info");
    loop {
        if stream_count(&nc, "RESTART").await > at_kill {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            panic!("no new event 120 s after the restart:\n{}", tm.log());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_new = started.elapsed();
    while stream_count(&nc, "RESTART").await < changes {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tm.terminate(Duration::from_secs(60));
    (at_kill, first_new)
}

/// `tidemark project` over the BENCH stream (its `n` backlog events and the live
/// phase's), into Postgres (or NATS KV with `kv`): the time from start until the
/// projection has applied them all.
async fn apply_rate(
    pg: &PgServer,
    nats: &NatsServer,
    dir: &std::path::Path,
    kv: bool,
) -> (u64, Duration) {
    let name = if kv { "orders_kv" } else { "orders_pg" };
    let target = if kv {
        "kv_bucket = \"ORDERS_VIEW\"".to_string()
    } else {
        let rm = pg.create_db("benchrm").await;
        rm.batch_execute(
            "CREATE TABLE order_view (id bigint PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL, total numeric NOT NULL)",
        )
        .await
        .expect("read model");
        format!(
            "[projection.postgres]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"benchrm\"\nuser = \"postgres\"",
            pg.port
        )
    };
    let handlers = if kv {
        r#"
[[projection.on]]
type = ["orders.created", "orders.updated"]
kv = "put"
key = "order.{data.after.id}"
value = { customer = "data.after.customer_id", status = "data.after.status", total = "data.after.total" }

[[projection.on]]
type = "orders.deleted"
kv = "delete"
key = "order.{data.key.id}"
"#
    } else {
        r#"
[[projection.on]]
type = ["orders.created", "orders.updated"]
upsert = "order_view"
key = ["id"]
columns = { id = "data.after.id", customer_id = "data.after.customer_id", status = "data.after.status", total = "data.after.total" }

[[projection.on]]
type = "orders.deleted"
delete = "order_view"
key = { id = "data.key.id" }
"#
    };
    let sections =
        format!("[[projection]]\nname = \"{name}\"\nsource = \"bench\"\n{target}\n{handlers}");
    std::fs::create_dir_all(dir.join(name)).expect("config dir");
    let cfg = write_config(
        &dir.join(name),
        pg,
        nats,
        &SourceSpec::new("bench", "bench")
            .tables(&["orders", "live"])
            .sections(&sections),
    );
    let nc = nats.client().await;
    let js = async_nats::jetstream::new(nc);
    let last = {
        let mut s = js.get_stream("BENCH").await.expect("BENCH stream");
        s.info().await.expect("stream info").state.last_sequence
    };
    let started = Instant::now();
    let mut tm = Tidemark::project(&cfg, &dir.join(format!("{name}.log")));
    loop {
        if tidemark::projection::applied(&js, name)
            .await
            .is_some_and(|a| a.seq >= last)
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!(
                "{name} did not apply {last} events in 10 minutes:\n{}",
                tm.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let _ = tm.terminate(Duration::from_secs(60));
    (last, took)
}

/// How a ceiling's publishes are chained and acked.
#[derive(Clone, Copy, PartialEq)]
enum Chain {
    /// Not chained, each acked.
    None,
    /// Each names the sequence before it and is acked.
    AckEach,
    /// Each names the sequence before it; only the last of each run asks for an ack
    /// (the chain makes that ack cover the run), as tidemark's publisher does.
    AckRuns,
}

/// The run length tidemark's publisher acks once for a publish window.
fn ack_run(window: usize) -> usize {
    (window / 4).clamp(1, 256)
}

/// Publishes the BENCH stream's `n` events again with a bare client into a new stream
/// `<PREFIX>` (subjects `<prefix>.>`), `window` in flight, each with its `Nats-Msg-Id`,
/// chained and acked as `chain` says: the seconds it took.
async fn publish_ceiling(
    nc: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    n: u64,
    window: usize,
    prefix: &str,
    chain: Chain,
) -> f64 {
    let events = read_raw(nc, "BENCH", n).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: prefix.to_uppercase(),
        subjects: vec![format!("{prefix}.>")],
        ..Default::default()
    })
    .await
    .expect("ceiling stream");
    let run = if chain == Chain::AckRuns {
        ack_run(window)
    } else {
        1
    };
    let total = events.len();
    let t = Instant::now();
    // Acks awaited, each with the publishes it covers.
    let mut inflight = std::collections::VecDeque::new();
    let mut unacked = 0;
    let mut unreplied = 0;
    for (k, (subject, id, payload)) in events.into_iter().enumerate() {
        let subject = format!("{prefix}.{subject}");
        unacked += 1;
        unreplied += 1;
        if unreplied < run && unacked < window && k + 1 < total {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
                async_nats::HeaderValue::from(k as u64),
            );
            nc.publish_with_headers(subject, headers, payload)
                .await
                .expect("publish");
            continue;
        }
        let mut msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(id);
        if chain != Chain::None {
            msg = msg.expected_last_sequence(k as u64);
        }
        let ack = js.send_publish(subject, msg).await.expect("publish");
        inflight.push_back((ack, unreplied));
        unreplied = 0;
        while unacked >= window
            && let Some((a, covers)) = inflight.pop_front()
        {
            a.await.expect("ack");
            unacked -= covers;
        }
    }
    for (a, _) in inflight {
        a.await.expect("ack");
    }
    t.elapsed().as_secs_f64()
}

/// A database `name` with the schema, a publication and a slot `tidemark_<name>` over
/// `orders`, and a backlog of `changes` written after the slot (so the slot holds it).
async fn orders_backlog(pg: &PgServer, name: &str, changes: u64) {
    let db = pg.create_db(name).await;
    db.batch_execute(SCHEMA).await.expect("schema");
    for sql in [
        format!("CREATE PUBLICATION tidemark_{name} FOR TABLE orders"),
        format!("SELECT pg_create_logical_replication_slot('tidemark_{name}', 'pgoutput')"),
    ] {
        db.batch_execute(&sql).await.expect("publication and slot");
    }
    db.batch_execute(&backlog_sql(changes / 100))
        .await
        .expect("backlog");
}
