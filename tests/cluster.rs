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

async fn cluster_rig(
    name: &str,
) -> (
    PgServer,
    NatsCluster,
    tempfile::TempDir,
    tokio_postgres::Client,
    std::path::PathBuf,
) {
    let pg = PgServer::start();
    let cluster = NatsCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let db = pg.create_db("store").await;
    db.batch_execute("CREATE TABLE item (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let cfg = write_config(
        dir.path(),
        &pg,
        &cluster.nodes[0],
        &SourceSpec {
            sections: "replicas = 3",
            ..SourceSpec::new(name, "store")
        },
    );
    edit_file(
        &cfg,
        &format!("servers = [\"{}\"]", cluster.nodes[0].url()),
        &format!("servers = [{}]", cluster.servers_toml()),
    );
    (pg, cluster, dir, db, cfg)
}

/// The stream's leader killed -9 mid-backlog: the cluster elects another, tidemark
/// goes on within seconds of that, and every event is stored once, in order. Prints
/// the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_leader_killed_mid_backlog_fails_over_in_seconds() {
    let (_pg, mut cluster, dir, db, cfg) = cluster_rig("lead").await;
    // The default ack timeout: what an operator gets.
    edit_file(&cfg, "ack_timeout_secs = 5\n", "");
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
