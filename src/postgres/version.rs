//! What each PostgreSQL major version can do for tidemark, in one place: every
//! version-dependent path asks `ServerVersion` rather than comparing numbers itself.

use std::fmt;

/// The oldest major version tidemark streams from: pgoutput with `proto_version` 1,
/// TRUNCATE in the stream (11), and `pg_replication_slots.wal_status`-era slot
/// handling; 11 reached its end of life in 2023 and is refused.
pub const OLDEST_SUPPORTED: u32 = 12;

/// What `idle_replication_slot_timeout` above 0 risks, and the fix: said by `check`
/// and at start-up.
pub const IDLE_SLOT_TIMEOUT_RISK: &str = "PostgreSQL invalidates a slot no walsender used for that long (tidemark stopped), and the changes made meanwhile never reach the stream (`tidemark resync` is the repair); keep tidemark running, or set idle_replication_slot_timeout = 0";

/// A server's version, as `server_version_num` gives it (`130023` is 13.23).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(pub u32);

impl ServerVersion {
    /// Parses `server_version_num`.
    pub fn from_num(text: &str) -> Option<ServerVersion> {
        text.trim().parse().ok().map(ServerVersion)
    }

    pub fn major(self) -> u32 {
        self.0 / 10_000
    }

    /// Whether tidemark supports this version at all.
    pub fn supported(self) -> bool {
        self.major() >= OLDEST_SUPPORTED
    }

    /// pgoutput's `messages` option: logical decoding messages
    /// (`pg_logical_emit_message`) in the stream (14+). Before it, tidemark's markers
    /// travel as rows of its signal table.
    pub fn logical_messages(self) -> bool {
        self.major() >= 14
    }

    /// `publish_via_partition_root` (13+).
    pub fn publish_via_root(self) -> bool {
        self.major() >= 13
    }

    /// Row filters and column lists on a publication (15+).
    pub fn row_filters(self) -> bool {
        self.major() >= 15
    }

    /// Failover slots (`failover = true`, synced to standbys) (17+).
    pub fn failover_slots(self) -> bool {
        self.major() >= 17
    }

    /// `publish_generated_columns` (18+).
    pub fn generated_columns(self) -> bool {
        self.major() >= 18
    }

    /// `idle_replication_slot_timeout` (18+).
    pub fn idle_slot_timeout(self) -> bool {
        self.major() >= 18
    }

    /// `pg_replication_slots.wal_status` (13+).
    pub fn slot_wal_status(self) -> bool {
        self.major() >= 13
    }

    /// What tidemark does differently on this version than on the newest, one line
    /// each, for `check` and the start-up log.
    pub fn differences(self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.logical_messages() {
            out.push(
                "no logical messages in pgoutput (14+): snapshot and backfill watermarks, heartbeats, `wait` and table markers travel as rows of tidemark's signal table; [[source.message]] is refused (use an outbox table)",
            );
        }
        if !self.publish_via_root() {
            out.push(
                "no publish_via_partition_root (13+): a partitioned table cannot be published; list its partitions",
            );
        }
        if !self.row_filters() {
            out.push("no row filters or column lists on publications (15+)");
        }
        if !self.slot_wal_status() {
            out.push(
                "no wal_status on slots (13+): a slot that lost WAL is seen only when streaming fails",
            );
        }
        if !self.failover_slots() {
            out.push(
                "no failover slots (17+): a promoted standby has no copy of the slot; after a failover the source stops and asks for `tidemark resync`",
            );
        }
        out
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let major = self.major();
        if major >= 10 {
            write!(f, "{}.{}", major, self.0 % 10_000)
        } else {
            write!(f, "{}.{}.{}", major, (self.0 / 100) % 100, self.0 % 100)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_print_and_gate_features() {
        let v13 = ServerVersion::from_num("130023").unwrap();
        assert_eq!(v13.major(), 13);
        assert_eq!(v13.to_string(), "13.23");
        assert!(v13.supported() && !v13.logical_messages() && v13.publish_via_root());
        let v12 = ServerVersion::from_num("120022").unwrap();
        assert!(v12.supported() && !v12.publish_via_root() && !v12.slot_wal_status());
        let v11 = ServerVersion::from_num("110022").unwrap();
        assert!(!v11.supported());
        assert_eq!(ServerVersion(90624).to_string(), "9.6.24");
        let v18 = ServerVersion::from_num("180006").unwrap();
        assert!(v18.logical_messages() && v18.failover_slots() && v18.generated_columns());
        assert!(v18.differences().is_empty());
        assert_eq!(ServerVersion(140023).differences().len(), 2);
        assert_eq!(ServerVersion(120022).differences().len(), 5);
        assert!(ServerVersion::from_num("x").is_none());
    }
}
