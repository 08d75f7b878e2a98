#!/usr/bin/env bash
# The test command: installs what is missing, then checks formatting and lints and runs
# every test (unit, property and integration tests against real PostgreSQL and
# nats-server). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo fmt --all -- --check
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --all-targets --quiet -- -D warnings
fi
cargo test --all-targets
