//! `replay`: the stream from a position to stdout, a subject or nowhere.

use super::*;

/// What `replay` does with the events.
pub(super) enum Output {
    Lines,
    Pretty,
    Republish(String),
}

pub(super) async fn replay(
    cfg: Config,
    source: Option<String>,
    from: Option<Position>,
    to: Option<Position>,
    filter: Filter,
    follow: bool,
    output: Output,
) -> Outcome {
    let src = match pick_source(&cfg, source) {
        Ok(s) => s,
        Err(f) => return Err(f),
    };
    let started = std::time::Instant::now();
    let mut stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let mut sink = match output {
        Output::Lines => Sink::Lines(&mut stdout),
        Output::Pretty => Sink::Pretty(&mut stdout),
        Output::Republish(prefix) => {
            match crate::replay::Republisher::new(&cfg.nats, &prefix, &src.name).await {
                Ok(r) => Sink::Republish(Box::new(r)),
                Err(err) => {
                    return Err(Failure::of(&err));
                }
            }
        }
    };
    let result = crate::replay::replay(
        src,
        &cfg.nats,
        from.as_ref(),
        to.as_ref(),
        &filter,
        follow,
        &mut sink,
    )
    .await;
    match result {
        Ok(stats) => {
            let republished = match &sink {
                Sink::Republish(r) => format!(
                    " ({} republished, {} already there)",
                    r.published, r.skipped
                ),
                _ => String::new(),
            };
            eprintln!(
                "replayed {} events{republished}, sequences {}..{}, start located in {} reads, {} ms",
                stats.emitted,
                stats.first_seq,
                stats.last_seq,
                stats.probes,
                started.elapsed().as_millis()
            );
            Ok(())
        }
        Err(crate::replay::ReplayError::Stdout(e))
            if e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(())
        }
        Err(err) => Err(Failure::of(&err)),
    }
}
