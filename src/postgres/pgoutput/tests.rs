use super::frames::*;
use super::*;
use bytes::{BufMut, BytesMut};
use proptest::prelude::*;

fn text(s: &str) -> ColumnValue {
    ColumnValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

#[test]
fn begin_and_commit() {
    assert_eq!(
        decode(begin(0x1_0000_0010, 42, 7)).unwrap(),
        LogicalMessage::Begin(Begin {
            final_lsn: Lsn(0x1_0000_0010),
            commit_time: PgTimestamp(42),
            xid: 7
        })
    );
    assert_eq!(
        decode(commit(10, 20, 30)).unwrap(),
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time: PgTimestamp(30)
        })
    );
}

#[test]
fn relation_with_columns() {
    let msg = decode(relation(
        16384,
        "public",
        "orders",
        b'd',
        &[(true, "id", 23), (false, "note", 25)],
    ))
    .unwrap();
    let LogicalMessage::Relation(rel) = msg else {
        panic!("not a relation: {msg:?}")
    };
    assert_eq!(rel.id, 16384);
    assert_eq!(rel.namespace, "public");
    assert_eq!(rel.name, "orders");
    assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
    assert_eq!(rel.columns.len(), 2);
    assert!(rel.columns[0].is_key);
    assert!(!rel.columns[1].is_key);
    assert_eq!(rel.columns[1].type_oid, 25);
    assert_eq!(rel.columns[1].type_modifier, -1);
}

#[test]
fn insert_update_delete_truncate() {
    assert_eq!(
        decode(insert(1, &[Some("1"), None, Some("\u{0}toast")])).unwrap(),
        LogicalMessage::Insert {
            relation_id: 1,
            new: Tuple(vec![
                text("1"),
                ColumnValue::Null,
                ColumnValue::UnchangedToast
            ])
        }
    );
    assert_eq!(
        decode(update(2, None, &[Some("x")])).unwrap(),
        LogicalMessage::Update(Update {
            relation_id: 2,
            old: None,
            new: Tuple(vec![text("x")])
        })
    );
    assert_eq!(
        decode(update(2, Some((b'K', &[Some("1")])), &[Some("2")])).unwrap(),
        LogicalMessage::Update(Update {
            relation_id: 2,
            old: Some((OldKind::Key, Tuple(vec![text("1")]))),
            new: Tuple(vec![text("2")])
        })
    );
    assert_eq!(
        decode(update(2, Some((b'O', &[Some("1")])), &[Some("2")])).unwrap(),
        LogicalMessage::Update(Update {
            relation_id: 2,
            old: Some((OldKind::Full, Tuple(vec![text("1")]))),
            new: Tuple(vec![text("2")])
        })
    );
    assert_eq!(
        decode(delete(3, b'O', &[Some("1"), None])).unwrap(),
        LogicalMessage::Delete(Delete {
            relation_id: 3,
            old: (OldKind::Full, Tuple(vec![text("1"), ColumnValue::Null]))
        })
    );
    assert_eq!(
        decode(truncate(3, &[5, 6])).unwrap(),
        LogicalMessage::Truncate(Truncate {
            cascade: true,
            restart_identity: true,
            relation_ids: vec![5, 6]
        })
    );
}

#[test]
fn emitted_message_type_and_origin() {
    let mut b = BytesMut::new();
    b.put_u8(b'M');
    b.put_u8(1);
    b.put_u64(99);
    cstr(&mut b, "outbox");
    b.put_i32(3);
    b.put_slice(b"abc");
    assert_eq!(
        decode(b.freeze()).unwrap(),
        LogicalMessage::Message(EmittedMessage {
            transactional: true,
            lsn: Lsn(99),
            prefix: "outbox".into(),
            content: Bytes::from_static(b"abc")
        })
    );

    let mut b = BytesMut::new();
    b.put_u8(b'Y');
    b.put_u32(70000);
    cstr(&mut b, "public");
    cstr(&mut b, "mood");
    assert_eq!(
        decode(b.freeze()).unwrap(),
        LogicalMessage::Type(TypeInfo {
            id: 70000,
            namespace: "public".into(),
            name: "mood".into()
        })
    );

    let mut b = BytesMut::new();
    b.put_u8(b'O');
    b.put_u64(5);
    cstr(&mut b, "node_a");
    assert_eq!(
        decode(b.freeze()).unwrap(),
        LogicalMessage::Origin {
            commit_lsn: Lsn(5),
            name: "node_a".into()
        }
    );
}

#[test]
fn malformed_input_gives_precise_errors() {
    assert_eq!(decode(Bytes::new()), Err(DecodeError::Empty));
    assert_eq!(
        decode(Bytes::from_static(b"S\0\0\0\x01")),
        Err(DecodeError::UnknownTag {
            tag: 'S',
            byte: b'S'
        })
    );
    assert_eq!(
        decode(Bytes::from_static(b"B\0\0")),
        Err(DecodeError::Truncated {
            offset: 1,
            needed: 6
        })
    );
    let mut frame = BytesMut::from(&insert(1, &[Some("abc")])[..]);
    frame.truncate(frame.len() - 1);
    assert!(matches!(
        decode(frame.freeze()),
        Err(DecodeError::Truncated { .. })
    ));
    let mut frame = BytesMut::from(&begin(1, 2, 3)[..]);
    frame.put_u8(0);
    assert_eq!(
        decode(frame.freeze()),
        Err(DecodeError::TrailingBytes {
            message: "Begin",
            extra: 1
        })
    );
    let bad_kind = Bytes::from_static(b"I\0\0\0\x01N\0\x01x");
    assert_eq!(
        decode(bad_kind),
        Err(DecodeError::UnknownColumnKind {
            kind: 'x',
            offset: 8
        })
    );
    let neg = Bytes::from_static(b"I\0\0\0\x01N\0\x01t\xff\xff\xff\xff");
    assert_eq!(
        decode(neg),
        Err(DecodeError::NegativeLength { len: -1, offset: 9 })
    );
    let bad_marker = Bytes::from_static(b"D\0\0\0\x01N\0\0");
    assert!(matches!(
        decode(bad_marker),
        Err(DecodeError::UnexpectedMarker {
            message: "Delete",
            marker: 'N',
            ..
        })
    ));
    let unterminated = Bytes::from_static(b"Y\0\0\0\x01public");
    assert_eq!(
        decode(unterminated),
        Err(DecodeError::UnterminatedString { offset: 5 })
    );
}

#[test]
fn timestamps_format_as_rfc3339() {
    assert_eq!(PgTimestamp(0).to_rfc3339(), "2000-01-01T00:00:00Z");
    assert_eq!(
        PgTimestamp(1_500_000).to_rfc3339(),
        "2000-01-01T00:00:01.5Z"
    );
    assert_eq!(PgTimestamp(-1).to_rfc3339(), "1999-12-31T23:59:59.999999Z");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(Bytes::from(data));
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_tag_never_panic(
        tag in proptest::sample::select(b"BCORYIUDTM".to_vec()),
        data in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut b = vec![tag];
        b.extend(data);
        let _ = decode(Bytes::from(b));
    }

    #[test]
    fn truncating_a_valid_frame_is_an_error_not_a_panic(cut in 0usize..40) {
        let frame = update(9, Some((b'O', &[Some("a"), None])), &[Some("bb"), Some("\u{0}toast")]);
        let cut = cut.min(frame.len());
        let res = decode(frame.slice(..cut));
        if cut < frame.len() {
            prop_assert!(res.is_err());
        } else {
            prop_assert!(res.is_ok());
        }
    }
}
