//! One decoded replication message applied to the pipeline: transaction boundaries,
//! relations, row changes, truncates and emitted messages, each mapped to events.

use tracing::{debug, warn};

use super::error::SourceError;
use super::pipeline::{OpenTx, Pipeline};
use super::plan::bind_plan;
use super::recreated::{MarkerRows, Recreated};
use crate::backfill::Watermark;
use crate::events::mapping::{
    self, DomainEvent, Operation, RowChange, Shrink, Table, TableColumn, TxContext,
};
use crate::events::reserved::{HEARTBEAT_PREFIX, RECREATED_PREFIX, SYNC_PREFIX, WATERMARK_PREFIX};
use crate::events::rules::{LiveTable, OversizedPlan};
use crate::position::Lsn;
use crate::postgres::pgoutput::{self, LogicalMessage};

impl Pipeline<'_> {
    pub(super) async fn apply(&mut self, msg: LogicalMessage) -> Result<(), SourceError> {
        match msg {
            LogicalMessage::Begin(b) => {
                if self.tx.is_some() {
                    return Err(SourceError::Protocol("BEGIN inside a transaction".into()));
                }
                debug!(commit_lsn = %b.final_lsn, xid = b.xid, "begin");
                self.tx = Some(OpenTx {
                    final_lsn: b.final_lsn,
                    xid: b.xid,
                    next_index: 0,
                    events: 0,
                    lsn_text: b.final_lsn.to_string(),
                    time_text: b.commit_time.to_rfc3339(),
                    commit_time: Some(b.commit_time.unix_nanos() as f64 / 1e9),
                });
            }
            LogicalMessage::Commit(c) => {
                let tx = self
                    .tx
                    .take()
                    .ok_or_else(|| SourceError::Protocol("COMMIT without BEGIN".into()))?;
                debug!(commit_lsn = %c.commit_lsn, xid = tx.xid, count = tx.next_index, "commit");
                let summary = (self.cfg.transaction_events && tx.events > 0).then(|| {
                    mapping::transaction_summary(
                        &TxContext {
                            source: &self.cfg.name,
                            commit_lsn: tx.final_lsn,
                            xid: tx.xid,
                            commit_lsn_text: &tx.lsn_text,
                            time: &tx.time_text,
                        },
                        tx.next_index,
                        tx.events,
                    )
                });
                // The summary, when there is one, is the transaction's last event.
                let summarized = summary.is_some();
                let summary = summary.filter(|e| !self.tail.is_stored(e.id.commit_lsn, e.id.index));
                if let Some(mut last) = self.held.take() {
                    if !summarized {
                        last.mark_last();
                    }
                    self.send(last, summary.is_none()).await?;
                }
                if let Some(summary) = summary {
                    self.send(summary, true).await?;
                }
                if let Some(chunk) = self.chunk_in_tx.take() {
                    for (reply, outcome) in self.flush.wait(chunk) {
                        // The worker may have stopped with its attempt.
                        let _ = reply.send(outcome);
                    }
                }
                self.recent.record(tx.xid, tx.final_lsn);
                self.flush.commit(c.end_lsn, tx.commit_time);
            }
            LogicalMessage::Relation(r) => {
                if let Some(signal) =
                    crate::postgres::signal::SignalRelation::of(&r, &self.cfg.signal_table)
                {
                    self.signal_rel = Some(signal);
                    return Ok(());
                }
                let table = self.describe(r).await?;
                self.relations.insert(table.relation_id, table);
            }
            LogicalMessage::Insert { relation_id, new } if self.is_signal(relation_id) => {
                let lsn = self.tx.as_ref().map_or(Lsn::ZERO, |t| t.final_lsn);
                match self.signal_rel.as_ref().and_then(|s| s.message(&new, lsn)) {
                    Some(m) => self.message(m).await?,
                    None => warn!(%lsn, "a row of the signal table that is no marker ignored"),
                }
            }
            // The signal table's own deletes (each marker is deleted as it is written).
            LogicalMessage::Update(u) if self.is_signal(u.relation_id) => {}
            LogicalMessage::Delete(d) if self.is_signal(d.relation_id) => {}
            LogicalMessage::Insert { relation_id, new } => {
                self.row(relation_id, Operation::Insert, None, Some(&new))
                    .await?;
            }
            LogicalMessage::Update(u) => {
                let old = u.old.as_ref().map(|(k, t)| (*k, t));
                self.row(u.relation_id, Operation::Update, old, Some(&u.new))
                    .await?;
            }
            LogicalMessage::Delete(d) => {
                let (kind, old) = &d.old;
                self.row(d.relation_id, Operation::Delete, Some((*kind, old)), None)
                    .await?;
            }
            LogicalMessage::Truncate(t) => {
                for rel in t.relation_ids {
                    if self.is_signal(rel) {
                        continue;
                    }
                    if let Some(w) = self.window.as_mut()
                        && w.relid == rel
                    {
                        w.note_truncate();
                    }
                    let (_, index) = self.next_index()?;
                    if let Some(event) =
                        mapping::map_truncate(&self.context()?, index, self.table(rel)?)
                    {
                        self.emit(event).await?;
                    }
                }
            }
            LogicalMessage::Message(m) => self.message(m).await?,
            LogicalMessage::Type(_) | LogicalMessage::Origin { .. } => {}
        }
        Ok(())
    }

    /// Whether a relation is the signal table (see `postgres::signal`).
    fn is_signal(&self, relation_id: u32) -> bool {
        self.signal_rel
            .as_ref()
            .is_some_and(|s| s.id == relation_id)
    }

    /// Claims the next index in the open transaction: (commit LSN, index).
    pub(super) fn next_index(&mut self) -> Result<(Lsn, u64), SourceError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| SourceError::Protocol("row change outside a transaction".into()))?;
        let index = tx.next_index;
        tx.next_index += 1;
        Ok((tx.final_lsn, index))
    }

    /// The open transaction as the mapper sees it.
    pub(super) fn context(&self) -> Result<TxContext<'_>, SourceError> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| SourceError::Protocol("row change outside a transaction".into()))?;
        Ok(TxContext {
            source: &self.cfg.name,
            commit_lsn: tx.final_lsn,
            xid: tx.xid,
            commit_lsn_text: &tx.lsn_text,
            time: &tx.time_text,
        })
    }

    pub(super) fn table(&self, relation_id: u32) -> Result<&Table, SourceError> {
        self.relations.get(&relation_id).ok_or_else(|| {
            SourceError::Protocol(format!(
                "change for relation {relation_id} before its RELATION message"
            ))
        })
    }

    pub(super) async fn row(
        &mut self,
        relation_id: u32,
        op: Operation,
        old: Option<(pgoutput::OldKind, &pgoutput::Tuple)>,
        new: Option<&pgoutput::Tuple>,
    ) -> Result<(), SourceError> {
        let (_, index) = self.next_index()?;
        if self.window.as_ref().is_some_and(|w| w.relid == relation_id) {
            self.note_window_change(relation_id, old.map(|(_, t)| t), new)?;
        }
        match self.map_row(index, relation_id, op, old, new)? {
            Some(event) => self.emit(event).await,
            None => Ok(()),
        }
    }

    /// Maps one row (a change, or a backfill's read) to its event, shrinking it when
    /// it is over the limit and the table's plan allows.
    pub(super) fn map_row(
        &self,
        index: u64,
        relation_id: u32,
        op: Operation,
        old: Option<(pgoutput::OldKind, &pgoutput::Tuple)>,
        new: Option<&pgoutput::Tuple>,
    ) -> Result<Option<DomainEvent>, SourceError> {
        let tx = self.context()?;
        let table = self.table(relation_id)?;
        let change = RowChange { op, old, new };
        let Some(mut event) = mapping::map_change(&tx, index, table, &change, None)? else {
            return Ok(None);
        };
        // Too large: shrink the columns the table's plan allows, cutting harder
        // until it fits or there is nothing left to cut.
        let limit = self.cfg.max_event_bytes;
        if event.payload.len() > limit && table.plan.oversized != OversizedPlan::Fail {
            let biggest = [new, old.map(|(_, t)| t)]
                .into_iter()
                .flatten()
                .flat_map(|t| t.0.iter())
                .map(|v| match v {
                    pgoutput::ColumnValue::Text(b) | pgoutput::ColumnValue::Binary(b) => b.len(),
                    _ => 0,
                })
                .max()
                .unwrap_or(0);
            let mut cap = biggest.saturating_sub(event.payload.len() - limit + 256);
            for _ in 0..12 {
                let shrink = Shrink {
                    plan: &table.plan.oversized,
                    max_value_bytes: cap,
                };
                if let Some(smaller) =
                    mapping::map_change(&tx, index, table, &change, Some(shrink))?
                {
                    event = smaller;
                }
                if event.payload.len() <= limit || cap == 0 {
                    break;
                }
                cap /= 2;
            }
        }
        Ok(Some(event))
    }

    /// An emitted logical message: an event when its prefix is configured. Every
    /// transactional message takes an index in its transaction, configured or not, so
    /// event ids do not move when the configuration changes.
    pub(super) async fn message(&mut self, m: pgoutput::EmittedMessage) -> Result<(), SourceError> {
        if m.prefix == HEARTBEAT_PREFIX && m.transactional {
            let (_, index) = self.next_index()?;
            let event = mapping::heartbeat_event(&self.context()?, index);
            self.heartbeat_ids.push_back(event.id.clone());
            return self.emit(event).await;
        }
        if m.prefix == SYNC_PREFIX && m.transactional {
            let (_, index) = self.next_index()?;
            let event = mapping::sync_event(&self.context()?, index);
            return self.emit(event).await;
        }
        if m.prefix == WATERMARK_PREFIX && m.transactional {
            self.next_index()?;
            return match serde_json::from_slice::<Watermark>(&m.content) {
                Ok(wm) => self.watermark(wm).await,
                Err(e) => {
                    warn!(lsn = %m.lsn, error = %e, "unreadable backfill watermark ignored");
                    Ok(())
                }
            };
        }
        if m.prefix == RECREATED_PREFIX && m.transactional {
            let (_, index) = self.next_index()?;
            return match serde_json::from_slice::<Recreated>(&m.content) {
                Ok(r) => self.recreated(index, r).await,
                Err(e) => {
                    warn!(lsn = %m.lsn, error = %e, "unreadable recreated-table marker ignored");
                    Ok(())
                }
            };
        }
        let spec = self.cfg.messages.iter().find(|s| s.prefix == m.prefix);
        if !m.transactional {
            match spec {
                Some(_) => {
                    warn!(prefix = %m.prefix, lsn = %m.lsn, "non-transactional logical message ignored: emit it with pg_logical_emit_message(true, ...) so it commits (and is published) with its transaction")
                }
                None => {
                    debug!(prefix = %m.prefix, lsn = %m.lsn, "non-transactional logical message ignored")
                }
            }
            return Ok(());
        }
        let (_, index) = self.next_index()?;
        let Some(spec) = spec else {
            debug!(prefix = %m.prefix, lsn = %m.lsn, "logical message with an unconfigured prefix ignored");
            return Ok(());
        };
        let event = mapping::map_message(&self.context()?, index, spec, &m.content);
        self.emit(event).await
    }

    /// A table dropped and created again (see `recreated`): its `truncated` event
    /// here, where its old rows are gone. Markers of other sources on the database
    /// are passed over.
    async fn recreated(&mut self, index: u64, r: Recreated) -> Result<(), SourceError> {
        if r.source != self.cfg.name || r.slot != self.cfg.slot || !r.truncate {
            return Ok(());
        }
        if let Some(w) = self.window.as_mut()
            && w.relid == r.relid
        {
            w.note_truncate();
        }
        // Not described yet, or under another name (built as `swap_new`, renamed into
        // place, not changed since): the catalog's view of it, under the name the
        // marker carries. Gone again by now, its later marker (or the next start)
        // speaks for it.
        let stale = self
            .relations
            .get(&r.relid)
            .is_none_or(|t| t.schema != r.schema || t.name != r.table);
        if stale {
            let exists = self
                .catalog
                .client()
                .query_opt("SELECT 1 FROM pg_class WHERE oid = $1", &[&r.relid])
                .await
                .map_err(|source| crate::postgres::catalog::CatalogError::Query {
                    what: "look up a recreated table",
                    source,
                })?
                .is_some();
            if !exists {
                warn!(table = %format!("{}.{}", r.schema, r.table), "the recreated table is gone again: no truncated event for it");
                return Ok(());
            }
            let table = self.describe_from_catalog(r.relid).await?;
            self.relations.insert(r.relid, table);
        }
        if let Some(event) = mapping::map_truncate(&self.context()?, index, self.table(r.relid)?) {
            self.emit(event).await?;
        }
        if let Some(rows) = r.rows {
            self.marker_rows(r.relid, rows).await?;
        }
        Ok(())
    }

    /// A recreated keyless table's rows from its marker, as `read` events right after
    /// its truncated event (see `recreated::keyless`).
    async fn marker_rows(&mut self, relid: u32, rows: MarkerRows) -> Result<(), SourceError> {
        // Read in the marker's transaction, the rows have the columns the table had
        // there; the stream's description may be older (see `watermark`).
        let mut order = super::window::column_order(self.table(relid)?, &rows.columns);
        if order.is_none() {
            let fresh = self.describe_from_catalog(relid).await?;
            order = super::window::column_order(&fresh, &rows.columns);
            self.relations.insert(relid, fresh);
        }
        let Some(order) = order else {
            warn!(table = %self.table(relid)?.qualified, "the recreated table's columns changed since its marker: its rows from the marker are not published");
            return Ok(());
        };
        for mut row in rows.rows {
            self.publish_read(relid, &mut row, &order).await?;
        }
        Ok(())
    }

    /// The mapper's view of a table as the catalog has it now (for a table the
    /// stream has not described yet, or described before its columns changed).
    pub(super) async fn describe_from_catalog(&mut self, relid: u32) -> Result<Table, SourceError> {
        let relation =
            super::plan::catalog_relation(&self.catalog, &self.cfg.publication, relid).await?;
        self.describe(relation).await
    }

    /// Makes sure a table the stream has not described yet is known, from the catalog.
    pub(super) async fn ensure_described(&mut self, relid: u32) -> Result<(), SourceError> {
        if !self.relations.contains_key(&relid) {
            let table = self.describe_from_catalog(relid).await?;
            self.relations.insert(table.relation_id, table);
        }
        Ok(())
    }

    /// Builds the mapper's view of a table from a RELATION message and the catalog.
    pub(super) async fn describe(&mut self, r: pgoutput::Relation) -> Result<Table, SourceError> {
        for c in &r.columns {
            if !self.types.is_known(c.type_oid) {
                let kind = self.catalog.resolve_type(c.type_oid).await?;
                self.types.register(c.type_oid, kind);
            }
        }
        let pk = self.catalog.primary_key(r.id).await?;
        let key: Vec<usize> = if pk.is_empty() {
            r.columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_key)
                .map(|(i, _)| i)
                .collect()
        } else {
            pk.iter()
                .filter_map(|name| r.columns.iter().position(|c| &c.name == name))
                .collect()
        };
        let token = mapping::table_token(&r.namespace, &r.name);
        let qualified = mapping::qualified_name(&r.namespace, &r.name);
        let cols: Vec<(String, u32)> = r
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid))
            .collect();
        let plan = bind_plan(
            self.cfg,
            &r.namespace,
            &r.name,
            &LiveTable {
                qualified: &qualified,
                token: &token,
                columns: &cols,
                replica_identity: r.replica_identity,
                default_key: &key,
            },
        )?;
        debug!(table = %qualified, count = r.columns.len(), schema = %plan.fingerprint, "relation");
        Ok(Table {
            relation_id: r.id,
            qualified,
            token,
            schema: r.namespace,
            name: r.name,
            replica_identity: r.replica_identity,
            plan,
            columns: r
                .columns
                .into_iter()
                .map(|c| TableColumn {
                    kind: self.types.kind(c.type_oid),
                    name: c.name,
                    type_oid: c.type_oid,
                })
                .collect(),
        })
    }
}
