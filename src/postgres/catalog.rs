//! Catalog checks and setup over a normal (non-replication) session, with
//! `tokio-postgres`: wal_level, the publication, the slot, replica identities, primary
//! keys and user-defined types. Each failure an operator must fix is its own variant
//! whose message says the fix.

use std::collections::HashMap;

use tokio::task::JoinHandle;

use crate::position::Lsn;
use crate::postgres::params::PostgresConfig;
use crate::postgres::replication::quote_ident;
use crate::postgres::values::{TypeKind, builtin_kind};
use crate::postgres::version::ServerVersion;

mod error;
pub use error::*;
mod connect;
pub use connect::*;
pub mod publication;

/// A connection for catalog work. The connection future runs in a task this struct
/// owns and aborts on drop.
pub struct Catalog {
    client: tokio_postgres::Client,
    task: JoinHandle<()>,
    dbname: String,
    version: ServerVersion,
}

impl Drop for Catalog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What `pg_replication_slots` says of a slot.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: String,
    pub database: String,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    pub wal_status: Option<String>,
}

/// One table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    pub oid: u32,
    /// `pg_class.relreplident`: d, n, f or i.
    pub replica_identity: char,
    pub primary_key: Vec<String>,
    /// A partitioned table (`relkind = 'p'`): its rows live in its partitions.
    pub partitioned: bool,
    /// A partition whose UPDATEs and DELETEs Postgres would refuse once the table is
    /// published (each partition's own replica identity counts): its name and identity.
    pub partition_identity_problem: Option<(String, &'static str)>,
}

/// The identity Postgres refuses UPDATE and DELETE under, once published.
fn identity_problem(replica_identity: char, has_primary_key: bool) -> Option<&'static str> {
    match replica_identity {
        'n' => Some("NOTHING"),
        'd' if !has_primary_key => Some("DEFAULT"),
        _ => None,
    }
}

impl TableInfo {
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Whether UPDATE and DELETE can be published (Postgres refuses them otherwise):
    /// if not, the table (or the partition) that lacks an identity, and its identity.
    pub fn identity_problem(&self) -> Option<(String, &'static str)> {
        identity_problem(self.replica_identity, !self.primary_key.is_empty())
            .map(|identity| (self.qualified(), identity))
            .or_else(|| self.partition_identity_problem.clone())
    }
}

fn q(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CatalogError {
    move |source| CatalogError::Query { what, source }
}

impl Catalog {
    pub async fn connect(cfg: &PostgresConfig) -> Result<Catalog, CatalogError> {
        let (client, task) = connect_with_task(cfg, "tidemark-catalog").await?;
        let row = client
            .query_one("SELECT current_setting('server_version_num')", &[])
            .await
            .map_err(q("server version"))?;
        let text: String = row.get(0);
        let version = ServerVersion::from_num(&text).unwrap_or(ServerVersion(0));
        Ok(Catalog {
            client,
            task,
            dbname: cfg.dbname.clone(),
            version,
        })
    }

    /// The server's version (read once, at connect).
    pub fn version(&self) -> ServerVersion {
        self.version
    }

    /// Refuses a server older than tidemark supports, naming its version.
    pub fn check_version(&self) -> Result<(), CatalogError> {
        if self.version.supported() {
            return Ok(());
        }
        Err(CatalogError::UnsupportedVersion {
            version: self.version.to_string(),
        })
    }

    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// The least privilege tidemark needs: REPLICATION (or superuser) for the slot, and
    /// SELECT on the tables it streams (for backfills). The first missing grant is an
    /// error that says what to run.
    pub async fn check_grants(&self, tables: &[(String, String)]) -> Result<(), CatalogError> {
        let row = self
            .client
            .query_one(
                "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(q("role attributes"))?;
        let role: String = row.get(0);
        if !row.get::<_, bool>(1) {
            return Err(CatalogError::MissingGrant {
                fix: format!("ALTER ROLE {} REPLICATION", quote_ident(&role)),
                role,
                grant: "the REPLICATION attribute".into(),
            });
        }
        for (schema, name) in tables {
            let table = format!("{}.{}", quote_ident(schema), quote_ident(name));
            let ok: Option<bool> = self
                .client
                .query_one(
                    "SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL ELSE has_table_privilege($1, 'SELECT') END",
                    &[&table],
                )
                .await
                .map_err(q("table privileges"))?
                .get(0);
            if ok == Some(false) {
                return Err(CatalogError::MissingGrant {
                    fix: format!("GRANT SELECT ON {table} TO {}", quote_ident(&role)),
                    role,
                    grant: format!("SELECT on {table}"),
                });
            }
        }
        Ok(())
    }

    pub async fn check_wal_level(&self) -> Result<(), CatalogError> {
        let row = self
            .client
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(q("SHOW wal_level"))?;
        let actual: String = row.get(0);
        if actual != "logical" {
            return Err(CatalogError::WalLevel { actual });
        }
        Ok(())
    }

    /// PostgreSQL 18's `idle_replication_slot_timeout` in seconds (0: off); `None`
    /// before 18 or when it cannot be read.
    pub async fn idle_slot_timeout_secs(&self) -> Option<i64> {
        if !self.version.idle_slot_timeout() {
            return None;
        }
        let row = self
            .client
            .query_opt(
                "SELECT setting::bigint FROM pg_settings WHERE name = 'idle_replication_slot_timeout'",
                &[],
            )
            .await
            .ok()??;
        Some(row.get(0))
    }

    /// Refuses logical messages as events (`[[source.message]]` with `prefix`) where
    /// pgoutput cannot send them (before PostgreSQL 14).
    pub fn check_messages(&self, prefix: &str) -> Result<(), CatalogError> {
        if self.version.logical_messages() {
            return Ok(());
        }
        Err(CatalogError::NeedsNewer {
            version: self.version.to_string(),
            what: "send logical decoding messages",
            why: "pgoutput has no messages option before PostgreSQL 14",
            fix: format!(
                "the [[source.message]] prefix {prefix:?} cannot work: write these events through an outbox table ([[source.outbox]]) instead, or upgrade to PostgreSQL 14 or newer"
            ),
        })
    }

    /// Refuses a partitioned table where the server cannot publish it (PostgreSQL 12).
    pub fn check_partitioned(&self, t: &TableInfo) -> Result<(), CatalogError> {
        if !t.partitioned || self.version.publish_via_root() {
            return Ok(());
        }
        Err(CatalogError::NeedsNewer {
            version: self.version.to_string(),
            what: "stream a partitioned table",
            why: "it cannot add a partitioned table to a publication (publish_via_partition_root came in PostgreSQL 13)",
            fix: format!(
                "list the partitions of {} in the source's tables instead (each streams under its own name), or upgrade to PostgreSQL 13 or newer",
                t.qualified()
            ),
        })
    }

    /// Describes tables by name (`(schema, table)`); a missing one is an error.
    pub async fn tables(&self, names: &[(String, String)]) -> Result<Vec<TableInfo>, CatalogError> {
        let mut out = Vec::new();
        for (schema, name) in names {
            let rows = self
                .client
                .query(
                    "SELECT c.oid, c.relreplident::text, c.relkind::text, c.relpersistence::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2",
                    &[schema, name],
                )
                .await
                .map_err(q("look up table"))?;
            let Some(row) = rows.first() else {
                // Names are taken as written: a name typed in another case is the
                // likeliest slip (SQL folds unquoted names to lower case).
                let near = self
                    .client
                    .query(
                        "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE lower(n.nspname) = lower($1) AND lower(c.relname) = lower($2) AND c.relkind IN ('r', 'p') LIMIT 1",
                        &[schema, name],
                    )
                    .await
                    .map_err(q("look up table"))?;
                let hint = near.first().map_or(String::new(), |r| {
                    let (s, n): (String, String) = (r.get(0), r.get(1));
                    if s == "public" {
                        format!(" (did you mean {n:?}? names are case-sensitive)")
                    } else {
                        format!(" (did you mean \"{s}.{n}\"? names are case-sensitive)")
                    }
                });
                return Err(CatalogError::TableMissing {
                    table: format!("{schema}.{name}"),
                    dbname: self.dbname.clone(),
                    hint,
                });
            };
            let oid: u32 = row.get(0);
            let ident: String = row.get(1);
            let kind: String = row.get(2);
            let persistence: String = row.get(3);
            let what = match kind.as_str() {
                "r" | "p" => None,
                "v" => Some("a view"),
                "m" => Some("a materialized view"),
                "f" => Some("a foreign table"),
                "S" => Some("a sequence"),
                "i" | "I" => Some("an index"),
                _ => Some("another kind of relation"),
            };
            if let Some(what) = what {
                return Err(CatalogError::NotATable {
                    table: format!("{}.{}", quote_ident(schema), quote_ident(name)),
                    what,
                });
            }
            if persistence != "p" {
                return Err(CatalogError::Unlogged {
                    table: format!("{}.{}", quote_ident(schema), quote_ident(name)),
                });
            }
            out.push(TableInfo {
                schema: schema.clone(),
                name: name.clone(),
                oid,
                replica_identity: ident.chars().next().unwrap_or('d'),
                primary_key: self.primary_key(oid).await?,
                partitioned: kind == "p",
                partition_identity_problem: if kind == "p" {
                    self.partition_identity_problem(oid).await?
                } else {
                    None
                },
            });
        }
        Ok(out)
    }

    /// The first partition (leaf) of a partitioned table whose own replica identity
    /// makes Postgres refuse its UPDATEs and DELETEs once published.
    async fn partition_identity_problem(
        &self,
        relid: u32,
    ) -> Result<Option<(String, &'static str)>, CatalogError> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_partition_tree($1::oid::regclass) t JOIN pg_class c ON c.oid = t.relid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.isleaf ORDER BY 1, 2",
                &[&relid],
            )
            .await
            .map_err(q("partitions' replica identities"))?;
        Ok(rows.iter().find_map(|r| {
            let ident: String = r.get(2);
            identity_problem(ident.chars().next().unwrap_or('d'), r.get(3)).map(|identity| {
                (
                    format!(
                        "{}.{}",
                        quote_ident(r.get::<_, &str>(0)),
                        quote_ident(r.get::<_, &str>(1))
                    ),
                    identity,
                )
            })
        }))
    }

    /// Every user table in the database whose changes are in the WAL (for
    /// `all_tables`): unlogged tables are left out, as `FOR ALL TABLES` leaves them,
    /// and so is tidemark's signal table (`except`), whose rows are never data.
    pub async fn all_tables(
        &self,
        except: &(String, String),
    ) -> Result<Vec<(String, String)>, CatalogError> {
        let rows = self
            .client
            .query(
                &format!(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE {} AND c.relpersistence = 'p' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' ORDER BY 1, 2",
                    // A partitioned table streams as itself (13+: via its root); on
                    // 12, FOR ALL TABLES sends each partition as a table of its own.
                    if self.version.publish_via_root() {
                        "c.relkind IN ('r', 'p') AND NOT c.relispartition"
                    } else {
                        "c.relkind = 'r'"
                    }
                ),
                &[],
            )
            .await
            .map_err(q("list tables"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .filter(|t| t != except)
            .collect())
    }

    /// The unlogged user tables (`all_tables` leaves them out: no slot sees their
    /// changes).
    pub async fn unlogged_tables(&self) -> Result<Vec<(String, String)>, CatalogError> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' AND NOT c.relispartition \
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
                &[],
            )
            .await
            .map_err(q("list unlogged tables"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The generated columns a publication can send, as an `attgenerated` condition:
    /// none before PostgreSQL 18; stored ones from 18 on (`publish_generated_columns`,
    /// or named in a column list), which the publication's shape then narrows to what
    /// it sends. Virtual ones never.
    pub fn generated_sent(&self) -> &'static str {
        if self.version.generated_columns() {
            "attgenerated IN ('', 's')"
        } else {
            "attgenerated = ''"
        }
    }

    /// The table's live columns in order: (name, type OID). Dropped columns are left
    /// out, and generated ones no publication can send (`generated_sent`).
    pub async fn columns(&self, relid: u32) -> Result<Vec<(String, u32)>, CatalogError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT attname::text, atttypid FROM pg_attribute \
                     WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND {} ORDER BY attnum",
                    self.generated_sent()
                ),
                &[&relid],
            )
            .await
            .map_err(q("table columns"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Columns whose values can be stored out of line (TOAST): storage extended or
    /// external.
    pub async fn toastable_columns(&self, relid: u32) -> Result<Vec<String>, CatalogError> {
        self.names(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attstorage IN ('x', 'e') ORDER BY attnum",
            relid,
            "toastable columns",
        )
        .await
    }

    /// The columns declared NOT NULL.
    pub async fn not_null_columns(&self, relid: u32) -> Result<Vec<String>, CatalogError> {
        self.names(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attnotnull ORDER BY attnum",
            relid,
            "not-null columns",
        )
        .await
    }

    /// The columns of the table's replica identity index (REPLICA IDENTITY USING INDEX).
    pub async fn identity_columns(&self, relid: u32) -> Result<Vec<String>, CatalogError> {
        self.index_columns(relid, "indisreplident", "replica identity index")
            .await
    }

    pub async fn primary_key(&self, relid: u32) -> Result<Vec<String>, CatalogError> {
        self.index_columns(relid, "indisprimary", "primary key")
            .await
    }

    /// The columns, in index order, of the table's index marked by `flag`.
    async fn index_columns(
        &self,
        relid: u32,
        flag: &'static str,
        what: &'static str,
    ) -> Result<Vec<String>, CatalogError> {
        let sql = format!(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND i.{flag} ORDER BY array_position(i.indkey::int2[], a.attnum)"
        );
        self.names(&sql, relid, what).await
    }

    /// The first column of each row of a query about one relation, as text.
    async fn names(
        &self,
        sql: &str,
        relid: u32,
        what: &'static str,
    ) -> Result<Vec<String>, CatalogError> {
        let rows = self.client.query(sql, &[&relid]).await.map_err(q(what))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Drops a replication slot (it must not be in use).
    pub async fn drop_slot(&self, name: &str) -> Result<(), CatalogError> {
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&name])
            .await
            .map_err(q("drop the replication slot"))?;
        Ok(())
    }

    pub async fn slot(&self, name: &str) -> Result<Option<SlotInfo>, CatalogError> {
        let wal_status = if self.version.slot_wal_status() {
            "wal_status::text"
        } else {
            "NULL::text"
        };
        let sql = format!(
            "SELECT plugin::text, database::text, active, active_pid, confirmed_flush_lsn::text, restart_lsn::text, {wal_status} \
             FROM pg_replication_slots WHERE slot_name = $1"
        );
        let rows = self
            .client
            .query(&sql, &[&name])
            .await
            .map_err(q("look up slot"))?;
        Ok(rows.first().map(|r| {
            let lsn = |i: usize| r.get::<_, Option<String>>(i).and_then(|s| s.parse().ok());
            SlotInfo {
                plugin: r.get::<_, Option<String>>(0).unwrap_or_default(),
                database: r.get::<_, Option<String>>(1).unwrap_or_default(),
                active: r.get(2),
                active_pid: r.get(3),
                confirmed_flush: lsn(4),
                restart_lsn: lsn(5),
                wal_status: r.get(6),
            }
        }))
    }

    /// Checks an existing slot fits this source.
    pub fn check_slot(&self, name: &str, slot: &SlotInfo) -> Result<(), CatalogError> {
        if slot.plugin != "pgoutput" {
            return Err(CatalogError::SlotWrongPlugin {
                slot: name.into(),
                plugin: slot.plugin.clone(),
            });
        }
        if slot.database != self.dbname {
            return Err(CatalogError::SlotWrongDatabase {
                slot: name.into(),
                actual: slot.database.clone(),
                expected: self.dbname.clone(),
            });
        }
        if slot.wal_status.as_deref() == Some("lost") {
            return Err(CatalogError::SlotInvalidated { slot: name.into() });
        }
        Ok(())
    }

    /// Learns how to convert values of a user-defined type: enums are text, domains
    /// take their base type, arrays their element type. Unknown kinds stay text.
    pub async fn resolve_type(&self, oid: u32) -> Result<TypeKind, CatalogError> {
        let mut seen = HashMap::new();
        self.resolve_inner(oid, &mut seen, 0).await
    }

    async fn resolve_inner(
        &self,
        oid: u32,
        seen: &mut HashMap<u32, TypeKind>,
        depth: u32,
    ) -> Result<TypeKind, CatalogError> {
        if let Some(k) = builtin_kind(oid) {
            return Ok(k);
        }
        if let Some(k) = seen.get(&oid) {
            return Ok(k.clone());
        }
        if depth > 8 {
            return Ok(TypeKind::Unknown);
        }
        let rows = self
            .client
            .query(
                "SELECT typtype::text, typelem, typdelim::text, typbasetype, typcategory::text, typrelid \
                 FROM pg_type WHERE oid = $1",
                &[&oid],
            )
            .await
            .map_err(q("look up type"))?;
        let Some(r) = rows.first() else {
            return Ok(TypeKind::Unknown);
        };
        let typtype: String = r.get(0);
        let elem: u32 = r.get(1);
        let delim: String = r.get(2);
        let base: u32 = r.get(3);
        let category: String = r.get(4);
        let relid: u32 = r.get(5);
        // Multiranges (PostgreSQL 14+) name their range in pg_range.rngmultitypid.
        let range_sub: Option<u32> = match typtype.as_str() {
            "r" | "m" => {
                let column = if typtype == "r" {
                    "rngtypid"
                } else {
                    "rngmultitypid"
                };
                self.client
                    .query(
                        &format!("SELECT rngsubtype FROM pg_range WHERE {column} = $1"),
                        &[&oid],
                    )
                    .await
                    .map_err(q("look up range type"))?
                    .first()
                    .map(|r| r.get(0))
            }
            _ => None,
        };
        let kind = match (typtype.as_str(), range_sub) {
            ("e", _) => TypeKind::Text,
            ("r" | "m", Some(sub)) => {
                let sub = Box::new(Box::pin(self.resolve_inner(sub, seen, depth + 1)).await?);
                if typtype == "r" {
                    TypeKind::Range(sub)
                } else {
                    TypeKind::Multirange(sub)
                }
            }
            ("c", _) if relid != 0 => {
                let mut fields = Vec::new();
                for (name, field_oid) in self.columns(relid).await? {
                    let k = Box::pin(self.resolve_inner(field_oid, seen, depth + 1)).await?;
                    fields.push((name, k));
                }
                TypeKind::Composite(fields)
            }
            ("d", _) => Box::pin(self.resolve_inner(base, seen, depth + 1)).await?,
            _ if category == "A" && elem != 0 => TypeKind::Array {
                element: Box::new(Box::pin(self.resolve_inner(elem, seen, depth + 1)).await?),
                delimiter: delim.bytes().next().unwrap_or(b','),
            },
            _ => TypeKind::Unknown,
        };
        seen.insert(oid, kind.clone());
        Ok(kind)
    }
}
