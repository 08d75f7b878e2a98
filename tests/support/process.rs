//! The tidemark binary under test: `run` and `project` as child processes (killed,
//! terminated, their logs read), and one-shot CLI commands.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

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
        let (user, sys) = self.cpu_times()?;
        Some(user + sys)
    }

    /// The CPU time used so far: (user, system).
    pub fn cpu_times(&self) -> Option<(Duration, Duration)> {
        cpu_times_of(self.pid()?)
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

    /// Waits for the process to stop on its own with exit code 1 (a refusal), and
    /// that its log says each of `needles` and never that it is retrying; returns
    /// the log.
    pub fn wait_refused(&mut self, needles: &[&str]) -> String {
        let status = self.wait_exit(Duration::from_secs(30));
        let log = self.log();
        assert_eq!(status.code(), Some(1), "{log}");
        for n in needles {
            assert!(log.contains(n), "missing {n:?} in:\n{log}");
        }
        assert!(!log.contains("retrying"), "a refusal is not retried: {log}");
        log
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

/// The CPU time a process has used so far, (user, system), from /proc.
pub fn cpu_times_of(pid: u32) -> Option<(Duration, Duration)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let user: u64 = f.get(11)?.parse().ok()?;
    let sys: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let time = |ticks: u64| Duration::from_millis(ticks * 1000 / hz);
    Some((time(user), time(sys)))
}
