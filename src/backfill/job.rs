//! One table's backfill job and its state, as stored in the KV bucket.

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Done,
    Failed,
}

/// One table's backfill, as stored in the KV bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub schema: String,
    pub table: String,
    /// Why: "initial snapshot", "backfill", "resync".
    pub reason: String,
    /// An SQL condition limiting the rows (`--where`).
    pub filter: Option<String>,
    pub key: Vec<String>,
    pub chunk_size: u64,
    pub state: JobState,
    /// The key of the last row of the last stored chunk, as text.
    pub last_key: Option<Vec<Option<String>>>,
    /// The largest key when the job started: rows inserted later arrive as live
    /// changes, so the backfill stops here and always ends.
    #[serde(default)]
    pub end_key: Option<Vec<Option<String>>>,
    pub chunks_done: u64,
    pub rows_done: u64,
    pub rows_estimate: u64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub updated_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// The stream the job's rows go to, as `<name>@<creation time>`: a job never
    /// resumes into another stream (one deleted and made again keeps its name, not
    /// its creation time). `None` for jobs written before jobs were bound, and for
    /// jobs queued before the stream existed; those are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
}

impl Job {
    pub fn new(
        schema: &str,
        table: &str,
        key: Vec<String>,
        reason: &str,
        filter: Option<String>,
        chunk_size: u64,
    ) -> Job {
        let now = now();
        Job {
            id: format!(
                "{}-{}",
                time::OffsetDateTime::now_utc().unix_timestamp_nanos(),
                kv_token(table)
            ),
            schema: schema.into(),
            table: table.into(),
            reason: reason.into(),
            filter,
            key,
            chunk_size,
            state: JobState::Pending,
            last_key: None,
            end_key: None,
            chunks_done: 0,
            rows_done: 0,
            rows_estimate: 0,
            created_at: now,
            started_at: None,
            updated_at: None,
            finished_at: None,
            error: None,
            stream: None,
        }
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Rows per second since the job started, and the seconds left at that rate.
    pub fn rate_and_eta(&self) -> (f64, Option<f64>) {
        let parse = |t: &Option<String>| {
            t.as_deref().and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
        };
        let (Some(start), Some(end)) = (
            parse(&self.started_at),
            parse(&self.finished_at).or_else(|| parse(&self.updated_at)),
        ) else {
            return (0.0, None);
        };
        let secs = (end - start).as_seconds_f64();
        if secs <= 0.0 {
            return (0.0, None);
        }
        let rate = self.rows_done as f64 / secs;
        let left = self.rows_estimate.saturating_sub(self.rows_done) as f64;
        let eta = (rate > 0.0 && self.state == JobState::Running).then(|| left / rate);
        (rate, eta)
    }
}

pub(super) fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
