//! Disruptions: moments after which a publish in flight may never be answered.
//!
//! A JetStream publish is a request; its ack comes back on the connection that sent
//! it, from the stream's leader. When the connection drops, the client drops
//! messages (slow consumer), or the stream gets a new leader (the old one died or
//! stepped down), the acks of the publishes sent before may be lost for good, and
//! waiting for them means waiting out the whole ack timeout while the cluster is
//! already working again. Each of those moments bumps a counter; the publisher
//! records the counter with every publish and fails a publish still unanswered
//! after a bump, so the pipeline rebuilds from the stream's tail at once (the chain
//! makes that safe: nothing is stored twice, nothing is skipped).

use std::sync::Arc;

use async_nats::Event;
use tokio::sync::watch;
use tracing::{info, warn};

/// A counter of disruptions, shared by a connection's event callback, the leader
/// watch and the publisher.
#[derive(Clone)]
pub struct Disruptions {
    tx: Arc<watch::Sender<u64>>,
}

impl Default for Disruptions {
    fn default() -> Self {
        Self::new()
    }
}

impl Disruptions {
    pub fn new() -> Self {
        Disruptions {
            tx: Arc::new(watch::channel(0).0),
        }
    }

    /// Records one disruption.
    pub fn bump(&self) {
        self.tx.send_modify(|n| *n += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Logs a client event, and counts those that can lose acks in flight.
    pub fn on_event(&self, event: &Event) {
        match event {
            Event::Connected => info!("NATS connection up"),
            Event::Disconnected => {
                warn!(
                    "NATS connection lost; publishes in flight will be resent from the stream's tail"
                );
                self.bump();
            }
            Event::SlowConsumer(sid) => {
                warn!(
                    sid,
                    "NATS client dropped messages (slow consumer); publishes in flight will be resent from the stream's tail"
                );
                self.bump();
            }
            Event::LameDuckMode => info!("NATS server entering lame duck mode"),
            Event::Draining => info!("NATS connection draining"),
            Event::Closed => info!("NATS connection closed"),
            Event::ServerError(e) => warn!(error = %e, "NATS server error"),
            Event::ClientError(e) => warn!(error = %e, "NATS client error"),
        }
    }
}

/// Waits until `rx` counts more than `epoch`; pending forever once its sender is gone.
pub async fn after(rx: &mut watch::Receiver<u64>, epoch: u64) {
    loop {
        if *rx.borrow_and_update() > epoch {
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Counts every new leader of `stream` (JetStream's advisory) as a disruption, until
/// dropped. Without the right to subscribe to advisories it counts nothing, and lost
/// acks are noticed at the ack timeout instead.
pub struct LeaderWatch {
    task: tokio::task::JoinHandle<()>,
}

impl LeaderWatch {
    pub async fn start(client: &async_nats::Client, stream: &str, d: &Disruptions) -> LeaderWatch {
        use futures_util::StreamExt as _;
        let subject = leader_elected_subject(stream);
        let sub = client.subscribe(subject.clone()).await;
        let d = d.clone();
        let stream = stream.to_string();
        let task = tokio::spawn(async move {
            let mut sub = match sub {
                Ok(sub) => sub,
                Err(e) => {
                    warn!(error = %e, %subject, "cannot watch the stream's leader; a lost leader is noticed at the ack timeout");
                    return;
                }
            };
            while let Some(msg) = sub.next().await {
                let leader = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                    .ok()
                    .and_then(|v| v["leader"].as_str().map(str::to_string))
                    .unwrap_or_default();
                info!(%stream, %leader, "the stream has a new leader; publishes in flight will be resent from the stream's tail");
                d.bump();
            }
        });
        LeaderWatch { task }
    }
}

impl Drop for LeaderWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The advisory subject JetStream publishes when `stream` gets a new leader.
pub fn leader_elected_subject(stream: &str) -> String {
    format!("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bump_after_the_epoch_wakes_the_waiter() {
        let d = Disruptions::new();
        let mut rx = d.subscribe();
        let epoch = *rx.borrow();
        let waiter = tokio::spawn(async move { after(&mut rx, epoch).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        d.bump();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }

    #[tokio::test]
    async fn a_bump_before_the_wait_counts() {
        let d = Disruptions::new();
        let mut rx = d.subscribe();
        d.bump();
        tokio::time::timeout(std::time::Duration::from_millis(100), after(&mut rx, 0))
            .await
            .expect("already bumped");
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), after(&mut rx, 1)).await;
        assert!(pending.is_err(), "no bump after epoch 1");
    }

    #[test]
    fn disconnects_and_slow_consumers_count_connects_do_not() {
        let d = Disruptions::new();
        d.on_event(&Event::Connected);
        d.on_event(&Event::LameDuckMode);
        assert_eq!(*d.subscribe().borrow(), 0);
        d.on_event(&Event::Disconnected);
        d.on_event(&Event::SlowConsumer(7));
        assert_eq!(*d.subscribe().borrow(), 2);
    }
}
