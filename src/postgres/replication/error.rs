//! Errors of the replication session: what the server sent, and what went wrong on our side.

use std::io;
use std::time::Duration;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorResponseBody;

use crate::position::Lsn;

/// An error the server sent, with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl ServerError {
    pub(super) fn from_body(body: &ErrorResponseBody) -> ServerError {
        let mut e = ServerError {
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        let mut fields = body.fields();
        while let Ok(Some(f)) = fields.next() {
            let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
        }
        e
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(
        "cannot connect to postgres at {target}: check that the database runs and that host and port are right"
    )]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to postgres at {target} timed out after {}s: check host, port and firewalls", .after.as_secs())]
    ConnectTimeout { target: String, after: Duration },
    #[error("TLS with postgres at {target} failed (sslmode {mode}): {source}")]
    Tls {
        target: String,
        mode: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "postgres at {target} does not offer TLS, and sslmode is {mode}: enable ssl on the server, or lower sslmode"
    )]
    TlsRefused { target: String, mode: &'static str },
    #[error(transparent)]
    TlsSetup(#[from] crate::postgres::tls::TlsError),
    #[error(
        "postgres rejected the login of user {user:?}: {error}; check the password and pg_hba.conf"
    )]
    AuthFailed { user: String, error: ServerError },
    #[error(
        "postgres asks user {user:?} for a password but none is configured: set postgres.password_env or postgres.password_file"
    )]
    PasswordRequired { user: String },
    #[error(
        "postgres asks for authentication method {method}, which tidemark does not support: use scram-sha-256, md5, password or trust in pg_hba.conf"
    )]
    UnsupportedAuth { method: String },
    #[error("postgres: {0}")]
    Server(ServerError),
    #[error("replication connection to postgres failed")]
    Io(#[from] io::Error),
    #[error("postgres closed the replication connection")]
    Closed,
    #[error("unexpected message from postgres: {0}")]
    Protocol(String),
    #[error(
        "postgres sent a {len}-byte replication message{}, over the {limit}-byte limit (max_row_bytes): raise max_row_bytes (it bounds the memory one row may take) and, unless the table's mapping shrinks oversized rows, max_event_bytes and the NATS max_payload too",
        .lsn.map(|l| format!(" at LSN {l}")).unwrap_or_default()
    )]
    MessageTooLarge {
        len: usize,
        limit: usize,
        lsn: Option<Lsn>,
    },
}

impl ReplicationError {
    /// The SQLSTATE, when the server reported the error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            ReplicationError::AuthFailed { error, .. } => Some(&error.code),
            _ => None,
        }
    }
}
