#!/usr/bin/env python3
"""A read-model builder in Python for tidemark's events (nats-py, sqlite3).

It keeps the `orders` of source STORE's stream as a table of its own, applying each
source transaction whole: events are buffered until the one with `txlast: true`, then
applied in one SQLite transaction together with the stream sequence they end at (the
checkpoint lives with the data, so a crash never applies a transaction twice or half).
On start it reads the stream from the sequence after its checkpoint, with an ordered
consumer (no durable state on the server, no acks, no redeliveries).

    python3 consumer.py --nats nats://127.0.0.1:4222 --stream STORE --db orders.sqlite
    python3 consumer.py --db orders.sqlite --dump     # checkpoint and aggregate as JSON

Events: CloudEvents JSON (see the README's "Events"); `orders.created`,
`orders.updated` and `orders.read` (a row the source's snapshot read: the rows the
table held before tidemark streamed it) carry the row in `data.after`; an update that
changed the key has the old one in `data.before`; `orders.deleted` has its key in
`data.key`, `orders.truncated` empties the table. Other types (other tables,
`tidemark.*` markers) only move the checkpoint.
"""

import argparse
import asyncio
import json
import sqlite3
import sys
from decimal import Decimal

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL,
    total TEXT NOT NULL           -- numeric arrives as an exact string
);
CREATE TABLE IF NOT EXISTS checkpoint (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    seq INTEGER NOT NULL,         -- the stream sequence applied through
    events INTEGER NOT NULL       -- order events applied: counts twice if any applied twice
);
INSERT OR IGNORE INTO checkpoint VALUES (1, 0, 0);
"""


def open_db(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


def checkpoint(db):
    return db.execute("SELECT seq FROM checkpoint").fetchone()[0]


def apply_transaction(db, events, last_seq):
    """Applies one source transaction and its checkpoint atomically."""
    db.execute("BEGIN IMMEDIATE")
    try:
        applied = 0
        for ev in events:
            kind = ev.get("type", "")
            data = ev.get("data") or {}
            applied += kind.startswith("orders.")
            if kind in ("orders.created", "orders.updated", "orders.read"):
                row = data["after"]
                if data.get("before") and data["before"].get("id") != row["id"]:
                    db.execute("DELETE FROM orders WHERE id = ?", (data["before"]["id"],))
                db.execute(
                    "INSERT INTO orders (id, customer_id, total) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET customer_id = excluded.customer_id, "
                    "total = excluded.total",
                    (row["id"], row["customer_id"], row["total"]),
                )
            elif kind == "orders.deleted":
                db.execute("DELETE FROM orders WHERE id = ?", (data["key"]["id"],))
            elif kind == "orders.truncated":
                db.execute("DELETE FROM orders")
        db.execute("UPDATE checkpoint SET seq = ?, events = events + ?", (last_seq, applied))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def dump(db):
    per_customer = {}
    for customer, total in db.execute("SELECT customer_id, total FROM orders"):
        n, s = per_customer.get(customer, (0, Decimal(0)))
        per_customer[customer] = (n + 1, s + Decimal(total))
    print(json.dumps({
        "checkpoint": checkpoint(db),
        "events": db.execute("SELECT events FROM checkpoint").fetchone()[0],
        "aggregate": [[c, n, str(s)] for c, (n, s) in sorted(per_customer.items())],
    }))


async def consume(args, db):
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy

    nc = await nats.connect(args.nats, max_reconnect_attempts=-1)
    js = nc.jetstream()
    start = checkpoint(db) + 1
    print(f"resuming {args.stream} at sequence {start}", file=sys.stderr, flush=True)
    sub = await js.subscribe(
        args.subject,
        stream=args.stream,
        ordered_consumer=True,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
        ),
    )
    pending = []  # the open source transaction: (event)
    try:
        while True:
            msg = await sub.next_msg(timeout=None)
            seq = msg.metadata.sequence.stream
            try:
                event = json.loads(msg.data)
            except ValueError as e:
                # Never skip in silence: a stream of tidemark's holds only its events.
                sys.exit(f"sequence {seq} is not a JSON event: {e}")
            pending.append(event)
            # An event without txlast (none today) stands alone.
            if event.get("txlast", True):
                apply_transaction(db, pending, seq)
                pending = []
    finally:
        await nc.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server URL")
    p.add_argument("--stream", default="STORE", help="the source's stream")
    p.add_argument("--subject", default="store.>", help="subjects to read: the source's, <source>.>")
    p.add_argument("--db", required=True, help="SQLite file for the read model")
    p.add_argument("--dump", action="store_true", help="print checkpoint and aggregate, exit")
    args = p.parse_args()
    db = open_db(args.db)
    if args.dump:
        dump(db)
        return
    asyncio.run(consume(args, db))


if __name__ == "__main__":
    main()
