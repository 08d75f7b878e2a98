//! Column values: Postgres text output to JSON, by type. Pure.
//!
//! The replication connection pins the session settings these conversions rely on
//! (`DateStyle=ISO`, `TimeZone=UTC`, `bytea_output=hex`, `client_encoding=UTF8`,
//! `extra_float_digits=1`), see `replication.rs`. Values keep their meaning: integers are
//! JSON numbers, numeric stays a string (no float rounding), json/jsonb is embedded,
//! arrays become arrays, timestamps RFC 3339, bytea base64. A type we do not know passes
//! through as its text, never dropped; a text that does not parse as its type (which
//! Postgres never sends) also passes through as text rather than losing the value.

use std::collections::HashMap;

use base64::Engine as _;
use serde_json::{Number, Value};

mod json_text;
mod literal;
pub use json_text::JsonText;
pub use literal::*;

/// How values of one Postgres type convert to JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeKind {
    Bool,
    Int,
    Float,
    Numeric,
    Text,
    Json,
    Uuid,
    Date,
    Time,
    TimeTz,
    Timestamp,
    Timestamptz,
    Bytea,
    Array {
        element: Box<TypeKind>,
        delimiter: u8,
    },
    /// `money`: the amount as a numeric string (`-1234.56`), formatting removed.
    Money,
    Geometric(Geo),
    /// A range of the element kind: `{lower, upper, lower_inc, upper_inc}` or
    /// `{empty: true}`.
    Range(Box<TypeKind>),
    /// A list of ranges.
    Multirange(Box<TypeKind>),
    /// A composite (row) type: an object of its fields.
    Composite(Vec<(String, TypeKind)>),
    /// Not known: the text passes through as a JSON string.
    Unknown,
}

/// The geometric types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Geo {
    Point,
    Line,
    Lseg,
    Box,
    Path,
    Polygon,
    Circle,
}

impl TypeKind {
    fn array_of(element: TypeKind) -> TypeKind {
        TypeKind::Array {
            element: Box::new(element),
            delimiter: b',',
        }
    }
}

/// The kind of a built-in type, by OID (`pg_type.oid`, stable across versions).
pub fn builtin_kind(oid: u32) -> Option<TypeKind> {
    use TypeKind::*;
    Some(match oid {
        16 => Bool,
        17 => Bytea,
        18 | 19 | 25 | 1042 | 1043 => Text,
        20 | 21 | 23 | 26 | 28 => Int,
        114 | 3802 => Json,
        700 | 701 => Float,
        1082 => Date,
        1083 => Time,
        1114 => Timestamp,
        1184 => Timestamptz,
        1266 => TimeTz,
        1700 => Numeric,
        2950 => Uuid,
        // Texts that are their own best JSON: interval (ISO 8601, pinned by the
        // session's IntervalStyle), network addresses, bit strings, xml, text search,
        // pg_lsn.
        1186 | 869 | 650 | 829 | 774 | 1560 | 1562 | 142 | 3614 | 3615 | 3220 => Text,
        790 => Money,
        600 => Geometric(Geo::Point),
        628 => Geometric(Geo::Line),
        601 => Geometric(Geo::Lseg),
        603 => Geometric(Geo::Box),
        602 => Geometric(Geo::Path),
        604 => Geometric(Geo::Polygon),
        718 => Geometric(Geo::Circle),
        3904 => Range(Box::new(Int)),
        3926 => Range(Box::new(Int)),
        3906 => Range(Box::new(Numeric)),
        3908 => Range(Box::new(Timestamp)),
        3910 => Range(Box::new(Timestamptz)),
        3912 => Range(Box::new(Date)),
        4451 | 4536 => Multirange(Box::new(Int)),
        4532 => Multirange(Box::new(Numeric)),
        4533 => Multirange(Box::new(Timestamp)),
        4534 => Multirange(Box::new(Timestamptz)),
        4535 => Multirange(Box::new(Date)),
        1000 => TypeKind::array_of(Bool),
        1001 => TypeKind::array_of(Bytea),
        1002 | 1003 | 1009 | 1014 | 1015 => TypeKind::array_of(Text),
        1005 | 1007 | 1016 | 1028 | 1011 => TypeKind::array_of(Int),
        199 | 3807 => TypeKind::array_of(Json),
        1021 | 1022 => TypeKind::array_of(Float),
        1182 => TypeKind::array_of(Date),
        1183 => TypeKind::array_of(Time),
        1115 => TypeKind::array_of(Timestamp),
        1185 => TypeKind::array_of(Timestamptz),
        1270 => TypeKind::array_of(TimeTz),
        1231 => TypeKind::array_of(Numeric),
        2951 => TypeKind::array_of(Uuid),
        _ => return None,
    })
}

/// Types known to this source: the built-ins plus what the catalog told us about
/// user-defined ones (enums, domains, arrays of them).
#[derive(Clone, Debug, Default)]
pub struct TypeRegistry {
    custom: HashMap<u32, TypeKind>,
}

impl TypeRegistry {
    pub fn kind(&self, oid: u32) -> TypeKind {
        builtin_kind(oid)
            .or_else(|| self.custom.get(&oid).cloned())
            .unwrap_or(TypeKind::Unknown)
    }

    pub fn is_known(&self, oid: u32) -> bool {
        builtin_kind(oid).is_some() || self.custom.contains_key(&oid)
    }

    pub fn register(&mut self, oid: u32, kind: TypeKind) {
        self.custom.insert(oid, kind);
    }
}

/// Converts one value's text output to JSON.
pub fn text_to_json(kind: &TypeKind, text: &[u8]) -> Value {
    let s = String::from_utf8_lossy(text);
    convert(kind, &s)
}

fn convert(kind: &TypeKind, s: &str) -> Value {
    let passthrough = || Value::String(s.to_string());
    match kind {
        TypeKind::Bool => match s {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => passthrough(),
        },
        TypeKind::Int => {
            if let Ok(i) = s.parse::<i64>() {
                Value::Number(i.into())
            } else if let Ok(u) = s.parse::<u64>() {
                Value::Number(u.into())
            } else {
                passthrough()
            }
        }
        TypeKind::Float => match s {
            "NaN" | "Infinity" | "-Infinity" => passthrough(),
            _ => s
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .unwrap_or_else(passthrough),
        },
        TypeKind::Numeric | TypeKind::Text | TypeKind::Uuid | TypeKind::Date | TypeKind::Time => {
            passthrough()
        }
        TypeKind::Unknown => passthrough(),
        TypeKind::Json => serde_json::from_str(s).unwrap_or_else(|_| passthrough()),
        TypeKind::TimeTz => Value::String(rfc3339_offset(s)),
        TypeKind::Timestamp => Value::String(iso_timestamp(s, false)),
        TypeKind::Timestamptz => Value::String(iso_timestamp(s, true)),
        TypeKind::Bytea => match decode_bytea(s) {
            Some(bytes) => Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            None => passthrough(),
        },
        TypeKind::Array { element, delimiter } => match parse_array(s, *delimiter) {
            Ok(node) => array_to_json(&node, element),
            Err(_) => passthrough(),
        },
        TypeKind::Money => {
            let amount: String = s
                .chars()
                .filter(|c| c.is_ascii_digit() || matches!(c, '.' | '-'))
                .collect();
            // A negative in parentheses, as some locales write it.
            if s.starts_with('(') && !amount.starts_with('-') {
                Value::String(format!("-{amount}"))
            } else {
                Value::String(amount)
            }
        }
        TypeKind::Geometric(g) => geometric(*g, s).unwrap_or_else(passthrough),
        TypeKind::Range(element) => match parse_range(s.as_bytes(), &mut 0) {
            Ok(r) => range_to_json(&r, element),
            Err(_) => passthrough(),
        },
        TypeKind::Multirange(element) => match parse_multirange(s) {
            Ok(list) => Value::Array(list.iter().map(|r| range_to_json(r, element)).collect()),
            Err(_) => passthrough(),
        },
        TypeKind::Composite(fields) => match parse_composite(s) {
            Ok(values) if values.len() == fields.len() => Value::Object(
                fields
                    .iter()
                    .zip(values)
                    .map(|((name, kind), v)| {
                        let v = match v {
                            Some(text) => convert(kind, &text),
                            None => Value::Null,
                        };
                        (name.clone(), v)
                    })
                    .collect(),
            ),
            _ => passthrough(),
        },
    }
}

/// The numbers of a geometric value's text, in order.
fn numbers(s: &str) -> Vec<Value> {
    s.split(|c: char| {
        matches!(c, '(' | ')' | '[' | ']' | '{' | '}' | '<' | '>' | ',') || c.is_whitespace()
    })
    .filter(|t| !t.is_empty())
    .map(|t| {
        t.parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(t.to_string()))
    })
    .collect()
}

fn points(n: &[Value]) -> Value {
    Value::Array(
        n.chunks(2)
            .map(|p| serde_json::json!({"x": p[0], "y": p.get(1).cloned().unwrap_or(Value::Null)}))
            .collect(),
    )
}

/// point `{x, y}`, line `{a, b, c}` (ax + by + c = 0), lseg and box `[{x, y}, {x, y}]`,
/// path `{closed, points}`, polygon `[{x, y}, ...]`, circle `{x, y, radius}`.
fn geometric(g: Geo, s: &str) -> Option<Value> {
    let n = numbers(s);
    let even = n.len().is_multiple_of(2) && !n.is_empty();
    Some(match g {
        Geo::Point if n.len() == 2 => serde_json::json!({"x": n[0], "y": n[1]}),
        Geo::Line if n.len() == 3 => serde_json::json!({"a": n[0], "b": n[1], "c": n[2]}),
        Geo::Lseg | Geo::Box if n.len() == 4 => points(&n),
        Geo::Polygon if even => points(&n),
        Geo::Path if even => {
            serde_json::json!({"closed": s.trim_start().starts_with('('), "points": points(&n)})
        }
        Geo::Circle if n.len() == 3 => serde_json::json!({"x": n[0], "y": n[1], "radius": n[2]}),
        _ => return None,
    })
}

fn range_to_json(r: &RangeText, element: &TypeKind) -> Value {
    match r {
        RangeText::Empty => serde_json::json!({"empty": true}),
        RangeText::Bounds {
            lower,
            upper,
            lower_inc,
            upper_inc,
        } => {
            let bound = |b: &Option<String>| match b {
                Some(t) => convert(element, t),
                None => Value::Null,
            };
            serde_json::json!({
                "lower": bound(lower),
                "upper": bound(upper),
                "lower_inc": lower_inc,
                "upper_inc": upper_inc,
            })
        }
    }
}

/// `2024-01-02 03:04:05.5+00` to `2024-01-02T03:04:05.5Z`. Values RFC 3339 cannot hold
/// (`infinity`, BC dates) pass through unchanged.
fn iso_timestamp(s: &str, with_offset: bool) -> String {
    if s.ends_with(" BC") || s.as_bytes().get(10).is_none_or(|b| *b != b' ') {
        return s.to_string();
    }
    let t = format!("{}T{}", &s[..10], &s[11..]);
    if with_offset { rfc3339_offset(&t) } else { t }
}

/// `iso_timestamp` for the common case, in `buf` without allocating: a UTF-8 text
/// `YYYY-MM-DD hh:mm:ss[.f][offset]` that fits. None for anything else (the caller
/// takes `iso_timestamp`, which gives the same result for what this takes).
fn iso_timestamp_in<'b>(text: &[u8], with_offset: bool, buf: &'b mut [u8; 48]) -> Option<&'b str> {
    if text.len() < 19 || text.len() + 3 > buf.len() || text.get(10) != Some(&b' ') {
        return None;
    }
    if !text.is_ascii() || text.ends_with(b" BC") {
        return None;
    }
    let mut len = text.len();
    buf[..len].copy_from_slice(text);
    buf[10] = b'T';
    if with_offset {
        // The sign after the first `T` (see `rfc3339_offset`).
        let start = buf[..len].iter().position(|b| *b == b'T')? + 1;
        let Some(rel) = buf[start..len]
            .iter()
            .rposition(|b| matches!(b, b'+' | b'-'))
        else {
            return std::str::from_utf8(&buf[..len]).ok();
        };
        let at = start + rel;
        match &text[at..] {
            b"+00" | b"+00:00" | b"-00" => {
                buf[at] = b'Z';
                len = at + 1;
            }
            offset if offset.len() == 3 => {
                buf[len..len + 3].copy_from_slice(b":00");
                len += 3;
            }
            _ => {}
        }
    }
    std::str::from_utf8(&buf[..len]).ok()
}

/// Rewrites a trailing Postgres offset (`+00`, `-05`, `+05:30`) in RFC 3339 form
/// (`Z`, `-05:00`, `+05:30`). The sign is searched after the time's first digit, so
/// the date's dashes are never taken for it.
fn rfc3339_offset(s: &str) -> String {
    let start = s.find('T').map_or(0, |t| t + 1);
    let Some(rel) = s[start..].rfind(['+', '-']) else {
        return s.to_string();
    };
    let at = start + rel;
    let (base, offset) = s.split_at(at);
    match offset {
        "+00" | "+00:00" | "-00" => format!("{base}Z"),
        _ if offset.len() == 3 => format!("{base}{offset}:00"),
        _ => s.to_string(),
    }
}

fn decode_bytea(s: &str) -> Option<Vec<u8>> {
    if let Some(hex) = s.strip_prefix("\\x") {
        let hex = hex.as_bytes();
        if hex.len() % 2 != 0 {
            return None;
        }
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        hex.chunks(2)
            .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
            .collect()
    } else {
        // The "escape" output format: `\\` for a backslash, `\ooo` octal for others.
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'\\' {
                out.push(b[i]);
                i += 1;
            } else if b.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
            } else {
                let oct = b.get(i + 1..i + 4)?;
                let v = std::str::from_utf8(oct).ok()?;
                out.push(u8::from_str_radix(v, 8).ok()?);
                i += 4;
            }
        }
        Some(out)
    }
}

/// A parsed array literal: nested lists of optional element texts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArrayNode {
    List(Vec<ArrayNode>),
    Element(Option<String>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed array literal at byte {at}")]
pub struct ArrayParseError {
    pub at: usize,
}

/// Parses Postgres' array text output: `{1,2,NULL}`, `{{a,"b c"},{"\"q\"",NULL}}`,
/// with an optional dimension decoration `[0:1]={...}`.
pub fn parse_array(s: &str, delimiter: u8) -> Result<ArrayNode, ArrayParseError> {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'[') {
        let eq = s.find('=').ok_or(ArrayParseError { at: 0 })?;
        i = eq + 1;
    }
    let node = parse_list(b, &mut i, delimiter, 0)?;
    skip_ws(b, &mut i);
    if i != b.len() {
        return Err(ArrayParseError { at: i });
    }
    Ok(node)
}

/// Whitespace as Postgres' array input and output see it (`scanner_isspace`).
fn pg_isspace(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && pg_isspace(b[*i]) {
        *i += 1;
    }
}

/// Postgres allows at most 6 dimensions; refuse deeper nesting so recursion is bounded.
const MAX_ARRAY_DEPTH: usize = 6;

fn parse_list(
    b: &[u8],
    i: &mut usize,
    delim: u8,
    depth: usize,
) -> Result<ArrayNode, ArrayParseError> {
    skip_ws(b, i);
    if b.get(*i) != Some(&b'{') || depth >= MAX_ARRAY_DEPTH {
        return Err(ArrayParseError { at: *i });
    }
    *i += 1;
    let mut items = Vec::new();
    skip_ws(b, i);
    if b.get(*i) == Some(&b'}') {
        *i += 1;
        return Ok(ArrayNode::List(items));
    }
    loop {
        skip_ws(b, i);
        match b.get(*i) {
            Some(b'{') => items.push(parse_list(b, i, delim, depth + 1)?),
            Some(b'"') => {
                *i += 1;
                let mut out = Vec::new();
                loop {
                    match b.get(*i) {
                        Some(b'\\') => {
                            let c = *b.get(*i + 1).ok_or(ArrayParseError { at: *i })?;
                            out.push(c);
                            *i += 2;
                        }
                        Some(b'"') => {
                            *i += 1;
                            break;
                        }
                        Some(c) => {
                            out.push(*c);
                            *i += 1;
                        }
                        None => return Err(ArrayParseError { at: *i }),
                    }
                }
                items.push(ArrayNode::Element(Some(
                    String::from_utf8_lossy(&out).into_owned(),
                )));
            }
            Some(_) => {
                let mut out = Vec::new();
                while let Some(&c) = b.get(*i) {
                    if c == delim || c == b'}' {
                        break;
                    }
                    if c == b'\\' {
                        let n = *b.get(*i + 1).ok_or(ArrayParseError { at: *i })?;
                        out.push(n);
                        *i += 2;
                        continue;
                    }
                    out.push(c);
                    *i += 1;
                }
                let start = out
                    .iter()
                    .position(|c| !pg_isspace(*c))
                    .unwrap_or(out.len());
                let end = out
                    .iter()
                    .rposition(|c| !pg_isspace(*c))
                    .map_or(start, |e| e + 1);
                let text = String::from_utf8_lossy(&out[start..end]).into_owned();
                if text.is_empty() {
                    return Err(ArrayParseError { at: *i });
                }
                if text.eq_ignore_ascii_case("NULL") {
                    items.push(ArrayNode::Element(None));
                } else {
                    items.push(ArrayNode::Element(Some(text)));
                }
            }
            None => return Err(ArrayParseError { at: *i }),
        }
        skip_ws(b, i);
        match b.get(*i) {
            Some(&c) if c == delim => *i += 1,
            Some(b'}') => {
                *i += 1;
                return Ok(ArrayNode::List(items));
            }
            _ => return Err(ArrayParseError { at: *i }),
        }
    }
}

fn array_to_json(node: &ArrayNode, element: &TypeKind) -> Value {
    match node {
        ArrayNode::List(items) => {
            Value::Array(items.iter().map(|n| array_to_json(n, element)).collect())
        }
        ArrayNode::Element(None) => Value::Null,
        ArrayNode::Element(Some(text)) => convert(element, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn conv(oid: u32, s: &str) -> Value {
        text_to_json(&TypeRegistry::default().kind(oid), s.as_bytes())
    }

    #[test]
    fn scalars() {
        assert_eq!(conv(16, "t"), json!(true));
        assert_eq!(conv(16, "f"), json!(false));
        assert_eq!(conv(21, "-32768"), json!(-32768));
        assert_eq!(conv(23, "42"), json!(42));
        assert_eq!(
            conv(20, "9223372036854775807"),
            json!(9223372036854775807i64)
        );
        assert_eq!(conv(700, "1.5"), json!(1.5));
        assert_eq!(conv(701, "-0.000123"), json!(-0.000123));
        assert_eq!(conv(701, "1e+300"), json!(1e300));
        assert_eq!(conv(701, "NaN"), json!("NaN"));
        assert_eq!(conv(701, "Infinity"), json!("Infinity"));
        assert_eq!(conv(700, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            conv(1700, "12345678901234567890.000000000001"),
            json!("12345678901234567890.000000000001")
        );
        assert_eq!(conv(25, "héllo ✓"), json!("héllo ✓"));
        assert_eq!(conv(1042, "ab  "), json!("ab  "));
        assert_eq!(
            conv(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(
            conv(3802, r#"{"a": [1, 2.5, null]}"#),
            json!({"a": [1, 2.5, null]})
        );
        assert_eq!(conv(114, r#" [true] "#), json!([true]));
        assert_eq!(conv(17, "\\x00ff10"), json!("AP8Q"));
        assert_eq!(conv(17, "\\x"), json!(""));
        assert_eq!(conv(17, "a\\\\b\\001"), json!("YVxiAQ=="));
        assert_eq!(conv(99999, "(1,2)"), json!("(1,2)"));
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(conv(1082, "2024-02-29"), json!("2024-02-29"));
        assert_eq!(conv(1082, "infinity"), json!("infinity"));
        assert_eq!(conv(1083, "13:14:15.5"), json!("13:14:15.5"));
        assert_eq!(conv(1266, "13:14:15+02"), json!("13:14:15+02:00"));
        assert_eq!(conv(1266, "13:14:15-05:30"), json!("13:14:15-05:30"));
        assert_eq!(conv(1266, "13:14:15+00"), json!("13:14:15Z"));
        assert_eq!(
            conv(1114, "2024-01-02 03:04:05.123456"),
            json!("2024-01-02T03:04:05.123456")
        );
        assert_eq!(
            conv(1184, "2024-01-02 03:04:05.123+00"),
            json!("2024-01-02T03:04:05.123Z")
        );
        assert_eq!(
            conv(1184, "2024-01-02 03:04:05-08"),
            json!("2024-01-02T03:04:05-08:00")
        );
        assert_eq!(conv(1184, "-infinity"), json!("-infinity"));
        assert_eq!(
            conv(1184, "0044-03-15 12:00:00+00 BC"),
            json!("0044-03-15 12:00:00+00 BC")
        );
    }

    #[test]
    fn arrays() {
        assert_eq!(conv(1007, "{1,2,NULL,-4}"), json!([1, 2, null, -4]));
        assert_eq!(conv(1007, "{}"), json!([]));
        assert_eq!(conv(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(conv(1007, "[0:1]={7,8}"), json!([7, 8]));
        assert_eq!(
            conv(
                1009,
                r#"{plain,"with space","with,comma","q\"uote","back\\slash","NULL",NULL}"#
            ),
            json!([
                "plain",
                "with space",
                "with,comma",
                "q\"uote",
                "back\\slash",
                "NULL",
                null
            ])
        );
        assert_eq!(conv(1000, "{t,f}"), json!([true, false]));
        assert_eq!(conv(1231, "{1.10,NaN}"), json!(["1.10", "NaN"]));
        assert_eq!(
            conv(3807, r#"{"{\"a\": 1}","[2]"}"#),
            json!([{"a": 1}, [2]])
        );
        assert_eq!(
            conv(1185, r#"{"2024-01-02 03:04:05+00"}"#),
            json!(["2024-01-02T03:04:05Z"])
        );
        assert_eq!(conv(1001, r#"{"\\x01"}"#), json!(["AQ=="]));
        // Malformed: passes through as text.
        assert_eq!(conv(1007, "{1,2"), json!("{1,2"));
    }

    #[test]
    fn registry_knows_custom_types() {
        let mut reg = TypeRegistry::default();
        assert_eq!(reg.kind(70000), TypeKind::Unknown);
        assert!(!reg.is_known(70000));
        reg.register(70000, TypeKind::Text);
        reg.register(70001, TypeKind::array_of(TypeKind::Text));
        assert!(reg.is_known(70001));
        assert_eq!(
            text_to_json(&reg.kind(70001), b"{happy,sad}"),
            json!(["happy", "sad"])
        );
    }

    /// Renders strings the way Postgres' array_out does: quotes when needed.
    fn pg_array_literal(items: &[Option<String>]) -> String {
        let parts: Vec<String> = items
            .iter()
            .map(|it| match it {
                None => "NULL".to_string(),
                Some(s) => {
                    let needs = s.is_empty()
                        || s.eq_ignore_ascii_case("null")
                        || s.bytes().any(|c| {
                            matches!(c, b'{' | b'}' | b',' | b'"' | b'\\') || pg_isspace(c)
                        });
                    if needs {
                        let esc = s.replace('\\', "\\\\").replace('"', "\\\"");
                        format!("\"{esc}\"")
                    } else {
                        s.clone()
                    }
                }
            })
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    #[test]
    fn integer_texts_are_written_as_their_value() {
        let reg = TypeRegistry::default();
        for oid in [20u32, 21, 23] {
            let kind = reg.kind(oid);
            for text in [
                "0",
                "-0",
                "7",
                "-7",
                "007",
                "-007",
                "123456789012345678",
                "1234567890123456789",
                "9223372036854775807",
                "-9223372036854775808",
                "9223372036854775808",
                "99999999999999999999",
                "-",
                "",
                "1e5",
                " 1",
            ] {
                let mut out = Vec::new();
                JsonText {
                    kind: &kind,
                    text: text.as_bytes(),
                }
                .write_json(&mut out);
                let written: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
                    panic!("{text:?} wrote {:?}: {e}", String::from_utf8_lossy(&out))
                });
                assert_eq!(written, text_to_json(&kind, text.as_bytes()), "{text:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn text_arrays_round_trip(items in proptest::collection::vec(proptest::option::of(".{0,12}"), 0..8)) {
            let lit = pg_array_literal(&items);
            let parsed = parse_array(&lit, b',').unwrap();
            let expected = ArrayNode::List(items.iter().cloned().map(ArrayNode::Element).collect());
            prop_assert_eq!(parsed, expected);
        }

        #[test]
        fn array_parser_never_panics(s in ".{0,40}") {
            let _ = parse_array(&s, b',');
        }

        #[test]
        fn ints_round_trip(v: i64) {
            prop_assert_eq!(conv(20, &v.to_string()), json!(v));
        }

        #[test]
        fn floats_round_trip(v in proptest::num::f64::NORMAL | proptest::num::f64::ZERO) {
            // Postgres prints the shortest text that reads back to the same float, as Rust does.
            prop_assert_eq!(conv(701, &v.to_string()).as_f64(), Some(v));
        }

        #[test]
        fn direct_serialization_matches_value_conversion(
            oid in proptest::sample::select(vec![16u32, 20, 23, 25, 114, 1700, 2950, 3802, 701, 1007, 1114, 1184]),
            s in proptest::prop_oneof![
                ".{0,20}",
                "-?[0-9]{1,19}",
                Just("t".to_string()),
                Just("{\"a\": [1, null]}".to_string()),
                "[0-9T]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,6})?([+-][0-9]{2}(:[0-9]{2})?)?( BC)?",
                ".{8,12} .{8,40}",
            ],
        ) {
            let reg = TypeRegistry::default();
            let kind = reg.kind(oid);
            let mut out = Vec::new();
            JsonText { kind: &kind, text: s.as_bytes() }.write_json(&mut out);
            let reference = text_to_json(&kind, s.as_bytes());
            let direct: Value = serde_json::from_slice(&out).unwrap();
            if matches!(kind, TypeKind::Json) {
                // JSON is copied as it came, spacing and all: equal as values.
                prop_assert_eq!(direct, reference);
            } else {
                // Byte for byte what serde_json writes for the reference (parsing the
                // bytes back would not do: serde_json's float parser may be off by one
                // unit in the last place, so a float would not compare equal).
                prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&reference).unwrap());
            }
        }

        #[test]
        fn conversion_never_panics(oid in proptest::sample::select(vec![16u32, 17, 20, 114, 701, 1007, 1114, 1184, 1266, 3807]), s in ".{0,30}") {
            let _ = conv(oid, &s);
        }
    }
}
