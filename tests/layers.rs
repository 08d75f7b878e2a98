//! The layers of the crate, enforced: a module may name (`crate::…`) only modules of its
//! own layer or below, and no chain of imports may come back to where it started.
//!
//! Bottom to top (README, "Layout"):
//! 0. model: pure, no I/O: positions, event ids, reserved names, operations, mapping,
//!    rules, envelope, pgoutput decoding and value conversion, error rendering, secrets
//! 1. adapters: the Postgres session and catalog, the NATS provisioning and publisher,
//!    each with its own parameter types; telemetry
//! 2. config: the file, validated into the adapters' and stages' types
//! 3. stages: the source pipeline, backfills, projections, and the one error policy
//!    they share
//! 4. operations: ops (slot, reset, resync, backfill queueing, wait), replay, status
//! 5. cli
//!
//! A new module must be placed in this table, so its layer is a decision, not an
//! accident.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const LAYERS: &[(&str, u8)] = &[
    ("position", 0),
    ("error", 0),
    ("secret", 0),
    ("events", 0),
    ("postgres::pgoutput", 0),
    ("postgres::values", 0),
    ("postgres", 1),
    ("jetstream", 1),
    ("telemetry", 1),
    ("config", 2),
    ("policy", 3),
    ("source", 3),
    ("backfill", 3),
    ("projection", 3),
    ("ops", 4),
    ("replay", 4),
    ("status", 4),
    ("cli", 5),
];

/// The layer of a module path: the longest matching entry of `LAYERS`.
fn layer(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .filter(|(prefix, _)| module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, l)| *l)
}

/// Every module file under `src/` (but the crate roots) as a module path.
fn modules(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if parts
                .last()
                .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
            {
                parts.pop();
            }
            if parts.is_empty() {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read module");
            // Tests may reach anywhere; the layers hold for what ships.
            let body = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
            out.insert(parts.join("::"), body);
        }
    }
    out
}

/// The modules a body names with `crate::a::b…`, resolved to the longest known module.
fn imports(body: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in body.match_indices("crate::") {
        if at > 0 {
            let before = body.as_bytes()[at - 1];
            if before.is_ascii_alphanumeric() || before == b'_' {
                continue;
            }
        }
        let rest = &body[at + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        for k in (1..=parts.len()).rev() {
            let candidate = parts[..k].join("::");
            if known.contains(&candidate) {
                out.insert(candidate);
                break;
            }
        }
    }
    out
}

#[test]
fn no_module_imports_a_layer_above_its_own() {
    let mods = modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(mods.len() > 20, "found only {} modules", mods.len());
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    let mut problems = Vec::new();
    for (module, body) in &mods {
        let Some(own) = layer(module) else {
            problems.push(format!(
                "{module}: not placed in a layer (tests/layers.rs LAYERS)"
            ));
            continue;
        };
        for target in imports(body, &known) {
            if target == *module || module.starts_with(&format!("{target}::")) {
                continue;
            }
            let Some(theirs) = layer(&target) else {
                continue;
            };
            if theirs > own {
                problems.push(format!(
                    "{module} (layer {own}) imports {target} (layer {theirs}): move what it needs down, or the module up"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "upward imports:\n{}",
        problems.join("\n")
    );
}

#[test]
fn no_import_cycle() {
    let mods = modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    let edges: BTreeMap<String, BTreeSet<String>> = mods
        .iter()
        .map(|(m, body)| {
            let targets = imports(body, &known)
                .into_iter()
                .filter(|t| t != m && !m.starts_with(&format!("{t}::")))
                .collect();
            (m.clone(), targets)
        })
        .collect();
    // Depth-first search for a back edge, reporting the cycle it closes.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for t in edges.get(m).into_iter().flatten() {
            match state.get(t.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == t).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(t.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(t, edges, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0
            && let Some(cycle) = visit(m, &edges, &mut state, &mut Vec::new())
        {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_checker_sees_an_upward_import() {
    // The checks above must be able to fail: an adapter naming config is caught.
    let known: BTreeSet<String> = ["config", "postgres::catalog"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let found = imports("use crate::config::PostgresConfig;", &known);
    assert_eq!(found, BTreeSet::from(["config".to_string()]));
    assert!(layer("config") > layer("postgres::catalog"));
    assert_eq!(layer("postgres::pgoutput"), Some(0));
    assert_eq!(layer("source::flush"), Some(3));
}
