//! Metrics and health: a Prometheus endpoint and liveness/readiness probes.
//!
//! `Telemetry` holds every metric (lock-free atomics from `prometheus-client`) and a
//! little state per source for readiness. `serve` answers `GET /metrics`, `/healthz`
//! (the process runs) and `/readyz` (every source streams and its lag is under the
//! configured limit) on the `[metrics] listen` address. The HTTP handling is a few
//! lines over a TCP listener: three fixed GET routes need no framework.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabel {
    pub projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub source: String,
    pub kind: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~100 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
}

type HistogramFamily = Family<SourceLabel, Histogram, fn() -> Histogram>;

/// What readiness needs to know of a source.
#[derive(Clone, Debug, Default)]
struct SourceState {
    streaming: bool,
    stalled: bool,
    lag_seconds: f64,
    last_progress: Option<Instant>,
}

/// Every metric tidemark exports, and readiness state.
pub struct Telemetry {
    registry: Registry,
    pub events: Family<SourceLabel, Counter>,
    pub bytes: Family<SourceLabel, Counter>,
    pub publish_latency: HistogramFamily,
    pub commit_to_ack: HistogramFamily,
    pub in_flight: Family<SourceLabel, Gauge>,
    pub lag_bytes: Family<SourceLabel, Gauge>,
    pub lag_seconds: Family<SourceLabel, Gauge<f64, AtomicU64>>,
    pub retained_wal_bytes: Family<SourceLabel, Gauge>,
    pub flushed_lsn: Family<SourceLabel, Gauge>,
    pub restarts: Family<SourceLabel, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
    pub streaming: Family<SourceLabel, Gauge>,
    pub stalled: Family<SourceLabel, Gauge>,
    pub projection_applied_seq: Family<ProjectionLabel, Gauge>,
    pub projection_behind: Family<ProjectionLabel, Gauge>,
    pub projection_events: Family<ProjectionLabel, Counter>,
    state: Mutex<HashMap<String, SourceState>>,
    /// Readiness: the most replication lag a ready source may have.
    pub ready_max_lag: Duration,
}

impl Telemetry {
    pub fn new(ready_max_lag: Duration) -> Arc<Telemetry> {
        let mut registry = Registry::with_prefix("tidemark");
        let t = Telemetry {
            events: Family::default(),
            bytes: Family::default(),
            publish_latency: Family::new_with_constructor(latency_histogram),
            commit_to_ack: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            lag_bytes: Family::default(),
            lag_seconds: Family::default(),
            retained_wal_bytes: Family::default(),
            flushed_lsn: Family::default(),
            restarts: Family::default(),
            errors: Family::default(),
            streaming: Family::default(),
            stalled: Family::default(),
            projection_applied_seq: Family::default(),
            projection_behind: Family::default(),
            projection_events: Family::default(),
            state: Mutex::new(HashMap::new()),
            ready_max_lag,
            registry: Registry::default(),
        };
        registry.register(
            "events_published",
            "Events JetStream stored",
            t.events.clone(),
        );
        registry.register(
            "event_bytes_published",
            "Bytes of event payloads sent to JetStream (counted when sent: a pipeline rebuilt after a failure may send some again)",
            t.bytes.clone(),
        );
        registry.register(
            "publish_latency_seconds",
            "From a publish to the JetStream ack that covers it: one per ack, and one ack covers a run of publishes (timed from its first)",
            t.publish_latency.clone(),
        );
        registry.register(
            "commit_to_ack_seconds",
            "From the Postgres commit to the JetStream ack",
            t.commit_to_ack.clone(),
        );
        registry.register(
            "in_flight",
            "Publishes awaiting an ack",
            t.in_flight.clone(),
        );
        registry.register(
            "replication_lag_bytes",
            "WAL Postgres sent beyond the confirmed flush LSN",
            t.lag_bytes.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Age of the oldest committed transaction not yet stored",
            t.lag_seconds.clone(),
        );
        registry.register(
            "slot_retained_wal_bytes",
            "WAL the replication slot keeps",
            t.retained_wal_bytes.clone(),
        );
        registry.register(
            "flushed_lsn",
            "The flush LSN confirmed to Postgres",
            t.flushed_lsn.clone(),
        );
        registry.register(
            "pipeline_restarts",
            "Pipeline rebuilds after an error",
            t.restarts.clone(),
        );
        registry.register("errors", "Pipeline errors by kind", t.errors.clone());
        registry.register(
            "streaming",
            "1 while the source streams",
            t.streaming.clone(),
        );
        registry.register(
            "projection_applied_seq",
            "The stream sequence a projection has applied through",
            t.projection_applied_seq.clone(),
        );
        registry.register(
            "projection_behind_messages",
            "Stream messages a projection has yet to read",
            t.projection_behind.clone(),
        );
        registry.register(
            "projection_events_applied",
            "Events a projection applied",
            t.projection_events.clone(),
        );
        registry.register(
            "stalled",
            "1 while the source makes no progress it should",
            t.stalled.clone(),
        );
        Arc::new(Telemetry { registry, ..t })
    }

    pub fn label(source: &str) -> SourceLabel {
        SourceLabel {
            source: source.to_string(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn set_streaming(&self, source: &str, on: bool) {
        self.streaming
            .get_or_create(&Self::label(source))
            .set(i64::from(on));
        if let Ok(mut s) = self.state.lock() {
            let st = s.entry(source.to_string()).or_default();
            st.streaming = on;
            if on {
                st.last_progress = Some(Instant::now());
            }
        }
    }

    pub fn set_stalled(&self, source: &str, on: bool) {
        self.stalled
            .get_or_create(&Self::label(source))
            .set(i64::from(on));
        if let Ok(mut s) = self.state.lock() {
            s.entry(source.to_string()).or_default().stalled = on;
        }
    }

    pub fn set_lag_seconds(&self, source: &str, secs: f64) {
        self.lag_seconds
            .get_or_create(&Self::label(source))
            .set(secs);
        if let Ok(mut s) = self.state.lock() {
            s.entry(source.to_string()).or_default().lag_seconds = secs;
        }
    }

    pub fn error(&self, source: &str, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabel {
                source: source.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Registers a source, so readiness waits for it.
    pub fn expect(&self, source: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.entry(source.to_string()).or_default();
        }
        self.streaming.get_or_create(&Self::label(source)).set(0);
    }

    /// One source's readiness in this process, as JSON: `{ready, reasons, streaming,
    /// stalled, lag_seconds}` (what the status page shows of the running process).
    pub fn source_readiness(&self, source: &str) -> serde_json::Value {
        let reasons: Vec<String> = match self.readiness() {
            Ok(()) => Vec::new(),
            Err(all) => all
                .into_iter()
                .filter(|r| r.starts_with(&format!("source {source} ")))
                .collect(),
        };
        let st = self.state.lock().ok().and_then(|s| {
            s.get(source)
                .map(|st| (st.streaming, st.stalled, st.lag_seconds))
        });
        match st {
            None => {
                serde_json::json!({"ready": null, "reasons": ["this process does not run the source"]})
            }
            Some((streaming, stalled, lag)) => serde_json::json!({
                "ready": reasons.is_empty(),
                "reasons": reasons,
                "streaming": streaming,
                "stalled": stalled,
                "lag_seconds": lag,
            }),
        }
    }

    /// Ready when every source streams with its lag under the limit; otherwise the
    /// reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let Ok(s) = self.state.lock() else {
            return Err(vec!["telemetry state unavailable".into()]);
        };
        let mut problems = Vec::new();
        for (name, st) in s.iter() {
            if !st.streaming {
                problems.push(format!("source {name} is not streaming"));
            } else if st.stalled {
                problems.push(format!("source {name} is stalled: no progress"));
            } else if st.lag_seconds > self.ready_max_lag.as_secs_f64() {
                problems.push(format!(
                    "source {name} lags {:.1}s, over {}s",
                    st.lag_seconds,
                    self.ready_max_lag.as_secs()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            problems.sort();
            Err(problems)
        }
    }
}

/// Gathers what the status page shows (the JSON of `status --json`).
pub type StatusFn = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = serde_json::Value> + Send>>
        + Send
        + Sync,
>;

/// Answers `GET /wait?…` (read-your-writes) with an HTTP status code and JSON.
pub type WaitFn = Arc<
    dyn Fn(
            String,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = (u16, serde_json::Value)> + Send>>
        + Send
        + Sync,
>;

/// What the listener serves beyond metrics and probes.
#[derive(Clone)]
pub struct Pages {
    /// The status page's data.
    pub status: StatusFn,
    /// `tidemark project`'s read-your-writes endpoint.
    pub wait: Option<WaitFn>,
}

/// The status page: one self-contained HTML file (inline style and script, no
/// external assets) that polls `status.json` every second and draws each source's
/// chain of positions. It only reads.
pub const STATUS_PAGE: &str = include_str!("status_page.html");

/// How long gathering the status may take before `/status.json` answers with an error.
const STATUS_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves `/metrics`, `/healthz`, `/readyz`, and with `status` the status page (`/`)
/// and its data (`/status.json`), on `listen` until `cancel` fires. Every route only
/// reads.
pub async fn serve(
    listen: std::net::SocketAddr,
    telemetry: Arc<Telemetry>,
    pages: Option<Pages>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    info!(address = %listen, "metrics and health endpoints listening");
    loop {
        let (mut conn, _) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint accept failed");
                    continue;
                }
            },
        };
        let telemetry = telemetry.clone();
        let pages = pages.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            // Read the request head (we need only its first line).
            loop {
                let read =
                    tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[len..])).await;
                match read {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        len += n;
                        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                            break;
                        }
                    }
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (path, query) = path.split_once('?').unwrap_or((path, ""));
            let status = pages.as_ref().map(|p| &p.status);
            let wait = pages.as_ref().and_then(|p| p.wait.as_ref());
            let (code, content_type, body) = match (method, path, status) {
                ("GET", "/" | "/index.html", Some(_)) => (
                    "200 OK",
                    "text/html; charset=utf-8",
                    STATUS_PAGE.to_string(),
                ),
                ("GET", "/status.json", Some(gather)) => {
                    match tokio::time::timeout(STATUS_TIMEOUT, gather()).await {
                        Ok(v) => ("200 OK", "application/json", v.to_string()),
                        Err(_) => (
                            "503 Service Unavailable",
                            "application/json",
                            serde_json::json!({"error": format!("gathering the status took over {}s", STATUS_TIMEOUT.as_secs())}).to_string(),
                        ),
                    }
                }
                ("GET", "/wait", _) if wait.is_some() => {
                    let (code, v) = match wait {
                        Some(w) => w(query.to_string()).await,
                        None => (404, serde_json::json!({})),
                    };
                    (http_status(code), "application/json", v.to_string())
                }
                _ => route(method, path, &telemetry),
            };
            let response = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = conn.write_all(response.as_bytes()).await {
                debug!(error = %e, "metrics response not written");
            }
            let _ = conn.shutdown().await;
        });
    }
}

/// The status line of the codes `/wait` answers with.
fn http_status(code: u16) -> &'static str {
    match code {
        200 => "200 OK",
        400 => "400 Bad Request",
        404 => "404 Not Found",
        408 => "408 Request Timeout",
        _ => "503 Service Unavailable",
    }
}

/// The fixed routes: metrics and probes.
fn route(method: &str, path: &str, telemetry: &Telemetry) -> (&'static str, &'static str, String) {
    match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            telemetry.encode(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => match telemetry.readiness() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
            Err(p) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready:\n{}\n", p.join("\n")),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /, /status.json, /metrics, /healthz or /readyz\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    }
}

/// What `/readyz` answered: Some((ready, reasons)), or None when nothing answered.
pub type Readyz = Option<(bool, Vec<String>)>;

/// Asks a running tidemark's `/readyz` (on 127.0.0.1 when it listens on all addresses).
pub async fn fetch_readyz(listen: std::net::SocketAddr) -> Readyz {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: tidemark\r\n\r\n")
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .ok()??;
    let ready = out.split_whitespace().nth(1) == Some("200");
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let reasons = body
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    Some((ready, reasons))
}

/// One source's part of a `/readyz` answer, as JSON: `{ready, reasons}` (ready is null
/// when the endpoint did not answer).
pub fn readiness_of(r: &Readyz, source: &str) -> serde_json::Value {
    match r {
        None => {
            serde_json::json!({"ready": null, "reasons": ["the metrics endpoint did not answer"]})
        }
        Some((_, reasons)) => {
            let mine: Vec<&String> = reasons
                .iter()
                .filter(|x| x.starts_with(&format!("source {source} ")))
                .collect();
            serde_json::json!({"ready": mine.is_empty(), "reasons": mine})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_source_streaming_and_caught_up() {
        let t = Telemetry::new(Duration::from_secs(5));
        t.expect("a");
        assert!(t.readiness().is_err());
        t.set_streaming("a", true);
        assert!(t.readiness().is_ok());
        t.set_lag_seconds("a", 9.0);
        assert_eq!(
            t.readiness().unwrap_err(),
            vec!["source a lags 9.0s, over 5s"]
        );
        t.set_lag_seconds("a", 0.0);
        t.events.get_or_create(&Telemetry::label("a")).inc_by(3);
        let text = t.encode();
        assert!(
            text.contains("tidemark_events_published_total{source=\"a\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("tidemark_streaming{source=\"a\"} 1"),
            "{text}"
        );
    }
}
