//! What the config gives: rule, table, outbox and message specs, as configured, before binding.

use crate::events::operation::Operation;

use super::*;

/// A literal in a rule condition, compared with a column's text value.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Literal {
    /// Whether a column's Postgres text output equals this literal. Integers and
    /// floats compare numerically (so `5` matches numeric `5.00`), booleans match `t`
    /// and `f`, text compares exactly.
    pub fn matches(&self, text: &[u8]) -> bool {
        let as_f64 = || {
            std::str::from_utf8(text)
                .ok()
                .and_then(|t| t.trim().parse::<f64>().ok())
        };
        match self {
            Literal::Text(s) => s.as_bytes() == text,
            Literal::Int(i) => match std::str::from_utf8(text).ok().map(str::trim) {
                Some(t) => t.parse::<i64>().ok() == Some(*i) || as_f64() == Some(*i as f64),
                None => false,
            },
            Literal::Float(f) => as_f64() == Some(*f),
            Literal::Bool(b) => {
                matches!((b, text), (true, b"t" | b"true") | (false, b"f" | b"false"))
            }
        }
    }
}

impl std::fmt::Display for Literal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Literal::Text(s) => write!(f, "{s:?}"),
            Literal::Int(i) => write!(f, "{i}"),
            Literal::Float(x) => write!(f, "{x}"),
            Literal::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// What a change turns into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// An event of this type.
    Event(String),
    /// No event: the change is consumed (its index in the transaction stays taken, so
    /// ids do not shift when rules change).
    Drop,
}

/// One conditional rule as configured. All given conditions must hold.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleSpec {
    /// Operations it applies to; empty = any.
    pub ops: Vec<Operation>,
    /// At least one of these columns changed (UPDATEs only; needs REPLICA IDENTITY FULL).
    pub changed: Vec<String>,
    /// The new row's column equals one of the literals.
    pub new: Vec<(String, Vec<Literal>)>,
    /// The old row's column equals one of the literals (needs REPLICA IDENTITY FULL).
    pub old: Vec<(String, Vec<Literal>)>,
    pub choice: Choice,
}

/// What to do with a row whose event is over `max_event_bytes`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Oversized {
    /// Stop the source, naming table, key and size.
    #[default]
    Fail,
    /// Leave these columns' values out (marked in `data.omitted`) and try again.
    Omit(Vec<String>),
    /// Cut these text columns' values to fit (marked in `data.truncated`).
    Truncate(Vec<String>),
}

/// A `[[source.table]]` entry.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TableSpec {
    pub schema: String,
    pub table: String,
    /// The config line of the entry, for messages.
    pub line: usize,
    pub key: Option<Vec<String>>,
    pub include: Option<Vec<String>>,
    pub exclude: Vec<String>,
    pub rename: Vec<(String, String)>,
    /// Event per operation, indexed by `op_slot`.
    pub events: [Option<Choice>; 5],
    pub rules: Vec<RuleSpec>,
    pub subject: Option<Template>,
    pub attributes: Vec<(String, String)>,
    pub oversized: Oversized,
}

/// A `[[source.outbox]]` entry: rows inserted into this table become events verbatim.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxSpec {
    pub schema: String,
    pub table: String,
    pub line: usize,
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: String,
    pub headers: Option<String>,
    pub subject: Template,
}

/// A `[[source.message]]` entry: `pg_logical_emit_message(true, prefix, content)`
/// becomes an event.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageSpec {
    pub prefix: String,
    /// A fixed event type; default: the prefix.
    pub event_type: Option<String>,
    /// Take the event type from this top-level field of the JSON content instead.
    pub type_field: Option<String>,
    pub subject: Template,
}

pub const TABLE_PLACEHOLDERS: &[&str] = &["source", "schema", "table", "event", "op", "key.*"];
pub const OUTBOX_PLACEHOLDERS: &[&str] =
    &["source", "table", "aggregate_type", "aggregate_id", "event"];
pub const MESSAGE_PLACEHOLDERS: &[&str] = &["source", "prefix", "event"];

/// The position of an operation in per-operation arrays.
pub fn op_slot(op: Operation) -> usize {
    match op {
        Operation::Insert => 0,
        Operation::Update => 1,
        Operation::Delete => 2,
        Operation::Truncate => 3,
        Operation::Read => 4,
    }
}
