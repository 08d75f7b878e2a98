//! An event's value as Postgres text input for the type a statement parameter has: the
//! inverse of the source's conversion (README, "Values keep their meaning"). Arrays
//! become array literals, ranges and multiranges range literals, composite values row
//! literals, base64 bytea hex, and geometric objects the geometric syntax; each element
//! or field converted by its own type. Anything else goes as its text (strings as they
//! are, numbers as written, objects and arrays as JSON), as before. Pure.

use base64::Engine as _;
use serde_json::{Map, Value};
use tokio_postgres::types::{Field, Kind, Type};

/// `v` as Postgres text input for a parameter of type `ty`; None for null.
pub(super) fn pg_text(v: &Value, ty: &Type) -> Option<String> {
    if v.is_null() {
        return None;
    }
    let mut out = String::new();
    write(&mut out, v, ty);
    Some(out)
}

/// `v` as JSON would have it in text: strings bare, numbers and booleans as written,
/// objects and arrays as JSON.
pub(super) fn plain(out: &mut String, v: &Value) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Null => {}
        other => out.push_str(&other.to_string()),
    }
}

fn write(out: &mut String, v: &Value, ty: &Type) {
    match (ty.kind(), v) {
        (Kind::Domain(base), _) => write(out, v, base),
        (Kind::Array(elem), Value::Array(items)) => array(out, items, elem),
        (Kind::Range(sub), Value::Object(m)) => range(out, m, sub),
        (Kind::Multirange(sub), Value::Array(items)) => {
            out.push('{');
            for (i, r) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match r {
                    Value::Object(m) => range(out, m, sub),
                    other => plain(out, other),
                }
            }
            out.push('}');
        }
        (Kind::Composite(fields), Value::Object(m)) => composite(out, m, fields),
        _ => simple(out, v, ty),
    }
}

/// A base type: bytea from base64, the geometric types from their objects.
fn simple(out: &mut String, v: &Value, ty: &Type) {
    match (ty, v) {
        (&Type::BYTEA, Value::String(s)) => {
            match base64::engine::general_purpose::STANDARD.decode(s) {
                Ok(bytes) => {
                    out.push_str("\\x");
                    for b in bytes {
                        out.push_str(&format!("{b:02x}"));
                    }
                }
                // Not the source's base64: the text as it is.
                Err(_) => out.push_str(s),
            }
        }
        (&Type::POINT, Value::Object(m)) => point(out, m),
        (&Type::LINE, Value::Object(m)) => {
            out.push('{');
            numbers(out, m, &["a", "b", "c"]);
            out.push('}');
        }
        (&Type::CIRCLE, Value::Object(m)) => {
            out.push_str("<(");
            numbers(out, m, &["x", "y"]);
            out.push_str("),");
            numbers(out, m, &["radius"]);
            out.push('>');
        }
        (&Type::LSEG, Value::Array(points)) => points_in(out, points, '[', ']'),
        (&Type::BOX, Value::Array(points)) => points_in(out, points, '(', ')'),
        (&Type::POLYGON, Value::Array(points)) => points_in(out, points, '(', ')'),
        (&Type::PATH, Value::Object(m)) => {
            let closed = m.get("closed").and_then(Value::as_bool).unwrap_or(false);
            let (open, close) = if closed { ('(', ')') } else { ('[', ']') };
            match m.get("points") {
                Some(Value::Array(points)) => points_in(out, points, open, close),
                _ => plain(out, v),
            }
        }
        _ => plain(out, v),
    }
}

fn numbers(out: &mut String, m: &Map<String, Value>, names: &[&str]) {
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if let Some(v) = m.get(*n) {
            plain(out, v);
        }
    }
}

fn point(out: &mut String, m: &Map<String, Value>) {
    out.push('(');
    numbers(out, m, &["x", "y"]);
    out.push(')');
}

/// Points, comma-separated, between `open` and `close` (a box has no brackets of its
/// own: its points are enough).
fn points_in(out: &mut String, points: &[Value], open: char, close: char) {
    out.push(open);
    for (i, p) in points.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match p {
            Value::Object(m) => point(out, m),
            other => plain(out, other),
        }
    }
    out.push(close);
}

/// An item of an array, range or row literal: double-quoted, with `"` and `\`
/// escaped by a backslash (quoted, any type's text is read as it is; an unquoted
/// `NULL` would be null).
fn quoted(out: &mut String, v: &Value, ty: &Type) {
    let mut item = String::new();
    write(&mut item, v, ty);
    out.push('"');
    for c in item.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// An array literal; a JSON array inside is one more dimension.
fn array(out: &mut String, items: &[Value], elem: &Type) {
    // `box` separates array elements by `;`, since its own text has commas.
    let delimiter = if *elem == Type::BOX { ';' } else { ',' };
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(delimiter);
        }
        match item {
            Value::Null => out.push_str("NULL"),
            // A nested array is another dimension, unless an element is itself a list
            // (a box, lseg or polygon is a list of points; a multirange, of ranges).
            Value::Array(inner) if !is_list_type(elem) => array(out, inner, elem),
            other => quoted(out, other, elem),
        }
    }
    out.push('}');
}

/// Whether the source writes a value of `ty` as a JSON array.
fn is_list_type(ty: &Type) -> bool {
    match ty.kind() {
        Kind::Domain(base) => is_list_type(base),
        Kind::Multirange(_) => true,
        _ => [Type::BOX, Type::LSEG, Type::POLYGON].contains(ty),
    }
}

fn range(out: &mut String, m: &Map<String, Value>, sub: &Type) {
    if m.get("empty").and_then(Value::as_bool) == Some(true) {
        out.push_str("empty");
        return;
    }
    let inclusive = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
    out.push(if inclusive("lower_inc") { '[' } else { '(' });
    if let Some(v) = m.get("lower").filter(|v| !v.is_null()) {
        quoted(out, v, sub);
    }
    out.push(',');
    if let Some(v) = m.get("upper").filter(|v| !v.is_null()) {
        quoted(out, v, sub);
    }
    out.push(if inclusive("upper_inc") { ']' } else { ')' });
}

/// A row literal: each field by name, in the type's order; a missing or null field is
/// empty (null).
fn composite(out: &mut String, m: &Map<String, Value>, fields: &[Field]) {
    out.push('(');
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if let Some(v) = m.get(f.name()).filter(|v| !v.is_null()) {
            quoted(out, v, f.type_());
        }
    }
    out.push(')');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(v: Value, ty: &Type) -> Option<String> {
        pg_text(&v, ty)
    }

    #[test]
    fn arrays_become_array_literals_with_every_element_quoted() {
        assert_eq!(
            text(json!([1, 2, null]), &Type::INT4_ARRAY).as_deref(),
            Some(r#"{"1","2",NULL}"#)
        );
        assert_eq!(
            text(
                json!(["a", "b \"c\"", "d,e", "\\", "NULL", ""]),
                &Type::TEXT_ARRAY
            )
            .as_deref(),
            Some(r#"{"a","b \"c\"","d,e","\\","NULL",""}"#)
        );
        assert_eq!(
            text(json!([[1, 2], [3, 4]]), &Type::INT8_ARRAY).as_deref(),
            Some(r#"{{"1","2"},{"3","4"}}"#)
        );
        assert_eq!(text(json!([]), &Type::INT4_ARRAY).as_deref(), Some("{}"));
        assert_eq!(text(json!(null), &Type::INT4_ARRAY), None);
        // JSON elements of a jsonb array are their JSON text.
        assert_eq!(
            text(json!([{"k": "v"}, [1]]), &Type::JSONB_ARRAY).as_deref(),
            Some(r#"{"{\"k\":\"v\"}",{"1"}}"#)
        );
    }

    #[test]
    fn bytea_comes_back_from_base64() {
        assert_eq!(
            text(json!("AQL/"), &Type::BYTEA).as_deref(),
            Some("\\x0102ff")
        );
        assert_eq!(
            text(json!(["AQL/", null]), &Type::BYTEA_ARRAY).as_deref(),
            Some(r#"{"\\x0102ff",NULL}"#)
        );
        // Text that is not base64 goes as it is.
        assert_eq!(text(json!("\\x00"), &Type::BYTEA).as_deref(), Some("\\x00"));
    }

    #[test]
    fn ranges_and_multiranges() {
        let r = json!({"lower": 1, "upper": 5, "lower_inc": true, "upper_inc": false});
        assert_eq!(
            text(r.clone(), &Type::INT4_RANGE).as_deref(),
            Some(r#"["1","5")"#)
        );
        assert_eq!(
            text(
                json!({"lower": null, "upper": "2024-01-01T00:00:00Z", "lower_inc": false, "upper_inc": true}),
                &Type::TSTZ_RANGE
            )
            .as_deref(),
            Some(r#"(,"2024-01-01T00:00:00Z"]"#)
        );
        assert_eq!(
            text(json!({"empty": true}), &Type::NUM_RANGE).as_deref(),
            Some("empty")
        );
        assert_eq!(
            text(json!([r, {"empty": true}]), &Type::INT4MULTI_RANGE).as_deref(),
            Some(r#"{["1","5"),empty}"#)
        );
        assert_eq!(
            text(json!([[r]]), &Type::INT4MULTI_RANGE_ARRAY).as_deref(),
            Some(r#"{"{[\"1\",\"5\")}"}"#)
        );
    }

    #[test]
    fn geometric_objects() {
        let p = |x: f64, y: f64| json!({"x": x, "y": y});
        assert_eq!(
            text(p(1.5, 2.0), &Type::POINT).as_deref(),
            Some("(1.5,2.0)")
        );
        assert_eq!(
            text(json!({"a": 1, "b": -1, "c": 0}), &Type::LINE).as_deref(),
            Some("{1,-1,0}")
        );
        assert_eq!(
            text(json!({"x": 1, "y": 2, "radius": 3}), &Type::CIRCLE).as_deref(),
            Some("<(1,2),3>")
        );
        assert_eq!(
            text(json!([p(0.0, 0.0), p(1.0, 1.0)]), &Type::LSEG).as_deref(),
            Some("[(0.0,0.0),(1.0,1.0)]")
        );
        assert_eq!(
            text(json!([p(3.0, 4.0), p(1.0, 2.0)]), &Type::BOX).as_deref(),
            Some("((3.0,4.0),(1.0,2.0))")
        );
        assert_eq!(
            text(
                json!({"closed": false, "points": [p(0.0, 0.0), p(1.0, 0.0)]}),
                &Type::PATH
            )
            .as_deref(),
            Some("[(0.0,0.0),(1.0,0.0)]")
        );
        // Boxes in an array: `;` between them, each a list of points, not a dimension.
        assert_eq!(
            text(
                json!([[p(1.0, 1.0), p(0.0, 0.0)], [p(2.0, 2.0), p(0.0, 0.0)]]),
                &Type::BOX_ARRAY
            )
            .as_deref(),
            Some(r#"{"((1.0,1.0),(0.0,0.0))";"((2.0,2.0),(0.0,0.0))"}"#)
        );
    }

    #[test]
    fn composites_by_field_name_in_the_types_order() {
        let ty = Type::new(
            "pair".into(),
            0,
            Kind::Composite(vec![
                Field::new("a".into(), Type::TEXT),
                Field::new("b".into(), Type::INT4_ARRAY),
                Field::new("c".into(), Type::INT4),
            ]),
            "public".into(),
        );
        assert_eq!(
            text(json!({"b": [1, 2], "a": "x \"y\"", "c": null}), &ty).as_deref(),
            Some(r#"("x \"y\"","{\"1\",\"2\"}",)"#)
        );
        let arr = Type::new("_pair".into(), 0, Kind::Array(ty), "public".into());
        assert_eq!(
            text(json!([{"a": "", "b": [], "c": 3}]), &arr).as_deref(),
            Some(r#"{"(\"\",\"{}\",\"3\")"}"#)
        );
    }

    #[test]
    fn other_types_take_the_text_as_before() {
        assert_eq!(text(json!("x"), &Type::TEXT).as_deref(), Some("x"));
        assert_eq!(text(json!(1.5), &Type::FLOAT8).as_deref(), Some("1.5"));
        assert_eq!(text(json!(true), &Type::BOOL).as_deref(), Some("true"));
        assert_eq!(
            text(json!({"k": [1]}), &Type::JSONB).as_deref(),
            Some(r#"{"k":[1]}"#)
        );
        // A list for a text parameter stays JSON.
        assert_eq!(text(json!([1, 2]), &Type::TEXT).as_deref(), Some("[1,2]"));
        let domain = Type::new(
            "pos".into(),
            0,
            Kind::Domain(Type::INT4_ARRAY),
            "public".into(),
        );
        assert_eq!(text(json!([1]), &domain).as_deref(), Some(r#"{"1"}"#));
    }
}
