//! Positions: the Postgres log position (`Lsn`), the identity of an event (`EventId`)
//! and the pure rule that turns durable state (the slot's confirmed LSN and the last
//! event stored in the stream) into "which events are already stored".
//!
//! Nothing here touches I/O. Every high-water mark in tidemark only moves forward; the
//! types here make that easy to state and to property-test.

use std::fmt;
use std::str::FromStr;

/// A PostgreSQL write-ahead log position, printed and parsed as `X/Y` (two hex numbers,
/// the high and low 32 bits), as Postgres prints `pg_lsn`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// A text that is not an LSN. The message quotes the input and shows the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid LSN {input:?}: expected two hexadecimal numbers of at most 8 digits separated by '/', like 16/B374D848"
)]
pub struct LsnParseError {
    pub input: String,
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError {
            input: s.to_string(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let part = |p: &str| -> Result<u64, LsnParseError> {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(p, 16).map_err(|_| err())
        };
        Ok(Lsn((part(hi)? << 32) | part(lo)?))
    }
}

/// The identity of one event: `<source>:<commit LSN>:<index in transaction>`.
///
/// It is the CloudEvents `id` and the JetStream `Nats-Msg-Id`. Within one source,
/// events are totally ordered by `(commit_lsn, index)`: Postgres sends transactions in
/// commit order and commit LSNs strictly increase.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventId {
    pub source: String,
    pub commit_lsn: Lsn,
    pub index: u64,
}

impl EventId {
    /// The position of this event within its source, for ordering.
    pub fn position(&self) -> (Lsn, u64) {
        (self.commit_lsn, self.index)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.source, self.commit_lsn, self.index)
    }
}

/// A text that is not an event id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid event id {input:?}: expected <source>:<commit LSN>:<index>, like store:0/16B3748:0"
)]
pub struct EventIdParseError {
    pub input: String,
}

impl FromStr for EventId {
    type Err = EventIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || EventIdParseError {
            input: s.to_string(),
        };
        // The source name cannot contain ':' (config validation), so split from the right.
        let mut parts = s.rsplitn(3, ':');
        let index = parts.next().ok_or_else(err)?;
        let lsn = parts.next().ok_or_else(err)?;
        let source = parts.next().ok_or_else(err)?;
        if source.is_empty() {
            return Err(err());
        }
        Ok(EventId {
            source: source.to_string(),
            commit_lsn: lsn.parse().map_err(|_| err())?,
            index: index.parse().map_err(|_| err())?,
        })
    }
}

/// What the stream already holds for one source, read at pipeline start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamTail {
    /// The stream's last sequence number (0 for a stream that never held a message).
    pub last_seq: u64,
    /// Position of the last stored event, if the stream still holds it.
    pub last_event: Option<(Lsn, u64)>,
}

impl StreamTail {
    /// The rule at the heart of exactly-once: after a restart, Postgres resends every
    /// transaction not yet confirmed; an event is already stored when its position is at
    /// or below the last stored one. Events arrive in `(commit_lsn, index)` order, so this
    /// skips exactly a prefix of what is resent.
    pub fn is_stored(&self, commit_lsn: Lsn, index: u64) -> bool {
        match self.last_event {
            Some(last) => (commit_lsn, index) <= last,
            None => false,
        }
    }
}

/// A position that only moves forward. Updates that would move it back are ignored,
/// which is the right thing for feedback LSNs that can arrive out of order (a keepalive
/// carrying an older WAL end than the last commit seen).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HighWater(Lsn);

impl HighWater {
    pub fn new(start: Lsn) -> Self {
        HighWater(start)
    }

    pub fn get(&self) -> Lsn {
        self.0
    }

    /// Moves the mark to `lsn` if it is ahead; returns whether it moved.
    pub fn advance(&mut self, lsn: Lsn) -> bool {
        let before = self.0;
        self.0 = self.0.max(lsn);
        debug_assert!(self.0 >= before, "high-water mark moved back");
        self.0 > before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lsn_prints_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!("0/16B3748".parse::<Lsn>(), Ok(Lsn(0x16B3748)));
        assert_eq!("16/b374d848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!(
            "FFFFFFFF/FFFFFFFF".parse::<Lsn>(),
            Ok(Lsn(u64::MAX)),
            "the largest LSN parses"
        );
    }

    #[test]
    fn malformed_lsn_is_rejected_with_the_input_quoted() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "16B374D848",
            "0x1/0",
            "1/2/3",
            "G/0",
            "1/123456789",
            " 1/0",
            "-1/0",
            "+1/0",
        ] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert_eq!(err.input, bad);
        }
        let err = "16-B374D848".parse::<Lsn>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid LSN \"16-B374D848\": expected two hexadecimal numbers of at most 8 digits separated by '/', like 16/B374D848"
        );
    }

    #[test]
    fn event_id_round_trips_and_rejects_garbage() {
        let id: EventId = "store:0/16B3748:12".parse().unwrap();
        assert_eq!(id.source, "store");
        assert_eq!(id.commit_lsn, Lsn(0x16B3748));
        assert_eq!(id.index, 12);
        assert_eq!(id.to_string(), "store:0/16B3748:12");
        for bad in [
            "",
            "store",
            "store:0/1",
            ":0/1:2",
            "store:0/1:x",
            "store:zz:1",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn empty_tail_stores_nothing_and_tail_skips_a_prefix() {
        let empty = StreamTail {
            last_seq: 0,
            last_event: None,
        };
        assert!(!empty.is_stored(Lsn(0), 0));
        let tail = StreamTail {
            last_seq: 9,
            last_event: Some((Lsn(100), 3)),
        };
        assert!(tail.is_stored(Lsn(90), 7));
        assert!(tail.is_stored(Lsn(100), 3));
        assert!(!tail.is_stored(Lsn(100), 4));
        assert!(!tail.is_stored(Lsn(101), 0));
    }

    proptest! {
        #[test]
        fn lsn_text_round_trips(v: u64) {
            let text = Lsn(v).to_string();
            prop_assert_eq!(text.parse::<Lsn>(), Ok(Lsn(v)));
        }

        #[test]
        fn lsn_parse_never_panics(s in ".{0,24}") {
            let _ = s.parse::<Lsn>();
        }

        #[test]
        fn lsn_order_matches_integer_order(a: u64, b: u64) {
            prop_assert_eq!(Lsn(a).cmp(&Lsn(b)), a.cmp(&b));
        }

        #[test]
        fn event_id_round_trips(src in "[a-z][a-z0-9_-]{0,15}", lsn: u64, idx: u64) {
            let id = EventId { source: src, commit_lsn: Lsn(lsn), index: idx };
            prop_assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
        }

        #[test]
        fn high_water_never_moves_back(steps in proptest::collection::vec(any::<u64>(), 0..64)) {
            let mut hw = HighWater::new(Lsn(0));
            let mut max = 0u64;
            for s in steps {
                let moved = hw.advance(Lsn(s));
                prop_assert_eq!(moved, s > max);
                max = max.max(s);
                prop_assert_eq!(hw.get(), Lsn(max));
            }
        }

        #[test]
        fn skipped_events_form_a_prefix(
            tail_lsn in 0u64..50, tail_idx in 0u64..5,
            mut events in proptest::collection::vec((0u64..50, 0u64..5), 0..40),
        ) {
            events.sort();
            let tail = StreamTail { last_seq: 1, last_event: Some((Lsn(tail_lsn), tail_idx)) };
            let stored: Vec<bool> = events.iter().map(|(l, i)| tail.is_stored(Lsn(*l), *i)).collect();
            // Once an event is not stored, no later event is.
            let first_new = stored.iter().position(|s| !s).unwrap_or(stored.len());
            prop_assert!(stored[first_new..].iter().all(|s| !s));
        }
    }
}
