//! The tidemark binary: parse the command line, set up logging, run, map the outcome
//! to an exit code (0 ok, 1 runtime or check failure, 2 bad usage or config).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tidemark::cli::Cli::parse();
    tidemark::cli::init_tracing(cli.log_format, &cli.command);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = tidemark::cli::worker_threads(&cli) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(tidemark::cli::run(cli))
}
