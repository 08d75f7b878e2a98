//! Why an attempt ended, and the one decision of what to do about it.

use crate::backfill::BackfillError;
use crate::events::mapping::MapError;
use crate::events::rules::BindError;
use crate::jetstream::provision::ProvisionError;
use crate::jetstream::publisher::PublishError;
use crate::position::Lsn;
use crate::postgres::catalog::CatalogError;
use crate::postgres::pgoutput::DecodeError;
use crate::postgres::replication::ReplicationError;
use crate::postgres::sqlstate::needs_operator;

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
            SourceError::SlotBusy { .. } => "slot_busy",
            SourceError::Backfill(_) => "backfill",
            SourceError::Silent { .. } => "replication",
        }
    }
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Tear down, back off, rebuild from durable state.
    Retry,
    /// Another process holds the slot: poll for it at a short interval.
    Standby,
    /// The operator must act: stop this source.
    Fatal,
}

impl SourceError {
    /// The one place that decides retry or stop.
    pub fn recovery(&self) -> Recovery {
        use CatalogError as C;
        use ReplicationError as R;
        // SQLSTATEs that no retry can fix: bad password, no such database or role,
        // missing slot, wal_level too low.
        let fatal_code = |code: Option<&str>| code.is_some_and(needs_operator);
        match self {
            SourceError::SlotBusy { .. } => Recovery::Standby,
            SourceError::Catalog(e) => match e {
                C::Connect { .. } | C::Query { .. } if fatal_code(e.code()) => Recovery::Fatal,
                // A certificate that does not verify will not start to.
                _ if e.is_tls_failure() => Recovery::Fatal,
                C::Connect { .. } | C::Query { .. } => Recovery::Retry,
                _ => Recovery::Fatal,
            },
            SourceError::Replication(e) => match e {
                R::AuthFailed { .. }
                | R::Tls { .. }
                | R::TlsRefused { .. }
                | R::TlsSetup(_)
                | R::PasswordRequired { .. }
                | R::UnsupportedAuth { .. }
                | R::MessageTooLarge { .. } => Recovery::Fatal,
                R::Server(_) if fatal_code(e.code()) => Recovery::Fatal,
                _ => Recovery::Retry,
            },
            SourceError::Provision(e) => match e {
                ProvisionError::Connect { .. } | ProvisionError::JetStream { .. } => {
                    Recovery::Retry
                }
                _ => Recovery::Fatal,
            },
            SourceError::Backfill(BackfillError::NoKey { .. }) => Recovery::Fatal,
            SourceError::Backfill(BackfillError::Catalog(e)) if fatal_code(e.code()) => {
                Recovery::Fatal
            }
            SourceError::Backfill(_) => Recovery::Retry,
            SourceError::Publish(
                PublishError::Oversized { .. } | PublishError::OversizedOnWire { .. },
            )
            | SourceError::SlotLost { .. }
            | SourceError::Mapping(_) => Recovery::Fatal,
            SourceError::Publish(_)
            | SourceError::Decode { .. }
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
