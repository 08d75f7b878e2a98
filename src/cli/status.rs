//! `status` (the chain of positions) and `wait` (read-your-writes).

use super::*;
use crate::ops::{WaitError, read_your_writes};

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
    let probe = crate::status::Probe::new(&cfg.nats);
    loop {
        let all = probe.all_sources(&cfg.sources, &cfg.projections).await;
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
    match read_your_writes(&cfg, projection, lsn, timeout).await {
        Ok(a) => {
            eprintln!(
                "projection {projection} has applied through {} (stream sequence {})",
                a.lsn.as_deref().unwrap_or("-"),
                a.seq
            );
            Ok(())
        }
        Err(WaitError::Unknown(m)) => Err(Failure::Usage(m)),
        Err(WaitError::Failed(m)) => Err(Failure::Failed(m)),
        Err(WaitError::TimedOut(m)) => Err(Failure::Failed(m)),
    }
}

/// `GET /wait?projection=NAME&lsn=X/Y&timeout=5s` on `project_listen`: 200 once the
/// read model includes the position, 408 on timeout, 404 for an unknown projection,
/// 400 for a bad query. The answer is JSON.
pub(super) async fn http_wait(cfg: &Config, query: &str) -> (u16, serde_json::Value) {
    let mut projection = None;
    let mut lsn = None;
    let mut timeout = Duration::from_secs(5);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "projection" => projection = Some(v),
            "lsn" => match v.parse::<Lsn>() {
                Ok(l) => lsn = Some(l),
                Err(e) => return (400, serde_json::json!({"error": format!("lsn: {e}")})),
            },
            "timeout" => match super::parse_duration(&v) {
                Ok(t) if t <= MAX_HTTP_WAIT => timeout = t,
                Ok(_) => {
                    return (
                        400,
                        serde_json::json!({"error": format!("timeout: at most {}s", MAX_HTTP_WAIT.as_secs())}),
                    );
                }
                Err(e) => return (400, serde_json::json!({"error": format!("timeout: {e}")})),
            },
            other => {
                return (
                    400,
                    serde_json::json!({"error": format!("unknown parameter {other:?}: use projection, lsn and timeout")}),
                );
            }
        }
    }
    let (Some(projection), Some(lsn)) = (projection, lsn) else {
        return (
            400,
            serde_json::json!({"error": "use /wait?projection=NAME&lsn=X/Y&timeout=5s"}),
        );
    };
    match read_your_writes(cfg, &projection, lsn, timeout).await {
        Ok(a) => (
            200,
            serde_json::json!({"projection": projection, "applied_lsn": a.lsn, "applied_seq": a.seq}),
        ),
        Err(WaitError::Unknown(m)) => (404, serde_json::json!({"error": m})),
        Err(WaitError::Failed(m)) => (503, serde_json::json!({"error": m})),
        Err(WaitError::TimedOut(m)) => (408, serde_json::json!({"error": m})),
    }
}

/// The longest wait `GET /wait` accepts.
const MAX_HTTP_WAIT: Duration = Duration::from_secs(60);

/// `%2F` and friends (an LSN's slash may come encoded), and `+` as a space.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("0%2F16B3748"), "0/16B3748");
        assert_eq!(percent_decode("0/16B3748"), "0/16B3748");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%é1"), "%é1");
    }
}
