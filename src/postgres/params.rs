//! What the Postgres adapter needs to connect: its own parameter types, built by
//! `config` from the file, so this layer depends on nothing above it.

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// A host name or address, or a directory holding the Unix socket (starts with '/').
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: Option<Secret>,
    pub connect_timeout: Duration,
    /// TLS, as libpq's sslmode (ignored for a Unix socket).
    pub sslmode: SslMode,
    /// CA certificates (PEM) for verify-ca and verify-full.
    pub sslrootcert: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableSelection {
    All,
    /// `(schema, table)` pairs.
    Listed(Vec<(String, String)>),
}
