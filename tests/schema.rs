//! The event contract: `tidemark schema` writes a JSON Schema for every event type a
//! source can publish; every event of a mixed workload (every type of the value
//! table, NULLs, special values, mapping rules and renames, markers, a TRUNCATE, DDL
//! mid-stream) names its schema in `dataschema` and validates against it with a
//! standard validator (Python's jsonschema, Draft 2020-12).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

const TYPES: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (a int, b text);
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE everything (
  id int PRIMARY KEY,
  i2 smallint, i8 bigint NOT NULL DEFAULT 0, o oid, num numeric(10,3), f4 real,
  f8 double precision, m money, j json, jb jsonb, d date, t time, tz timetz,
  ts timestamp, tstz timestamptz, iv interval, bin bytea, u uuid, ip inet, net cidr,
  mac macaddr, mac8 macaddr8, b3 bit(3), vb varbit, x xml, tsv tsvector, tsq tsquery,
  lsn pg_lsn, pt point, ln line, ls lseg, bx box, pa path, pg polygon, ci circle,
  r int4range, mr int4multirange, c pair, e mood, dom posint, arr int[], arr2 text[],
  bo boolean, tx text, vc varchar(10)
);
ALTER TABLE everything REPLICA IDENTITY FULL;
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL, status text NOT NULL,
                     internal_notes text);
";

const FULL_ROW: &str = "INSERT INTO everything VALUES (
  1, 2, 3, 4, 12.345, 1.5, 2.25, '$1,234.56', '{\"a\": [1, null]}', '{\"b\": true}',
  '2024-02-29', '13:14:15.5', '23:59:59.999-05:30', '2024-01-01 10:00:00',
  '2024-01-01 10:00:00+02', '1 year 2 mons 3 days 04:05:06.5', '\\xdeadbeef',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '192.168.0.1/24', '10.0.0.0/8',
  '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05', B'101', B'11', '<a>x</a>',
  'a fat cat', 'fat & rat', '16/B374D848', '(1,2)', '{1,2,3}', '[(0,0),(1,1)]',
  '((0,0),(1,1))', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))', '<(1,1),2>',
  '[1,5)', '{[1,3),[7,9)}', ROW(1, 'x'), 'happy', 5, '{1,NULL,3}', '{{a,b},{c,d}}',
  true, 'text', 'short')";

fn python_validate(schemas: &[&Path], events: &Path) -> (bool, String) {
    let script = r#"
import json, sys, os
from jsonschema import Draft202012Validator
schemas = {}
for d in sys.argv[1:-1]:
    index = json.load(open(os.path.join(d, "index.json")))
    for entry in index["schemas"]:
        doc = json.load(open(os.path.join(d, entry["file"])))
        Draft202012Validator.check_schema(doc)
        assert doc["$id"] == entry["dataschema"], entry
        schemas[entry["dataschema"]] = doc
events = json.load(open(sys.argv[-1]))
bad = 0
checked = {}
for ev in events:
    uri = ev.get("dataschema")
    if uri is None:
        print("no dataschema:", ev["id"], ev["type"]); bad += 1; continue
    if uri not in schemas:
        print("no schema file for", uri, "(event", ev["id"], ")"); bad += 1; continue
    errors = list(Draft202012Validator(schemas[uri]).iter_errors(ev))
    for e in errors[:3]:
        print("INVALID", ev["id"], ev["type"], "at", list(e.absolute_path), ":", e.message)
    bad += bool(errors)
    checked[ev["type"]] = checked.get(ev["type"], 0) + 1
print(json.dumps({"bad": bad, "checked": checked}))
sys.exit(1 if bad else 0)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(schemas)
        .arg(events)
        .output()
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `tidemark schema --config <cfg> --out <out>`, which must succeed.
fn write_schemas(cfg: &Path, out: &Path) {
    let (code, stdout, err) = tidemark_cmd(&[
        "schema",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("event schemas"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_validates_against_the_schema_it_names() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    // Multiranges came in PostgreSQL 14: before, that column is text.
    let types = if pg_major() < 14 {
        TYPES.replace("mr int4multirange", "mr text")
    } else {
        TYPES.to_string()
    };
    db.batch_execute(&types).await.unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["everything", "orders"])
            .set("transaction_events", true)
            .set("heartbeat_interval_secs", 1)
            .sections(
                r#"
[[source.table]]
name = "orders"
insert = "OrderPlaced"
exclude = ["internal_notes"]
rename = { customer_id = "customer" }
attributes = { aggregate = "order" }

[[source.table.rule]]
on = "update"
new = { status = "shipped" }
event = "OrderShipped"
"#,
            ),
    );
    let before_ddl = dir.path().join("schemas-1");
    write_schemas(&cfg, &before_ddl);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(before_ddl.join("index.json")).unwrap())
            .unwrap();
    let types: Vec<&str> = index["schemas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for t in [
        "everything.created",
        "everything.updated",
        "everything.deleted",
        "everything.truncated",
        "everything.read",
        "OrderPlaced",
        "OrderShipped",
        "orders.updated",
        "orders.deleted",
        "tidemark.heartbeat",
        "tidemark.transaction",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }

    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    tm.wait_streaming();
    db.batch_execute(FULL_ROW).await.unwrap();
    db.batch_execute(
        "INSERT INTO everything (id, f4, f8, num) VALUES (2, 'NaN', '-Infinity', 'NaN');
         INSERT INTO everything (id) VALUES (3);
         UPDATE everything SET tx = 'changed', arr = '{}' WHERE id = 1;
         UPDATE everything SET id = 4 WHERE id = 3;
         DELETE FROM everything WHERE id = 2;
         INSERT INTO orders VALUES (1, 7, 'placed', 'secret'), (2, 8, 'placed', NULL);
         UPDATE orders SET status = 'shipped' WHERE id = 1;
         UPDATE orders SET status = 'paid' WHERE id = 2;
         DELETE FROM orders WHERE id = 2;",
    )
    .await
    .unwrap();
    // DDL mid-stream: the row's shape changes, so does its schema's version.
    db.batch_execute(
        "ALTER TABLE orders ADD COLUMN placed_at timestamptz DEFAULT now();
         INSERT INTO orders (id, customer_id, status) VALUES (3, 9, 'placed');
         ALTER TABLE everything ALTER COLUMN i2 TYPE bigint;
         UPDATE everything SET i2 = 9000000000 WHERE id = 1;
         TRUNCATE everything;",
    )
    .await
    .unwrap();
    let nc = nats.client().await;
    wait_until("a heartbeat", Duration::from_secs(30), || {
        let nc = nc.clone();
        async move {
            read_stream(&nc, "STORE")
                .await
                .iter()
                .any(|e| e.body["type"] == "tidemark.heartbeat")
        }
    })
    .await;
    let after_ddl = dir.path().join("schemas-2");
    write_schemas(&cfg, &after_ddl);

    let events = read_stream(&nc, "STORE").await;
    let bodies: Vec<&serde_json::Value> = events.iter().map(|e| &e.body).collect();
    let file = dir.path().join("events.json");
    std::fs::write(&file, serde_json::to_vec(&bodies).unwrap()).unwrap();
    let (ok, report) = python_validate(&[&before_ddl, &after_ddl], &file);
    println!("{report}");
    assert!(ok, "events that do not fit their schema:\n{report}");
    // The checks could fail: every kind of event was there to validate.
    for t in [
        "everything.created",
        "everything.updated",
        "everything.deleted",
        "everything.truncated",
        "OrderPlaced",
        "OrderShipped",
        "orders.updated",
        "orders.deleted",
        "tidemark.heartbeat",
        "tidemark.transaction",
    ] {
        assert!(
            report.contains(&format!("\"{t}\"")),
            "no {t} event checked: {report}"
        );
    }
    // Two versions of OrderPlaced: before and after the column was added.
    let placed: std::collections::BTreeSet<&str> = bodies
        .iter()
        .filter(|b| b["type"] == "OrderPlaced")
        .filter_map(|b| b["dataschema"].as_str())
        .collect();
    assert_eq!(placed.len(), 2, "{placed:?}");

    // And a validator that can fail does: an event with a wrong value is refused.
    let mut broken = bodies
        .iter()
        .find(|b| b["type"] == "everything.created")
        .map(|b| (*b).clone())
        .unwrap();
    broken["data"]["after"]["i8"] = serde_json::json!("not a number");
    std::fs::write(&file, serde_json::to_vec(&vec![broken]).unwrap()).unwrap();
    let (ok, report) = python_validate(&[&before_ddl, &after_ddl], &file);
    assert!(!ok && report.contains("INVALID"), "{report}");
    drop(tm);
}
