//! One value's text output written as JSON, straight into the event's buffer. Pure.

use super::{TypeKind, iso_timestamp_in, text_to_json};
use crate::events::json;

/// One value's text output, written as JSON without an intermediate `Value` for the
/// common types (the per-column hot path); others go through `text_to_json`. Both give
/// the same JSON.
pub struct JsonText<'a> {
    pub kind: &'a TypeKind,
    pub text: &'a [u8],
}

impl JsonText<'_> {
    /// Writes the value as JSON into `out`: the JSON `text_to_json` gives.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let converted = || text_to_json(self.kind, self.text);
        match self.kind {
            // Postgres prints integers canonically: such a text is its own JSON.
            TypeKind::Int if canonical_int(self.text) => out.extend_from_slice(self.text),
            TypeKind::Int => match std::str::from_utf8(self.text)
                .ok()
                .and_then(|t| t.parse::<i64>().ok())
            {
                Some(i) => out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
                None => json::value(out, &converted()),
            },
            TypeKind::Bool => match self.text {
                b"t" => out.extend_from_slice(b"true"),
                b"f" => out.extend_from_slice(b"false"),
                _ => json::text(out, self.text),
            },
            TypeKind::Text
            | TypeKind::Numeric
            | TypeKind::Uuid
            | TypeKind::Date
            | TypeKind::Time
            | TypeKind::Unknown => json::text(out, self.text),
            TypeKind::Timestamp | TypeKind::Timestamptz => {
                let tz = matches!(self.kind, TypeKind::Timestamptz);
                let mut buf = [0u8; 48];
                match iso_timestamp_in(self.text, tz, &mut buf) {
                    Some(iso) => json::str(out, iso),
                    None => json::value(out, &converted()),
                }
            }
            TypeKind::Json => {
                match serde_json::from_slice::<&serde_json::value::RawValue>(self.text) {
                    Ok(raw) => out.extend_from_slice(raw.get().as_bytes()),
                    Err(_) => json::text(out, self.text),
                }
            }
            _ => json::value(out, &converted()),
        }
    }
}

/// `0`, or an optional `-` and 1 to 18 digits without a leading zero: the decimal an
/// i64 prints as, for every value this short (so well inside the i64 range).
fn canonical_int(text: &[u8]) -> bool {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    text == b"0"
        || (matches!(digits.first(), Some(b'1'..=b'9'))
            && digits.len() <= 18
            && digits.iter().all(u8::is_ascii_digit))
}
