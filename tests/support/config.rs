//! A typed builder for the config file of one source: tests say what differs from the
//! defaults (`.tables(&["orders"])`, `.set("publish_window", 64)`,
//! `.postgres("user", "weak")`) and `write` renders it with the `toml` crate, so a value
//! is always quoted and escaped as TOML wants. A test that changes the config between
//! runs changes the builder and writes it again; nothing patches the file's text.
//!
//! Mapping rules and projections stay TOML text (`.sections`): they are the language an
//! operator writes, and the tests that use them are about that language.

use std::fs;
use std::path::{Path, PathBuf};

use super::{NatsServer, PgServer, Proxy};

/// One setting's value.
#[derive(Clone, Debug)]
pub struct Setting(toml::Value);

macro_rules! setting_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Setting {
            fn from(v: $t) -> Self {
                Setting(toml::Value::Integer(i64::try_from(v).expect("setting fits an i64")))
            }
        }
    )*};
}
setting_from_int!(i32, i64, u16, u32, u64, usize);

impl From<bool> for Setting {
    fn from(v: bool) -> Self {
        Setting(toml::Value::Boolean(v))
    }
}

impl From<&str> for Setting {
    fn from(v: &str) -> Self {
        Setting(toml::Value::String(v.to_string()))
    }
}

impl From<String> for Setting {
    fn from(v: String) -> Self {
        Setting(toml::Value::String(v))
    }
}

impl From<&String> for Setting {
    fn from(v: &String) -> Self {
        Setting(toml::Value::String(v.clone()))
    }
}

impl From<&Path> for Setting {
    fn from(v: &Path) -> Self {
        Setting(toml::Value::String(v.display().to_string()))
    }
}

impl From<Vec<String>> for Setting {
    fn from(v: Vec<String>) -> Self {
        Setting(toml::Value::Array(
            v.into_iter().map(toml::Value::String).collect(),
        ))
    }
}

/// The keys of one TOML table, in the order they were first set.
#[derive(Clone, Debug, Default)]
struct Settings(Vec<(String, Setting)>);

impl Settings {
    fn set(&mut self, key: &str, value: Setting) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    fn unset(&mut self, key: &str) {
        let before = self.0.len();
        self.0.retain(|(k, _)| k != key);
        assert!(before != self.0.len(), "{key} is not set: nothing to unset");
    }

    fn render(&self, out: &mut String) {
        for (k, v) in &self.0 {
            out.push_str(&format!("{k} = {}\n", v.0));
        }
    }
}

/// The config of one source: `[nats]`, one `[[source]]` with its `[source.postgres]`
/// and `[source.stream]`, then any TOML sections. Defaults: every table, no
/// snapshot (existing rows stay out unless a test is about them), a status tick and
/// restarts fast enough for tests, the stream named after the source in capitals.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub name: String,
    pub dbname: String,
    nats_servers: Option<Vec<String>>,
    nats: Settings,
    source: Settings,
    postgres: Settings,
    stream: Settings,
    sections: String,
}

impl SourceSpec {
    pub fn new(name: &str, dbname: &str) -> Self {
        let mut source = Settings::default();
        source.set("publication", format!("tidemark_{name}").into());
        source.set("slot", format!("tidemark_{name}").into());
        source.set("all_tables", true.into());
        source.set("status_interval_secs", 1.into());
        source.set("ack_timeout_secs", 5.into());
        source.set("restart_backoff_initial_ms", 100.into());
        source.set("restart_backoff_max_secs", 2.into());
        source.set("snapshot", "never".into());
        let mut postgres = Settings::default();
        postgres.set("host", "127.0.0.1".into());
        postgres.set("dbname", dbname.into());
        postgres.set("user", "postgres".into());
        let mut stream = Settings::default();
        stream.set("name", name.to_uppercase().into());
        SourceSpec {
            name: name.to_string(),
            dbname: dbname.to_string(),
            nats_servers: None,
            nats: Settings::default(),
            source,
            postgres,
            stream,
            sections: String::new(),
        }
    }

    /// The published tables (instead of every table).
    pub fn tables(mut self, tables: &[&str]) -> Self {
        self.source.unset("all_tables");
        let list = tables.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        self.source.set("tables", list.into());
        self
    }

    /// `snapshot = "initial"` or `"never"`.
    pub fn snapshot(self, mode: &str) -> Self {
        self.set("snapshot", mode)
    }

    /// A key of `[[source]]`.
    pub fn set(mut self, key: &str, value: impl Into<Setting>) -> Self {
        self.source.set(key, value.into());
        self
    }

    /// Leaves a key of `[[source]]` (a default) out, so tidemark's own default holds.
    pub fn unset(mut self, key: &str) -> Self {
        self.source.unset(key);
        self
    }

    /// A key of `[source.postgres]` (`host`, `port`, `user`, `sslmode`, ...).
    pub fn postgres(mut self, key: &str, value: impl Into<Setting>) -> Self {
        self.postgres.set(key, value.into());
        self
    }

    /// A key of `[source.stream]` (`replicas`, `max_age_secs`, ...).
    pub fn stream(mut self, key: &str, value: impl Into<Setting>) -> Self {
        self.stream.set(key, value.into());
        self
    }

    /// A key of `[nats]` besides `servers`.
    pub fn nats(mut self, key: &str, value: impl Into<Setting>) -> Self {
        self.nats.set(key, value.into());
        self
    }

    /// The NATS servers, instead of the test's server (a proxy, a cluster).
    pub fn nats_servers(mut self, servers: Vec<String>) -> Self {
        self.nats_servers = Some(servers);
        self
    }

    /// Postgres reached through a test proxy.
    pub fn through_pg_proxy(self, proxy: &Proxy) -> Self {
        self.postgres("port", proxy.port)
    }

    /// NATS reached through a test proxy.
    pub fn through_nats_proxy(self, proxy: &Proxy) -> Self {
        self.nats_servers(vec![format!("nats://127.0.0.1:{}", proxy.port)])
    }

    /// TOML appended after the source: `[[source.table]]` mappings, outboxes,
    /// projections.
    pub fn sections(mut self, toml: &str) -> Self {
        self.sections = toml.to_string();
        self
    }

    /// The config file's text.
    pub fn render(&self, pg: &PgServer, nats: &NatsServer) -> String {
        let mut out = String::from("[nats]\n");
        let servers = self
            .nats_servers
            .clone()
            .unwrap_or_else(|| vec![nats.url()]);
        Settings(vec![("servers".to_string(), servers.into())]).render(&mut out);
        self.nats.render(&mut out);
        out.push_str(&format!(
            "\n[[source]]\nname = {}\n",
            toml::Value::String(self.name.clone())
        ));
        self.source.render(&mut out);
        out.push_str("\n[source.postgres]\n");
        let mut postgres = self.postgres.clone();
        if !postgres.0.iter().any(|(k, _)| k == "port") {
            postgres.0.insert(1, ("port".to_string(), pg.port.into()));
        }
        postgres.render(&mut out);
        out.push_str("\n[source.stream]\n");
        self.stream.render(&mut out);
        out.push('\n');
        out.push_str(&self.sections);
        out.push('\n');
        out
    }
}

/// Writes the config of one source to `dir/<name>.toml` (again, when the test changed
/// it) and returns the path.
pub fn write_config(dir: &Path, pg: &PgServer, nats: &NatsServer, s: &SourceSpec) -> PathBuf {
    let path = dir.join(format!("{}.toml", s.name));
    fs::write(&path, s.render(pg, nats)).expect("write config");
    path
}
