//! The Rust consumer API: a stream's source transactions handed to an `Apply` inside a
//! Postgres transaction that also records the checkpoint.

use super::*;

/// One event as a consumer sees it: the CloudEvents envelope and its data.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct Event {
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub commitlsn: String,
    #[serde(default)]
    pub xid: u32,
    #[serde(default)]
    pub txindex: u64,
    /// True on the last event of its source transaction.
    #[serde(default = "yes")]
    pub txlast: bool,
    #[serde(default)]
    pub data: serde_json::Value,
    /// The stream sequence it is stored at.
    #[serde(skip)]
    pub seq: u64,
}

pub(super) fn yes() -> bool {
    true
}

/// What a [`Consumer`] hands events to. `apply` runs inside the database transaction
/// that also records the checkpoint: what it writes commits with the checkpoint or not
/// at all. It gets a source transaction's events in order, in slices of at most
/// `Consumer::max_slice`; the database transaction commits after the source
/// transaction's last event.
#[allow(async_fn_in_trait)]
pub trait Apply {
    type Error: std::error::Error + Send + Sync + 'static;
    async fn apply(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), Self::Error>;
}

/// Why a [`Consumer`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError<E: std::error::Error + Send + Sync + 'static> {
    #[error("the read model's database")]
    Database(#[from] tokio_postgres::Error),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("the apply function failed on the transaction ending at event {event_id}")]
    Apply {
        event_id: String,
        #[source]
        source: E,
    },
}

/// A read-model consumer for code that config cannot express: it hands a stream's
/// events to an [`Apply`] and commits its checkpoint in the same Postgres transaction
/// (table `tidemark_checkpoints`, keyed by `name`), so every event applies exactly
/// once across crashes and restarts.
pub struct Consumer {
    js: jetstream::Context,
    stream: String,
    name: String,
    subjects: Vec<String>,
    /// The most events handed to one `apply` call.
    pub max_slice: usize,
}

impl Consumer {
    /// A consumer of `stream` (all of it, or `subjects`) named `name`.
    pub fn new(
        client: async_nats::Client,
        stream: &str,
        name: &str,
        subjects: Vec<String>,
    ) -> Consumer {
        Consumer {
            js: jetstream::new(client),
            stream: stream.to_string(),
            name: name.to_string(),
            subjects,
            max_slice: 500,
        }
    }

    /// Applies events until `cancel` fires.
    pub async fn run<A: Apply>(
        &self,
        client: &mut tokio_postgres::Client,
        app: &mut A,
        cancel: CancellationToken,
    ) -> Result<(), ConsumerError<A::Error>> {
        let nats = |e: &dyn std::fmt::Display| ConsumerError::Nats(e.to_string());
        client.batch_execute(CHECKPOINTS).await?;
        let row = client
            .query_opt(
                "SELECT stream_seq FROM tidemark_checkpoints WHERE projection = $1",
                &[&self.name],
            )
            .await?;
        let checkpoint: u64 = row.map_or(0, |r| r.get::<_, i64>(0) as u64);
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| nats(&e))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: after(checkpoint),
                ..Default::default()
            })
            .await
            .map_err(|e| nats(&e))?;
        let mut messages = consumer.messages().await.map_err(|e| nats(&e))?;
        loop {
            // One source transaction per database transaction.
            let first = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                m = messages.next() => m,
            };
            let Some(first) = first else {
                return Err(ConsumerError::Nats("the stream's consumer ended".into()));
            };
            let tx = client.transaction().await?;
            let mut slice: Vec<Event> = Vec::new();
            // Set when the transaction's last event is one the subjects leave out.
            let mut checkpoint_at: Option<(i64, String)> = None;
            let mut next = Some(first);
            loop {
                let Some(m) = next.take() else { break };
                let m = m.map_err(|e| nats(&e))?;
                let seq = m.info().map_err(|e| nats(&e))?.stream_sequence;
                let mut event: Event = match serde_json::from_slice(&m.payload) {
                    Ok(e) => e,
                    Err(e) => {
                        return Err(nats(&format!("event at sequence {seq} is not JSON: {e}")));
                    }
                };
                event.seq = seq;
                let last = event.txlast;
                let wanted = self.subjects.is_empty() || reads(&self.subjects, &m.subject);
                if wanted {
                    slice.push(event);
                } else if last {
                    checkpoint_at = Some((seq as i64, event.commitlsn.clone()));
                }
                if last || slice.len() >= self.max_slice {
                    let end = slice.last().map(|e| e.id.clone()).unwrap_or_default();
                    if !slice.is_empty() {
                        app.apply(&tx, &slice)
                            .await
                            .map_err(|source| ConsumerError::Apply {
                                event_id: end,
                                source,
                            })?;
                    }
                    if last {
                        let (seq, lsn) = checkpoint_at.take().unwrap_or_else(|| {
                            slice
                                .last()
                                .map(|e| (e.seq as i64, e.commitlsn.clone()))
                                .unwrap_or_default()
                        });
                        tx.execute(
                            &upsert_checkpoint("tidemark_checkpoints"),
                            &[&self.name, &self.stream, &seq, &lsn],
                        )
                        .await?;
                        break;
                    }
                    slice.clear();
                }
                next = messages.next().await;
            }
            tx.commit().await?;
        }
    }
}
