#!/usr/bin/env bash
# The seeded fault soak: a random mix of workload (tables with and without keys, large
# transactions, TRUNCATE, DDL, outbox rows and messages, pgbench, a CLI backfill, two
# read models) and faults (kill -9 of run and project, SIGTERM and restart, nats-server
# and Postgres restarts, TCP cuts and stalls) against real Postgres and nats-server,
# then every promise checked at once (the stream folds to the tables, ids unique and
# rising, snapshot rows read once, outbox rows and messages once, the read models equal
# the store). Prints its seed first; the same seed replays the same schedule.
#   scripts/soak.sh [--seed N] [--minutes M | --seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
seed="" secs=60
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed="$2"; shift 2 ;;
    --minutes) secs=$(( $2 * 60 )); shift 2 ;;
    --seconds) secs="$2"; shift 2 ;;
    *) echo "usage: scripts/soak.sh [--seed N] [--minutes M | --seconds S]" >&2; exit 2 ;;
  esac
done
source scripts/install-deps.sh
[ -n "$seed" ] || seed=$(( (RANDOM << 30) ^ (RANDOM << 15) ^ RANDOM ))
echo "soak seed $seed, $secs s of workload (scripts/soak.sh --seed $seed replays it)"
SOAK_SEED="$seed" SOAK_SECS="$secs" cargo test --test soak -- --nocapture
