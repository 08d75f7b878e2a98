//! The Postgres target: events applied with the handlers' statements, pipelined, in
//! database transactions that also write the checkpoint. Live, into the read model's
//! tables under the projection's lock; rebuilding, into shadow tables swapped in at
//! the end (see `rebuild.rs`).

use super::engine::{Incoming, Position, Refused, Target, Tx};
use super::*;

/// A handler, prepared.
struct Prepared {
    types: Vec<String>,
    stmt: tokio_postgres::Statement,
    params: Vec<Param>,
    /// A `sql` handler, which cannot keep a value the event leaves out: such an event
    /// is refused rather than written with NULL in its place.
    own_sql: bool,
    /// An upsert's removal of the row under a key an UPDATE changed.
    moved: Option<(MovedKey, tokio_postgres::Statement)>,
    /// Its parameters from `data.before`, and whether an UPDATE or DELETE without
    /// them (the source table's replica identity sends no old row) was warned about.
    before: Vec<EventPath>,
    warned_before: std::sync::atomic::AtomicBool,
}

pub(super) struct PgTarget {
    client: tokio_postgres::Client,
    name: String,
    stream: String,
    handlers: Vec<Prepared>,
    checkpoint: Position,
    role: Role,
}

/// What a Postgres target is for.
pub(super) enum Role {
    /// The read model itself: each commit writes the checkpoint, and the applied
    /// position is published to the positions bucket for readers.
    Live {
        positions: Box<jetstream::kv::Store>,
        last_published: Instant,
    },
    /// A rebuild's shadow schema, swapped in at the end.
    Shadow(Box<Shadow>),
}

pub(super) struct Shadow {
    /// The live checkpoint table, qualified (the search path points at the shadow).
    pub(super) checkpoints: String,
    /// The tables to swap: (schema, name).
    pub(super) tables: Vec<(String, String)>,
    pub(super) shadow: String,
    pub(super) old: String,
    /// Events the live projection set aside (a dead-letter subject is set) are passed
    /// over: each runs in a savepoint, and one that fails is rolled back alone.
    pub(super) savepoints: bool,
    pub(super) js: jetstream::Context,
}

impl PgTarget {
    /// A target over `client`, its handlers prepared. A handler that does not fit the
    /// read model fails here, before anything is applied.
    pub(super) async fn new(
        cfg: &ProjectionConfig,
        client: tokio_postgres::Client,
        checkpoint: Position,
        role: Role,
    ) -> Result<PgTarget, ProjectionError> {
        let mut handlers = Vec::new();
        for h in &cfg.handlers {
            let (sql, params) = handler_sql(&h.action);
            let stmt = client.prepare(&sql).await.map_err(|e| {
                if !is_event_failure(&e) {
                    // A lost connection is no verdict on the handler.
                    return db_error(&cfg.name, "prepare a handler")(e);
                }
                ProjectionError::Poison {
                    projection: cfg.name.clone(),
                    event_id: "-".into(),
                    subject: "-".into(),
                    seq: 0,
                    reason: format!(
                        "handler for {:?} does not fit the read model: {}: {sql}",
                        h.types,
                        ErrorChain(&e)
                    ),
                }
            })?;
            let moved = match moved_key_sql(&h.action) {
                Some(m) => {
                    let stmt = client
                        .prepare(&m.sql)
                        .await
                        .map_err(db_error(&cfg.name, "prepare a handler"))?;
                    Some((m, stmt))
                }
                None => None,
            };
            let before = params
                .iter()
                .filter_map(|p| match p {
                    Param::Value(path) if path.len() >= 3 && path[..2] == ["data", "before"] => {
                        Some(path.clone())
                    }
                    _ => None,
                })
                .collect();
            handlers.push(Prepared {
                types: h.types.clone(),
                stmt,
                params,
                own_sql: matches!(h.action, Action::Sql { .. }),
                moved,
                before,
                warned_before: std::sync::atomic::AtomicBool::new(false),
            });
        }
        Ok(PgTarget {
            client,
            name: cfg.name.clone(),
            stream: cfg.stream.clone(),
            handlers,
            checkpoint,
            role,
        })
    }
}

/// A projection's checkpoint in `tidemark_checkpoints` (0 when it has none).
pub(super) async fn read_checkpoint(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<Position, ProjectionError> {
    // Projections starting together on one database race to create the table: the
    // loser's IF NOT EXISTS does not see the winner's uncommitted type, and fails on
    // its unique index. Once the winner commits, the table is there.
    if let Err(e) = client.batch_execute(CHECKPOINTS).await {
        let raced = e.code().is_some_and(|c| {
            *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                || *c == tokio_postgres::error::SqlState::DUPLICATE_TABLE
                || *c == tokio_postgres::error::SqlState::DUPLICATE_OBJECT
        });
        if !raced {
            return Err(db_error(name, "create tidemark_checkpoints")(e));
        }
        client
            .batch_execute(CHECKPOINTS)
            .await
            .map_err(db_error(name, "create tidemark_checkpoints"))?;
    }
    let row = client
        .query_opt(
            "SELECT stream_seq, commit_lsn FROM tidemark_checkpoints WHERE projection = $1",
            &[&name],
        )
        .await
        .map_err(db_error(name, "read the checkpoint"))?;
    Ok(Position {
        seq: row.as_ref().map_or(0, |r| r.get::<_, i64>(0) as u64),
        lsn: row.and_then(|r| r.get(1)),
    })
}

impl Target for PgTarget {
    const ATOMIC: bool = true;
    type Tx<'a> = PgTx<'a>;

    fn checkpoint(&self) -> Position {
        self.checkpoint.clone()
    }

    async fn begin(&mut self) -> Result<PgTx<'_>, ProjectionError> {
        let db_err = |what: &str| db_error(&self.name, what);
        self.client
            .batch_execute("BEGIN")
            .await
            .map_err(db_err("begin"))?;
        if let Role::Live { .. } = self.role {
            // The projection's lock (a rebuild's swap takes it too), then the
            // checkpoint under it: a swap may have moved it. Two statements: in READ
            // COMMITTED a statement sees what was committed when it began, so a
            // checkpoint read in the statement that waited for the lock would miss
            // the swap that held it.
            self.client
                .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&self.name])
                .await
                .map_err(db_err("take the projection's lock"))?;
            let row = self
                .client
                .query_opt(
                    "SELECT stream_seq FROM tidemark_checkpoints WHERE projection = $1",
                    &[&self.name],
                )
                .await
                .map_err(db_err("read the checkpoint"))?;
            let stored = row.map_or(0, |r| r.get::<_, i64>(0) as u64);
            if stored != self.checkpoint.seq {
                self.client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(db_err("roll back"))?;
                return Err(ProjectionError::Moved(stored));
            }
        }
        let savepoints = matches!(&self.role, Role::Shadow(s) if s.savepoints);
        Ok(PgTx {
            client: &self.client,
            name: &self.name,
            stream: &self.stream,
            handlers: &self.handlers,
            checkpoint: &mut self.checkpoint,
            role: &mut self.role,
            inflight: futures_util::stream::FuturesOrdered::new(),
            whole_txs: 0,
            savepoints,
        })
    }

    async fn idle(&mut self) {
        // Caught up and quiet: say where the read model stands, now and then.
        if let Role::Live {
            positions,
            last_published,
        } = &mut self.role
            && last_published.elapsed() > Duration::from_millis(100)
        {
            let at = &self.checkpoint;
            publish_position(positions, &self.name, at.seq, at.lsn.clone()).await;
            *last_published = Instant::now() + Duration::from_secs(5);
        }
    }
}

/// An open database transaction (BEGIN sent). A source transaction of any size
/// streams into it event by event; nothing is buffered but the statements in flight.
/// A dropped connection rolls it back.
pub(super) struct PgTx<'a> {
    client: &'a tokio_postgres::Client,
    name: &'a str,
    stream: &'a str,
    handlers: &'a [Prepared],
    checkpoint: &'a mut Position,
    role: &'a mut Role,
    inflight: futures_util::stream::FuturesOrdered<Answer<'a>>,
    whole_txs: usize,
    savepoints: bool,
}

impl PgTx<'_> {
    fn db_err(&self, what: &str) -> impl FnOnce(tokio_postgres::Error) -> ProjectionError + use<> {
        db_error(self.name, what)
    }
}

/// Warns once per handler when an UPDATE or DELETE event lacks an old value the
/// handler reads (`data.before.<column>`): the source table's replica identity sends
/// only the key, or no old row at all, so the handler gets NULL there.
fn warn_before(projection: &str, h: &Prepared, event: &serde_json::Value) {
    use std::sync::atomic::Ordering;
    let op = event["data"]["op"].as_str();
    if !matches!(op, Some("update" | "delete")) || h.warned_before.load(Ordering::Relaxed) {
        return;
    }
    if let Some(path) = h.before.iter().find(|p| lookup(event, p).is_none()) {
        h.warned_before.store(true, Ordering::Relaxed);
        warn!(projection, types = ?h.types, value = %path.join("."), "an event of these types does not carry this old value, so the handler gets NULL for it: the source table's replica identity sends only the key (or no old row on an UPDATE that keeps the key); ALTER TABLE ... REPLICA IDENTITY FULL on the source table sends the whole old row");
    }
}

/// Runs one statement in a savepoint; a failure of the event's doing is rolled back
/// alone (it was set aside by the live projection).
async fn apply_in_savepoint(
    client: &tokio_postgres::Client,
    name: &str,
    stmt: &tokio_postgres::Statement,
    params: &[TextParam],
    seq: u64,
) -> Result<(), ProjectionError> {
    client
        .batch_execute("SAVEPOINT tidemark_event")
        .await
        .map_err(db_error(name, "savepoint"))?;
    let refs = params.iter().map(|p| p as &(dyn ToSql + Sync));
    match client.execute_raw(stmt, refs).await {
        Ok(_) => Ok(()),
        Err(e) if is_event_failure(&e) => {
            debug!(seq, error = %ErrorChain(&e), "passed over (the live projection set it aside)");
            client
                .batch_execute("ROLLBACK TO SAVEPOINT tidemark_event")
                .await
                .map_err(db_error(name, "roll back to the savepoint"))
        }
        // The read model's state (a lost connection, a shutdown), not the event.
        Err(e) => Err(db_error(name, "apply an event")(e)),
    }
}

impl<'a> Tx for PgTx<'a> {
    async fn apply(&mut self, event: Incoming) -> Result<Vec<Refused>, ProjectionError> {
        let mut refused = Vec::new();
        if event.wanted {
            let handlers: &'a [Prepared] = self.handlers;
            for h in handlers {
                if !h.types.contains(&event.event_type) {
                    continue;
                }
                let stmt = &h.stmt;
                if h.own_sql
                    && let Some(path) = h.params.iter().find_map(|p| match p {
                        Param::Value(path) if left_out(&event.event, path) => Some(path),
                        _ => None,
                    })
                {
                    if self.savepoints {
                        // Set aside by the live projection: passed over here too.
                        continue;
                    }
                    // What is in flight first: an earlier failure is the one to tell.
                    let earlier = settle_answers(&mut self.inflight, 0, self.name).await?;
                    if !earlier.is_empty() {
                        return Ok(earlier);
                    }
                    return Ok(vec![Refused {
                        origin: event.origin(),
                        reason: format!(
                            "the event leaves {} out (an unchanged TOASTed value Postgres does not send, or an omitted oversized one), and this sql handler would write NULL in its place: give the source table REPLICA IDENTITY FULL (tidemark then fills the value in), or use an upsert handler (it keeps the read model's value)",
                            path.join(".")
                        ),
                        whole_txs: self.whole_txs,
                    }]);
                }
                if !h.before.is_empty() {
                    warn_before(self.name, h, &event.event);
                }
                let mut statements = Vec::with_capacity(2);
                if let Some((m, delete)) = &h.moved
                    && m.moved(&event.event)
                {
                    let old: Vec<TextParam> = m
                        .old
                        .iter()
                        .zip(delete.params())
                        .map(|(path, ty)| typed_param(&event.event, path, ty))
                        .collect();
                    statements.push((delete, old));
                }
                // Each value in the syntax of its parameter's type.
                let params: Vec<TextParam> = h
                    .params
                    .iter()
                    .zip(stmt.params())
                    .map(|(p, ty)| match p {
                        Param::Value(path) => typed_param(&event.event, path, ty),
                        Param::LeftOut(path) => {
                            TextParam(Some(left_out(&event.event, path).to_string()))
                        }
                    })
                    .collect();
                statements.push((stmt, params));
                for (stmt, params) in statements {
                    if self.savepoints {
                        apply_in_savepoint(self.client, self.name, stmt, &params, event.seq)
                            .await?;
                        continue;
                    }
                    let sent = Sent {
                        origin: event.origin(),
                        whole_txs: self.whole_txs,
                    };
                    let client: &'a tokio_postgres::Client = self.client;
                    self.inflight.push_back(Box::pin(async move {
                        let refs = params.iter().map(|p| p as &(dyn ToSql + Sync));
                        (sent, client.execute_raw(stmt, refs).await)
                    }));
                }
            }
            refused = settle_answers(&mut self.inflight, PIPELINE, self.name).await?;
        }
        if event.txlast() {
            self.whole_txs += 1;
        }
        Ok(refused)
    }

    async fn settle(&mut self) -> Result<Vec<Refused>, ProjectionError> {
        settle_answers(&mut self.inflight, 0, self.name).await
    }

    fn whole_txs(&self) -> usize {
        self.whole_txs
    }

    async fn commit(mut self, at: &Position, urgent: bool) -> Result<(), ProjectionError> {
        if let Role::Live { .. } = self.role {
            self.client
                .execute(
                    &upsert_checkpoint("tidemark_checkpoints"),
                    &[&self.name, &self.stream, &(at.seq as i64), &at.lsn],
                )
                .await
                .map_err(self.db_err("write the checkpoint"))?;
        }
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(self.db_err("commit"))?;
        *self.checkpoint = at.clone();
        if let Role::Live {
            positions,
            last_published,
        } = &mut self.role
            && (urgent || last_published.elapsed() > Duration::from_millis(100))
        {
            publish_position(positions, self.name, at.seq, at.lsn.clone()).await;
            *last_published = Instant::now();
        }
        Ok(())
    }

    async fn abort(&mut self) -> Result<(), ProjectionError> {
        // Later statements only say the transaction is aborted: their answers are
        // dropped.
        self.inflight = futures_util::stream::FuturesOrdered::new();
        self.client
            .batch_execute("ROLLBACK")
            .await
            .map_err(self.db_err("roll back"))
    }

    async fn lock(&mut self) -> Result<bool, ProjectionError> {
        if !matches!(self.role, Role::Shadow(_)) {
            return Ok(false);
        }
        self.client
            .batch_execute("COMMIT; BEGIN")
            .await
            .map_err(self.db_err("begin the swap"))?;
        self.client
            .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&self.name])
            .await
            .map_err(self.db_err("take the projection's lock"))?;
        Ok(true)
    }

    /// Holding the lock, with everything stored applied: swaps the tables and the
    /// checkpoint in one transaction.
    async fn swap(&mut self, at: &Position, events: u64) -> Result<bool, ProjectionError> {
        let Role::Shadow(s) = &*self.role else {
            return Ok(false);
        };
        let (shadow, old) = (&s.shadow, &s.old);
        let mut swap = format!("CREATE SCHEMA {old};");
        for (schema, name) in &s.tables {
            swap.push_str(&format!(
                "ALTER TABLE {s}.{n} SET SCHEMA {old}; ALTER TABLE {shadow}.{n} SET SCHEMA {s};",
                s = quote_ident(schema),
                n = quote_ident(name)
            ));
        }
        self.client
            .batch_execute(&swap)
            .await
            .map_err(self.db_err("swap the tables"))?;
        self.client
            .execute(
                &upsert_checkpoint(&s.checkpoints),
                &[&self.name, &self.stream, &(at.seq as i64), &at.lsn],
            )
            .await
            .map_err(self.db_err("write the checkpoint"))?;
        self.client
            .batch_execute(&format!(
                "DROP SCHEMA {old} CASCADE; DROP SCHEMA {shadow} CASCADE; COMMIT"
            ))
            .await
            .map_err(self.db_err("commit the swap"))?;
        if let Ok(kv) = positions(&s.js, self.stream).await {
            publish_position(&kv, self.name, at.seq, at.lsn.clone()).await;
        }
        info!(projection = %self.name, events, seq = at.seq, "rebuilt and swapped in");
        Ok(true)
    }
}

/// A handler statement sent and not yet answered: statements are pipelined (sent
/// without waiting for the previous answer; Postgres runs them in order), so a
/// transaction of many events is not one round trip per event.
pub(super) struct Sent {
    origin: Origin,
    /// Complete source transactions before it in the open database transaction.
    whole_txs: usize,
}

/// Statements in flight at most.
pub(super) const PIPELINE: usize = 256;

pub(super) type Answer<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Sent, Result<u64, tokio_postgres::Error>)> + Send + 'a>,
>;

/// Awaits answers until at most `keep` statements are in flight. The first failure
/// (in order: later ones only say the transaction is aborted) is returned.
pub(super) async fn settle_answers(
    inflight: &mut futures_util::stream::FuturesOrdered<Answer<'_>>,
    keep: usize,
    projection: &str,
) -> Result<Vec<Refused>, ProjectionError> {
    while inflight.len() > keep {
        let Some((sent, result)) = inflight.next().await else {
            break;
        };
        match result {
            Ok(_) => {}
            Err(e) if is_event_failure(&e) => {
                return Ok(vec![Refused {
                    origin: sent.origin,
                    reason: ErrorChain(&e).to_string(),
                    whole_txs: sent.whole_txs,
                }]);
            }
            // The connection, not the event: roll back and start again from the
            // checkpoint (setting the event aside would lose it).
            Err(e) => return Err(db_error(projection, "apply a handler")(e)),
        }
    }
    Ok(Vec::new())
}

/// Whether a failed statement is the event's doing (a constraint, a type, a missing
/// column: it fails again every time) rather than the database's state: a lost
/// connection, a shutdown, a serialization failure or deadlock, exhausted resources.
/// Only the first makes an event poison.
pub(super) fn is_event_failure(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else {
        return false;
    };
    !crate::postgres::sqlstate::is_transient(db.code().code())
}
