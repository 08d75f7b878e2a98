//! The durable record of a source's backfills: a NATS KV bucket bound to its stream.

use async_nats::jetstream;
use serde::Serialize;
use tracing::{debug, warn};

use super::*;

/// A KV key token for a name: characters KV keys do not allow become `_`.
pub(super) fn kv_token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The KV bucket holding a source's backfill progress.
pub fn bucket_name(source: &str) -> String {
    format!("tidemark_{}", kv_token(source))
}

/// The OID each streamed table had when tidemark last looked: a table found under
/// another OID was dropped and created again (`pgbench -i`, a migration that swaps in
/// a rebuilt table) while no change of the new one was streamed or backfilled.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TableOids {
    #[serde(default)]
    pub stream: Option<String>,
    /// `(schema, table, oid)`.
    pub tables: Vec<(String, String, u32)>,
}

/// The durable record of a source's backfills.
#[derive(Clone)]
pub struct Progress {
    kv: jetstream::kv::Store,
    bucket: String,
    /// The stream binding jobs must carry (see `Job::stream`), once known.
    stream: Option<String>,
}

/// A stream's binding for jobs: its name and creation time.
pub fn stream_binding(info: &jetstream::stream::Info) -> String {
    format!(
        "{}@{}",
        info.config.name,
        info.created.unix_timestamp_nanos()
    )
}

impl Progress {
    /// Opens the source's bucket, creating it when missing with `replicas` (the
    /// stream's): the progress is as durable as the stream it belongs to.
    pub async fn open(
        js: &jetstream::Context,
        source: &str,
        replicas: usize,
    ) -> Result<Progress, BackfillError> {
        let bucket = bucket_name(source);
        let err = |what: &str| {
            let bucket = bucket.clone();
            let what = what.to_string();
            move |e: Box<dyn std::error::Error + Send + Sync>| BackfillError::Progress {
                bucket,
                what,
                source: e,
            }
        };
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(jetstream::kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    description: "tidemark backfill progress".into(),
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| err("create the bucket")(Box::new(e)))?,
        };
        Ok(Progress {
            kv,
            bucket,
            stream: None,
        })
    }

    /// Opens the source's bucket bound to its stream, when the stream exists (jobs
    /// queued before it does are bound by the first `run`).
    pub async fn open_for_stream(
        js: &jetstream::Context,
        source: &str,
        stream: &str,
        replicas: usize,
    ) -> Result<Progress, BackfillError> {
        let progress = Progress::open(js, source, replicas).await?;
        Ok(match js.get_stream(stream).await {
            Ok(s) => progress.bind(stream_binding(s.cached_info())),
            Err(_) => progress,
        })
    }

    /// Binds the record to a stream: jobs made for another stream are passed over
    /// (and logged), and jobs written from now on carry the binding.
    pub fn bind(mut self, stream: String) -> Progress {
        self.stream = Some(stream);
        self
    }

    /// Whether a job belongs to the bound stream.
    fn belongs(&self, job: &Job) -> bool {
        match (&self.stream, &job.stream) {
            (Some(bound), Some(made_for)) if bound != made_for => {
                warn!(table = %job.qualified(), job = %job.id, made_for = %made_for, stream = %bound, "backfill job of another stream dropped (that stream was deleted and made again); a new initial snapshot or `tidemark backfill` reads the table for this one");
                false
            }
            _ => true,
        }
    }

    /// Opens the bucket if it exists.
    pub async fn existing(js: &jetstream::Context, source: &str) -> Option<Progress> {
        let bucket = bucket_name(source);
        js.get_key_value(&bucket).await.ok().map(|kv| Progress {
            kv,
            bucket,
            stream: None,
        })
    }

    fn key(schema: &str, table: &str) -> String {
        format!("backfill.{}.{}", kv_token(schema), kv_token(table))
    }

    fn error(
        &self,
        what: &str,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> BackfillError {
        BackfillError::Progress {
            bucket: self.bucket.clone(),
            what: what.to_string(),
            source: Box::new(e),
        }
    }

    /// A JSON record under `key` (`None` when absent or unreadable).
    async fn record<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        what: &str,
    ) -> Result<Option<T>, BackfillError> {
        let value = self
            .kv
            .get(key)
            .await
            .map_err(|e| self.error(&format!("read {what}"), e))?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    async fn put_record<T: Serialize>(
        &self,
        key: &str,
        what: &str,
        record: &T,
    ) -> Result<(), BackfillError> {
        let value =
            serde_json::to_vec(record).map_err(|e| self.error(&format!("encode {what}"), e))?;
        self.kv
            .put(key, value.into())
            .await
            .map_err(|e| self.error(&format!("write {what}"), e))?;
        Ok(())
    }

    /// The record of the consistent snapshot a new slot takes of the tables without
    /// a key (see `Consistent`).
    pub async fn consistent(&self) -> Result<Option<Consistent>, BackfillError> {
        self.record("consistent", "the consistent snapshot record")
            .await
    }

    pub async fn put_consistent(&self, record: &Consistent) -> Result<(), BackfillError> {
        self.put_record("consistent", "the consistent snapshot record", record)
            .await
    }

    /// The last stored event as recorded (see `StoredTail`), if it belongs to this
    /// stream.
    pub async fn stored_tail(&self) -> Result<Option<StoredTail>, BackfillError> {
        Ok(self
            .record::<StoredTail>("tail", "the stored tail")
            .await?
            .filter(|t| t.stream == self.stream))
    }

    /// Records the last stored event, bound to this stream.
    pub async fn put_stored_tail(&self, tail: &StoredTail) -> Result<(), BackfillError> {
        let tail = StoredTail {
            stream: self.stream.clone(),
            ..tail.clone()
        };
        self.put_record("tail", "the stored tail", &tail).await
    }

    /// The OIDs the source's tables had when last seen (see `TableOids`), if recorded
    /// for this stream.
    pub async fn table_oids(&self) -> Result<Option<TableOids>, BackfillError> {
        Ok(self
            .record::<TableOids>("table_oids", "the tables' OIDs")
            .await?
            .filter(|r| r.stream == self.stream))
    }

    /// Records the tables' OIDs, bound to this stream.
    pub async fn put_table_oids(&self, oids: &TableOids) -> Result<(), BackfillError> {
        let record = TableOids {
            stream: self.stream.clone(),
            ..oids.clone()
        };
        self.put_record("table_oids", "the tables' OIDs", &record)
            .await
    }

    /// The stream sequence `tidemark reset --purge-stream` last purged at.
    pub async fn purged_at(&self) -> Result<Option<u64>, BackfillError> {
        let value = self
            .kv
            .get("reset.purged_seq")
            .await
            .map_err(|e| self.error("read the purge record", e))?;
        Ok(value.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
    }

    /// Records that the stream was purged at `seq`.
    pub async fn set_purged_at(&self, seq: u64) -> Result<(), BackfillError> {
        self.kv
            .put("reset.purged_seq", seq.to_string().into())
            .await
            .map_err(|e| self.error("write the purge record", e))?;
        Ok(())
    }

    pub async fn get(&self, schema: &str, table: &str) -> Result<Option<Job>, BackfillError> {
        let value = self
            .kv
            .get(Self::key(schema, table))
            .await
            .map_err(|e| self.error("read a job", e))?;
        Ok(value
            .and_then(|v| serde_json::from_slice::<Job>(&v).ok())
            .filter(|job| self.belongs(job)))
    }

    pub async fn put(&self, job: &Job) -> Result<(), BackfillError> {
        let mut job = job.clone();
        if job.stream.is_none() {
            job.stream = self.stream.clone();
        }
        let value = serde_json::to_vec(&job).map_err(|e| self.error("encode a job", e))?;
        self.kv
            .put(Self::key(&job.schema, &job.table), value.into())
            .await
            .map_err(|e| self.error("write a job", e))?;
        Ok(())
    }

    fn placement_key(schema: &str, table: &str) -> String {
        format!("placed.{}.{}", kv_token(schema), kv_token(table))
    }

    /// Records where a chunk's rows go, before any of them is sent.
    pub async fn put_placement(
        &self,
        schema: &str,
        table: &str,
        placement: &Placement,
    ) -> Result<(), BackfillError> {
        self.put_record(
            &Self::placement_key(schema, table),
            "a placement",
            placement,
        )
        .await
    }

    /// Where the table's last chunk went, if recorded.
    pub async fn placement(
        &self,
        schema: &str,
        table: &str,
    ) -> Result<Option<Placement>, BackfillError> {
        self.record(&Self::placement_key(schema, table), "a placement")
            .await
    }

    /// Every job, oldest first.
    pub async fn jobs(&self) -> Result<Vec<Job>, BackfillError> {
        use futures_util::TryStreamExt;
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| self.error("list jobs", e))?,
            Err(e) => return Err(self.error("list jobs", e)),
        };
        let mut jobs = Vec::new();
        for key in keys.iter().filter(|k| k.starts_with("backfill.")) {
            let value = self
                .kv
                .get(key.as_str())
                .await
                .map_err(|e| self.error("read a job", e))?;
            let Some(job) = value.and_then(|v| serde_json::from_slice::<Job>(&v).ok()) else {
                continue;
            };
            if self.belongs(&job) {
                jobs.push(job);
            } else if let Err(e) = self.kv.delete(key.as_str()).await {
                // Passed over again next time; nothing else depends on it.
                debug!(error = %e, "could not remove another stream's backfill job");
            }
        }
        jobs.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(jobs)
    }
}
