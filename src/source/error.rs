//! Why an attempt ended, and the one decision of what to do about it.

use crate::backfill::BackfillError;
use crate::events::mapping::MapError;
use crate::events::rules::BindError;
use crate::jetstream::provision::ProvisionError;
use crate::jetstream::publisher::PublishError;
pub use crate::policy::{Policy, Recovery};
use crate::position::Lsn;
use crate::postgres::catalog::CatalogError;
use crate::postgres::pgoutput::DecodeError;
use crate::postgres::replication::ReplicationError;

/// Why an attempt ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot decode the replication message at LSN {lsn}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: DecodeError,
    },
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Mapping(#[from] BindError),
    #[error("replication stream out of order: {0}")]
    Protocol(String),
    #[error(
        "replication slot {slot:?} does not exist, but stream {stream:?} has stored events of this source (up to sequence {last_seq}{}): the slot was dropped or lost, so changes committed after the last stored event are missing, and a new slot would only see changes from its creation on; run `tidemark resync --yes` for this source to create a new slot, mark the gap in the stream and backfill every table (or `tidemark reset` to start over)",
        .last_lsn.map(|l| format!(", commit LSN {l}")).unwrap_or_default()
    )]
    SlotLost {
        slot: String,
        stream: String,
        last_seq: u64,
        last_lsn: Option<Lsn>,
    },
    #[error(
        "PostgreSQL {version} refused to start streaming: {message}; this server cannot stream what tidemark asks of it, and no retry changes that: check that it is a supported version (12 or newer) and that no proxy in between rewrites the replication command"
    )]
    StartRefused { version: String, message: String },
    #[error(transparent)]
    Backfill(#[from] BackfillError),
    #[error(
        "the replication connection sent nothing for {secs} s, not even an answer to a reply request: presumed dead (replication_timeout_secs); reconnecting"
    )]
    Silent { secs: u64 },
    #[error("replication slot {slot:?} is in use by another process{}; standing by to take over", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    SlotBusy { slot: String, pid: Option<i32> },
}

impl SourceError {
    /// A short name of the error's kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Catalog(_) => "catalog",
            SourceError::Replication(_) => "replication",
            SourceError::Provision(_) => "nats",
            SourceError::Publish(_) => "publish",
            SourceError::Decode { .. } => "decode",
            SourceError::Map(_) => "map",
            SourceError::Mapping(_) => "mapping",
            SourceError::Protocol(_) => "protocol",
            SourceError::SlotLost { .. } => "slot_lost",
            SourceError::StartRefused { .. } => "start_refused",
            SourceError::SlotBusy { .. } => "slot_busy",
            SourceError::Backfill(_) => "backfill",
            SourceError::Silent { .. } => "replication",
        }
    }
}

impl Policy for SourceError {
    /// The source's own failures; the adapters' are decided by `policy`.
    fn recovery(&self) -> Recovery {
        match self {
            SourceError::SlotBusy { .. } => Recovery::Standby,
            SourceError::Catalog(e) => e.recovery(),
            SourceError::Replication(e) => e.recovery(),
            SourceError::Provision(e) => e.recovery(),
            SourceError::Publish(e) => e.recovery(),
            SourceError::Backfill(e) => e.recovery(),
            // Events we would lose, or a mapping that no longer fits the table.
            SourceError::SlotLost { .. }
            | SourceError::Mapping(_)
            | SourceError::StartRefused { .. } => Recovery::Fatal,
            SourceError::Decode { .. }
            | SourceError::Map(_)
            | SourceError::Protocol(_)
            | SourceError::Silent { .. } => Recovery::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::replication::ServerError;

    fn server(code: &str) -> SourceError {
        SourceError::Replication(ReplicationError::Server(ServerError {
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        }))
    }

    /// The policy table, row by row: what each failure leads to.
    #[test]
    fn each_failure_is_retried_stood_by_or_stopped() {
        let rows: Vec<(SourceError, Recovery)> = vec![
            (
                SourceError::SlotBusy {
                    slot: "s".into(),
                    pid: None,
                },
                Recovery::Standby,
            ),
            (
                SourceError::SlotLost {
                    slot: "s".into(),
                    stream: "S".into(),
                    last_seq: 1,
                    last_lsn: None,
                },
                Recovery::Fatal,
            ),
            (SourceError::Silent { secs: 60 }, Recovery::Retry),
            (
                SourceError::StartRefused {
                    version: "13.23".into(),
                    message: "unrecognized pgoutput option: messages".into(),
                },
                Recovery::Fatal,
            ),
            (SourceError::Protocol("x".into()), Recovery::Retry),
            (server("28P01"), Recovery::Fatal),
            (server("55000"), Recovery::Fatal),
            (server("42704"), Recovery::Fatal),
            (server("57P01"), Recovery::Retry),
            (server("08006"), Recovery::Retry),
            (
                SourceError::Catalog(CatalogError::TlsRefused {
                    target: "h:5432".into(),
                    mode: "require",
                }),
                Recovery::Fatal,
            ),
            (
                SourceError::Backfill(BackfillError::NoKey { table: "t".into() }),
                Recovery::Fatal,
            ),
        ];
        for (err, want) in rows {
            assert_eq!(err.recovery(), want, "{err}");
        }
    }
}
