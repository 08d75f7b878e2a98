//! `project rebuild` of a Postgres read model: shadow tables built from the stream's
//! start, swapped in with the checkpoint under the projection's lock.

use super::*;

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildStats {
    pub events: u64,
    pub seq: u64,
    pub swap_ms: u128,
}

pub(super) fn split_table(t: &str) -> (String, String) {
    match t.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => ("public".to_string(), t.to_string()),
    }
}

/// How far behind the stream's end a rebuild may be when it takes the projection's
/// lock: what it applies while the live model waits.
pub(super) const CATCH_UP: u64 = 500;

/// Commits what is open and begins the swap's transaction holding the projection's
/// lock, so the live projection applies nothing more until the swap commits.
async fn lock_for_swap(
    client: &tokio_postgres::Client,
    name: &str,
    open: bool,
) -> Result<(), ProjectionError> {
    let db_err = |what: &str| db_error(name, what);
    if open {
        client
            .batch_execute("COMMIT")
            .await
            .map_err(db_err("commit"))?;
    }
    client
        .batch_execute("BEGIN")
        .await
        .map_err(db_err("begin the swap"))?;
    client
        .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&name])
        .await
        .map_err(db_err("take the projection's lock"))?;
    Ok(())
}

/// Rebuilds a projection's tables from the start of the stream into a shadow schema,
/// then, once it is within `CATCH_UP` events of the stream's end (or the stream is
/// quiet), takes the projection's lock, applies what was stored by then and swaps
/// the tables and the checkpoint in one transaction. The live model serves until the
/// lock is taken, and waits only for the last events and the swap.
pub async fn rebuild(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    mut progress: impl FnMut(u64, u64),
) -> Result<RebuildStats, ProjectionError> {
    let db_err = |what: &str| db_error(&cfg.name, what);
    let nats_err = |what: &str| nats_error(&cfg.name, what);
    let target = match &cfg.target {
        Target::Kv { bucket } => return rebuild_kv(cfg, nats, bucket, progress).await,
        Target::Postgres(pg) => pg,
    };
    if cfg.tables.is_empty() {
        return Err(ProjectionError::Poison {
            projection: cfg.name.clone(),
            event_id: "-".into(),
            subject: "-".into(),
            seq: 0,
            reason: "no tables to rebuild: name them in the projection (tables = [\"...\"])".into(),
        });
    }

    let client = catalog::connect_client(target, "tidemark-rebuild").await?;
    client
        .batch_execute(CHECKPOINTS)
        .await
        .map_err(db_err("create tidemark_checkpoints"))?;
    // The checkpoint table the live projection uses, named before the search path
    // points at the shadow schema.
    let checkpoints: String = client
        .query_one(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'tidemark_checkpoints'::regclass",
            &[],
        )
        .await
        .map_err(db_err("find tidemark_checkpoints"))?
        .get(0);
    let shadow = quote_ident(&format!("tidemark_rebuild_{}", cfg.name));
    let old = quote_ident(&format!("tidemark_old_{}", cfg.name));
    let tables: Vec<(String, String)> = cfg.tables.iter().map(|t| split_table(t)).collect();
    let mut setup = format!(
        "DROP SCHEMA IF EXISTS {shadow} CASCADE; DROP SCHEMA IF EXISTS {old} CASCADE; CREATE SCHEMA {shadow};"
    );
    let mut schemas: Vec<String> = Vec::new();
    for (schema, name) in &tables {
        setup.push_str(&format!(
            "CREATE TABLE {shadow}.{n} (LIKE {s}.{n} INCLUDING ALL);",
            s = quote_ident(schema),
            n = quote_ident(name)
        ));
        if !schemas.contains(schema) {
            schemas.push(schema.clone());
        }
    }
    // Unqualified table names in the handlers now resolve to the shadow tables.
    let path: Vec<String> = schemas.iter().map(|s| quote_ident(s)).collect();
    setup.push_str(&format!("SET search_path = {shadow}, {};", path.join(", ")));
    client
        .batch_execute(&setup)
        .await
        .map_err(db_err("create the shadow tables"))?;
    let mut handlers = Vec::new();
    for h in &cfg.handlers {
        let (sql, params) = handler_sql(&h.action);
        let stmt = client
            .prepare(&sql)
            .await
            .map_err(db_err("prepare a handler against the shadow tables"))?;
        handlers.push((h.types.clone(), stmt, params));
    }

    let nc = provision::connect(nats, &format!("tidemark-rebuild-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    // The consumer reads the whole stream and the subjects filter applies here: a
    // source transaction's last event (its txlast mark) may be on any subject, and
    // the transaction must end where the source's did.
    let mut messages = read_after(&js, cfg, 0)
        .await
        .map_err(nats_err("read the stream"))?;

    let mut applied_seq = 0u64;
    let mut applied_lsn: Option<String> = None;
    let mut events = 0u64;
    let mut open = false;
    let mut at_tx_end = true;
    let mut in_tx = 0usize;
    // Once the lock is held: the stream sequence to apply through before swapping.
    let mut swap_until: Option<u64> = None;
    let mut swap_started = Instant::now();
    loop {
        let wait = if swap_until.is_some() { 200 } else { 500 };
        let next = tokio::time::timeout(Duration::from_millis(wait), messages.next()).await;
        let msg = match next {
            Ok(Some(Ok(m))) => Some(m),
            Ok(Some(Err(e))) => return Err(nats_err("read the stream")(Box::new(e))),
            Ok(None) => return Err(nats_err("read the stream")("the stream ended".into())),
            Err(_) => None,
        };
        let Some(msg) = msg else {
            // Caught up (at a transaction's end): take the lock and swap.
            if !at_tx_end {
                continue;
            }
            if swap_until.is_some() {
                break;
            }
            lock_for_swap(&client, &cfg.name, open).await?;
            (open, swap_until, swap_started) = (true, Some(applied_seq), Instant::now());
            continue;
        };
        let info = msg.info().map_err(|e| nats_err("read message info")(e))?;
        let seq = info.stream_sequence;
        let last = info.pending + seq;
        let wanted = reads(&cfg.subjects, &msg.subject);
        let (event, event_id, event_type) = rebuild_parse(cfg, &msg, seq, wanted)?;
        if !open {
            client
                .batch_execute("BEGIN")
                .await
                .map_err(db_err("begin"))?;
            open = true;
            in_tx = 0;
        }
        let skip_failures = cfg.dead_letter.is_some();
        for (types, stmt, paths) in &handlers {
            if !wanted || !types.iter().any(|t| t == &event_type) {
                continue;
            }
            let params: Vec<TextParam> = paths.iter().map(|p| param(&event, p)).collect();
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            if skip_failures {
                client
                    .batch_execute("SAVEPOINT tidemark_event")
                    .await
                    .map_err(db_err("savepoint"))?;
            }
            if let Err(e) = client.execute(stmt, &refs).await {
                if !is_event_failure(&e) {
                    // The read model's state (a lost connection, a shutdown), not
                    // the event's doing.
                    return Err(db_err("apply an event")(e));
                }
                if skip_failures {
                    // Set aside before (it went to the dead-letter subject then).
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT tidemark_event")
                        .await
                        .map_err(db_err("roll back to the savepoint"))?;
                    continue;
                }
                return Err(ProjectionError::Poison {
                    projection: cfg.name.clone(),
                    event_id,
                    subject: msg.subject.to_string(),
                    seq,
                    reason: ErrorChain(&e).to_string(),
                });
            }
        }
        events += 1;
        in_tx += 1;
        applied_seq = seq;
        applied_lsn = event["commitlsn"].as_str().map(str::to_string);
        at_tx_end = event["txlast"].as_bool().unwrap_or(true);
        progress(seq, last.max(seq));
        if !at_tx_end {
            continue;
        }
        match swap_until {
            // Everything stored when the lock was taken is applied: swap.
            Some(until) if applied_seq >= until => break,
            Some(_) => {}
            // Nearly caught up: take the lock (the live projection waits from here)
            // and apply only what is left, so a stream that never goes quiet still
            // swaps, and the live model stands still for a short while only.
            None if info.pending <= CATCH_UP => {
                lock_for_swap(&client, &cfg.name, open).await?;
                (open, swap_until, swap_started) = (true, Some(last), Instant::now());
                if applied_seq >= last {
                    break;
                }
            }
            None if in_tx >= COMMIT_EVERY => {
                client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(db_err("commit"))?;
                open = false;
            }
            None => {}
        }
    }
    // Holding the lock, with everything stored applied: swap tables and checkpoint.
    let mut swap = format!("CREATE SCHEMA {old};");
    for (schema, name) in &tables {
        swap.push_str(&format!(
            "ALTER TABLE {s}.{n} SET SCHEMA {old}; ALTER TABLE {shadow}.{n} SET SCHEMA {s};",
            s = quote_ident(schema),
            n = quote_ident(name)
        ));
    }
    client
        .batch_execute(&swap)
        .await
        .map_err(db_err("swap the tables"))?;
    client
        .execute(
            &upsert_checkpoint(&checkpoints),
            &[&cfg.name, &cfg.stream, &(applied_seq as i64), &applied_lsn],
        )
        .await
        .map_err(db_err("write the checkpoint"))?;
    client
        .batch_execute(&format!(
            "DROP SCHEMA {old} CASCADE; DROP SCHEMA {shadow} CASCADE; COMMIT"
        ))
        .await
        .map_err(db_err("commit the swap"))?;
    let swap_ms = swap_started.elapsed().as_millis();
    if let Ok(kv) = positions(&js, &cfg.stream).await {
        publish_position(&kv, &cfg.name, applied_seq, applied_lsn).await;
    }
    info!(projection = %cfg.name, events, seq = applied_seq, swap_ms, "rebuilt and swapped in");
    Ok(RebuildStats {
        events,
        seq: applied_seq,
        swap_ms,
    })
}
