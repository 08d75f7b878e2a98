//! One source, crash-only: replication -> decode -> map -> publish -> flush LSN
//! feedback, and the supervisor that rebuilds it after a failure.
//!
//! Every attempt rebuilds from durable state only: the slot resumes at its confirmed
//! flush LSN, the stream's tail says which events are already stored, and those are
//! skipped (`StreamTail::is_stored`). The flush LSN sent to Postgres moves to the end of
//! a transaction only once JetStream has acked every event of it and of all before it
//! (`flush::FlushTracker`). Any error tears the attempt down; `error::SourceError::recovery`
//! says whether to back off and rebuild, stand by, or stop.
//!
//! Files: `attempt` (start-up checks and wiring of one attempt), `pipeline` (the select
//! loop and the publish path), `apply` (one decoded message at a time), `window` (the
//! DBLog chunk window of backfills), `health` (heartbeats, stalls, metrics), `flush`
//! (pure ack and flush bookkeeping), `plan` (mapping rules bound to live tables),
//! `recreated` (tables dropped and created again under their name).

mod apply;
mod attempt;
mod consistent;
mod error;
mod flush;
mod health;
mod pipeline;
mod plan;
mod recreated;
mod window;

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::{NatsConfig, SourceConfig};
use crate::error::ErrorChain;
use crate::telemetry::Telemetry;

pub use error::{Policy, Recovery, SourceError};
pub use plan::plan_tables;
pub(crate) use recreated::snapshot_reads;

/// Runs one source until `cancel` fires (Ok) or a fatal error (Err).
pub async fn run_source(
    cfg: SourceConfig,
    nats: NatsConfig,
    cancel: CancellationToken,
    tel: std::sync::Arc<Telemetry>,
) -> Result<(), SourceError> {
    tel.expect(&cfg.name);
    let span =
        info_span!("source", source = %cfg.name, slot = %cfg.slot, stream = %cfg.stream.name);
    async move {
        let mut backoff = cfg.backoff_initial;
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let result = attempt::run_attempt(&cfg, &nats, &cancel, &tel)
                .instrument(info_span!("attempt", attempt))
                .await;
            tel.set_streaming(&cfg.name, false);
            let err = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            tel.error(&cfg.name, err.kind());
            if err.recovery() == Recovery::Retry {
                tel.restarts.get_or_create(&Telemetry::label(&cfg.name)).inc();
            }
            let wait = match err.recovery() {
                Recovery::Fatal => {
                    error!(error = %ErrorChain(&err), "source stopped: this needs an operator");
                    return Err(err);
                }
                Recovery::Standby => {
                    info!(error = %err, "waiting for the slot");
                    cfg.backoff_initial.min(Duration::from_secs(1))
                }
                Recovery::Retry => {
                    // A long healthy run earns a fresh backoff.
                    if started.elapsed() > cfg.backoff_max * 2 {
                        backoff = cfg.backoff_initial;
                    }
                    let wait = backoff;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                    warn!(error = %ErrorChain(&err), elapsed_ms = wait.as_millis() as u64, "pipeline failed; rebuilding from the slot and the stream after a pause");
                    wait
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
    .instrument(span)
    .await
}
