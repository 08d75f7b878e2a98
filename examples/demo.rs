//! The README's first command: tidemark streaming a store database's changes.
//!
//! Starts its own PostgreSQL and nats-server (temporary directories, free ports), creates
//! an online-store schema, runs `tidemark run` next to it with mapping rules that turn
//! row changes into domain events (`OrderPlaced`, `OrderShipped`, `StockAdjusted`...),
//! writes a stream of business activity, and prints every event as JetStream stores it.
//! The rows the store held before tidemark started arrive first, from its initial
//! snapshot. A read model (per-customer order count, total spent and last order status)
//! is kept in another database by the `tidemark::projection::Consumer` API, exactly
//! once, and printed after each round. Half way, tidemark is killed
//! with SIGKILL and restarted; at the end the demo reads the stream back and checks that
//! every change arrived exactly once, in commit order.
//!
//! Run it with `scripts/demo.sh` (which installs what is missing and builds first).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use futures_util::StreamExt;
use support::*;

const SCHEMA: &str = "
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE);
CREATE TABLE inventory (sku text PRIMARY KEY, title text, in_stock int NOT NULL, price numeric(10,2));
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, status text NOT NULL DEFAULT 'placed',
                     total numeric(10,2), placed_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE order_items (order_id int REFERENCES orders, line int, sku text REFERENCES inventory, qty int,
                          PRIMARY KEY (order_id, line));
INSERT INTO inventory VALUES ('TEA-01', 'Sencha 100g', 40, 7.50), ('MUG-02', 'Stoneware mug', 12, 14.00),
                             ('POT-03', 'Cast iron teapot', 5, 49.90);
ALTER TABLE orders REPLICA IDENTITY FULL;
";

/// The store's tables as domain events.
const MAPPING: &str = r#"
[[source.table]]
name = "customers"
insert = "CustomerRegistered"
update = "CustomerUpdated"

[[source.table]]
name = "orders"
insert = "OrderPlaced"
update = false
subject = "{source}.order.{event}.{key.id}"
rename = { customer_id = "customer" }

[[source.table.rule]]
on = "update"
changed = ["status"]
new = { status = "shipped" }
event = "OrderShipped"

[[source.table]]
name = "order_items"
insert = "OrderLineAdded"
delete = "OrderLineRemoved"

[[source.table]]
name = "inventory"
update = "StockAdjusted"
"#;

/// The read model: one row per customer, kept by the Rust consumer API.
struct CustomerOrders;

impl tidemark::projection::Apply for CustomerOrders {
    type Error = tokio_postgres::Error;

    async fn apply(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[tidemark::projection::Event],
    ) -> Result<(), Self::Error> {
        for e in events {
            let order = &e.data["after"];
            let id = order["id"].as_i64().unwrap_or_default() as i32;
            match e.event_type.as_str() {
                "OrderPlaced" => {
                    let customer = order["customer"].as_i64().unwrap_or_default() as i32;
                    let total = order["total"].as_str().unwrap_or("0");
                    let status = order["status"].as_str().unwrap_or("");
                    tx.execute(
                        "INSERT INTO customer_orders VALUES ($1, 1, $2::text::numeric, $3, $4)
                         ON CONFLICT (customer_id) DO UPDATE SET orders = customer_orders.orders + 1,
                           spent = customer_orders.spent + EXCLUDED.spent,
                           last_status = EXCLUDED.last_status, last_order = EXCLUDED.last_order",
                        &[&customer, &total, &status, &id],
                    )
                    .await?;
                }
                "OrderShipped" => {
                    tx.execute(
                        "UPDATE customer_orders SET last_status = 'shipped' WHERE last_order = $1",
                        &[&id],
                    )
                    .await?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(6);
    println!("== tidemark demo: a store database streaming into NATS JetStream ==");
    let pg = PgServer::start();
    let nats = NatsServer::start();
    println!("postgres  127.0.0.1:{} (wal_level=logical)", pg.port);
    println!("nats      {} (JetStream)", nats.url());
    let db = pg.create_db("store").await;
    db.batch_execute(SCHEMA)
        .await
        .expect("create the store schema");

    let dir = tempfile::tempdir().expect("temp dir");
    let page_port = free_port();
    let sections = format!("{MAPPING}\n[metrics]\nlisten = \"127.0.0.1:{page_port}\"\n");
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        // The rows the store already holds come first, as inventory.read events.
        &SourceSpec::new("store", "store")
            .tables(&["customers", "inventory", "orders", "order_items"])
            .sections(&sections)
            .snapshot("initial"),
    );
    println!(
        "\n-- config {} --\n{}",
        cfg.display(),
        std::fs::read_to_string(&cfg).unwrap_or_default()
    );
    let log = dir.path().join("tidemark.log");
    let mut tm = Tidemark::run(&cfg, &log);
    wait_for(
        "tidemark to start streaming",
        Duration::from_secs(30),
        || tm.log().contains("streaming").then_some(()),
    );
    println!("tidemark is streaming (log: {})", log.display());
    println!(
        "status page: http://127.0.0.1:{page_port}/ (open it in a browser while the demo runs)\n"
    );

    // Print events live as JetStream stores them.
    let nc = nats.client().await;
    let js = async_nats::jetstream::new(nc.clone());
    let printer = tokio::spawn(async move {
        let stream = loop {
            match js.get_stream("STORE").await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .expect("consumer");
        let mut messages = consumer.messages().await.expect("messages");
        while let Some(Ok(m)) = messages.next().await {
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let ev: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            let data = &ev["data"];
            let row = if data["after"].is_null() {
                &data["before"]
            } else {
                &data["after"]
            };
            let end = if ev["txlast"] == true {
                " |end of tx"
            } else {
                ""
            };
            println!(
                "#{seq:<4} {:<20} {:<30} key={} {}{end}",
                ev["type"].as_str().unwrap_or(""),
                m.subject.as_str(),
                data["key"],
                row
            );
        }
    });

    // The read model, in its own database, kept by the consumer API.
    let mut rm = pg.create_db("readmodel").await;
    rm.batch_execute(
        "CREATE TABLE customer_orders (customer_id int PRIMARY KEY, orders int NOT NULL,
                                       spent numeric NOT NULL, last_status text, last_order int)",
    )
    .await
    .expect("read model table");
    let reader = pg.client("readmodel").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let model = {
        let consumer = tidemark::projection::Consumer::new(
            nc.clone(),
            "STORE",
            "customer_orders",
            vec!["store.order.>".into()],
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut app = CustomerOrders;
            consumer.run(&mut rm, &mut app, stop).await
        })
    };

    for round in 0..rounds {
        let name = format!("Customer {round}");
        db.batch_execute(&format!(
            "BEGIN;
             INSERT INTO customers (name, email) VALUES ('{name}', 'c{round}@example.com');
             INSERT INTO orders (customer_id, total) VALUES (currval('customers_id_seq'), 22.00);
             INSERT INTO order_items VALUES (currval('orders_id_seq'), 1, 'TEA-01', 2), (currval('orders_id_seq'), 2, 'MUG-02', 1);
             UPDATE inventory SET in_stock = in_stock - 2 WHERE sku = 'TEA-01';
             UPDATE inventory SET in_stock = in_stock - 1 WHERE sku = 'MUG-02';
             COMMIT;"
        ))
        .await
        .expect("place an order");
        tokio::time::sleep(Duration::from_millis(400)).await;
        db.batch_execute(
            "UPDATE orders SET status = 'shipped' WHERE status = 'placed' AND id % 2 = 1",
        )
        .await
        .expect("ship");
        print_model(&reader).await;
        if round == rounds / 2 {
            println!("\n!! kill -9 tidemark, then start it again: nothing lost, nothing twice\n");
            tm.kill9();
            tm = Tidemark::run(&cfg, &log);
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    db.batch_execute("UPDATE inventory SET in_stock = in_stock + 20 WHERE in_stock < 30; DELETE FROM order_items WHERE line = 2 AND order_id = 1;")
        .await
        .expect("restock");

    // Wait until the slot confirms everything written, then check the stream.
    wait_caught_up(
        &pg,
        &db,
        "store",
        "tidemark_store",
        Duration::from_secs(60),
        || tm.log(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    printer.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    if let Ok(Err(e)) = model.await {
        panic!("the read model's consumer failed: {e}");
    }
    print_model(&reader).await;
    // The read model agrees with the store, computed the slow way.
    let want: Vec<(i32, i64, String)> = db
        .query(
            "SELECT customer_id, count(*), sum(total)::text FROM orders GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("aggregate")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let got: Vec<(i32, i64, String)> = reader
        .query("SELECT customer_id, orders::bigint, spent::numeric(10,2)::text FROM customer_orders ORDER BY 1", &[])
        .await
        .expect("read model")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got, want, "the read model must equal the store's aggregate");
    println!(
        "read model customer_orders equals the store's aggregate (count and sum per customer)"
    );
    let events = read_stream(&nc, "STORE").await;
    assert_exactly_once(&events);
    if let Ok(path) = std::env::var("TIDEMARK_DEMO_SCREENSHOT") {
        screenshot(&format!("http://127.0.0.1:{page_port}/"), &path);
    }
    let status = tm.terminate(Duration::from_secs(30));
    println!(
        "\n== {} events in stream STORE, every id unique, gap-free and in commit order; tidemark exited with {} ==",
        events.len(),
        status
    );
}

async fn print_model(reader: &tokio_postgres::Client) {
    let rows = reader
        .query(
            "SELECT customer_id, orders, spent::text, coalesce(last_status, '') FROM customer_orders ORDER BY 1",
            &[],
        )
        .await
        .unwrap_or_default();
    println!("   read model customer_orders (customer: orders, spent, last status):");
    for r in rows {
        println!(
            "     {:>3}: {} order(s), {:>6} spent, last {}",
            r.get::<_, i32>(0),
            r.get::<_, i32>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3)
        );
    }
}

/// A picture of the status page (headless Chromium), for the README.
fn screenshot(url: &str, path: &str) {
    let profile = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
            "--window-size=1400,520",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={path}"))
        .arg(url)
        .output();
    match out {
        Ok(o) if o.status.success() => println!("status page screenshot: {path}"),
        Ok(o) => println!(
            "status page screenshot failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!("status page screenshot needs chromium: {e}"),
    }
}
