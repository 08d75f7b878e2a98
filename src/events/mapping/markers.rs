//! The events tidemark itself publishes: heartbeats, sync markers, transaction
//! summaries and the reset marker.

use super::*;
use crate::position::Lsn;

/// A `tidemark.heartbeat` event (`heartbeat_interval_secs`): proof that changes flow
/// from the WAL to the stream even while the published tables are quiet.
pub fn heartbeat_event(tx: &TxContext<'_>, index: u64) -> DomainEvent {
    let data = serde_json::json!({"op": "heartbeat"});
    build(
        tx,
        index,
        "tidemark.heartbeat",
        format!("{}._tidemark.heartbeat", tx.source),
        "heartbeat",
        "heartbeat".into(),
        None,
        false,
        &[],
        &data,
    )
}

/// A `tidemark.sync` event (`tidemark wait` writes the message): every projection
/// reads it, so its applied commit LSN passes the waiter's position.
pub fn sync_event(tx: &TxContext<'_>, index: u64) -> DomainEvent {
    let data = serde_json::json!({"op": "sync"});
    build(
        tx,
        index,
        "tidemark.sync",
        format!("{}._tidemark.sync", tx.source),
        "sync",
        "sync".into(),
        None,
        false,
        &[],
        &data,
    )
}

/// The per-transaction summary (`transaction_events = true`): published after the
/// transaction's last event on `<source>._tidemark.tx`, with the number of events the
/// transaction published. Its index is one past the transaction's last change.
pub fn transaction_summary(tx: &TxContext<'_>, index: u64, events: u64) -> DomainEvent {
    let data = serde_json::json!({
        "op": "commit",
        "xid": tx.xid,
        "commit_lsn": tx.commit_lsn_text,
        "events": events,
    });
    let mut ev = build(
        tx,
        index,
        "tidemark.transaction",
        format!("{}._tidemark.tx", tx.source),
        "transaction",
        "transaction".into(),
        None,
        false,
        &[],
        &data,
    );
    ev.mark_last();
    ev
}

/// The event that marks where a source started over with a new slot while keeping
/// its stream (`tidemark reset --keep-stream`). Changes committed between the last
/// stored event and the new slot's start are not in the stream; consumers that need
/// them must rebuild. Its position, `(new slot start - 1, u64::MAX)`, sorts after
/// every event stored before and before every change the new slot sends, so the
/// exactly-once rule needs no special case.
pub fn reset_marker(
    source: &str,
    new_slot_start: Lsn,
    old_confirmed: Option<Lsn>,
    last_stored: Option<Lsn>,
    reason: &str,
) -> DomainEvent {
    let commit_lsn = Lsn(new_slot_start.0.saturating_sub(1));
    let data = serde_json::json!({
        "op": "reset",
        "reason": reason,
        "new_slot_lsn": new_slot_start.to_string(),
        "old_slot_confirmed_flush_lsn": old_confirmed.map(|l| l.to_string()),
        "last_stored_commit_lsn": last_stored.map(|l| l.to_string()),
    });
    let time = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let lsn_text = commit_lsn.to_string();
    let tx = TxContext {
        source,
        commit_lsn,
        xid: 0,
        commit_lsn_text: &lsn_text,
        time: &time,
    };
    let mut ev = build(
        &tx,
        u64::MAX,
        "tidemark.reset",
        format!("{source}._tidemark.reset"),
        "tidemark",
        "tidemark".into(),
        None,
        false,
        &[],
        &data,
    );
    ev.mark_last();
    ev
}
