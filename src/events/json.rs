//! JSON strings written straight into a byte buffer, escaped exactly as serde_json
//! escapes them. Pure.
//!
//! This is the hot path of every event: an envelope holds a dozen strings and a row a
//! few more. Runs of eight bytes that need no escape are found with a few word
//! operations and copied at once, where serde_json looks up every byte.

/// `s` as a JSON string, quoted.
pub fn str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    str_contents(out, s);
    out.push(b'"');
}

/// `b` as a JSON string, quoted: text that is not valid UTF-8 is written as
/// `String::from_utf8_lossy` reads it, so the output is always valid JSON.
pub fn text(out: &mut Vec<u8>, b: &[u8]) {
    // ASCII is valid UTF-8, and most values are ASCII: one quick pass over the words.
    if b.is_ascii() {
        out.push(b'"');
        escape(out, b);
        out.push(b'"');
        return;
    }
    match std::str::from_utf8(b) {
        Ok(s) => str(out, s),
        Err(_) => str(out, &String::from_utf8_lossy(b)),
    }
}

/// A `Value` (the rare shapes: converted values, tidemark's own markers).
pub fn value(out: &mut Vec<u8>, v: &serde_json::Value) {
    // A `Value` has string keys only, so serde_json always writes it, and writing into
    // a `Vec` cannot fail.
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// `s` escaped for a JSON string: `"` and `\\`, and the control characters below
/// U+0020 (short forms where JSON has them, else `\u00XX`); everything else as is.
pub fn str_contents(out: &mut Vec<u8>, s: &str) {
    escape(out, s.as_bytes());
}

/// `bytes` (valid UTF-8) escaped as `str_contents` says. Most strings need no
/// escape at all: that is found eight bytes at a time (the last word overlapping the
/// one before it), and the string is copied at once. Only a string that has something
/// to escape is read byte by byte.
fn escape(out: &mut Vec<u8>, bytes: &[u8]) {
    let clean = match bytes.last_chunk::<8>() {
        Some(last) => {
            let words = bytes.chunks_exact(8).fold(0, |acc, w| {
                acc | w
                    .first_chunk::<8>()
                    .map_or(HIGH, |w| escapes(u64::from_le_bytes(*w)))
            });
            words | escapes(u64::from_le_bytes(*last)) == 0
        }
        None => bytes.iter().all(|&b| ESCAPE[b as usize] == 0),
    };
    if clean {
        out.extend_from_slice(bytes);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
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

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Nonzero when any of the eight bytes of `w` is below 0x20, `"` or `\\`. Exact as
/// a whole (a borrow can only mark bytes above one that truly matches), which is all
/// the caller asks.
fn escapes(w: u64) -> u64 {
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    below_space | zero_byte(w ^ (ONES * u64::from(b'"'))) | zero_byte(w ^ (ONES * u64::from(b'\\')))
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
    fn every_byte_in_every_position_is_escaped_as_serde_json_does() {
        for (b, len) in (0u8..0x80).flat_map(|b| (1..=17).map(move |len| (b, len))) {
            for pos in 0..len {
                let mut s = "abcdefghijklmnopq"[..len].to_string();
                s.replace_range(pos..pos + 1, std::str::from_utf8(&[b]).unwrap());
                let mut out = Vec::new();
                str(&mut out, &s);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    serde_json::to_string(&s).unwrap()
                );
            }
        }
    }

    #[test]
    fn the_word_test_matches_the_table() {
        for b in 0u8..=255 {
            for pos in 0..8 {
                let mut w = *b"aaaaaaaa";
                w[pos] = b;
                assert_eq!(
                    escapes(u64::from_le_bytes(w)) != 0,
                    ESCAPE[b as usize] != 0,
                    "byte {b:#x} at {pos}"
                );
            }
        }
    }

    proptest::proptest! {
        /// Strings are escaped exactly as serde_json escapes them.
        #[test]
        fn strings_are_escaped_as_serde_json_does(s in "\\PC*|[\"\\\\\u{0}-\u{1f}a\u{7f}\u{e9}]*|[a-z\"\\\\\n]{0,40}") {
            let mut out = Vec::new();
            str(&mut out, &s);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
        }

        /// Bytes are read as `from_utf8_lossy` reads them, then escaped.
        #[test]
        fn any_bytes_become_the_lossy_string(b in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let mut out = Vec::new();
            text(&mut out, &b);
            let lossy = String::from_utf8_lossy(&b);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&lossy).unwrap());
        }
    }
}
