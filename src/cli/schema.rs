//! `schema`: the event contract of each source, written as JSON Schema files.

use super::*;
use crate::events::schema::{self, ColumnShape, TableShape};

pub(super) async fn write_schemas(
    cfg: Config,
    only: Option<&str>,
    out: &std::path::Path,
) -> Outcome {
    let sources: Vec<&SourceConfig> = cfg
        .sources
        .iter()
        .filter(|s| only.is_none_or(|n| s.name == n))
        .collect();
    if sources.is_empty() {
        return Err(Failure::Usage(format!(
            "no [[source]] is named {:?}",
            only.unwrap_or_default()
        )));
    }
    std::fs::create_dir_all(out)
        .map_err(|e| Failure::Failed(format!("cannot create {}: {e}", out.display())))?;
    let mut index = Vec::new();
    for s in sources {
        let docs = source_schemas(s).await?;
        for (entry, doc) in docs {
            let file = out.join(entry["file"].as_str().unwrap_or("schema.json"));
            let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
            std::fs::write(&file, text + "\n")
                .map_err(|e| Failure::Failed(format!("cannot write {}: {e}", file.display())))?;
            index.push(entry);
        }
    }
    let count = index.len();
    let index_path = out.join("index.json");
    let text =
        serde_json::to_string_pretty(&serde_json::json!({ "schemas": index })).unwrap_or_default();
    std::fs::write(&index_path, text + "\n")
        .map_err(|e| Failure::Failed(format!("cannot write {}: {e}", index_path.display())))?;
    println!(
        "wrote {count} event schemas and {} to {}",
        index_path.display(),
        out.display()
    );
    Ok(())
}

/// Every schema of one source: (index entry, document).
async fn source_schemas(
    s: &SourceConfig,
) -> Result<Vec<(serde_json::Value, serde_json::Value)>, Failure> {
    let failed = |e: &(dyn std::error::Error + 'static)| Failure::Failed(ErrorChain(e).to_string());
    let catalog = Catalog::connect(&s.postgres)
        .await
        .map_err(|e| failed(&e))?;
    let wanted = match &s.tables {
        TableSelection::All => catalog
            .all_tables(&s.signal_table)
            .await
            .map_err(|e| failed(&e))?,
        TableSelection::Listed(t) => t.clone(),
    };
    let tables = catalog.tables(&wanted).await.map_err(|e| failed(&e))?;
    let planned = source::plan_tables(&catalog, s, &tables)
        .await
        .map_err(|e| failed(&e))?;
    let mut out = Vec::new();
    for p in planned {
        // An outbox's events carry the application's payload: no schema of ours.
        if p.plan.outbox.is_some() {
            continue;
        }
        let not_null = catalog
            .not_null_columns(p.info.oid)
            .await
            .map_err(|e| failed(&e))?;
        let mut kinds = Vec::with_capacity(p.columns.len());
        for (_, oid) in &p.columns {
            kinds.push(catalog.resolve_type(*oid).await.map_err(|e| failed(&e))?);
        }
        let shape_of = |c: &crate::events::rules::OutColumn| ColumnShape {
            name: c.name.clone(),
            kind: kinds
                .get(c.index)
                .cloned()
                .unwrap_or(crate::postgres::values::TypeKind::Unknown),
            not_null: p
                .columns
                .get(c.index)
                .is_some_and(|(n, _)| not_null.contains(n)),
        };
        let columns: Vec<ColumnShape> = p.plan.columns.iter().map(shape_of).collect();
        let key: Vec<ColumnShape> = p.plan.key.iter().map(shape_of).collect();
        let table = format!("{}.{}", p.info.schema, p.info.name);
        for (ty, ops) in p.plan.event_types() {
            let shape = TableShape {
                source: s.name.clone(),
                table: table.clone(),
                event_type: ty.clone(),
                version: p.plan.fingerprint.clone(),
                ops: ops.clone(),
                columns: columns.clone(),
                key: key.clone(),
                attributes: p.plan.attributes.clone(),
            };
            let doc = schema::table_event(&shape);
            let entry = serde_json::json!({
                "source": s.name,
                "type": ty,
                "version": p.plan.fingerprint,
                "dataschema": doc["$id"],
                "file": schema::file_name(&ty, &p.plan.fingerprint),
                "table": table,
                "ops": ops.iter().map(|o| o.as_str()).collect::<Vec<_>>(),
            });
            out.push((entry, doc));
        }
    }
    for (ty, doc) in schema::marker_events(&s.name) {
        let entry = serde_json::json!({
            "source": s.name,
            "type": ty,
            "version": schema::MARKER_VERSION,
            "dataschema": doc["$id"],
            "file": schema::file_name(&ty, schema::MARKER_VERSION),
        });
        out.push((entry, doc));
    }
    Ok(out)
}
