//! The one writer of tidemark's markers into the WAL: heartbeats, `wait` positions,
//! snapshot and backfill watermarks, and the recreated-table markers.
//!
//! On PostgreSQL 14 and newer a marker is a transactional logical decoding message
//! (`pg_logical_emit_message(true, prefix, content)`). PostgreSQL 12 and 13 have no
//! `messages` option in pgoutput, so there a marker is a row of the signal table
//! (`signal_table`, default `tidemark.signal`), inserted and deleted in the same
//! transaction: the INSERT reaches the replication stream at the same place in its
//! transaction as a message would, and the table stays empty. The table is in the
//! source's publication, and the pipeline turns its inserts back into messages and
//! never publishes its rows as data (the watermark table of the DBLog design).

use tracing::{info, warn};

use super::catalog::{Catalog, CatalogError};
use super::pgoutput::{ColumnValue, EmittedMessage, Relation, Tuple};
use super::replication::{quote_ident, quote_literal};
use super::version::ServerVersion;
use crate::position::Lsn;

/// How markers reach the stream on a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signals {
    /// Logical messages (PostgreSQL 14+).
    Messages,
    /// Rows of the signal table (PostgreSQL 12 and 13).
    Table,
    /// Neither: PostgreSQL 12 or 13 without a usable signal table. The core stream
    /// works; snapshots, backfills, heartbeats, `wait` and table markers do not.
    Unavailable(String),
}

impl Signals {
    pub fn available(&self) -> bool {
        !matches!(self, Signals::Unavailable(_))
    }
}

/// The signal table's name, quoted.
pub fn qualified(table: &(String, String)) -> String {
    format!("{}.{}", quote_ident(&table.0), quote_ident(&table.1))
}

/// The SQL that writes one marker, as one statement or two (usable alone, where it
/// commits on its own, or inside an open transaction).
pub fn emit_sql(
    version: ServerVersion,
    table: &(String, String),
    prefix: &str,
    content: &str,
) -> String {
    if version.logical_messages() {
        format!(
            "SELECT pg_logical_emit_message(true, {}, {})",
            quote_literal(prefix),
            quote_literal(content)
        )
    } else {
        let t = qualified(table);
        format!(
            "INSERT INTO {t} (prefix, content) VALUES ({}, {}); DELETE FROM {t} WHERE id = lastval()",
            quote_literal(prefix),
            quote_literal(content)
        )
    }
}

/// The SQL that makes the signal table (for an operator who makes it by hand too).
pub fn create_sql(table: &(String, String)) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, prefix text NOT NULL, content text NOT NULL)",
        quote_ident(&table.0),
        qualified(table)
    )
}

/// What is lost without the signal table, for warnings and `check`.
pub const LOST_WITHOUT: &str = "without it the changes still stream, but initial snapshots, backfills, heartbeats, `tidemark wait` and the truncated events of recreated tables cannot work";

/// Makes sure markers can reach the stream of `publication`: on 14+ nothing to do; on
/// 12 and 13 the signal table exists (made when missing) and the publication sends
/// it (added when `create` allows). Whatever fails is said, with the fix, in
/// `Signals::Unavailable`; nothing here stops the source.
pub async fn ensure(
    catalog: &Catalog,
    table: &(String, String),
    publication: &str,
    create: bool,
) -> Result<Signals, CatalogError> {
    let version = catalog.version();
    if version.logical_messages() {
        return Ok(Signals::Messages);
    }
    let name = qualified(table);
    let exists = catalog
        .client()
        .query_opt(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.0, &table.1],
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "look up the signal table",
            source,
        })?
        .is_some();
    if !exists {
        if let Err(e) = catalog.client().batch_execute(&create_sql(table)).await {
            return Ok(Signals::Unavailable(format!(
                "PostgreSQL {version} has no logical messages in pgoutput (14+), and tidemark could not create its signal table {name}: {}; create it as a role that may (it needs CREATE on the database, or an existing schema {}): {}; {LOST_WITHOUT}",
                crate::error::ErrorChain(&e),
                quote_ident(&table.0),
                create_sql(table)
            )));
        }
        info!(table = %name, %version, "signal table created: PostgreSQL before 14 has no logical messages in pgoutput, so tidemark's markers travel as its rows");
    }
    let published = catalog
        .client()
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.0, &table.1],
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "look up the signal table in the publication",
            source,
        })?
        .is_some();
    if !published {
        let add = format!(
            "ALTER PUBLICATION {} ADD TABLE {name}",
            quote_ident(publication)
        );
        if !create {
            return Ok(Signals::Unavailable(format!(
                "PostgreSQL {version} has no logical messages in pgoutput (14+), and publication {publication:?} does not send tidemark's signal table {name} (create_publication = false): run {add}; {LOST_WITHOUT}"
            )));
        }
        if let Err(e) = catalog.client().batch_execute(&add).await {
            return Ok(Signals::Unavailable(format!(
                "PostgreSQL {version} has no logical messages in pgoutput (14+), and tidemark could not add its signal table {name} to publication {publication:?}: {}; run {add} as the publication's owner; {LOST_WITHOUT}",
                crate::error::ErrorChain(&e)
            )));
        }
        info!(table = %name, publication, "signal table added to the publication");
    }
    // Writing a marker needs INSERT and DELETE on it (a table made by someone else).
    let row = catalog
        .client()
        .query_one(
            "SELECT has_table_privilege(format('%I.%I', $1::text, $2::text), 'INSERT') \
             AND has_table_privilege(format('%I.%I', $1::text, $2::text), 'DELETE')",
            &[&table.0, &table.1],
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "check the signal table's privileges",
            source,
        })?;
    if !row.get::<_, bool>(0) {
        warn!(table = %name, "no INSERT and DELETE on the signal table");
        return Ok(Signals::Unavailable(format!(
            "PostgreSQL {version} has no logical messages in pgoutput (14+), and this role may not INSERT and DELETE on tidemark's signal table {name}: GRANT INSERT, DELETE ON {name} TO the role; {LOST_WITHOUT}"
        )));
    }
    Ok(Signals::Table)
}

/// What `ensure` would find and do, without changing anything (for `check`): `Ok`
/// with what `run` will do, or `Err` with why markers could not reach the stream.
pub async fn inspect(
    catalog: &Catalog,
    table: &(String, String),
    publication: &str,
    create: bool,
) -> Result<Result<String, String>, CatalogError> {
    let name = qualified(table);
    let row = catalog
        .client()
        .query_one(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL, \
               EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $3 AND schemaname = $1 AND tablename = $2), \
               EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $3), \
               CASE WHEN EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) \
                 THEN has_schema_privilege($1, 'CREATE') \
                 ELSE has_database_privilege(current_database(), 'CREATE') END",
            &[&table.0, &table.1, &publication],
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "look up the signal table",
            source,
        })?;
    let (exists, published, pub_exists, can_create): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !exists && !can_create {
        return Ok(Err(format!(
            "tidemark's signal table {name} does not exist, and this role may not create it (it needs CREATE on the database, or on schema {}): run {} as a role that may; {LOST_WITHOUT}",
            quote_ident(&table.0),
            create_sql(table)
        )));
    }
    if !published && pub_exists && !create {
        return Ok(Err(format!(
            "publication {publication:?} does not send tidemark's signal table {name} (create_publication = false): run ALTER PUBLICATION {} ADD TABLE {name}; {LOST_WITHOUT}",
            quote_ident(publication)
        )));
    }
    Ok(Ok(match (exists, published) {
        (true, true) => format!("{name} exists and is published: markers travel as its rows"),
        (true, false) => {
            format!("{name} exists; `run` adds it to the publication: markers travel as its rows")
        }
        (false, _) => format!(
            "{name} will be created by `run` (schema and table) and published: markers travel as its rows"
        ),
    }))
}

/// The signal table as the replication stream describes it: which relation id it
/// has, and where its columns are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalRelation {
    pub id: u32,
    prefix: Option<usize>,
    content: Option<usize>,
}

impl SignalRelation {
    /// The signal table's description, if `r` is the signal table.
    pub fn of(r: &Relation, table: &(String, String)) -> Option<SignalRelation> {
        (r.namespace == table.0 && r.name == table.1).then(|| {
            let at = |n: &str| r.columns.iter().position(|c| c.name == n);
            SignalRelation {
                id: r.id,
                prefix: at("prefix"),
                content: at("content"),
            }
        })
    }

    /// The marker an inserted row carries, as the message it stands for; `None` for a
    /// row that is not one (a table of that name without the columns, NULLs).
    pub fn message(&self, row: &Tuple, lsn: Lsn) -> Option<EmittedMessage> {
        let text = |i: Option<usize>| match row.0.get(i?)? {
            ColumnValue::Text(b) | ColumnValue::Binary(b) => Some(b.clone()),
            _ => None,
        };
        let prefix = String::from_utf8(text(self.prefix)?.to_vec()).ok()?;
        Some(EmittedMessage {
            transactional: true,
            lsn,
            prefix,
            content: text(self.content)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::pgoutput::{Column, ReplicaIdentity};
    use bytes::Bytes;

    #[test]
    fn a_signal_row_reads_back_as_its_message() {
        let t = ("tidemark".to_string(), "signal".to_string());
        let col = |name: &str| Column {
            is_key: name == "id",
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        let rel = |ns: &str, name: &str| Relation {
            id: 7,
            namespace: ns.into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id"), col("prefix"), col("content")],
        };
        assert_eq!(SignalRelation::of(&rel("public", "signal"), &t), None);
        let s = SignalRelation::of(&rel("tidemark", "signal"), &t).unwrap();
        assert_eq!(s.id, 7);
        let row = Tuple(vec![
            ColumnValue::Text(Bytes::from_static(b"1")),
            ColumnValue::Text(Bytes::from_static(b"tidemark.watermark")),
            ColumnValue::Text(Bytes::from_static(b"{\"a\":1}")),
        ]);
        let m = s.message(&row, Lsn(42)).unwrap();
        assert_eq!(m.prefix, "tidemark.watermark");
        assert_eq!(&m.content[..], b"{\"a\":1}");
        assert!(m.transactional);
        let nulls = Tuple(vec![
            ColumnValue::Null,
            ColumnValue::Null,
            ColumnValue::Null,
        ]);
        assert!(s.message(&nulls, Lsn(42)).is_none());
    }

    #[test]
    fn a_marker_is_a_message_on_14_and_a_row_before() {
        let t = ("tidemark".to_string(), "signal".to_string());
        let on14 = emit_sql(ServerVersion(140000), &t, "tidemark.sync", "it's");
        assert_eq!(
            on14,
            "SELECT pg_logical_emit_message(true, 'tidemark.sync', 'it''s')"
        );
        let on13 = emit_sql(ServerVersion(130023), &t, "tidemark.sync", "it's");
        assert!(on13.starts_with(
            "INSERT INTO \"tidemark\".\"signal\" (prefix, content) VALUES ('tidemark.sync', 'it''s');"
        ));
        assert!(on13.ends_with("DELETE FROM \"tidemark\".\"signal\" WHERE id = lastval()"));
        assert!(create_sql(&t).contains("CREATE TABLE IF NOT EXISTS \"tidemark\".\"signal\""));
    }
}
