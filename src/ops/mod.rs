//! Operations: what an operator asks of a source or a projection beside streaming it
//! (drop or reset its slot, resync it, queue a backfill, wait for a read model), as
//! functions that return what they did or why they could not. They print nothing;
//! the CLI renders their reports and picks the exit code.

mod backfill;
mod reset;
mod slot;
mod wait;

pub(crate) use backfill::{queue_backfill, resync};
pub(crate) use reset::{ResetMode, ResetReport, StreamOutcome, reset};
pub(crate) use slot::drop_slot;
pub(crate) use wait::{WaitError, read_your_writes};

use crate::backfill::BackfillError;
use crate::jetstream::provision::ProvisionError;
use crate::postgres::catalog::CatalogError;

/// Why an operation did not happen (or stopped part way; each operation says which
/// of its steps are already done when it fails).
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    /// Something the operator must change first; the message says what.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Backfill(#[from] BackfillError),
    /// A statement failed; `what` names the step.
    #[error("{what}")]
    Postgres {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A JetStream request failed; the message names the step and the server's answer.
    #[error("{0}")]
    Nats(String),
}
