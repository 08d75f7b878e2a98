use super::*;

fn status(slot: Option<SlotStatus>) -> SourceStatus {
    SourceStatus {
        source: "store".into(),
        slot_name: "s".into(),
        stream_name: "S".into(),
        postgres: Ok(PgStatus {
            current_wal_lsn: "0/100".into(),
            slot,
        }),
        backfills: Vec::new(),
        projections: Vec::new(),
        stream: Ok(StreamStatus {
            messages: 2,
            first_seq: 1,
            last_seq: 2,
            first_lsn: Some("0/10".into()),
            last_lsn: Some("0/20".into()),
            consumers: vec![],
        }),
    }
}

#[test]
fn a_missing_or_lost_slot_is_a_problem() {
    assert_eq!(
        status(None).problems(),
        vec!["replication slot \"s\" does not exist"]
    );
    let lost = SlotStatus {
        active: false,
        active_pid: None,
        confirmed_flush_lsn: None,
        restart_lsn: None,
        wal_status: Some("lost".into()),
        retained_wal_bytes: None,
        lag_bytes: None,
    };
    assert_eq!(status(Some(lost)).problems().len(), 1);
    let text = render(&status(None));
    assert!(text.contains("slot      MISSING"), "{text}");
    assert!(
        text.contains("stream    2 messages  seq 1..2  LSN 0/10..0/20"),
        "{text}"
    );
}

#[test]
fn byte_sizes_read_well() {
    assert_eq!(bytes(Some(512)), "512 B");
    assert_eq!(bytes(Some(2048)), "2.0 KiB");
    assert_eq!(bytes(Some(3 * 1048576)), "3.0 MiB");
    assert_eq!(bytes(None), "-");
}
