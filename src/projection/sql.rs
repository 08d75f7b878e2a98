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
pub(super) fn typed_param(event: &serde_json::Value, path: &EventPath, ty: &Type) -> TextParam {
    TextParam(lookup(event, path).and_then(|v| pg_text::pg_text(v, ty)))
}

fn lookup<'a>(event: &'a serde_json::Value, path: &EventPath) -> Option<&'a serde_json::Value> {
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

/// The SQL a handler runs, and the event paths of its parameters.
pub fn handler_sql(action: &Action) -> (String, Vec<EventPath>) {
    match action {
        Action::Sql { sql, params } => (sql.clone(), params.clone()),
        Action::Upsert {
            table,
            key,
            columns,
        } => {
            let cols: Vec<String> = columns.iter().map(|(c, _)| quote_ident(c)).collect();
            let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
            let keys: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
            let updates: Vec<String> = columns
                .iter()
                .filter(|(c, _)| !key.contains(c))
                .map(|(c, _)| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
                .collect();
            let on_conflict = if updates.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            (
                format!(
                    "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {on_conflict}",
                    qualified_table(table),
                    cols.join(", "),
                    placeholders.join(", "),
                    keys.join(", ")
                ),
                columns.iter().map(|(_, p)| p.clone()).collect(),
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
                key.iter().map(|(_, p)| p.clone()).collect(),
            )
        }
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
            ],
        });
        assert_eq!(
            sql,
            "INSERT INTO \"rm\".\"orders\" (\"id\", \"status\") VALUES ($1, $2) ON CONFLICT (\"id\") DO UPDATE SET \"status\" = EXCLUDED.\"status\""
        );
        assert_eq!(params.len(), 2);
        let (sql, _) = handler_sql(&Action::Delete {
            table: "orders".into(),
            key: vec![("id".into(), vec!["data".into(), "key".into(), "id".into()])],
        });
        assert_eq!(sql, "DELETE FROM \"orders\" WHERE \"id\" = $1");
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
