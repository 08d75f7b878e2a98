//! The replication connection: a walsender session (`replication=database`) spoken over
//! a tokio TCP or Unix socket with `postgres-protocol` for message bodies and
//! authentication. `tokio-postgres` has no CopyBoth support, so framing is done here:
//! one frame at a time, its length checked against a limit before any of it is
//! buffered, which bounds memory by configuration rather than by row size.
//!
//! It owns: startup and authentication (trust, cleartext, MD5, SCRAM-SHA-256), simple
//! queries (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT), START_REPLICATION, and the
//! CopyBoth stream of XLogData and keepalives, plus standby status updates. It leaves
//! decoding to `pgoutput.rs` and all policy (what to confirm, when) to the pipeline.
//!
//! References: "Streaming Replication Protocol" and "Message Formats" in the
//! PostgreSQL manual.

use std::io;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::position::Lsn;
use crate::postgres::params::PostgresConfig;
use crate::secret::Secret;

mod error;
pub use error::*;
mod stream;
pub use stream::*;

/// A socket to Postgres: TCP, or a Unix socket when the host is a directory.
enum Socket {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl Socket {
    async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read_buf(buf).await,
            Socket::Tls(s) => s.read_buf(buf).await,
            Socket::Unix(s) => s.read_buf(buf).await,
        }
    }
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => write_all_flush(s, buf).await,
            Socket::Tls(s) => write_all_flush(s.as_mut(), buf).await,
            Socket::Unix(s) => write_all_flush(s, buf).await,
        }
    }
}

/// Asks the server for TLS (SSLRequest) and wraps the socket when it agrees. A server
/// that declines is fine for `prefer` and an error otherwise.
async fn negotiate_tls(
    mut tcp: TcpStream,
    cfg: &PostgresConfig,
    target: &str,
) -> Result<Socket, ReplicationError> {
    let Some(config) =
        crate::postgres::tls::client_config(cfg.sslmode, cfg.sslrootcert.as_deref())?
    else {
        return Ok(Socket::Tcp(tcp));
    };
    let mode = cfg.sslmode.as_str();
    // A connection that ends or breaks while TLS is negotiated (a server restarting,
    // a proxy cut) is a network failure, tried again; only what TLS itself refuses (a
    // certificate that does not verify, no common protocol) needs the operator.
    let io_err = |source: io::Error| {
        if crate::postgres::tls::is_tls_protocol_error(&source) {
            ReplicationError::Tls {
                target: target.to_string(),
                mode,
                source,
            }
        } else {
            ReplicationError::Connect {
                target: target.to_string(),
                source,
            }
        }
    };
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await.map_err(io_err)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    match answer[0] {
        b'S' => {
            let name = crate::postgres::tls::server_name(&cfg.host)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(io_err)?;
            Ok(Socket::Tls(Box::new(tls)))
        }
        _ if cfg.sslmode == crate::postgres::params::SslMode::Prefer => Ok(Socket::Tcp(tcp)),
        _ => Err(ReplicationError::TlsRefused {
            target: target.to_string(),
            mode,
        }),
    }
}

async fn write_all_flush<S: AsyncWrite + AsyncRead + Unpin>(
    s: &mut S,
    buf: &[u8],
) -> io::Result<()> {
    s.write_all(buf).await?;
    s.flush().await
}

/// What IDENTIFY_SYSTEM reports.
#[derive(Debug, Clone)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
}

/// One raw frame: its tag and body.
struct Frame {
    tag: u8,
    raw: BytesMut,
}

/// A replication session before START_REPLICATION.
pub struct ReplicationConnection {
    socket: Socket,
    buf: BytesMut,
    out: BytesMut,
    max_message_bytes: usize,
    /// `server_version_num`, from ParameterStatus.
    pub server_version: Option<String>,
}

/// Session settings the value conversions rely on (see `values.rs`).
const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, YMD"),
    ("TimeZone", "UTC"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "1"),
    ("IntervalStyle", "iso_8601"),
    ("lc_monetary", "C"),
];

impl ReplicationConnection {
    /// Connects and authenticates a `replication=database` session.
    pub async fn connect(
        cfg: &PostgresConfig,
        max_message_bytes: usize,
    ) -> Result<Self, ReplicationError> {
        let target = if cfg.host.starts_with('/') {
            format!("{}/.s.PGSQL.{}", cfg.host, cfg.port)
        } else {
            format!("{}:{}", cfg.host, cfg.port)
        };
        let connect = async {
            if cfg.host.starts_with('/') {
                UnixStream::connect(&target)
                    .await
                    .map(Socket::Unix)
                    .map_err(|source| ReplicationError::Connect {
                        target: target.clone(),
                        source,
                    })
            } else {
                let tcp = async {
                    let s = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
                    s.set_nodelay(true)?;
                    Ok::<_, io::Error>(s)
                }
                .await
                .map_err(|source| ReplicationError::Connect {
                    target: target.clone(),
                    source,
                })?;
                negotiate_tls(tcp, cfg, &target).await
            }
        };
        let socket = match tokio::time::timeout(cfg.connect_timeout, connect).await {
            Err(_) => {
                return Err(ReplicationError::ConnectTimeout {
                    target,
                    after: cfg.connect_timeout,
                });
            }
            Ok(result) => result?,
        };
        let mut conn = ReplicationConnection {
            socket,
            buf: BytesMut::with_capacity(64 * 1024),
            out: BytesMut::with_capacity(1024),
            max_message_bytes,
            server_version: None,
        };
        let mut params: Vec<(&str, &str)> = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("replication", "database"),
            ("application_name", "tidemark"),
        ];
        params.extend_from_slice(SESSION_SETTINGS);
        frontend::startup_message(params.iter().copied(), &mut conn.out)?;
        conn.flush_out().await?;
        tokio::time::timeout(
            cfg.connect_timeout,
            conn.authenticate(&cfg.user, cfg.password.as_ref()),
        )
        .await
        .map_err(|_| ReplicationError::ConnectTimeout {
            target: target.clone(),
            after: cfg.connect_timeout,
        })??;
        Ok(conn)
    }

    async fn flush_out(&mut self) -> Result<(), ReplicationError> {
        let out = self.out.split();
        self.socket.write_all(&out).await?;
        Ok(())
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&Secret>,
    ) -> Result<(), ReplicationError> {
        let need_password = || {
            password.ok_or_else(|| ReplicationError::PasswordRequired {
                user: user.to_string(),
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self.next_message().await?;
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(
                        need_password()?.expose().as_bytes(),
                        &mut self.out,
                    )?;
                    self.flush_out().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        need_password()?.expose().as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.out)?;
                    self.flush_out().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(ReplicationError::UnsupportedAuth {
                            method: "SASL without SCRAM-SHA-256".into(),
                        });
                    }
                    let s = ScramSha256::new(
                        need_password()?.expose().as_bytes(),
                        ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.out)?;
                    self.flush_out().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut self.out)?;
                    self.flush_out().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(body.data())?;
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(ReplicationError::UnsupportedAuth {
                        method: "GSSAPI/SSPI/Kerberos".into(),
                    });
                }
                Message::ParameterStatus(body) => {
                    if body.name().ok() == Some("server_version") {
                        self.server_version = body.value().ok().map(str::to_string);
                    }
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    let error = ServerError::from_body(&body);
                    return Err(if error.code.starts_with("28") {
                        ReplicationError::AuthFailed {
                            user: user.to_string(),
                            error,
                        }
                    } else {
                        ReplicationError::Server(error)
                    });
                }
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message during startup".into(),
                    ));
                }
            }
        }
    }

    /// Reads one complete frame. Cancel-safe: all state is in `self.buf`.
    async fn next_frame(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len < 4 {
                    return Err(ReplicationError::Protocol(format!(
                        "invalid message length {len}"
                    )));
                }
                if len > self.max_message_bytes {
                    // XLogData: 'd' len 'w' start(8): the LSN helps the operator find the row.
                    let lsn = (self.buf[0] == b'd' && self.buf.len() >= 14 && self.buf[5] == b'w')
                        .then(|| {
                            let mut b = &self.buf[6..14];
                            Lsn(b.get_u64())
                        });
                    return Err(ReplicationError::MessageTooLarge {
                        len,
                        limit: self.max_message_bytes,
                        lsn,
                    });
                }
                let total = len + 1;
                if self.buf.len() >= total {
                    let raw = self.buf.split_to(total);
                    return Ok(Frame { tag: raw[0], raw });
                }
                self.buf.reserve(total - self.buf.len());
            }
            let n = self.socket.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }

    async fn next_message(&mut self) -> Result<Message, ReplicationError> {
        let mut frame = self.next_frame().await?;
        match Message::parse(&mut frame.raw)? {
            Some(m) => Ok(m),
            None => Err(ReplicationError::Protocol("incomplete frame".into())),
        }
    }

    /// Runs a simple query and returns its rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.out)?;
        self.flush_out().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next_message().await? {
                Message::DataRow(row) => {
                    let buf = row.buffer();
                    let mut values = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(r) = ranges.next()? {
                        values.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(values);
                }
                Message::ErrorResponse(body) => error = Some(ServerError::from_body(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(ReplicationError::Server(e)),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemIdentity {
            system_id: col(0),
            timeline: col(1).parse().unwrap_or(0),
            xlog_pos: col(2)
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("IDENTIFY_SYSTEM: {e}")))?,
        })
    }

    /// Creates a logical slot for pgoutput and returns its consistent point.
    pub async fn create_slot(&mut self, slot: &str) -> Result<Lsn, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(slot)
        );
        let rows = self.simple_query(&sql).await?;
        let lsn = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .ok_or_else(|| {
                ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
            })?;
        lsn.parse()
            .map_err(|e| ReplicationError::Protocol(format!("CREATE_REPLICATION_SLOT: {e}")))
    }

    /// Creates a logical slot for pgoutput and exports the snapshot of its consistent
    /// point: its consistent point and the snapshot's name. The snapshot can be
    /// imported (`SET TRANSACTION SNAPSHOT`) only until this connection runs its next
    /// command; a transaction that imported it keeps it.
    pub async fn create_slot_exporting(
        &mut self,
        slot: &str,
    ) -> Result<(Lsn, String), ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(slot)
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let col = |i: usize| row.get(i).cloned().flatten();
        let (Some(lsn), Some(snapshot)) = (col(1), col(2)) else {
            return Err(ReplicationError::Protocol(
                "CREATE_REPLICATION_SLOT returned no consistent point or snapshot".into(),
            ));
        };
        let lsn = lsn
            .parse()
            .map_err(|e| ReplicationError::Protocol(format!("CREATE_REPLICATION_SLOT: {e}")))?;
        Ok((lsn, snapshot))
    }

    /// Starts streaming from the slot. `start` 0/0 means "from the slot's confirmed
    /// flush LSN", which is how every restart resumes. `messages`: ask for logical
    /// decoding messages (pgoutput knows the option from PostgreSQL 14 on).
    pub async fn start_replication(
        mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
        messages: bool,
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"proto_version\" '1', \"publication_names\" {}{})",
            quote_ident(slot),
            start,
            quote_literal(&quote_ident(publication)),
            if messages {
                ", \"messages\" 'true'"
            } else {
                ""
            },
        );
        frontend::query(&sql, &mut self.out)?;
        self.flush_out().await?;
        loop {
            let frame = self.next_frame().await?;
            match frame.tag {
                b'W' => break,
                b'N' | b'S' => continue,
                _ => {
                    let mut raw = frame.raw;
                    match Message::parse(&mut raw)? {
                        Some(Message::ErrorResponse(body)) => {
                            return Err(ReplicationError::Server(ServerError::from_body(&body)));
                        }
                        _ => {
                            return Err(ReplicationError::Protocol(format!(
                                "expected CopyBothResponse to START_REPLICATION, got message {:?}",
                                char::from(frame.tag)
                            )));
                        }
                    }
                }
            }
        }
        Ok(ReplicationStream { conn: self })
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests;
