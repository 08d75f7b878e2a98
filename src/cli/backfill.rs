//! `backfill`: queue one (`ops`) and follow it with a progress bar.

use super::*;

/// Queues a backfill of one table, then (when `wait`) follows it to the end.
pub(super) async fn backfill_cmd(
    src: &SourceConfig,
    nats: &NatsConfig,
    table: &str,
    filter: Option<String>,
    chunk_size: Option<u64>,
    wait: bool,
) -> Outcome {
    let (job, progress) = crate::ops::queue_backfill(src, nats, table, filter, chunk_size).await?;
    eprintln!(
        "backfill of {}.{} queued for source {:?}",
        job.schema, job.table, src.name
    );
    if !wait {
        return Ok(());
    }
    follow_backfill(&progress, &job.schema, &job.table, &job.id).await
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
