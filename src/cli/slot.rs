//! `slot drop`, `reset` and `resync`: the CLI's side of the slot operations (asks for
//! confirmation, calls `ops`, tells what was done).

use super::*;
use crate::ops::{self, ResetMode, ResetReport, StreamOutcome};

pub(super) async fn slot_drop(src: &SourceConfig, force: bool) -> Outcome {
    ops::drop_slot(src, force).await?;
    println!("dropped replication slot {:?}", src.slot);
    Ok(())
}

pub(super) async fn reset(
    src: &SourceConfig,
    nats: &NatsConfig,
    mode: Option<ResetMode>,
    yes: bool,
    force: bool,
) -> Outcome {
    let Some(mode) = mode.filter(|_| yes) else {
        return Err(Failure::Usage(format!(
            "reset drops replication slot {:?} and starts the source over from now; changes made before are not sent again. Pass --purge-stream --yes to also delete every event in stream {:?} (consumers must rebuild), or --keep-stream --yes to keep them and mark the discontinuity",
            src.slot, src.stream.name
        )));
    };
    let report = ops::reset(src, nats, mode, force, "reset").await?;
    tell_reset(src, &report);
    println!(
        "source {:?} reset: the next run streams changes from the new slot on",
        src.name
    );
    Ok(())
}

/// New slot, gap marker, and a backfill of every published table.
pub(super) async fn resync(
    src: &SourceConfig,
    nats: &NatsConfig,
    yes: bool,
    force: bool,
) -> Outcome {
    if !yes {
        return Err(Failure::Usage(format!(
            "resync creates a new replication slot {:?}, keeps stream {:?} with a tidemark.reset event at the gap, and backfills every published table; pass --yes",
            src.slot, src.stream.name
        )));
    }
    let report = ops::resync(src, nats, force).await?;
    tell_reset(src, &report.reset);
    println!(
        "source {:?} reset: the next run streams changes from the new slot on",
        src.name
    );
    println!(
        "queued a backfill of {} table(s): the next `tidemark run` streams from the new slot and sends every table's rows after the marker",
        report.queued
    );
    for table in &report.unread {
        eprintln!(
            "warning: table {table} has no primary key, so a backfill cannot page it: its rows from before the gap are NOT sent after the marker (its changes from the new slot on are). Give it a key, or name a unique NOT NULL key in its mapping ([[source.table]] name = \"{table}\", key = [\"...\"]), then run `tidemark backfill --table {table}`"
        );
    }
    Ok(())
}

fn tell_reset(src: &SourceConfig, report: &ResetReport) {
    if report.dropped_slot {
        println!("dropped replication slot {:?}", src.slot);
    }
    match &report.stream {
        StreamOutcome::Untouched => {}
        StreamOutcome::Purged(n) => println!("purged {n} events from stream {:?}", src.stream.name),
        StreamOutcome::Missing => println!(
            "stream {:?} does not exist; nothing to purge",
            src.stream.name
        ),
        StreamOutcome::Marked { msg_id, seq } => println!(
            "kept stream {:?}; reset marker {msg_id} at sequence {seq}",
            src.stream.name
        ),
    }
    if let Some(start) = report.created_slot {
        println!("created replication slot {:?} at {start}", src.slot);
    }
}
