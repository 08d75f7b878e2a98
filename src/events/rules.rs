//! Mapping rules: how a table's row changes become domain events. Pure.
//!
//! The config gives a `TableSpec` per mapped table (and `OutboxSpec`, `MessageSpec`
//! for the transactional outbox). A spec names columns; it is bound to the live table
//! (`bind`) whenever the replication stream describes that table, at start and after
//! every DDL, so a rule that names a column the table does not have (or no longer has)
//! is an error naming the table and the column, never a silent skip.
//!
//! Binding yields a `TablePlan`: output columns, key, the event choice per operation,
//! ordered conditional rules, the subject template, static attributes and the
//! schema fingerprint. Evaluating a plan on a row change is allocation-free apart from
//! the subject string.
use crate::events::operation::Operation;
use crate::postgres::pgoutput::{ColumnValue, ReplicaIdentity, Tuple};

mod spec;
pub use spec::*;

mod template;
pub use template::*;

mod bind;
pub use bind::bind;

/// A spec that does not fit the live table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error(
        "mapping of table {table} (config line {line}): {what} names column {column:?}, which the table does not have (its columns: {columns}); fix the mapping, or restart once the column exists"
    )]
    UnknownColumn {
        table: String,
        line: usize,
        what: String,
        column: String,
        columns: String,
    },
    #[error(
        "mapping of table {table} (config line {line}): {what} compares old values, which PostgreSQL sends only with REPLICA IDENTITY FULL; run ALTER TABLE {table} REPLICA IDENTITY FULL, or drop the old/changed condition"
    )]
    NeedsFullIdentity {
        table: String,
        line: usize,
        what: String,
    },
    #[error(
        "mapping of table {table} (config line {line}): two output columns are named {name:?}; rename one"
    )]
    DuplicateOutput {
        table: String,
        line: usize,
        name: String,
    },
}

/// One column of the event's rows: where it is in the tuple and its name in JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutColumn {
    pub index: usize,
    pub name: String,
    /// `"name":`, escaped once here rather than for every row.
    pub json_key: Box<[u8]>,
}

impl OutColumn {
    pub fn new(index: usize, name: String) -> Self {
        let mut json_key = Vec::with_capacity(name.len() + 3);
        crate::events::json::str(&mut json_key, &name);
        json_key.push(b':');
        OutColumn {
            index,
            name,
            json_key: json_key.into_boxed_slice(),
        }
    }
}

/// A bound rule: column names resolved to tuple indices.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub ops: Vec<Operation>,
    pub changed: Vec<usize>,
    pub new: Vec<(usize, Vec<Literal>)>,
    pub old: Vec<(usize, Vec<Literal>)>,
    pub bound: Bound,
}

/// A bound event choice: its type and its name in subjects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    Event { ty: String, name: String },
    Drop,
}

/// Outbox columns resolved to tuple indices.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxPlan {
    pub id: usize,
    pub aggregate_type: usize,
    pub aggregate_id: usize,
    pub event_type: usize,
    pub payload: usize,
    pub headers: Option<usize>,
    pub subject: Template,
}

/// How one live table's changes become events.
#[derive(Clone, Debug, PartialEq)]
pub struct TablePlan {
    pub columns: Vec<OutColumn>,
    pub key: Vec<OutColumn>,
    pub events: [Bound; 5],
    pub rules: Vec<Rule>,
    pub subject: Option<Template>,
    pub attributes: Vec<(String, String)>,
    /// Short hash of the event's row shape (output names, types, key).
    pub fingerprint: String,
    pub outbox: Option<OutboxPlan>,
    pub oversized: OversizedPlan,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum OversizedPlan {
    #[default]
    Fail,
    Omit(Vec<usize>),
    Truncate(Vec<usize>),
}

/// The live table as the binder needs it.
pub struct LiveTable<'a> {
    pub qualified: &'a str,
    pub token: &'a str,
    pub columns: &'a [(String, u32)],
    pub replica_identity: ReplicaIdentity,
    /// Key column indices from the catalog (primary key, else replica identity).
    pub default_key: &'a [usize],
}

fn text_of(v: &ColumnValue) -> Option<&[u8]> {
    match v {
        ColumnValue::Text(b) | ColumnValue::Binary(b) => Some(b),
        _ => None,
    }
}

impl TablePlan {
    /// Picks the event for a change: the first rule whose conditions hold, else the
    /// operation's event.
    /// Every event type this plan can publish, with the operations that can produce
    /// it (rules first, then the per-operation defaults), in a stable order.
    pub fn event_types(&self) -> Vec<(String, Vec<Operation>)> {
        const ALL: [Operation; 5] = [
            Operation::Insert,
            Operation::Update,
            Operation::Delete,
            Operation::Truncate,
            Operation::Read,
        ];
        let mut out: Vec<(String, Vec<Operation>)> = Vec::new();
        let mut add = |ty: &str, ops: &[Operation]| {
            let at = match out.iter().position(|(t, _)| t == ty) {
                Some(i) => i,
                None => {
                    out.push((ty.to_string(), Vec::new()));
                    out.len() - 1
                }
            };
            for op in ops {
                if !out[at].1.contains(op) {
                    out[at].1.push(*op);
                }
            }
        };
        for rule in &self.rules {
            if let Bound::Event { ty, .. } = &rule.bound {
                let ops: &[Operation] = if rule.ops.is_empty() { &ALL } else { &rule.ops };
                add(ty, ops);
            }
        }
        for op in ALL {
            if let Bound::Event { ty, .. } = &self.events[op_slot(op)] {
                add(ty, &[op]);
            }
        }
        out
    }

    pub fn choose(&self, op: Operation, old: Option<&Tuple>, new: Option<&Tuple>) -> &Bound {
        for rule in &self.rules {
            if rule.holds(op, old, new) {
                return &rule.bound;
            }
        }
        &self.events[op_slot(op)]
    }
}

impl Rule {
    fn holds(&self, op: Operation, old: Option<&Tuple>, new: Option<&Tuple>) -> bool {
        if !self.ops.is_empty() && !self.ops.contains(&op) {
            return false;
        }
        // The new value of a column; an unchanged TOAST value is the old one.
        let new_value = |i: usize| -> Option<&ColumnValue> {
            let v = new?.0.get(i)?;
            if matches!(v, ColumnValue::UnchangedToast) {
                old?.0.get(i)
            } else {
                Some(v)
            }
        };
        if !self.changed.is_empty() {
            if op != Operation::Update {
                return false;
            }
            let any_changed = self.changed.iter().any(|&i| {
                let n = new.and_then(|t| t.0.get(i));
                if matches!(n, Some(ColumnValue::UnchangedToast)) {
                    return false;
                }
                n != old.and_then(|t| t.0.get(i))
            });
            if !any_changed {
                return false;
            }
        }
        let check = |value: Option<&ColumnValue>, set: &[Literal]| match value.and_then(text_of) {
            Some(t) => set.iter().any(|l| l.matches(t)),
            None => false,
        };
        self.new.iter().all(|(i, set)| check(new_value(*i), set))
            && self
                .old
                .iter()
                .all(|(i, set)| check(old.and_then(|t| t.0.get(*i)), set))
    }
}

#[cfg(test)]
/// The default plan: every column under its own name, default event types.
pub fn default_plan(live: &LiveTable<'_>) -> TablePlan {
    // An empty spec always binds: it names no column.
    bind(live, None, None).unwrap_or_else(|_| unreachable!("an empty spec names no column"))
}

#[cfg(test)]
impl TablePlan {
    /// The default plan of a `public` table with these columns, keyed on the first.
    pub fn default_for(columns: &[(&str, u32)], token: &str) -> TablePlan {
        let cols: Vec<(String, u32)> = columns.iter().map(|(n, t)| (n.to_string(), *t)).collect();
        default_plan(&LiveTable {
            qualified: &format!("public.{token}"),
            token,
            columns: &cols,
            replica_identity: ReplicaIdentity::Default,
            default_key: &[0],
        })
    }
}

fn op_list(ops: &[Operation]) -> String {
    if ops.is_empty() {
        "any operation".into()
    } else {
        ops.iter().map(|o| o.as_str()).collect::<Vec<_>>().join("/")
    }
}

fn bound_text(b: &Bound) -> &str {
    match b {
        Bound::Event { ty, .. } => ty,
        Bound::Drop => "nothing (dropped)",
    }
}

impl TablePlan {
    /// The plan in words, one line each, for `tidemark check`.
    pub fn describe(&self, columns: &[(String, u32)], source: &str, token: &str) -> Vec<String> {
        let name = |i: usize| columns.get(i).map(|c| c.0.as_str()).unwrap_or("?");
        let mut out = Vec::new();
        if let Some(o) = &self.outbox {
            out.push(format!(
                "outbox: each inserted row is an event of type <{}> with data <{}>, subject {}; updates and deletes publish nothing",
                name(o.event_type),
                name(o.payload),
                o.subject.text
            ));
            return out;
        }
        let key = if self.key.is_empty() {
            "none (events carry no key)".to_string()
        } else {
            self.key
                .iter()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push(format!("key: {key}; schema hash {}", self.fingerprint));
        let shaped: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                if c.name == name(c.index) {
                    c.name.clone()
                } else {
                    format!("{} as {}", name(c.index), c.name)
                }
            })
            .collect();
        out.push(format!("columns: {}", shaped.join(", ")));
        for (n, r) in self.rules.iter().enumerate() {
            let mut cond = vec![format!("on {}", op_list(&r.ops))];
            if !r.changed.is_empty() {
                cond.push(format!(
                    "{} changed",
                    r.changed
                        .iter()
                        .map(|&i| name(i))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ));
            }
            for (label, list) in [("old", &r.old), ("new", &r.new)] {
                for (i, set) in list {
                    let vals: Vec<String> = set.iter().map(|l| l.to_string()).collect();
                    cond.push(format!("{label} {} in [{}]", name(*i), vals.join(", ")));
                }
            }
            out.push(format!(
                "rule {}: {} -> {}",
                n + 1,
                cond.join(", "),
                bound_text(&r.bound)
            ));
        }
        for op in [
            Operation::Insert,
            Operation::Update,
            Operation::Delete,
            Operation::Truncate,
            Operation::Read,
        ] {
            let b = &self.events[op_slot(op)];
            let prefix = if self.rules.is_empty() {
                ""
            } else {
                "otherwise "
            };
            let subject = match (b, &self.subject) {
                (Bound::Drop, _) => String::new(),
                (Bound::Event { .. }, Some(t)) => format!(", subject {}", t.text),
                (Bound::Event { name, .. }, None) => format!(", subject {source}.{token}.{name}"),
            };
            out.push(format!(
                "{prefix}{} -> {}{subject}",
                op.as_str(),
                bound_text(b)
            ));
        }
        if !self.attributes.is_empty() {
            let a: Vec<String> = self
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            out.push(format!("attributes: {}", a.join(", ")));
        }
        match &self.oversized {
            OversizedPlan::Fail => {}
            OversizedPlan::Omit(c) | OversizedPlan::Truncate(c) => out.push(format!(
                "oversized rows: {} {}",
                if matches!(self.oversized, OversizedPlan::Omit(_)) {
                    "omit"
                } else {
                    "truncate"
                },
                c.iter().map(|&i| name(i)).collect::<Vec<_>>().join(", ")
            )),
        }
        out
    }
}
