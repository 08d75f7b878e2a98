//! Range, multirange and composite literals: Postgres text output parsed into its
//! parts. Pure.

/// A parsed range literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeText {
    Empty,
    Bounds {
        lower: Option<String>,
        upper: Option<String>,
        lower_inc: bool,
        upper_inc: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed range or composite literal at byte {at}")]
pub struct LiteralParseError {
    pub at: usize,
}

/// One bound or field of a range or composite literal, up to (not including) one of
/// `ends`. Quoted parts keep everything; `""` inside quotes and `\x` anywhere stand for
/// the character. Returns None for an empty, unquoted item.
fn parse_item(b: &[u8], i: &mut usize, ends: &[u8]) -> Result<Option<String>, LiteralParseError> {
    let mut out = Vec::new();
    let mut quoted = false;
    loop {
        match b.get(*i) {
            None => return Err(LiteralParseError { at: *i }),
            Some(c) if ends.contains(c) => break,
            Some(b'"') => {
                quoted = true;
                *i += 1;
                loop {
                    match b.get(*i) {
                        None => return Err(LiteralParseError { at: *i }),
                        Some(b'"') if b.get(*i + 1) == Some(&b'"') => {
                            out.push(b'"');
                            *i += 2;
                        }
                        Some(b'"') => {
                            *i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            out.push(*b.get(*i + 1).ok_or(LiteralParseError { at: *i })?);
                            *i += 2;
                        }
                        Some(c) => {
                            out.push(*c);
                            *i += 1;
                        }
                    }
                }
            }
            Some(b'\\') => {
                out.push(*b.get(*i + 1).ok_or(LiteralParseError { at: *i })?);
                *i += 2;
            }
            Some(c) => {
                out.push(*c);
                *i += 1;
            }
        }
    }
    if out.is_empty() && !quoted {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&out).into_owned()))
}

/// Parses a range's text output from `*i`: `empty`, `[1,10)`, `(,5]`, `["a b",)`.
pub fn parse_range(b: &[u8], i: &mut usize) -> Result<RangeText, LiteralParseError> {
    if b[*i..].starts_with(b"empty") {
        *i += 5;
        return Ok(RangeText::Empty);
    }
    let lower_inc = match b.get(*i) {
        Some(b'[') => true,
        Some(b'(') => false,
        _ => return Err(LiteralParseError { at: *i }),
    };
    *i += 1;
    let lower = parse_item(b, i, b",")?;
    *i += 1;
    let upper = parse_item(b, i, b")]")?;
    let upper_inc = b.get(*i) == Some(&b']');
    *i += 1;
    Ok(RangeText::Bounds {
        lower_inc: lower_inc && lower.is_some(),
        upper_inc: upper_inc && upper.is_some(),
        lower,
        upper,
    })
}

/// Parses a multirange's text output: `{}`, `{[1,3),[5,7)}`.
pub fn parse_multirange(s: &str) -> Result<Vec<RangeText>, LiteralParseError> {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() != Some(&b'{') {
        return Err(LiteralParseError { at: 0 });
    }
    i += 1;
    let mut out = Vec::new();
    if b.get(i) == Some(&b'}') {
        return if i + 1 == b.len() {
            Ok(out)
        } else {
            Err(LiteralParseError { at: i + 1 })
        };
    }
    loop {
        out.push(parse_range(b, &mut i)?);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') if i + 1 == b.len() => return Ok(out),
            _ => return Err(LiteralParseError { at: i }),
        }
    }
}

/// Parses a composite's text output: `(1,"a b",)` gives `[Some("1"), Some("a b"), None]`.
pub fn parse_composite(s: &str) -> Result<Vec<Option<String>>, LiteralParseError> {
    let b = s.as_bytes();
    if b.first() != Some(&b'(') {
        return Err(LiteralParseError { at: 0 });
    }
    let mut i = 1;
    let mut out = Vec::new();
    loop {
        out.push(parse_item(b, &mut i, b",)")?);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b')') if i + 1 == b.len() => return Ok(out),
            _ => return Err(LiteralParseError { at: i }),
        }
    }
}
