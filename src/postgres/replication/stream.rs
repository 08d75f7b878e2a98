//! The CopyBoth stream after START_REPLICATION: XLogData, keepalives, status updates.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use crate::position::Lsn;

use super::*;

/// One message of the replication stream.
#[derive(Debug)]
pub enum ReplicationMessage {
    XLogData { wal_start: Lsn, data: Bytes },
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

/// The CopyBoth stream after START_REPLICATION.
pub struct ReplicationStream {
    pub(super) conn: ReplicationConnection,
}

impl ReplicationStream {
    /// The next XLogData or keepalive. Cancel-safe, so it can sit in a `select!`.
    pub async fn next(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            let frame = self.conn.next_frame().await?;
            match frame.tag {
                b'd' => {
                    let mut body = frame.raw.freeze().slice(5..);
                    if body.is_empty() {
                        return Err(ReplicationError::Protocol("empty CopyData".into()));
                    }
                    let kind = body.get_u8();
                    match kind {
                        b'w' if body.len() >= 24 => {
                            let wal_start = Lsn(body.get_u64());
                            let _wal_end = body.get_u64();
                            let _send_time = body.get_i64();
                            return Ok(ReplicationMessage::XLogData {
                                wal_start,
                                data: body,
                            });
                        }
                        b'k' if body.len() >= 17 => {
                            let wal_end = Lsn(body.get_u64());
                            let _send_time = body.get_i64();
                            let reply_requested = body.get_u8() == 1;
                            return Ok(ReplicationMessage::Keepalive {
                                wal_end,
                                reply_requested,
                            });
                        }
                        other => {
                            return Err(ReplicationError::Protocol(format!(
                                "unknown or short CopyData message {:?} ({} bytes)",
                                char::from(other),
                                body.len()
                            )));
                        }
                    }
                }
                b'N' | b'S' => continue,
                b'c' => return Err(ReplicationError::Closed),
                _ => {
                    let mut raw = frame.raw;
                    return match Message::parse(&mut raw)? {
                        Some(Message::ErrorResponse(body)) => {
                            Err(ReplicationError::Server(ServerError::from_body(&body)))
                        }
                        _ => Err(ReplicationError::Protocol(format!(
                            "unexpected message {:?} in replication stream",
                            char::from(frame.tag)
                        ))),
                    };
                }
            }
        }
    }

    /// Sends a standby status update. `flush` is what Postgres records as the slot's
    /// confirmed flush LSN: only positions whose events JetStream has stored.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(write.0);
        msg.put_u64(flush.0);
        msg.put_u64(flush.0);
        msg.put_i64(pg_now_micros());
        msg.put_u8(u8::from(reply_requested));
        frontend::CopyData::new(&msg[..])?.write(&mut self.conn.out);
        self.conn.flush_out().await
    }
}

/// Microseconds since the Postgres epoch (2000-01-01 UTC), for status updates.
pub(super) fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - 946_684_800_000_000
}
