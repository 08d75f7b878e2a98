//! What the NATS adapter needs: connection parameters and the stream's shape, its
//! own types, built by `config` from the file.

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub servers: Vec<String>,
    pub auth: NatsAuth,
    pub connect_timeout: Duration,
    /// CA certificates (PEM) that signed the server's certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// Refuse a server that does not speak TLS.
    pub tls_required: bool,
}

#[derive(Debug, Clone)]
pub enum NatsAuth {
    None,
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
    CredentialsFile(PathBuf),
    /// An NKey seed (`SU...`): the server knows the public key.
    NKey(Secret),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    File,
    Memory,
}

#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub name: String,
    pub subjects: Vec<String>,
    pub storage: Storage,
    pub replicas: usize,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<i64>,
    pub duplicate_window: Duration,
    /// Allow atomic batch publishing (set from the source's `atomic_transactions`).
    pub atomic: bool,
}
