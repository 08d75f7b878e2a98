//! The CloudEvents 1.0 envelope (structured JSON mode) around every event's data.
//! Pure: fields in, bytes out.
//!
//! Extension attributes (lowercase alphanumerics, per the CloudEvents naming rule):
//! `commitlsn` (the transaction's commit LSN, `X/Y`), `xid` (its transaction id) and
//! `txindex` (the event's index within its transaction).

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::position::EventId;
use crate::postgres::pgoutput::PgTimestamp;

/// The facts an envelope is built from.
pub struct EnvelopeFields<'a> {
    pub id: &'a EventId,
    pub source: &'a str,
    pub event_type: &'a str,
    pub subject: &'a str,
    pub time: PgTimestamp,
    pub xid: u32,
    pub data: &'a Value,
}

#[derive(Serialize)]
struct Envelope<'a> {
    specversion: &'static str,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: String,
    datacontenttype: &'static str,
    commitlsn: String,
    xid: u32,
    txindex: u64,
    data: &'a Value,
}

/// Encodes one CloudEvent as JSON.
pub fn encode(f: &EnvelopeFields<'_>) -> Bytes {
    let env = Envelope {
        specversion: "1.0",
        id: f.id.to_string(),
        source: format!("/tidemark/{}", f.source),
        event_type: f.event_type,
        subject: f.subject,
        time: f.time.to_rfc3339(),
        datacontenttype: "application/json",
        commitlsn: f.id.commit_lsn.to_string(),
        xid: f.xid,
        txindex: f.id.index,
        data: f.data,
    };
    // Serializing a struct of strings, integers and a `Value` into a Vec cannot fail:
    // serde_json errors only on I/O or on maps with non-string keys, and there are none.
    Bytes::from(serde_json::to_vec(&env).expect("envelope serializes"))
}
