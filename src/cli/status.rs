//! `status` (the chain of positions) and `wait` (read-your-writes).

use super::*;

pub(super) async fn status(cfg: Config, json: bool) -> Outcome {
    let all = crate::status::all_sources(&cfg.sources, &cfg.nats, &cfg.projections).await;
    // The running process's own readiness, from its /readyz, so that status and the
    // probes say the same.
    let readyz = match &cfg.metrics {
        Some(m) => Some(crate::telemetry::fetch_readyz(m.listen).await),
        None => None,
    };
    let readiness = |source: &str| {
        readyz
            .as_ref()
            .map(|r| crate::telemetry::readiness_of(r, source))
    };
    let healthy = all.iter().all(|s| s.problems().is_empty());
    if json {
        println!("{}", crate::status::to_json(&all, readiness));
    } else {
        for s in &all {
            print!("{}", crate::status::render(s));
            if let Some(v) = readiness(&s.source) {
                println!("  readyz    {}", crate::status::render_readiness(&v));
            }
        }
    }
    if healthy {
        Ok(())
    } else {
        Err(Failure::Reported)
    }
}

/// `status --watch`: the chain redrawn every second, until Ctrl-C.
pub(super) async fn status_watch(cfg: Config) -> Outcome {
    loop {
        let all = crate::status::all_sources(&cfg.sources, &cfg.nats, &cfg.projections).await;
        let readyz = match &cfg.metrics {
            Some(m) => Some(crate::telemetry::fetch_readyz(m.listen).await),
            None => None,
        };
        let mut screen = String::from("\x1b[2J\x1b[H");
        screen.push_str(&format!(
            "tidemark status, every second (Ctrl-C to stop)  {}\n\n",
            humantime_now()
        ));
        for s in &all {
            screen.push_str(&crate::status::render(s));
            if let Some(r) = &readyz {
                let v = crate::telemetry::readiness_of(r, &s.source);
                screen.push_str(&format!(
                    "  readyz    {}\n",
                    crate::status::render_readiness(&v)
                ));
            }
            screen.push('\n');
        }
        print!("{screen}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The wall clock as `HH:MM:SS` UTC.
fn humantime_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

pub(super) async fn wait(cfg: Config, projection: &str, lsn: Lsn, timeout: Duration) -> Outcome {
    let Some(p) = cfg.projections.iter().find(|p| p.name == projection) else {
        return Err(Failure::Usage(format!(
            "no [[projection]] is named {projection:?}"
        )));
    };
    let Some(src) = cfg.sources.iter().find(|s| s.name == p.source) else {
        return Err(Failure::Usage(format!(
            "projection {projection:?} names no configured source"
        )));
    };
    // Something committed after `lsn` must reach the stream: a sync message.
    match Catalog::connect(&src.postgres).await {
        Ok(c) => {
            if let Err(e) = c
                .client()
                .simple_query("SELECT pg_logical_emit_message(true, 'tidemark.sync', '')")
                .await
            {
                return Err(Failure::Failed(format!(
                    "cannot write the sync message: {}",
                    ErrorChain(&e)
                )));
            }
        }
        Err(e) => {
            return Err(Failure::of(&e));
        }
    }
    let client = match provision::connect(&cfg.nats, "tidemark-wait").await {
        Ok(c) => c,
        Err(e) => {
            return Err(Failure::of(&e));
        }
    };
    let js = async_nats::jetstream::new(client);
    match crate::projection::wait_applied(&js, projection, lsn, timeout).await {
        Ok(a) => {
            eprintln!(
                "projection {projection} has applied through {} (stream sequence {})",
                a.lsn.as_deref().unwrap_or("-"),
                a.seq
            );
            Ok(())
        }
        Err(last) => Err(Failure::Failed(format!(
            "projection {projection} did not reach {lsn} within {timeout:?} (it has applied through {})",
            last.and_then(|a| a.lsn)
                .unwrap_or_else(|| "nothing yet".into())
        ))),
    }
}
