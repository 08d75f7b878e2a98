//! The live Postgres projection: source transactions streamed into database
//! transactions with the checkpoint, statements pipelined, failures isolated, set
//! aside or named.

use super::*;

pub(super) async fn attempt(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    cancel: &CancellationToken,
    set_aside: &mut HashSet<u64>,
    careful_until: u64,
    tel: &crate::telemetry::Telemetry,
) -> Result<(), ProjectionError> {
    let label = crate::telemetry::ProjectionLabel {
        projection: cfg.name.clone(),
    };
    let db_err = |what: &str| db_error(&cfg.name, what);
    let nats_err = |what: &str| nats_error(&cfg.name, what);
    let target = match &cfg.target {
        Target::Postgres(pg) => pg,
        Target::Kv { bucket } => return attempt_kv(cfg, nats, cancel, bucket).await,
    };
    let client = catalog::connect_client(target, "tidemark-projection").await?;
    client
        .batch_execute(CHECKPOINTS)
        .await
        .map_err(db_err("create tidemark_checkpoints"))?;
    let row = client
        .query_opt(
            "SELECT stream_seq, commit_lsn FROM tidemark_checkpoints WHERE projection = $1",
            &[&cfg.name],
        )
        .await
        .map_err(db_err("read the checkpoint"))?;
    let mut checkpoint: u64 = row.as_ref().map_or(0, |r| r.get::<_, i64>(0) as u64);
    let mut checkpoint_lsn: Option<String> = row.and_then(|r| r.get(1));
    // Prepare every handler's statement: a handler that does not fit the read model
    // fails here, before anything is applied.
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
        handlers.push((h.types.clone(), stmt, params));
    }

    let nc = provision::connect(nats, &format!("tidemark-projection-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let kv = positions(&js, &cfg.stream)
        .await
        .map_err(|e| nats_err("open the positions bucket")(e.into()))?;
    // The consumer starts after the checkpoint every time: the database, not the
    // consumer, says what is applied.
    let mut messages = read_after(&js, cfg, checkpoint)
        .await
        .map_err(nats_err("read the stream"))?;
    info!(seq = checkpoint, lsn = ?checkpoint_lsn, "projecting");

    // The open database transaction (BEGIN sent), and the events applied in it. A
    // dropped connection rolls an open transaction back. A source transaction of any
    // size streams into it event by event; nothing is buffered here.
    let mut open = false;
    let mut in_tx = 0usize;
    // Complete source transactions in the open database transaction.
    let mut whole_txs = 0usize;
    let mut last_published = Instant::now() - Duration::from_secs(1);
    let mut inflight: futures_util::stream::FuturesOrdered<Answer<'_>> =
        futures_util::stream::FuturesOrdered::new();
    loop {
        let msg = tokio::select! {
            biased;
            // An open transaction is rolled back: it is applied again on the next start.
            _ = cancel.cancelled() => return Ok(()),
            m = next_message(&mut messages, &cfg.name) => m?,
        };
        let Some(msg) = msg else {
            // Caught up and quiet: say where the read model stands.
            if !open && last_published.elapsed() > Duration::from_millis(100) {
                publish_position(&kv, &cfg.name, checkpoint, checkpoint_lsn.clone()).await;
                last_published = Instant::now() + Duration::from_secs(5);
            }
            continue;
        };
        let info = msg.info().map_err(|e| nats_err("read message info")(e))?;
        let seq = info.stream_sequence;
        let pending = info.pending;
        if seq <= checkpoint {
            continue;
        }
        if !open {
            client
                .batch_execute("BEGIN")
                .await
                .map_err(db_err("begin"))?;
            // The projection's lock (a rebuild's swap takes it too), then the
            // checkpoint under it: a swap may have moved it. Two statements: in READ
            // COMMITTED a statement sees what was committed when it began, so a
            // checkpoint read in the statement that waited for the lock would miss
            // the swap that held it.
            client
                .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&cfg.name])
                .await
                .map_err(db_err("take the projection's lock"))?;
            let row = client
                .query_opt(
                    "SELECT stream_seq FROM tidemark_checkpoints WHERE projection = $1",
                    &[&cfg.name],
                )
                .await
                .map_err(db_err("read the checkpoint"))?;
            let stored = row.map_or(0, |r| r.get::<_, i64>(0) as u64);
            if stored != checkpoint {
                client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(db_err("roll back"))?;
                return Err(ProjectionError::Moved(stored));
            }
            open = true;
            in_tx = 0;
            whole_txs = 0;
        }
        let wanted = reads(&cfg.subjects, &msg.subject) && !set_aside.contains(&seq);
        let parsed = parse_event(&msg.payload);
        let origin = |event_id: String| Origin {
            seq,
            event_id,
            subject: msg.subject.to_string(),
            payload: msg.payload.clone(),
        };
        let (event, event_id, event_type) = match &parsed {
            Ok((event, id, ty)) => (event, id.clone(), ty.as_str()),
            // An event this projection does not read need not parse.
            Err(_) if !wanted => (&serde_json::Value::Null, String::new(), ""),
            Err(reason) => {
                let failed = settle_answers(&mut inflight, 0, &cfg.name)
                    .await?
                    .unwrap_or((
                        Sent {
                            origin: origin("(unreadable)".into()),
                            whole_txs,
                        },
                        reason.clone(),
                    ));
                drop(inflight);
                return refuse(cfg, &js, &client, failed.0, failed.1, set_aside).await;
            }
        };
        if wanted {
            for (types, stmt, paths) in &handlers {
                if !types.iter().any(|t| t == event_type) {
                    continue;
                }
                let params: Vec<TextParam> = paths.iter().map(|p| param(event, p)).collect();
                let sent = Sent {
                    origin: origin(event_id.clone()),
                    whole_txs,
                };
                let client = &client;
                inflight.push_back(Box::pin(async move {
                    let refs = params.iter().map(|p| p as &(dyn ToSql + Sync));
                    (sent, client.execute_raw(stmt, refs).await)
                }));
            }
            if let Some((failed, reason)) =
                settle_answers(&mut inflight, PIPELINE, &cfg.name).await?
            {
                drop(inflight);
                return refuse(cfg, &js, &client, failed, reason, set_aside).await;
            }
        }
        in_tx += 1;
        let lsn = event["commitlsn"].as_str().map(str::to_string);
        // Commit only at the end of a source transaction (events without the mark
        // count as whole transactions), once caught up or after a good number.
        let tx_end = event["txlast"].as_bool().unwrap_or(true);
        if tx_end {
            whole_txs += 1;
        }
        if tx_end && (pending == 0 || in_tx >= COMMIT_EVERY || seq <= careful_until) {
            if let Some((failed, reason)) = settle_answers(&mut inflight, 0, &cfg.name).await? {
                drop(inflight);
                return refuse(cfg, &js, &client, failed, reason, set_aside).await;
            }
            client
                .execute(
                    &upsert_checkpoint("tidemark_checkpoints"),
                    &[&cfg.name, &cfg.stream, &(seq as i64), &lsn],
                )
                .await
                .map_err(db_err("write the checkpoint"))?;
            client
                .batch_execute("COMMIT")
                .await
                .map_err(db_err("commit"))?;
            open = false;
            checkpoint = seq;
            checkpoint_lsn = lsn;
            set_aside.retain(|s| *s > seq);
            tel.projection_applied_seq
                .get_or_create(&label)
                .set(seq as i64);
            tel.projection_behind
                .get_or_create(&label)
                .set(pending as i64);
            tel.projection_events
                .get_or_create(&label)
                .inc_by(in_tx as u64);
            let synced = event_type == "tidemark.sync";
            if synced || pending == 0 || last_published.elapsed() > Duration::from_millis(100) {
                publish_position(&kv, &cfg.name, checkpoint, checkpoint_lsn.clone()).await;
                last_published = Instant::now();
            }
        }
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
) -> Result<Option<(Sent, String)>, ProjectionError> {
    while inflight.len() > keep {
        let Some((sent, result)) = inflight.next().await else {
            break;
        };
        match result {
            Ok(_) => {}
            Err(e) if is_event_failure(&e) => {
                return Ok(Some((sent, ErrorChain(&e).to_string())));
            }
            // The connection, not the event: roll back and start again from the
            // checkpoint (setting the event aside would lose it).
            Err(e) => return Err(db_error(projection, "apply a handler")(e)),
        }
    }
    Ok(None)
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

/// Rolls the open transaction back and decides what a failed event means: applied
/// again one source transaction at a time when complete ones shared its database
/// transaction (so it is met with everything before it committed), else set aside to
/// the dead-letter subject, else the projection stops naming it.
pub(super) async fn refuse(
    cfg: &ProjectionConfig,
    js: &jetstream::Context,
    client: &tokio_postgres::Client,
    failed: Sent,
    reason: String,
    set_aside: &mut HashSet<u64>,
) -> Result<(), ProjectionError> {
    client
        .batch_execute("ROLLBACK")
        .await
        .map_err(db_error(&cfg.name, "roll back"))?;
    let Sent { origin, whole_txs } = failed;
    if whole_txs > 0 {
        return Err(ProjectionError::Isolate(origin.seq));
    }
    let Some(subject) = &cfg.dead_letter else {
        return Err(origin.poison(cfg, reason));
    };
    dead_letter(js, cfg, subject, &origin, &reason).await?;
    warn!(event_id = %origin.event_id, seq = origin.seq, dead_letter = %subject, reason = %reason, "event set aside to the dead-letter subject");
    set_aside.insert(origin.seq);
    Err(ProjectionError::SetAside(origin.seq))
}
