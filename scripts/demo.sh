#!/usr/bin/env bash
# The demo: starts a PostgreSQL store database and a nats-server of its own (temporary,
# on free ports), runs tidemark next to it, writes orders, shipments and restocks, and
# prints the domain events as they arrive in JetStream, including across a kill -9 of
# tidemark. Installs what is missing first. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --release --quiet --bin tidemark --example demo
exec target/release/examples/demo "$@"
