//! Tables dropped and created again under their name (`pgbench -i`, a migration that
//! builds a new table and swaps it in by renaming): the new table has a new OID, and
//! Postgres says nothing of it in the replication stream. A `FOR TABLE` publication
//! loses the table with the old OID, so the new one's changes are never sent; a
//! `FOR ALL TABLES` one sends them, but the old table's rows were never deleted. Either
//! way a read model would keep rows the table no longer holds, or miss rows it does.
//!
//! So each source keeps the OID of every table it streams, in the KV bucket (read at
//! start: a table may have been swapped while tidemark was down) and checks the names
//! every `POLL` while it runs. A table found under a new OID, found unpublished, or
//! (under `all_tables`) a streamed table found under a new name (renamed: its rows so
//! far went out under its old name):
//! 1. tidemark-managed publication: the table is added again, in the same transaction
//!    as the marker below, so every change of it after the marker is streamed;
//! 2. a `tidemark.recreated` logical message marks the point; the pipeline publishes
//!    the table's `truncated` event there (its rows before are gone), and
//! 3. a backfill of the table is queued (`reason = "recreated"`): its rows come as
//!    `read` events after the marker, so folding the stream gives the table again.
//!
//! A table without a key cannot be backfilled, so it is read whole in the marker's
//! transaction, under a SHARE lock, and the marker carries its rows (`keyless`): the
//! pipeline publishes them as `read` events right after the `truncated` event. A
//! table over `MARKER_ROWS_BYTES`, or one tidemark's role may not lock, gets a
//! warning instead: under a publication that sent it from its creation (`FOR ALL
//! TABLES`, a schema) no `truncated` event (the old table's rows stay in read models);
//! otherwise one, and its rows written before it was published again are missing. An operator's publication that lost the
//! table stops the source with the `ALTER PUBLICATION` to run; a new table whose
//! UPDATEs Postgres would refuse once published stops it with the identity to set.
//! Both are found again at the next start.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::error::SourceError;
use crate::backfill::{self, BackfillError, Progress, TableOids};
use crate::config::{SnapshotMode, SourceConfig, TableSelection};
use crate::events::reserved::RECREATED_PREFIX;
use crate::policy::{Policy, Recovery};
use crate::postgres::catalog::{Catalog, CatalogError, TableInfo};
use crate::postgres::replication::quote_ident;
use crate::postgres::signal;

/// How often the names are checked while a source runs.
const POLL: Duration = Duration::from_secs(2);

/// The `tidemark.recreated` message: which source's table, and whether the pipeline
/// publishes its `truncated` event there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Recreated {
    pub source: String,
    pub slot: String,
    pub schema: String,
    pub table: String,
    pub relid: u32,
    pub truncate: bool,
    /// A table without a key: its rows, read in the marker's transaction under a
    /// SHARE lock (so no write falls between the read and the marker), published as
    /// `read` events right after the truncated event. None for a table read again by
    /// a backfill, or one over `MARKER_ROWS_BYTES`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<MarkerRows>,
}

/// A table's rows as Postgres text, in its columns' order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MarkerRows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// The most row text a recreated keyless table's marker carries. A larger table gets
/// the warning instead (see `recreated`). The marker as a whole also stays within half
/// of `max_row_bytes`, the largest message the replication stream takes (a marker over
/// it would stop the source at it for good).
const MARKER_ROWS_BYTES: usize = 1 << 20;

type Name = (String, String);

/// At start: the tables found under another OID than recorded (swapped while tidemark
/// was down) are handled (see the module note), and so are the tables new to the
/// selection (added to `tables`, or created while tidemark was down under
/// `all_tables`) when `snapshot_reads` says so: their rows before are not in the stream
/// (or, for a table taken out and put back, are stale), so they get the same truncated
/// event and read. Then the OIDs are recorded. A new slot's source records them only:
/// its initial snapshot (if any) reads every table. So does a source that recorded
/// none yet (it cannot tell new tables from old ones).
pub(super) async fn at_start(
    catalog: &Catalog,
    cfg: &SourceConfig,
    progress: &Progress,
    tables: &[TableInfo],
    new_slot: bool,
) -> Result<HashMap<Name, u32>, SourceError> {
    let recorded: Option<HashMap<Name, u32>> = progress.table_oids().await?.map(|r| {
        r.tables
            .into_iter()
            .map(|(s, t, oid)| ((s, t), oid))
            .collect()
    });
    let mut known = HashMap::new();
    for t in tables {
        let name = (t.schema.clone(), t.name.clone());
        match recorded.as_ref().map(|r| r.get(&name)) {
            _ if new_slot => {}
            Some(Some(&was)) if was != t.oid => {
                warn!(table = %t.qualified(), was, oid = t.oid, "table was dropped and created again while tidemark was away (a new OID under its name): its old rows are gone");
                // `ensure_publication` published it already, before the marker.
                recreated(catalog, cfg, progress, t, true, "recreated").await?;
            }
            Some(None) if snapshot_reads(cfg, &t.schema, &t.name) => {
                info!(table = %t.qualified(), "table new to the source since it last ran: its truncated event, then its rows are read (they are not in the stream)");
                recreated(catalog, cfg, progress, t, true, "added").await?;
            }
            Some(None) => {
                let why = if outbox_table(cfg, &t.schema, &t.name) {
                    "an outbox table: its rows are messages, sent as they are written"
                } else {
                    "snapshot = \"never\", or snapshot_tables leaves it out: run `tidemark backfill` for them"
                };
                info!(table = %t.qualified(), "table new to the source since it last ran: streamed from now on, its rows from before are not sent ({why})");
            }
            _ => {}
        }
        known.insert(name, t.oid);
    }
    record(progress, &known).await;
    Ok(known)
}

/// Whether a source reads a table's rows as a snapshot: in its initial snapshot, and
/// at a start that finds the table new to its selection (its truncated event, then its
/// rows). With `snapshot = "initial"`, for a table in `snapshot_tables` that is not an
/// outbox table.
pub(crate) fn snapshot_reads(cfg: &SourceConfig, schema: &str, table: &str) -> bool {
    cfg.snapshot == SnapshotMode::Initial
        && cfg
            .snapshot_tables
            .as_ref()
            .is_none_or(|l| l.iter().any(|(s, t)| s == schema && t == table))
        && !outbox_table(cfg, schema, table)
}

fn outbox_table(cfg: &SourceConfig, schema: &str, table: &str) -> bool {
    cfg.outboxes
        .iter()
        .any(|o| o.schema == schema && o.table == table)
}

/// Records the OIDs. A failed write (NATS away, or a record over the server's
/// `max_payload` with tens of thousands of tables) is logged and leaves the record as
/// it was: only a swap made while tidemark is down then goes unseen. The watch goes on
/// from what it knows, and writes again at the next change and the next start.
async fn record(progress: &Progress, known: &HashMap<Name, u32>) {
    let mut tables: Vec<(String, String, u32)> = known
        .iter()
        .map(|((s, t), oid)| (s.clone(), t.clone(), *oid))
        .collect();
    tables.sort();
    let count = tables.len();
    if let Err(e) = progress
        .put_table_oids(&TableOids {
            stream: None,
            tables,
        })
        .await
    {
        warn!(error = %crate::error::ErrorChain(&e), tables = count, "could not record the tables' OIDs: a table dropped and created again while tidemark is stopped would go unseen");
    }
}

/// Checks the names every `POLL` until `cancel` fires. A failure an operator must fix
/// is sent on `failed` (the pipeline stops with it); any other is tried again.
pub(super) async fn watch(
    cfg: SourceConfig,
    progress: Progress,
    mut known: HashMap<Name, u32>,
    failed: tokio::sync::oneshot::Sender<SourceError>,
    cancel: CancellationToken,
) {
    let mut catalog: Option<Catalog> = None;
    let mut gone: HashSet<Name> = HashSet::new();
    // Failures in a row: a few are a restart or a busy lock; more are worth a warning
    // (a recreated table not handled while it lasts).
    let mut failing = 0u32;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let result = async {
            if catalog.is_none() {
                catalog = Some(Catalog::connect(&cfg.postgres).await?);
            }
            match catalog.as_ref() {
                Some(c) => poll(c, &cfg, &progress, &mut known, &mut gone).await,
                None => Ok(()),
            }
        }
        .await;
        match result {
            Ok(()) => failing = 0,
            Err(e) if e.recovery() == Recovery::Fatal => {
                let _ = failed.send(e);
                return;
            }
            Err(e) => {
                failing += 1;
                if failing == 5 {
                    warn!(error = %crate::error::ErrorChain(&e), "checking the tables' OIDs keeps failing (a table dropped and created again is not handled until it works); trying again every 2 s");
                } else {
                    debug!(error = %e, "checking the tables' OIDs failed; trying again");
                }
                catalog = None;
            }
        }
    }
}

/// One look at the names: new tables are recorded, swapped or unpublished ones
/// handled, dropped ones reported once.
async fn poll(
    catalog: &Catalog,
    cfg: &SourceConfig,
    progress: &Progress,
    known: &mut HashMap<Name, u32>,
    gone: &mut HashSet<Name>,
) -> Result<(), SourceError> {
    let names = match &cfg.tables {
        TableSelection::All => catalog.all_tables(&cfg.signal_table).await?,
        TableSelection::Listed(t) => t.clone(),
    };
    let mut changed = false;
    // The OIDs streamed so far under any name: a name found new with one of them is a
    // streamed table renamed.
    let streamed: HashSet<u32> = known.values().copied().collect();
    for now in catalog.current_oids(&cfg.publication, &names).await? {
        let name = (now.schema.clone(), now.table.clone());
        let Some(oid) = now.oid else {
            if known.contains_key(&name) && gone.insert(name) {
                warn!(table = %format!("{}.{}", quote_ident(&now.schema), quote_ident(&now.table)), "a streamed table was dropped (or renamed): no events come under its name; if it is created again, tidemark publishes its truncated event and reads it again. A listed table that stays gone stops the source at its next start: take it out of `tables`");
            }
            continue;
        };
        gone.remove(&name);
        let was = known.get(&name).copied();
        if was == Some(oid) && now.published {
            continue;
        }
        let renamed = was.is_none() && streamed.contains(&oid);
        if was.is_none() && now.published && !renamed {
            // A table new to the selection (`all_tables`): streamed from its start.
            known.insert(name, oid);
            changed = true;
            continue;
        }
        let Some(info) = catalog
            .tables(std::slice::from_ref(&name))
            .await
            .map_or_else(
                |e| match e {
                    // Gone again, or not a table: the next look sees what it is.
                    CatalogError::TableMissing { .. }
                    | CatalogError::NotATable { .. }
                    | CatalogError::Unlogged { .. } => Ok(None),
                    e => Err(e),
                },
                |t| Ok(t.into_iter().next()),
            )?
        else {
            continue;
        };
        let reason = if was.is_some_and(|w| w != oid) {
            warn!(table = %info.qualified(), was = was.unwrap_or_default(), oid, "table was dropped and created again (a new OID under its name): its old rows are gone");
            "recreated"
        } else if renamed {
            warn!(table = %info.qualified(), oid, "a streamed table was renamed to this name: its rows so far went out under its old name, so it is read again under this one after its truncated event");
            "renamed"
        } else {
            warn!(table = %info.qualified(), "table is no longer in the publication: adding it again; its changes meanwhile were not sent, so it is read again after its truncated event");
            "recreated"
        };
        recreated(catalog, cfg, progress, &info, now.published, reason).await?;
        known.insert(name, oid);
        changed = true;
    }
    if changed {
        record(progress, known).await;
    }
    Ok(())
}

/// A table without a key, when its rows fit in a marker (`MARKER_ROWS_BYTES`): in one
/// transaction, a SHARE lock (writers wait; in-flight ones finish first), the table
/// published again if it is not, its rows read, and the marker written with them. So
/// the marker stands exactly between the writes its rows hold and the writes after it.
/// Returns false (nothing done) for a larger table.
async fn keyless(
    cfg: &SourceConfig,
    t: &TableInfo,
    published: bool,
    marker: &mut Recreated,
) -> Result<bool, SourceError> {
    let reader = backfill::reader(&cfg.postgres).await?;
    let (_, columns, _, row_filter) =
        backfill::read_shape(&reader, cfg, &t.schema, &t.name).await?;
    let table = t.qualified();
    let filter = row_filter
        .map(|f| format!(" WHERE ({f})"))
        .unwrap_or_default();
    let client = reader.client();
    let query = |what: &'static str| move |source| CatalogError::Query { what, source };
    let mut sql =
        format!("BEGIN; SET LOCAL lock_timeout = '5s'; LOCK TABLE {table} IN SHARE MODE;");
    if !published {
        sql.push_str(&format!(
            " ALTER PUBLICATION {} ADD TABLE {table};",
            quote_ident(&cfg.publication)
        ));
    }
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            // SHARE mode needs UPDATE, DELETE or TRUNCATE on the table.
            warn!(table = %table, "cannot lock the recreated table to read it with its truncated event (tidemark's role needs UPDATE, DELETE or TRUNCATE on it for a SHARE lock)");
            return Ok(false);
        }
        return Err(query("lock the recreated table")(e).into());
    }
    let truncate = marker.truncate;
    let done = async {
        let size: i64 = client
            .query_one(
                &format!(
                    "SELECT coalesce(sum(octet_length(x::text)), 0)::int8 FROM {table} x{filter}"
                ),
                &[],
            )
            .await
            .map_err(query("size the recreated table"))?
            .get(0);
        let limit = MARKER_ROWS_BYTES.min(cfg.max_row_bytes / 2);
        if size < 0 || size as u64 > limit as u64 {
            return Ok(false);
        }
        let select: Vec<String> = columns.iter().map(|(n, _)| quote_ident(n)).collect();
        let mut rows = Vec::new();
        for m in client
            .simple_query(&format!(
                "SELECT {} FROM {table}{filter}",
                select.join(", ")
            ))
            .await
            .map_err(query("read the recreated table"))?
        {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
            }
        }
        marker.truncate = true;
        marker.rows = Some(MarkerRows {
            columns: columns.into_iter().map(|(n, _)| n).collect(),
            rows,
        });
        let content = serde_json::to_string(&*marker).map_err(|e| {
            SourceError::Protocol(format!("could not encode the recreated-table marker: {e}"))
        })?;
        if content.len() > cfg.max_row_bytes / 2 {
            return Ok(false);
        }
        let emit = signal::emit_sql(
            reader.version(),
            &cfg.signal_table,
            RECREATED_PREFIX,
            &content,
        );
        if let Err(e) = client.batch_execute(&format!("{emit}; COMMIT")).await {
            // No signal table (PostgreSQL 12, 13): said where the marker without rows
            // fails the same way.
            if signal_missing(&e) {
                return Ok(false);
            }
            return Err(query("mark the point with the table's rows")(e).into());
        }
        Ok::<bool, SourceError>(true)
    }
    .await;
    if !matches!(done, Ok(true)) {
        let _ = client.batch_execute("ROLLBACK").await;
        marker.rows = None;
        marker.truncate = truncate;
    }
    done
}

/// Whether writing a marker failed for want of the signal table (PostgreSQL 12 and
/// 13): it does not exist, or tidemark's role may not write it.
fn signal_missing(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code()
        .is_some_and(|c| *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INSUFFICIENT_PRIVILEGE)
}

/// Steps 1 to 3 of the module note for one table.
async fn recreated(
    catalog: &Catalog,
    cfg: &SourceConfig,
    progress: &Progress,
    t: &TableInfo,
    published: bool,
    reason: &str,
) -> Result<(), SourceError> {
    if !published {
        if !cfg.create_publication {
            return Err(CatalogError::PublicationLacksTable {
                publication: cfg.publication.clone(),
                table: t.qualified(),
            }
            .into());
        }
        if let Some((table, identity)) = t.identity_problem() {
            return Err(CatalogError::NoReplicaIdentity { table, identity }.into());
        }
    }
    let outbox = outbox_table(cfg, &t.schema, &t.name);
    let key = if outbox {
        None
    } else {
        match backfill::key_columns(catalog, cfg, &t.schema, &t.name, &t.primary_key).await {
            Ok(key) => Some(key),
            Err(BackfillError::NoKey { .. }) => None,
            Err(err @ BackfillError::KeyNotUnique { .. }) => {
                error!(table = %t.qualified(), error = %err, "the table cannot be read again after it was created again; once its mapping names a usable key, run `tidemark backfill` for it");
                None
            }
            Err(err) => return Err(err.into()),
        }
    };
    // Sent from its creation on (`FOR ALL TABLES`, a schema): its rows are in the
    // stream already, and only a backfill could follow a truncated event.
    let from_start = published && !catalog.names_table(&cfg.publication, t.oid).await?;
    let mut marker = Recreated {
        source: cfg.name.clone(),
        slot: cfg.slot.clone(),
        schema: t.schema.clone(),
        table: t.name.clone(),
        relid: t.oid,
        truncate: key.is_some() || !from_start,
        rows: None,
    };
    if key.is_none() && !outbox {
        // No key to read it again by: its rows go in the marker when they are few.
        if keyless(cfg, t, published, &mut marker).await? {
            info!(table = %t.qualified(), rows = marker.rows.as_ref().map_or(0, |r| r.rows.len()), "truncated event marked with the new table's rows");
            return Ok(());
        }
    }
    let content = serde_json::to_string(&marker).map_err(|e| {
        SourceError::Protocol(format!("could not encode the recreated-table marker: {e}"))
    })?;
    let emit = signal::emit_sql(
        catalog.version(),
        &cfg.signal_table,
        RECREATED_PREFIX,
        &content,
    );
    let sql = if published {
        emit
    } else {
        format!(
            "BEGIN; ALTER PUBLICATION {} ADD TABLE {}; {emit}; COMMIT",
            quote_ident(&cfg.publication),
            t.qualified()
        )
    };
    if let Err(source) = catalog.client().batch_execute(&sql).await {
        if signal_missing(&source) {
            warn!(table = %t.qualified(), signal_table = %signal::qualified(&cfg.signal_table), "the table was dropped and created again, but its truncated event cannot be marked in the stream: the signal table is missing or not writable ({})", signal::LOST_WITHOUT);
            return Ok(());
        }
        return Err(CatalogError::Query {
            what: "publish the table again and mark the point",
            source,
        }
        .into());
    }
    match key {
        Some(key) => {
            if let Some(old) = progress.get(&t.schema, &t.name).await? {
                info!(table = %t.qualified(), job = %old.id, state = ?old.state, "the old table's backfill job replaced");
            }
            progress
                .put(&backfill::Job::new(
                    &t.schema,
                    &t.name,
                    key,
                    reason,
                    None,
                    cfg.snapshot_chunk_size,
                ))
                .await?;
            info!(table = %t.qualified(), "truncated event marked; backfill of the new table queued");
        }
        None if !outbox && from_start => {
            warn!(table = %t.qualified(), "a table without a key cannot be read again, so no truncated event is published for it (the new table's rows were streamed from its start): the old table's rows stay in read models beside the new one's unless they are rebuilt; `tidemark reset --purge-stream` starts the stream over");
        }
        None if !outbox => {
            warn!(table = %t.qualified(), "a table without a key cannot be read again: the new table's rows written before it was published again are not in the stream. Give it a primary key and run `tidemark backfill`, or `tidemark reset --purge-stream` to start over");
        }
        None => {}
    }
    Ok(())
}
