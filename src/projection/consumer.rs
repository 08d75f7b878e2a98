//! The Rust consumer API: a stream's source transactions handed to an `Apply` inside a
//! Postgres transaction that also records the checkpoint. A thin target of the engine:
//! reading, filtering, grouping and the checkpoint's place are the engine's.

use serde::Deserialize;

use super::engine::{self, Incoming, Live, Mode, Position, Refused, Spec, Target, Tx};
use super::postgres::read_checkpoint;
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
/// `Consumer::max_slice` (a slice never holds two source transactions); the database
/// transaction commits after a source transaction's last event, and may hold several
/// whole source transactions when events come faster than one at a time. An error
/// from `apply` rolls back the whole database transaction and ends `Consumer::run`
/// with it; the next run starts again after the last checkpoint.
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
    /// An event the consumer cannot read (not a tidemark event, or not of the
    /// consumer API's shape): named, with the reason.
    #[error("{0}")]
    Event(String),
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
        let subjects = if self.subjects.is_empty() {
            vec![">".to_string()]
        } else {
            self.subjects.clone()
        };
        let spec = Spec {
            name: &self.name,
            stream: &self.stream,
            subjects: &subjects,
            dead_letter: None,
        };
        let mut set_aside = HashSet::new();
        let mut careful_until = 0;
        loop {
            let checkpoint = read_checkpoint(client, &self.name)
                .await
                .map_err(ConsumerError::of)?;
            // The engine drives a target that passes each step to the applier here,
            // which holds the connection and the application (both borrowed, so they
            // stay on this side).
            let (steps, inbox) = tokio::sync::mpsc::channel(1);
            let engine = async {
                let mut target = ConsumerTarget {
                    steps,
                    checkpoint,
                    max_slice: self.max_slice.max(1),
                };
                let mode = Mode::Live(Live {
                    cancel: &cancel,
                    set_aside: &mut set_aside,
                    careful_until,
                    tel: None,
                });
                engine::run(&spec, &self.js, &mut target, mode).await
            };
            let applier = applier(&mut *client, &mut *app, &self.name, &self.stream, inbox);
            let (outcome, failed) = tokio::join!(engine, applier);
            if let Some(e) = failed {
                return Err(e);
            }
            match outcome {
                Ok(_) => return Ok(()),
                // An event that failed in a transaction with complete ones before it:
                // applied again one source transaction at a time, so it is met with
                // everything before it committed.
                Err(ProjectionError::Isolate(seq)) => careful_until = seq,
                Err(e) => return Err(ConsumerError::of(e)),
            }
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> ConsumerError<E> {
    fn of(e: ProjectionError) -> ConsumerError<E> {
        match e {
            ProjectionError::Database { source, .. } => ConsumerError::Database(source),
            e @ ProjectionError::Poison { .. } => ConsumerError::Event(e.to_string()),
            e => ConsumerError::Nats(ErrorChain(&e).to_string()),
        }
    }
}

/// A step of the engine, for the applier.
enum Step {
    Begin,
    Apply(Vec<Event>),
    Commit(Position),
}

type Reply = tokio::sync::oneshot::Sender<Result<(), ProjectionError>>;

/// Applies the engine's steps: a `tokio_postgres::Transaction` per database
/// transaction, the application's `apply` on each slice, the checkpoint in the same
/// transaction. Returns the application's failure, if it failed.
async fn applier<A: Apply>(
    client: &mut tokio_postgres::Client,
    app: &mut A,
    name: &str,
    stream: &str,
    mut inbox: tokio::sync::mpsc::Receiver<(Step, Reply)>,
) -> Option<ConsumerError<A::Error>> {
    let db_err = |what: &str| db_error(name, what);
    // Waiting for a transaction to begin.
    while let Some((step, reply)) = inbox.recv().await {
        if !matches!(step, Step::Begin) {
            let _ = reply.send(Err(ProjectionError::Moved(0)));
            continue;
        }
        let tx = match client.transaction().await {
            Ok(tx) => tx,
            Err(e) => {
                let _ = reply.send(Err(db_err("begin")(e)));
                continue;
            }
        };
        let _ = reply.send(Ok(()));
        // In the transaction: a step that is not answered (the engine went away)
        // drops it, which rolls it back.
        while let Some((step, reply)) = inbox.recv().await {
            match step {
                Step::Apply(events) => match app.apply(&tx, &events).await {
                    Ok(()) => {
                        let _ = reply.send(Ok(()));
                    }
                    Err(source) => {
                        let event_id = events.last().map(|e| e.id.clone()).unwrap_or_default();
                        let _ = reply.send(Err(ProjectionError::Handler));
                        return Some(ConsumerError::Apply { event_id, source });
                    }
                },
                Step::Commit(at) => {
                    let written = tx
                        .execute(
                            &upsert_checkpoint("tidemark_checkpoints"),
                            &[&name, &stream, &(at.seq as i64), &at.lsn],
                        )
                        .await
                        .map_err(db_err("write the checkpoint"));
                    let done = match written {
                        Ok(_) => tx.commit().await.map_err(db_err("commit")),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(done);
                    break;
                }
                Step::Begin => {
                    let _ = reply.send(Err(ProjectionError::Moved(0)));
                    break;
                }
            }
        }
    }
    None
}

/// The consumer API as an engine target: each step goes to the applier.
struct ConsumerTarget {
    steps: tokio::sync::mpsc::Sender<(Step, Reply)>,
    checkpoint: Position,
    max_slice: usize,
}

impl ConsumerTarget {
    async fn step(&self, step: Step) -> Result<(), ProjectionError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || ProjectionError::Handler;
        self.steps.send((step, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

impl Target for ConsumerTarget {
    const ATOMIC: bool = true;
    type Tx<'a> = ConsumerTx<'a>;

    fn checkpoint(&self) -> Position {
        self.checkpoint.clone()
    }

    async fn begin(&mut self) -> Result<ConsumerTx<'_>, ProjectionError> {
        self.step(Step::Begin).await?;
        Ok(ConsumerTx {
            target: self,
            slice: Vec::new(),
            whole_txs: 0,
        })
    }
}

struct ConsumerTx<'a> {
    target: &'a mut ConsumerTarget,
    /// Events of the current source transaction not yet handed to the application.
    slice: Vec<Event>,
    whole_txs: usize,
}

impl ConsumerTx<'_> {
    async fn hand_over(&mut self) -> Result<(), ProjectionError> {
        if self.slice.is_empty() {
            return Ok(());
        }
        let slice = std::mem::take(&mut self.slice);
        self.target.step(Step::Apply(slice)).await
    }
}

impl Tx for ConsumerTx<'_> {
    async fn apply(&mut self, event: Incoming) -> Result<Vec<Refused>, ProjectionError> {
        let last = event.txlast();
        if event.wanted {
            match Event::deserialize(&event.event) {
                Ok(mut e) => {
                    e.seq = event.seq;
                    self.slice.push(e);
                }
                Err(e) => {
                    let reason = format!("the event does not have the consumer API's shape: {e}");
                    return Ok(vec![event.refused(reason, self.whole_txs)]);
                }
            }
        }
        // A source transaction's events in slices of at most `max_slice`; a slice
        // never holds two source transactions.
        if last || self.slice.len() >= self.target.max_slice {
            self.hand_over().await?;
        }
        if last {
            self.whole_txs += 1;
        }
        Ok(Vec::new())
    }

    async fn settle(&mut self) -> Result<Vec<Refused>, ProjectionError> {
        Ok(Vec::new())
    }

    fn whole_txs(&self) -> usize {
        self.whole_txs
    }

    async fn commit(mut self, at: &Position, _urgent: bool) -> Result<(), ProjectionError> {
        self.hand_over().await?;
        self.target.step(Step::Commit(at.clone())).await?;
        self.target.checkpoint = at.clone();
        Ok(())
    }
}
