use super::*;

#[test]
fn quoting() {
    assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    assert_eq!(quote_literal("it's"), "'it''s'");
    assert_eq!(quote_literal(&quote_ident("pub")), "'\"pub\"'");
}

#[test]
fn oversized_message_error_names_the_lsn_and_the_fix() {
    let e = ReplicationError::MessageTooLarge {
        len: 5_000_000,
        limit: 2_000_000,
        lsn: Some(Lsn(0x10)),
    };
    let msg = e.to_string();
    assert!(
        msg.contains("5000000-byte replication message at LSN 0/10"),
        "{msg}"
    );
    assert!(msg.contains("raise max_row_bytes"), "{msg}");
}
