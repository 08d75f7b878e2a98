//! A tuple's columns as a JSON object, written straight from the wire bytes.

use super::*;
use crate::events::rules::{OutColumn, OversizedPlan};
use crate::postgres::pgoutput::{ColumnValue, Tuple};
use crate::postgres::values::{JsonText, TypeKind};

/// The columns of a tuple, written as a JSON object straight from the wire bytes.
/// `cols` says which columns under which names; `fill_from` supplies unchanged TOAST
/// values from a full old row. Unchanged TOAST values that cannot be filled are left
/// out of the object and named in `unchanged_toast`, so a consumer never mistakes them
/// for NULL. `shrink` leaves out or cuts the columns an oversized plan names.
pub(super) struct RowJson<'a> {
    pub(super) table: &'a Table,
    pub(super) tuple: &'a Tuple,
    pub(super) cols: &'a [OutColumn],
    pub(super) fill_from: Option<&'a Tuple>,
    pub(super) shrink: Option<Shrink<'a>>,
}

impl<'a> RowJson<'a> {
    fn value(&self, i: usize) -> &'a ColumnValue {
        let value = &self.tuple.0[i];
        if matches!(value, ColumnValue::UnchangedToast)
            && let Some(old) = self.fill_from.and_then(|t| t.0.get(i))
            && !matches!(old, ColumnValue::UnchangedToast)
        {
            return old;
        }
        value
    }

    pub(super) fn unchanged_columns(&self) -> Vec<&'a str> {
        self.cols
            .iter()
            .filter(|c| matches!(self.value(c.index), ColumnValue::UnchangedToast))
            .map(|c| c.name.as_str())
            .collect()
    }

    /// The columns whose value is the JSON literal `null` in a `json` or `jsonb` column:
    /// written as `null`, as SQL NULL is, so the event names them in `json_null`.
    pub(super) fn json_null_columns(&self) -> Vec<&'a str> {
        self.cols
            .iter()
            .filter(|c| {
                matches!(self.table.columns[c.index].kind, TypeKind::Json) && {
                    let value = self.value(c.index);
                    self.shrink_of(c.index, value).is_none()
                        && matches!(value, ColumnValue::Text(b) if b.trim_ascii() == b"null")
                }
            })
            .map(|c| c.name.as_str())
            .collect()
    }

    /// What shrinking does to column `i`: None = untouched, Some(None) = omitted,
    /// Some(Some(n)) = cut to `n` bytes.
    fn shrink_of(&self, i: usize, value: &ColumnValue) -> Option<Option<usize>> {
        let s = self.shrink?;
        match s.plan {
            OversizedPlan::Fail => None,
            OversizedPlan::Omit(cols) => cols.contains(&i).then_some(None),
            OversizedPlan::Truncate(cols) if cols.contains(&i) => {
                let kind = &self.table.columns[i].kind;
                match value {
                    ColumnValue::Text(b) if matches!(kind, TypeKind::Text | TypeKind::Unknown) => {
                        (b.len() > s.max_value_bytes).then_some(Some(s.max_value_bytes))
                    }
                    ColumnValue::Text(_) | ColumnValue::Binary(_) => Some(None),
                    _ => None,
                }
            }
            OversizedPlan::Truncate(_) => None,
        }
    }

    /// Names of the columns shrinking changed.
    pub(super) fn shrunk(&self) -> Vec<&'a str> {
        self.cols
            .iter()
            .filter(|c| self.shrink_of(c.index, self.value(c.index)).is_some())
            .map(|c| c.name.as_str())
            .collect()
    }
}

/// Cuts `b` to at most `n` bytes on a UTF-8 character boundary.
pub(super) fn cut(b: &[u8], n: usize) -> &[u8] {
    let mut end = n.min(b.len());
    while end > 0 && end < b.len() && (b[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    &b[..end]
}

impl RowJson<'_> {
    /// The row as a JSON object: `{"column": value, ...}` in the plan's order.
    pub(super) fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for c in self.cols {
            let value = self.value(c.index);
            match (value, self.shrink_of(c.index, value)) {
                (_, Some(None)) | (ColumnValue::UnchangedToast, _) => continue,
                (ColumnValue::Text(b), shrink) => {
                    out.extend_from_slice(&c.json_key);
                    let text = match shrink {
                        Some(Some(n)) => cut(b, n),
                        _ => b,
                    };
                    let kind = &self.table.columns[c.index].kind;
                    JsonText { kind, text }.write_json(out);
                }
                (ColumnValue::Null, _) => {
                    out.extend_from_slice(&c.json_key);
                    out.extend_from_slice(b"null");
                }
                (ColumnValue::Binary(b), _) => {
                    use base64::Engine as _;
                    out.extend_from_slice(&c.json_key);
                    // The base64 alphabet needs no escaping.
                    out.push(b'"');
                    let encoded = base64::engine::general_purpose::STANDARD.encode(b);
                    out.extend_from_slice(encoded.as_bytes());
                    out.push(b'"');
                }
            }
            out.push(b',');
        }
        // The comma after the last column closes the object instead.
        match out.last_mut() {
            Some(last) if *last == b',' => *last = b'}',
            _ => out.push(b'}'),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{change, decode, orders, text, tx};
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    proptest::proptest! {
        /// Whatever bytes a row holds, the written `data` is valid JSON whose values are
        /// what `text_to_json` makes of each column (the reference conversion).
        #[test]
        fn any_row_bytes_are_written_as_the_reference_conversion(
            values in proptest::collection::vec(
                proptest::option::of(proptest::prop_oneof![
                    proptest::collection::vec(proptest::num::u8::ANY, 0..24),
                    "-?[0-9]{1,20}".prop_map(String::into_bytes),
                    "[\"\\\\\u{0}-\u{1f}a-z\u{e9}]{0,24}".prop_map(String::into_bytes),
                ]),
                6,
            ),
        ) {
            let table = {
                let mut t = orders();
                t.replica_identity = ReplicaIdentity::Full;
                t
            };
            let tuple = |vals: &[Option<Vec<u8>>]| {
                Tuple(vals.iter().map(|v| match v {
                    Some(b) => ColumnValue::Text(Bytes::copy_from_slice(b)),
                    None => ColumnValue::Null,
                }).collect())
            };
            let (old, new) = (tuple(&values[..3]), tuple(&values[3..]));
            let ev = map_change(&tx(), 0, &table, &change(Operation::Update, Some(&old), Some(&new)), None)
                .unwrap()
                .unwrap();
            let data = decode(&ev)["data"].clone();
            let expect = |vals: &[Option<Vec<u8>>]| {
                let mut m = serde_json::Map::new();
                for (col, v) in table.columns.iter().zip(vals) {
                    let v = match v {
                        Some(b) => crate::postgres::values::text_to_json(&col.kind, b),
                        None => Value::Null,
                    };
                    m.insert(col.name.clone(), v);
                }
                Value::Object(m)
            };
            prop_assert_eq!(&data["before"], &expect(&values[..3]));
            prop_assert_eq!(&data["after"], &expect(&values[3..]));
            prop_assert_eq!(&data["op"], &json!("update"));
        }
    }

    /// `orders` with a `json` and a `jsonb` column.
    fn orders_with_json() -> Table {
        let mut t = orders();
        for (name, oid) in [("doc", 3802), ("raw", 114)] {
            t.columns.push(TableColumn {
                name: name.into(),
                type_oid: oid,
                kind: TypeKind::Json,
            });
        }
        t.plan = TablePlan::default_for(
            &[
                ("id", 23),
                ("status", 25),
                ("note", 25),
                ("doc", 3802),
                ("raw", 114),
            ],
            "orders",
        );
        t
    }

    #[test]
    fn a_json_null_is_named_apart_from_sql_null() {
        let old = Tuple(vec![
            text("7"),
            ColumnValue::Null,
            ColumnValue::Null,
            ColumnValue::Null,
            text("null"),
        ]);
        let new = Tuple(vec![
            text("7"),
            text("null"),
            ColumnValue::Null,
            text("null"),
            text(" \n null\t"),
        ]);
        let full = map_change(
            &tx(),
            0,
            &orders_with_json(),
            &change(Operation::Update, Some(&old), Some(&new)),
            None,
        )
        .unwrap()
        .unwrap();
        let v = decode(&full);
        assert_eq!(
            v["data"]["after"],
            json!({"id": 7, "status": "null", "note": null, "doc": null, "raw": null})
        );
        // A text "null" and SQL NULLs are not named; JSON nulls are, whatever their spacing.
        assert_eq!(v["data"]["json_null"], json!(["doc", "raw"]));
        assert_eq!(v["data"]["before_json_null"], json!(["raw"]));

        let keyed = map_change(
            &tx(),
            0,
            &orders_with_json(),
            &change(Operation::Update, None, Some(&new)),
            None,
        )
        .unwrap()
        .unwrap();
        let v = decode(&keyed);
        assert_eq!(v["data"]["json_null"], json!(["doc", "raw"]));
        assert!(v["data"].get("before_json_null").is_none());

        // Other JSON values, and none at all, name nothing.
        let plain = Tuple(vec![
            text("8"),
            text("x"),
            ColumnValue::Null,
            text("{\"a\": null}"),
            text("\"null\""),
        ]);
        let ev = map_change(
            &tx(),
            0,
            &orders_with_json(),
            &change(Operation::Insert, None, Some(&plain)),
            None,
        )
        .unwrap()
        .unwrap();
        let v = decode(&ev);
        assert_eq!(v["data"]["after"]["raw"], json!("null"));
        assert!(v["data"].get("json_null").is_none());
    }
}
