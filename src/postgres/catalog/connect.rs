//! Connecting for catalog work: TLS as configured, and telling a refused TLS from others.

use tokio_postgres::NoTls;

use crate::postgres::params::PostgresConfig;

use super::*;

/// Whether the server answers an SSLRequest with yes; `None` when it cannot be asked
/// (the connection attempt then reports why).
pub(super) async fn offers_tls(
    host: &str,
    port: u16,
    timeout: std::time::Duration,
) -> Option<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut tcp = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let mut req = bytes::BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut req);
        tcp.write_all(&req).await.ok()?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.ok()?;
        Some(answer[0] == b'S')
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}

impl CatalogError {
    /// Whether the error is a TLS failure no retry can fix: a handshake that failed (a
    /// certificate that does not verify), or a server that declines TLS when it is
    /// required. Told by type, not by text.
    pub fn is_tls_failure(&self) -> bool {
        match self {
            CatalogError::Tls(_) | CatalogError::TlsRefused { .. } => true,
            CatalogError::Connect { source, .. } => {
                crate::postgres::tls::is_handshake_failure(source)
            }
            _ => false,
        }
    }
}

pub(super) async fn connect_with_task(
    cfg: &PostgresConfig,
    application: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), CatalogError> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .dbname(&cfg.dbname)
        .user(&cfg.user)
        .application_name(application)
        .connect_timeout(cfg.connect_timeout);
    if let Some(p) = &cfg.password {
        pg.password(p.expose());
    }
    let target = format!("{}:{}", cfg.host, cfg.port);
    let fail = |source| CatalogError::Connect {
        target: target.clone(),
        user: cfg.user.clone(),
        source,
    };
    let tls = if cfg.host.starts_with('/') {
        None
    } else {
        crate::postgres::tls::client_config(cfg.sslmode, cfg.sslrootcert.as_deref())
            .map_err(CatalogError::Tls)?
    };
    let ended =
        |error: tokio_postgres::Error| tracing::debug!(error = %error, "postgres connection ended");
    match tls {
        None => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) = pg.connect(NoTls).await.map_err(fail)?;
            let task = tokio::spawn(async move {
                if let Err(error) = connection.await {
                    ended(error);
                }
            });
            Ok((client, task))
        }
        Some(config) => {
            pg.ssl_mode(if cfg.sslmode == crate::postgres::params::SslMode::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            let (client, connection) =
                match pg.connect(crate::postgres::tls::MakeRustls(config)).await {
                    Ok(c) => c,
                    Err(e) => {
                        // tokio-postgres reports a server that declines TLS only as text;
                        // asking it (an SSLRequest on a connection of its own, only after a
                        // failure) makes that an error of its own kind.
                        let required = cfg.sslmode != crate::postgres::params::SslMode::Prefer;
                        if required
                            && !crate::postgres::tls::is_handshake_failure(&e)
                            && offers_tls(&cfg.host, cfg.port, cfg.connect_timeout).await
                                == Some(false)
                        {
                            return Err(CatalogError::TlsRefused {
                                target,
                                mode: cfg.sslmode.as_str(),
                            });
                        }
                        return Err(fail(e));
                    }
                };
            let task = tokio::spawn(async move {
                if let Err(error) = connection.await {
                    ended(error);
                }
            });
            Ok((client, task))
        }
    }
}

/// A plain client (its connection runs on a task of its own until the client drops).
pub async fn connect_client(
    cfg: &PostgresConfig,
    application: &str,
) -> Result<tokio_postgres::Client, CatalogError> {
    connect_with_task(cfg, application).await.map(|(c, _)| c)
}
