//! Dropping a source's replication slot.

use std::time::{Duration, Instant};

use super::OpError;
use crate::config::SourceConfig;
use crate::postgres::catalog::Catalog;
use tokio_postgres::error::SqlState;

/// Drops the source's slot. An active slot is refused unless `force`, which ends the
/// connection holding it (and again if the holder reconnects, for up to 15 s).
pub(crate) async fn drop_slot(src: &SourceConfig, force: bool) -> Result<(), OpError> {
    let catalog = Catalog::connect(&src.postgres).await?;
    let slot = &src.slot;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let Some(info) = catalog.slot(slot).await? else {
            return Err(OpError::Refused(format!(
                "replication slot {slot:?} does not exist"
            )));
        };
        if info.active {
            let pid = info.active_pid.unwrap_or(0);
            if !force {
                return Err(OpError::Refused(format!(
                    "replication slot {slot:?} is active (pid {pid}): stop the tidemark that streams from it first, or pass --force to end its connection"
                )));
            }
            if Instant::now() > deadline {
                return Err(OpError::Refused(format!(
                    "replication slot {slot:?} is still active (pid {pid}) after terminating its connection"
                )));
            }
            // The holder may reconnect between the terminate and the drop: loop.
            catalog
                .client()
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(|source| OpError::Postgres {
                    what: format!("cannot terminate pid {pid}"),
                    source,
                })?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        match catalog
            .client()
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
        {
            Ok(_) => return Ok(()),
            // Taken again between the check and the drop.
            Err(e) if force && e.code() == Some(&SqlState::OBJECT_IN_USE) => continue,
            Err(source) => {
                return Err(OpError::Postgres {
                    what: format!("cannot drop replication slot {slot:?}"),
                    source,
                });
            }
        }
    }
}
