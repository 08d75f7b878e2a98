//! Reading a stream back, the exactly-once checks, and the backfill records of a
//! source's bucket.

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// One event read back from a stream.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub subject: String,
    pub msg_id: String,
    pub body: serde_json::Value,
    /// Headers other than `Nats-*`.
    pub headers: Vec<(String, String)>,
}

/// Reads the whole stream back, in sequence order.
pub async fn read_stream(client: &async_nats::Client, stream: &str) -> Vec<StoredEvent> {
    use futures_util::StreamExt;
    let js = async_nats::jetstream::new(client.clone());
    let mut s = js.get_stream(stream).await.expect("get stream");
    let state = s.info().await.expect("stream info").state.clone();
    let last = state.last_sequence;
    let mut out = Vec::new();
    // Empty: never written, or purged (the last sequence stays).
    if last == 0 || state.messages == 0 {
        return out;
    }
    // On a cluster a replica that just came back can keep the consumer's creation
    // from being answered for a while: ask again, for up to a minute.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let consumer = loop {
        match s
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
        {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("creating an ordered consumer on {stream} failed ({e}); trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("ordered consumer on {stream}: {e}"),
        }
    };
    let mut messages = consumer.messages().await.expect("consume");
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), messages.next())
        .await
        .expect("reading the stream back timed out")
    {
        let m = m.expect("message");
        let info = m.info().expect("jetstream message info");
        let seq = info.stream_sequence;
        let msg_id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        out.push(StoredEvent {
            seq,
            subject: m.subject.to_string(),
            msg_id,
            body: serde_json::from_slice(&m.payload).expect("event is JSON"),
            headers: m
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .filter(|(k, _)| !k.to_string().starts_with("Nats-"))
                .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                .collect(),
        });
        if seq >= last {
            break;
        }
    }
    out
}

/// The number of messages a stream holds now (0 when it does not exist yet).
pub async fn stream_count(client: &async_nats::Client, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Waits until a stream holds at least `n` messages.
pub async fn wait_stream_count(
    client: &async_nats::Client,
    stream: &str,
    n: u64,
    timeout: Duration,
    log: impl Fn() -> String,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let c = stream_count(client, stream).await;
        if c >= n {
            return c;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {n} messages in {stream} (have {c});\ntidemark log:\n{}",
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the stream holds an event `found` says yes to; returns the stream.
pub async fn wait_event(
    client: &async_nats::Client,
    stream: &str,
    what: &str,
    timeout: Duration,
    found: impl Fn(&StoredEvent) -> bool,
) -> Vec<StoredEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        let events = read_stream(client, stream).await;
        if events.iter().any(&found) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what} in {stream}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts the stream is exactly-once and gap-free: consecutive sequences, unique ids,
/// ids strictly increasing by (commit LSN, index), each id matching its CloudEvent id.
pub fn assert_exactly_once(events: &[StoredEvent]) {
    let mut prev: Option<(u64, u64)> = None;
    let mut seen = std::collections::HashSet::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "gap or reorder at position {i}");
        assert!(
            seen.insert(e.msg_id.clone()),
            "duplicate event id {}",
            e.msg_id
        );
        assert_eq!(
            e.body["id"].as_str(),
            Some(e.msg_id.as_str()),
            "Nats-Msg-Id differs from the CloudEvent id"
        );
        let parts: Vec<&str> = e.msg_id.rsplitn(3, ':').collect();
        let index: u64 = parts[0].parse().expect("index");
        let lsn: tidemark::position::Lsn = parts[1].parse().expect("lsn");
        let pos = (lsn.0, index);
        if let Some(p) = prev {
            assert!(pos > p, "event {} is not after the one before it", e.msg_id);
        }
        prev = Some(pos);
    }
}

/// A source's backfill record of `public.<table>` (its JSON), if there is one.
pub async fn backfill_job(
    nc: &async_nats::Client,
    source: &str,
    table: &str,
) -> Option<serde_json::Value> {
    let js = async_nats::jetstream::new(nc.clone());
    let kv = js.get_key_value(format!("tidemark_{source}")).await.ok()?;
    let v = kv.get(format!("backfill.public.{table}")).await.ok()??;
    serde_json::from_slice(&v).ok()
}

/// Waits for the backfill of `public.<table>` to be done and returns its record; fails
/// with the record and `log` after `timeout`, or at once when the job failed.
pub async fn wait_job_done(
    nc: &async_nats::Client,
    source: &str,
    table: &str,
    timeout: Duration,
    log: impl Fn() -> String,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let job = backfill_job(nc, source, table).await;
        match job.as_ref().map(|j| j["state"].clone()) {
            Some(s) if s == "done" => return job.unwrap_or_default(),
            Some(s) if s == "failed" => panic!("backfill of {table} failed: {job:?}\n{}", log()),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "backfill of {table} not done in {timeout:?}: {job:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
