//! `[[source.table]]`, `[[source.outbox]]` and `[[source.message]]`: how rows and
//! messages become domain events.

use super::*;

impl Validator<'_> {
    pub(super) fn template(
        &mut self,
        at: &Spanned<String>,
        key: &str,
        source: &str,
        allowed: &[&str],
    ) -> Option<Template> {
        match Template::parse(at.get_ref(), allowed) {
            Ok(t) if t.starts_with_source(source) => Some(t),
            Ok(_) => {
                self.issue(
                    at,
                    key,
                    format!(
                        "the subject must start with {{source}} or \"{source}.\", so the source's stream captures it"
                    ),
                );
                None
            }
            Err(e) => {
                self.issue(at, key, e);
                None
            }
        }
    }

    pub(super) fn event_type(&mut self, at: &Spanned<String>, key: &str) -> Option<String> {
        let t = at.get_ref();
        if t.is_empty() || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
            self.issue(at, key, "an event type is a non-empty name without spaces");
            return None;
        }
        Some(t.clone())
    }

    pub(super) fn choice(&mut self, v: &Spanned<toml::Value>, key: &str) -> Option<Choice> {
        match v.get_ref() {
            toml::Value::String(t) => {
                let at = Spanned::new(v.span(), t.clone());
                self.event_type(&at, key).map(Choice::Event)
            }
            toml::Value::Boolean(false) => Some(Choice::Drop),
            _ => {
                self.issue(
                    v,
                    key,
                    "use an event type (\"OrderPlaced\") or false to publish nothing for this operation",
                );
                None
            }
        }
    }

    pub(super) fn conditions(
        &mut self,
        t: &Option<Spanned<toml::Table>>,
        key: &str,
    ) -> Vec<(String, Vec<Literal>)> {
        let Some(t) = t else { return Vec::new() };
        let literal = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(Literal::Text(s.clone())),
            toml::Value::Integer(i) => Some(Literal::Int(*i)),
            toml::Value::Float(f) => Some(Literal::Float(*f)),
            toml::Value::Boolean(b) => Some(Literal::Bool(*b)),
            _ => None,
        };
        let mut out = Vec::new();
        for (col, v) in t.get_ref() {
            let set: Option<Vec<Literal>> = match v {
                toml::Value::Array(items) if !items.is_empty() => {
                    items.iter().map(literal).collect()
                }
                other => literal(other).map(|l| vec![l]),
            };
            match set {
                Some(set) => out.push((col.clone(), set)),
                None => self.issue(
                    t,
                    format!("{key}.{col}"),
                    "compare with a string, number or boolean, or a non-empty list of them",
                ),
            }
        }
        out
    }

    /// `"table"` or `"schema.table"` as (schema, table); an issue at `key` otherwise.
    fn table_name(&mut self, name: &Spanned<String>, key: &str) -> Option<(String, String)> {
        let split = split_table(name.get_ref());
        if split.is_none() {
            self.issue(
                name,
                key,
                "not a table name: use \"table\" or \"schema.table\", with a name in double quotes when it holds spaces or dots ('\"order lines\"')",
            );
        }
        split
    }

    pub(super) fn table_mapping(
        &mut self,
        prefix: &str,
        source: &str,
        t: &Spanned<RawTable>,
    ) -> Option<TableSpec> {
        let line = line_of(self.text, t.span().start);
        let t = t.get_ref();
        let (schema, table) = self.table_name(&t.name, &format!("{prefix}.name"))?;
        let mut spec = TableSpec {
            schema,
            table,
            line,
            key: t.key.as_ref().map(|k| k.get_ref().clone()),
            include: t.include.as_ref().map(|k| k.get_ref().clone()),
            exclude: t
                .exclude
                .as_ref()
                .map(|k| k.get_ref().clone())
                .unwrap_or_default(),
            ..TableSpec::default()
        };
        if let Some(k) = &t.key
            && k.get_ref().is_empty()
        {
            self.issue(k, format!("{prefix}.key"), "list at least one key column");
        }
        if let (Some(i), Some(_)) = (&t.include, &t.exclude) {
            self.issue(
                i,
                format!("{prefix}.include"),
                "set include or exclude, not both",
            );
        }
        if let Some(r) = &t.rename {
            for (from, to) in r.get_ref() {
                match to.as_str() {
                    Some(to) if !to.is_empty() => spec.rename.push((from.clone(), to.to_string())),
                    _ => self.issue(
                        r,
                        format!("{prefix}.rename.{from}"),
                        "the new name must be a non-empty string",
                    ),
                }
            }
        }
        if let Some(a) = &t.attributes {
            const RESERVED: &[&str] = &[
                "specversion",
                "id",
                "source",
                "type",
                "subject",
                "time",
                "datacontenttype",
                "dataschema",
                "data",
                "snapshot",
                "commitlsn",
                "xid",
                "txindex",
                "txlast",
                "schemahash",
            ];
            for (name, v) in a.get_ref() {
                let valid = !name.is_empty()
                    && name.len() <= 20
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
                if !valid || RESERVED.contains(&name.as_str()) {
                    self.issue(
                        a,
                        format!("{prefix}.attributes.{name}"),
                        "an attribute name has 1 to 20 lowercase letters or digits (the CloudEvents rule) and is not one of tidemark's own attributes",
                    );
                    continue;
                }
                match v.as_str() {
                    Some(v) => spec.attributes.push((name.clone(), v.to_string())),
                    None => self.issue(
                        a,
                        format!("{prefix}.attributes.{name}"),
                        "an attribute value is a string",
                    ),
                }
            }
        }
        for (op, v) in [
            (Operation::Insert, &t.insert),
            (Operation::Update, &t.update),
            (Operation::Delete, &t.delete),
            (Operation::Truncate, &t.truncate),
            (Operation::Read, &t.read),
        ] {
            if let Some(v) = v {
                spec.events[crate::events::rules::op_slot(op)] =
                    self.choice(v, &format!("{prefix}.{}", op.as_str()));
            }
        }
        for (n, r) in t.rule.iter().enumerate() {
            let key = format!("{prefix}.rule[{n}]");
            let r = r.get_ref();
            let ops = match &r.on {
                None => Vec::new(),
                Some(v) => {
                    let names: Vec<Option<&str>> = match v.get_ref() {
                        toml::Value::String(s) => vec![Some(s.as_str())],
                        toml::Value::Array(a) => a.iter().map(|x| x.as_str()).collect(),
                        _ => vec![None],
                    };
                    let mut ops = Vec::new();
                    for name in names {
                        match name.and_then(Operation::parse) {
                            Some(op) => ops.push(op),
                            None => self.issue(
                                v,
                                format!("{key}.on"),
                                "use \"insert\", \"update\", \"delete\", \"truncate\" or \"read\", or a list of them",
                            ),
                        }
                    }
                    ops
                }
            };
            let choice = match (&r.event, &r.drop) {
                (Some(e), None | Some(Spanned { .. }))
                    if r.drop.as_ref().is_none_or(|d| !*d.get_ref()) =>
                {
                    self.event_type(e, &format!("{key}.event"))
                        .map(Choice::Event)
                }
                (None, Some(d)) if *d.get_ref() => Some(Choice::Drop),
                (Some(e), Some(_)) => {
                    self.issue(
                        e,
                        format!("{key}.event"),
                        "set event or drop = true, not both",
                    );
                    None
                }
                _ => {
                    self.issues.push(ConfigIssue {
                        line: Some(line),
                        key: key.clone(),
                        message: "a rule needs event = \"...\" or drop = true".into(),
                    });
                    None
                }
            };
            let rule = RuleSpec {
                ops,
                changed: r
                    .changed
                    .as_ref()
                    .map(|c| c.get_ref().clone())
                    .unwrap_or_default(),
                new: self.conditions(&r.new, &format!("{key}.new")),
                old: self.conditions(&r.old, &format!("{key}.old")),
                choice: choice.unwrap_or(Choice::Drop),
            };
            spec.rules.push(rule);
        }
        if let Some(subject) = &t.subject {
            spec.subject = self.template(
                subject,
                &format!("{prefix}.subject"),
                source,
                TABLE_PLACEHOLDERS,
            );
        }
        let columns = t
            .oversized_columns
            .as_ref()
            .map(|c| c.get_ref().clone())
            .unwrap_or_default();
        spec.oversized = match t.oversized.as_ref().map(|o| (o, o.get_ref().as_str())) {
            None | Some((_, "fail")) => Oversized::Fail,
            Some((o, mode @ ("omit" | "truncate"))) => {
                if columns.is_empty() {
                    self.issue(
                        o,
                        format!("{prefix}.oversized_columns"),
                        "say which columns may be shortened: oversized_columns = [\"body\"]",
                    );
                }
                if mode == "omit" {
                    Oversized::Omit(columns)
                } else {
                    Oversized::Truncate(columns)
                }
            }
            Some((o, other)) => {
                self.issue(
                    o,
                    format!("{prefix}.oversized"),
                    format!("{other:?} is not a mode: use \"fail\", \"omit\" or \"truncate\""),
                );
                Oversized::Fail
            }
        };
        Some(spec)
    }

    pub(super) fn outbox(
        &mut self,
        prefix: &str,
        source: &str,
        o: &Spanned<RawOutbox>,
    ) -> Option<OutboxSpec> {
        let line = line_of(self.text, o.span().start);
        let o = o.get_ref();
        let (schema, table) = self.table_name(&o.table, &format!("{prefix}.table"))?;
        let col = |c: &Option<Spanned<String>>, default: &str| {
            c.as_ref()
                .map(|c| c.get_ref().clone())
                .unwrap_or_else(|| default.to_string())
        };
        let default_subject = Spanned::new(0..0, "{source}.{aggregate_type}.{event}".to_string());
        let subject_at = o.subject.as_ref().unwrap_or(&default_subject);
        let subject = self.template(
            subject_at,
            &format!("{prefix}.subject"),
            source,
            OUTBOX_PLACEHOLDERS,
        )?;
        Some(OutboxSpec {
            schema,
            table,
            line,
            id: col(&o.id_column, "id"),
            aggregate_type: col(&o.aggregate_type_column, "aggregate_type"),
            aggregate_id: col(&o.aggregate_id_column, "aggregate_id"),
            event_type: col(&o.event_type_column, "event_type"),
            payload: col(&o.payload_column, "payload"),
            headers: o.headers_column.as_ref().map(|h| h.get_ref().clone()),
            subject,
        })
    }

    pub(super) fn message(
        &mut self,
        prefix: &str,
        source: &str,
        m: &Spanned<RawMessage>,
    ) -> Option<MessageSpec> {
        let m = m.get_ref();
        if m.prefix.get_ref().is_empty() {
            self.issue(
                &m.prefix,
                format!("{prefix}.prefix"),
                "the prefix cannot be empty",
            );
            return None;
        }
        if crate::events::reserved::is_reserved_prefix(m.prefix.get_ref()) {
            self.issue(
                &m.prefix,
                format!("{prefix}.prefix"),
                "this prefix is tidemark's own (backfill watermarks, sync): choose another",
            );
            return None;
        }
        let event_type = match &m.event_type {
            Some(e) => Some(self.event_type(e, &format!("{prefix}.event_type"))?),
            None => None,
        };
        if let (Some(e), Some(_)) = (&m.event_type, &m.type_field) {
            self.issue(
                e,
                format!("{prefix}.event_type"),
                "set event_type or type_field, not both",
            );
        }
        let default_subject = Spanned::new(0..0, "{source}.{prefix}.{event}".to_string());
        let subject_at = m.subject.as_ref().unwrap_or(&default_subject);
        let subject = self.template(
            subject_at,
            &format!("{prefix}.subject"),
            source,
            MESSAGE_PLACEHOLDERS,
        )?;
        Some(MessageSpec {
            prefix: m.prefix.get_ref().clone(),
            event_type,
            type_field: m.type_field.as_ref().map(|f| f.get_ref().clone()),
            subject,
        })
    }
}
