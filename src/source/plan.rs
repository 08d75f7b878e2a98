//! Mapping rules bound to the live tables: at start (every configured mapping must fit
//! a streamed table), and for each RELATION message.

use crate::config::SourceConfig;
use crate::events::mapping;
use crate::events::rules::{self, BindError, LiveTable, TablePlan};
use crate::postgres::catalog::{Catalog, CatalogError};
use crate::postgres::pgoutput::{self, ReplicaIdentity};

use super::error::SourceError;

/// Binds a table's configured mapping (if any) to its live shape.
pub fn bind_plan(
    cfg: &SourceConfig,
    schema: &str,
    name: &str,
    live: &LiveTable<'_>,
) -> Result<TablePlan, BindError> {
    let spec = cfg
        .mappings
        .iter()
        .find(|m| m.schema == schema && m.table == name);
    let outbox = cfg
        .outboxes
        .iter()
        .find(|o| o.schema == schema && o.table == name);
    rules::bind(live, spec, outbox)
}

/// One published table with its live columns and the plan its mapping binds to.
pub struct PlannedTable {
    pub info: crate::postgres::catalog::TableInfo,
    pub columns: Vec<(String, u32)>,
    pub plan: TablePlan,
}

/// Binds every configured mapping to the live tables, so a rule naming a column that
/// does not exist stops the start with the table and column named. A mapping for a
/// table the source does not stream is an error too.
pub async fn plan_tables(
    catalog: &Catalog,
    cfg: &SourceConfig,
    tables: &[crate::postgres::catalog::TableInfo],
) -> Result<Vec<PlannedTable>, SourceError> {
    let streamed =
        |schema: &str, name: &str| tables.iter().any(|t| t.schema == schema && t.name == name);
    for (schema, name, line) in cfg
        .mappings
        .iter()
        .map(|m| (&m.schema, &m.table, m.line))
        .chain(cfg.outboxes.iter().map(|o| (&o.schema, &o.table, o.line)))
    {
        if !streamed(schema, name) {
            return Err(CatalogError::MappedTableNotStreamed {
                table: format!("{schema}.{name}"),
                line,
                publication: cfg.publication.clone(),
            }
            .into());
        }
    }
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        // The columns the stream will describe: the publication's column list, and
        // on PostgreSQL 18 the generated columns it publishes.
        let shape = catalog
            .published_shape(&cfg.publication, &t.schema, &t.name)
            .await?;
        let mut columns = catalog.columns(t.oid).await?;
        columns.retain(|(c, _)| shape.sends(c));
        let key: Vec<usize> = if t.primary_key.is_empty() {
            catalog
                .identity_columns(t.oid)
                .await?
                .iter()
                .filter_map(|k| columns.iter().position(|(n, _)| n == k))
                .collect()
        } else {
            t.primary_key
                .iter()
                .filter_map(|k| columns.iter().position(|(n, _)| n == k))
                .collect()
        };
        let qualified = format!("{}.{}", t.schema, t.name);
        let token = mapping::table_token(&t.schema, &t.name);
        let plan = bind_plan(
            cfg,
            &t.schema,
            &t.name,
            &LiveTable {
                qualified: &qualified,
                token: &token,
                columns: &columns,
                replica_identity: ReplicaIdentity::from_char(t.replica_identity),
                default_key: &key,
            },
        )?;
        out.push(PlannedTable {
            info: t.clone(),
            columns,
            plan,
        });
    }
    Ok(out)
}

/// A table's description from the catalog, shaped as the replication stream's
/// RELATION message (for a table no change has described yet).
pub(super) async fn catalog_relation(
    catalog: &Catalog,
    publication: &str,
    relid: u32,
) -> Result<pgoutput::Relation, SourceError> {
    let client = catalog.client();
    let row = client
        .query_one(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&relid],
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "describe a backfilled table",
            source,
        })?;
    let ident: String = row.get(2);
    let (schema, name): (String, String) = (row.get(0), row.get(1));
    // Only the columns the publication sends, as the stream describes the table.
    let shape = catalog.published_shape(publication, &schema, &name).await?;
    let mut columns = catalog.columns(relid).await?;
    columns.retain(|(c, _)| shape.sends(c));
    // The columns the stream flags as the replica identity, as pgoutput flags them:
    // the primary key under DEFAULT, the index's under USING INDEX, all under FULL;
    // so read events carry the key live events carry.
    let key = match ident.as_str() {
        "f" => columns.iter().map(|(c, _)| c.clone()).collect(),
        "i" => catalog.identity_columns(relid).await?,
        _ => catalog.primary_key(relid).await?,
    };
    Ok(pgoutput::Relation {
        id: relid,
        namespace: schema,
        name,
        replica_identity: ReplicaIdentity::from_char(ident.chars().next().unwrap_or('d')),
        columns: columns
            .into_iter()
            .map(|(name, type_oid)| pgoutput::Column {
                is_key: key.contains(&name),
                name,
                type_oid,
                type_modifier: -1,
            })
            .collect(),
    })
}
