#!/usr/bin/env bash
# The test command: installs what is missing, then checks formatting and lints and runs
# every test (unit, property and integration tests against real PostgreSQL and
# nats-server), the integration tests once on the Debian PostgreSQL (15) and once on
# PostgreSQL 16 from the pgserver wheel. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo fmt --all -- --check
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --all-targets --quiet -- -D warnings
fi
# The soak runs on its own below (a short one, with a seed of its own each run).
cargo test --all-targets -- --skip seeded_soak_keeps_every_promise
bash scripts/soak.sh --seconds 30

# PostgreSQL 16: the pgserver wheel ships 16.2 binaries. The tests run the server as an
# unprivileged user when run as root, so the binaries are copied where that user can
# reach them (site-packages may sit under /root).
pginstall() {
  python3 -c 'import os, pgserver; print(os.path.join(os.path.dirname(pgserver.__file__), "pginstall"))' 2>/dev/null
}
if ! pginstall >/dev/null; then
  python3 -m pip install --quiet pgserver 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages pgserver
fi
# The binaries find their libraries through an RPATH into site-packages/pgserver.libs,
# so the copy keeps that layout.
pg16="${TMPDIR:-/tmp}/tidemark-pg16"
pg16_bin="$pg16/pgserver/pginstall/bin"
if [ ! -x "$pg16_bin/postgres" ]; then
  site=$(dirname "$(dirname "$(pginstall)")")
  rm -rf "$pg16.tmp" && mkdir -p "$pg16.tmp/pgserver"
  cp -r "$site/pgserver/pginstall" "$pg16.tmp/pgserver/"
  cp -r "$site/pgserver.libs" "$pg16.tmp/"
  chmod -R a+rX "$pg16.tmp"
  rm -rf "$pg16" && mv "$pg16.tmp" "$pg16"
fi
echo "integration tests on $("$pg16_bin/postgres" --version)"
TIDEMARK_PG_BINDIR="$pg16_bin" cargo test --test bridge
