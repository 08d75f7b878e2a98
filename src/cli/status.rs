//! `status` (the chain of positions) and `wait` (read-your-writes).

use super::*;

pub(super) async fn status(cfg: Config, json: bool) -> Outcome {
    let mut all = Vec::new();
    for source in &cfg.sources {
        all.push(crate::status::source_status(source, &cfg.nats, &cfg.projections).await);
    }
    // The running process's own readiness, from its /readyz, so that status and the
    // probes say the same.
    let readyz = match &cfg.metrics {
        Some(m) => Some(crate::telemetry::fetch_readyz(m.listen).await),
        None => None,
    };
    let healthy = all.iter().all(|s| s.problems().is_empty());
    if json {
        let values: Vec<serde_json::Value> = all
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["problems"] = serde_json::json!(s.problems());
                if let Some(r) = &readyz {
                    v["readyz"] = crate::telemetry::readiness_of(r, &s.source);
                }
                v
            })
            .collect();
        println!("{}", serde_json::Value::Array(values));
    } else {
        for s in &all {
            print!("{}", crate::status::render(s));
            if let Some(r) = &readyz {
                let v = crate::telemetry::readiness_of(r, &s.source);
                println!(
                    "  readyz    {}",
                    match v["ready"].as_bool() {
                        Some(true) => "ready".to_string(),
                        Some(false) => format!(
                            "NOT READY: {}",
                            v["reasons"]
                                .as_array()
                                .map(|a| a
                                    .iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join("; "))
                                .unwrap_or_default()
                        ),
                        None => "unreachable (is `tidemark run` running?)".to_string(),
                    }
                );
            }
        }
    }
    if healthy {
        Ok(())
    } else {
        Err(Failure::Reported)
    }
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
