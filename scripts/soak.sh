#!/usr/bin/env bash
# The seeded fault soak: a random mix of workload (tables with and without keys, large
# transactions, TRUNCATE, DDL, outbox rows and messages, pgbench, a CLI backfill, two
# read models) and faults (kill -9 of run and project, SIGTERM and restart, nats-server
# and Postgres restarts, TCP cuts and stalls) against real Postgres and nats-server,
# then every promise checked at once (the stream folds to the tables, ids unique and
# rising, snapshot rows read once, outbox rows and messages once, the read models equal
# the store). Prints its seed first; the same seed replays the same schedule.
#   scripts/soak.sh [--seed N] [--minutes M | --seconds S] [--release]
# --release runs a release build of tidemark (copied aside, so rebuilding the tree
# meanwhile changes nothing); long soaks want it: on 2 cores a debug build drains the
# backlog of the mix more slowly than the workload writes it.
set -euo pipefail
cd "$(dirname "$0")/.."
seed="" secs=60 release=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed="$2"; shift 2 ;;
    --minutes) secs=$(( $2 * 60 )); shift 2 ;;
    --seconds) secs="$2"; shift 2 ;;
    --release) release=1; shift ;;
    *) echo "usage: scripts/soak.sh [--seed N] [--minutes M | --seconds S] [--release]" >&2; exit 2 ;;
  esac
done
source scripts/install-deps.sh
[ -n "$seed" ] || seed=$(( (RANDOM << 30) ^ (RANDOM << 15) ^ RANDOM ))
echo "soak seed $seed, $secs s of workload (scripts/soak.sh --seed $seed replays it)"
if [ -n "$release" ]; then
  cargo build --release --quiet --bin tidemark
  bin_dir=$(mktemp -d)
  trap 'rm -rf "$bin_dir"' EXIT
  cp target/release/tidemark "$bin_dir/tidemark"
  export TIDEMARK_BIN="$bin_dir/tidemark"
  echo "tidemark: a release build ($TIDEMARK_BIN)"
fi
SOAK_SEED="$seed" SOAK_SECS="$secs" cargo test --test soak -- --nocapture
