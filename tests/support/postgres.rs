//! A real PostgreSQL (initdb, wal_level=logical) on a free port, pgbench, and the
//! replication positions tests wait on.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

use super::*;

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

/// The major version of the PostgreSQL server binaries the tests run
/// (`TIDEMARK_PG_BINDIR`, else the system's), read once from `postgres --version`.
pub fn pg_major() -> u32 {
    static MAJOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = Command::new(pg_bindir().join("postgres"))
            .arg("--version")
            .output()
            .expect("run postgres --version");
        let text = String::from_utf8_lossy(&out.stdout);
        // "postgres (PostgreSQL) 13.23" or "... 15.18 (Debian 15.18-0+deb12u1)"
        text.split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the major version from {text:?}"))
    })
}

/// A client tool: the server's own, else Debian's (the npm builds of 12-14 and 17
/// ship only the server; Debian's 15 client tools work against every version).
pub fn client_tool(bindir: &std::path::Path, name: &str) -> PathBuf {
    let mut candidates = vec![bindir.join(name)];
    if let Ok(rd) = fs::read_dir("/usr/lib/postgresql") {
        candidates.extend(rd.flatten().map(|e| e.path().join("bin").join(name)));
    }
    candidates.push(PathBuf::from("/usr/bin").join(name));
    candidates
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| bindir.join(name))
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
    let bin = client_tool(&pg_bindir(), "pgbench");
    assert!(
        bin.exists(),
        "pgbench not found: it ships with the PostgreSQL packages (apt-get install postgresql-client)"
    );
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
        Self::start_from(pg_bindir(), extra)
    }

    /// Starts a server from the binaries in `bindir` (another version than the run's).
    pub fn start_from(bindir: PathBuf, extra: &[(&str, &str)]) -> PgServer {
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
                let ready = Command::new(client_tool(&self.bindir, "pg_isready"))
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
