//! The consumer examples in other languages (examples/python, examples/typescript),
//! each run against real Postgres, nats-server and tidemark: a workload of multi-row
//! transactions, the consumer killed -9 mid-stream and started again, and its read
//! model compared with the store's aggregate and its event count with the stream's.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Inserts, updates (moving orders between customers) and deletes, in transactions of
/// 60 changes, rounds `from..to`.
async fn workload(db: &tokio_postgres::Client, from: i64, to: i64) {
    for r in from..to {
        let base = r * 100;
        db.batch_execute(&format!(
            "BEGIN;
             INSERT INTO orders SELECT {base} + g, g % 7, (g * 3 + {r})::numeric / 4
               FROM generate_series(0, 39) g;
             UPDATE orders SET total = total + 1.25, customer_id = (customer_id + 1) % 7
               WHERE id >= {base} AND id < {base} + 15;
             DELETE FROM orders WHERE id >= {base} + 30 AND id < {base} + 35;
             COMMIT;"
        ))
        .await
        .unwrap();
    }
}

async fn store_aggregate(db: &tokio_postgres::Client) -> serde_json::Value {
    let rows = db
        .query(
            "SELECT customer_id, count(*), sum(total)::text FROM orders GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!([
                    r.get::<_, i32>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, String>(2)
                ])
            })
            .collect(),
    )
}

struct Example {
    /// The command that consumes (args appended: --nats, --stream, --db).
    consume: Vec<String>,
    /// The command that prints `{checkpoint, aggregate}`.
    dump: Vec<String>,
}

impl Example {
    fn start(&self, nats: &str, state: &Path, log: &Path) -> Child {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new(&self.consume[0])
            .args(&self.consume[1..])
            .args(["--nats", nats, "--stream", "STORE", "--db"])
            .arg(state)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {:?}: {e}", self.consume))
    }

    fn dump(&self, state: &Path) -> serde_json::Value {
        let out = Command::new(&self.dump[0])
            .args(&self.dump[1..])
            .arg("--db")
            .arg(state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "dump is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// Rows the table holds before tidemark starts.
const PRE_EXISTING: u64 = 500;

/// The scenario every example must pass.
async fn an_example_builds_the_read_model_exactly(example: Example) {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    // Orders from before tidemark: the initial snapshot's `orders.read` events.
    db.batch_execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int NOT NULL, total numeric(12,2) NOT NULL);
         INSERT INTO orders SELECT 1000000 + g, g % 5, g::numeric / 8 FROM generate_series(1, PRE_EXISTING) g;"
            .replace("PRE_EXISTING", &PRE_EXISTING.to_string())
            .as_str(),
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["orders"])
            .snapshot("initial"),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    tm.wait_streaming();
    let nc = nats.client().await;
    let state = dir.path().join("readmodel");
    let log = dir.path().join("consumer.log");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    workload(&db, 0, 40).await;
    let mut consumer = example.start(&nats.url(), &state, &log);
    // Killed -9 while it works through the backlog, then started again.
    wait_until(
        "the consumer to apply something",
        Duration::from_secs(60),
        || {
            let c = example.dump(&state)["checkpoint"].as_u64().unwrap_or(0);
            async move { c > 0 }
        },
    )
    .await;
    workload(&db, 40, 80).await;
    unsafe { libc::kill(consumer.id() as i32, libc::SIGKILL) };
    let _ = consumer.wait();
    let at_kill = example.dump(&state)["checkpoint"].as_u64().unwrap();
    workload(&db, 80, 120).await;
    let mut consumer = example.start(&nats.url(), &state, &log);

    let want = store_aggregate(&db).await;
    let rows: i64 = db
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows > 0);
    // The snapshot reads the live table: its read events are the rows from before and
    // any the workload wrote meanwhile. Once it is done and every change is stored,
    // the stream is what the consumer must have applied.
    wait_for("the snapshot to be done", Duration::from_secs(60), || {
        tm.log().contains("backfill done").then_some(())
    });
    wait_caught_up(
        &pg,
        &db,
        "store",
        "tidemark_store",
        Duration::from_secs(60),
        || tm.log(),
    )
    .await;
    let stored = read_stream(&nc, "STORE").await;
    let last = stored.last().map_or(0, |e| e.seq);
    let reads = stored
        .iter()
        .filter(|e| e.body["type"] == "orders.read")
        .count() as u64;
    assert!(reads >= PRE_EXISTING, "{reads} read events");
    // The reads, then 120 transactions of 40 + 15 + 5 changes.
    let events = reads + 120 * 60;
    assert_eq!(stored.len() as u64, events);
    wait_until("the consumer to catch up", Duration::from_secs(120), || {
        let c = example.dump(&state)["checkpoint"].as_u64().unwrap_or(0);
        async move { c >= last }
    })
    .await;
    let got = example.dump(&state);
    println!("consumer killed at checkpoint {at_kill}, caught up at {last}");
    assert!(at_kill < last, "the kill was mid-stream");
    assert_eq!(got["checkpoint"].as_u64(), Some(last), "{}", read_log());
    assert_eq!(
        got["aggregate"],
        want,
        "read model vs store:\n{}",
        read_log()
    );
    // A count no upsert hides: each order event applied exactly once.
    assert_eq!(got["events"].as_u64(), Some(events), "{}", read_log());
    unsafe { libc::kill(consumer.id() as i32, libc::SIGKILL) };
    let _ = consumer.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_consumer_builds_the_read_model_exactly_and_resumes_after_a_kill() {
    let script = repo("examples/python/consumer.py").display().to_string();
    an_example_builds_the_read_model_exactly(Example {
        consume: vec![
            "python3".into(),
            script.clone(),
            "--subject".into(),
            "store.>".into(),
        ],
        dump: vec!["python3".into(), script, "--dump".into()],
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_consumer_builds_the_read_model_exactly_and_resumes_after_a_kill() {
    let dir = repo("examples/typescript");
    let tsc = dir.join("node_modules/.bin/tsc");
    assert!(
        tsc.exists(),
        "{} is missing: run scripts/install-deps.sh (npm ci in examples/typescript)",
        tsc.display()
    );
    let built = Command::new(&tsc)
        .args(["-p"])
        .arg(&dir)
        .output()
        .expect("run tsc");
    assert!(
        built.status.success(),
        "tsc: {}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let script = dir.join("dist/consumer.js").display().to_string();
    an_example_builds_the_read_model_exactly(Example {
        consume: vec![
            "node".into(),
            script.clone(),
            "--subject".into(),
            "store.>".into(),
        ],
        dump: vec!["node".into(), script, "--dump".into()],
    })
    .await;
}
