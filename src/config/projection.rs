//! `[[projection]]` sections: targets, handlers, KV key templates.

use super::*;

impl Validator<'_> {
    pub(super) fn projection(
        &mut self,
        prefix: &str,
        p: &Spanned<RawProjection>,
        sources: &[SourceConfig],
    ) -> Option<ProjectionConfig> {
        let p = p.get_ref();
        let name = p.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            self.issue(
                &p.name,
                format!("{prefix}.name"),
                "use lowercase letters, digits and '_': the name keys its checkpoint and consumer",
            );
        }
        let source = sources.iter().find(|s| &s.name == p.source.get_ref());
        let Some(source) = source else {
            self.issue(
                &p.source,
                format!("{prefix}.source"),
                format!("no [[source]] is named {:?}", p.source.get_ref()),
            );
            return None;
        };
        // A dead letter the source's own stream captures would be stored as one of
        // the source's events: a write into a stream only the source may write, which
        // breaks its sequence chain and stops the source.
        if let Some(d) = &p.dead_letter
            && let Some(covering) = source
                .stream
                .subjects
                .iter()
                .find(|s| crate::jetstream::provision::subject_covers(s, d.get_ref()))
        {
            self.issue(
                d,
                format!("{prefix}.dead_letter"),
                format!(
                    "{:?} is captured by the source's stream {:?} (subject {covering:?}), which only the source may write: use a subject outside it, e.g. \"deadletter.{}\", with a stream of its own",
                    d.get_ref(),
                    source.stream.name,
                    p.name.get_ref()
                ),
            );
        }
        let target = match (&p.postgres, &p.kv_bucket) {
            (Some(pg), None) => Target::Postgres(self.postgres(prefix, pg.get_ref().clone())),
            (None, Some(b)) => {
                let bucket = b.get_ref().clone();
                if bucket.is_empty()
                    || !bucket
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    self.issue(
                        b,
                        format!("{prefix}.kv_bucket"),
                        "a KV bucket name has letters, digits, '_' and '-'",
                    );
                }
                Target::Kv { bucket }
            }
            _ => {
                self.issue(
                    &p.name,
                    format!("{prefix}.postgres"),
                    "give the read model's target: a [projection.postgres] section, or kv_bucket = \"NAME\"",
                );
                return None;
            }
        };
        let kv_target = matches!(target, Target::Kv { .. });
        let mut handlers = Vec::new();
        for (i, h) in p.on.iter().enumerate() {
            let key = format!("{prefix}.on[{i}]");
            let h = h.get_ref();
            let types: Vec<String> = match h.types.get_ref() {
                toml::Value::String(t) => vec![t.clone()],
                toml::Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            if types.is_empty() {
                self.issue(
                    &h.types,
                    format!("{key}.type"),
                    "name the event type(s): type = \"OrderPlaced\" or a list",
                );
            }
            let action = match (&h.sql, &h.upsert, &h.delete) {
                _ if h.kv.is_some() || kv_target => self.kv_handler(&key, h, kv_target),
                (Some(sql), None, None) => {
                    let params = h
                        .params
                        .as_ref()
                        .map(|ps| {
                            ps.get_ref()
                                .iter()
                                .map(|t| self.path(ps, &format!("{key}.params"), t))
                                .collect()
                        })
                        .unwrap_or_default();
                    Some(Action::Sql {
                        sql: sql.get_ref().clone(),
                        params,
                    })
                }
                (None, Some(table), None) => {
                    let keys: Vec<String> = match h.key.as_ref().map(|k| k.get_ref()) {
                        Some(toml::Value::Array(a)) => a
                            .iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect(),
                        _ => Vec::new(),
                    };
                    let columns = self.paths(
                        h.columns.as_ref(),
                        &format!("{key}.columns"),
                        "a column's value is a path, like \"data.after.id\"",
                    );
                    if keys.is_empty() || columns.is_empty() {
                        self.issue(table, format!("{key}.upsert"), "an upsert needs key = [\"column\", ...] and columns = { column = \"data.after.x\", ... }");
                    }
                    for k in &keys {
                        if !columns.iter().any(|(c, _)| c == k) {
                            self.issue(
                                table,
                                format!("{key}.key"),
                                format!("key column {k:?} is not in columns"),
                            );
                        }
                    }
                    Some(Action::Upsert {
                        table: table.get_ref().clone(),
                        key: keys,
                        columns,
                    })
                }
                (None, None, Some(table)) => {
                    let mut keys = Vec::new();
                    match h.key.as_ref() {
                        Some(k) => {
                            match k.get_ref() {
                                toml::Value::Table(t) => {
                                    for (col, v) in t {
                                        match v.as_str() {
                                        Some(path) => {
                                            let path = self.path(k, &format!("{key}.key.{col}"), path);
                                            keys.push((col.clone(), path));
                                        }
                                        None => self.issue(k, format!("{key}.key.{col}"), "a key column's value is a path, like \"data.key.id\""),
                                    }
                                    }
                                }
                                _ => self.issue(
                                    k,
                                    format!("{key}.key"),
                                    "a delete's key is a table: key = { id = \"data.key.id\" }",
                                ),
                            }
                        }
                        None => self.issue(
                            table,
                            format!("{key}.key"),
                            "a delete needs key = { column = \"data.key.x\" }",
                        ),
                    }
                    Some(Action::Delete {
                        table: table.get_ref().clone(),
                        key: keys,
                    })
                }
                _ => {
                    self.issue(&h.types, key.clone(), "a handler does one thing: sql = \"...\" (with params), upsert = \"table\", or delete = \"table\"");
                    None
                }
            };
            if let Some(action) = action {
                handlers.push(Handler { types, action });
            }
        }
        if handlers.is_empty() && p.on.is_empty() {
            self.issue(
                &p.name,
                format!("{prefix}.on"),
                "add at least one [[projection.on]] handler",
            );
        }
        let subjects = p
            .subjects
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| vec![format!("{}.>", source.name)]);
        let tables = match &p.tables {
            Some(t) => t.get_ref().clone(),
            None => {
                let mut t: Vec<String> = Vec::new();
                for h in &handlers {
                    if let Action::Upsert { table, .. } | Action::Delete { table, .. } = &h.action
                        && !t.contains(table)
                    {
                        t.push(table.clone());
                    }
                }
                t
            }
        };
        Some(ProjectionConfig {
            name,
            source: source.name.clone(),
            stream: source.stream.name.clone(),
            subjects,
            dead_letter: p.dead_letter.as_ref().map(|d| d.get_ref().clone()),
            target,
            handlers,
            tables,
        })
    }

    pub(super) fn kv_handler(
        &mut self,
        key: &str,
        h: &RawHandler,
        kv_target: bool,
    ) -> Option<Action> {
        let Some(op_at) = &h.kv else {
            self.issue(
                &h.types,
                key.to_string(),
                "a KV projection's handler says kv = \"put\", \"merge\", \"delete\" or \"clear\"",
            );
            return None;
        };
        if !kv_target {
            self.issue(
                op_at,
                format!("{key}.kv"),
                "kv handlers need kv_bucket = \"NAME\" on the projection",
            );
            return None;
        }
        let op = match op_at.get_ref().as_str() {
            "put" => KvOp::Put,
            "merge" => KvOp::Merge,
            "delete" => KvOp::Delete,
            "clear" => KvOp::Clear,
            other => {
                self.issue(
                    op_at,
                    format!("{key}.kv"),
                    format!(
                        "{other:?} is not a KV operation: use \"put\", \"merge\", \"delete\" or \"clear\""
                    ),
                );
                return None;
            }
        };
        let template = match &h.key {
            Some(k) => match k.get_ref() {
                toml::Value::String(t) => t.clone(),
                _ => {
                    self.issue(
                        k,
                        format!("{key}.key"),
                        "a KV key is a template, like \"order.{data.after.id}\"",
                    );
                    return None;
                }
            },
            // A clear without a key clears every key.
            None if op == KvOp::Clear => String::new(),
            None => {
                self.issue(
                    &h.types,
                    format!("{key}.key"),
                    "a KV handler needs key = \"order.{data.after.id}\"",
                );
                return None;
            }
        };
        let mut parts = Vec::new();
        let mut rest = template.as_str();
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(KeyPart::Lit(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                self.issue(
                    &h.types,
                    format!("{key}.key"),
                    format!("unclosed '{{' in {template:?}"),
                );
                return None;
            };
            let path = &rest[open + 1..open + close];
            parts.push(KeyPart::Path(path.split('.').map(str::to_string).collect()));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(KeyPart::Lit(rest.to_string()));
        }
        let value = self.paths(
            h.value.as_ref(),
            &format!("{key}.value"),
            "a field's value is a path, like \"data.after.status\"",
        );
        if op == KvOp::Clear {
            if parts.iter().any(|p| matches!(p, KeyPart::Path(_))) || !value.is_empty() {
                self.issue(
                    op_at,
                    format!("{key}.key"),
                    "a clear deletes the keys that start with its key, a prefix without paths (key = \"order.\"), and takes no value",
                );
            }
        } else if op != KvOp::Delete && value.is_empty() {
            self.issue(
                op_at,
                format!("{key}.value"),
                "put and merge need value = { field = \"data.after.x\", ... }",
            );
        }
        Some(Action::Kv {
            op,
            key: parts,
            value,
        })
    }
}
