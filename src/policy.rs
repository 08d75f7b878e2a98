//! One error policy for `run` and `project`: what each kind of failure leads to.
//!
//! A failure is retried (tear down, back off, rebuild from durable state), stood by
//! (another process holds what we need: poll for it), or stopped on (an operator must
//! act; the error's message says what to do). The adapters' errors are decided here,
//! once, by their variants, SQLSTATEs by name (`postgres::sqlstate`) and client error
//! kinds, never by text; `SourceError` and `ProjectionError` add only the failures of
//! their own stage and defer to this table for the rest.

use crate::backfill::BackfillError;
use crate::jetstream::provision::ProvisionError;
use crate::jetstream::publisher::PublishError;
use crate::postgres::catalog::CatalogError;
use crate::postgres::replication::ReplicationError;
use crate::postgres::sqlstate::needs_operator;

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Tear down, back off, rebuild from durable state.
    Retry,
    /// Another process holds the slot: poll for it at a short interval.
    Standby,
    /// The operator must act: stop.
    Fatal,
}

/// A failure's place in the table.
pub trait Policy {
    fn recovery(&self) -> Recovery;
}

fn operator_code(code: Option<&str>) -> bool {
    code.is_some_and(needs_operator)
}

impl Policy for CatalogError {
    fn recovery(&self) -> Recovery {
        use CatalogError as C;
        match self {
            // Bad password, no such database or role, wal_level too low.
            C::Connect { .. } | C::Query { .. } if operator_code(self.code()) => Recovery::Fatal,
            // A certificate that does not verify will not start to.
            _ if self.is_tls_failure() => Recovery::Fatal,
            C::Connect { .. } | C::Query { .. } => Recovery::Retry,
            // A missing publication, slot, table, identity or grant: the operator's.
            _ => Recovery::Fatal,
        }
    }
}

impl Policy for ReplicationError {
    fn recovery(&self) -> Recovery {
        use ReplicationError as R;
        match self {
            R::AuthFailed { .. }
            | R::Tls { .. }
            | R::TlsRefused { .. }
            | R::TlsSetup(_)
            | R::PasswordRequired { .. }
            | R::UnsupportedAuth { .. }
            | R::MessageTooLarge { .. } => Recovery::Fatal,
            R::Server(_) if operator_code(self.code()) => Recovery::Fatal,
            _ => Recovery::Retry,
        }
    }
}

impl Policy for ProvisionError {
    fn recovery(&self) -> Recovery {
        match self {
            // NATS away or JetStream not answering: it comes back.
            ProvisionError::Connect { .. } | ProvisionError::JetStream { .. } => Recovery::Retry,
            // Credentials, limits, a stream that conflicts: the operator's.
            _ => Recovery::Fatal,
        }
    }
}

impl Policy for PublishError {
    fn recovery(&self) -> Recovery {
        match self {
            // A row no retry makes smaller.
            PublishError::Oversized { .. } | PublishError::OversizedOnWire { .. } => {
                Recovery::Fatal
            }
            // Lost acks, timeouts, a chain cut short: resume from the stream's tail.
            _ => Recovery::Retry,
        }
    }
}

impl Policy for BackfillError {
    fn recovery(&self) -> Recovery {
        match self {
            BackfillError::NoKey { .. } => Recovery::Fatal,
            BackfillError::Catalog(e) if operator_code(e.code()) => Recovery::Fatal,
            _ => Recovery::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::replication::ServerError;

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server(ServerError {
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        })
    }

    /// The adapters' rows of the table.
    #[test]
    fn adapter_failures_are_retried_or_stopped() {
        for (code, want) in [
            ("28P01", Recovery::Fatal),
            ("55000", Recovery::Fatal),
            ("42704", Recovery::Fatal),
            ("3D000", Recovery::Fatal),
            ("57P01", Recovery::Retry),
            ("08006", Recovery::Retry),
            ("40001", Recovery::Retry),
        ] {
            assert_eq!(server(code).recovery(), want, "{code}");
        }
        let refused = CatalogError::TlsRefused {
            target: "h:5432".into(),
            mode: "require",
        };
        assert_eq!(refused.recovery(), Recovery::Fatal);
        let slot = CatalogError::SlotMissing { slot: "s".into() };
        assert_eq!(slot.recovery(), Recovery::Fatal);
        let wal = CatalogError::WalLevel {
            actual: "replica".into(),
        };
        assert_eq!(wal.recovery(), Recovery::Fatal);
        assert_eq!(
            BackfillError::NoKey { table: "t".into() }.recovery(),
            Recovery::Fatal
        );
        let stale = ProvisionError::StreamRejected {
            stream: "S".into(),
            reason: "r".into(),
        };
        assert_eq!(stale.recovery(), Recovery::Fatal);
    }
}
