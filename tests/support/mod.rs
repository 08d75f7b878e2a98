//! Test harness: real PostgreSQL and real nats-server, each on a free loopback port in
//! its own temporary directory, started by the test that needs them and cleaned up on
//! `Drop`. They can be stopped, restarted and killed with SIGKILL. A missing binary
//! fails the test with the command that installs it: a test never skips.
//!
//! Shared by the integration tests, the benchmark and the demo (`#[path]` includes).

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tempfile::TempDir;

mod config;
mod nats;
mod postgres;
mod process;
mod proxy;
mod stream;
pub use config::*;
pub use nats::*;
pub use postgres::*;
pub use process::*;
pub use proxy::*;
pub use stream::*;

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on 127.0.0.1");
    l.local_addr().expect("local addr").port()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Postgres refuses to run as root; as root, servers run as `nobody`.
const NOBODY: u32 = 65534;

fn as_server_user(cmd: &mut Command) -> &mut Command {
    if is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd
}

pub fn chown_for_server(path: &Path) {
    if is_root() {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown test dir");
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn kill(child: &mut Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What most tests start with: a Postgres, a nats-server, a temporary directory, and
/// a client on a fresh database `store`. Destructure it to keep the names short.
pub struct Rig {
    pub pg: PgServer,
    pub nats: NatsServer,
    pub dir: TempDir,
    pub db: tokio_postgres::Client,
}

impl Rig {
    pub async fn start() -> Rig {
        Self::start_with(&[]).await
    }

    /// With extra Postgres settings.
    pub async fn start_with(pg_settings: &[(&str, &str)]) -> Rig {
        let pg = PgServer::start_with(pg_settings);
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let db = pg.create_db("store").await;
        Rig { pg, nats, dir, db }
    }
}

/// GET `path` from a local HTTP endpoint: (status code, body); (0, "") when nothing
/// listens.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new());
    };
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Polls `f` until it says yes; fails naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
