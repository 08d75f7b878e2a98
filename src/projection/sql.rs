//! Handlers as SQL: statements built from `sql`, `upsert` and `delete` handlers, and
//! event values bound as text parameters.

use super::*;

/// A statement parameter sent as text, so Postgres parses it with the column type's
/// input function (numbers, numeric, timestamps, json, arrays alike).
#[derive(Debug)]
pub(super) struct TextParam(pub(super) Option<String>);

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// The value at `path` in an event, as a statement parameter: strings as they are,
/// numbers and booleans as their text, objects and arrays as JSON, null and missing
/// as NULL.
pub(super) fn param(event: &serde_json::Value, path: &EventPath) -> TextParam {
    TextParam(lookup(event, path).filter(|v| !v.is_null()).map(|v| {
        let mut s = String::new();
        pg_text::plain(&mut s, v);
        s
    }))
}

/// The value at `path` as Postgres text input for a parameter of type `ty` (arrays,
/// ranges, composite, bytea and geometric values in Postgres syntax; see `pg_text`).
/// A column the event names in `data.json_null` (or `data.before_json_null`) holds the
/// JSON literal `null`, not SQL NULL, and is written as such.
pub(super) fn typed_param(event: &serde_json::Value, path: &EventPath, ty: &Type) -> TextParam {
    match lookup(event, path) {
        Some(serde_json::Value::Null) if json_null(event, path) => TextParam(Some("null".into())),
        v => TextParam(v.and_then(|v| pg_text::pg_text(v, ty))),
    }
}

/// Whether `path` names a column of `data.after` listed in `data.json_null`, or of
/// `data.before` listed in `data.before_json_null`: a `json`/`jsonb` value that is the
/// JSON literal `null`.
pub(super) fn json_null(event: &serde_json::Value, path: &EventPath) -> bool {
    let [data, row, column] = path.as_slice() else {
        return false;
    };
    let list = match row.as_str() {
        "after" => "json_null",
        "before" => "before_json_null",
        _ => return false,
    };
    data == "data"
        && event["data"][list]
            .as_array()
            .is_some_and(|l| l.iter().any(|c| c.as_str() == Some(column)))
}

/// A statement parameter of a handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// The value at a path of the event.
    Value(EventPath),
    /// Whether the event leaves the value at a path out (see `left_out`): an upsert
    /// keeps the read model's value then, rather than writing NULL over it.
    LeftOut(EventPath),
}

/// Whether `path` names a column value the event leaves out of `data.after`: an
/// unchanged TOASTed value Postgres did not send (listed in `data.unchanged_toast`),
/// or an oversized one omitted (`data.omitted`). Missing, it is not NULL: the row
/// still holds it.
pub(super) fn left_out(event: &serde_json::Value, path: &EventPath) -> bool {
    let [data, after, column, ..] = path.as_slice() else {
        return false;
    };
    data == "data"
        && after == "after"
        && ["unchanged_toast", "omitted"].iter().any(|list| {
            event["data"][list]
                .as_array()
                .is_some_and(|l| l.iter().any(|c| c.as_str() == Some(column)))
        })
}

/// The value at `path` in an event; None when there is none (a JSON null is a value).
pub(super) fn lookup<'a>(
    event: &'a serde_json::Value,
    path: &EventPath,
) -> Option<&'a serde_json::Value> {
    let mut v = event;
    for p in path {
        v = match v {
            serde_json::Value::Object(m) => m.get(p)?,
            serde_json::Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

pub(super) fn qualified_table(name: &str) -> String {
    name.split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// The SQL a handler runs, and its parameters. An upsert keeps a column's value when
/// the event leaves it out (an unchanged TOASTed value): each such column's update is
/// `CASE WHEN <left out> THEN <the row's value> ELSE EXCLUDED.<column> END`.
pub fn handler_sql(action: &Action) -> (String, Vec<Param>) {
    let values = |paths: &[(String, EventPath)]| -> Vec<Param> {
        paths.iter().map(|(_, p)| Param::Value(p.clone())).collect()
    };
    match action {
        Action::Sql { sql, params } => (
            sql.clone(),
            params.iter().cloned().map(Param::Value).collect(),
        ),
        Action::Upsert {
            table,
            key,
            columns,
        } => {
            let cols: Vec<String> = columns.iter().map(|(c, _)| quote_ident(c)).collect();
            let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
            let keys: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
            let mut params = values(columns);
            let mut updates = Vec::new();
            for (c, path) in columns.iter().filter(|(c, _)| !key.contains(c)) {
                let c = quote_ident(c);
                if path.len() >= 3 && path[0] == "data" && path[1] == "after" {
                    params.push(Param::LeftOut(path.clone()));
                    updates.push(format!(
                        "{c} = CASE WHEN ${}::boolean THEN tidemark_row.{c} ELSE EXCLUDED.{c} END",
                        params.len()
                    ));
                } else {
                    updates.push(format!("{c} = EXCLUDED.{c}"));
                }
            }
            let on_conflict = if updates.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            (
                format!(
                    "INSERT INTO {} AS tidemark_row ({}) VALUES ({}) ON CONFLICT ({}) {on_conflict}",
                    qualified_table(table),
                    cols.join(", "),
                    placeholders.join(", "),
                    keys.join(", ")
                ),
                params,
            )
        }
        // KV handlers run no SQL.
        Action::Kv { .. } => (String::new(), Vec::new()),
        Action::Delete { table, key } => {
            let conds: Vec<String> = key
                .iter()
                .enumerate()
                .map(|(i, (c, _))| format!("{} = ${}", quote_ident(c), i + 1))
                .collect();
            (
                format!(
                    "DELETE FROM {} WHERE {}",
                    qualified_table(table),
                    conds.join(" AND ")
                ),
                values(key),
            )
        }
    }
}

/// An upsert's key, as the event has it before and after an UPDATE that changes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MovedKey {
    /// `DELETE FROM <table> WHERE <key> = <the old key>`.
    pub sql: String,
    /// Where the event holds each key column's new value, and its old one.
    pub new: Vec<EventPath>,
    pub old: Vec<EventPath>,
}

/// For an upsert whose key comes from the row (`data.after.<column>` or
/// `data.key.<column>`): the statement that removes the row under the old key when an
/// UPDATE changes the key (its event's `before` holds the old key). Without it the
/// read model would keep the row under both keys.
pub fn moved_key_sql(action: &Action) -> Option<MovedKey> {
    let Action::Upsert {
        table,
        key,
        columns,
    } = action
    else {
        return None;
    };
    let mut new = Vec::new();
    let mut old = Vec::new();
    for k in key {
        let (_, path) = columns.iter().find(|(c, _)| c == k)?;
        match path.as_slice() {
            [data, part, column] if data == "data" && (part == "after" || part == "key") => {
                new.push(path.clone());
                old.push(vec![data.clone(), "before".to_string(), column.clone()]);
            }
            _ => return None,
        }
    }
    let conds: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1))
        .collect();
    Some(MovedKey {
        sql: format!(
            "DELETE FROM {} WHERE {}",
            qualified_table(table),
            conds.join(" AND ")
        ),
        new,
        old,
    })
}

impl MovedKey {
    /// Whether the event changes the key: its `before` holds every key column, and
    /// one of them differs from the new value.
    pub(super) fn moved(&self, event: &serde_json::Value) -> bool {
        let mut changed = false;
        for (new, old) in self.new.iter().zip(&self.old) {
            match (lookup(event, old), lookup(event, new)) {
                (Some(o), n) if !o.is_null() => changed |= Some(o) != n,
                _ => return false,
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn upsert_and_delete_sql() {
        let (sql, params) = handler_sql(&Action::Upsert {
            table: "rm.orders".into(),
            key: vec!["id".into()],
            columns: vec![
                (
                    "id".into(),
                    vec!["data".into(), "after".into(), "id".into()],
                ),
                (
                    "status".into(),
                    vec!["data".into(), "after".into(), "status".into()],
                ),
                ("kind".into(), vec!["type".into()]),
            ],
        });
        assert_eq!(
            sql,
            "INSERT INTO \"rm\".\"orders\" AS tidemark_row (\"id\", \"status\", \"kind\") VALUES ($1, $2, $3) ON CONFLICT (\"id\") DO UPDATE SET \"status\" = CASE WHEN $4::boolean THEN tidemark_row.\"status\" ELSE EXCLUDED.\"status\" END, \"kind\" = EXCLUDED.\"kind\""
        );
        let path = |p: &str| p.split('.').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            params,
            vec![
                Param::Value(path("data.after.id")),
                Param::Value(path("data.after.status")),
                Param::Value(path("type")),
                Param::LeftOut(path("data.after.status")),
            ]
        );
        let (sql, _) = handler_sql(&Action::Delete {
            table: "orders".into(),
            key: vec![("id".into(), vec!["data".into(), "key".into(), "id".into()])],
        });
        assert_eq!(sql, "DELETE FROM \"orders\" WHERE \"id\" = $1");
    }

    #[test]
    fn an_upsert_removes_the_row_under_a_key_an_update_changed() {
        let path = |p: &str| p.split('.').map(str::to_string).collect::<Vec<_>>();
        let upsert = |id: &str| Action::Upsert {
            table: "orders".into(),
            key: vec!["id".into(), "region".into()],
            columns: vec![
                ("id".into(), path(id)),
                ("region".into(), path("data.key.region")),
                ("total".into(), path("data.after.total")),
            ],
        };
        let m = moved_key_sql(&upsert("data.after.id")).unwrap();
        assert_eq!(
            m.sql,
            "DELETE FROM \"orders\" WHERE \"id\" = $1 AND \"region\" = $2"
        );
        assert_eq!(
            m.old,
            vec![path("data.before.id"), path("data.before.region")]
        );
        let event = |before: serde_json::Value| {
            json!({"data": {"key": {"id": 2, "region": "eu"}, "before": before,
                            "after": {"id": 2, "region": "eu", "total": 5}}})
        };
        assert!(m.moved(&event(json!({"id": 1, "region": "eu"}))));
        assert!(m.moved(&event(json!({"id": 2, "region": "us"}))));
        // Not moved: the same key (a full old row), no old row, or a part missing.
        assert!(!m.moved(&event(json!({"id": 2, "region": "eu", "total": 4}))));
        assert!(!m.moved(&event(json!(null))));
        assert!(!m.moved(&event(json!({"id": 1}))));
        // A key taken from elsewhere than the row: nothing to compare.
        assert_eq!(moved_key_sql(&upsert("type")), None);
    }

    #[test]
    fn values_left_out_of_after_are_told_from_null() {
        let e = json!({"data": {"after": {"id": 1, "n": null}, "unchanged_toast": ["big"], "omitted": ["body"]}});
        let left = |p: &str| left_out(&e, &p.split('.').map(str::to_string).collect());
        assert!(left("data.after.big"));
        assert!(left("data.after.body"));
        assert!(left("data.after.big.inner"));
        assert!(!left("data.after.n"));
        assert!(!left("data.after.id"));
        assert!(!left("data.before.big"));
        assert!(!left("data.big"));
        assert!(!left_out(
            &json!("x"),
            &vec!["data".into(), "after".into(), "big".into()]
        ));
    }

    #[test]
    fn a_json_null_is_written_as_json_not_as_sql_null() {
        let e = json!({"data": {
            "before": {"doc": null, "raw": null},
            "after": {"doc": null, "raw": null, "n": null},
            "json_null": ["doc"],
            "before_json_null": ["raw"]
        }});
        let p = |path: &str| {
            typed_param(
                &e,
                &path.split('.').map(str::to_string).collect(),
                &Type::JSONB,
            )
            .0
        };
        assert_eq!(p("data.after.doc").as_deref(), Some("null"));
        assert_eq!(p("data.after.raw"), None);
        assert_eq!(p("data.after.n"), None);
        assert_eq!(p("data.before.raw").as_deref(), Some("null"));
        assert_eq!(p("data.before.doc"), None);
        // Only a null is: a listed column with a value keeps it.
        let e = json!({"data": {"after": {"doc": {"a": 1}}, "json_null": ["doc"]}});
        let v = typed_param(
            &e,
            &vec!["data".into(), "after".into(), "doc".into()],
            &Type::JSONB,
        );
        assert_eq!(v.0.as_deref(), Some("{\"a\":1}"));
    }

    #[test]
    fn params_take_values_as_text() {
        let e = json!({"data": {"after": {"n": 5, "s": "x", "b": true, "o": {"k": 1}, "z": null}}});
        let p = |path: &str| param(&e, &path.split('.').map(str::to_string).collect()).0;
        assert_eq!(p("data.after.n").as_deref(), Some("5"));
        assert_eq!(p("data.after.s").as_deref(), Some("x"));
        assert_eq!(p("data.after.b").as_deref(), Some("true"));
        assert_eq!(p("data.after.o").as_deref(), Some("{\"k\":1}"));
        assert_eq!(p("data.after.z"), None);
        assert_eq!(p("data.after.missing"), None);
    }
}
