//! A KV read model's keys: made from a handler's template and the event, each value
//! escaped so that any value makes a valid key and two values never share one.

use super::*;

/// A KV key from its template, or why it cannot be made. Each value taken from the
/// event is written with `push_key_value`, so any value makes a key (an email's `@`, a
/// time's `:`); the template's literal parts are written as they are.
pub(super) fn render_key(parts: &[KeyPart], event: &serde_json::Value) -> Result<String, String> {
    let mut out = String::new();
    for p in parts {
        match p {
            KeyPart::Lit(l) => out.push_str(l),
            KeyPart::Path(path) => match param(event, path).0 {
                Some(v) => push_key_value(&mut out, &v),
                None => return Err(format!("{} is missing from the event", path.join("."))),
            },
        }
    }
    let valid = !out.is_empty()
        && !out.starts_with('.')
        && !out.ends_with('.')
        && !out.contains("..")
        && out.chars().all(key_char);
    if valid {
        Ok(out)
    } else {
        Err(format!(
            "{out:?} is not a valid KV key (empty, or a '.' at its start or end or next to another)"
        ))
    }
}

/// A value as it stands in a KV read model's key (see `push_key_value`): what a reader
/// in Rust uses to find a row's entry, e.g. `format!("user.{}", kv_key_value(email))`.
pub fn kv_key_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    push_key_value(&mut out, value);
    out
}

/// The characters a NATS KV key may hold.
fn key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '=' | '.')
}

/// Writes a value into a key, escaped so that any value is a valid part of a key and
/// two values never make the same key: each UTF-8 byte of a character a key cannot
/// hold, of `=` itself, and of a `.` that starts or ends the value or follows another
/// `.` (a key has no empty token), is written `=` and two uppercase hex digits
/// (`a@b.com` is `a=40b.com`, `10:30` is `10=3A30`). Letters, digits, `-`, `_`, `/`
/// and other dots stay as they are, so a value that was a valid key keeps its text
/// (unless it holds `=`). Reading a key back: `=XY` is the byte 0xXY, anything else is
/// itself.
pub(super) fn push_key_value(out: &mut String, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = value.as_bytes();
    for (i, c) in value.char_indices() {
        let plain = match c {
            '=' => false,
            '.' => i > 0 && i + 1 < bytes.len() && bytes[i - 1] != b'.' && bytes[i + 1] != b'.',
            c => key_char(c),
        };
        if plain {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push('=');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
}

/// The key an event's row had before an UPDATE that changed its key: the template with
/// each `data.after.<column>` or `data.key.<column>` read from `data.before`. None when
/// the template takes nothing from the row, the event has no old key (`before` holds
/// it only when the key changed, or the whole old row), or the key is the same.
pub(super) fn old_key(parts: &[KeyPart], event: &serde_json::Value, new: &str) -> Option<String> {
    let mut from_row = false;
    let before: Vec<KeyPart> = parts
        .iter()
        .map(|p| match p {
            KeyPart::Path(path) => match path.as_slice() {
                [data, part, column] if data == "data" && (part == "after" || part == "key") => {
                    from_row = true;
                    KeyPart::Path(vec![data.clone(), "before".into(), column.clone()])
                }
                _ => p.clone(),
            },
            KeyPart::Lit(_) => p.clone(),
        })
        .collect();
    if !from_row {
        return None;
    }
    render_key(&before, event).ok().filter(|old| old != new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Reads an escaped key value back (the inverse of `push_key_value`).
    fn unescape(key: &str) -> Option<String> {
        let mut bytes = Vec::new();
        let mut rest = key.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'=' {
                let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &tail[2..];
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        String::from_utf8(bytes).ok()
    }

    #[test]
    fn key_values_are_escaped_into_valid_keys() {
        let esc = kv_key_value;
        assert_eq!(esc("a@b.com"), "a=40b.com");
        assert_eq!(
            esc("2026-01-01 10:30:00+00"),
            "2026-01-01=2010=3A30=3A00=2B00"
        );
        assert_eq!(esc("12.50"), "12.50");
        assert_eq!(esc("eu-west_1/x"), "eu-west_1/x");
        assert_eq!(esc("a=b"), "a=3Db");
        assert_eq!(esc(".5"), "=2E5");
        assert_eq!(esc("5."), "5=2E");
        assert_eq!(esc("a..b"), "a=2E=2Eb");
        assert_eq!(esc("é"), "=C3=A9");
        assert_eq!(esc(""), "");
        let path = |p: &str| KeyPart::Path(p.split('.').map(str::to_string).collect());
        let parts = vec![KeyPart::Lit("user.".into()), path("data.after.email")];
        let event = |email: &str| json!({"data": {"after": {"email": email}}});
        assert_eq!(
            render_key(&parts, &event("ann@example.com")).as_deref(),
            Ok("user.ann=40example.com")
        );
        // An empty value leaves the key ending in a dot: said, not sent.
        assert!(render_key(&parts, &event("")).is_err());
        let middle = vec![path("data.after.email"), KeyPart::Lit(".x".into())];
        assert!(render_key(&middle, &event("")).is_err());
    }

    proptest::proptest! {
        /// Any non-empty value makes a valid key, read back to the value: two values
        /// never share a key.
        #[test]
        fn any_value_escapes_to_a_valid_key_that_reads_back(value in "\\PC{1,12}|[.=a@:]{1,8}") {
            let mut key = String::from("k.");
            push_key_value(&mut key, &value);
            proptest::prop_assert!(is_valid_kv_key(&key), "{key:?}");
            proptest::prop_assert!(!key.contains(".."), "{key:?}");
            proptest::prop_assert_eq!(unescape(&key[2..]), Some(value));
        }
    }

    /// NATS's own rule for a key (async-nats checks it before a put).
    fn is_valid_kv_key(key: &str) -> bool {
        !key.is_empty() && !key.starts_with('.') && !key.ends_with('.') && key.chars().all(key_char)
    }

    #[test]
    fn the_old_key_of_an_update_that_changed_the_key() {
        let path = |p: &str| KeyPart::Path(p.split('.').map(str::to_string).collect());
        let parts = vec![
            KeyPart::Lit("order.".into()),
            path("data.after.id"),
            KeyPart::Lit(".".into()),
            path("data.key.region"),
        ];
        let event = |before: serde_json::Value| {
            json!({"data": {"key": {"id": 2, "region": "eu"}, "before": before,
                            "after": {"id": 2, "region": "eu"}}})
        };
        let old = |before| old_key(&parts, &event(before), "order.2.eu");
        assert_eq!(
            old(json!({"id": 1, "region": "eu"})).as_deref(),
            Some("order.1.eu")
        );
        assert_eq!(old(json!({"id": 2, "region": "eu", "total": 1})), None);
        assert_eq!(old(json!(null)), None);
        assert_eq!(old(json!({"id": 1})), None);
        // A key that takes nothing from the row has no old one.
        let fixed = vec![KeyPart::Lit("all.".into()), path("type")];
        assert_eq!(old_key(&fixed, &event(json!({"id": 1})), "all.x"), None);
    }
}
