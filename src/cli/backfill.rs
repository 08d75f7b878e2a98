//! `backfill` (queue and follow one) and `resync` (new slot, gap marker, backfill of
//! every table).

use super::*;

/// New slot, gap marker, and a backfill of every published table.
pub(super) async fn resync(
    src: &SourceConfig,
    nats: &NatsConfig,
    yes: bool,
    force: bool,
) -> Outcome {
    if !yes {
        return Err(Failure::Usage(format!(
            "resync creates a new replication slot {:?}, keeps stream {:?} with a tidemark.reset event at the gap, and backfills every published table; pass --yes",
            src.slot, src.stream.name
        )));
    }
    // Everything that could refuse is checked before anything changes.
    let catalog = match Catalog::connect(&src.postgres).await {
        Ok(c) => c,
        Err(e) => return Err(Failure::of(&e)),
    };
    let published = match catalog.publication(&src.publication).await {
        Ok(Some(list)) => list,
        Ok(None) => {
            return Err(Failure::Failed(format!(
                "publication {:?} does not exist: run `tidemark run` once to create it, or create it by hand",
                src.publication
            )));
        }
        Err(e) => return Err(Failure::of(&e)),
    };
    let names: Vec<(String, String)> = published
        .into_iter()
        .filter(|(schema, name)| {
            !src.outboxes
                .iter()
                .any(|o| &o.schema == schema && &o.table == name)
        })
        .collect();
    let infos = match catalog.tables(&names).await {
        Ok(t) => t,
        Err(e) => return Err(Failure::of(&e)),
    };
    let mut jobs = Vec::new();
    for t in &infos {
        match crate::backfill::key_columns(&catalog, src, &t.schema, &t.name, &t.primary_key).await
        {
            Ok(key) => jobs.push(crate::backfill::Job::new(
                &t.schema,
                &t.name,
                key,
                "resync",
                None,
                src.snapshot_chunk_size,
            )),
            Err(e) => return Err(Failure::Failed(e.to_string())),
        }
    }
    let progress = match open_progress(src, nats, "tidemark-resync").await {
        Ok(p) => p,
        Err(e) => return Err(Failure::Failed(e)),
    };
    reset_with_reason(src, nats, Some(ResetMode::Keep), true, force, "resync").await?;
    for job in &jobs {
        if let Err(e) = progress.put(job).await {
            return Err(Failure::of(&e));
        }
    }
    println!(
        "queued a backfill of {} table(s): the next `tidemark run` streams from the new slot and sends every table's rows after the marker",
        jobs.len()
    );
    Ok(())
}

/// Queues a backfill of one table, then (when `wait`) follows it to the end.
pub(super) async fn backfill_cmd(
    src: &SourceConfig,
    nats: &NatsConfig,
    table: &str,
    filter: Option<String>,
    chunk_size: Option<u64>,
    wait: bool,
) -> Outcome {
    let Some((schema, name)) = config::split_table(table) else {
        return Err(Failure::Failed(format!(
            "{table:?} is not a table name: use \"table\" or \"schema.table\""
        )));
    };
    let qualified = format!("{schema}.{name}");
    let catalog = match Catalog::connect(&src.postgres).await {
        Ok(c) => c,
        Err(e) => return Err(Failure::of(&e)),
    };
    let info = match catalog.tables(&[(schema.clone(), name.clone())]).await {
        Ok(mut t) if !t.is_empty() => t.remove(0),
        Ok(_) => return Err(Failure::Failed(format!("table {qualified} does not exist"))),
        Err(e) => return Err(Failure::of(&e)),
    };
    match catalog.publication(&src.publication).await {
        Ok(Some(list)) if list.contains(&(schema.clone(), name.clone())) => {}
        Ok(_) => {
            return Err(Failure::Failed(format!(
                "publication {:?} does not publish {qualified}, so its changes would not follow its rows: run ALTER PUBLICATION {} ADD TABLE {} (or add it to the source's tables and restart tidemark), then backfill",
                src.publication,
                crate::postgres::replication::quote_ident(&src.publication),
                info.qualified()
            )));
        }
        Err(e) => return Err(Failure::of(&e)),
    }
    let key = match crate::backfill::key_columns(&catalog, src, &schema, &name, &info.primary_key)
        .await
    {
        Ok(k) => k,
        Err(e) => return Err(Failure::Failed(e.to_string())),
    };
    if let Some(f) = &filter
        && let Err(e) = catalog
            .client()
            .simple_query(&format!(
                "EXPLAIN SELECT 1 FROM {} WHERE ({f})",
                info.qualified()
            ))
            .await
    {
        return Err(Failure::Failed(format!(
            "--where {f:?} is not a valid condition on {qualified}: {}",
            ErrorChain(&e)
        )));
    }
    let progress = match open_progress(src, nats, "tidemark-backfill").await {
        Ok(p) => p,
        Err(e) => return Err(Failure::Failed(e)),
    };
    match progress.get(&schema, &name).await {
        Ok(Some(j))
            if matches!(
                j.state,
                crate::backfill::JobState::Pending | crate::backfill::JobState::Running
            ) =>
        {
            return Err(Failure::Failed(format!(
                "a backfill of {qualified} is already {} ({} rows done): wait for it, or watch it with `tidemark status`",
                if j.state == crate::backfill::JobState::Pending {
                    "queued"
                } else {
                    "running"
                },
                j.rows_done
            )));
        }
        Ok(_) => {}
        Err(e) => return Err(Failure::of(&e)),
    }
    let job = crate::backfill::Job::new(
        &schema,
        &name,
        key,
        "backfill",
        filter,
        chunk_size.unwrap_or(src.snapshot_chunk_size).max(1),
    );
    if let Err(e) = progress.put(&job).await {
        return Err(Failure::of(&e));
    }
    eprintln!("backfill of {qualified} queued for source {:?}", src.name);
    if !wait {
        return Ok(());
    }
    follow_backfill(&progress, &schema, &name, &job.id).await
}

/// Follows a backfill job until it ends, with a progress bar on a terminal.
pub(super) async fn follow_backfill(
    progress: &crate::backfill::Progress,
    schema: &str,
    name: &str,
    id: &str,
) -> Outcome {
    use crate::backfill::JobState;
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {human_pos}/{human_len} rows, {per_sec}, ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("{schema}.{name}"));
        bar
    });
    let started = std::time::Instant::now();
    let mut hinted = false;
    loop {
        let job = match progress.get(schema, name).await {
            Ok(Some(j)) if j.id == id => j,
            Ok(_) => {
                return Err(Failure::Failed(format!(
                    "the backfill record of {schema}.{name} was replaced"
                )));
            }
            Err(e) => {
                return Err(Failure::of(&e));
            }
        };
        if let Some(bar) = &bar {
            bar.set_length(job.rows_estimate.max(job.rows_done));
            bar.set_position(job.rows_done);
        }
        match job.state {
            JobState::Done => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                let (rate, _) = job.rate_and_eta();
                eprintln!(
                    "backfill of {schema}.{name} done: {} rows in {} chunks, {rate:.0} rows/s",
                    job.rows_done, job.chunks_done
                );
                return Ok(());
            }
            JobState::Failed => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                return Err(Failure::Failed(format!(
                    "backfill of {schema}.{name} failed: {}",
                    job.error.as_deref().unwrap_or("unknown error")
                )));
            }
            JobState::Pending if !hinted && started.elapsed() > Duration::from_secs(15) => {
                hinted = true;
                eprintln!(
                    "still queued: no tidemark has picked it up; is `tidemark run` streaming this source?"
                );
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The source's backfill record, bound to its stream, over a NATS connection of its own.
async fn open_progress(
    src: &SourceConfig,
    nats: &NatsConfig,
    client_name: &str,
) -> Result<crate::backfill::Progress, String> {
    let client = provision::connect(nats, client_name)
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    let js = async_nats::jetstream::new(client);
    crate::backfill::Progress::open_for_stream(
        &js,
        &src.name,
        &src.stream.name,
        src.stream.replicas,
    )
    .await
    .map_err(|e| ErrorChain(&e).to_string())
}
