//! The CloudEvents 1.0 envelope (structured JSON mode) around every event's data.
//! Pure: fields in, bytes out.
//!
//! Extension attributes (lowercase alphanumerics, per the CloudEvents naming rule):
//! `commitlsn` (the transaction's commit LSN, `X/Y`), `xid` (its transaction id) and
//! `txindex` (the event's index within its transaction).

use bytes::Bytes;
use serde::Serialize;

/// The facts an envelope is built from.
pub struct EnvelopeFields<'a, D: Serialize> {
    pub id: &'a str,
    pub source: &'a str,
    pub event_type: &'a str,
    pub subject: &'a str,
    /// The commit time, RFC 3339.
    pub time: &'a str,
    /// The commit LSN, `X/Y`.
    pub commit_lsn: &'a str,
    pub xid: u32,
    pub index: u64,
    pub data: &'a D,
}

#[derive(Serialize)]
struct Envelope<'a, D: Serialize> {
    specversion: &'static str,
    id: &'a str,
    source: SourceUri<'a>,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: &'a str,
    datacontenttype: &'static str,
    commitlsn: &'a str,
    xid: u32,
    txindex: u64,
    data: &'a D,
}

/// `/tidemark/<source>`, written without an intermediate String.
struct SourceUri<'a>(&'a str);

impl Serialize for SourceUri<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("/tidemark/{}", self.0))
    }
}

/// Encodes one CloudEvent as JSON.
pub fn encode<D: Serialize>(f: &EnvelopeFields<'_, D>) -> Bytes {
    let env = Envelope {
        specversion: "1.0",
        id: f.id,
        source: SourceUri(f.source),
        event_type: f.event_type,
        subject: f.subject,
        time: f.time,
        datacontenttype: "application/json",
        commitlsn: f.commit_lsn,
        xid: f.xid,
        txindex: f.index,
        data: f.data,
    };
    let mut out = Vec::with_capacity(512);
    // Writing into a Vec cannot fail with an I/O error, and the data types tidemark
    // passes serialize only string-keyed maps, which serde_json always accepts.
    serde_json::to_writer(&mut out, &env).expect("envelope serializes");
    Bytes::from(out)
}
