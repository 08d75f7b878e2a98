// A read-model builder in TypeScript for tidemark's events (the `nats` npm package).
//
// It keeps the `orders` of source STORE's stream as a model of its own, applying each
// source transaction whole: events are buffered until the one with `txlast: true`,
// then applied together with the stream sequence they end at, in one atomic write of
// the state file (written aside, flushed, renamed over). The checkpoint lives with the
// data, so a crash never applies a transaction twice or half. On start it reads the
// stream from the sequence after its checkpoint with an ordered consumer (no durable
// state on the server, no acks, no redeliveries). A service would keep the model and
// the checkpoint in its own database, in one transaction, the same way.
//
//   node dist/consumer.js --nats nats://127.0.0.1:4222 --stream STORE --db orders.json
//   node dist/consumer.js --db orders.json --dump    # checkpoint and aggregate as JSON
//
// Events: CloudEvents JSON (see the README's "Events"). `orders.created`,
// `orders.updated` and `orders.read` (a row the source's snapshot read: the rows the
// table held before tidemark streamed it) carry the row in `data.after`; an update
// that changed the key has the old one in `data.before`; `orders.deleted` has its key
// in `data.key`, `orders.truncated` empties the model. Other types (other tables,
// `tidemark.*` markers) only move the checkpoint.

import * as fs from "fs";
import { connect, DeliverPolicy } from "nats";

interface TidemarkEvent {
  id: string;
  type: string;
  txlast?: boolean;
  data?: {
    key?: Record<string, unknown>;
    before?: Record<string, unknown> | null;
    after?: Record<string, unknown> | null;
  };
}

/** The read model and its checkpoint: one file, replaced atomically. */
interface State {
  /** The stream sequence applied through. */
  seq: number;
  /** Order events applied (counts twice if any were applied twice). */
  events: number;
  /** Order id -> [customer id, total in cents]. */
  orders: Record<string, [number, string]>;
}

function load(path: string): State {
  try {
    return JSON.parse(fs.readFileSync(path, "utf8")) as State;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return { seq: 0, events: 0, orders: {} };
    throw e;
  }
}

function save(path: string, state: State): void {
  const tmp = path + ".tmp";
  const fd = fs.openSync(tmp, "w");
  fs.writeSync(fd, JSON.stringify(state));
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  fs.renameSync(tmp, path);
}

/** A numeric string ("12.25") as cents, exactly. */
function cents(total: unknown): bigint {
  const [whole, frac = ""] = String(total).split(".");
  const sign = whole.startsWith("-") ? -1n : 1n;
  return BigInt(whole) * 100n + sign * BigInt((frac + "00").slice(0, 2));
}

function money(c: bigint): string {
  const sign = c < 0n ? "-" : "";
  const a = c < 0n ? -c : c;
  return `${sign}${a / 100n}.${(a % 100n).toString().padStart(2, "0")}`;
}

/** Applies one source transaction to `state` (in memory; the caller saves). */
function apply(state: State, events: TidemarkEvent[], lastSeq: number): void {
  for (const ev of events) {
    const data = ev.data ?? {};
    if (ev.type.startsWith("orders.")) state.events += 1;
    switch (ev.type) {
      case "orders.created":
      case "orders.updated":
      case "orders.read": {
        const row = data.after as { id: number; customer_id: number; total: string };
        const before = data.before as { id?: number } | null | undefined;
        if (before && before.id !== undefined && before.id !== row.id) delete state.orders[String(before.id)];
        state.orders[String(row.id)] = [row.customer_id, cents(row.total).toString()];
        break;
      }
      case "orders.deleted":
        delete state.orders[String((data.key as { id: number }).id)];
        break;
      case "orders.truncated":
        state.orders = {};
        break;
    }
  }
  state.seq = lastSeq;
}

function dump(state: State): void {
  const per = new Map<number, [number, bigint]>();
  for (const [customer, c] of Object.values(state.orders)) {
    const [n, sum] = per.get(customer) ?? [0, 0n];
    per.set(customer, [n + 1, sum + BigInt(c)]);
  }
  const aggregate = [...per.entries()]
    .sort((a, b) => a[0] - b[0])
    .map(([customer, [n, sum]]) => [customer, n, money(sum)]);
  console.log(JSON.stringify({ checkpoint: state.seq, events: state.events, aggregate }));
}

function args(): Record<string, string | boolean> {
  const out: Record<string, string | boolean> = {
    nats: "nats://127.0.0.1:4222",
    stream: "STORE",
    subject: "store.>",
  };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--dump") out.dump = true;
    else if (a.startsWith("--") && i + 1 < argv.length) out[a.slice(2)] = argv[++i];
    else {
      console.error(`unknown argument ${a}: use --nats URL --stream NAME --subject S --db FILE [--dump]`);
      process.exit(2);
    }
  }
  if (typeof out.db !== "string") {
    console.error("--db FILE is required");
    process.exit(2);
  }
  return out;
}

async function main(): Promise<void> {
  const a = args();
  const path = a.db as string;
  const state = load(path);
  if (a.dump) {
    dump(state);
    return;
  }
  const nc = await connect({ servers: a.nats as string, maxReconnectAttempts: -1 });
  const js = nc.jetstream();
  const start = state.seq + 1;
  console.error(`resuming ${a.stream} at sequence ${start}`);
  const consumer = await js.consumers.get(a.stream as string, {
    filterSubjects: [a.subject as string],
    deliver_policy: DeliverPolicy.StartSequence,
    opt_start_seq: start,
  });
  const messages = await consumer.consume();
  let pending: TidemarkEvent[] = [];
  for await (const m of messages) {
    let ev: TidemarkEvent;
    try {
      ev = m.json<TidemarkEvent>();
    } catch (e) {
      // Never skip in silence: a stream of tidemark's holds only its events.
      console.error(`sequence ${m.seq} is not a JSON event: ${e}`);
      process.exit(1);
    }
    pending.push(ev);
    // An event without txlast (none today) stands alone.
    if (ev.txlast ?? true) {
      apply(state, pending, m.seq);
      save(path, state);
      pending = [];
    }
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
