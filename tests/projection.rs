//! Integration tests of read-model builders (projections) against a real PostgreSQL
//! and a real nats-server: exactness under kill -9, read-your-writes, poison events.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::*;

const STORE: &str = "
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL, total numeric(10,2) NOT NULL);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE audit (id bigserial PRIMARY KEY, note text);
";

const READ_MODEL: &str = "
CREATE TABLE customer_stats (customer_id int PRIMARY KEY, orders int NOT NULL DEFAULT 0, spent numeric NOT NULL DEFAULT 0);
CREATE TABLE order_view (id int PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL, total numeric NOT NULL CHECK (total >= 0));
";

/// The stream `DEAD` that captures the dead-letter subjects `deadletter.>`.
async fn dead_letter_stream(nc: &async_nats::Client) {
    async_nats::jetstream::new(nc.clone())
        .create_stream(async_nats::jetstream::stream::Config {
            name: "DEAD".into(),
            subjects: vec!["deadletter.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
}

fn projection_toml(pg: &PgServer, extra: &str) -> String {
    format!(
        r#"
[[projection]]
name = "customer_stats"
source = "store"
{extra}

[projection.postgres]
host = "127.0.0.1"
port = {port}
dbname = "readmodel"
user = "postgres"

[[projection.on]]
type = "orders.created"
sql = """INSERT INTO customer_stats (customer_id, orders, spent) VALUES ($1, 1, $2)
         ON CONFLICT (customer_id) DO UPDATE SET orders = customer_stats.orders + 1, spent = customer_stats.spent + EXCLUDED.spent"""
params = ["data.after.customer_id", "data.after.total"]

[[projection.on]]
type = "orders.updated"
sql = "UPDATE customer_stats SET spent = spent - $2 + $3 WHERE customer_id = $1"
params = ["data.after.customer_id", "data.before.total", "data.after.total"]

[[projection.on]]
type = "orders.deleted"
sql = "UPDATE customer_stats SET orders = orders - 1, spent = spent - $2 WHERE customer_id = $1"
params = ["data.before.customer_id", "data.before.total"]

[[projection.on]]
type = ["orders.created", "orders.updated"]
upsert = "order_view"
key = ["id"]
columns = {{ id = "data.after.id", customer_id = "data.after.customer_id", status = "data.after.status", total = "data.after.total" }}

[[projection.on]]
type = "orders.deleted"
delete = "order_view"
key = {{ id = "data.key.id" }}
"#,
        port = pg.port
    )
}

/// The read model's customer rows and order view, and the same computed from the store.
async fn compare(store: &tokio_postgres::Client, rm: &tokio_postgres::Client) {
    compare_customer_stats(store, rm).await;
    let want_orders: Vec<(i32, String, String)> = store
        .query(
            "SELECT id, status, total::text FROM orders ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let got_orders: Vec<(i32, String, String)> = rm
        .query(
            "SELECT id, status, total::numeric(10,2)::text FROM order_view ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got_orders.len(), want_orders.len());
    assert_eq!(got_orders, want_orders);
}

/// The read model's customer rows, and the same computed from the store.
async fn compare_customer_stats(store: &tokio_postgres::Client, rm: &tokio_postgres::Client) {
    let want: BTreeMap<i32, (i64, String)> = store
        .query(
            "SELECT customer_id, count(*), sum(total)::text FROM orders GROUP BY customer_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let got: BTreeMap<i32, (i64, String)> = rm
        .query(
            "SELECT customer_id, orders::bigint, spent::numeric(12,2)::text FROM customer_stats WHERE orders > 0",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(got, want, "per-customer order count and total spent");
}

/// Transactions of ten order changes: inserts, total updates and deletes.
fn workload(db: tokio_postgres::Client, txs: usize, first_id: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ first_id;
        let mut next = first_id;
        for _ in 0..txs {
            let mut sql = String::from("BEGIN;");
            for _ in 0..10 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let customer = x % 50;
                match x % 10 {
                    0..=5 => {
                        next += 1;
                        sql.push_str(&format!(
                            "INSERT INTO orders VALUES ({next}, {customer}, 'placed', {}.{:02});",
                            x % 200,
                            x % 100
                        ));
                    }
                    6..=8 => sql.push_str(&format!(
                        "UPDATE orders SET total = total + 1.25, status = 'paid' WHERE id = {};",
                        x % (next + 1)
                    )),
                    _ => sql.push_str(&format!(
                        "DELETE FROM orders WHERE id = {};",
                        x % (next + 1)
                    )),
                }
            }
            // Each transaction ends with a change outside the orders subjects, so a
            // consumer filtering on them never sees the transaction's last event.
            sql.push_str("INSERT INTO audit (note) VALUES ('tx'); COMMIT;");
            db.batch_execute(&sql).await.unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_stays_exact_through_kill_9s_and_wait_sees_writes() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(STORE).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(READ_MODEL).await.unwrap();
    let metrics_port = free_port();
    let sections = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{}\"\nproject_listen = \"127.0.0.1:{metrics_port}\"\n",
        projection_toml(&pg, ""),
        free_port()
    );
    let (cfg, mut source, mut projector) = start_with_projector(
        &pg,
        &nats,
        dir.path(),
        &SourceSpec::new("store", "store")
            .tables(&["orders", "audit"])
            .sections(&sections),
    );
    let plog = dir.path().join("projection.log");

    // 5,000 transactions of 10 changes, and the projector killed along the way.
    let writer = workload(pg.client("store").await, 5_000, 0);
    let mut kills = 0;
    let started = Instant::now();
    while !writer.is_finished() || kills < 5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if kills < 8 {
            projector.kill9();
            kills += 1;
            projector = Tidemark::project(&cfg, &plog);
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the workload did not finish"
        );
    }
    writer.await.unwrap();
    assert!(kills >= 5);

    // Read-your-writes: after this write, wait returns only once the model has it.
    db.batch_execute("INSERT INTO orders VALUES (1000000, 7, 'placed', 99.99)")
        .await
        .unwrap();
    let lsn = current_lsn(&db).await.to_string();
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = tidemark_cmd(&[
        "wait",
        "--config",
        cfg_arg,
        "--projection",
        "customer_stats",
        "--lsn",
        &lsn,
        "--timeout",
        "60s",
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", projector.log());
    let seen = rm
        .query_opt("SELECT total::text FROM order_view WHERE id = 1000000", &[])
        .await
        .unwrap();
    assert_eq!(
        seen.map(|r| r.get::<_, String>(0)).as_deref(),
        Some("99.99")
    );
    compare(&db, &rm).await;
    // The projector's own metrics (on project_listen: `run` has `listen`).
    let (_, metrics) = http_get(metrics_port, "/metrics").await;
    assert!(
        metrics.contains("tidemark_projection_applied_seq{projection=\"customer_stats\"}")
            && metrics.contains(
                "tidemark_projection_events_applied_total{projection=\"customer_stats\"}"
            ),
        "{metrics}"
    );
    let (code, out, _) = tidemark_cmd(&["status", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("projection customer_stats  applied seq "),
        "{out}"
    );
    let log = projector.log();
    assert!(
        log.matches("projecting").count() >= 6,
        "restarted after each kill:\n{log}"
    );

    // A stopped projector: wait times out with a non-zero exit.
    projector.kill9();
    db.batch_execute("INSERT INTO orders VALUES (1000001, 7, 'placed', 1.00)")
        .await
        .unwrap();
    let lsn = current_lsn(&db).await.to_string();
    let (code, _, err) = tidemark_cmd(&[
        "wait",
        "--config",
        cfg_arg,
        "--projection",
        "customer_stats",
        "--lsn",
        &lsn,
        "--timeout",
        "1s",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("did not reach"), "{err}");
    assert!(source.is_running(), "{}", source.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_stops_the_projection_or_goes_to_the_dead_letter_subject() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(STORE).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(READ_MODEL).await.unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["orders", "audit"])
            .sections(&projection_toml(&pg, "")),
    );
    let mut source = Tidemark::run(&cfg, &dir.path().join("source.log"));
    source.wait_streaming();
    // Three transactions; the middle one breaks the read model's CHECK.
    for sql in [
        "INSERT INTO orders VALUES (1, 1, 'placed', 10.00)",
        "INSERT INTO orders VALUES (2, 1, 'placed', -5.00)",
        "INSERT INTO orders VALUES (3, 2, 'placed', 7.00)",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 3, Duration::from_secs(30), || source.log()).await;
    let events = read_stream(&nc, "STORE").await;
    let poison_id = events[1].body["id"].as_str().unwrap().to_string();

    // Without a dead-letter subject: the projection stops, naming the event.
    let mut projector = Tidemark::project(&cfg, &dir.path().join("p1.log"));
    let status = projector.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", projector.log());
    let log = projector.log();
    assert!(
        log.contains(&format!("cannot apply event {poison_id}"))
            && log.contains("subject store.orders.created")
            && log.contains("order_view_total_check"),
        "{log}"
    );
    // Nothing of the poison event's transaction is applied; the one before it is.
    let n: i64 = rm
        .query_one("SELECT count(*) FROM order_view", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // With a dead-letter subject: set aside with the reason, and the rest applies.
    dead_letter_stream(&nc).await;
    let cfg2 = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["orders", "audit"])
            .sections(&projection_toml(
                &pg,
                "dead_letter = \"deadletter.customer_stats\"",
            )),
    );
    let projector = Tidemark::project(&cfg2, &dir.path().join("p2.log"));
    wait_stream_count(&nc, "DEAD", 1, Duration::from_secs(60), || projector.log()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = rm
            .query_one("SELECT count(*) FROM order_view", &[])
            .await
            .unwrap()
            .get(0);
        if n == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", projector.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dl = read_stream(&nc, "DEAD").await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].body["id"], poison_id.as_str());
    let reason = dl[0]
        .headers
        .iter()
        .find(|(k, _)| k == "Tidemark-Reason")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(reason.contains("order_view_total_check"), "{reason}");
    let stats: (i64, String) = rm
        .query_one(
            "SELECT sum(orders)::bigint, sum(spent)::numeric(10,2)::text FROM customer_stats",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    // The poison event's transaction held only it: orders 1 and 3 are counted.
    assert_eq!(stats, (2, "17.00".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_swaps_in_an_identical_model_that_readers_never_see_partial() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(STORE).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(READ_MODEL).await.unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["orders", "audit"])
            .sections(&projection_toml(
                &pg,
                "tables = [\"customer_stats\", \"order_view\"]",
            )),
    );
    let cfg_arg = cfg.to_str().unwrap().to_string();
    let mut source = Tidemark::run(&cfg, &dir.path().join("source.log"));
    source.wait_streaming();
    let projector = Tidemark::project(&cfg, &dir.path().join("projection.log"));
    workload(pg.client("store").await, 1_500, 0).await.unwrap();
    let wait = |lsn: String| {
        let cfg_arg = cfg_arg.clone();
        move || {
            tidemark_cmd(&[
                "wait",
                "--config",
                &cfg_arg,
                "--projection",
                "customer_stats",
                "--lsn",
                &lsn,
                "--timeout",
                "60s",
            ])
        }
    };
    let (code, out, err) = wait(current_lsn(&db).await.to_string())();
    assert_eq!(code, 0, "{out}{err}\n{}", projector.log());
    compare(&db, &rm).await;

    // A reader keeps reading the model while it is rebuilt and swapped.
    let snapshot = "SELECT count(*), coalesce(sum(orders), 0)::bigint, coalesce(sum(spent), 0)::text, \
                    (SELECT count(*) FROM order_view) FROM customer_stats";
    let read = |r: tokio_postgres::Row| -> (i64, i64, String, i64) {
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    let expected = read(rm.query_one(snapshot, &[]).await.unwrap());
    assert!(expected.0 > 0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let client = pg.client("readmodel").await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.query_one(snapshot, &[]).await.unwrap();
                samples.push((
                    r.get::<_, i64>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, String>(2),
                    r.get::<_, i64>(3),
                ));
            }
            samples
        })
    };
    let (code, out, err) =
        tidemark_cmd(&["project", "rebuild", "customer_stats", "--config", &cfg_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("rebuilt customer_stats"), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = reader.await.unwrap();
    assert!(samples.len() > 10, "{} samples", samples.len());
    for s in &samples {
        assert_eq!(
            s, &expected,
            "a reader saw a model that was not the whole one"
        );
    }
    compare(&db, &rm).await;
    // No shadow or old schema is left behind.
    let leftovers: i64 = rm
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tidemark_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0);

    // The live projector goes on from the swapped-in checkpoint: exact, nothing twice.
    workload(pg.client("store").await, 300, 500_000)
        .await
        .unwrap();
    let (code, out, err) = wait(current_lsn(&db).await.to_string())();
    assert_eq!(code, 0, "{out}{err}\n{}", projector.log());
    compare(&db, &rm).await;
    let mut projector = projector;
    assert!(projector.is_running(), "{}", projector.log());
}

/// A stream that never goes quiet: `project rebuild` still swaps (it takes the lock
/// once nearly caught up, not once the stream is idle), the live projection waits only
/// for the last events, and the model is exact afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_steady_writes_swaps_and_the_live_model_goes_on() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(STORE).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(READ_MODEL).await.unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["orders", "audit"])
            .sections(&projection_toml(
                &pg,
                "tables = [\"customer_stats\", \"order_view\"]",
            )),
    );
    let cfg_arg = cfg.to_str().unwrap().to_string();
    let mut source = Tidemark::run(&cfg, &dir.path().join("source.log"));
    source.wait_streaming();
    let mut projector = Tidemark::project(&cfg, &dir.path().join("projection.log"));
    workload(pg.client("store").await, 2_000, 0).await.unwrap();

    // A writer that never pauses for long: a transaction of 11 changes every 50 ms
    // (about 200 changes/s, as the issue asks; a rebuild slower than the writes could
    // never catch up, lock or not).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, stop) = (pg.client("store").await, stop.clone());
        tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut sql = String::from("BEGIN;");
                for i in 0..10 {
                    let id = 10_000_000 + round * 10 + i;
                    sql.push_str(&format!(
                        "INSERT INTO orders VALUES ({id}, {}, 'placed', 1.50);",
                        id % 50
                    ));
                }
                sql.push_str("INSERT INTO audit (note) VALUES ('steady'); COMMIT;");
                client.batch_execute(&sql).await.unwrap();
                round += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            round
        })
    };
    let rebuilt = {
        let cfg_arg = cfg_arg.clone();
        tokio::task::spawn_blocking(move || {
            tidemark_cmd_within(
                &["project", "rebuild", "customer_stats", "--config", &cfg_arg],
                Duration::from_secs(120),
            )
        })
        .await
        .unwrap()
    };
    // The live model moves on after the swap while the writes go on (it commits at
    // least every second while behind; 30 s leaves room for a loaded machine).
    let after_swap = live_orders(&rm).await;
    let moved_by = Instant::now() + Duration::from_secs(30);
    let mut later = live_orders(&rm).await;
    while later <= after_swap && Instant::now() < moved_by {
        tokio::time::sleep(Duration::from_millis(200)).await;
        later = live_orders(&rm).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    let Some((code, out, err)) = rebuilt else {
        panic!(
            "the rebuild did not swap within 120 s of steady writes ({rounds} writer rounds)\n{}",
            projector.log()
        );
    };
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("rebuilt customer_stats"), "{err}");
    assert!(
        later > after_swap,
        "the live model did not move on within 30 s of the swap ({after_swap} -> {later} orders counted)\n{}",
        projector.log()
    );
    let (code, out, err) = tidemark_cmd(&[
        "wait",
        "--config",
        &cfg_arg,
        "--projection",
        "customer_stats",
        "--lsn",
        &current_lsn(&db).await.to_string(),
        "--timeout",
        "60s",
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", projector.log());
    compare(&db, &rm).await;
    assert!(projector.is_running(), "{}", projector.log());
}

/// The orders the read model has counted.
async fn live_orders(rm: &tokio_postgres::Client) -> i64 {
    rm.query_one(
        "SELECT coalesce(sum(orders), 0)::bigint FROM customer_stats",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The Rust API's view of the read model: order count and spent per customer.
struct Stats;

impl tidemark::projection::Apply for Stats {
    type Error = tokio_postgres::Error;

    async fn apply(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[tidemark::projection::Event],
    ) -> Result<(), Self::Error> {
        for e in events {
            let (after, before) = (&e.data["after"], &e.data["before"]);
            let num = |v: &serde_json::Value| v.as_str().unwrap_or("0").to_string();
            let customer =
                |v: &serde_json::Value| v["customer_id"].as_i64().unwrap_or_default() as i32;
            match e.event_type.as_str() {
                "orders.created" => {
                    tx.execute(
                        "INSERT INTO customer_stats VALUES ($1, 1, $2::text::numeric) ON CONFLICT (customer_id) \
                         DO UPDATE SET orders = customer_stats.orders + 1, spent = customer_stats.spent + EXCLUDED.spent",
                        &[&customer(after), &num(&after["total"])],
                    )
                    .await?;
                }
                "orders.updated" => {
                    tx.execute(
                        "UPDATE customer_stats SET spent = spent - $2::text::numeric + $3::text::numeric WHERE customer_id = $1",
                        &[&customer(after), &num(&before["total"]), &num(&after["total"])],
                    )
                    .await?;
                }
                "orders.deleted" => {
                    tx.execute(
                        "UPDATE customer_stats SET orders = orders - 1, spent = spent - $2::text::numeric WHERE customer_id = $1",
                        &[&customer(before), &num(&before["total"])],
                    )
                    .await?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_consumer_api_applies_exactly_once_across_restarts() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(STORE).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(READ_MODEL).await.unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").tables(&["orders", "audit"]),
    );
    let mut source = Tidemark::run(&cfg, &dir.path().join("source.log"));
    source.wait_streaming();
    let nc = nats.client().await;
    let start = || {
        let nc = nc.clone();
        let pg_port = pg.port;
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let (mut client, conn) = tokio_postgres::connect(
                    &format!("host=127.0.0.1 port={pg_port} user=postgres dbname=readmodel"),
                    tokio_postgres::NoTls,
                )
                .await
                .unwrap();
                tokio::spawn(conn);
                let consumer = tidemark::projection::Consumer::new(
                    nc,
                    "STORE",
                    "api_stats",
                    vec!["store.orders.>".into()],
                );
                consumer.run(&mut client, &mut Stats, cancel).await
            })
        };
        (cancel, task)
    };
    let writer = workload(pg.client("store").await, 1_000, 0);
    // Abort the consumer task (dropping its connection mid-transaction) three times.
    for _ in 0..3 {
        let (_, task) = start();
        tokio::time::sleep(Duration::from_millis(300)).await;
        task.abort();
        let _ = task.await;
    }
    writer.await.unwrap();
    let (cancel, task) = start();
    // Caught up when the checkpoint reaches the stream's end, and the end stays put.
    let js = async_nats::jetstream::new(nc.clone());
    let mut stable = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seq: Option<i64> = rm
            .query_opt(
                "SELECT stream_seq FROM tidemark_checkpoints WHERE projection = 'api_stats'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        let last = js
            .get_stream("STORE")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .last_sequence;
        if seq.is_some_and(|s| s as u64 >= last) {
            stable += 1;
            if stable >= 5 {
                break;
            }
        } else {
            stable = 0;
        }
        assert!(Instant::now() < deadline, "checkpoint {seq:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    task.await.unwrap().unwrap();
    compare_customer_stats(&db, &rm).await;
}

/// A KV read model applies a batch of events at once (different keys concurrently),
/// yet an event whose key cannot be made stops it with nothing after that event
/// written; with a dead-letter subject it is set aside and every other event applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_poison_event_in_a_batch_stops_before_anything_after_it() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(STORE).await.unwrap();
    let sections = |extra: &str| {
        format!(
            r#"
[[projection]]
name = "status_kv"
source = "store"
kv_bucket = "BY_STATUS"
{extra}

[[projection.on]]
type = "orders.created"
kv = "put"
key = "order.{{data.after.status}}"
value = {{ id = "data.after.id" }}
"#
        )
    };
    let spec = SourceSpec::new("store", "store").tables(&["orders", "audit"]);
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &spec.clone().sections(&sections("")),
    );
    let mut source = Tidemark::run(&cfg, &dir.path().join("source.log"));
    source.wait_streaming();
    // One transaction of 400 orders; the 200th's status is empty, and a key cannot
    // end in the template's dot (any other value is escaped into a valid key).
    db.batch_execute(
        "INSERT INTO orders SELECT g, 1, CASE WHEN g = 200 THEN '' ELSE 's' || g END, 1 \
         FROM generate_series(1, 400) g",
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 400, Duration::from_secs(60), || source.log()).await;
    let events = read_stream(&nc, "STORE").await;
    let poison = events
        .iter()
        .find(|e| e.body["data"]["after"]["id"] == 200)
        .expect("the 200th order's event");
    let poison_id = poison.body["id"].as_str().unwrap().to_string();
    let js = async_nats::jetstream::new(nc.clone());
    let keys = async || -> std::collections::BTreeSet<String> {
        let Ok(kv) = js.get_key_value("BY_STATUS").await else {
            return Default::default();
        };
        let Ok(keys) = kv.keys().await else {
            return Default::default();
        };
        use futures_util::StreamExt;
        keys.filter_map(|k| async move { k.ok() }).collect().await
    };
    let want = |ids: &mut dyn Iterator<Item = u32>| -> std::collections::BTreeSet<String> {
        ids.map(|g| format!("order.s{g}")).collect()
    };

    let mut projector = Tidemark::project(&cfg, &dir.path().join("p1.log"));
    let status = projector.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", projector.log());
    let log = projector.log();
    assert!(
        log.contains(&format!("cannot apply event {poison_id}"))
            && log.contains("\"order.\" is not a valid KV key"),
        "{log}"
    );
    assert_eq!(keys().await, want(&mut (1..200)), "{log}");

    dead_letter_stream(&nc).await;
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &spec.sections(&sections("dead_letter = \"deadletter.status_kv\"")),
    );
    let projector = Tidemark::project(&cfg, &dir.path().join("p2.log"));
    let all = want(&mut (1..=400).filter(|g| *g != 200));
    wait_until(
        "every other order written",
        Duration::from_secs(60),
        || async { keys().await == all },
    )
    .await;
    let dl = read_stream(&nc, "DEAD").await;
    assert_eq!(dl.len(), 1, "{}", projector.log());
    assert_eq!(dl[0].body["id"], poison_id.as_str());
    drop(source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_read_model_stays_exact_through_kill_9s() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(STORE).await.unwrap();
    let sections = r#"
[[projection]]
name = "order_kv"
source = "store"
kv_bucket = "ORDERS_VIEW"

[[projection.on]]
type = "orders.created"
kv = "put"
key = "order.{data.after.id}"
value = { customer = "data.after.customer_id", status = "data.after.status", total = "data.after.total" }

[[projection.on]]
type = "orders.updated"
kv = "merge"
key = "order.{data.after.id}"
value = { status = "data.after.status", total = "data.after.total" }

[[projection.on]]
type = "orders.deleted"
kv = "delete"
key = "order.{data.key.id}"
"#;
    let (cfg, _source, mut projector) = start_with_projector(
        &pg,
        &nats,
        dir.path(),
        &SourceSpec::new("store", "store")
            .tables(&["orders", "audit"])
            .sections(sections),
    );
    let plog = dir.path().join("projection.log");
    let writer = workload(pg.client("store").await, 1_500, 0);
    let mut kills = 0;
    while !writer.is_finished() || kills < 5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if kills < 6 {
            projector.kill9();
            kills += 1;
            projector = Tidemark::project(&cfg, &plog);
        }
    }
    writer.await.unwrap();
    let lsn = current_lsn(&db).await.to_string();
    let (code, out, err) = tidemark_cmd(&[
        "wait",
        "--config",
        cfg.to_str().unwrap(),
        "--projection",
        "order_kv",
        "--lsn",
        &lsn,
        "--timeout",
        "60s",
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", projector.log());

    let nc = nats.client().await;
    let js = async_nats::jetstream::new(nc);
    let got = kv_orders(&js, "ORDERS_VIEW").await;
    let want = store_orders(&db).await;
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    assert!(projector.log().matches("projecting into KV").count() >= 6);

    // Rebuild into a new bucket while the live projection runs; the swap names it, and
    // the live projector follows it.
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = tidemark_cmd(&["project", "rebuild", "order_kv", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}{err}");
    let bucket = tidemark::projection::kv_bucket(&js, "order_kv", "ORDERS_VIEW").await;
    assert_ne!(bucket, "ORDERS_VIEW");
    assert_eq!(kv_orders(&js, &bucket).await, want);
    workload(pg.client("store").await, 200, 500_000)
        .await
        .unwrap();
    let lsn = current_lsn(&db).await.to_string();
    let (code, out, err) = tidemark_cmd(&[
        "wait",
        "--config",
        cfg_arg,
        "--projection",
        "order_kv",
        "--lsn",
        &lsn,
        "--timeout",
        "60s",
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", projector.log());
    let want = store_orders(&db).await;
    assert_eq!(kv_orders(&js, &bucket).await, want);
}

/// Every order in a KV bucket: id -> (customer, status, total).
async fn kv_orders(
    js: &async_nats::jetstream::Context,
    bucket: &str,
) -> BTreeMap<i32, (i64, String, String)> {
    kv_values(js, bucket)
        .await
        .into_iter()
        .map(|(k, v)| {
            let id: i32 = k.trim_start_matches("order.").parse().unwrap();
            let customer = v["customer"].as_i64().unwrap();
            let status = v["status"].as_str().unwrap().to_string();
            (
                id,
                (customer, status, v["total"].as_str().unwrap().to_string()),
            )
        })
        .collect()
}

/// The same from the store.
async fn store_orders(db: &tokio_postgres::Client) -> BTreeMap<i32, (i64, String, String)> {
    db.query(
        "SELECT id, customer_id, status, total::text FROM orders",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), (r.get::<_, i32>(1) as i64, r.get(2), r.get(3))))
    .collect()
}

/// A projection with one non-idempotent handler (a counter) on `t.created`.
fn counter_toml(pg: &PgServer) -> String {
    format!(
        r#"
[[projection]]
name = "counter"
source = "store"

[projection.postgres]
host = "127.0.0.1"
port = {port}
dbname = "readmodel"
user = "postgres"

[[projection.on]]
type = "t.created"
sql = "UPDATE counter SET n = n + 1, total = total + $1"
params = ["data.after.v"]

# A plain INSERT: an event applied twice would fail on the key (and stop the
# projection), so the count proves once. (A counter row updated 200,000 times in one
# database transaction is quadratic in Postgres itself: each update walks the row's
# versions, none of which can be pruned while the transaction is open.)
[[projection.on]]
type = "u.created"
sql = "INSERT INTO items (id, v) VALUES ($1, $2)"
params = ["data.after.id", "data.after.v"]
"#,
        port = pg.port
    )
}

async fn items(rm: &tokio_postgres::Client) -> (i64, i64) {
    let row = rm
        .query_one(
            "SELECT count(*), coalesce(sum(v), 0)::bigint FROM items",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

const COUNTER_MODEL: &str = "CREATE TABLE counter (n bigint NOT NULL, total bigint NOT NULL);
INSERT INTO counter VALUES (0, 0);
CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);";

const COUNTER_STORE: &str = "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
CREATE TABLE u (id int PRIMARY KEY, v int NOT NULL);";

async fn counter(rm: &tokio_postgres::Client) -> (i64, i64) {
    let row = rm
        .query_one("SELECT n, total FROM counter", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Regression (issue 15): one source transaction larger than the durable consumer's
/// unacked limit stalled the read model forever, in silence, and one slower than the
/// ack wait applied its redelivered part twice. A 25,000-row transaction and a
/// 1,000,000-row one each apply exactly once, atomically, with bounded memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_source_transactions_apply_once_and_whole() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(COUNTER_STORE).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(COUNTER_MODEL).await.unwrap();
    let (_cfg, source, projector) = start_with_projector(
        &pg,
        &nats,
        dir.path(),
        &SourceSpec::new("store", "store").sections(&counter_toml(&pg)),
    );
    db.batch_execute("INSERT INTO t SELECT g, 1 FROM generate_series(1, 25000) g")
        .await
        .unwrap();
    let want = (25_000, 25_000);
    wait_until(
        "the 25,000-row transaction applied",
        Duration::from_secs(120),
        || async { counter(&rm).await == want },
    )
    .await;
    // The read model never shows part of a transaction: a reader polling while the
    // next large one applies sees either all of it or none.
    db.batch_execute("INSERT INTO u SELECT g, 2 FROM generate_series(1, 1000000) g")
        .await
        .unwrap();
    let want = (1_000_000, 2_000_000);
    let deadline = Instant::now() + Duration::from_secs(1500);
    loop {
        let got = items(&rm).await;
        assert!(
            got == (0, 0) || got == want,
            "a part of a transaction is visible: {got:?}\n{}",
            projector.log()
        );
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not applied: {got:?}\n{}",
            projector.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss = projector.peak_rss_bytes().unwrap_or(0);
    println!(
        "projection peak RSS over a 1,000,000-row transaction: {} MiB",
        rss / (1 << 20)
    );
    assert!(rss > 0 && rss < 200 << 20, "peak RSS {rss}");
    // Nothing more arrives, nothing is applied again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(items(&rm).await, want);
    assert_eq!(counter(&rm).await, (25_000, 25_000));
    drop(source);
}

/// A source killed mid-transaction (events published as they arrive, not atomic)
/// leaves the projection holding part of a transaction; the rest comes after a pause
/// longer than any ack wait. Each event still applies exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_killed_mid_transaction_and_back_later_applies_each_event_once() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(COUNTER_STORE).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(COUNTER_MODEL).await.unwrap();
    // A small window, so the source is well inside the transaction when killed.
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .sections(&counter_toml(&pg))
            .set("publish_window", 16),
    );
    let slog = dir.path().join("source.log");
    let mut source = Tidemark::run(&cfg, &slog);
    source.wait_streaming();
    // A one-row transaction, then the large one: the projector, started once the
    // source is gone, reads the first with more waiting, so it does not commit there
    // and holds both in one open transaction. Quiet in the middle of the second, it
    // must not commit at the first's end with part of the second applied.
    db.batch_execute("INSERT INTO u VALUES (60001, 7)")
        .await
        .unwrap();
    db.batch_execute("INSERT INTO u SELECT g, 3 FROM generate_series(1, 60000) g")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 5_000, Duration::from_secs(60), || {
        source.log()
    })
    .await;
    source.kill9();
    let stored = stream_count(&nc, "STORE").await;
    assert!(stored < 60_001, "killed too late: {stored} stored");
    let plog = dir.path().join("projection.log");
    let mut projector = Tidemark::project(&cfg, &plog);
    // 60 s in all, twice a durable consumer's 30 s ack wait: nothing may be
    // redelivered into the open transaction meanwhile; and a kill -9 of the projector
    // half way, which must find nothing of the open transaction committed.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        items(&rm).await,
        (0, 0),
        "a part of the transaction is visible\n{}",
        projector.log()
    );
    projector.kill9();
    let projector = Tidemark::project(&cfg, &plog);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        items(&rm).await,
        (0, 0),
        "a part of the transaction is visible\n{}",
        projector.log()
    );
    let mut source = Tidemark::run(&cfg, &slog);
    wait_until(
        "the transaction applied",
        Duration::from_secs(120),
        || async { items(&rm).await == (60_001, 180_007) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(items(&rm).await, (60_001, 180_007));
    assert!(
        !projector.log().contains("cannot apply"),
        "{}",
        projector.log()
    );
    source.kill9();
}

/// A message in the stream that is not a tidemark event stops the projection naming
/// its sequence and the reason; it is never applied as an empty event or skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_stops_the_projection_named() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(COUNTER_STORE).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(COUNTER_MODEL).await.unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").sections(&counter_toml(&pg)),
    );
    let mut source = Tidemark::run(&cfg, &dir.path().join("source.log"));
    source.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (1, 5)")
        .await
        .unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || source.log()).await;
    source.kill9();
    // A foreign write on a subject the projection reads.
    let js = async_nats::jetstream::new(nc.clone());
    js.publish("store.t.created", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut projector = Tidemark::project(&cfg, &dir.path().join("projection.log"));
    let status = projector.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{}", projector.log());
    let log = projector.log();
    assert!(log.contains("stream sequence 2"), "{log}");
    assert!(log.contains("not a JSON event"), "{log}");
    assert_eq!(counter(&rm).await, (1, 5), "the event before it is applied");
}

/// A read model far behind the stream moves on for its readers while it catches up:
/// the engine commits at a source transaction's end once its database transaction is
/// a second old, not only when caught up or every few thousand events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_catching_up_shows_progress_every_second() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(COUNTER_STORE).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(COUNTER_MODEL).await.unwrap();
    // A slow handler: about 5 ms an event, so 1,500 events take several seconds.
    let slow = counter_toml(&pg).replace(
        "sql = \"UPDATE counter SET n = n + 1, total = total + $1\"",
        "sql = \"UPDATE counter SET n = n + 1, total = total + $1 FROM pg_sleep(0.005)\"",
    );
    assert!(slow.contains("pg_sleep"));
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store").sections(&slow),
    );
    let mut source = Tidemark::run(&cfg, &dir.path().join("source.log"));
    source.wait_streaming();
    const TXS: i64 = 1_500;
    let mut sql = String::new();
    for i in 1..=TXS {
        sql.push_str(&format!("BEGIN; INSERT INTO t VALUES ({i}, 1); COMMIT;"));
    }
    db.batch_execute(&sql).await.unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", TXS as u64, Duration::from_secs(60), || {
        source.log()
    })
    .await;
    let projector = Tidemark::project(&cfg, &dir.path().join("projection.log"));
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (n, total) = counter(&rm).await;
        assert_eq!(n, total, "each event counts once");
        if n == TXS {
            break;
        }
        if n > 0 {
            seen.insert(n);
        }
        assert!(
            Instant::now() < deadline,
            "not caught up: {n} of {TXS}\n{}",
            projector.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.len() >= 3,
        "the read model showed {seen:?} on its way to {TXS}: it should commit every second while behind\n{}",
        projector.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(counter(&rm).await, (TXS, TXS));
    source.kill9();
}

/// A projection into the `readmodel` database: its header and connection, before its
/// handlers.
fn rm_projection(pg: &PgServer, name: &str) -> String {
    format!(
        "[[projection]]\nname = \"{name}\"\nsource = \"store\"\n\n[projection.postgres]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"readmodel\"\nuser = \"postgres\"\n",
        pg.port
    )
}

/// Waits until each named projection has applied everything the store committed so
/// far (`tidemark wait`, up to a minute each).
async fn wait_applied(
    db: &tokio_postgres::Client,
    cfg: &std::path::Path,
    names: &[&str],
    log: impl Fn() -> String,
) {
    let lsn = current_lsn(db).await.to_string();
    for name in names {
        let (code, out, err) = tidemark_cmd(&[
            "wait",
            "--config",
            cfg.to_str().unwrap(),
            "--projection",
            name,
            "--lsn",
            &lsn,
            "--timeout",
            "60s",
        ]);
        assert_eq!(code, 0, "{out}{err}\n{}", log());
    }
}

/// The source `store` of `spec`, streaming, and the projector of its projections
/// (logging to `projection.log` in `dir`): (config, source, projector).
fn start_with_projector(
    pg: &PgServer,
    nats: &NatsServer,
    dir: &std::path::Path,
    spec: &SourceSpec,
) -> (std::path::PathBuf, Tidemark, Tidemark) {
    let cfg = write_config(dir, pg, nats, spec);
    let mut source = Tidemark::run(&cfg, &dir.join("source.log"));
    source.wait_streaming();
    let projector = Tidemark::project(&cfg, &dir.join("projection.log"));
    (cfg, source, projector)
}

/// Every value of a KV bucket, by key.
async fn kv_values(
    js: &async_nats::jetstream::Context,
    bucket: &str,
) -> BTreeMap<String, serde_json::Value> {
    use futures_util::TryStreamExt;
    let kv = js.get_key_value(bucket).await.unwrap();
    let keys: Vec<String> = kv.keys().await.unwrap().try_collect().await.unwrap();
    let mut out = BTreeMap::new();
    for k in keys {
        if let Some(v) = kv.get(k.as_str()).await.unwrap() {
            out.insert(k, serde_json::from_slice(&v).unwrap());
        }
    }
    out
}

/// Columns of every kind the source converts, with the values that are hardest to
/// carry: (name, type).
const VALUE_COLUMNS: &[(&str, &str)] = &[
    ("f8", "float8"),
    ("f4", "float4"),
    ("n", "numeric"),
    ("b", "bigint"),
    ("j", "jsonb"),
    ("ai", "int[]"),
    ("at", "text[]"),
    ("am", "int[]"),
    ("ab", "bytea[]"),
    ("abx", "box[]"),
    ("ac", "pair[]"),
    ("r", "int4range"),
    ("rt", "tstzrange"),
    ("mr", "int4multirange"),
    ("ar", "numrange[]"),
    ("by", "bytea"),
    ("pa", "pair"),
    ("mo", "mood"),
    ("dom", "positive"),
    ("p", "point"),
    ("l", "line"),
    ("ci", "circle"),
    ("ls", "lseg"),
    ("bx", "box"),
    ("pg", "polygon"),
    ("pt", "path"),
    ("iv", "interval"),
    ("tz", "timestamptz"),
    ("ttz", "timetz"),
    ("mn", "money"),
    ("js", "json"),
];

/// Rows written by hand (each a list of SQL values for `VALUE_COLUMNS`); 2,000 more
/// have random numbers.
#[rustfmt::skip]
const VALUE_ROWS: &[&[&str]] = &[
    &[
        "1e100", "3.4e38", "0", "9007199254740993",
        "'{\"a\": -0, \"big\": 123456789012345678901234567890}'", "'{1,NULL,3}'",
        "'{\"a b\",\"c,d\",\"e\\\"f\",\"g\\\\h\",NULL,\"NULL\",\"\",\"{x}\"}'",
        "'{{1,2},{3,4}}'", "ARRAY['\\x00ff'::bytea, NULL, '']",
        "ARRAY[box '((1,1),(0,0))', box '((2,3),(1,1))']",
        "ARRAY[ROW('x \"y\"', '{1,2}')::pair, NULL, ROW(NULL, '{}')::pair]", "'[1,5)'",
        "'(\"2024-01-01 00:00:00+00\",)'", "'{[1,3),[7,9]}'",
        "ARRAY['[1.5,2.5]'::numrange, 'empty']", "'\\x0102ff'", "ROW('(a),\\ b', '{}')::pair",
        "'happy'", "7", "'(1.5,2)'", "'{1,-1,0}'", "'<(1,2),3>'", "'[(0,0),(1,1)]'",
        "'(3,4),(1,2)'", "'((0,0),(1,0),(1,1))'", "'[(0,0),(1,0),(2,2)]'",
        "'1 year 2 mons 3 days 04:05:06.5'", "'2024-02-29 13:14:15.123456+02'",
        "'23:59:59.999-05:30'", "'-1234.56'", "'{\"b\": 1, \"a\": [1.10, 2]}'",
    ],
    &[
        "5e-324", "1.4e-45", "-0.0", "-9223372036854775808", "'[1e-7, 123e4, 1e400]'", "'{}'",
        "'{}'", "'{{NULL}}'", "'{}'", "'{}'", "'{}'", "'empty'", "'(,)'", "'{}'", "'{}'", "''",
        "ROW('', NULL)::pair", "'sad'", "1", "'(0,0)'", "'{0,1,0}'", "'<(0,0),0>'",
        "'[(1,1),(1,1)]'", "'(0,0),(0,0)'", "'((0,0))'", "'((0,0),(1,1))'", "'-1 days'",
        "'infinity'", "'00:00:00+14'", "'0'", "'[]'",
    ],
    &[
        "'-0'", "'NaN'", "'NaN'", "9223372036854775807", "'{\"n\": null}'", "NULL", "NULL",
        "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL",
        "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "'-infinity'",
        "NULL", "NULL", "'[null]'",
    ],
    // A JSON null is not SQL NULL.
    &[
        "1", "1", "1", "1", "'null'", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL",
        "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL",
        "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "NULL", "' null '",
    ],
];

/// Values reach read models exactly as the store holds them, in a SQL read model and
/// a KV one. Numbers: float8 and float4 (a tenth of random doubles came out one unit
/// in the last place off: JSON numbers were read to the nearest double only
/// approximately), jsonb numbers beyond a double's precision or range (1e400 stopped
/// every projection), -0, integers past 2^53. And every kind of value the source
/// writes as JSON: arrays (of any dimension, of bytea, boxes, composites, ranges),
/// ranges, multiranges, composites, bytea, the geometric types; arrays, ranges and
/// geometric values stopped a SQL read model ("malformed array literal"), and bytea
/// was stored as its base64 text. A JSON `null` in json/jsonb stays one (it became
/// SQL NULL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_get_every_value_exactly() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    // Multiranges came in PostgreSQL 14: before, that column is text.
    let columns: Vec<String> = VALUE_COLUMNS
        .iter()
        .map(|(n, t)| match *t {
            "int4multirange" if pg_major() < 14 => format!("{n} text"),
            t => format!("{n} {t}"),
        })
        .collect();
    let schema = format!(
        "CREATE TYPE pair AS (a text, b int[]);
         CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN positive AS int CHECK (VALUE > 0);
         CREATE TABLE m (id int PRIMARY KEY, {})",
        columns.join(", ")
    );
    db.batch_execute(&schema).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(&schema).await.unwrap();
    let names: Vec<&str> = VALUE_COLUMNS.iter().map(|(n, _)| *n).collect();
    let sql_columns: Vec<String> = std::iter::once("id")
        .chain(names.iter().copied())
        .map(|n| format!("{n} = \"data.after.{n}\""))
        .collect();
    let sections = format!(
        r#"
{header_0}

[[projection.on]]
type = ["m.created", "m.updated"]
upsert = "m"
key = ["id"]
columns = {{ {sql_columns} }}

[[projection]]
name = "m_kv"
source = "store"
kv_bucket = "M_VIEW"

[[projection.on]]
type = ["m.created", "m.updated"]
kv = "put"
key = "m.{{data.after.id}}"
value = {{ f8 = "data.after.f8", f4 = "data.after.f4", b = "data.after.b", j = "data.after.j" }}
"#,
        header_0 = rm_projection(&pg, "m_sql"),
        sql_columns = sql_columns.join(", ")
    );
    let (cfg, source, projector) = start_with_projector(
        &pg,
        &nats,
        dir.path(),
        &SourceSpec::new("store", "store")
            .tables(&["m"])
            .sections(&sections),
    );
    let mut writes = String::from(
        "INSERT INTO m (id, f8, f4, n, b, j) SELECT g, random() * 1000, (random() * 1000)::float4,
           (random() * 1e6)::numeric, (random() * 9e18)::bigint,
           jsonb_build_object('x', random() * 1000, 'list', jsonb_build_array(random(), -0.0, 2.50))
         FROM generate_series(1, 2000) g;
         UPDATE m SET f8 = f8 / 3, j = j || jsonb_build_object('y', random()) WHERE id % 3 = 0;",
    );
    for (i, row) in VALUE_ROWS.iter().enumerate() {
        assert_eq!(row.len(), names.len());
        writes.push_str(&format!(
            "INSERT INTO m (id, {}) VALUES ({}, {});",
            names.join(", "),
            2001 + i,
            row.join(", ")
        ));
    }
    // And a JSON null written by an UPDATE, over a value and over SQL NULL.
    writes.push_str("UPDATE m SET j = 'null', js = 'null' WHERE id = 2003;");
    db.batch_execute(&writes).await.unwrap();
    wait_applied(&db, &cfg, &["m_sql", "m_kv"], || projector.log()).await;
    // Each value as Postgres prints it (shortest exact text for floats; jsonb numbers
    // as the numeric they are). A json value is compared as jsonb: the source sends
    // it without its spaces.
    let texts: Vec<String> = names
        .iter()
        .map(|n| match *n {
            "js" => "js::jsonb::text".to_string(),
            n => format!("{n}::text"),
        })
        .collect();
    let dump = format!("SELECT id, {} FROM m ORDER BY id", texts.join(", "));
    let text = |rows: Vec<tokio_postgres::Row>| -> Vec<Vec<(String, Option<String>)>> {
        rows.iter()
            .map(|r| {
                let mut v = vec![("id".to_string(), Some(r.get::<_, i32>(0).to_string()))];
                v.extend(
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (n.to_string(), r.get::<_, Option<String>>(i + 1))),
                );
                v
            })
            .collect()
    };
    let want = text(db.query(&dump, &[]).await.unwrap());
    let got = text(rm.query(&dump, &[]).await.unwrap());
    assert_eq!(want.len(), 2000 + VALUE_ROWS.len());
    assert_eq!(got.len(), want.len());
    let differ: Vec<_> = want
        .iter()
        .zip(&got)
        .flat_map(|(w, g)| w.iter().zip(g).filter(|(a, b)| a != b))
        .take(5)
        .collect();
    assert!(
        differ.is_empty(),
        "the SQL read model differs from the store (store, read model): {differ:?}"
    );

    // The KV values, compared by Postgres: each value's JSON text read as json (its
    // numbers' text as written), cast as the store's column types.
    let js = async_nats::jetstream::new(nats.client().await);
    let values = kv_values(&js, "M_VIEW").await;
    assert_eq!(values.len(), want.len());
    let mut wrong = Vec::new();
    for (k, v) in values {
        // Read with arbitrary_precision, a value's numbers keep their text.
        let v = v.to_string();
        let id: i32 = k.trim_start_matches("m.").parse().unwrap();
        let same: bool = db
            .query_one(
                "SELECT (($2::text::json ->> 'f8')::float8::text IS NOT DISTINCT FROM f8::text)
                    AND (($2::text::json ->> 'f4')::float4::text IS NOT DISTINCT FROM f4::text)
                    AND (($2::text::json ->> 'b')::bigint IS NOT DISTINCT FROM b)
                    AND (($2::text::json -> 'j')::jsonb::text IS NOT DISTINCT FROM j::text)
                 FROM m WHERE id = $1",
                &[&id, &v],
            )
            .await
            .unwrap()
            .get(0);
        if !same {
            wrong.push((id, v));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} KV values differ from the store, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(3)]
    );
    drop(projector);
    drop(source);
}

/// An UPDATE that leaves a TOASTed value alone: Postgres does not send the value, and
/// the event lists it in `data.unchanged_toast`. An upsert read model and a KV one
/// keep the value they hold (they wrote NULL over it), and a `sql` handler, which
/// cannot, refuses the event naming the value and the fix rather than writing NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toasted_values_keep_their_value_in_read_models() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    let table = "CREATE TABLE t (id int PRIMARY KEY, big text, n int)";
    db.batch_execute(table).await.unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(&format!("{table}; CREATE TABLE log (id int, big text)"))
        .await
        .unwrap();
    let sections = format!(
        r#"
{header_1}

[[projection.on]]
type = ["t.created", "t.updated"]
upsert = "t"
key = ["id"]
columns = {{ id = "data.after.id", big = "data.after.big", n = "data.after.n" }}

# An old value the default replica identity does not send: NULL, and a warning.
[[projection.on]]
type = "t.updated"
sql = "UPDATE t SET n = n WHERE id = $1 AND $2::int IS NULL"
params = ["data.after.id", "data.before.n"]

{header_2}

[[projection.on]]
type = ["t.created", "t.updated"]
sql = "INSERT INTO log VALUES ($1, $2)"
params = ["data.after.id", "data.after.big"]

[[projection]]
name = "t_kv"
source = "store"
kv_bucket = "T_VIEW"

[[projection.on]]
type = ["t.created", "t.updated"]
kv = "put"
key = "t.{{data.after.id}}"
value = {{ big = "data.after.big", n = "data.after.n" }}
"#,
        header_1 = rm_projection(&pg, "t_sql"),
        header_2 = rm_projection(&pg, "t_log"),
    );
    let (cfg, source, projector) = start_with_projector(
        &pg,
        &nats,
        dir.path(),
        &SourceSpec::new("store", "store")
            .tables(&["t"])
            .sections(&sections),
    );
    let plog = dir.path().join("projection.log");
    // Values of 16,000 characters of md5 text: stored out of line (TOASTed).
    db.batch_execute(
        "INSERT INTO t SELECT g, (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 500) i), g
           FROM generate_series(1, 20) g;
         UPDATE t SET n = n + 100;
         UPDATE t SET big = 'small ' || id WHERE id % 2 = 0;
         UPDATE t SET n = n + 100;",
    )
    .await
    .unwrap();
    wait_applied(&db, &cfg, &["t_sql", "t_kv"], || projector.log()).await;
    // The events do leave the value out (or this test tests nothing).
    let nc = nats.client().await;
    let events = read_stream(&nc, "STORE").await;
    let left_out = events
        .iter()
        .filter(|e| e.body["data"]["unchanged_toast"] == serde_json::json!(["big"]))
        .count();
    assert_eq!(left_out, 20 + 10, "updates that left a TOASTed big alone");
    let dump = "SELECT id, md5(big), n FROM t ORDER BY id";
    let rows = |rows: Vec<tokio_postgres::Row>| -> Vec<(i32, Option<String>, i32)> {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    let want = rows(db.query(dump, &[]).await.unwrap());
    assert_eq!(want.len(), 20);
    assert_eq!(rows(rm.query(dump, &[]).await.unwrap()), want);
    let js = async_nats::jetstream::new(nc);
    let values = kv_values(&js, "T_VIEW").await;
    assert_eq!(values.len(), 20);
    for (id, big, n) in &want {
        let v = &values[&format!("t.{id}")];
        let md5: Option<String> = db
            .query_one("SELECT md5($1::text)", &[&v["big"].as_str()])
            .await
            .unwrap()
            .get(0);
        assert_eq!((&md5, v["n"].as_i64()), (big, Some(*n as i64)), "t.{id}");
    }
    // The sql handler stopped at the first update, with the fix; it wrote nothing
    // of that source transaction.
    let log = wait_for("t_log to stop", Duration::from_secs(30), || {
        std::fs::read_to_string(&plog)
            .ok()
            .filter(|l| l.contains("projection stopped name=t_log"))
    });
    assert!(
        log.contains("the event leaves data.after.big out")
            && log.contains("REPLICA IDENTITY FULL"),
        "{log}"
    );
    assert_eq!(
        log.matches("does not carry this old value").count(),
        1,
        "warned once for data.before.n\n{log}"
    );
    assert!(log.contains("value=data.before.n"), "{log}");
    let logged: i64 = rm
        .query_one("SELECT count(*) FROM log WHERE big IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0, "a NULL written in place of a value left out");
    drop(projector);
    drop(source);
}

/// An UPDATE that changes a row's primary key (its event is `updated`, with the old
/// key in `before`): an upsert read model and a KV one move the row to its new key.
/// They kept it under the old key as well. With the default replica identity (`before`
/// holds the old key only when it changed) and with FULL (`before` is the whole row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_changed_by_an_update_moves_the_row_in_read_models() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    let tables = "CREATE TABLE a (id int, region text, n int, PRIMARY KEY (id, region));
                  CREATE TABLE b (id int PRIMARY KEY, n int);";
    db.batch_execute(&format!("{tables} ALTER TABLE b REPLICA IDENTITY FULL;"))
        .await
        .unwrap();
    let rm = pg.create_db("readmodel").await;
    rm.batch_execute(tables).await.unwrap();
    let mut sections = String::new();
    for (t, key, cols) in [
        (
            "a",
            r#"["id", "region"]"#,
            r#"id = "data.after.id", region = "data.key.region", n = "data.after.n""#,
        ),
        (
            "b",
            r#"["id"]"#,
            r#"id = "data.after.id", n = "data.after.n""#,
        ),
    ] {
        let delete_key = if t == "a" {
            r#"{ id = "data.key.id", region = "data.key.region" }"#
        } else {
            r#"{ id = "data.key.id" }"#
        };
        let kv_key = if t == "a" {
            "a.{data.after.id}.{data.after.region}"
        } else {
            "b.{data.after.id}"
        };
        let kv_deleted = if t == "a" {
            "a.{data.key.id}.{data.key.region}"
        } else {
            "b.{data.key.id}"
        };
        sections.push_str(&format!(
            r#"
{header_3}

[[projection.on]]
type = ["{t}.created", "{t}.updated"]
upsert = "{t}"
key = {key}
columns = {{ {cols} }}

[[projection.on]]
type = "{t}.deleted"
delete = "{t}"
key = {delete_key}

[[projection]]
name = "{t}_kv"
source = "store"
kv_bucket = "{upper}_VIEW"

[[projection.on]]
type = ["{t}.created", "{t}.updated"]
kv = "put"
key = "{kv_key}"
value = {{ n = "data.after.n" }}

[[projection.on]]
type = "{t}.deleted"
kv = "delete"
key = "{kv_deleted}"
"#,
            header_3 = rm_projection(&pg, &format!("{t}_sql")),
            upper = t.to_uppercase(),
        ));
    }
    let (cfg, source, projector) = start_with_projector(
        &pg,
        &nats,
        dir.path(),
        &SourceSpec::new("store", "store")
            .tables(&["a", "b"])
            .sections(&sections),
    );
    db.batch_execute(
        "INSERT INTO a SELECT g, CASE WHEN g % 3 = 0 THEN 'eu' ELSE 'us' END, g FROM generate_series(1, 30) g;
         INSERT INTO b SELECT g, g FROM generate_series(1, 30) g;
         UPDATE a SET id = id + 100 WHERE id % 2 = 0;
         UPDATE a SET region = 'apac', n = n + 1 WHERE id % 5 = 0;
         UPDATE a SET n = n + 1 WHERE id % 7 = 0;
         UPDATE b SET id = id + 100 WHERE id % 2 = 0;
         UPDATE b SET n = n + 1;
         DELETE FROM a WHERE id % 9 = 0;
         DELETE FROM b WHERE id % 9 = 0;",
    )
    .await
    .unwrap();
    wait_applied(&db, &cfg, &["a_sql", "a_kv", "b_sql", "b_kv"], || {
        projector.log()
    })
    .await;
    let js = async_nats::jetstream::new(nats.client().await);
    for (t, dump) in [
        ("a", "SELECT id || '.' || region, n FROM a ORDER BY 1"),
        ("b", "SELECT id::text, n FROM b ORDER BY 1"),
    ] {
        let rows = |rows: Vec<tokio_postgres::Row>| -> BTreeMap<String, i32> {
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        };
        let want = rows(db.query(dump, &[]).await.unwrap());
        assert!(want.len() > 20, "{want:?}");
        assert_eq!(rows(rm.query(dump, &[]).await.unwrap()), want, "table {t}");
        let got: BTreeMap<String, i32> = kv_values(&js, &format!("{}_VIEW", t.to_uppercase()))
            .await
            .into_iter()
            .map(|(k, v)| {
                let k = k.trim_start_matches(&format!("{t}.")).to_string();
                (k, v["n"].as_i64().unwrap() as i32)
            })
            .collect();
        assert_eq!(got, want, "KV of {t}");
    }
    drop(projector);
    drop(source);
}

/// `kv = "clear"` on a `truncated` event deletes the keys under its prefix, and only
/// those: a KV read model of a table that is truncated (alone, or with others in one
/// statement) holds what the table holds, across a kill -9 of the projector. A KV
/// read model could not follow a TRUNCATE before (no operation deleted more than one
/// key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_read_model_clears_a_truncated_tables_keys() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, n int); CREATE TABLE b (id int PRIMARY KEY, n int);",
    )
    .await
    .unwrap();
    let mut sections = String::from(
        r#"
[[projection]]
name = "ab_kv"
source = "store"
kv_bucket = "AB_VIEW"
"#,
    );
    for t in ["a", "b"] {
        sections.push_str(&format!(
            r#"
[[projection.on]]
type = ["{t}.created", "{t}.updated"]
kv = "put"
key = "{t}.{{data.after.id}}"
value = {{ n = "data.after.n" }}

[[projection.on]]
type = "{t}.deleted"
kv = "delete"
key = "{t}.{{data.key.id}}"

[[projection.on]]
type = "{t}.truncated"
kv = "clear"
key = "{t}."
"#
        ));
    }
    let (cfg, source, mut projector) = start_with_projector(
        &pg,
        &nats,
        dir.path(),
        &SourceSpec::new("store", "store")
            .tables(&["a", "b"])
            .sections(&sections),
    );
    let plog = dir.path().join("projection.log");
    let js = async_nats::jetstream::new(nats.client().await);
    let check = |projector_log: String| {
        let db = &db;
        let js = &js;
        async move {
            let want: BTreeMap<String, i64> = db
                .query(
                    "SELECT 'a.' || id, n::bigint FROM a UNION ALL SELECT 'b.' || id, n FROM b",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let got: BTreeMap<String, i64> = kv_values(js, "AB_VIEW")
                .await
                .into_iter()
                .map(|(k, v)| (k, v["n"].as_i64().unwrap()))
                .collect();
            assert_eq!(got, want, "{projector_log}");
        }
    };
    db.batch_execute(
        "INSERT INTO a SELECT g, g FROM generate_series(1, 300) g;
         INSERT INTO b SELECT g, g FROM generate_series(1, 50) g;
         TRUNCATE a;
         INSERT INTO a SELECT g, -g FROM generate_series(100, 120) g;
         UPDATE b SET n = n + 1 WHERE id < 10;",
    )
    .await
    .unwrap();
    wait_applied(&db, &cfg, &["ab_kv"], || projector.log()).await;
    check(projector.log()).await;
    // Killed -9 mid-batch: the events from its position apply again, the clear with
    // them; keys written after the clear are never cleared by it.
    db.batch_execute(
        "INSERT INTO a SELECT g, g FROM generate_series(1000, 1400) g;
         TRUNCATE a, b;
         INSERT INTO b SELECT g, g * 2 FROM generate_series(200, 260) g;
         INSERT INTO a VALUES (7, 7);",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    projector.kill9();
    let projector = Tidemark::project(&cfg, &plog);
    wait_applied(&db, &cfg, &["ab_kv"], || projector.log()).await;
    check(projector.log()).await;
    drop(projector);
    drop(source);
}

/// A KV key built from values NATS keys cannot hold (an email's `@`, a time's `:`,
/// spaces, dots at the ends, `=`, non-ASCII) is escaped, never poison: each value reads
/// back from its key, an UPDATE that changes one moves the entry, a DELETE removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_read_model_keys_any_value() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE people (email text PRIMARY KEY, n int)")
        .await
        .unwrap();
    let sections = r#"
[[projection]]
name = "people_kv"
source = "store"
kv_bucket = "PEOPLE"

[[projection.on]]
type = ["people.created", "people.updated", "people.read"]
kv = "put"
key = "person.{data.after.email}"
value = { n = "data.after.n" }

[[projection.on]]
type = "people.deleted"
kv = "delete"
key = "person.{data.key.email}"
"#;
    let (cfg, _source, projector) = start_with_projector(
        &pg,
        &nats,
        dir.path(),
        &SourceSpec::new("store", "store")
            .tables(&["people"])
            .sections(sections),
    );
    db.batch_execute(
        "INSERT INTO people VALUES ('ann@example.com', 1), ('bob+tag@x.org', 2), ('a=b', 3),
             ('.dot.', 4), ('ünï cödé', 5), ('2026-11-29 10:30:00+00', 6), ('a..b', 7),
             ('plain', 8), ('a=40', 9), ('moved@x', 10), ('gone@x', 11);
         UPDATE people SET email = 'moved:here' WHERE email = 'moved@x';
         UPDATE people SET n = n + 100 WHERE email = 'a=b';
         DELETE FROM people WHERE email = 'gone@x';",
    )
    .await
    .unwrap();
    wait_applied(&db, &cfg, &["people_kv"], || projector.log()).await;
    let want: BTreeMap<String, i64> = db
        .query("SELECT email, n::bigint FROM people", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let js = async_nats::jetstream::new(nats.client().await);
    let stored = kv_values(&js, "PEOPLE").await;
    // Read each key back: `=XY` is the byte 0xXY, anything else is itself.
    let unescape = |key: &str| -> String {
        let mut bytes = Vec::new();
        let mut rest = key.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'=' {
                let hex = std::str::from_utf8(&tail[..2]).unwrap();
                bytes.push(u8::from_str_radix(hex, 16).unwrap());
                rest = &tail[2..];
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        String::from_utf8(bytes).unwrap()
    };
    let got: BTreeMap<String, i64> = stored
        .iter()
        .map(|(k, v)| {
            let email = k.strip_prefix("person.").expect("the template's prefix");
            (unescape(email), v["n"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(got, want, "{}", projector.log());
    assert!(
        stored.contains_key("person.ann=40example.com") && stored.contains_key("person.plain"),
        "{stored:?}"
    );
    assert!(
        !projector.log().contains("not a valid KV key"),
        "{}",
        projector.log()
    );
}
