//! Read-your-writes: wait until a projection has applied everything up to a position.

use std::time::Duration;

use crate::config::Config;
use crate::error::ErrorChain;
use crate::jetstream::provision;
use crate::position::Lsn;
use crate::postgres::catalog::Catalog;

/// Why a read-your-writes wait did not succeed.
#[derive(Debug)]
pub(crate) enum WaitError {
    /// No such projection, or it names no configured source.
    Unknown(String),
    /// Postgres or NATS could not be asked.
    Failed(String),
    /// The projection did not reach the position in time.
    TimedOut(String),
}

/// Waits until `projection` has applied everything up to `lsn` (writing a sync
/// message first, so a position is reached even when nothing else is written): the
/// semantics of `tidemark wait` and of `GET /wait`.
pub(crate) async fn read_your_writes(
    cfg: &Config,
    projection: &str,
    lsn: Lsn,
    timeout: Duration,
) -> Result<crate::projection::Applied, WaitError> {
    let Some(p) = cfg.projections.iter().find(|p| p.name == projection) else {
        return Err(WaitError::Unknown(format!(
            "no [[projection]] is named {projection:?}"
        )));
    };
    let Some(src) = cfg.sources.iter().find(|s| s.name == p.source) else {
        return Err(WaitError::Unknown(format!(
            "projection {projection:?} names no configured source"
        )));
    };
    // Something committed after `lsn` must reach the stream: a sync message.
    let catalog = Catalog::connect(&src.postgres)
        .await
        .map_err(|e| WaitError::Failed(ErrorChain(&e).to_string()))?;
    catalog
        .client()
        .simple_query(&crate::postgres::signal::emit_sql(
            catalog.version(),
            &src.signal_table,
            crate::events::reserved::SYNC_PREFIX,
            "",
        ))
        .await
        .map_err(|e| {
            let how = if catalog.version().logical_messages() {
                String::new()
            } else {
                format!(
                    " (PostgreSQL {} has no logical messages in pgoutput: the sync marker is a row of the signal table {}, which `tidemark run` creates; `tidemark check` says what it lacks)",
                    catalog.version(),
                    crate::postgres::signal::qualified(&src.signal_table)
                )
            };
            WaitError::Failed(format!(
                "cannot write the sync message: {}{how}",
                ErrorChain(&e)
            ))
        })?;
    let client = provision::connect(&cfg.nats, "tidemark-wait")
        .await
        .map_err(|e| WaitError::Failed(ErrorChain(&e).to_string()))?;
    let js = async_nats::jetstream::new(client);
    crate::projection::wait_applied(&js, projection, lsn, timeout)
        .await
        .map_err(|last| {
            WaitError::TimedOut(format!(
                "projection {projection} did not reach {lsn} within {timeout:?} (it has applied through {})",
                last.and_then(|a| a.lsn)
                    .unwrap_or_else(|| "nothing yet".into())
            ))
        })
}
