//! Names tidemark reserves for itself: the logical message prefixes it writes into
//! the WAL and the KV bucket of projection positions. They live at the bottom so the
//! config (which refuses them for user messages) and the stages that write and read
//! them share one definition.

/// Heartbeats (`heartbeat_interval_secs`): proof of progress through the WAL.
pub const HEARTBEAT_PREFIX: &str = "tidemark.heartbeat";
/// Read-your-writes markers written by `tidemark wait`.
pub const SYNC_PREFIX: &str = "tidemark.sync";
/// Backfill chunk watermarks (DBLog).
pub const WATERMARK_PREFIX: &str = "tidemark.watermark";
/// A listed table dropped and created again (a new OID under its name): its rows
/// before are gone, so the stream gets a `truncated` event here, then a backfill.
pub const RECREATED_PREFIX: &str = "tidemark.recreated";
/// The KV bucket of projections' applied positions.
pub const POSITIONS_BUCKET: &str = "tidemark_projections";

/// Whether a logical message prefix is one of tidemark's own.
pub fn is_reserved_prefix(prefix: &str) -> bool {
    [
        HEARTBEAT_PREFIX,
        SYNC_PREFIX,
        WATERMARK_PREFIX,
        RECREATED_PREFIX,
    ]
    .contains(&prefix)
}
