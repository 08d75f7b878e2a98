//! The publication: what it sends (tables, partitions as their root, operations,
//! column lists and row filters), and making it send what the config lists.

use super::{Catalog, CatalogError, TableInfo, q};
use crate::postgres::params::TableSelection;
use crate::postgres::replication::quote_ident;

/// A publication as tidemark reads it.
#[derive(Clone, Debug)]
pub struct Publication {
    /// The tables whose changes it sends under their own name (`pg_publication_tables`):
    /// a partitioned table's partitions, unless it publishes via the root.
    pub tables: Vec<(String, String)>,
    /// `publish_via_partition_root`: a partition's changes are sent as its published
    /// partitioned table's (PostgreSQL 13+).
    pub via_root: bool,
    /// The operations it does not publish (`publish = '...'`): insert, update, delete,
    /// truncate. Their changes never reach the stream.
    pub unpublished: Vec<&'static str>,
}

/// What a publication sends of one table (PostgreSQL 15+): the columns of its column
/// list and its row filter. A snapshot reads the same, or it would publish columns
/// the operator left out (a password hash) and rows the filter keeps out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishedShape {
    /// The columns sent; `None`: all of them.
    pub columns: Option<Vec<String>>,
    /// The row filter (`pg_get_expr` text), to AND into a read's WHERE.
    pub row_filter: Option<String>,
}

impl PublishedShape {
    /// Whether a column is sent.
    pub fn sends(&self, column: &str) -> bool {
        self.columns
            .as_ref()
            .is_none_or(|c| c.iter().any(|n| n == column))
    }
}

/// One table name as it stands now (see `Catalog::current_oids`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentOid {
    pub schema: String,
    pub table: String,
    /// `None`: no table of that name (dropped, or renamed away).
    pub oid: Option<u32>,
    /// Whether the publication sends a table under that name.
    pub published: bool,
}

impl Publication {
    pub fn publishes(&self, schema: &str, name: &str) -> bool {
        self.tables.iter().any(|(s, n)| s == schema && n == name)
    }
}

impl Catalog {
    /// The publication, if it exists: which tables it publishes, and how.
    pub async fn publication(&self, name: &str) -> Result<Option<Publication>, CatalogError> {
        // pubviaroot exists from PostgreSQL 13 on (partitioned tables cannot be
        // published before).
        let via_root = if self.version.publish_via_root() {
            "pubviaroot"
        } else {
            "false"
        };
        let found = self
            .client
            .query(
                &format!(
                    "SELECT {via_root}, pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1"
                ),
                &[&name],
            )
            .await
            .map_err(q("look up publication"))?;
        let Some(row) = found.first() else {
            return Ok(None);
        };
        let via_root: bool = row.get(0);
        let unpublished = ["insert", "update", "delete", "truncate"]
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !row.get::<_, bool>(i + 1))
            .map(|(_, op)| op)
            .collect();
        let rows = self
            .client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
                &[&name],
            )
            .await
            .map_err(q("publication tables"))?;
        Ok(Some(Publication {
            tables: rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            via_root,
            unpublished,
        }))
    }

    /// The columns and rows `publication` sends of a table (see `PublishedShape`);
    /// everything when the server predates column lists and row filters (15) or the
    /// table is not in the publication.
    pub async fn published_shape(
        &self,
        publication: &str,
        schema: &str,
        table: &str,
    ) -> Result<PublishedShape, CatalogError> {
        if !self.version.row_filters() {
            return Ok(PublishedShape::default());
        }
        let rows = self
            .client
            .query(
                "SELECT attnames::text[], rowfilter FROM pg_publication_tables \
                 WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &schema, &table],
            )
            .await
            .map_err(q("the publication's columns and row filter"))?;
        let Some(row) = rows.first() else {
            return Ok(PublishedShape::default());
        };
        Ok(PublishedShape {
            columns: row.get(0),
            row_filter: row.get(1),
        })
    }

    /// The table each name stands for now (its OID; `None`: no table of that name),
    /// and whether `publication` sends a table under that name now. A table dropped
    /// and created again has a new OID, and leaves a `FOR TABLE` publication with the
    /// old one.
    pub async fn current_oids(
        &self,
        publication: &str,
        names: &[(String, String)],
    ) -> Result<Vec<CurrentOid>, CatalogError> {
        let (schemas, tables): (Vec<&str>, Vec<&str>) =
            names.iter().map(|(s, t)| (s.as_str(), t.as_str())).unzip();
        let rows = self
            .client
            .query(
                "WITH pub AS MATERIALIZED (SELECT schemaname::text AS s, tablename::text AS t \
                   FROM pg_publication_tables WHERE pubname = $3) \
                 SELECT w.s, w.t, c.oid, EXISTS (SELECT 1 FROM pub WHERE pub.s = w.s AND pub.t = w.t) \
                 FROM unnest($1::text[], $2::text[]) AS w(s, t) \
                 LEFT JOIN pg_namespace n ON n.nspname = w.s \
                 LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.t AND c.relkind IN ('r', 'p')",
                &[&schemas, &tables, &publication],
            )
            .await
            .map_err(q("the tables' current OIDs"))?;
        Ok(rows
            .iter()
            .map(|r| CurrentOid {
                schema: r.get(0),
                table: r.get(1),
                oid: r.get(2),
                published: r.get(3),
            })
            .collect())
    }

    /// Whether `publication` names the table itself (`FOR TABLE`, `ADD TABLE`), rather
    /// than through `FOR ALL TABLES` or a schema, which send a table's changes from
    /// the moment it is created.
    pub async fn names_table(&self, publication: &str, oid: u32) -> Result<bool, CatalogError> {
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                 WHERE p.pubname = $1 AND r.prrelid = $2)",
                &[&publication, &oid],
            )
            .await
            .map_err(q("the publication's own tables"))?;
        Ok(row.get(0))
    }

    /// Makes sure the publication publishes the configured tables, creating it or
    /// adding tables when allowed. Refuses tables whose UPDATEs Postgres would reject
    /// once published. Returns the tables that will be streamed.
    pub async fn ensure_publication(
        &self,
        name: &str,
        selection: &TableSelection,
        create: bool,
        signal_table: &(String, String),
    ) -> Result<Vec<TableInfo>, CatalogError> {
        let wanted = match selection {
            TableSelection::All => self.all_tables(signal_table).await?,
            TableSelection::Listed(t) => t.clone(),
        };
        let tables = self.tables(&wanted).await?;
        for t in &tables {
            self.check_partitioned(t)?;
        }
        let mut existing = self.publication(name).await?;
        // A partitioned table's changes must be sent as its own, not as each
        // partition's: under the partitions' names no mapping, subject or snapshot
        // window of the table would match them.
        if let Some(p) = &existing
            && !p.via_root
            && let Some(t) = tables.iter().find(|t| t.partitioned)
        {
            if !create {
                return Err(CatalogError::PublicationByPartitions {
                    publication: name.into(),
                    table: t.qualified(),
                });
            }
            self.client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                    quote_ident(name)
                ))
                .await
                .map_err(q("set publish_via_partition_root on the publication"))?;
            tracing::info!(
                publication = name,
                table = %t.qualified(),
                "publication set to publish partitioned tables' changes as their own (publish_via_partition_root)"
            );
            existing = self.publication(name).await?;
        }
        let missing: Vec<&TableInfo> = match &existing {
            None => tables.iter().collect(),
            Some(published) => tables
                .iter()
                .filter(|t| !published.publishes(&t.schema, &t.name))
                .collect(),
        };
        if missing.is_empty() && existing.is_some() {
            return Ok(tables);
        }
        if !create {
            return Err(match existing {
                None => CatalogError::PublicationMissing { name: name.into() },
                Some(_) => CatalogError::PublicationLacksTable {
                    publication: name.into(),
                    table: missing[0].qualified(),
                },
            });
        }
        for t in &missing {
            if let Some((table, identity)) = t.identity_problem() {
                return Err(CatalogError::NoReplicaIdentity { table, identity });
            }
        }
        let listed = || {
            missing
                .iter()
                .map(|t| t.qualified())
                .collect::<Vec<_>>()
                .join(", ")
        };
        // A partition's changes go out as its partitioned table's (PostgreSQL 13+).
        let with = if self.version.publish_via_root() {
            " WITH (publish_via_partition_root = true)"
        } else {
            ""
        };
        let sql = match (&existing, selection) {
            (None, TableSelection::All) => {
                format!(
                    "CREATE PUBLICATION {} FOR ALL TABLES{with}",
                    quote_ident(name)
                )
            }
            (None, TableSelection::Listed(_)) => {
                format!(
                    "CREATE PUBLICATION {} FOR TABLE {}{with}",
                    quote_ident(name),
                    listed()
                )
            }
            (Some(_), _) => {
                format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(name),
                    listed()
                )
            }
        };
        self.client
            .batch_execute(&sql)
            .await
            .map_err(q("create or alter publication"))?;
        tracing::info!(
            publication = name,
            count = missing.len(),
            "publication set up"
        );
        Ok(tables)
    }
}
