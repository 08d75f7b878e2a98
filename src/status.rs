//! `tidemark status`: the chain of positions of each source, and the distances between
//! them: Postgres' current WAL position, the slot's confirmed flush and restart LSNs
//! (and the WAL the slot retains), the stream's stored range, and each durable
//! consumer's ack floor and pending count. Read-only.

use futures_util::StreamExt;
use serde::Serialize;

use crate::config::{NatsConfig, SourceConfig};
use crate::error::ErrorChain;
use crate::jetstream::provision;
use crate::position::EventId;
use crate::postgres::catalog::Catalog;

#[derive(Debug, Serialize)]
pub struct SourceStatus {
    pub source: String,
    pub slot_name: String,
    pub stream_name: String,
    #[serde(serialize_with = "value_or_error")]
    pub postgres: Result<PgStatus, String>,
    #[serde(serialize_with = "value_or_error")]
    pub stream: Result<StreamStatus, String>,
    /// Backfills on record (snapshots included), oldest first.
    pub backfills: Vec<BackfillStatus>,
    /// The read models built from this source's stream.
    pub projections: Vec<ProjectionStatus>,
}

/// A projection's applied position, and how far it is behind the stream.
#[derive(Debug, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub applied_seq: Option<u64>,
    pub applied_lsn: Option<String>,
    /// Stream messages after the applied sequence (not all may be for it).
    pub lag_messages: Option<u64>,
    /// A KV projection's bucket, once a rebuild swapped a new one in.
    pub bucket: Option<String>,
}

/// One table's backfill, with its rate and the time left at that rate.
#[derive(Debug, Serialize)]
pub struct BackfillStatus {
    pub table: String,
    pub reason: String,
    pub state: String,
    pub rows_done: u64,
    pub rows_estimate: u64,
    pub chunks_done: u64,
    pub rows_per_sec: f64,
    pub eta_secs: Option<f64>,
    pub error: Option<String>,
}

/// `Ok(v)` as `v`, `Err(e)` as `{"error": e}`.
fn value_or_error<T: Serialize, S: serde::Serializer>(
    r: &Result<T, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match r {
        Ok(v) => v.serialize(s),
        Err(e) => serde_json::json!({ "error": e }).serialize(s),
    }
}

#[derive(Debug, Serialize)]
pub struct PgStatus {
    pub current_wal_lsn: String,
    /// None when the slot does not exist.
    pub slot: Option<SlotStatus>,
}

#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub wal_status: Option<String>,
    /// WAL kept for the slot: current WAL position minus restart LSN.
    pub retained_wal_bytes: Option<i64>,
    /// Current WAL position minus confirmed flush LSN.
    pub lag_bytes: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub messages: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Commit LSNs of the first and last stored events.
    pub first_lsn: Option<String>,
    pub last_lsn: Option<String>,
    pub consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub ack_floor_seq: u64,
    /// Messages not yet delivered plus delivered but not acked. Only durable
    /// consumers are listed.
    pub pending: u64,
}

impl SourceStatus {
    /// What makes this source unhealthy for a probe: unreachable systems, or a slot that
    /// is missing or lost.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.postgres {
            Err(e) => out.push(format!("postgres: {e}")),
            Ok(pg) => match &pg.slot {
                None => out.push(format!(
                    "replication slot {:?} does not exist",
                    self.slot_name
                )),
                Some(s) if s.wal_status.as_deref() == Some("lost") => out.push(format!(
                    "replication slot {:?} is invalidated (wal_status = lost)",
                    self.slot_name
                )),
                Some(_) => {}
            },
        }
        if let Err(e) = &self.stream {
            out.push(format!("stream: {e}"));
        }
        for b in self.backfills.iter().filter(|b| b.state == "failed") {
            out.push(format!(
                "backfill of {} failed: {}",
                b.table,
                b.error.as_deref().unwrap_or("unknown error")
            ));
        }
        out
    }
}

/// The connections status is read over, kept from one read to the next (the status
/// page reads every second): one NATS client for every source, one catalog session
/// per source, each made again only when it was lost.
pub struct Probe {
    nats: NatsConfig,
    js: tokio::sync::Mutex<Option<async_nats::Client>>,
    catalogs: tokio::sync::Mutex<std::collections::HashMap<String, Catalog>>,
}

impl Probe {
    pub fn new(nats: &NatsConfig) -> Probe {
        Probe {
            nats: nats.clone(),
            js: tokio::sync::Mutex::new(None),
            catalogs: tokio::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The NATS client, connected anew when there is none or it lost its server.
    async fn jetstream(&self) -> Result<async_nats::jetstream::Context, String> {
        let mut slot = self.js.lock().await;
        if let Some(c) = slot.as_ref()
            && c.connection_state() == async_nats::connection::State::Connected
        {
            return Ok(async_nats::jetstream::new(c.clone()));
        }
        let client = provision::connect(&self.nats, "tidemark-status")
            .await
            .map_err(|e| ErrorChain(&e).to_string())?;
        *slot = Some(client.clone());
        Ok(async_nats::jetstream::new(client))
    }

    /// Gathers the status of every source, in order.
    pub async fn all_sources(
        &self,
        sources: &[SourceConfig],
        projections: &[crate::config::ProjectionConfig],
    ) -> Vec<SourceStatus> {
        let js = self.jetstream().await;
        let mut all = Vec::new();
        for source in sources {
            all.push(self.source_status(source, js.as_ref(), projections).await);
        }
        all
    }

    async fn source_status(
        &self,
        s: &SourceConfig,
        js: Result<&async_nats::jetstream::Context, &String>,
        projections: &[crate::config::ProjectionConfig],
    ) -> SourceStatus {
        let stream = match js {
            Ok(js) => stream_status(s, js).await,
            Err(e) => Err(e.clone()),
        };
        let last_seq = stream.as_ref().ok().map(|st| st.last_seq);
        SourceStatus {
            source: s.name.clone(),
            slot_name: s.slot.clone(),
            stream_name: s.stream.name.clone(),
            postgres: self.pg_status(s).await,
            stream,
            backfills: match js {
                Ok(js) => backfill_status(s, js).await,
                Err(_) => Vec::new(),
            },
            projections: projection_status(s, js.ok(), projections, last_seq).await,
        }
    }

    /// The source's Postgres status over its kept session (made again when closed or
    /// when a query on it fails).
    async fn pg_status(&self, s: &SourceConfig) -> Result<PgStatus, String> {
        let mut catalogs = self.catalogs.lock().await;
        if catalogs.get(&s.name).is_none_or(|c| c.client().is_closed()) {
            let catalog = Catalog::connect(&s.postgres)
                .await
                .map_err(|e| ErrorChain(&e).to_string())?;
            catalogs.insert(s.name.clone(), catalog);
        }
        let Some(catalog) = catalogs.get(&s.name) else {
            return Err("no catalog session".into());
        };
        let status = pg_status(s, catalog).await;
        if status.is_err() {
            catalogs.remove(&s.name);
        }
        status
    }
}

/// Gathers the status of every source once, over connections of its own.
pub async fn all_sources(
    sources: &[SourceConfig],
    nats: &NatsConfig,
    projections: &[crate::config::ProjectionConfig],
) -> Vec<SourceStatus> {
    Probe::new(nats).all_sources(sources, projections).await
}

/// The JSON `status --json` prints and the status page reads: an array of sources,
/// each with its `problems`, and its process's readiness under `readyz` when
/// `readiness` knows it.
pub fn to_json(
    all: &[SourceStatus],
    readiness: impl Fn(&str) -> Option<serde_json::Value>,
) -> serde_json::Value {
    serde_json::Value::Array(
        all.iter()
            .map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["problems"] = serde_json::json!(s.problems());
                if let Some(r) = readiness(&s.source) {
                    v["readyz"] = r;
                }
                v
            })
            .collect(),
    )
}

/// A readiness value (`{ready, reasons}`) in words.
pub fn render_readiness(v: &serde_json::Value) -> String {
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
}

async fn projection_status(
    s: &SourceConfig,
    js: Option<&async_nats::jetstream::Context>,
    projections: &[crate::config::ProjectionConfig],
    last_seq: Option<u64>,
) -> Vec<ProjectionStatus> {
    let mine: Vec<_> = projections.iter().filter(|p| p.source == s.name).collect();
    let mut out = Vec::new();
    for p in mine {
        let applied = match js {
            Some(js) => crate::projection::applied(js, &p.name).await,
            None => None,
        };
        out.push(ProjectionStatus {
            name: p.name.clone(),
            applied_seq: applied.as_ref().map(|a| a.seq),
            applied_lsn: applied.as_ref().and_then(|a| a.lsn.clone()),
            lag_messages: match (last_seq, &applied) {
                (Some(last), Some(a)) => Some(last.saturating_sub(a.seq)),
                _ => None,
            },
            bucket: applied.as_ref().and_then(|a| a.bucket.clone()),
        });
    }
    out
}

async fn backfill_status(
    s: &SourceConfig,
    js: &async_nats::jetstream::Context,
) -> Vec<BackfillStatus> {
    let Some(progress) = crate::backfill::Progress::existing(js, &s.name).await else {
        return Vec::new();
    };
    progress
        .jobs()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|j| {
            let (rate, eta) = j.rate_and_eta();
            BackfillStatus {
                table: j.qualified(),
                reason: j.reason.clone(),
                state: serde_json::to_value(j.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                rows_done: j.rows_done,
                rows_estimate: j.rows_estimate,
                chunks_done: j.chunks_done,
                rows_per_sec: rate,
                eta_secs: eta,
                error: j.error,
            }
        })
        .collect()
}

async fn pg_status(s: &SourceConfig, catalog: &Catalog) -> Result<PgStatus, String> {
    let c = catalog.client();
    let err = |e: tokio_postgres::Error| ErrorChain(&e).to_string();
    let current: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(err)?
        .get(0);
    let slot = catalog
        .slot(&s.slot)
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    let slot = match slot {
        None => None,
        Some(info) => {
            let row = c
                .query_one(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                            pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&s.slot],
                )
                .await
                .map_err(err)?;
            Some(SlotStatus {
                active: info.active,
                active_pid: info.active_pid.filter(|_| info.active),
                confirmed_flush_lsn: info.confirmed_flush.map(|l| l.to_string()),
                restart_lsn: info.restart_lsn.map(|l| l.to_string()),
                wal_status: info.wal_status,
                retained_wal_bytes: row.get(0),
                lag_bytes: row.get(1),
            })
        }
    };
    Ok(PgStatus {
        current_wal_lsn: current,
        slot,
    })
}

async fn stream_status(
    s: &SourceConfig,
    js: &async_nats::jetstream::Context,
) -> Result<StreamStatus, String> {
    let mut stream = js
        .get_stream(&s.stream.name)
        .await
        .map_err(|e| format!("stream {:?}: {e}", s.stream.name))?;
    let state = stream
        .info()
        .await
        .map_err(|e| format!("stream info: {e}"))?
        .state
        .clone();
    let lsn_at = |seq: u64| {
        let stream = &stream;
        async move {
            if seq == 0 {
                return None;
            }
            let msg = stream.get_raw_message(seq).await.ok()?;
            let id: EventId = provision::msg_id(&msg.headers)?.parse().ok()?;
            Some(id.commit_lsn.to_string())
        }
    };
    let (first_lsn, last_lsn) = if state.messages == 0 {
        (None, None)
    } else {
        (
            lsn_at(state.first_sequence).await,
            lsn_at(state.last_sequence).await,
        )
    };
    let mut consumers = Vec::new();
    let mut list = stream.consumers();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| format!("list consumers: {e}"))?;
        // Ephemeral consumers (a replay, a `nats sub`) come and go; only durable ones
        // are read models whose lag matters.
        if info.config.durable_name.is_none() {
            continue;
        }
        consumers.push(ConsumerStatus {
            name: info.name.clone(),
            ack_floor_seq: info.ack_floor.stream_sequence,
            pending: info.num_pending + info.num_ack_pending as u64,
        });
    }
    Ok(StreamStatus {
        messages: state.messages,
        first_seq: state.first_sequence,
        last_seq: state.last_sequence,
        first_lsn,
        last_lsn,
        consumers,
    })
}

fn bytes(n: Option<i64>) -> String {
    match n {
        None => "-".into(),
        Some(b) if b.abs() < 1024 => format!("{b} B"),
        Some(b) if b.abs() < 1024 * 1024 => format!("{:.1} KiB", b as f64 / 1024.0),
        Some(b) if b.abs() < 1024 * 1024 * 1024 => format!("{:.1} MiB", b as f64 / 1048576.0),
        Some(b) => format!("{:.1} GiB", b as f64 / 1073741824.0),
    }
}

/// The human view: one block per source.
pub fn render(st: &SourceStatus) -> String {
    let mut out = format!(
        "source {}  (slot {}, stream {})\n",
        st.source, st.slot_name, st.stream_name
    );
    match &st.postgres {
        Err(e) => out.push_str(&format!("  postgres  unreachable: {e}\n")),
        Ok(pg) => {
            out.push_str(&format!("  postgres  current WAL {}\n", pg.current_wal_lsn));
            match &pg.slot {
                None => out.push_str("  slot      MISSING\n"),
                Some(s) => {
                    let state = match (s.active, s.active_pid) {
                        (true, Some(pid)) => format!("active (pid {pid})"),
                        (true, None) => "active".into(),
                        (false, _) => "inactive".into(),
                    };
                    out.push_str(&format!(
                        "  slot      confirmed flush {}  lag {}  {state}\n",
                        s.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                        bytes(s.lag_bytes)
                    ));
                    out.push_str(&format!(
                        "            restart LSN {}  WAL retained {}  wal_status {}\n",
                        s.restart_lsn.as_deref().unwrap_or("-"),
                        bytes(s.retained_wal_bytes),
                        s.wal_status.as_deref().unwrap_or("-")
                    ));
                }
            }
        }
    }
    match &st.stream {
        Err(e) => out.push_str(&format!("  stream    unavailable: {e}\n")),
        Ok(s) => {
            out.push_str(&format!(
                "  stream    {} messages  seq {}..{}  LSN {}..{}\n",
                s.messages,
                s.first_seq,
                s.last_seq,
                s.first_lsn.as_deref().unwrap_or("-"),
                s.last_lsn.as_deref().unwrap_or("-")
            ));
            for c in &s.consumers {
                out.push_str(&format!(
                    "  consumer  {}  ack floor {}  pending {}\n",
                    c.name, c.ack_floor_seq, c.pending
                ));
            }
        }
    }
    for b in &st.backfills {
        let pct = (b.rows_done * 100)
            .checked_div(b.rows_estimate)
            .map(|p| format!(" ({}%)", p.min(100)))
            .unwrap_or_default();
        let eta = b
            .eta_secs
            .map(|s| format!("  ETA {}s", s.ceil() as u64))
            .unwrap_or_default();
        out.push_str(&format!(
            "  backfill  {} ({}): {}, {} of ~{} rows{pct}, {} chunks, {:.0} rows/s{eta}{}\n",
            b.table,
            b.reason,
            b.state,
            b.rows_done,
            b.rows_estimate,
            b.chunks_done,
            b.rows_per_sec,
            b.error
                .as_deref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        ));
    }
    for p in &st.projections {
        match p.applied_seq {
            Some(seq) => out.push_str(&format!(
                "  projection {}  applied seq {seq} (LSN {})  behind {} messages{}\n",
                p.name,
                p.applied_lsn.as_deref().unwrap_or("-"),
                p.lag_messages.map_or("-".to_string(), |l| l.to_string()),
                p.bucket
                    .as_deref()
                    .map(|b| format!("  bucket {b}"))
                    .unwrap_or_default()
            )),
            None => out.push_str(&format!("  projection {}  not started\n", p.name)),
        }
    }
    for p in st.problems() {
        out.push_str(&format!("  PROBLEM   {p}\n"));
    }
    out
}

#[cfg(test)]
mod tests;
