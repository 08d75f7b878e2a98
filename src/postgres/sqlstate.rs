//! Which Postgres errors no retry can fix, by SQLSTATE name: the one list the source
//! and the projections share.

use tokio_postgres::error::SqlState;

/// Whether an error with this SQLSTATE needs an operator: a login that is refused
/// (class 28), a database that does not exist, an object that does not exist (a
/// slot, a role), or a server not in the state required (wal_level below logical).
pub fn needs_operator(code: &str) -> bool {
    let state = SqlState::from_code(code);
    [
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_CATALOG_NAME,
        SqlState::UNDEFINED_OBJECT,
        SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
    ]
    .contains(&state)
}

/// Whether an error with this SQLSTATE is the database's state, not the statement's
/// doing: a lost connection (class 08), a serialization failure or deadlock (40),
/// exhausted resources (53), a shutdown or cancel (57), a system error (58) or an
/// internal one (XX). The same statement may well succeed when tried again.
pub fn is_transient(code: &str) -> bool {
    matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58" | "XX"))
}

#[cfg(test)]
mod tests {
    use super::{is_transient, needs_operator};

    #[test]
    fn operator_errors_by_name() {
        for code in ["28000", "28P01", "3D000", "42704", "55000"] {
            assert!(needs_operator(code), "{code}");
        }
        // Shut down, lost connection, serialization: a retry can fix them.
        for code in ["57P01", "08006", "40001", "53300"] {
            assert!(!needs_operator(code), "{code}");
            assert!(is_transient(code), "{code}");
        }
        // A constraint, a type, a missing column: the statement's own doing.
        for code in ["23505", "22P02", "42703"] {
            assert!(!is_transient(code), "{code}");
        }
    }
}
