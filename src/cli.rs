//! The command line: `run` streams every configured source until SIGTERM/SIGINT;
//! `check` validates the config offline, then probes each live database and NATS
//! server and says, one line per check, what would be streamed and what must be fixed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{self, Config, NatsConfig, SourceConfig, TableSelection};
use crate::error::ErrorChain;
use crate::jetstream::provision;
use crate::position::Lsn;
use crate::postgres::catalog::{Catalog, CatalogError};
use crate::replay::{Filter, Position, Sink};
use crate::source;
use time::OffsetDateTime;

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
    #[arg(long, value_name = "LSN", group = "from")]
    pub from_lsn: Option<Lsn>,
    #[arg(long, value_name = "SEQ", group = "from")]
    pub from_seq: Option<u64>,
    #[arg(long, value_name = "RFC3339", value_parser = parse_time, group = "from")]
    pub from_time: Option<OffsetDateTime>,
    #[arg(long, value_name = "LSN", group = "to")]
    pub to_lsn: Option<Lsn>,
    #[arg(long, value_name = "SEQ", group = "to")]
    pub to_seq: Option<u64>,
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

/// Sets up logging on stderr. `run` logs its lifecycle at info; the one-shot commands
/// (check, status, replay, ...) print their own output and log only warnings, unless
/// RUST_LOG says otherwise.
pub fn init_tracing(format: LogFormat, command: &Command) {
    let default = match command {
        Command::Run { .. } | Command::Project { .. } => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Plain => builder.with_ansi(false).init(),
    }
}

pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => match load(&config) {
            Ok(cfg) => run_sources(cfg).await,
            Err(code) => code,
        },
        Command::Check { config } => match load(&config) {
            Ok(cfg) => check(cfg).await,
            Err(code) => code,
        },
        Command::Replay(args) => match load(&args.config) {
            Ok(cfg) => {
                let a = *args;
                let from = position(a.from_lsn, a.from_seq, a.from_time);
                let to = position(a.to_lsn, a.to_seq, a.to_time);
                let mut filter = Filter {
                    subjects: a.subjects,
                    types: a.types,
                    tables: Vec::new(),
                };
                a.tables.iter().for_each(|t| filter.add_table(t));
                let output = match (a.pretty, a.republish) {
                    (_, Some(prefix)) => Output::Republish(prefix),
                    (true, None) => Output::Pretty,
                    (false, None) => Output::Lines,
                };
                replay(cfg, a.source, from, to, filter, a.follow, output).await
            }
            Err(code) => code,
        },
        Command::Slot(SlotCommand::Drop {
            config,
            source,
            force,
        }) => match load(&config) {
            Ok(cfg) => match pick_source(&cfg, source) {
                Ok(src) => slot_drop(src, force).await,
                Err(code) => code,
            },
            Err(code) => code,
        },
        Command::Reset {
            config,
            source,
            purge_stream,
            keep_stream,
            yes,
            force,
        } => match load(&config) {
            Ok(cfg) => match pick_source(&cfg, source) {
                Ok(src) => {
                    let mode = match (purge_stream, keep_stream) {
                        (true, _) => Some(ResetMode::Purge),
                        (false, true) => Some(ResetMode::Keep),
                        (false, false) => None,
                    };
                    reset(src, &cfg.nats, mode, yes, force).await
                }
                Err(code) => code,
            },
            Err(code) => code,
        },
        Command::Backfill {
            config,
            source,
            table,
            filter,
            chunk_size,
            wait,
            no_wait,
        } => match load(&config) {
            Ok(cfg) => match pick_source(&cfg, source) {
                Ok(src) => {
                    use std::io::IsTerminal;
                    let wait = wait || (!no_wait && std::io::stderr().is_terminal());
                    backfill_cmd(src, &cfg.nats, &table, filter, chunk_size, wait).await
                }
                Err(code) => code,
            },
            Err(code) => code,
        },
        Command::Resync {
            config,
            source,
            yes,
            force,
        } => match load(&config) {
            Ok(cfg) => match pick_source(&cfg, source) {
                Ok(src) => resync(src, &cfg.nats, yes, force).await,
                Err(code) => code,
            },
            Err(code) => code,
        },
        Command::Project {
            config,
            names,
            action,
        } => match load(&config) {
            Ok(cfg) => match action {
                None => project(cfg, names).await,
                Some(ProjectCommand::Rebuild { name }) => rebuild(cfg, &name).await,
            },
            Err(code) => code,
        },
        Command::Wait {
            config,
            projection,
            lsn,
            timeout,
        } => match load(&config) {
            Ok(cfg) => wait(cfg, &projection, lsn, timeout).await,
            Err(code) => code,
        },
        Command::Status { config, json } => match load(&config) {
            Ok(cfg) => status(cfg, json).await,
            Err(code) => code,
        },
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    config::load(path).map_err(|err| {
        eprintln!("error: {}", ErrorChain(&err));
        ExitCode::from(2)
    })
}

async fn run_sources(cfg: Config) -> ExitCode {
    let root = CancellationToken::new();
    let tel = match start_metrics(&cfg, &root, cfg.metrics.as_ref().map(|m| m.listen)) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let mut sources = JoinSet::new();
    for source in cfg.sources {
        let name = source.name.clone();
        let token = root.child_token();
        let nats = cfg.nats.clone();
        let tel = tel.clone();
        sources.spawn(async move { (name, source::run_source(source, nats, token, tel).await) });
    }
    let code = supervise(&mut sources, &root, "source").await;
    if code == ExitCode::SUCCESS {
        info!("all sources stopped");
    }
    code
}

/// The metrics of this process, served on `[metrics] listen` when configured.
fn start_metrics(
    cfg: &Config,
    root: &CancellationToken,
    listen: Option<std::net::SocketAddr>,
) -> Result<std::sync::Arc<crate::telemetry::Telemetry>, ExitCode> {
    let tel = crate::telemetry::Telemetry::new(
        cfg.metrics
            .as_ref()
            .map_or(Duration::from_secs(60), |m| m.ready_max_lag),
    );
    if let Some(addr) = listen {
        // Bind first, so a taken port is an error at start rather than in silence.
        match std::net::TcpListener::bind(addr) {
            Ok(l) => drop(l),
            Err(e) => {
                eprintln!("error: cannot serve metrics on {addr}: {e}");
                return Err(ExitCode::from(1));
            }
        }
        let (tel, token) = (tel.clone(), root.child_token());
        tokio::spawn(async move {
            if let Err(e) = crate::telemetry::serve(addr, tel, token).await {
                error!(error = %e, address = %addr, "metrics endpoint failed");
            }
        });
    }
    Ok(tel)
}

/// Waits for every task, cancelling `root` on SIGTERM or SIGINT (each task then
/// drains). Exit code 1 when a task ended in an error (logged with its name) or
/// panicked.
async fn supervise<E: std::error::Error + 'static>(
    tasks: &mut JoinSet<(String, Result<(), E>)>,
    root: &CancellationToken,
    what: &str,
) -> ExitCode {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            eprintln!("error: cannot listen for SIGTERM: {err}");
            return ExitCode::from(1);
        }
    };
    let mut failed = false;
    loop {
        tokio::select! {
            biased;
            _ = term.recv(), if !root.is_cancelled() => {
                info!("SIGTERM received; draining");
                root.cancel();
            }
            _ = tokio::signal::ctrl_c(), if !root.is_cancelled() => {
                info!("SIGINT received; draining");
                root.cancel();
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok((_, Ok(())))) => {}
                Some(Ok((name, Err(err)))) => {
                    error!(name = %name, error = %ErrorChain(&err), "{what} stopped");
                    failed = true;
                }
                Some(Err(join_err)) => {
                    error!(error = %join_err, "a {what} task panicked");
                    failed = true;
                }
            },
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints one check line; returns whether it passed.
fn line(source: &str, ok: bool, what: &str, detail: &str) -> bool {
    let mark = if ok { "ok  " } else { "FAIL" };
    println!("{mark} [{source}] {what}: {detail}");
    ok
}

async fn check(cfg: Config) -> ExitCode {
    println!(
        "ok   config {}: {} source(s)",
        cfg.path.display(),
        cfg.sources.len()
    );
    let mut all_ok = true;
    for source in &cfg.sources {
        all_ok &= check_source(source, &cfg.nats).await;
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn check_source(s: &SourceConfig, nats: &NatsConfig) -> bool {
    let n = s.name.as_str();
    let mut ok = true;
    let pg = format!(
        "{}:{}/{}",
        s.postgres.host, s.postgres.port, s.postgres.dbname
    );
    let mut slot_exists = None;
    let mut stream_last_seq = None;
    match check_postgres(s, &mut slot_exists).await {
        Ok(lines) => {
            line(
                n,
                true,
                "postgres",
                &format!("connected to {pg} as {}", s.postgres.user),
            );
            for (good, what, detail) in lines {
                ok &= line(n, good, &what, &detail);
            }
        }
        Err(err) => ok &= line(n, false, "postgres", &ErrorChain(&err).to_string()),
    }
    match check_nats(s, nats, &mut stream_last_seq).await {
        Ok(lines) => {
            for (good, what, detail) in lines {
                ok &= line(n, good, &what, &detail);
            }
        }
        Err(err) => ok &= line(n, false, "nats", &ErrorChain(&err).to_string()),
    }
    if let (Some(false), Some(last_seq)) = (slot_exists, stream_last_seq)
        && last_seq > 0
    {
        let err = source::SourceError::SlotLost {
            slot: s.slot.clone(),
            stream: s.stream.name.clone(),
            last_seq,
            last_lsn: None,
        };
        ok &= line(n, false, &format!("slot {:?}", s.slot), &err.to_string());
    }
    if ok {
        println!("ok   [{n}] would stream to stream {:?}", s.stream.name);
    }
    ok
}

type CheckLines = Vec<(bool, String, String)>;

/// Checks the database; records whether the slot exists in `slot_exists`.
async fn check_postgres(
    s: &SourceConfig,
    slot_exists: &mut Option<bool>,
) -> Result<CheckLines, CatalogError> {
    let catalog = Catalog::connect(&s.postgres).await?;
    let mut out: CheckLines = Vec::new();
    match catalog.check_wal_level().await {
        Ok(()) => out.push((true, "wal_level".into(), "logical".into())),
        Err(e) => out.push((false, "wal_level".into(), e.to_string())),
    }
    let wanted = match &s.tables {
        TableSelection::All => catalog.all_tables().await?,
        TableSelection::Listed(t) => t.clone(),
    };
    match catalog.check_grants(&wanted).await {
        Ok(()) => out.push((
            true,
            "grants".into(),
            "REPLICATION, and SELECT on the tables".into(),
        )),
        Err(e) => out.push((false, "grants".into(), e.to_string())),
    }
    let published = catalog.publication(&s.publication).await?;
    let pub_name = format!("publication {:?}", s.publication);
    match (&published, s.create_publication) {
        (Some(tables), _) => out.push((
            true,
            pub_name,
            format!("exists, publishes {} table(s)", tables.len()),
        )),
        (None, true) => out.push((true, pub_name, "will be created".into())),
        (None, false) => out.push((
            false,
            pub_name,
            CatalogError::PublicationMissing {
                name: s.publication.clone(),
            }
            .to_string(),
        )),
    }
    match catalog.tables(&wanted).await {
        Err(e) => out.push((false, "tables".into(), e.to_string())),
        Ok(tables) => {
            for t in tables.iter().cloned() {
                let in_pub = published
                    .as_ref()
                    .is_some_and(|p| p.contains(&(t.schema.clone(), t.name.clone())));
                let key = if t.primary_key.is_empty() {
                    "no primary key".to_string()
                } else {
                    format!("key ({})", t.primary_key.join(", "))
                };
                let identity = match t.replica_identity {
                    'f' => "full",
                    'n' => "nothing",
                    'i' => "index",
                    _ => "default",
                };
                let what = format!("table {}", t.qualified());
                match t.identity_problem() {
                    Some(problem) if !in_pub => out.push((false, what, CatalogError::NoReplicaIdentity { table: t.qualified(), identity: problem }.to_string())),
                    Some(_) => out.push((true, what, format!("replica identity {identity}, {key}; warning: UPDATE and DELETE on it fail while it is published; set REPLICA IDENTITY FULL or add a primary key"))),
                    None if !in_pub && !s.create_publication && published.is_some() => out.push((false, what, CatalogError::PublicationLacksTable { publication: s.publication.clone(), table: t.qualified() }.to_string())),
                    None => out.push((true, what, format!("replica identity {identity}, {key}{}", if in_pub { "" } else { "; will be added to the publication" }))),
                }
                // What `run` does with a table it cannot snapshot: says so, and
                // streams its changes (see source::attempt).
                let snapshotted = s.snapshot == crate::config::SnapshotMode::Initial
                    && s.snapshot_tables
                        .as_ref()
                        .is_none_or(|l| l.contains(&(t.schema.clone(), t.name.clone())))
                    && !s
                        .outboxes
                        .iter()
                        .any(|o| o.schema == t.schema && o.table == t.name);
                if snapshotted
                    && let Err(e) = crate::backfill::key_columns(
                        &catalog,
                        s,
                        &t.schema,
                        &t.name,
                        &t.primary_key,
                    )
                    .await
                {
                    out.push((
                        true,
                        format!("snapshot {}", t.qualified()),
                        format!("warning: the initial snapshot skips it: {e}"),
                    ));
                }
            }
            out.extend(plan_lines(&catalog, s, &tables).await?);
        }
    }
    if let Some(line) = wal_keep_line(&catalog).await {
        out.push(line);
    }
    let slot_name = format!("slot {:?}", s.slot);
    let slot = catalog.slot(&s.slot).await?;
    *slot_exists = Some(slot.is_some());
    match slot {
        Some(info) => match catalog.check_slot(&s.slot, &info) {
            Ok(()) => out.push((
                true,
                slot_name,
                format!(
                    "exists, confirmed flush {}, {}",
                    info.confirmed_flush
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "none".into()),
                    match info.active_pid {
                        Some(pid) if info.active => format!("active (pid {pid})"),
                        _ => "inactive".into(),
                    }
                ),
            )),
            Err(e) => out.push((false, slot_name, e.to_string())),
        },
        None if s.create_slot => out.push((true, slot_name, "will be created".into())),
        None => out.push((
            false,
            slot_name,
            CatalogError::SlotMissing {
                slot: s.slot.clone(),
            }
            .to_string(),
        )),
    }
    Ok(out)
}

/// How much WAL a slot may hold back (`max_slot_wal_keep_size`), against the current
/// write rate (sampled over one second): unlimited risks the disk, small risks the slot.
async fn wal_keep_line(catalog: &Catalog) -> Option<(bool, String, String)> {
    let c = catalog.client();
    let setting: String = c
        .query_opt(
            "SELECT setting FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
            &[],
        )
        .await
        .ok()??
        .get(0);
    let mb: i64 = setting.parse().ok()?;
    let what = "max_slot_wal_keep_size".to_string();
    if mb < 0 {
        return Some((
            true,
            what,
            "warning: unlimited: while tidemark is stopped or behind, its slot keeps WAL until the disk fills; set a limit that covers your longest outage (if the slot is then invalidated, `tidemark resync` recovers)".into(),
        ));
    }
    let lsn = || async {
        c.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .ok()
            .and_then(|r| r.get::<_, String>(0).parse::<Lsn>().ok())
    };
    let a = lsn().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = lsn().await?;
    let rate = b.0.saturating_sub(a.0) as f64;
    let keep = mb as f64 * 1024.0 * 1024.0;
    if rate > 0.0 && keep / rate < 3600.0 {
        return Some((
            true,
            what,
            format!(
                "warning: {mb} MB holds only {:.0} minutes of WAL at the current write rate ({:.0} KB/s): a longer outage invalidates the slot (then `tidemark resync` recovers); raise it",
                keep / rate / 60.0,
                rate / 1024.0
            ),
        ));
    }
    Some((true, what, format!("{mb} MB")))
}

/// The mapping plan per table, and the warnings that go with it.
async fn plan_lines(
    catalog: &Catalog,
    s: &SourceConfig,
    tables: &[crate::postgres::catalog::TableInfo],
) -> Result<CheckLines, CatalogError> {
    let mut out: CheckLines = Vec::new();
    let planned = match source::plan_tables(catalog, s, tables).await {
        Ok(p) => p,
        Err(source::SourceError::Catalog(e)) => return Err(e),
        Err(e) => {
            out.push((false, "mapping".into(), ErrorChain(&e).to_string()));
            return Ok(out);
        }
    };
    for p in planned {
        let table = format!("{}.{}", p.info.schema, p.info.name);
        let what = format!("plan {table}");
        let token = crate::events::mapping::table_token(&p.info.schema, &p.info.name);
        for text in p.plan.describe(&p.columns, &s.name, &token) {
            out.push((true, what.clone(), text));
        }
        if p.plan.outbox.is_none() && p.info.replica_identity != 'f' {
            let toastable = catalog.toastable_columns(p.info.oid).await?;
            let shown: Vec<&String> = toastable
                .iter()
                .filter(|c| !p.info.primary_key.contains(c))
                .filter(|c| {
                    p.plan
                        .columns
                        .iter()
                        .any(|o| p.columns.get(o.index).is_some_and(|(n, _)| n == *c))
                })
                .collect();
            if !shown.is_empty() {
                out.push((
                    true,
                    what.clone(),
                    format!(
                        "warning: {} can be TOASTed; without REPLICA IDENTITY FULL an UPDATE that leaves such a value unchanged does not carry it, so the event lists it in data.unchanged_toast instead of a value (run ALTER TABLE {} REPLICA IDENTITY FULL to have it filled)",
                        shown.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", "),
                        p.info.qualified()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Checks NATS and the stream; records the stream's last sequence in `last_seq`.
async fn check_nats(
    s: &SourceConfig,
    nats: &NatsConfig,
    last_seq: &mut Option<u64>,
) -> Result<CheckLines, provision::ProvisionError> {
    let client = provision::connect(nats, "tidemark-check").await?;
    let mut out: CheckLines = Vec::new();
    let info = client.server_info();
    let payload_ok = info.max_payload == 0 || s.max_event_bytes <= info.max_payload;
    out.push((
        payload_ok,
        "nats".into(),
        if payload_ok {
            format!(
                "connected to {} (server {}, max_payload {})",
                nats.servers.join(","),
                info.version,
                info.max_payload
            )
        } else {
            provision::ProvisionError::PayloadLimit {
                max_payload: info.max_payload,
                max_event_bytes: s.max_event_bytes,
            }
            .to_string()
        },
    ));
    let js = async_nats::jetstream::new(client);
    let what = format!("stream {:?}", s.stream.name);
    match js.get_stream(&s.stream.name).await {
        Ok(mut stream) => match provision::read_tail(&mut stream, &s.name).await {
            Ok(tail) => {
                // A stream that ever stored events makes a missing slot a loss, unless
                // `reset --purge-stream` emptied it (the same rule as `run`).
                let purged = match crate::backfill::Progress::existing(&js, &s.name).await {
                    Some(p) => p.purged_at().await.ok().flatten(),
                    None => None,
                };
                let fresh = tail.last_seq == 0
                    || (tail.last_event.is_none() && purged == Some(tail.last_seq));
                *last_seq = (!fresh).then_some(tail.last_seq);
                out.push((
                    true,
                    what,
                    format!("exists, last sequence {}", tail.last_seq),
                ))
            }
            Err(e) => out.push((false, what, e.to_string())),
        },
        Err(_) => match js.query_account().await {
            Ok(_) => out.push((true, what, "will be created".into())),
            Err(e) => out.push((
                false,
                what,
                format!("JetStream is not available: {e}; start nats-server with -js"),
            )),
        },
    }
    Ok(out)
}

async fn status(cfg: Config, json: bool) -> ExitCode {
    let mut all = Vec::new();
    for source in &cfg.sources {
        all.push(crate::status::source_status(source, &cfg.nats, &cfg.projections).await);
    }
    // The running process's own readiness, from its /readyz, so that status and the
    // probes say the same.
    let readyz = match &cfg.metrics {
        Some(m) => Some(crate::telemetry::fetch_readyz(m.listen).await),
        None => None,
    };
    let healthy = all.iter().all(|s| s.problems().is_empty());
    if json {
        let values: Vec<serde_json::Value> = all
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["problems"] = serde_json::json!(s.problems());
                if let Some(r) = &readyz {
                    v["readyz"] = crate::telemetry::readiness_of(r, &s.source);
                }
                v
            })
            .collect();
        println!("{}", serde_json::Value::Array(values));
    } else {
        for s in &all {
            print!("{}", crate::status::render(s));
            if let Some(r) = &readyz {
                let v = crate::telemetry::readiness_of(r, &s.source);
                println!(
                    "  readyz    {}",
                    match v["ready"].as_bool() {
                        Some(true) => "ready".to_string(),
                        Some(false) => format!(
                            "NOT READY: {}",
                            v["reasons"]
                                .as_array()
                                .map(|a| a
                                    .iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join("; "))
                                .unwrap_or_default()
                        ),
                        None => "unreachable (is `tidemark run` running?)".to_string(),
                    }
                );
            }
        }
    }
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// New slot, gap marker, and a backfill of every published table.
async fn resync(src: &SourceConfig, nats: &NatsConfig, yes: bool, force: bool) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(1)
    };
    if !yes {
        eprintln!(
            "error: resync creates a new replication slot {:?}, keeps stream {:?} with a tidemark.reset event at the gap, and backfills every published table; pass --yes",
            src.slot, src.stream.name
        );
        return ExitCode::from(2);
    }
    // Everything that could refuse is checked before anything changes.
    let catalog = match Catalog::connect(&src.postgres).await {
        Ok(c) => c,
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    let published = match catalog.publication(&src.publication).await {
        Ok(Some(list)) => list,
        Ok(None) => {
            return fail(format!(
                "publication {:?} does not exist: run `tidemark run` once to create it, or create it by hand",
                src.publication
            ));
        }
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    let names: Vec<(String, String)> = published
        .into_iter()
        .filter(|(schema, name)| {
            !src.outboxes
                .iter()
                .any(|o| &o.schema == schema && &o.table == name)
        })
        .collect();
    let infos = match catalog.tables(&names).await {
        Ok(t) => t,
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    let mut jobs = Vec::new();
    for t in &infos {
        match crate::backfill::key_columns(&catalog, src, &t.schema, &t.name, &t.primary_key).await
        {
            Ok(key) => jobs.push(crate::backfill::Job::new(
                &t.schema,
                &t.name,
                key,
                "resync",
                None,
                src.snapshot_chunk_size,
            )),
            Err(e) => return fail(e.to_string()),
        }
    }
    let client = match provision::connect(nats, "tidemark-resync").await {
        Ok(c) => c,
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    let js = async_nats::jetstream::new(client);
    let progress =
        match crate::backfill::Progress::open_for_stream(&js, &src.name, &src.stream.name).await {
            Ok(p) => p,
            Err(e) => return fail(ErrorChain(&e).to_string()),
        };
    let code = reset_with_reason(src, nats, Some(ResetMode::Keep), true, force, "resync").await;
    if code != ExitCode::SUCCESS {
        return code;
    }
    for job in &jobs {
        if let Err(e) = progress.put(job).await {
            return fail(ErrorChain(&e).to_string());
        }
    }
    println!(
        "queued a backfill of {} table(s): the next `tidemark run` streams from the new slot and sends every table's rows after the marker",
        jobs.len()
    );
    ExitCode::SUCCESS
}

/// Queues a backfill of one table, then (when `wait`) follows it to the end.
async fn backfill_cmd(
    src: &SourceConfig,
    nats: &NatsConfig,
    table: &str,
    filter: Option<String>,
    chunk_size: Option<u64>,
    wait: bool,
) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(1)
    };
    let Some((schema, name)) = config::split_table(table) else {
        return fail(format!(
            "{table:?} is not a table name: use \"table\" or \"schema.table\""
        ));
    };
    let qualified = format!("{schema}.{name}");
    let catalog = match Catalog::connect(&src.postgres).await {
        Ok(c) => c,
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    let info = match catalog.tables(&[(schema.clone(), name.clone())]).await {
        Ok(mut t) if !t.is_empty() => t.remove(0),
        Ok(_) => return fail(format!("table {qualified} does not exist")),
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    match catalog.publication(&src.publication).await {
        Ok(Some(list)) if list.contains(&(schema.clone(), name.clone())) => {}
        Ok(_) => {
            return fail(format!(
                "publication {:?} does not publish {qualified}, so its changes would not follow its rows: run ALTER PUBLICATION {} ADD TABLE {} (or add it to the source's tables and restart tidemark), then backfill",
                src.publication,
                crate::postgres::replication::quote_ident(&src.publication),
                info.qualified()
            ));
        }
        Err(e) => return fail(ErrorChain(&e).to_string()),
    }
    let key = match crate::backfill::key_columns(&catalog, src, &schema, &name, &info.primary_key)
        .await
    {
        Ok(k) => k,
        Err(e) => return fail(e.to_string()),
    };
    if let Some(f) = &filter
        && let Err(e) = catalog
            .client()
            .simple_query(&format!(
                "EXPLAIN SELECT 1 FROM {} WHERE ({f})",
                info.qualified()
            ))
            .await
    {
        return fail(format!(
            "--where {f:?} is not a valid condition on {qualified}: {}",
            ErrorChain(&e)
        ));
    }
    let client = match provision::connect(nats, "tidemark-backfill").await {
        Ok(c) => c,
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    let js = async_nats::jetstream::new(client);
    let progress =
        match crate::backfill::Progress::open_for_stream(&js, &src.name, &src.stream.name).await {
            Ok(p) => p,
            Err(e) => return fail(ErrorChain(&e).to_string()),
        };
    match progress.get(&schema, &name).await {
        Ok(Some(j))
            if matches!(
                j.state,
                crate::backfill::JobState::Pending | crate::backfill::JobState::Running
            ) =>
        {
            return fail(format!(
                "a backfill of {qualified} is already {} ({} rows done): wait for it, or watch it with `tidemark status`",
                if j.state == crate::backfill::JobState::Pending {
                    "queued"
                } else {
                    "running"
                },
                j.rows_done
            ));
        }
        Ok(_) => {}
        Err(e) => return fail(ErrorChain(&e).to_string()),
    }
    let job = crate::backfill::Job::new(
        &schema,
        &name,
        key,
        "backfill",
        filter,
        chunk_size.unwrap_or(src.snapshot_chunk_size).max(1),
    );
    if let Err(e) = progress.put(&job).await {
        return fail(ErrorChain(&e).to_string());
    }
    eprintln!("backfill of {qualified} queued for source {:?}", src.name);
    if !wait {
        return ExitCode::SUCCESS;
    }
    follow_backfill(&progress, &schema, &name, &job.id).await
}

/// Follows a backfill job until it ends, with a progress bar on a terminal.
async fn follow_backfill(
    progress: &crate::backfill::Progress,
    schema: &str,
    name: &str,
    id: &str,
) -> ExitCode {
    use crate::backfill::JobState;
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {human_pos}/{human_len} rows, {per_sec}, ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("{schema}.{name}"));
        bar
    });
    let started = std::time::Instant::now();
    let mut hinted = false;
    loop {
        let job = match progress.get(schema, name).await {
            Ok(Some(j)) if j.id == id => j,
            Ok(_) => {
                eprintln!("error: the backfill record of {schema}.{name} was replaced");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("error: {}", ErrorChain(&e));
                return ExitCode::from(1);
            }
        };
        if let Some(bar) = &bar {
            bar.set_length(job.rows_estimate.max(job.rows_done));
            bar.set_position(job.rows_done);
        }
        match job.state {
            JobState::Done => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                let (rate, _) = job.rate_and_eta();
                eprintln!(
                    "backfill of {schema}.{name} done: {} rows in {} chunks, {rate:.0} rows/s",
                    job.rows_done, job.chunks_done
                );
                return ExitCode::SUCCESS;
            }
            JobState::Failed => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                eprintln!(
                    "error: backfill of {schema}.{name} failed: {}",
                    job.error.as_deref().unwrap_or("unknown error")
                );
                return ExitCode::from(1);
            }
            JobState::Pending if !hinted && started.elapsed() > Duration::from_secs(15) => {
                hinted = true;
                eprintln!(
                    "still queued: no tidemark has picked it up; is `tidemark run` streaming this source?"
                );
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use 5s, 500ms or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?} is not a duration: use 5s, 500ms or 2m")),
    }
}

async fn project(cfg: Config, names: Vec<String>) -> ExitCode {
    let chosen: Vec<_> = cfg
        .projections
        .iter()
        .filter(|p| names.is_empty() || names.contains(&p.name))
        .cloned()
        .collect();
    for n in &names {
        if !cfg.projections.iter().any(|p| &p.name == n) {
            eprintln!("error: no [[projection]] is named {n:?}");
            return ExitCode::from(2);
        }
    }
    if chosen.is_empty() {
        eprintln!("error: the config has no [[projection]]");
        return ExitCode::from(2);
    }
    let root = CancellationToken::new();
    let tel = match start_metrics(
        &cfg,
        &root,
        cfg.metrics.as_ref().and_then(|m| m.project_listen),
    ) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let mut tasks = JoinSet::new();
    for p in chosen {
        let name = p.name.clone();
        let token = root.child_token();
        let tel = tel.clone();
        let nats = cfg.nats.clone();
        tasks.spawn(async move {
            (
                name,
                crate::projection::run_projection(p, nats, token, tel).await,
            )
        });
    }
    supervise(&mut tasks, &root, "projection").await
}

async fn rebuild(cfg: Config, name: &str) -> ExitCode {
    use std::io::IsTerminal;
    let Some(p) = cfg.projections.iter().find(|p| p.name == name) else {
        eprintln!("error: no [[projection]] is named {name:?}");
        return ExitCode::from(2);
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "rebuilding {msg} [{bar:30}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(name.to_string());
        bar
    });
    let started = std::time::Instant::now();
    let result = crate::projection::rebuild(p, &cfg.nats, |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    })
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(stats) => {
            eprintln!(
                "rebuilt {name}: {} events applied up to stream sequence {}, swapped in {} ms ({} ms in all)",
                stats.events,
                stats.seq,
                stats.swap_ms,
                started.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", ErrorChain(&e));
            ExitCode::from(1)
        }
    }
}

async fn wait(cfg: Config, projection: &str, lsn: Lsn, timeout: Duration) -> ExitCode {
    let Some(p) = cfg.projections.iter().find(|p| p.name == projection) else {
        eprintln!("error: no [[projection]] is named {projection:?}");
        return ExitCode::from(2);
    };
    let Some(src) = cfg.sources.iter().find(|s| s.name == p.source) else {
        eprintln!("error: projection {projection:?} names no configured source");
        return ExitCode::from(2);
    };
    // Something committed after `lsn` must reach the stream: a sync message.
    match Catalog::connect(&src.postgres).await {
        Ok(c) => {
            if let Err(e) = c
                .client()
                .simple_query("SELECT pg_logical_emit_message(true, 'tidemark.sync', '')")
                .await
            {
                eprintln!("error: cannot write the sync message: {}", ErrorChain(&e));
                return ExitCode::from(1);
            }
        }
        Err(e) => {
            eprintln!("error: {}", ErrorChain(&e));
            return ExitCode::from(1);
        }
    }
    let client = match provision::connect(&cfg.nats, "tidemark-wait").await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", ErrorChain(&e));
            return ExitCode::from(1);
        }
    };
    let js = async_nats::jetstream::new(client);
    match crate::projection::wait_applied(&js, projection, lsn, timeout).await {
        Ok(a) => {
            eprintln!(
                "projection {projection} has applied through {} (stream sequence {})",
                a.lsn.as_deref().unwrap_or("-"),
                a.seq
            );
            ExitCode::SUCCESS
        }
        Err(last) => {
            eprintln!(
                "error: projection {projection} did not reach {lsn} within {timeout:?} (it has applied through {})",
                last.and_then(|a| a.lsn)
                    .unwrap_or_else(|| "nothing yet".into())
            );
            ExitCode::from(1)
        }
    }
}

/// What `replay` does with the events.
enum Output {
    Lines,
    Pretty,
    Republish(String),
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{e}: use RFC 3339, like 2026-11-24T10:00:00Z"))
}

fn position(lsn: Option<Lsn>, seq: Option<u64>, at: Option<OffsetDateTime>) -> Option<Position> {
    lsn.map(Position::Lsn)
        .or(seq.map(Position::Seq))
        .or(at.map(Position::Time))
}

async fn replay(
    cfg: Config,
    source: Option<String>,
    from: Option<Position>,
    to: Option<Position>,
    filter: Filter,
    follow: bool,
    output: Output,
) -> ExitCode {
    let src = match pick_source(&cfg, source) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let started = std::time::Instant::now();
    let mut stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let mut sink = match output {
        Output::Lines => Sink::Lines(&mut stdout),
        Output::Pretty => Sink::Pretty(&mut stdout),
        Output::Republish(prefix) => {
            match crate::replay::Republisher::new(&cfg.nats, &prefix, &src.name).await {
                Ok(r) => Sink::Republish(Box::new(r)),
                Err(err) => {
                    eprintln!("error: {}", ErrorChain(&err));
                    return ExitCode::from(1);
                }
            }
        }
    };
    let result = crate::replay::replay(
        src,
        &cfg.nats,
        from.as_ref(),
        to.as_ref(),
        &filter,
        follow,
        &mut sink,
    )
    .await;
    match result {
        Ok(stats) => {
            let republished = match &sink {
                Sink::Republish(r) => format!(
                    " ({} republished, {} already there)",
                    r.published, r.skipped
                ),
                _ => String::new(),
            };
            eprintln!(
                "replayed {} events{republished}, sequences {}..{}, start located in {} reads, {} ms",
                stats.emitted,
                stats.first_seq,
                stats.last_seq,
                stats.probes,
                started.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(crate::replay::ReplayError::Stdout(e))
            if e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}", ErrorChain(&err));
            ExitCode::from(1)
        }
    }
}

/// The source named on the command line, or the only one.
fn pick_source(cfg: &Config, source: Option<String>) -> Result<&SourceConfig, ExitCode> {
    let chosen = match &source {
        Some(name) => cfg.sources.iter().find(|s| &s.name == name),
        None if cfg.sources.len() == 1 => cfg.sources.first(),
        None => None,
    };
    chosen.ok_or_else(|| {
        let names: Vec<&str> = cfg.sources.iter().map(|s| s.name.as_str()).collect();
        eprintln!(
            "error: {}: choose one with --source ({})",
            match source {
                Some(n) => format!("no source named {n:?}"),
                None => "the config has several sources".into(),
            },
            names.join(", ")
        );
        ExitCode::from(2)
    })
}

async fn slot_drop(src: &SourceConfig, force: bool) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(1)
    };
    let catalog = match Catalog::connect(&src.postgres).await {
        Ok(c) => c,
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    let slot = &src.slot;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let info = match catalog.slot(slot).await {
            Ok(Some(info)) => info,
            Ok(None) => return fail(format!("replication slot {slot:?} does not exist")),
            Err(e) => return fail(ErrorChain(&e).to_string()),
        };
        if info.active {
            let pid = info.active_pid.unwrap_or(0);
            if !force {
                return fail(format!(
                    "replication slot {slot:?} is active (pid {pid}): stop the tidemark that streams from it first, or pass --force to end its connection"
                ));
            }
            if std::time::Instant::now() > deadline {
                return fail(format!(
                    "replication slot {slot:?} is still active (pid {pid}) after terminating its connection"
                ));
            }
            // The holder may reconnect between the terminate and the drop: loop.
            if let Err(e) = catalog
                .client()
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
            {
                return fail(format!("cannot terminate pid {pid}: {e}"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        }
        match catalog
            .client()
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
        {
            Ok(_) => {
                println!("dropped replication slot {slot:?}");
                return ExitCode::SUCCESS;
            }
            // Taken again between the check and the drop (55006: object in use).
            Err(e) if e.code().map(|c| c.code()) == Some("55006") && force => continue,
            Err(e) => {
                return fail(format!(
                    "cannot drop replication slot {slot:?}: {}",
                    ErrorChain(&e)
                ));
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResetMode {
    Purge,
    Keep,
}

async fn reset(
    src: &SourceConfig,
    nats: &NatsConfig,
    mode: Option<ResetMode>,
    yes: bool,
    force: bool,
) -> ExitCode {
    reset_with_reason(src, nats, mode, yes, force, "reset").await
}

async fn reset_with_reason(
    src: &SourceConfig,
    nats: &NatsConfig,
    mode: Option<ResetMode>,
    yes: bool,
    force: bool,
    reason: &str,
) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::from(1)
    };
    let Some(mode) = mode.filter(|_| yes) else {
        eprintln!(
            "error: reset drops replication slot {:?} and starts the source over from now; changes made before are not sent again. Pass --purge-stream --yes to also delete every event in stream {:?} (consumers must rebuild), or --keep-stream --yes to keep them and mark the discontinuity",
            src.slot, src.stream.name
        );
        return ExitCode::from(2);
    };
    // The slot first: once it is gone, no tidemark can append to the stream.
    let catalog = match Catalog::connect(&src.postgres).await {
        Ok(c) => c,
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    let old_slot = match catalog.slot(&src.slot).await {
        Ok(s) => s,
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    if old_slot.is_some() {
        let code = slot_drop(src, force).await;
        if code != ExitCode::SUCCESS {
            return code;
        }
    }
    let client = match provision::connect(nats, "tidemark-reset").await {
        Ok(c) => c,
        Err(e) => return fail(ErrorChain(&e).to_string()),
    };
    let js = async_nats::jetstream::new(client);
    match mode {
        ResetMode::Purge => match js.get_stream(&src.stream.name).await {
            Ok(mut stream) => match stream.purge().await {
                Ok(p) => {
                    println!(
                        "purged {} events from stream {:?}",
                        p.purged, src.stream.name
                    );
                    // Record where the purge left the stream, so `run` knows the empty
                    // stream is a deliberate fresh start rather than aged-out events.
                    let last = match stream.info().await {
                        Ok(i) => i.state.last_sequence,
                        Err(e) => return fail(format!("stream info after the purge: {e}")),
                    };
                    let recorded = match crate::backfill::Progress::open(&js, &src.name).await {
                        Ok(p) => p.set_purged_at(last).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = recorded {
                        return fail(ErrorChain(&e).to_string());
                    }
                }
                Err(e) => return fail(format!("cannot purge stream {:?}: {e}", src.stream.name)),
            },
            Err(_) => println!(
                "stream {:?} does not exist; nothing to purge",
                src.stream.name
            ),
        },
        ResetMode::Keep => {
            // A new slot now, then the marker: its id sorts after every event already
            // stored and before every change the new slot will send.
            let row = match catalog
                .client()
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&src.slot],
                )
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    return fail(format!(
                        "cannot create replication slot {:?}: {}",
                        src.slot,
                        ErrorChain(&e)
                    ));
                }
            };
            let start: String = row.get(0);
            let Ok(start) = start.parse::<Lsn>() else {
                return fail(format!("postgres returned a malformed slot LSN {start:?}"));
            };
            let mut stream = match provision::ensure_stream(&js, &src.stream).await {
                Ok(s) => s,
                Err(e) => return fail(ErrorChain(&e).to_string()),
            };
            let tail = match provision::read_tail(&mut stream, &src.name).await {
                Ok(t) => t,
                Err(e) => return fail(ErrorChain(&e).to_string()),
            };
            let marker = crate::events::mapping::reset_marker(
                &src.name,
                start,
                old_slot.and_then(|s| s.confirmed_flush),
                tail.last_event.map(|(l, _)| l),
                reason,
            );
            let published = js
                .send_publish(
                    marker.subject.clone(),
                    async_nats::jetstream::message::PublishMessage::build()
                        .payload(marker.payload.into())
                        .message_id(&marker.msg_id)
                        .expected_last_sequence(tail.last_seq),
                )
                .await;
            match published {
                Ok(ack) => match ack.await {
                    Ok(a) => println!(
                        "kept stream {:?}; reset marker {} at sequence {}",
                        src.stream.name, marker.msg_id, a.sequence
                    ),
                    Err(e) => return fail(format!("reset marker not stored: {e}")),
                },
                Err(e) => return fail(format!("cannot publish the reset marker: {e}")),
            }
            println!("created replication slot {:?} at {start}", src.slot);
        }
    }
    println!(
        "source {:?} reset: the next run streams changes from the new slot on",
        src.name
    );
    ExitCode::SUCCESS
}
