//! `project rebuild`: a Postgres read model's shadow tables, or a KV read model's new
//! bucket, built from the stream's start by the engine and swapped in.

use super::engine::{self, Mode, Position, Spec};
use super::postgres::{PgTarget, Role, Shadow};
use super::*;

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildStats {
    pub events: u64,
    pub seq: u64,
    pub swap_ms: u128,
}

pub(super) fn split_table(t: &str) -> (String, String) {
    crate::config::split_table(t).unwrap_or_else(|| ("public".to_string(), t.to_string()))
}

/// Rebuilds a projection's tables from the start of the stream into a shadow schema,
/// then, once it is within `CATCH_UP` events of the stream's end (or the stream is
/// quiet), takes the projection's lock, applies what was stored by then and swaps
/// the tables and the checkpoint in one transaction. The live model serves until the
/// lock is taken, and waits only for the last events and the swap.
pub async fn rebuild(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    mut progress: impl FnMut(u64, u64) + Send,
) -> Result<RebuildStats, ProjectionError> {
    let db_err = |what: &str| db_error(&cfg.name, what);
    let target = match &cfg.target {
        Target::Kv { bucket } => return rebuild_kv(cfg, nats, bucket, progress).await,
        Target::Postgres(pg) => pg,
    };
    if cfg.tables.is_empty() {
        return Err(ProjectionError::Poison {
            projection: cfg.name.clone(),
            event_id: "-".into(),
            subject: "-".into(),
            seq: 0,
            reason: "no tables to rebuild: name them in the projection (tables = [\"...\"])".into(),
        });
    }

    let client = catalog::connect_client(target, "tidemark-rebuild").await?;
    client
        .batch_execute(CHECKPOINTS)
        .await
        .map_err(db_err("create tidemark_checkpoints"))?;
    // The checkpoint table the live projection uses, named before the search path
    // points at the shadow schema.
    let checkpoints: String = client
        .query_one(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'tidemark_checkpoints'::regclass",
            &[],
        )
        .await
        .map_err(db_err("find tidemark_checkpoints"))?
        .get(0);
    let shadow = quote_ident(&format!("tidemark_rebuild_{}", cfg.name));
    let old = quote_ident(&format!("tidemark_old_{}", cfg.name));
    let tables: Vec<(String, String)> = cfg.tables.iter().map(|t| split_table(t)).collect();
    let mut setup = format!(
        "DROP SCHEMA IF EXISTS {shadow} CASCADE; DROP SCHEMA IF EXISTS {old} CASCADE; CREATE SCHEMA {shadow};"
    );
    let mut schemas: Vec<String> = Vec::new();
    for (schema, name) in &tables {
        setup.push_str(&format!(
            "CREATE TABLE {shadow}.{n} (LIKE {s}.{n} INCLUDING ALL);",
            s = quote_ident(schema),
            n = quote_ident(name)
        ));
        if !schemas.contains(schema) {
            schemas.push(schema.clone());
        }
    }
    // Unqualified table names in the handlers now resolve to the shadow tables.
    let path: Vec<String> = schemas.iter().map(|s| quote_ident(s)).collect();
    setup.push_str(&format!("SET search_path = {shadow}, {};", path.join(", ")));
    client
        .batch_execute(&setup)
        .await
        .map_err(db_err("create the shadow tables"))?;
    let nc = provision::connect(nats, &format!("tidemark-rebuild-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let role = Role::Shadow(Box::new(Shadow {
        checkpoints,
        tables,
        shadow,
        old,
        savepoints: cfg.dead_letter.is_some(),
        js: js.clone(),
    }));
    let mut target = PgTarget::new(cfg, client, Position::default(), role).await?;
    run_rebuild(cfg, &js, &mut target, &mut progress).await
}

/// Runs the engine in rebuild mode over `target` until it is swapped in. The engine
/// reads the whole stream and applies the subjects filter itself: a source
/// transaction's last event (its txlast mark) may be on any subject, and the
/// transaction must end where the source's did.
async fn run_rebuild<T: engine::Target>(
    cfg: &ProjectionConfig,
    js: &jetstream::Context,
    target: &mut T,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<RebuildStats, ProjectionError> {
    let stats = engine::run(&Spec::from(cfg), js, target, Mode::Rebuild(progress)).await?;
    stats.ok_or_else(|| {
        nats_error(&cfg.name, "read the stream")("the rebuild stopped before its swap".into())
    })
}

/// Rebuilds a KV projection into a new bucket from the start of the stream, then
/// swaps it in by writing its name and position to the projection's entry in
/// `tidemark_projections`, conditional on the entry's revision: the live projector
/// follows the swap; readers resolve the bucket with `kv_bucket` (or `status`). The
/// old bucket is left for the operator to delete.
async fn rebuild_kv(
    cfg: &ProjectionConfig,
    nats: &NatsConfig,
    configured: &str,
    mut progress: impl FnMut(u64, u64) + Send,
) -> Result<RebuildStats, ProjectionError> {
    let nc = provision::connect(nats, &format!("tidemark-rebuild-{}", cfg.name)).await?;
    let js = jetstream::new(nc);
    let mut target = KvTarget::rebuild(cfg, &js, configured).await?;
    run_rebuild(cfg, &js, &mut target, &mut progress).await
}
