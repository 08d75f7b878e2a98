//! The CloudEvents 1.0 envelope (structured JSON mode) around every event's data.
//! Pure: fields in, bytes out.
//!
//! Extension attributes (lowercase alphanumerics, per the CloudEvents naming rule):
//! `commitlsn` (the transaction's commit LSN, `X/Y`), `xid` (its transaction id),
//! `txindex` (the event's index within its transaction), `txlast` (true on the last
//! event of its transaction), `schemahash` (a short fingerprint of a table event's
//! row shape) and whatever the mapping adds (static attributes, outbox fields).

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
/// serde_json escapes it), and only `data` goes through serde: this is the hot path
/// of every event, and the generic map serializer, `format_args!` for the URIs and a
/// search for the `txlast` key afterwards cost more than the row's own JSON.
pub fn encode<D: Serialize>(f: &EnvelopeFields<'_, D>) -> (Vec<u8>, Option<usize>) {
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
    // Writing into a Vec cannot fail with an I/O error, and the data types tidemark
    // passes serialize only string-keyed maps, which serde_json always accepts.
    if serde_json::to_writer(&mut out, f.data).is_err() {
        return (b"{}".to_vec(), None);
    }
    out.push(b'}');
    LAST_SIZE.with(|c| c.set(out.len()));
    (out, Some(at))
}

/// `s` as a JSON string, quoted.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    json_str_contents(out, s);
    out.push(b'"');
}

/// `s` escaped for a JSON string, as serde_json escapes it: `"` and `\\`, and the
/// control characters below U+0020 (short forms where JSON has them, else `\u00XX`).
fn json_str_contents(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = ESCAPE[b as usize];
        if short == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        if short == b'u' {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.push(b'\\');
            out.push(short);
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// For each byte, 0 when it stands as is in a JSON string, else the letter after the
/// backslash that escapes it (`u` for `\u00XX`).
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = b'u';
        b += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

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

    proptest::proptest! {
        /// Strings are escaped exactly as serde_json escapes them.
        #[test]
        fn strings_are_escaped_as_serde_json_does(s in "\\PC*|[\"\\\\\u{0}-\u{1f}a\u{7f}\u{e9}]*") {
            let mut out = Vec::new();
            json_str(&mut out, &s);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
        }

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
            let at = at.unwrap();
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
