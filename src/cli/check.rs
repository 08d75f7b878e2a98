//! `check`: offline validation, then each live prerequisite, one line per check.

use super::*;

/// Prints one check line; returns whether it passed.
pub(super) fn line(source: &str, ok: bool, what: &str, detail: &str) -> bool {
    let mark = if ok { "ok  " } else { "FAIL" };
    println!("{mark} [{source}] {what}: {detail}");
    ok
}

pub(super) async fn check(cfg: Config) -> Outcome {
    println!(
        "ok   config {}: {} source(s)",
        cfg.path.display(),
        cfg.sources.len()
    );
    let mut all_ok = true;
    for source in &cfg.sources {
        all_ok &= check_source(source, &cfg.nats).await;
    }
    if all_ok {
        Ok(())
    } else {
        Err(Failure::Reported)
    }
}

pub(super) async fn check_source(s: &SourceConfig, nats: &NatsConfig) -> bool {
    let n = s.name.as_str();
    let mut ok = true;
    let pg = format!(
        "{}:{}/{}",
        s.postgres.host, s.postgres.port, s.postgres.dbname
    );
    let mut slot_exists = None;
    let mut stream_last_seq = None;
    let mut oids_now = Vec::new();
    let mut oids_recorded = None;
    match check_postgres(s, &mut slot_exists, &mut oids_now).await {
        Ok(lines) => {
            line(
                n,
                true,
                "postgres",
                &format!("connected to {pg} as {}", s.postgres.user),
            );
            for (good, what, detail) in lines {
                ok &= line(n, good, &what, &detail);
            }
        }
        Err(err) => ok &= line(n, false, "postgres", &ErrorChain(&err).to_string()),
    }
    match check_nats(s, nats, &mut stream_last_seq, &mut oids_recorded).await {
        Ok(lines) => {
            for (good, what, detail) in lines {
                ok &= line(n, good, &what, &detail);
            }
        }
        Err(err) => ok &= line(n, false, "nats", &ErrorChain(&err).to_string()),
    }
    // Tables swapped while tidemark was stopped, as `run` finds them at start (see
    // source::recreated): said here too, so `check` and `run` agree.
    if slot_exists == Some(true)
        && let Some(recorded) = &oids_recorded
    {
        for (what, detail) in swapped_lines(recorded, &oids_now) {
            line(n, true, &what, &detail);
        }
        for (what, detail) in added_lines(s, recorded, &oids_now) {
            line(n, true, &what, &detail);
        }
    }
    if let (Some(false), Some(last_seq)) = (slot_exists, stream_last_seq)
        && last_seq > 0
    {
        let err = source::SourceError::SlotLost {
            slot: s.slot.clone(),
            stream: s.stream.name.clone(),
            last_seq,
            last_lsn: None,
        };
        ok &= line(n, false, &format!("slot {:?}", s.slot), &err.to_string());
    }
    if ok {
        println!("ok   [{n}] would stream to stream {:?}", s.stream.name);
    }
    ok
}

type CheckLines = Vec<(bool, String, String)>;

/// The tables found under another OID than the source recorded (dropped and created
/// again, or swapped in by a rename, while tidemark was stopped): what `run` does
/// with each at its next start.
fn swapped_lines(
    recorded: &crate::backfill::TableOids,
    now: &[(String, String, u32)],
) -> Vec<(String, String)> {
    now.iter()
        .filter_map(|(schema, name, oid)| {
            let (_, _, was) = recorded
                .tables
                .iter()
                .find(|(s, t, _)| s == schema && t == name)?;
            (was != oid).then(|| {
                (
                    format!(
                        "table {}.{}",
                        crate::postgres::replication::quote_ident(schema),
                        crate::postgres::replication::quote_ident(name)
                    ),
                    format!(
                        "dropped and created again since tidemark last ran (OID {was}, now {oid}): `run` will send its truncated event and read it again"
                    ),
                )
            })
        })
        .collect()
}

/// The tables new to the selection since the source last ran (added to `tables`, or
/// created under `all_tables`): what `run` does with each at its next start.
fn added_lines(
    s: &SourceConfig,
    recorded: &crate::backfill::TableOids,
    now: &[(String, String, u32)],
) -> Vec<(String, String)> {
    now.iter()
        .filter(|(schema, name, _)| {
            !recorded
                .tables
                .iter()
                .any(|(s, t, _)| s == schema && t == name)
        })
        .map(|(schema, name, _)| {
            let detail = if source::snapshot_reads(s, schema, name) {
                "new since tidemark last ran: `run` will send its truncated event and read its rows (they are not in the stream)"
            } else {
                "new since tidemark last ran: `run` streams its changes from now on; its rows from before are not sent (snapshot = \"never\", snapshot_tables or an outbox): `tidemark backfill` sends them"
            };
            (
                format!(
                    "table {}.{}",
                    crate::postgres::replication::quote_ident(schema),
                    crate::postgres::replication::quote_ident(name)
                ),
                detail.to_string(),
            )
        })
        .collect()
}

/// PostgreSQL 18's `idle_replication_slot_timeout`: a slot unused for that long is
/// invalidated, and the changes since are lost to the stream.
async fn idle_timeout_line(catalog: &Catalog) -> Option<(bool, String, String)> {
    let secs = catalog.idle_slot_timeout_secs().await?;
    (secs > 0).then(|| {
        (
            true,
            "idle_replication_slot_timeout".into(),
            format!(
                "warning: {secs} s: {}",
                crate::postgres::version::IDLE_SLOT_TIMEOUT_RISK
            ),
        )
    })
}

/// Checks the database; records whether the slot exists in `slot_exists`, and the
/// OIDs of the tables in `oids`.
pub(super) async fn check_postgres(
    s: &SourceConfig,
    slot_exists: &mut Option<bool>,
    oids: &mut Vec<(String, String, u32)>,
) -> Result<CheckLines, CatalogError> {
    let catalog = Catalog::connect(&s.postgres).await?;
    let mut out: CheckLines = Vec::new();
    let version = catalog.version();
    if let Err(e) = catalog.check_version() {
        out.push((false, "server".into(), e.to_string()));
        return Ok(out);
    }
    out.push((true, "server".into(), format!("PostgreSQL {version}")));
    for d in version.differences() {
        out.push((true, format!("on PostgreSQL {}", version.major()), d.into()));
    }
    for m in &s.messages {
        if let Err(e) = catalog.check_messages(&m.prefix) {
            out.push((
                false,
                format!("message prefix {:?}", m.prefix),
                e.to_string(),
            ));
        }
    }
    let slot = catalog.slot(&s.slot).await?;
    if !version.logical_messages() {
        let needs_snapshot = s.snapshot == crate::config::SnapshotMode::Initial && slot.is_none();
        match crate::postgres::signal::inspect(
            &catalog,
            &s.signal_table,
            &s.publication,
            s.create_publication,
        )
        .await?
        {
            Ok(detail) => out.push((true, "signal table".into(), detail)),
            Err(why) if needs_snapshot => out.push((
                false,
                "signal table".into(),
                format!("{why}; the initial snapshot of a new slot needs it (or set snapshot = \"never\")"),
            )),
            Err(why) => out.push((true, "signal table".into(), format!("warning: {why}"))),
        }
    }
    if let Some(line) = idle_timeout_line(&catalog).await {
        out.push(line);
    }
    match catalog.check_wal_level().await {
        Ok(()) => out.push((true, "wal_level".into(), "logical".into())),
        Err(e) => out.push((false, "wal_level".into(), e.to_string())),
    }
    let wanted = match &s.tables {
        TableSelection::All => catalog.all_tables(&s.signal_table).await?,
        TableSelection::Listed(t) => t.clone(),
    };
    if s.tables == TableSelection::All {
        for (schema, name) in catalog.unlogged_tables().await? {
            let table = format!(
                "{}.{}",
                crate::postgres::replication::quote_ident(&schema),
                crate::postgres::replication::quote_ident(&name)
            );
            out.push((
                true,
                format!("table {table}"),
                format!("warning: UNLOGGED, so not streamed (its changes are not in the WAL); ALTER TABLE {table} SET LOGGED to stream it"),
            ));
        }
    }
    match catalog.check_grants(&wanted).await {
        Ok(()) => out.push((
            true,
            "grants".into(),
            "REPLICATION, and SELECT on the tables".into(),
        )),
        Err(e) => out.push((false, "grants".into(), e.to_string())),
    }
    let published = catalog.publication(&s.publication).await?;
    let pub_name = format!("publication {:?}", s.publication);
    match (&published, s.create_publication) {
        (Some(p), _) => out.push((
            true,
            pub_name,
            if p.unpublished.is_empty() {
                format!("exists, publishes {} table(s)", p.tables.len())
            } else {
                format!(
                    "exists, publishes {} table(s); warning: it does not publish {}, so those changes never reach the stream and read models drift from the tables: ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')",
                    p.tables.len(),
                    p.unpublished.join(", "),
                    crate::postgres::replication::quote_ident(&s.publication)
                )
            },
        )),
        (None, true) => out.push((true, pub_name, "will be created".into())),
        (None, false) => out.push((
            false,
            pub_name,
            CatalogError::PublicationMissing {
                name: s.publication.clone(),
            }
            .to_string(),
        )),
    }
    match catalog.tables(&wanted).await {
        Err(e) => out.push((false, "tables".into(), e.to_string())),
        Ok(tables) => {
            oids.extend(
                tables
                    .iter()
                    .map(|t| (t.schema.clone(), t.name.clone(), t.oid)),
            );
            for t in tables.iter().cloned() {
                let in_pub = published
                    .as_ref()
                    .is_some_and(|p| p.publishes(&t.schema, &t.name));
                if let Err(e) = catalog.check_partitioned(&t) {
                    out.push((false, format!("table {}", t.qualified()), e.to_string()));
                    continue;
                }
                // A partitioned table published by its partitions: `run` sets the
                // publication to publish via the root when it manages it, else refuses.
                if t.partitioned
                    && let Some(p) = &published
                    && !p.via_root
                {
                    let what = format!("table {}", t.qualified());
                    if s.create_publication {
                        out.push((true, what.clone(), format!("partitioned; publication {:?} will be set to publish_via_partition_root = true, so its partitions' changes are the table's", s.publication)));
                    } else {
                        out.push((
                            false,
                            what,
                            CatalogError::PublicationByPartitions {
                                publication: s.publication.clone(),
                                table: t.qualified(),
                            }
                            .to_string(),
                        ));
                        continue;
                    }
                }
                let key = if t.primary_key.is_empty() {
                    "no primary key".to_string()
                } else {
                    format!("key ({})", t.primary_key.join(", "))
                };
                let identity = match t.replica_identity {
                    'f' => "full",
                    'n' => "nothing",
                    'i' => "index",
                    _ => "default",
                };
                let what = format!("table {}", t.qualified());
                match t.identity_problem() {
                    Some((table, problem)) if !in_pub => out.push((false, what, CatalogError::NoReplicaIdentity { table, identity: problem }.to_string())),
                    Some((table, _)) => out.push((true, what, format!("replica identity {identity}, {key}; warning: UPDATE and DELETE on {table} fail while it is published; set REPLICA IDENTITY FULL or add a primary key"))),
                    None if !in_pub && !s.create_publication && published.is_some() => out.push((false, what, CatalogError::PublicationLacksTable { publication: s.publication.clone(), table: t.qualified() }.to_string())),
                    None => out.push((true, what, format!("replica identity {identity}, {key}{}", if in_pub { "" } else { "; will be added to the publication" }))),
                }
                // What `run` does with a table it cannot page: reads it from the new
                // slot's snapshot (no key), or says so and streams its changes (a
                // mapping key that cannot page it); see source::attempt.
                if source::snapshot_reads(s, &t.schema, &t.name)
                    && let Err(e) = crate::backfill::key_columns(
                        &catalog,
                        s,
                        &t.schema,
                        &t.name,
                        &t.primary_key,
                    )
                    .await
                {
                    let line = match e {
                        crate::backfill::BackfillError::NoKey { .. } => {
                            "no key: a new slot reads it from its own consistent snapshot (its rows are published before the slot streams)".to_string()
                        }
                        e => format!("warning: the initial snapshot skips it: {e}"),
                    };
                    out.push((true, format!("snapshot {}", t.qualified()), line));
                }
            }
            out.extend(plan_lines(&catalog, s, &tables).await?);
        }
    }
    if let Some(line) = wal_keep_line(&catalog).await {
        out.push(line);
    }
    let slot_name = format!("slot {:?}", s.slot);
    *slot_exists = Some(slot.is_some());
    match slot {
        Some(info) => match catalog.check_slot(&s.slot, &info) {
            Ok(()) => out.push((
                true,
                slot_name,
                format!(
                    "exists, confirmed flush {}, {}",
                    info.confirmed_flush
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "none".into()),
                    match info.active_pid {
                        Some(pid) if info.active => format!("active (pid {pid})"),
                        _ => "inactive".into(),
                    }
                ),
            )),
            Err(e) => out.push((false, slot_name, e.to_string())),
        },
        None if s.create_slot => out.push((true, slot_name, "will be created".into())),
        None => out.push((
            false,
            slot_name,
            CatalogError::SlotMissing {
                slot: s.slot.clone(),
            }
            .to_string(),
        )),
    }
    Ok(out)
}

/// How much WAL a slot may hold back (`max_slot_wal_keep_size`), against the current
/// write rate (sampled over one second): unlimited risks the disk, small risks the slot.
pub(super) async fn wal_keep_line(catalog: &Catalog) -> Option<(bool, String, String)> {
    let c = catalog.client();
    if !catalog.version().slot_wal_status() {
        return Some((
            true,
            "max_slot_wal_keep_size".into(),
            format!(
                "warning: unlimited: PostgreSQL {} has no such limit (it came in 13), so while tidemark is stopped or behind its slot keeps WAL until the disk fills; watch the slot's retained WAL (warn_retained_wal_bytes)",
                catalog.version()
            ),
        ));
    }
    let setting: String = c
        .query_opt(
            "SELECT setting FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
            &[],
        )
        .await
        .ok()??
        .get(0);
    let mb: i64 = setting.parse().ok()?;
    let what = "max_slot_wal_keep_size".to_string();
    if mb < 0 {
        return Some((
            true,
            what,
            "warning: unlimited: while tidemark is stopped or behind, its slot keeps WAL until the disk fills; set a limit that covers your longest outage (if the slot is then invalidated, `tidemark resync` recovers)".into(),
        ));
    }
    let lsn = || async {
        c.query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .ok()
            .and_then(|r| r.get::<_, String>(0).parse::<Lsn>().ok())
    };
    let a = lsn().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = lsn().await?;
    let rate = b.0.saturating_sub(a.0) as f64;
    let keep = mb as f64 * 1024.0 * 1024.0;
    if rate > 0.0 && keep / rate < 3600.0 {
        return Some((
            true,
            what,
            format!(
                "warning: {mb} MB holds only {:.0} minutes of WAL at the current write rate ({:.0} KB/s): a longer outage invalidates the slot (then `tidemark resync` recovers); raise it",
                keep / rate / 60.0,
                rate / 1024.0
            ),
        ));
    }
    Some((true, what, format!("{mb} MB")))
}

/// The mapping plan per table, and the warnings that go with it.
pub(super) async fn plan_lines(
    catalog: &Catalog,
    s: &SourceConfig,
    tables: &[crate::postgres::catalog::TableInfo],
) -> Result<CheckLines, CatalogError> {
    let mut out: CheckLines = Vec::new();
    let planned = match source::plan_tables(catalog, s, tables).await {
        Ok(p) => p,
        Err(source::SourceError::Catalog(e)) => return Err(e),
        Err(e) => {
            out.push((false, "mapping".into(), ErrorChain(&e).to_string()));
            return Ok(out);
        }
    };
    for p in planned {
        let table = format!("{}.{}", p.info.schema, p.info.name);
        let what = format!("plan {table}");
        let token = crate::events::mapping::table_token(&p.info.schema, &p.info.name);
        for text in p.plan.describe(&p.columns, &s.name, &token) {
            out.push((true, what.clone(), text));
        }
        if p.plan.outbox.is_none() && p.info.replica_identity != 'f' {
            let toastable = catalog.toastable_columns(p.info.oid).await?;
            let shown: Vec<&String> = toastable
                .iter()
                .filter(|c| !p.info.primary_key.contains(c))
                .filter(|c| {
                    p.plan
                        .columns
                        .iter()
                        .any(|o| p.columns.get(o.index).is_some_and(|(n, _)| n == *c))
                })
                .collect();
            if !shown.is_empty() {
                out.push((
                    true,
                    what.clone(),
                    format!(
                        "warning: {} can be TOASTed; without REPLICA IDENTITY FULL an UPDATE that leaves such a value unchanged does not carry it, so the event lists it in data.unchanged_toast instead of a value (run ALTER TABLE {} REPLICA IDENTITY FULL to have it filled)",
                        shown.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", "),
                        p.info.qualified()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Checks NATS and the stream; records the stream's last sequence in `last_seq`.
pub(super) async fn check_nats(
    s: &SourceConfig,
    nats: &NatsConfig,
    last_seq: &mut Option<u64>,
    oids: &mut Option<crate::backfill::TableOids>,
) -> Result<CheckLines, provision::ProvisionError> {
    let client = provision::connect(nats, "tidemark-check").await?;
    let mut out: CheckLines = Vec::new();
    let info = client.server_info();
    let payload_ok = info.max_payload == 0 || s.max_event_bytes <= info.max_payload;
    out.push((
        payload_ok,
        "nats".into(),
        if payload_ok {
            format!(
                "connected to {} (server {}, max_payload {})",
                nats.servers.join(","),
                info.version,
                info.max_payload
            )
        } else {
            provision::ProvisionError::PayloadLimit {
                max_payload: info.max_payload,
                max_event_bytes: s.max_event_bytes,
            }
            .to_string()
        },
    ));
    // The servers of the cluster the client knows (itself included): a stream or
    // bucket with fewer replicas than the cluster could give is lost, or stops
    // answering, with one server.
    let servers = info
        .connect_urls
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        .max(1);
    let js = async_nats::jetstream::new(client);
    let what = format!("stream {:?}", s.stream.name);
    match js.get_stream(&s.stream.name).await {
        Ok(mut stream) => match provision::read_tail(&mut stream, &s.name).await {
            Ok(tail) => {
                let replicas = stream.cached_info().config.num_replicas.max(1);
                if let Some(w) = replica_warning(replicas, servers) {
                    out.push((true, what.clone(), w));
                }
                // A stream that ever stored events makes a missing slot a loss, unless
                // `reset --purge-stream` emptied it (the same rule as `run`).
                let progress = crate::backfill::Progress::existing(&js, &s.name).await;
                let purged = match &progress {
                    Some(p) => p.purged_at().await.ok().flatten(),
                    None => None,
                };
                // The OIDs `run` recorded for this stream.
                if let Some(p) = progress {
                    let p = p.bind(crate::backfill::stream_binding(stream.cached_info()));
                    *oids = p.table_oids().await.ok().flatten();
                }
                let fresh = tail.last_seq == 0
                    || (tail.last_event.is_none() && purged == Some(tail.last_seq));
                *last_seq = (!fresh).then_some(tail.last_seq);
                out.push((
                    true,
                    what,
                    format!("exists, last sequence {}", tail.last_seq),
                ))
            }
            Err(e) => out.push((false, what, e.to_string())),
        },
        Err(_) => match js.query_account().await {
            Ok(_) => {
                if let Some(w) = replica_warning(s.stream.replicas, servers) {
                    out.push((true, what.clone(), w));
                }
                out.push((true, what, "will be created".into()))
            }
            Err(e) => out.push((
                false,
                what,
                format!("JetStream is not available: {e}; start nats-server with -js"),
            )),
        },
    }
    let bucket = crate::backfill::bucket_name(&s.name);
    if let Ok(mut kv) = js.get_stream(format!("KV_{bucket}")).await
        && let Ok(i) = kv.info().await
        && let Some(w) = replica_warning(i.config.num_replicas.max(1), servers)
    {
        out.push((true, format!("bucket {bucket:?}"), w));
    }
    Ok(out)
}

/// A warning when `replicas` is fewer than a cluster of `servers` could give (up to
/// 3, JetStream's usual and the most a majority needs).
fn replica_warning(replicas: usize, servers: usize) -> Option<String> {
    let could = servers.min(3);
    (replicas < could).then(|| {
        format!(
            "warning: {replicas} replica(s) on a cluster of {servers} servers: losing one server loses or blocks it; set replicas = {could} in [source.stream] (an existing stream or bucket keeps its count: raise it with `nats stream edit --replicas {could}`)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::replica_warning;

    #[test]
    fn fewer_replicas_than_the_cluster_could_give_warn() {
        assert_eq!(replica_warning(1, 1), None);
        assert_eq!(replica_warning(3, 3), None);
        assert_eq!(
            replica_warning(3, 5),
            None,
            "three is enough for a majority"
        );
        assert_eq!(replica_warning(2, 2), None);
        let w = replica_warning(1, 3).expect("warns");
        assert!(w.contains("replicas = 3"), "{w}");
        let w = replica_warning(1, 2).expect("warns");
        assert!(w.contains("replicas = 2"), "{w}");
    }
}
