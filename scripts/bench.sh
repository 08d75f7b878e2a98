#!/usr/bin/env bash
# The benchmark: one command. Installs what is missing, builds in release mode, and runs
# examples/bench.rs, which prints events/s, commit-to-ack latency percentiles, peak RSS,
# and tidemark's rate against the pg_recvlogical and bare-NATS ceilings.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --release --quiet --bin tidemark --example bench
exec target/release/examples/bench "$@"
