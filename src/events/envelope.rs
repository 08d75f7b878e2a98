//! The CloudEvents 1.0 envelope (structured JSON mode) around every event's data.
//! Pure: fields in, bytes out.
//!
//! Extension attributes (lowercase alphanumerics, per the CloudEvents naming rule):
//! `commitlsn` (the transaction's commit LSN, `X/Y`), `xid` (its transaction id),
//! `txindex` (the event's index within its transaction), `txlast` (true on the last
//! event of its transaction), `schemahash` (a short fingerprint of a table event's
//! row shape) and whatever the mapping adds (static attributes, outbox fields).

use serde::Serialize;
use serde::ser::SerializeMap;

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
    pub schema: Option<&'a str>,
    /// The version of the event's schema (`dataschema`): the `schemahash` for table
    /// events, the marker format for tidemark's own; none for application payloads.
    pub dataschema: Option<&'a str>,
    /// A row read by a backfill rather than a change.
    pub snapshot: bool,
    pub extensions: &'a [(&'a str, &'a str)],
    pub data: &'a D,
}

/// `/tidemark/<source>`, written without an intermediate String.
struct SourceUri<'a>(&'a str);

impl Serialize for SourceUri<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("/tidemark/{}", self.0))
    }
}

/// `urn:tidemark:<source>:<type>:<version>` (see `schema::dataschema_uri`), written
/// without an intermediate String.
struct DataSchemaUri<'a>(&'a str, &'a str, &'a str);

impl Serialize for DataSchemaUri<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!(
            "urn:tidemark:{}:{}:{}",
            self.0, self.1, self.2
        ))
    }
}

impl<D: Serialize> Serialize for EnvelopeFields<'_, D> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("specversion", "1.0")?;
        m.serialize_entry("id", self.id)?;
        m.serialize_entry("source", &SourceUri(self.source))?;
        m.serialize_entry("type", self.event_type)?;
        m.serialize_entry("subject", self.subject)?;
        m.serialize_entry("time", self.time)?;
        m.serialize_entry("datacontenttype", "application/json")?;
        m.serialize_entry("commitlsn", self.commit_lsn)?;
        m.serialize_entry("xid", &self.xid)?;
        m.serialize_entry("txindex", &self.index)?;
        if let Some(schema) = self.schema {
            m.serialize_entry("schemahash", schema)?;
        }
        if let Some(version) = self.dataschema {
            m.serialize_entry(
                "dataschema",
                &DataSchemaUri(self.source, self.event_type, version),
            )?;
        }
        if self.snapshot {
            m.serialize_entry("snapshot", &true)?;
        }
        for (k, v) in self.extensions {
            m.serialize_entry(k, v)?;
        }
        // Always written false; `DomainEvent::mark_last` flips it in place.
        m.serialize_entry(TXLAST, &false)?;
        m.serialize_entry("data", self.data)?;
        m.end()
    }
}

const TXLAST: &str = "txlast";

/// Encodes one CloudEvent as JSON. Returns the bytes and the offset of the `txlast`
/// value (`false`), which the pipeline flips to `true ` for the last event of a
/// transaction.
pub fn encode<D: Serialize>(f: &EnvelopeFields<'_, D>) -> (Vec<u8>, Option<usize>) {
    let mut out = Vec::with_capacity(512);
    // Writing into a Vec cannot fail with an I/O error, and the data types tidemark
    // passes serialize only string-keyed maps, which serde_json always accepts.
    if serde_json::to_writer(&mut out, f).is_err() {
        out.clear();
        out.extend_from_slice(b"{}");
    }
    // Every string value before `data` is escaped, so the first `"txlast":` in the
    // output is the key itself.
    let needle = b"\"txlast\":";
    let at = out
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + needle.len());
    (out, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txlast_offset_points_at_false_even_when_values_mention_it() {
        let data = serde_json::json!({"txlast": false, "x": "\"txlast\":false"});
        let ext = [("note", "\"txlast\":false")];
        let (bytes, at) = encode(&EnvelopeFields {
            id: "s:0/1:0",
            source: "s",
            event_type: "\"txlast\":false",
            subject: "t",
            time: "2000-01-01T00:00:00Z",
            commit_lsn: "0/1",
            xid: 1,
            index: 0,
            schema: Some("abcd1234"),
            dataschema: Some("abcd1234"),
            snapshot: false,
            extensions: &ext,
            data: &data,
        });
        let at = at.unwrap();
        assert_eq!(&bytes[at..at + 5], b"false");
        let mut patched = bytes.clone();
        patched[at..at + 5].copy_from_slice(b"true ");
        let v: serde_json::Value = serde_json::from_slice(&patched).unwrap();
        assert_eq!(v["txlast"], true);
        assert_eq!(v["data"]["txlast"], false);
        assert_eq!(v["note"], "\"txlast\":false");
        assert_eq!(v["schemahash"], "abcd1234");
        assert_eq!(
            v["dataschema"],
            crate::events::schema::dataschema_uri("s", "\"txlast\":false", "abcd1234")
        );
    }
}
