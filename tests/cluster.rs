//! Integration tests on a 3-node JetStream cluster (real nats-servers, routes on
//! loopback) with an R3 stream: failover of the stream's leader, the loss of a
//! follower, a node restarted on its kept store. Every event stored once and in order.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use support::*;

/// Samples of (time, stream last sequence), taken every 50 ms by a background task.
struct Progress {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn watch(client: async_nats::Client, stream: &str) -> Progress {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let stream = stream.to_string();
        let task = tokio::spawn(async move {
            let js = async_nats::jetstream::new(client);
            loop {
                let info = tokio::time::timeout(Duration::from_millis(500), async {
                    js.get_stream(&stream)
                        .await
                        .ok()?
                        .info()
                        .await
                        .ok()
                        .map(|i| i.state.last_sequence)
                })
                .await;
                if let Ok(Some(seq)) = info {
                    out.lock().unwrap().push((Instant::now(), seq));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Progress { samples, task }
    }

    /// The last sequence sampled at or before `t`.
    fn at(&self, t: Instant) -> u64 {
        let samples = self.samples.lock().unwrap();
        samples
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0, |(_, seq)| *seq)
    }

    /// When the stream first held more than `seq` after `t`.
    fn grew_after(&self, t: Instant, seq: u64) -> Option<Instant> {
        let samples = self.samples.lock().unwrap();
        samples
            .iter()
            .find(|(at, s)| *at > t && *s > seq)
            .map(|(at, _)| *at)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Postgres with a table `item` in database `store`, a 3-node cluster, a temporary
/// directory, a client of `store`, and the config of source `name` (an R3 stream).
type ClusterRig = (
    PgServer,
    NatsCluster,
    tempfile::TempDir,
    tokio_postgres::Client,
    std::path::PathBuf,
);

async fn cluster_rig(name: &str) -> ClusterRig {
    cluster_rig_with(name, |spec, _| spec).await
}

/// `cluster_rig` with the source's config changed by `adjust` (given the Postgres).
async fn cluster_rig_with(
    name: &str,
    adjust: impl FnOnce(SourceSpec, &PgServer) -> SourceSpec,
) -> ClusterRig {
    let pg = PgServer::start();
    let cluster = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let db = pg.create_db("store").await;
    db.batch_execute("CREATE TABLE item (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let spec = SourceSpec::new(name, "store")
        .stream("replicas", 3)
        .nats_servers(cluster.servers());
    let cfg = write_config(dir.path(), &pg, &cluster.nodes[0], &adjust(spec, &pg));
    (pg, cluster, dir, db, cfg)
}

/// A read model whose handler is not idempotent (a counter), fed while the stream's
/// leader is killed -9: `tidemark project` reads on through the election and applies
/// each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_applies_each_event_once_across_a_leader_loss() {
    const ROWS: i64 = 30_000;
    let sections = |pg: &PgServer| {
        format!(
            r#"
[[projection]]
name = "count"
source = "proj"

[projection.postgres]
host = "127.0.0.1"
port = {}
dbname = "rm"
user = "postgres"

[[projection.on]]
type = "item.created"
sql = "UPDATE stats SET n = n + 1"
"#,
            pg.port
        )
    };
    let (pg, mut cluster, dir, db, cfg) =
        cluster_rig_with("proj", |spec, pg| spec.sections(&sections(pg))).await;
    let rm = pg.create_db("rm").await;
    rm.batch_execute("CREATE TABLE stats (n bigint NOT NULL); INSERT INTO stats VALUES (0);")
        .await
        .unwrap();
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    let mut project = Tidemark::project(&cfg, &dir.path().join("project.log"));
    tm.wait_streaming();
    for t in 0..30 {
        db.batch_execute(&format!(
            "INSERT INTO item SELECT g, md5(g::text) FROM generate_series({} + 1, {} + 1000) g",
            t * 1000,
            t * 1000
        ))
        .await
        .unwrap();
    }
    let applied = || async {
        rm.query_one("SELECT n FROM stats", &[])
            .await
            .map_or(-1, |r| r.get::<_, i64>(0))
    };
    wait_until(
        "the read model under way",
        Duration::from_secs(120),
        || async { applied().await >= 3_000 },
    )
    .await;
    let nc = cluster.client().await;
    let leader = cluster
        .stream_leader(&nc, "PROJ")
        .await
        .expect("the stream has a leader");
    cluster.kill9(leader);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let n = applied().await;
        if n == ROWS {
            break;
        }
        assert!(
            n < ROWS,
            "the counter passed the rows: {n}\n{}",
            project.log()
        );
        assert!(
            Instant::now() < deadline,
            "the read model stopped at {n} of {ROWS}\n{}",
            project.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One more row: the read model applies in stream order, so once it counts this
    // one, a second application of anything before it would show.
    db.batch_execute("INSERT INTO item VALUES (0, 'last')")
        .await
        .unwrap();
    wait_until("the last row applied", Duration::from_secs(60), || async {
        applied().await > ROWS
    })
    .await;
    assert_eq!(applied().await, ROWS + 1, "{}", project.log());
    assert!(project.is_running(), "{}", project.log());
    assert!(tm.is_running(), "{}", tm.log());
    cluster.start_again(leader);
}

/// The stream's leader killed -9 mid-backlog: the cluster elects another, tidemark
/// goes on within seconds of that, and every event is stored once, in order. Prints
/// the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_leader_killed_mid_backlog_fails_over_in_seconds() {
    // The default ack timeout: what an operator gets.
    let (_pg, mut cluster, dir, db, cfg) =
        cluster_rig_with("lead", |spec, _| spec.unset("ack_timeout_secs")).await;
    const ROWS: u64 = 60_000;
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    tm.wait_streaming();
    db.batch_execute("INSERT INTO item SELECT g, md5(g::text) FROM generate_series(1, 60000) g")
        .await
        .unwrap();
    let nc = cluster.client().await;
    let progress = Progress::watch(nc.clone(), "LEAD");
    wait_stream_count(&nc, "LEAD", 15_000, Duration::from_secs(120), || tm.log()).await;
    let leader = cluster
        .stream_leader(&nc, "LEAD")
        .await
        .expect("the stream has a leader");
    let mut elected = nc
        .subscribe("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.LEAD")
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let killed = Instant::now();
    cluster.kill9(leader);
    let stored_at_kill = progress.at(killed);
    let advisory = tokio::time::timeout(Duration::from_secs(60), elected.next())
        .await
        .expect("a new leader within 60 s")
        .expect("advisory");
    let elected_at = Instant::now();
    let new_leader: serde_json::Value = serde_json::from_slice(&advisory.payload).unwrap();
    wait_stream_count(&nc, "LEAD", ROWS, Duration::from_secs(180), || tm.log()).await;
    let resumed = progress
        .grew_after(elected_at, progress.at(elected_at).max(stored_at_kill))
        .expect("the stream grew after the election");
    let pause = resumed - killed;
    let election = elected_at - killed;
    let ours = resumed - elected_at;
    println!(
        "stream leader n{leader} killed at {stored_at_kill} events: {} elected after {:.1} s, \
         storing again {:.2} s after that; pause {:.1} s in all",
        new_leader["leader"],
        election.as_secs_f64(),
        ours.as_secs_f64(),
        pause.as_secs_f64()
    );
    // The election is the cluster's (a dead leader is noticed after raft's election
    // timeout); tidemark's part, from the new leader to the next stored event, is
    // what it must keep short (it was the 30 s ack timeout).
    assert!(
        ours <= Duration::from_secs(5),
        "storing resumed {ours:?} after the new leader was elected:\n{}",
        tm.log()
    );
    cluster.start_again(leader);
    let events = read_stream(&nc, "LEAD").await;
    assert_eq!(events.len() as u64, ROWS);
    assert_exactly_once(&events);
    drop(tm);
}

/// A follower killed -9 mid-backlog, then started again on its kept store: the stream
/// goes on with two of three, the follower catches up, every event once. And `check`
/// warns about a stream or bucket with fewer replicas than the cluster could give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_lost_and_restarted_on_its_store_changes_nothing() {
    let (pg, mut cluster, dir, db, cfg) = cluster_rig("follow").await;
    const ROWS: u64 = 40_000;
    let mut tm = Tidemark::run(&cfg, &dir.path().join("tm.log"));
    tm.wait_streaming();
    db.batch_execute(
        "INSERT INTO item SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
         INSERT INTO item SELECT g, md5(g::text) FROM generate_series(20001, 40000) g",
    )
    .await
    .unwrap();
    let nc = cluster.client().await;
    wait_stream_count(&nc, "FOLLOW", 8_000, Duration::from_secs(120), || tm.log()).await;
    let leader = cluster
        .stream_leader(&nc, "FOLLOW")
        .await
        .expect("the stream has a leader");
    let follower = (leader + 1) % 3;
    cluster.kill9(follower);
    wait_stream_count(&nc, "FOLLOW", 20_000, Duration::from_secs(120), || tm.log()).await;
    cluster.start_again(follower);
    wait_stream_count(&nc, "FOLLOW", ROWS, Duration::from_secs(180), || tm.log()).await;
    let events = read_stream(&nc, "FOLLOW").await;
    assert_eq!(events.len() as u64, ROWS);
    assert_exactly_once(&events);
    // The restarted follower caught up on its kept store.
    let js = async_nats::jetstream::new(nc.clone());
    wait_until("every replica current", Duration::from_secs(60), || {
        let js = js.clone();
        async move {
            let Ok(mut s) = js.get_stream("FOLLOW").await else {
                return false;
            };
            let Ok(info) = s.info().await else {
                return false;
            };
            info.cluster.as_ref().is_some_and(|c| {
                c.replicas.len() == 2
                    && c.replicas
                        .iter()
                        .all(|r| r.current && r.lag.unwrap_or(0) == 0)
            })
        }
    })
    .await;

    // check: the R3 stream and bucket are fine; an R1 stream on this cluster is not.
    let (code, out, err) = tidemark_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("replica(s)"), "{out}");
    let single = write_config(
        dir.path(),
        &pg,
        &cluster.nodes[0],
        &SourceSpec::new("single", "store"),
    );
    let (code, out, err) = tidemark_cmd(&["check", "--config", single.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 replica(s) on a cluster of 3 servers") && out.contains("replicas = 3"),
        "{out}"
    );
    drop(tm);
}

/// Writes one row per transaction into `item` of `db` until `stop`, riding out a
/// database that goes away (a failed insert is retried on a new connection); returns
/// the rows written.
fn writer(url: String, stop: Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut written = 0u64;
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
            }
            let Some(c) = client.as_ref() else { continue };
            let id = written as i64 + 1;
            // The row's id is the count written so far: a failed commit is retried
            // with the same id, and one that committed but lost its reply is skipped
            // by ON CONFLICT (the count comes from the table at the end anyway).
            let _ = c
                .execute(
                    "INSERT INTO item VALUES ($1, 'x') ON CONFLICT DO NOTHING",
                    &[&id],
                )
                .await
                .map(|_| written += 1);
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        written
    })
}

/// Joins the [[source]] sections of several single-source configs into one file.
fn joined_config(
    dir: &std::path::Path,
    name: &str,
    parts: &[&std::path::Path],
) -> std::path::PathBuf {
    let mut text = String::new();
    for (i, p) in parts.iter().enumerate() {
        let t = std::fs::read_to_string(p).unwrap();
        let at = if i == 0 {
            0
        } else {
            t.find("[[source]]").unwrap()
        };
        text.push_str(&t[at..]);
        text.push('\n');
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Three sources on one cluster: two in one process (databases on two Postgres
/// servers), one in another process. One Postgres goes down under load: its source
/// waits and catches up when it returns; the other two never stop; every stream holds
/// each of its table's rows once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sources_on_one_cluster_and_one_database_down() {
    let pg1 = PgServer::start();
    let mut pg2 = PgServer::start();
    let cluster = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut configs = Vec::new();
    for (name, pg) in [("a", &pg1), ("b", &pg1), ("c", &pg2)] {
        let db = pg.create_db(name).await;
        db.batch_execute("CREATE TABLE item (id bigint PRIMARY KEY, v text)")
            .await
            .unwrap();
        let cfg = write_config(
            dir.path(),
            pg,
            &cluster.nodes[0],
            &SourceSpec::new(name, name)
                .stream("replicas", 3)
                .nats_servers(cluster.servers()),
        );
        configs.push(cfg);
    }
    let both = joined_config(dir.path(), "ac.toml", &[&configs[0], &configs[2]]);
    let mut p1 = Tidemark::run(&both, &dir.path().join("ac.log"));
    let mut p2 = Tidemark::run(&configs[1], &dir.path().join("b.log"));
    p1.wait_streaming();
    p2.wait_streaming();
    let nc = cluster.client().await;
    wait_until("three streams", Duration::from_secs(60), || {
        let nc = nc.clone();
        async move {
            let js = async_nats::jetstream::new(nc);
            for s in ["A", "B", "C"] {
                if js.get_stream(s).await.is_err() {
                    return false;
                }
            }
            true
        }
    })
    .await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = [(&pg1, "a"), (&pg1, "b"), (&pg2, "c")]
        .into_iter()
        .map(|(pg, db)| writer(pg.url(db), stop.clone()))
        .collect();
    wait_stream_count(&nc, "C", 200, Duration::from_secs(60), || p1.log()).await;

    // C's database goes away; A (same process) and B (another) keep streaming.
    pg2.stop();
    // What C had in flight at the stop lands first; then C stands still while A (same
    // process) and B (another process) go on.
    let a0 = stream_count(&nc, "A").await;
    wait_stream_count(&nc, "A", a0 + 150, Duration::from_secs(90), || p1.log()).await;
    let c0 = stream_count(&nc, "C").await;
    let a1 = stream_count(&nc, "A").await;
    let b1 = stream_count(&nc, "B").await;
    wait_stream_count(&nc, "A", a1 + 300, Duration::from_secs(90), || p1.log()).await;
    wait_stream_count(&nc, "B", b1 + 300, Duration::from_secs(90), || p2.log()).await;
    assert_eq!(
        stream_count(&nc, "C").await,
        c0,
        "nothing new while C's database is down"
    );
    pg2.start_again();
    wait_stream_count(&nc, "C", c0 + 200, Duration::from_secs(120), || p1.log()).await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    for (name, pg, tm) in [("a", &pg1, &p1), ("b", &pg1, &p2), ("c", &pg2, &p1)] {
        let db = pg.client(name).await;
        let rows: i64 = db
            .query_one("SELECT count(*) FROM item", &[])
            .await
            .unwrap()
            .get(0);
        let stream = name.to_uppercase();
        wait_stream_count(&nc, &stream, rows as u64, Duration::from_secs(60), || {
            tm.log()
        })
        .await;
        let events = read_stream(&nc, &stream).await;
        assert_eq!(events.len() as i64, rows, "stream {stream}");
        assert_exactly_once(&events);
    }
    // The process noticed C's loss, in C's name, and went on.
    assert!(
        p1.log()
            .lines()
            .any(|l| l.contains("source=c") && l.contains("pipeline failed")),
        "{}",
        p1.log()
    );
    drop((p1, p2));
}
