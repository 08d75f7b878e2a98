//! The pgoutput decoder: bytes of one logical replication message in, a typed message
//! out. Pure: no I/O, no clocks, no allocation beyond the decoded message; column values
//! are zero-copy slices of the input.
//!
//! Formats follow "Logical Replication Message Formats" in the PostgreSQL manual
//! (protocol-logicalrep-message-formats), protocol version 1, as requested by the
//! replication client. Every read is checked: malformed or truncated input is an error
//! that names the offset, never a panic. The decoder is fuzzed by a property test below.

use bytes::Bytes;

use crate::position::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC, Postgres' timestamp epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PgTimestamp(pub i64);

/// Seconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

impl PgTimestamp {
    /// Unix time in nanoseconds.
    pub fn unix_nanos(self) -> i128 {
        (i128::from(PG_EPOCH_UNIX_SECS) * 1_000_000 + i128::from(self.0)) * 1_000
    }

    /// The timestamp as RFC 3339 in UTC, with microseconds.
    pub fn to_rfc3339(self) -> String {
        use time::format_description::well_known::Rfc3339;
        match time::OffsetDateTime::from_unix_timestamp_nanos(self.unix_nanos())
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
        {
            Some(s) => s,
            // Outside the years 1..9999: not representable in RFC 3339. Postgres commit
            // times never are; keep the raw number rather than failing the event.
            None => format!("pg-micros:{}", self.0),
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error(
        "unknown pgoutput message tag {tag:?} (byte 0x{byte:02x}); tidemark speaks protocol version 1"
    )]
    UnknownTag { tag: char, byte: u8 },
    #[error("unknown tuple column kind {kind:?} at offset {offset}")]
    UnknownColumnKind { kind: char, offset: usize },
    #[error("unexpected tuple marker {marker:?} at offset {offset} in {message}")]
    UnexpectedMarker {
        message: &'static str,
        marker: char,
        offset: usize,
    },
    #[error("string at offset {offset} is not NUL-terminated")]
    UnterminatedString { offset: usize },
    #[error("string at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { offset: usize },
    #[error("negative length {len} at offset {offset}")]
    NegativeLength { len: i32, offset: usize },
    #[error("{extra} trailing bytes after a complete {message} message")]
    TrailingBytes { message: &'static str, extra: usize },
    #[error("empty pgoutput message")]
    Empty,
}

/// One decoded logical replication message.
#[derive(Clone, Debug, PartialEq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin { commit_lsn: Lsn, name: String },
    Relation(Relation),
    Type(TypeInfo),
    Insert { relation_id: u32, new: Tuple },
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(EmittedMessage),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record: known at BEGIN because pgoutput (without
    /// streaming) sends only committed transactions.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once the transaction is stored.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// Replica identity setting of a relation (`pg_class.relreplident`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
    Other(u8),
}

impl ReplicaIdentity {
    fn from_byte(b: u8) -> Self {
        match b {
            b'd' => Self::Default,
            b'n' => Self::Nothing,
            b'f' => Self::Full,
            b'i' => Self::Index,
            other => Self::Other(other),
        }
    }

    /// From `pg_class.relreplident`.
    pub fn from_char(c: char) -> Self {
        u8::try_from(c)
            .map(Self::from_byte)
            .unwrap_or(Self::Other(0))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity key (flag bit 1).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    pub id: u32,
    pub namespace: String,
    pub name: String,
}

/// One column's value in a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnValue {
    Null,
    /// A TOASTed value that did not change; Postgres does not send it.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<ColumnValue>);

/// Which old tuple an UPDATE or DELETE carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity key columns ('K'); others are null.
    Key,
    /// The whole old row ('O'), with REPLICA IDENTITY FULL.
    Full,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub relation_id: u32,
    pub old: Option<(OldKind, Tuple)>,
    pub new: Tuple,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Delete {
    pub relation_id: u32,
    pub old: (OldKind, Tuple),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<u32>,
}

/// A message written with `pg_logical_emit_message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmittedMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Decodes one pgoutput message (the payload of one XLogData).
pub fn decode(buf: Bytes) -> Result<LogicalMessage, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8().map_err(|_| DecodeError::Empty)?;
    let (msg, name) = match tag {
        b'B' => (
            LogicalMessage::Begin(Begin {
                final_lsn: Lsn(r.u64()?),
                commit_time: PgTimestamp(r.i64()?),
                xid: r.u32()?,
            }),
            "Begin",
        ),
        b'C' => (
            LogicalMessage::Commit(Commit {
                flags: r.u8()?,
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_time: PgTimestamp(r.i64()?),
            }),
            "Commit",
        ),
        b'O' => (
            LogicalMessage::Origin {
                commit_lsn: Lsn(r.u64()?),
                name: r.cstr()?,
            },
            "Origin",
        ),
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = ReplicaIdentity::from_byte(r.u8()?);
            let ncols = r.u16()?;
            // Each column takes at least 10 bytes: never pre-allocate from an untrusted
            // count beyond what the input could hold.
            let mut columns = Vec::with_capacity(usize::from(ncols).min(r.remaining() / 10));
            for _ in 0..ncols {
                columns.push(Column {
                    is_key: r.u8()? & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            (
                LogicalMessage::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                }),
                "Relation",
            )
        }
        b'Y' => (
            LogicalMessage::Type(TypeInfo {
                id: r.u32()?,
                namespace: r.cstr()?,
                name: r.cstr()?,
            }),
            "Type",
        ),
        b'I' => {
            let relation_id = r.u32()?;
            r.expect_marker(b'N', "Insert")?;
            let new = r.tuple()?;
            (LogicalMessage::Insert { relation_id, new }, "Insert")
        }
        b'U' => {
            let relation_id = r.u32()?;
            let offset = r.pos;
            let mut marker = r.u8()?;
            let mut old = None;
            if marker == b'K' || marker == b'O' {
                let kind = if marker == b'K' {
                    OldKind::Key
                } else {
                    OldKind::Full
                };
                old = Some((kind, r.tuple()?));
                marker = r.u8()?;
            }
            if marker != b'N' {
                return Err(DecodeError::UnexpectedMarker {
                    message: "Update",
                    marker: char::from(marker),
                    offset,
                });
            }
            let new = r.tuple()?;
            (
                LogicalMessage::Update(Update {
                    relation_id,
                    old,
                    new,
                }),
                "Update",
            )
        }
        b'D' => {
            let relation_id = r.u32()?;
            let offset = r.pos;
            let kind = match r.u8()? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Full,
                other => {
                    return Err(DecodeError::UnexpectedMarker {
                        message: "Delete",
                        marker: char::from(other),
                        offset,
                    });
                }
            };
            let old = (kind, r.tuple()?);
            (
                LogicalMessage::Delete(Delete { relation_id, old }),
                "Delete",
            )
        }
        b'T' => {
            let nrels = r.u32()?;
            let options = r.u8()?;
            let mut relation_ids = Vec::with_capacity((nrels as usize).min(r.remaining() / 4));
            for _ in 0..nrels {
                relation_ids.push(r.u32()?);
            }
            (
                LogicalMessage::Truncate(Truncate {
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                    relation_ids,
                }),
                "Truncate",
            )
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = Lsn(r.u64()?);
            let prefix = r.cstr()?;
            let len = r.len32()?;
            let content = r.bytes(len)?;
            (
                LogicalMessage::Message(EmittedMessage {
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content,
                }),
                "Message",
            )
        }
        other => {
            return Err(DecodeError::UnknownTag {
                tag: char::from(other),
                byte: other,
            });
        }
    };
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes {
            message: name,
            extra: r.remaining(),
        });
    }
    Ok(msg)
}

/// A checked cursor over the message bytes.
struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.pos.checked_add(N).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                needed: N - self.remaining(),
            });
        };
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..end]);
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take()?))
    }

    fn len32(&mut self) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let len = self.i32()?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { len, offset })
    }

    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                needed: len - self.remaining(),
            });
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let offset = self.pos;
        let rest = &self.buf[self.pos..];
        let nul = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::UnterminatedString { offset })?;
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|_| DecodeError::InvalidUtf8 { offset })?
            .to_string();
        self.pos += nul + 1;
        Ok(s)
    }

    fn expect_marker(&mut self, want: u8, message: &'static str) -> Result<(), DecodeError> {
        let offset = self.pos;
        let got = self.u8()?;
        if got != want {
            return Err(DecodeError::UnexpectedMarker {
                message,
                marker: char::from(got),
                offset,
            });
        }
        Ok(())
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let ncols = self.u16()?;
        // Each column takes at least one byte.
        let mut cols = Vec::with_capacity(usize::from(ncols).min(self.remaining()));
        for _ in 0..ncols {
            let offset = self.pos;
            let value = match self.u8()? {
                b'n' => ColumnValue::Null,
                b'u' => ColumnValue::UnchangedToast,
                b't' => {
                    let len = self.len32()?;
                    ColumnValue::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.len32()?;
                    ColumnValue::Binary(self.bytes(len)?)
                }
                other => {
                    return Err(DecodeError::UnknownColumnKind {
                        kind: char::from(other),
                        offset,
                    });
                }
            };
            cols.push(value);
        }
        Ok(Tuple(cols))
    }
}

/// Builders for hand-made frames, shared by this module's tests and the pipeline tests.
#[cfg(test)]
pub(crate) mod frames {
    use bytes::{BufMut, Bytes, BytesMut};

    pub fn cstr(b: &mut BytesMut, s: &str) {
        b.put_slice(s.as_bytes());
        b.put_u8(0);
    }

    pub fn begin(final_lsn: u64, ts: i64, xid: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(final_lsn);
        b.put_i64(ts);
        b.put_u32(xid);
        b.freeze()
    }

    pub fn commit(commit_lsn: u64, end_lsn: u64, ts: i64) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'C');
        b.put_u8(0);
        b.put_u64(commit_lsn);
        b.put_u64(end_lsn);
        b.put_i64(ts);
        b.freeze()
    }

    /// Columns as (is_key, name, type oid).
    pub fn relation(id: u32, ns: &str, name: &str, ident: u8, cols: &[(bool, &str, u32)]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(id);
        cstr(&mut b, ns);
        cstr(&mut b, name);
        b.put_u8(ident);
        b.put_u16(cols.len() as u16);
        for (key, n, oid) in cols {
            b.put_u8(u8::from(*key));
            cstr(&mut b, n);
            b.put_u32(*oid);
            b.put_i32(-1);
        }
        b.freeze()
    }

    /// Values: None = null, Some("\u{0}toast") = unchanged TOAST, else text.
    pub fn tuple(b: &mut BytesMut, vals: &[Option<&str>]) {
        b.put_u16(vals.len() as u16);
        for v in vals {
            match v {
                None => b.put_u8(b'n'),
                Some("\u{0}toast") => b.put_u8(b'u'),
                Some(s) => {
                    b.put_u8(b't');
                    b.put_i32(s.len() as i32);
                    b.put_slice(s.as_bytes());
                }
            }
        }
    }

    pub fn insert(rel: u32, vals: &[Option<&str>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(rel);
        b.put_u8(b'N');
        tuple(&mut b, vals);
        b.freeze()
    }

    pub fn update(rel: u32, old: Option<(u8, &[Option<&str>])>, new: &[Option<&str>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(rel);
        if let Some((kind, vals)) = old {
            b.put_u8(kind);
            tuple(&mut b, vals);
        }
        b.put_u8(b'N');
        tuple(&mut b, new);
        b.freeze()
    }

    pub fn delete(rel: u32, kind: u8, old: &[Option<&str>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'D');
        b.put_u32(rel);
        b.put_u8(kind);
        tuple(&mut b, old);
        b.freeze()
    }

    pub fn truncate(options: u8, rels: &[u32]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'T');
        b.put_u32(rels.len() as u32);
        b.put_u8(options);
        for r in rels {
            b.put_u32(*r);
        }
        b.freeze()
    }
}

#[cfg(test)]
mod tests;
