//! Reading a table by its key: the key, the columns, a chunk between watermarks.

use crate::config::{PostgresConfig, SourceConfig};
use crate::postgres::catalog::{Catalog, CatalogError};
use crate::postgres::replication::quote_ident;

use super::*;

/// The key columns a table is read in order of: the mapping's key, else the primary key.
/// A mapping's key must be one the table can be paged by: unique (a unique index
/// without a condition covers it) and NOT NULL. Otherwise rows sharing a key would be
/// lost at chunk borders, and a NULL would end the read at once.
pub async fn key_columns(
    catalog: &Catalog,
    cfg: &SourceConfig,
    schema: &str,
    table: &str,
    primary_key: &[String],
) -> Result<Vec<String>, BackfillError> {
    let mapped = cfg
        .mappings
        .iter()
        .find(|m| m.schema == schema && m.table == table)
        .and_then(|m| m.key.clone());
    match mapped {
        Some(k) if k == primary_key => Ok(k),
        Some(k) => {
            let row = catalog
                .client()
                .query_one(
                    "SELECT \
                       (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND NOT a.attisdropped \
                          AND a.attnotnull AND a.attname::text = ANY($3::text[])), \
                       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique \
                          AND i.indpred IS NULL AND i.indexprs IS NULL AND NOT EXISTS ( \
                            SELECT 1 FROM unnest(i.indkey::int2[]) k JOIN pg_attribute a \
                              ON a.attrelid = c.oid AND a.attnum = k \
                            WHERE NOT (a.attname::text = ANY($3::text[])))) \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2",
                    &[&schema, &table, &k],
                )
                .await
                .map_err(|source| CatalogError::Query {
                    what: "check a mapping's key",
                    source,
                })?;
            let not_null: i64 = row.get(0);
            let unique: bool = row.get(1);
            let reason = match (unique, not_null as usize == k.len()) {
                (true, true) => return Ok(k),
                (false, _) => "no unique index covers it",
                (true, false) => "a column of it may be NULL",
            };
            Err(BackfillError::KeyNotUnique {
                table: format!("{schema}.{table}"),
                key: k.join(", "),
                reason,
            })
        }
        None if !primary_key.is_empty() => Ok(primary_key.to_vec()),
        None => Err(BackfillError::NoKey {
            table: format!("{schema}.{table}"),
        }),
    }
}

/// A connection for reading chunks with the session settings the replication
/// connection uses, so a value reads as the same text both ways.
pub async fn reader(cfg: &PostgresConfig) -> Result<Catalog, BackfillError> {
    let catalog = Catalog::connect(cfg).await?;
    catalog
        .client()
        .batch_execute(
            "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET bytea_output = 'hex';
             SET extra_float_digits = 1; SET IntervalStyle = 'iso_8601'; SET lc_monetary = 'C';
             SET standard_conforming_strings = on; SET client_encoding = 'UTF8';
             SET application_name = 'tidemark-backfill'",
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "set up the backfill session",
            source,
        })?;
    Ok(catalog)
}

pub(super) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

pub(super) async fn emit_watermark(
    catalog: &Catalog,
    signal_table: &(String, String),
    wm: &Watermark,
) -> Result<(), BackfillError> {
    let content = serde_json::to_string(wm).unwrap_or_default();
    catalog
        .client()
        .simple_query(&crate::postgres::signal::emit_sql(
            catalog.version(),
            signal_table,
            WATERMARK_PREFIX,
            &content,
        ))
        .await
        .map_err(|source| CatalogError::Query {
            what: "write a backfill watermark",
            source,
        })?;
    Ok(())
}

/// Waits (50 ms at most) until the transactions running just after the low
/// watermark have ended: those whose commit is already in the WAL before it become
/// visible within moments, and the read that follows sees them. Those still running
/// after the wait are really running (they commit after the low watermark, inside the
/// window); the pipeline's check catches any left over.
async fn settle_commits(catalog: &Catalog) {
    let running = async || {
        catalog
            .client()
            .query_one("SELECT txid_current_snapshot()::text", &[])
            .await
            .ok()
            .map(|r| snapshot_in_progress(r.get::<_, &str>(0)))
    };
    let Some(first) = running().await else {
        return;
    };
    let mut waiting = first;
    for _ in 0..50 {
        if waiting.is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        let Some(now) = running().await else {
            return;
        };
        waiting.retain(|x| now.contains(x));
    }
}

/// A chunk's rows and the transactions its read did not see though they were
/// running (their xids, low 32 bits, as the replication stream names them).
pub(super) struct ChunkRead {
    pub(super) rows: Vec<Vec<Option<String>>>,
    pub(super) in_progress: Vec<u32>,
}

/// The in-progress xids of a snapshot's text form (`xmin:xmax:xip,...`), low 32 bits.
pub(super) fn snapshot_in_progress(text: &str) -> Vec<u32> {
    text.rsplit(':')
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|x| x.trim().parse::<u64>().ok())
        .map(|x| x as u32)
        .collect()
}

/// Reads one chunk: the rows after `last_key` in key order, with the snapshot they
/// were read in. Why the snapshot: a transaction commits in the WAL before it becomes
/// visible, so one whose commit precedes the low watermark can still be invisible to
/// a read after it; the pipeline tells such a chunk by these xids and reads it again.
pub(super) async fn read_chunk(
    catalog: &Catalog,
    job: &Job,
    columns: &[(String, String)],
    row_filter: Option<&str>,
) -> Result<ChunkRead, BackfillError> {
    let table = format!("{}.{}", quote_ident(&job.schema), quote_ident(&job.table));
    let select: Vec<String> = columns.iter().map(|(n, _)| quote_ident(n)).collect();
    let key: Vec<String> = job.key.iter().map(|k| quote_ident(k)).collect();
    let values = |vals: &[Option<String>]| -> String {
        job.key
            .iter()
            .zip(vals)
            .map(|(k, v)| {
                let ty = columns
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, t)| t.as_str())
                    .unwrap_or("text");
                match v {
                    Some(v) => format!("{}::{ty}", literal(v)),
                    None => "NULL".into(),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut conds = Vec::new();
    if let Some(last) = &job.last_key {
        conds.push(format!("({}) > ({})", key.join(", "), values(last)));
    }
    if let Some(end) = &job.end_key {
        conds.push(format!("({}) <= ({})", key.join(", "), values(end)));
    }
    if let Some(f) = &job.filter {
        conds.push(format!("({f})"));
    }
    if let Some(f) = row_filter {
        conds.push(format!("({f})"));
    }
    let sql = format!(
        "SELECT {} FROM {table}{} ORDER BY {} LIMIT {}",
        select.join(", "),
        if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        },
        key.join(", "),
        job.chunk_size
    );
    settle_commits(catalog).await;
    let batch = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT txid_current_snapshot()::text; {sql}; COMMIT"
    );
    let messages = match catalog.client().simple_query(&batch).await {
        Ok(m) => m,
        Err(source) => {
            // Leave no aborted transaction behind for the next read.
            let _ = catalog.client().batch_execute("ROLLBACK").await;
            return Err(BackfillError::Read {
                table: job.qualified(),
                source,
            });
        }
    };
    let mut read = ChunkRead {
        rows: Vec::new(),
        in_progress: Vec::new(),
    };
    let mut statement = 0;
    for m in messages {
        match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(_) => statement += 1,
            tokio_postgres::SimpleQueryMessage::Row(r) if statement == 1 => {
                read.in_progress = snapshot_in_progress(r.get(0).unwrap_or(""));
            }
            tokio_postgres::SimpleQueryMessage::Row(r) => read.rows.push(
                (0..columns.len())
                    .map(|i| r.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => {}
        }
    }
    Ok(read)
}

/// The rows of a query over a job's table, each as its first `width` values in text.
async fn text_rows(
    catalog: &Catalog,
    job: &Job,
    sql: &str,
    width: usize,
) -> Result<Vec<Vec<Option<String>>>, BackfillError> {
    let messages =
        catalog
            .client()
            .simple_query(sql)
            .await
            .map_err(|source| BackfillError::Read {
                table: job.qualified(),
                source,
            })?;
    Ok(messages
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..width).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect())
}

/// The largest key (within the job's filter) now, or None for no rows.
pub(super) async fn max_key(
    catalog: &Catalog,
    job: &Job,
    row_filter: Option<&str>,
) -> Result<Option<Vec<Option<String>>>, BackfillError> {
    let table = format!("{}.{}", quote_ident(&job.schema), quote_ident(&job.table));
    let key: Vec<String> = job.key.iter().map(|k| quote_ident(k)).collect();
    let desc: Vec<String> = key.iter().map(|k| format!("{k} DESC")).collect();
    let conds: Vec<String> = job
        .filter
        .iter()
        .map(String::as_str)
        .chain(row_filter)
        .map(|f| format!("({f})"))
        .collect();
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let sql = format!(
        "SELECT {} FROM {table}{filter} ORDER BY {} LIMIT 1",
        key.join(", "),
        desc.join(", ")
    );
    Ok(text_rows(catalog, job, &sql, key.len())
        .await?
        .into_iter()
        .next())
}

/// What a chunk of a table reads: the table's OID, the columns the publication sends
/// (names and types, in attribute order), the row estimate, and the publication's row
/// filter. A chunk reads what the live stream carries, and nothing it leaves out.
pub async fn read_shape(
    catalog: &Catalog,
    cfg: &SourceConfig,
    schema: &str,
    table: &str,
) -> Result<(u32, Vec<(String, String)>, u64, Option<String>), CatalogError> {
    let (relid, mut columns, estimate) =
        table_columns(catalog, &cfg.postgres.dbname, schema, table).await?;
    let shape = catalog
        .published_shape(&cfg.publication, schema, table)
        .await?;
    columns.retain(|(c, _)| shape.sends(c));
    Ok((relid, columns, estimate, shape.row_filter))
}

/// Column names and type names of a table, in attribute order (dropped columns left
/// out, and generated ones no publication can send: `Catalog::generated_sent`).
pub(super) async fn table_columns(
    catalog: &Catalog,
    dbname: &str,
    schema: &str,
    table: &str,
) -> Result<(u32, Vec<(String, String)>, u64), CatalogError> {
    let rows = catalog
        .client()
        .query(
            &format!(
                "SELECT c.oid, a.attname::text, format_type(a.atttypid, a.atttypmod), c.reltuples::float8 \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped AND a.{} \
                 ORDER BY a.attnum",
                catalog.generated_sent()
            ),
            &[&schema, &table],
        )
        .await
        .map_err(|source| CatalogError::Query {
            what: "backfill table columns",
            source,
        })?;
    let Some(first) = rows.first() else {
        return Err(CatalogError::TableMissing {
            table: format!("{schema}.{table}"),
            dbname: dbname.to_string(),
            hint: String::new(),
        });
    };
    let oid: u32 = first.get(0);
    let estimate: f64 = first.get(3);
    Ok((
        oid,
        rows.iter().map(|r| (r.get(1), r.get(2))).collect(),
        estimate.max(0.0) as u64,
    ))
}
