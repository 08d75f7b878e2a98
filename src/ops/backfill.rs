//! Queueing backfills: one table (`tidemark backfill`), or every published table
//! behind a new slot (`tidemark resync`).

use super::{OpError, ResetMode, ResetReport, reset};
use crate::backfill::{BackfillError, Job, JobState, Progress, key_columns};
use crate::config::{self, NatsConfig, SourceConfig};
use crate::error::ErrorChain;
use crate::jetstream::provision;
use crate::postgres::catalog::{Catalog, CatalogError};
use crate::postgres::replication::quote_ident;

/// A new slot, a gap marker, and a backfill of every published table (outbox tables
/// aside; tables without a key are reported, not read). Everything that could refuse
/// is checked before anything changes.
pub(crate) async fn resync(
    src: &SourceConfig,
    nats: &NatsConfig,
    force: bool,
) -> Result<ResyncReport, OpError> {
    let catalog = Catalog::connect(&src.postgres).await?;
    let Some(published) = catalog.publication(&src.publication).await? else {
        return Err(OpError::Refused(format!(
            "publication {:?} does not exist: run `tidemark run` once to create it, or create it by hand",
            src.publication
        )));
    };
    let names: Vec<(String, String)> = published
        .tables
        .into_iter()
        .filter(|t| *t != src.signal_table)
        .filter(|(schema, name)| {
            !src.outboxes
                .iter()
                .any(|o| &o.schema == schema && &o.table == name)
        })
        .collect();
    let mut jobs = Vec::new();
    let mut unread = Vec::new();
    for t in &catalog.tables(&names).await? {
        let key = match key_columns(&catalog, src, &t.schema, &t.name, &t.primary_key).await {
            Ok(key) => key,
            // A table without a key cannot be paged by a backfill: it loses only its
            // own rows (reported), never the resync of every other table.
            Err(BackfillError::NoKey { .. }) => {
                unread.push(format!("{}.{}", t.schema, t.name));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        jobs.push(Job::new(
            &t.schema,
            &t.name,
            key,
            "resync",
            None,
            src.snapshot_chunk_size,
        ));
    }
    let progress = open_progress(src, nats, "tidemark-resync").await?;
    let report = reset(src, nats, ResetMode::Keep, force, "resync").await?;
    for job in &jobs {
        progress.put(job).await?;
    }
    Ok(ResyncReport {
        reset: report,
        queued: jobs.len(),
        unread,
    })
}

/// What a resync did.
#[derive(Debug)]
pub(crate) struct ResyncReport {
    pub reset: ResetReport,
    /// Tables queued for a backfill.
    pub queued: usize,
    /// Published tables without a key, which a backfill cannot page: their rows from
    /// before the gap are not sent again (their changes from the new slot on are).
    pub unread: Vec<String>,
}

/// Queues a backfill of one published table (`schema.table` or `table`), optionally
/// of the rows matching `filter`. Returns the queued job and the record to follow it.
pub(crate) async fn queue_backfill(
    src: &SourceConfig,
    nats: &NatsConfig,
    table: &str,
    filter: Option<String>,
    chunk_size: Option<u64>,
) -> Result<(Job, Progress), OpError> {
    let Some((schema, name)) = config::split_table(table) else {
        return Err(OpError::Refused(format!(
            "{table:?} is not a table name: use \"table\" or \"schema.table\", with a name in double quotes when it holds spaces or dots ('\"order lines\"')"
        )));
    };
    let qualified = format!("{schema}.{name}");
    let catalog = Catalog::connect(&src.postgres).await?;
    let Some(info) = catalog
        .tables(&[(schema.clone(), name.clone())])
        .await?
        .into_iter()
        .next()
    else {
        return Err(OpError::Refused(format!(
            "table {qualified} does not exist"
        )));
    };
    let published = catalog.publication(&src.publication).await?;
    if let Some(p) = &published
        && info.partitioned
        && !p.via_root
    {
        return Err(OpError::Refused(
            CatalogError::PublicationByPartitions {
                publication: src.publication.clone(),
                table: info.qualified(),
            }
            .to_string(),
        ));
    }
    if !published.is_some_and(|p| p.publishes(&schema, &name)) {
        return Err(OpError::Refused(format!(
            "publication {:?} does not publish {qualified}, so its changes would not follow its rows: run ALTER PUBLICATION {} ADD TABLE {} (or add it to the source's tables and restart tidemark), then backfill",
            src.publication,
            quote_ident(&src.publication),
            info.qualified()
        )));
    }
    let key = key_columns(&catalog, src, &schema, &name, &info.primary_key).await?;
    if let Some(f) = &filter
        && let Err(e) = catalog
            .client()
            .simple_query(&format!(
                "EXPLAIN SELECT 1 FROM {} WHERE ({f})",
                info.qualified()
            ))
            .await
    {
        return Err(OpError::Refused(format!(
            "--where {f:?} is not a valid condition on {qualified}: {}",
            ErrorChain(&e)
        )));
    }
    let progress = open_progress(src, nats, "tidemark-backfill").await?;
    if let Some(j) = progress.get(&schema, &name).await?
        && matches!(j.state, JobState::Pending | JobState::Running)
    {
        return Err(OpError::Refused(format!(
            "a backfill of {qualified} is already {} ({} rows done): wait for it, or watch it with `tidemark status`",
            if j.state == JobState::Pending {
                "queued"
            } else {
                "running"
            },
            j.rows_done
        )));
    }
    let job = Job::new(
        &schema,
        &name,
        key,
        "backfill",
        filter,
        chunk_size.unwrap_or(src.snapshot_chunk_size).max(1),
    );
    progress.put(&job).await?;
    Ok((job, progress))
}

/// The source's backfill record, bound to its stream, over a NATS connection of its own.
async fn open_progress(
    src: &SourceConfig,
    nats: &NatsConfig,
    client_name: &str,
) -> Result<Progress, OpError> {
    let client = provision::connect(nats, client_name).await?;
    let js = async_nats::jetstream::new(client);
    Ok(Progress::open_for_stream(&js, &src.name, &src.stream.name, src.stream.replicas).await?)
}
