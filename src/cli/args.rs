//! The command line: clap's types for every command and flag.

use super::*;

/// Stream PostgreSQL row changes into NATS JetStream as CloudEvents, exactly once and in
/// commit order.
#[derive(Debug, Parser)]
#[command(name = "tidemark", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// Human-readable lines without colors, for log collectors.
    Plain,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream every configured source until SIGTERM or SIGINT.
    ///
    /// Each source runs on its own and fails alone. A failed pipeline is rebuilt from
    /// durable state (the replication slot and the stream) with backoff; a problem only
    /// an operator can fix stops that source with the fix in the log.
    /// Exit codes: 0 after a clean shutdown, 1 when a source stopped on an error,
    /// 2 for a bad config.
    Run {
        /// The config file.
        #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
        config: PathBuf,
    },
    /// Validate the config, then check each source's database and NATS server.
    ///
    /// Changes nothing. Prints one line per check, and what would be streamed.
    /// Exit codes: 0 when everything is ready, 1 when a check failed, 2 for a bad config.
    Check {
        /// The config file.
        #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
        config: PathBuf,
    },
    /// Replay a source's events from a position, as JSON lines on stdout.
    ///
    /// Positions: a commit LSN (the first event committed at or after it), a stream
    /// sequence, or an RFC 3339 commit time. LSN and time positions are found by binary
    /// search over the stream. Without --from-*, the replay starts at the oldest stored
    /// event; without --to-*, it ends at the newest. A summary goes to stderr; stdout
    /// carries only events. Exit codes: 0 ok, 1 when the range is outside what is
    /// stored, 2 for bad usage or config.
    Replay(Box<ReplayArgs>),
    /// Start a source over from now with a new slot, purging or keeping its stream.
    ///
    /// --purge-stream deletes the stream's events: consumers must rebuild. --keep-stream
    /// keeps them and appends a `tidemark.reset` event that marks the discontinuity
    /// (changes made while no slot existed are not in the stream). Either way the next
    /// `run` streams changes made from the new slot on. Refuses without one of the two
    /// and --yes.
    Reset {
        /// The config file.
        #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
        config: PathBuf,
        /// The source to reset (may be left out when the config has one).
        #[arg(long)]
        source: Option<String>,
        /// Delete every event in the source's stream.
        #[arg(long, conflicts_with = "keep_stream")]
        purge_stream: bool,
        /// Keep the stream's events and append a reset marker.
        #[arg(long)]
        keep_stream: bool,
        /// Confirm: this cannot be undone.
        #[arg(long)]
        yes: bool,
        /// End the connection of a tidemark still streaming from the slot.
        #[arg(long)]
        force: bool,
    },
    /// Send a table's current rows into the stream while tidemark keeps streaming.
    ///
    /// The running `tidemark run` reads the table in key order, in chunks, and places
    /// each chunk in the stream with watermarks, so no old value overwrites a newer
    /// change. Progress is kept in NATS, so a restart resumes. The table must be
    /// published and have a primary key (or a key in its mapping). On a terminal, waits
    /// with a progress bar until the backfill is done.
    /// Exit codes: 0 queued (or done, when waiting), 1 refused or failed, 2 bad config.
    Backfill {
        /// The config file.
        #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
        config: PathBuf,
        /// The source (may be left out when the config has one).
        #[arg(long)]
        source: Option<String>,
        /// The table: "orders" (public.orders) or "schema.table".
        #[arg(long)]
        table: String,
        /// Only rows matching this SQL condition, like "created_at > '2025-01-01'".
        #[arg(long = "where", value_name = "CONDITION")]
        filter: Option<String>,
        /// Rows per chunk (default: the source's snapshot_chunk_size).
        #[arg(long)]
        chunk_size: Option<u64>,
        /// Wait until it is done, even without a terminal.
        #[arg(long, conflicts_with = "no_wait")]
        wait: bool,
        /// Return once it is queued, even on a terminal.
        #[arg(long)]
        no_wait: bool,
    },
    /// Write the event contract: a JSON Schema (2020-12) for every event type a
    /// source can publish, one file per type and version, and an index.
    ///
    /// Derived from the live tables and the mapping (columns and their JSON forms,
    /// renames, excluded columns, the key, rule-based types) and tidemark's marker
    /// events. Events name their schema in the CloudEvents `dataschema` attribute.
    Schema {
        /// The config file.
        #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
        config: PathBuf,
        /// The source (default: every source).
        #[arg(long)]
        source: Option<String>,
        /// The directory to write the schemas into (created when missing).
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
    /// Recover a source whose slot was dropped or invalidated, keeping its stream.
    ///
    /// Creates a new slot, appends a `tidemark.reset` event (reason "resync") that
    /// marks the gap, and queues a backfill of every published table, so the next `run`
    /// streams from the new slot and sends every table's current rows: read models
    /// rebuild from the marker without a destructive reset. Refuses without --yes.
    Resync {
        /// The config file.
        #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
        config: PathBuf,
        /// The source (may be left out when the config has one).
        #[arg(long)]
        source: Option<String>,
        /// Confirm.
        #[arg(long)]
        yes: bool,
        /// End the connection of a tidemark still streaming from an old slot.
        #[arg(long)]
        force: bool,
    },
    /// Build the configured read models (projections) from their sources' streams.
    ///
    /// Each projection applies its events to its database exactly once: a source
    /// transaction's events and the checkpoint commit together. Runs until SIGTERM or
    /// SIGINT. Exit codes: 0 after a clean shutdown, 1 when a projection stopped on an
    /// event it cannot apply (named in the log), 2 for a bad config.
    Project {
        /// The config file.
        #[arg(
            long,
            short,
            global = true,
            env = "TIDEMARK_CONFIG",
            default_value = "tidemark.toml"
        )]
        config: PathBuf,
        /// Only this projection (repeatable; default: all).
        #[arg(long = "name")]
        names: Vec<String>,
        #[command(subcommand)]
        action: Option<ProjectCommand>,
    },
    /// Wait until a projection includes everything committed before an LSN.
    ///
    /// Take the LSN with `SELECT pg_current_wal_lsn()` after your write commits. Writes
    /// a `tidemark.sync` message into the source database so the position always comes.
    /// Exit codes: 0 when the projection has it, 1 on timeout, 2 for bad usage.
    Wait {
        /// The config file.
        #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
        config: PathBuf,
        /// The projection.
        #[arg(long)]
        projection: String,
        /// The LSN, like 0/16B3748.
        #[arg(long)]
        lsn: Lsn,
        /// How long to wait: 5s, 500ms, 2m.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Manage a source's replication slot.
    #[command(subcommand)]
    Slot(SlotCommand),
    /// Show each source's chain of positions: WAL, slot, stream, consumers.
    ///
    /// Postgres' current WAL position; the slot's confirmed flush and restart LSNs, the
    /// WAL it retains and whether it is active; the stream's stored range by sequence and
    /// commit LSN; each durable consumer's ack floor and pending count. Read-only.
    /// Exit codes: 0 healthy, 1 when a slot is missing or invalidated or a system is
    /// unreachable (so it can back a probe), 2 for a bad config.
    Status {
        /// The config file.
        #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
        config: PathBuf,
        /// Print JSON (one array of sources) instead of the table.
        #[arg(long)]
        json: bool,
        /// Redraw the chain every second until interrupted (Ctrl-C).
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Rebuild a read model from the start of the stream, then swap it in atomically.
    ///
    /// Builds into shadow tables (schema tidemark_rebuild_<name>) while the live
    /// projection keeps serving, catches up, then, holding the projection's lock,
    /// applies the last events and swaps the tables and the checkpoint in one
    /// transaction: readers see the old model or the new one, never a partial one.
    /// Exit codes: 0 swapped, 1 failed (the live model is untouched), 2 bad usage.
    Rebuild {
        /// The projection to rebuild.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SlotCommand {
    /// Drop the source's replication slot, so Postgres can recycle the WAL it holds.
    ///
    /// Refuses while a process streams from the slot, unless --force, which ends that
    /// connection first. After a drop the stream still holds the source's events, and
    /// `run` refuses to start over it in silence: the changes made meanwhile would be
    /// missing.
    Drop {
        /// The config file.
        #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
        config: PathBuf,
        /// The source whose slot to drop (may be left out when the config has one).
        #[arg(long)]
        source: Option<String>,
        /// Terminate the connection that holds the slot, then drop it.
        #[arg(long)]
        force: bool,
    },
}

/// The arguments of `replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The config file.
    #[arg(long, short, env = "TIDEMARK_CONFIG", default_value = "tidemark.toml")]
    pub config: PathBuf,
    /// The source to replay (may be left out when the config has one).
    #[arg(long)]
    pub source: Option<String>,
    /// Start at the first event committed at or after this LSN, like 0/16B3748
    #[arg(long, value_name = "LSN", group = "from")]
    pub from_lsn: Option<Lsn>,
    /// Start at this stream sequence
    #[arg(long, value_name = "SEQ", group = "from")]
    pub from_seq: Option<u64>,
    /// Start at the first event committed at or after this time, like 2026-11-24T10:00:00Z
    #[arg(long, value_name = "RFC3339", value_parser = parse_time, group = "from")]
    pub from_time: Option<OffsetDateTime>,
    /// End with the last event committed at or before this LSN
    #[arg(long, value_name = "LSN", group = "to")]
    pub to_lsn: Option<Lsn>,
    /// End at this stream sequence
    #[arg(long, value_name = "SEQ", group = "to")]
    pub to_seq: Option<u64>,
    /// End with the last event committed at or before this time
    #[arg(long, value_name = "RFC3339", value_parser = parse_time, group = "to")]
    pub to_time: Option<OffsetDateTime>,
    /// Only events on these subjects (NATS wildcards allowed); repeatable.
    #[arg(long = "subject", value_name = "SUBJECT")]
    pub subjects: Vec<String>,
    /// Only events of these types, like orders.created; repeatable.
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,
    /// Only events of these tables ("orders" is public.orders); repeatable.
    #[arg(long = "table", value_name = "TABLE")]
    pub tables: Vec<String>,
    /// Keep going with new events after the stored ones (until interrupted).
    #[arg(long, conflicts_with = "to")]
    pub follow: bool,
    /// Print one human-readable line per event instead of JSON.
    #[arg(long, conflicts_with = "republish")]
    pub pretty: bool,
    /// Publish the events again under PREFIX.<subject>, exactly once (a stream must
    /// capture PREFIX.>), instead of printing them.
    #[arg(long, value_name = "PREFIX")]
    pub republish: Option<String>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every flag of every command says what it does in `--help`.
    #[test]
    fn every_flag_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "tidemark", &mut missing);
        assert!(missing.is_empty(), "flags without help text: {missing:?}");
    }
}
