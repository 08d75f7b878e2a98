//! Connecting to NATS, provisioning a source's stream from config, and reading the
//! stream's tail: what is already stored, which is half of the durable state a
//! pipeline rebuilds from (the slot's confirmed LSN is the other half).

use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, HeaderMap};

use crate::jetstream::disruption::Disruptions;
use crate::jetstream::params::{NatsAuth, NatsConfig, Storage, StreamConfig};
use crate::position::{EventId, StreamTail};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "cannot connect to NATS at {servers}: check that nats-server runs and the address and credentials are right"
    )]
    Connect {
        servers: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot read NATS credentials file {path}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the NATS server's max_payload is {max_payload} bytes, below max_event_bytes = {max_event_bytes}: lower max_event_bytes or raise max_payload in the server config"
    )]
    PayloadLimit {
        max_payload: usize,
        max_event_bytes: usize,
    },
    #[error(
        "JetStream request failed: {what}; is JetStream enabled on the server (nats-server -js)?"
    )]
    JetStream {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "atomic_transactions needs nats-server 2.12 or newer for atomic batch publishing, but the server is {version}: upgrade it, or set atomic_transactions = false"
    )]
    AtomicUnsupported { version: String },
    #[error(
        "NATS refused to create stream {stream:?}: {reason}; fix the source's [source.stream] settings"
    )]
    StreamRejected { stream: String, reason: String },
    #[error(
        "stream {stream:?} exists but {problem}: change the config to match, or update or recreate the stream"
    )]
    StreamConflict { stream: String, problem: String },
    #[error(
        "stream {stream:?} ends with message {seq}, which tidemark did not write ({reason}): the stream must be written only by source {source_name:?}"
    )]
    ForeignMessage {
        stream: String,
        seq: u64,
        source_name: String,
        reason: String,
    },
}

fn js_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> ProvisionError {
    move |e| ProvisionError::JetStream {
        what,
        source: Box::new(e),
    }
}

/// Connects to NATS with the configured authentication.
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, ProvisionError> {
    connect_with(cfg, name, None).await
}

/// Connects as `connect` does, counting the connection's disruptions in `disruptions`.
pub async fn connect_watched(
    cfg: &NatsConfig,
    name: &str,
    disruptions: &Disruptions,
) -> Result<async_nats::Client, ProvisionError> {
    connect_with(cfg, name, Some(disruptions.clone())).await
}

async fn connect_with(
    cfg: &NatsConfig,
    name: &str,
    disruptions: Option<Disruptions>,
) -> Result<async_nats::Client, ProvisionError> {
    let mut opts = ConnectOptions::new()
        .name(name)
        .connection_timeout(cfg.connect_timeout)
        .require_tls(cfg.tls_required);
    if let Some(d) = disruptions {
        opts = opts.event_callback(move |event| {
            d.on_event(&event);
            async {}
        });
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    opts = match &cfg.auth {
        NatsAuth::None => opts,
        NatsAuth::UserPassword { user, password } => {
            opts.user_and_password(user.clone(), password.expose().to_string())
        }
        NatsAuth::Token(t) => opts.token(t.expose().to_string()),
        NatsAuth::NKey(seed) => opts.nkey(seed.expose().trim().to_string()),
        NatsAuth::CredentialsFile(path) => {
            opts.credentials_file(path)
                .await
                .map_err(|source| ProvisionError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?
        }
    };
    opts.connect(cfg.servers.clone())
        .await
        .map_err(|source| ProvisionError::Connect {
            servers: cfg.servers.join(","),
            source,
        })
}

/// Creates the stream, or checks that the existing one fits the config.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &StreamConfig,
) -> Result<stream::Stream, ProvisionError> {
    let storage = match cfg.storage {
        Storage::File => stream::StorageType::File,
        Storage::Memory => stream::StorageType::Memory,
    };
    match get_stream_through_election(js, &cfg.name).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(js_err("stream info"))?;
            let existing = &info.config;
            for want in &cfg.subjects {
                if !existing
                    .subjects
                    .iter()
                    .any(|have| subject_covers(have, want))
                {
                    return Err(ProvisionError::StreamConflict {
                        stream: cfg.name.clone(),
                        problem: format!("captures subjects {:?}, not {want:?}", existing.subjects),
                    });
                }
            }
            if existing.storage != storage {
                return Err(ProvisionError::StreamConflict {
                    stream: cfg.name.clone(),
                    problem: format!(
                        "uses {:?} storage, the config says {:?}",
                        existing.storage, cfg.storage
                    ),
                });
            }
            if cfg.atomic && !existing.allow_atomic_publish {
                let mut updated = existing.clone();
                updated.allow_atomic_publish = true;
                js.update_stream(updated)
                    .await
                    .map_err(js_err("enable atomic batch publishing on the stream"))?;
                tracing::info!(stream = %cfg.name, "atomic batch publishing enabled on the stream");
            }
            if existing.num_replicas != cfg.replicas {
                tracing::warn!(stream = %cfg.name, existing = existing.num_replicas, configured = cfg.replicas, "stream replicas differ from the config; leaving the stream as it is");
            }
            Ok(s)
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            let config = stream::Config {
                name: cfg.name.clone(),
                subjects: cfg.subjects.clone(),
                storage,
                num_replicas: cfg.replicas,
                max_age: cfg.max_age.unwrap_or_default(),
                max_bytes: cfg.max_bytes.unwrap_or(-1),
                duplicate_window: cfg.duplicate_window,
                allow_atomic_publish: cfg.atomic,
                ..Default::default()
            };
            let s = js.create_stream(config).await.map_err(|e| {
                // The server answered and said no: a setting it will never accept.
                match e.kind() {
                    jetstream::context::CreateStreamErrorKind::JetStream(j) => {
                        ProvisionError::StreamRejected {
                            stream: cfg.name.clone(),
                            reason: j.to_string(),
                        }
                    }
                    _ => js_err("create stream")(e),
                }
            })?;
            tracing::info!(stream = %cfg.name, "stream created");
            Ok(s)
        }
        Err(e) => Err(js_err("get stream")(e)),
    }
}

/// How long one stream-info request may wait for an answer while the stream has no
/// leader, and how long such requests are tried again in all.
const LEADERLESS_TRY: std::time::Duration = std::time::Duration::from_secs(1);
const LEADERLESS_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);

/// `get_stream`, asked again each second while it goes unanswered. A clustered
/// stream whose leader was just lost answers nothing until the next is elected; one
/// request waiting out the client's 10 s request timeout would keep the source down
/// up to 10 s after the election. Any answer, and any other failure (no responders:
/// JetStream is off), returns at once.
async fn get_stream_through_election(
    js: &jetstream::Context,
    name: &str,
) -> Result<stream::Stream, jetstream::context::GetStreamError> {
    let mut quick = js.clone();
    quick.set_timeout(LEADERLESS_TRY);
    let started = std::time::Instant::now();
    loop {
        match quick.get_stream(name).await {
            Err(e) if timed_out(&e) && started.elapsed() < LEADERLESS_BUDGET => {
                tracing::debug!(stream = %name, "the stream did not answer within a second (no leader yet?); asking again");
            }
            Ok(s) => {
                // The handle keeps the context it came from: later calls on it
                // (info, message reads) get the caller's timeout, not the short one.
                return js.get_stream(name).await.or(Ok(s));
            }
            other => return other,
        }
    }
}

fn timed_out(e: &jetstream::context::GetStreamError) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<jetstream::context::RequestError>() {
            return r.kind() == jetstream::context::RequestErrorKind::TimedOut;
        }
        source = s.source();
    }
    false
}

/// Whether stream subject `have` captures every subject `want` can match.
pub fn subject_covers(have: &str, want: &str) -> bool {
    let h: Vec<&str> = have.split('.').collect();
    let w: Vec<&str> = want.split('.').collect();
    for (i, ht) in h.iter().enumerate() {
        match *ht {
            ">" => return w.len() > i,
            "*" => {
                if w.get(i).is_none_or(|t| *t == ">") {
                    return false;
                }
            }
            lit => {
                if w.get(i) != Some(&lit) {
                    return false;
                }
            }
        }
    }
    h.len() == w.len()
}

/// Reads what the stream already holds: its last sequence and the id of its last
/// event, from the `Nats-Msg-Id` header.
pub async fn read_tail(
    stream: &mut stream::Stream,
    source: &str,
) -> Result<StreamTail, ProvisionError> {
    let info = stream.info().await.map_err(js_err("stream info"))?;
    let state = info.state.clone();
    let name = info.config.name.clone();
    if state.messages == 0 || state.last_sequence == 0 {
        // Empty, or every message aged out: the slot's confirmed LSN alone says where
        // we are, since a position is confirmed only after its events were stored.
        return Ok(StreamTail {
            last_seq: state.last_sequence,
            last_event: None,
        });
    }
    let msg = stream
        .get_raw_message(state.last_sequence)
        .await
        .map_err(js_err("read last message"))?;
    let foreign = |reason: String| ProvisionError::ForeignMessage {
        stream: name.clone(),
        seq: state.last_sequence,
        source_name: source.to_string(),
        reason,
    };
    let id = msg_id(&msg.headers).ok_or_else(|| foreign("it has no Nats-Msg-Id".into()))?;
    let id: EventId = id
        .parse()
        .map_err(|e: crate::position::EventIdParseError| foreign(e.to_string()))?;
    if id.source != source {
        return Err(foreign(format!("its id belongs to source {:?}", id.source)));
    }
    Ok(StreamTail {
        last_seq: state.last_sequence,
        last_event: Some(id.position()),
    })
}

/// The key (`data.key`) of the stream's last event, when it is one of tidemark's: a
/// backfill resuming after a crash mid-chunk continues after it (see
/// `backfill::Placement`). Best effort: `None` when it cannot be read.
pub async fn last_event_key(
    stream: &stream::Stream,
    tail: &StreamTail,
) -> Option<serde_json::Value> {
    tail.last_event?;
    let msg = stream.get_raw_message(tail.last_seq).await.ok()?;
    let event: serde_json::Value = serde_json::from_slice(&msg.payload).ok()?;
    Some(event.get("data")?.get("key")?.clone())
}

/// The `Nats-Msg-Id` of a stored message: for tidemark's events, the event id.
pub(crate) fn msg_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::subject_covers;

    #[test]
    fn subject_coverage() {
        assert!(subject_covers("store.>", "store.>"));
        assert!(subject_covers(">", "store.>"));
        assert!(subject_covers("store.>", "store.orders.created"));
        assert!(subject_covers("store.*.*", "store.orders.created"));
        assert!(!subject_covers("store.*", "store.>"));
        assert!(!subject_covers("store.*.*", "store.>"));
        assert!(!subject_covers("other.>", "store.>"));
        assert!(!subject_covers("store", "store.>"));
    }
}

/// Whether a nats-server version (`2.12.1`, `v2.12.0-beta`) supports atomic batches.
pub fn supports_atomic_batches(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 12)
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn atomic_batches_start_at_2_12() {
        for (v, ok) in [
            ("2.12.0", true),
            ("v2.15.1", true),
            ("2.11.9", false),
            ("3.0.0", true),
            ("2.2.0", false),
            ("junk", false),
        ] {
            assert_eq!(super::supports_atomic_batches(v), ok, "{v}");
        }
    }
}
