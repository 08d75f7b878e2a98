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

#[cfg(test)]
mod tests {
    use super::needs_operator;

    #[test]
    fn operator_errors_by_name() {
        for code in ["28000", "28P01", "3D000", "42704", "55000"] {
            assert!(needs_operator(code), "{code}");
        }
        // Shut down, lost connection, serialization: a retry can fix them.
        for code in ["57P01", "08006", "40001", "53300"] {
            assert!(!needs_operator(code), "{code}");
        }
    }
}
