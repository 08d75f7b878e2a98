//! The kinds of row change (and a backfill's read), as the model names them.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A row read by a backfill (snapshot), not a change.
    Read,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
            Operation::Read => "read",
        }
    }

    pub fn parse(s: &str) -> Option<Operation> {
        Some(match s {
            "insert" => Operation::Insert,
            "update" => Operation::Update,
            "delete" => Operation::Delete,
            "truncate" => Operation::Truncate,
            "read" => Operation::Read,
            _ => return None,
        })
    }

    /// The default event name.
    pub fn event_name(self) -> &'static str {
        match self {
            Operation::Insert => "created",
            Operation::Update => "updated",
            Operation::Delete => "deleted",
            Operation::Truncate => "truncated",
            Operation::Read => "read",
        }
    }
}
