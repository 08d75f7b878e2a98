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

use tracing::info;

use super::catalog::{Catalog, CatalogError};
use super::pgoutput::{ColumnValue, EmittedMessage, Relation, Tuple};
use super::replication::{quote_ident, quote_literal};
use super::version::ServerVersion;
use crate::position::Lsn;

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

/// What the database holds of the signal table and its publication, read in one
/// query, so that `ensure` (for `run`) and `inspect` (for `check`) judge the same facts.
struct State {
    exists: bool,
    /// The publication sends it.
    published: bool,
    publication_exists: bool,
    /// The role may create it (CREATE on its schema, or on the database when the
    /// schema is missing too).
    can_create: bool,
    /// The role may write markers into it (INSERT and DELETE).
    can_write: bool,
}

async fn state(
    catalog: &Catalog,
    table: &(String, String),
    publication: &str,
) -> Result<State, CatalogError> {
    let row = catalog
        .client()
        .query_one(
            "SELECT x.r IS NOT NULL, \
               EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $3 AND schemaname = $1 AND tablename = $2), \
               EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $3), \
               CASE WHEN EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) \
                 THEN has_schema_privilege($1, 'CREATE') \
                 ELSE has_database_privilege(current_database(), 'CREATE') END, \
               COALESCE(has_table_privilege(x.r, 'INSERT') AND has_table_privilege(x.r, 'DELETE'), false) \
             FROM (SELECT to_regclass(format('%I.%I', $1::text, $2::text))::oid AS r) x",
            &[&table.0, &table.1, &publication],
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "look up the signal table",
            source,
        })?;
    Ok(State {
        exists: row.get(0),
        published: row.get(1),
        publication_exists: row.get(2),
        can_create: row.get(3),
        can_write: row.get(4),
    })
}

/// Why markers cannot reach the stream when the publication does not send the
/// signal table and tidemark may not add it.
fn unpublished(publication: &str, table: &(String, String)) -> String {
    format!(
        "publication {publication:?} does not send tidemark's signal table {} (create_publication = false): run ALTER PUBLICATION {} ADD TABLE {}; {LOST_WITHOUT}",
        qualified(table),
        quote_ident(publication),
        qualified(table)
    )
}

/// Why markers cannot reach the stream when the role may not write the signal table.
fn unwritable(table: &(String, String)) -> String {
    format!(
        "this role may not INSERT and DELETE on tidemark's signal table {}: GRANT INSERT, DELETE ON {} TO the role; {LOST_WITHOUT}",
        qualified(table),
        qualified(table)
    )
}

/// Makes sure markers can reach the stream of `publication`: on 14+ nothing to do; on
/// 12 and 13 the signal table exists (made when missing) and the publication sends
/// it (added when `create` allows). Returns why markers cannot reach the stream, with
/// the fix, when they cannot; nothing here stops the source.
pub async fn ensure(
    catalog: &Catalog,
    table: &(String, String),
    publication: &str,
    create: bool,
) -> Result<Option<String>, CatalogError> {
    let version = catalog.version();
    if version.logical_messages() {
        return Ok(None);
    }
    let lacks = format!("PostgreSQL {version} has no logical messages in pgoutput (14+), and");
    let name = qualified(table);
    let mut st = state(catalog, table, publication).await?;
    if !st.exists {
        if let Err(e) = catalog.client().batch_execute(&create_sql(table)).await {
            return Ok(Some(format!(
                "{lacks} tidemark could not create its signal table {name}: {}; create it as a role that may (it needs CREATE on the database, or an existing schema {}): {}; {LOST_WITHOUT}",
                crate::error::ErrorChain(&e),
                quote_ident(&table.0),
                create_sql(table)
            )));
        }
        info!(table = %name, %version, "signal table created: PostgreSQL before 14 has no logical messages in pgoutput, so tidemark's markers travel as its rows");
        // A FOR ALL TABLES publication sends it from its creation on.
        st = state(catalog, table, publication).await?;
    } else if !st.can_write {
        // Made by someone else, without the grants tidemark needs.
        return Ok(Some(format!("{lacks} {}", unwritable(table))));
    }
    if !st.published {
        if !create {
            return Ok(Some(format!("{lacks} {}", unpublished(publication, table))));
        }
        let add = format!(
            "ALTER PUBLICATION {} ADD TABLE {name}",
            quote_ident(publication)
        );
        if let Err(e) = catalog.client().batch_execute(&add).await {
            return Ok(Some(format!(
                "{lacks} tidemark could not add its signal table {name} to publication {publication:?}: {}; run {add} as the publication's owner; {LOST_WITHOUT}",
                crate::error::ErrorChain(&e)
            )));
        }
        info!(table = %name, publication, "signal table added to the publication");
    }
    Ok(None)
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
    let st = state(catalog, table, publication).await?;
    if !st.exists && !st.can_create {
        return Ok(Err(format!(
            "tidemark's signal table {name} does not exist, and this role may not create it (it needs CREATE on the database, or on schema {}): run {} as a role that may; {LOST_WITHOUT}",
            quote_ident(&table.0),
            create_sql(table)
        )));
    }
    if st.exists && !st.can_write {
        return Ok(Err(unwritable(table)));
    }
    if !st.published && st.publication_exists && !create {
        return Ok(Err(unpublished(publication, table)));
    }
    Ok(Ok(match (st.exists, st.published) {
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
