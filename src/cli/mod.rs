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
use crate::ops::ResetMode;
use crate::position::Lsn;
use crate::postgres::catalog::{Catalog, CatalogError};
use crate::replay::{Filter, Position, Sink};
use crate::source;
use time::OffsetDateTime;

mod args;
mod backfill;
mod check;
mod outcome;
mod replay;
mod run;
mod schema;
mod slot;
mod status;

pub use args::*;
use backfill::*;
use check::*;
use outcome::{Failure, Outcome};
use replay::*;
use run::*;
use schema::*;
use slot::*;
use status::*;

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

/// How many worker threads the async runtime gets; None leaves tokio's default (one
/// per core, or `TOKIO_WORKER_THREADS`). `run` gets one per source and `project` one
/// per projection, at most one per core: a source's pipeline is one task, and on a
/// machine shared with Postgres and nats-server, as a sidecar is, a second thread for
/// it cost more CPU per event in hand-offs between threads than it gained (benchmark,
/// 300,000 changes on 2 cores, six alternating pairs: 3.6-4.6 µs per event and
/// 98,000-118,000 events/s with one thread, 4.5-5.6 µs and 86,000-101,000 with two;
/// a Postgres read model applied 32,000-37,000 events/s with one, 27,000-30,000 with
/// two). `TOKIO_WORKER_THREADS` overrides it; a config that does not load leaves the
/// default (the command then reports the error).
pub fn worker_threads(cli: &Cli) -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    let tasks = match &cli.command {
        Command::Run { config } => config::load(config).ok()?.sources.len(),
        Command::Project { config, names, .. } if names.is_empty() => {
            config::load(config).ok()?.projections.len()
        }
        Command::Project { names, .. } => names.len(),
        _ => return None,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(tasks.clamp(1, cores))
}

pub async fn run(cli: Cli) -> ExitCode {
    outcome::exit(dispatch(cli).await)
}

/// Parses what is left to parse, calls the command, and hands back how it ended.
async fn dispatch(cli: Cli) -> Outcome {
    match cli.command {
        Command::Run { config } => match load(&config) {
            Ok(cfg) => run_sources(cfg).await,
            Err(f) => Err(f),
        },
        Command::Check { config } => match load(&config) {
            Ok(cfg) => check(cfg).await,
            Err(f) => Err(f),
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
            Err(f) => Err(f),
        },
        Command::Slot(SlotCommand::Drop {
            config,
            source,
            force,
        }) => match load(&config) {
            Ok(cfg) => match pick_source(&cfg, source) {
                Ok(src) => slot_drop(src, force).await,
                Err(f) => Err(f),
            },
            Err(f) => Err(f),
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
                Err(f) => Err(f),
            },
            Err(f) => Err(f),
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
                Err(f) => Err(f),
            },
            Err(f) => Err(f),
        },
        Command::Resync {
            config,
            source,
            yes,
            force,
        } => match load(&config) {
            Ok(cfg) => match pick_source(&cfg, source) {
                Ok(src) => resync(src, &cfg.nats, yes, force).await,
                Err(f) => Err(f),
            },
            Err(f) => Err(f),
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
            Err(f) => Err(f),
        },
        Command::Wait {
            config,
            projection,
            lsn,
            timeout,
        } => match load(&config) {
            Ok(cfg) => wait(cfg, &projection, lsn, timeout).await,
            Err(f) => Err(f),
        },
        Command::Schema {
            config,
            source,
            out,
        } => match load(&config) {
            Ok(cfg) => write_schemas(cfg, source.as_deref(), &out).await,
            Err(f) => Err(f),
        },
        Command::Status {
            config,
            json,
            watch,
        } => match load(&config) {
            Ok(cfg) if watch => status_watch(cfg).await,
            Ok(cfg) => status(cfg, json).await,
            Err(f) => Err(f),
        },
    }
}

fn load(path: &std::path::Path) -> Result<Config, Failure> {
    config::load(path).map_err(|err| Failure::Usage(ErrorChain(&err).to_string()))
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

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{e}: use RFC 3339, like 2026-11-24T10:00:00Z"))
}

fn position(lsn: Option<Lsn>, seq: Option<u64>, at: Option<OffsetDateTime>) -> Option<Position> {
    lsn.map(Position::Lsn)
        .or(seq.map(Position::Seq))
        .or(at.map(Position::Time))
}

/// The source named on the command line, or the only one.
fn pick_source(cfg: &Config, source: Option<String>) -> Result<&SourceConfig, Failure> {
    let chosen = match &source {
        Some(name) => cfg.sources.iter().find(|s| &s.name == name),
        None if cfg.sources.len() == 1 => cfg.sources.first(),
        None => None,
    };
    chosen.ok_or_else(|| {
        let names: Vec<&str> = cfg.sources.iter().map(|s| s.name.as_str()).collect();
        Failure::Usage(format!(
            "{}: choose one with --source ({})",
            match source {
                Some(n) => format!("no source named {n:?}"),
                None => "the config has several sources".into(),
            },
            names.join(", ")
        ))
    })
}
