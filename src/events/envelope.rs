//! The CloudEvents 1.0 envelope (structured JSON mode) around every event's data.
//! Pure: fields in, bytes out.
//!
//! Extension attributes (lowercase alphanumerics, per the CloudEvents naming rule):
//! `commitlsn` (the transaction's commit LSN, `X/Y`), `xid` (its transaction id),
//! `txindex` (the event's index within its transaction), `txlast` (true on the last
//! event of its transaction), `schemahash` (a short fingerprint of a table event's
//! row shape) and whatever the mapping adds (static attributes, outbox fields).

use crate::events::json::{str as json_str, str_contents as json_str_contents};

/// An event's `data`, written as JSON into its envelope.
pub trait JsonData {
    fn write_json(&self, out: &mut Vec<u8>);
}

/// tidemark's own markers build their data as a `Value` (they are rare).
impl JsonData for serde_json::Value {
    fn write_json(&self, out: &mut Vec<u8>) {
        crate::events::json::value(out, self);
    }
}

/// The facts an envelope is built from.
pub struct EnvelopeFields<'a, D: JsonData + ?Sized> {
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

thread_local! {
    /// The size of the last envelope encoded on this thread: the next one's buffer
    /// starts that large, so it is seldom grown (and copied) on the way.
    static LAST_SIZE: std::cell::Cell<usize> = const { std::cell::Cell::new(512) };
}

/// Encodes one CloudEvent as JSON. Returns the bytes and the offset of the `txlast`
/// value (`false`), which the pipeline flips to `true ` for the last event of a
/// transaction.
///
/// The envelope's own attributes are written by hand (each string escaped as
/// serde_json escapes it, see `json`), and so is a row's `data`: this is the hot path
/// of every event, and the generic map serializer, `format_args!` for the URIs and a
/// search for the `txlast` key afterwards cost more than the row's own JSON.
pub fn encode<D: JsonData + ?Sized>(f: &EnvelopeFields<'_, D>) -> (Vec<u8>, usize) {
    let hint = LAST_SIZE.with(|c| c.get());
    let mut out = Vec::with_capacity(hint + hint / 8);
    out.extend_from_slice(b"{\"specversion\":\"1.0\",\"id\":");
    json_str(&mut out, f.id);
    out.extend_from_slice(b",\"source\":\"/tidemark/");
    json_str_contents(&mut out, f.source);
    out.push(b'"');
    let strings: [(&[u8], &str); 4] = [
        (b",\"type\":", f.event_type),
        (b",\"subject\":", f.subject),
        (b",\"time\":", f.time),
        (
            b",\"datacontenttype\":\"application/json\",\"commitlsn\":",
            f.commit_lsn,
        ),
    ];
    for (key, value) in strings {
        out.extend_from_slice(key);
        json_str(&mut out, value);
    }
    out.extend_from_slice(b",\"xid\":");
    out.extend_from_slice(itoa::Buffer::new().format(f.xid).as_bytes());
    out.extend_from_slice(b",\"txindex\":");
    out.extend_from_slice(itoa::Buffer::new().format(f.index).as_bytes());
    if let Some(schema) = f.schema {
        out.extend_from_slice(b",\"schemahash\":");
        json_str(&mut out, schema);
    }
    if let Some(version) = f.dataschema {
        // `urn:tidemark:<source>:<type>:<version>` (see `schema::dataschema_uri`).
        out.extend_from_slice(b",\"dataschema\":\"urn:tidemark:");
        for (k, part) in [f.source, f.event_type, version].into_iter().enumerate() {
            if k > 0 {
                out.push(b':');
            }
            json_str_contents(&mut out, part);
        }
        out.push(b'"');
    }
    if f.snapshot {
        out.extend_from_slice(b",\"snapshot\":true");
    }
    for (k, v) in f.extensions {
        out.push(b',');
        json_str(&mut out, k);
        out.push(b':');
        json_str(&mut out, v);
    }
    // Always written false; `DomainEvent::mark_last` flips it in place.
    out.extend_from_slice(b",\"txlast\":");
    let at = out.len();
    out.extend_from_slice(b"false,\"data\":");
    f.data.write_json(&mut out);
    out.push(b'}');
    LAST_SIZE.with(|c| c.set(out.len()));
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

    proptest::proptest! {
        /// Whatever the attributes hold, the envelope is one JSON object with each of
        /// them, and the offset points at `txlast`'s value.
        #[test]
        fn every_attribute_round_trips(
            id in "\\PC*", source in "\\PC*", ty in "\\PC*", subject in "[\"\\\\\u{0}-\u{1f}a-z]*",
            ext_k in "ext[a-z\"]{0,5}", ext_v in "\\PC*", xid: u32, index: u64, snapshot: bool,
            schema in proptest::option::of("[a-f0-9\"]{0,8}"),
        ) {
            let data = serde_json::json!({"k": id.clone(), "n": index});
            let ext = [(ext_k.as_str(), ext_v.as_str())];
            let (bytes, at) = encode(&EnvelopeFields {
                id: &id, source: &source, event_type: &ty, subject: &subject,
                time: "2000-01-01T00:00:00Z", commit_lsn: "0/1", xid, index,
                schema: schema.as_deref(), dataschema: schema.as_deref(), snapshot,
                extensions: &ext, data: &data,
            });
            proptest::prop_assert_eq!(&bytes[at..at + 5], b"false");
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            proptest::prop_assert_eq!(&v["id"], &serde_json::json!(id));
            proptest::prop_assert_eq!(&v["source"], &serde_json::json!(format!("/tidemark/{source}")));
            proptest::prop_assert_eq!(&v["type"], &serde_json::json!(ty));
            proptest::prop_assert_eq!(&v["subject"], &serde_json::json!(subject));
            proptest::prop_assert_eq!(&v["xid"], &serde_json::json!(xid));
            proptest::prop_assert_eq!(&v["txindex"], &serde_json::json!(index));
            proptest::prop_assert_eq!(&v["data"], &data);
            proptest::prop_assert_eq!(v.get("snapshot").is_some(), snapshot);
            if let Some(h) = &schema {
                proptest::prop_assert_eq!(&v["schemahash"], &serde_json::json!(h));
                proptest::prop_assert_eq!(&v["dataschema"], &serde_json::json!(crate::events::schema::dataschema_uri(&source, &ty, h)));
            }
            proptest::prop_assert_eq!(&v[ext_k.as_str()], &serde_json::json!(ext_v));
        }
    }
}
