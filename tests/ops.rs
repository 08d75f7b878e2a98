//! Integration tests of running tidemark in production: the metrics and health
//! endpoints, against a real PostgreSQL and a real nats-server.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// The value of a metric line that starts with `prefix`.
fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The metrics page once the source's published-events counter (`label` is its
/// label set) reached `events`.
async fn metrics_once_published(port: u16, label: &str, events: u64) -> String {
    let counter = format!("tidemark_events_published_total{label}");
    wait_until(
        "the counter to reach the stream",
        Duration::from_secs(10),
        || async { metric(&http_get(port, "/metrics").await.1, &counter) == Some(events as f64) },
    )
    .await;
    http_get(port, "/metrics").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_stream_holds_and_readyz_follows_a_nats_outage() {
    let Rig {
        pg,
        mut nats,
        dir,
        db,
    } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let port = free_port();
    let sections = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\nready_max_lag_secs = 5\n");
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["t"])
            .sections(&sections),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    assert_eq!(http_get(port, "/healthz").await, (200, "ok\n".to_string()));
    wait_until("ready", Duration::from_secs(10), || async {
        http_get(port, "/readyz").await.0 == 200
    })
    .await;

    // A known workload: 300 rows in 30 transactions.
    for i in 0..30 {
        let values: Vec<String> = (0..10).map(|j| format!("({}, 'x')", i * 10 + j)).collect();
        db.batch_execute(&format!("INSERT INTO t VALUES {}", values.join(", ")))
            .await
            .unwrap();
    }
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 300, Duration::from_secs(30), || tm.log()).await;
    let label = "{source=\"store\"}";
    let body = metrics_once_published(port, label, 300).await;
    assert_eq!(stream_count(&nc, "STORE").await, 300);
    assert!(
        metric(
            &body,
            &format!("tidemark_event_bytes_published_total{label}")
        )
        .unwrap()
            > 300.0 * 100.0
    );
    // One observation per ack, and one ack covers a run of publishes.
    let acks = metric(
        &body,
        &format!("tidemark_publish_latency_seconds_count{label}"),
    )
    .unwrap_or(0.0);
    assert!((1.0..=300.0).contains(&acks), "{acks} acks for 300 events");
    assert_eq!(
        metric(&body, &format!("tidemark_streaming{label}")),
        Some(1.0)
    );
    assert!(
        body.contains("tidemark_commit_to_ack_seconds_bucket"),
        "{body}"
    );
    // Drained: the lag gauges go to zero.
    wait_until("lag to drain", Duration::from_secs(20), || async {
        let (_, body) = http_get(port, "/metrics").await;
        metric(&body, &format!("tidemark_replication_lag_seconds{label}")) == Some(0.0)
            && metric(&body, &format!("tidemark_in_flight{label}")) == Some(0.0)
            && metric(&body, &format!("tidemark_slot_retained_wal_bytes{label}")).is_some()
    })
    .await;

    // NATS goes away: not ready (streaming stops or the lag grows), and ready again
    // once it is back.
    nats.stop();
    db.batch_execute("INSERT INTO t VALUES (1000, 'during the outage')")
        .await
        .unwrap();
    wait_until("not ready", Duration::from_secs(60), || async {
        http_get(port, "/readyz").await.0 == 503
    })
    .await;
    let (_, why) = http_get(port, "/readyz").await;
    assert!(why.contains("source store"), "{why}");
    // status says the same as the probe.
    let cfg_arg = cfg.to_str().unwrap();
    let (_, out, _) = tidemark_cmd(&["status", "--config", cfg_arg, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status[0]["readyz"]["ready"], false, "{out}");
    assert!(
        status[0]["readyz"]["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("source store"),
        "{out}"
    );
    nats.start_again();
    wait_until("ready again", Duration::from_secs(60), || async {
        http_get(port, "/readyz").await.0 == 200
    })
    .await;
    let (code, out, _) = tidemark_cmd(&["status", "--config", cfg_arg, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status[0]["readyz"]["ready"], true, "{out}");
    assert_eq!(code, 0, "{out}");
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 301, Duration::from_secs(30), || tm.log()).await;
    assert!(tm.is_running(), "{}", tm.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_or_select_is_told_which_grant_is_missing() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE ROLE weak LOGIN;
         CREATE PUBLICATION tidemark_store FOR TABLE t;",
    )
    .await
    .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["t"])
            .set("create_publication", false)
            .postgres("user", "weak"),
    );
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL [store] grants: role \"weak\" lacks the REPLICATION attribute: run ALTER ROLE \"weak\" REPLICATION"),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    assert_eq!(
        tm.wait_exit(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        tm.log()
    );
    assert!(
        tm.log().contains("lacks the REPLICATION attribute"),
        "{}",
        tm.log()
    );

    db.batch_execute("ALTER ROLE weak REPLICATION")
        .await
        .unwrap();
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "lacks SELECT on \"public\".\"t\": run GRANT SELECT ON \"public\".\"t\" TO \"weak\""
        ),
        "{out}"
    );

    db.batch_execute("GRANT SELECT ON t TO weak").await.unwrap();
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok   [store] grants:"), "{out}");
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_prove_progress_and_a_stall_is_said_loudly() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE quiet (id int PRIMARY KEY)")
        .await
        .unwrap();
    let port = free_port();
    let sections = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["quiet"])
            .set("heartbeat_interval_secs", 1)
            .set("stall_after_secs", 2)
            .sections(&sections),
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    // The table is quiet, but heartbeats reach the stream.
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 2, Duration::from_secs(30), || tm.log()).await;
    let events = read_stream(&nc, "STORE").await;
    assert!(
        events
            .iter()
            .all(|e| e.subject == "store._tidemark.heartbeat"),
        "{:?}",
        events[0].subject
    );
    wait_until("ready", Duration::from_secs(10), || async {
        http_get(port, "/readyz").await.0 == 200
    })
    .await;

    // Freeze nats-server: connections stay open, nothing is stored.
    let pid = nats.pid().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stalled = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, body) = http_get(port, "/readyz").await;
            if code == 503 && body.contains("stalled") {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    .await;
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(stalled, "readyz never said stalled:\n{}", tm.log());
    assert!(tm.log().contains("no progress"), "{}", tm.log());
    wait_until("ready again", Duration::from_secs(60), || async {
        http_get(port, "/readyz").await.0 == 200
    })
    .await;
    let (_, body) = http_get(port, "/metrics").await;
    assert_eq!(
        metric(&body, "tidemark_stalled{source=\"store\"}"),
        Some(0.0),
        "{body}"
    );
    assert!(tm.is_running(), "{}", tm.log());
}

/// A backlog is stored with one ack per run of publishes, not one per event (the
/// sequence chain makes the ack of a run's last publish cover the run: see the
/// publisher's DESIGN note), and every change is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_stored_with_one_ack_per_run() {
    let Rig { pg, nats, dir, db } = Rig::start().await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let port = free_port();
    let cfg = write_config(
        dir.path(),
        &pg,
        &nats,
        &SourceSpec::new("store", "store")
            .tables(&["t"])
            .sections(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")),
    );
    // The slot exists from the first start; the backlog is written while stopped.
    let log = dir.path().join("tidemark.log");
    let mut tm = Tidemark::run(&cfg, &log);
    tm.wait_streaming();
    assert!(
        tm.terminate(Duration::from_secs(20)).success(),
        "{}",
        tm.log()
    );
    let sql: String = (0..100)
        .map(|i| {
            format!(
                "INSERT INTO t SELECT g, 'x' FROM generate_series({}, {}) g;",
                i * 100,
                i * 100 + 99
            )
        })
        .collect();
    db.batch_execute(&sql).await.unwrap();
    let mut tm = Tidemark::run(&cfg, &log);
    let nc = nats.client().await;
    wait_stream_count(&nc, "STORE", 10_000, Duration::from_secs(60), || tm.log()).await;
    let label = "{source=\"store\"}";
    let body = metrics_once_published(port, label, 10_000).await;
    let acks = metric(
        &body,
        &format!("tidemark_publish_latency_seconds_count{label}"),
    )
    .unwrap_or(0.0);
    // One per event would be 10,000; runs of up to 256 need about 40, and each
    // moment the source finds nothing more to read adds one.
    assert!(
        (1.0..=1_000.0).contains(&acks),
        "{acks} acks for 10,000 events"
    );
    let events = read_stream(&nc, "STORE").await;
    assert_eq!(events.len(), 10_000);
    assert_exactly_once(&events);
    assert!(
        tm.terminate(Duration::from_secs(20)).success(),
        "{}",
        tm.log()
    );
}

/// A CA, a server certificate it signs (for localhost and 127.0.0.1), and a second,
/// unrelated CA, written as PEM files the servers (running as the test user or
/// nobody) can read.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let cert = params.self_signed(&key).unwrap();
            (params, key, cert)
        };
        let (ca_params, ca_key, ca_cert) = ca("tidemark test CA");
        let (_, _, other_cert) = ca("some other CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap()
                .signed_by(&server_key, &issuer)
                .unwrap();
        let write = |name: &str, text: String, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            chown_for_server(&path);
        };
        write("ca.pem", ca_cert.pem(), 0o644);
        write("other-ca.pem", other_cert.pem(), 0o644);
        write("server.crt", server.pem(), 0o644);
        write("server.key", server_key.serialize_pem(), 0o600);
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_and_nats_verifies_certificates_and_names_a_wrong_ca() {
    let certs = Certs::new();
    let pg = PgServer::start_with(&[
        ("ssl", "on"),
        ("ssl_cert_file", &certs.path("server.crt")),
        ("ssl_key_file", &certs.path("server.key")),
    ]);
    // nats-server runs as the test user: give it a key it can read.
    let nats_key = certs.path("nats.key");
    std::fs::copy(certs.path("server.key"), &nats_key).unwrap();
    let nats = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        &certs.path("server.crt"),
        "--tlskey",
        &nats_key,
    ]);
    let db = pg.create_db("store").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = SourceSpec::new("store", "store")
        .tables(&["t"])
        .postgres("sslmode", "verify-full")
        .postgres("sslrootcert", certs.path("ca.pem"))
        .nats("tls_ca_file", certs.path("ca.pem"));
    let cfg = write_config(dir.path(), &pg, &nats, &spec);
    let cfg_arg = cfg.to_str().unwrap();
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}{err}");

    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    let nc = async_nats::ConnectOptions::new()
        .add_root_certificates(certs.dir.path().join("ca.pem"))
        .require_tls(true)
        .connect(nats.url())
        .await
        .unwrap();
    wait_stream_count(&nc, "STORE", 1, Duration::from_secs(30), || tm.log()).await;
    // Both of tidemark's Postgres sessions (the catalog and the walsender) use TLS.
    let encrypted: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name LIKE 'tidemark%' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 2, "{encrypted} TLS sessions");
    assert!(tm.terminate(Duration::from_secs(30)).success());

    // The wrong CA for Postgres: check and run say so, and run stops.
    let wrong_pg_ca = spec
        .clone()
        .postgres("sslrootcert", certs.path("other-ca.pem"));
    write_config(dir.path(), &pg, &nats, &wrong_pg_ca);
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL [store] postgres:") && out.contains("UnknownIssuer"),
        "{out}"
    );
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tidemark2.log"));
    assert_eq!(
        tm.wait_exit(Duration::from_secs(30)).code(),
        Some(1),
        "{}",
        tm.log()
    );
    assert!(tm.log().contains("UnknownIssuer"), "{}", tm.log());

    // The wrong CA for NATS.
    let wrong_nats_ca = spec.nats("tls_ca_file", certs.path("other-ca.pem"));
    write_config(dir.path(), &pg, &nats, &wrong_nats_ca);
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL [store] nats: cannot connect to NATS"),
        "{out}{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_authenticates_to_nats_and_its_seed_never_shows() {
    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("auth.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let pg = PgServer::start();
    let nats = NatsServer::start_with(&["-c", conf.to_str().unwrap()]);
    let db = pg.create_db("store").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let spec = SourceSpec::new("store", "store").tables(&["t"]);
    let cfg = write_config(dir.path(), &pg, &nats, &spec);
    let cfg_arg = cfg.to_str().unwrap();
    // No credentials: refused.
    let (code, out, _) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL [store] nats"), "{out}");
    // The seed from a file: connected, and the seed appears nowhere in the output.
    let seed = user.seed().unwrap();
    std::fs::write(dir.path().join("nats.nk"), &seed).unwrap();
    write_config(
        dir.path(),
        &pg,
        &nats,
        &spec.nats("nkey_seed_file", "nats.nk"),
    );
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok   [store] nats: connected"), "{out}");
    assert!(!out.contains(&seed) && !err.contains(&seed));
}
