//! The files in deploy/: parsed, and their tidemark configs validated by tidemark's own
//! config parser. (This machine has no container engine or systemd to run them.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(deploy(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn yaml(file: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn the_compose_file_starts_the_reference_setup_with_a_valid_config() {
    let docs = yaml("docker-compose.yml");
    let services = &docs[0]["services"];
    for name in [
        "postgres",
        "nats1",
        "nats2",
        "nats3",
        "tidemark",
        "projector",
    ] {
        assert!(!services[name].is_badvalue(), "service {name} missing");
    }
    // NATS is one 3-node JetStream cluster: each node routes to all three.
    for i in 1..=3 {
        let cmd: Vec<&str> = services[format!("nats{i}").as_str()]["command"]
            .as_vec()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(cmd.contains(&"-js"), "nats{i}: {cmd:?}");
        let routes = cmd[cmd.iter().position(|a| *a == "--routes").unwrap() + 1];
        assert_eq!(routes.split(',').count(), 3, "nats{i}: {routes}");
        assert!(cmd.contains(&"--cluster_name"), "nats{i}: {cmd:?}");
    }
    let pg_command: Vec<&str> = services["postgres"]["command"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(pg_command.contains(&"wal_level=logical"));
    assert_eq!(
        services["tidemark"]["build"]["dockerfile"].as_str(),
        Some("deploy/Dockerfile")
    );
    assert_eq!(
        services["projector"]["command"][0].as_str(),
        Some("project")
    );
    // The config it mounts parses, with the environment the service gets.
    let env = &services["tidemark"]["environment"];
    let lookup = |k: &str| env[k].as_str().map(str::to_string);
    let mount = services["tidemark"]["volumes"][0].as_str().unwrap();
    let file = mount.split(':').next().unwrap().trim_start_matches("./");
    let cfg = tidemark::config::parse(&deploy(file), &read(file), &lookup)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.sources[0].postgres.host, "postgres");
    assert_eq!(cfg.nats.servers.len(), 3, "the client knows every node");
    assert_eq!(cfg.sources[0].stream.replicas, 3);
    assert_eq!(cfg.projections.len(), 1);
    let port = cfg.metrics.as_ref().unwrap().listen.port();
    assert_eq!(
        services["tidemark"]["ports"][0].as_str(),
        Some(format!("{port}:{port}").as_str())
    );
    assert!(read("store-init.sql").contains("REPLICATION"));
}

#[test]
fn the_kubernetes_sidecar_probes_health_and_its_config_is_valid() {
    let docs = yaml("kubernetes/tidemark-sidecar.yaml");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, vec!["ConfigMap", "Secret", "StatefulSet"]);
    let containers = docs[2]["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .unwrap();
    let tm = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("tidemark"))
        .expect("a tidemark container");
    assert!(
        containers
            .iter()
            .any(|c| c["name"].as_str() == Some("postgres"))
    );
    assert_eq!(
        tm["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        tm["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert!(!tm["resources"]["limits"]["memory"].is_badvalue());
    assert_eq!(tm["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    // The ConfigMap's config parses, with the Secret's password where it is mounted.
    let dir = tempfile::tempdir().unwrap();
    let password = docs[1]["stringData"]["pg-password"].as_str().unwrap();
    std::fs::write(dir.path().join("pg-password"), password).unwrap();
    let text = docs[0]["data"]["tidemark.toml"].as_str().unwrap().replace(
        "/etc/tidemark/secret/pg-password",
        &dir.path().join("pg-password").display().to_string(),
    );
    let cfg = tidemark::config::parse(Path::new("tidemark.toml"), &text, &|_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.sources[0].postgres.host, "127.0.0.1",
        "a sidecar reaches Postgres locally"
    );
    let port = cfg.metrics.as_ref().unwrap().listen.port() as i64;
    assert_eq!(tm["livenessProbe"]["httpGet"]["port"].as_i64(), Some(port));
    assert_eq!(tm["readinessProbe"]["httpGet"]["port"].as_i64(), Some(port));
}

#[test]
fn the_systemd_unit_is_sandboxed_and_restarts_on_failure() {
    let unit = read("systemd/tidemark.service");
    let keys: BTreeSet<(String, String)> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("Restart", "on-failure"),
    ] {
        assert!(
            keys.contains(&(k.to_string(), v.to_string())),
            "{k}={v} missing"
        );
    }
    let start = keys
        .iter()
        .find(|(k, _)| k == "ExecStart")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(
        start.contains("tidemark") && start.contains("run --config"),
        "{start}"
    );
    for section in ["[Unit]", "[Service]", "[Install]"] {
        assert!(unit.contains(section), "{section}");
    }
}

#[test]
fn the_dockerfile_builds_in_stages_and_runs_as_non_root() {
    let file = read("Dockerfile");
    let froms = file.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(froms, 2, "a build stage and a small final stage");
    assert!(file.contains("COPY --from=build"));
    assert!(
        file.lines()
            .any(|l| l.starts_with("USER ") && l.contains("nonroot"))
    );
    assert!(file.contains("ENTRYPOINT [\"/usr/local/bin/tidemark\"]"));
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_tidemark_exports() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("grafana/tidemark-dashboard.json")).unwrap();
    // Every metric family, with one sample each.
    let t = tidemark::telemetry::Telemetry::new(Duration::from_secs(60));
    let l = tidemark::telemetry::Telemetry::label("s");
    t.events.get_or_create(&l).inc();
    t.bytes.get_or_create(&l).inc();
    t.publish_latency.get_or_create(&l).observe(0.1);
    t.commit_to_ack.get_or_create(&l).observe(0.1);
    t.in_flight.get_or_create(&l).set(1);
    t.lag_bytes.get_or_create(&l).set(1);
    t.set_lag_seconds("s", 1.0);
    t.retained_wal_bytes.get_or_create(&l).set(1);
    t.flushed_lsn.get_or_create(&l).set(1);
    t.restarts.get_or_create(&l).inc();
    t.error("s", "x");
    t.set_streaming("s", true);
    let exported: BTreeSet<String> = t
        .encode()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for p in panels {
        let expr = p["targets"][0]["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("tidemark_") {
                assert!(
                    exported.contains(word),
                    "panel {:?} queries {word}, which is not exported: {exported:?}",
                    p["title"]
                );
            }
        }
    }
}
