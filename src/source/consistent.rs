//! The consistent snapshot of a new slot's tables without a key (see
//! `backfill::Consistent`): their rows as of the slot's consistent point, published as
//! one synthetic transaction at the LSN just before it, ahead of everything the slot
//! streams. A keyless table has no key to page by or to tell a chunk's rows from live
//! changes, so DBLog cannot read it; a snapshot taken exactly where the slot starts
//! needs neither. Every change after it comes from the slot, so the fold of the
//! stream (as multisets of rows) is the table.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::error::SourceError;
use super::pipeline::{OpenTx, Pipeline};
use crate::backfill::BackfillError;
use crate::events::mapping::{self, Operation};
use crate::position::Lsn;
use crate::postgres::catalog::{Catalog, CatalogError};
use crate::postgres::pgoutput;
use crate::postgres::replication::quote_ident;

/// What the attempt hands the pipeline when it made a slot for keyless tables.
pub(super) struct ConsistentRead {
    /// A session in a REPEATABLE READ transaction that imported the slot's snapshot,
    /// with the value settings of the replication session.
    pub(super) reader: Catalog,
    /// The tables, by OID.
    pub(super) tables: Vec<u32>,
    /// The slot's consistent point.
    pub(super) at: Lsn,
    /// An earlier try was cut off: each table's rows follow a `truncated` event.
    pub(super) again: bool,
    /// Rows per FETCH.
    pub(super) batch: usize,
}

fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |source| {
        SourceError::Backfill(BackfillError::Catalog(CatalogError::Query { what, source }))
    }
}

impl Pipeline<'_> {
    /// Publishes the rows and waits until every one is stored. Memory holds one
    /// FETCH of rows and the publish window.
    pub(super) async fn consistent_read(
        &mut self,
        read: ConsistentRead,
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let commit = Lsn(read.at.0.saturating_sub(1));
        let time = time::OffsetDateTime::now_utc();
        self.tx = Some(OpenTx {
            final_lsn: commit,
            xid: 0,
            next_index: 0,
            events: 0,
            lsn_text: commit.to_string(),
            time_text: time
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            commit_time: Some(time.unix_timestamp_nanos() as f64 / 1e9),
        });
        let client = read.reader.client();
        let mut last_status = Instant::now();
        for relid in read.tables {
            self.ensure_described(relid).await?;
            let table = self.table(relid)?;
            let (schema, name) = (table.schema.clone(), table.name.clone());
            let qualified = format!("{schema}.{name}");
            let columns: Vec<String> = table.columns.iter().map(|c| c.name.clone()).collect();
            if read.again {
                let (_, index) = self.next_index()?;
                if let Some(event) =
                    mapping::map_truncate(&self.context()?, index, self.table(relid)?)
                {
                    self.emit(event).await?;
                }
            }
            let select: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
            // The rows the publication's row filter lets through, as live changes.
            let row_filter = read
                .reader
                .published_shape(&self.cfg.publication, &schema, &name)
                .await?
                .row_filter
                .map(|f| format!(" WHERE ({f})"))
                .unwrap_or_default();
            client
                .batch_execute(&format!(
                    "DECLARE tidemark_consistent NO SCROLL CURSOR FOR SELECT {} FROM {}.{}{row_filter}",
                    if select.is_empty() {
                        "NULL".to_string()
                    } else {
                        select.join(", ")
                    },
                    quote_ident(&schema),
                    quote_ident(&name)
                ))
                .await
                .map_err(query("open a cursor on the slot's snapshot"))?;
            let mut rows_read = 0u64;
            loop {
                if cancel.is_cancelled() {
                    return Err(SourceError::Protocol(
                        "stopped during the consistent snapshot; it is taken again on the next start".into(),
                    ));
                }
                let messages = client
                    .simple_query(&format!("FETCH {} FROM tidemark_consistent", read.batch))
                    .await
                    .map_err(query("read the slot's snapshot"))?;
                let mut fetched = 0usize;
                for m in messages {
                    let tokio_postgres::SimpleQueryMessage::Row(r) = m else {
                        continue;
                    };
                    fetched += 1;
                    let tuple = pgoutput::Tuple(
                        (0..columns.len())
                            .map(|i| match r.get(i) {
                                Some(v) => pgoutput::ColumnValue::Text(
                                    bytes::Bytes::copy_from_slice(v.as_bytes()),
                                ),
                                None => pgoutput::ColumnValue::Null,
                            })
                            .collect(),
                    );
                    let (_, index) = self.next_index()?;
                    if let Some(event) =
                        self.map_row(index, relid, Operation::Read, None, Some(&tuple))?
                    {
                        self.emit(event).await?;
                    }
                }
                rows_read += fetched as u64;
                // The slot is not read meanwhile: tell walsender we are here.
                if last_status.elapsed() > Duration::from_secs(5) {
                    self.send_status(false).await?;
                    last_status = Instant::now();
                }
                if fetched < read.batch {
                    break;
                }
            }
            client
                .batch_execute("CLOSE tidemark_consistent")
                .await
                .map_err(query("close the cursor"))?;
            info!(table = %qualified, rows = rows_read, "consistent snapshot of a table without a key read");
        }
        // The synthetic transaction's end: its last event carries the mark.
        self.tx = None;
        if let Some(mut last) = self.held.take() {
            last.mark_last();
            self.send(last, true).await?;
        }
        self.publisher.flush().await?;
        while self.publisher.awaiting_acks() > 0 {
            let ack = self.publisher.next_ack().await?;
            self.on_ack(ack);
        }
        let _ = client.batch_execute("COMMIT").await;
        Ok(())
    }
}
