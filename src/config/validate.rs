//! The validator: collects every issue of a file in one pass. Its shared helpers
//! (an issue at a span, bounded numbers, secrets) and the top-level `config` live
//! here; each section's checks live in the file named after it.

use super::*;

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) issues: Vec<ConfigIssue>,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) base: &'a Path,
}

impl Validator<'_> {
    pub(super) fn issue<T>(
        &mut self,
        at: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.issues.push(ConfigIssue {
            line: Some(line_of(self.text, at.span().start)),
            key: key.into(),
            message: message.into(),
        });
    }

    /// A whole number in `range`, or the default when absent.
    pub(super) fn number(
        &mut self,
        v: &Option<Spanned<u64>>,
        key: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        match v {
            None => default,
            Some(s) if range.contains(s.get_ref()) => *s.get_ref(),
            Some(s) => {
                self.issue(
                    s,
                    key,
                    format!(
                        "{} is out of range: use a value from {} to {}",
                        s.get_ref(),
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    /// A secret from an environment variable or a file; at most one may be given.
    pub(super) fn secret(
        &mut self,
        env_key: &str,
        env_var: &Option<Spanned<String>>,
        file_key: &str,
        file: &Option<Spanned<String>>,
    ) -> Option<Secret> {
        match (env_var, file) {
            (Some(e), Some(_)) => {
                self.issue(
                    e,
                    env_key,
                    format!("set either {env_key} or {file_key}, not both"),
                );
                None
            }
            (Some(e), None) => match (self.env)(e.get_ref()) {
                Some(v) => Some(Secret::new(v)),
                None => {
                    self.issue(
                        e,
                        env_key,
                        format!("environment variable {} is not set", e.get_ref()),
                    );
                    None
                }
            },
            (None, Some(f)) => {
                let path = self.base.join(f.get_ref());
                match std::fs::read_to_string(&path) {
                    Ok(v) => Some(Secret::new(v.trim_end_matches(['\n', '\r']).to_string())),
                    Err(err) => {
                        self.issue(
                            f,
                            file_key,
                            format!("cannot read {}: {err}", path.display()),
                        );
                        None
                    }
                }
            }
            (None, None) => None,
        }
    }

    pub(super) fn config(&mut self, path: &Path, raw: RawConfig) -> Config {
        let nats = self.nats(raw.nats);
        if raw.source.is_empty() {
            self.issues.push(ConfigIssue {
                line: None,
                key: "source".into(),
                message: "no [[source]] is configured: add one per database to stream".into(),
            });
        }
        let mut sources = Vec::new();
        let mut names = HashSet::new();
        let mut streams = HashSet::new();
        for (i, s) in raw.source.into_iter().enumerate() {
            let prefix = format!("source[{i}]");
            let src = s.into_inner();
            if !names.insert(src.name.get_ref().clone()) {
                self.issue(&src.name, format!("{prefix}.name"), "duplicate source name");
            }
            if !streams.insert(src.stream.get_ref().name.get_ref().clone()) {
                self.issue(
                    &src.stream.get_ref().name,
                    format!("{prefix}.stream.name"),
                    "another source already writes this stream: each source needs its own stream",
                );
            }
            sources.push(self.source(&prefix, src));
        }
        let mut projections = Vec::new();
        let mut proj_names = HashSet::new();
        for (i, p) in raw.projection.iter().enumerate() {
            let prefix = format!("projection[{i}]");
            if !proj_names.insert(p.get_ref().name.get_ref().clone()) {
                self.issue(
                    &p.get_ref().name,
                    format!("{prefix}.name"),
                    "duplicate projection name",
                );
            }
            if let Some(pc) = self.projection(&prefix, p, &sources) {
                projections.push(pc);
            }
        }
        let metrics = raw.metrics.as_ref().and_then(|m| {
            let m = m.get_ref();
            let ready_max_lag = Duration::from_secs(self.number(
                &m.ready_max_lag_secs,
                "metrics.ready_max_lag_secs",
                60,
                1..=86_400,
            ));
            let project_listen = match &m.project_listen {
                Some(p) => match p.get_ref().parse::<std::net::SocketAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        self.issue(
                            p,
                            "metrics.project_listen",
                            "use an address and port, like \"127.0.0.1:9188\"",
                        );
                        None
                    }
                },
                None => None,
            };
            match m.listen.get_ref().parse::<std::net::SocketAddr>() {
                Ok(listen) => Some(MetricsConfig {
                    listen,
                    project_listen,
                    ready_max_lag,
                }),
                Err(_) => {
                    self.issue(
                        &m.listen,
                        "metrics.listen",
                        "use an address and port, like \"127.0.0.1:9187\" or \"0.0.0.0:9187\"",
                    );
                    None
                }
            }
        });
        Config {
            path: path.to_path_buf(),
            metrics,
            nats,
            projections,
            sources,
        }
    }

    /// A table of names to event paths (`columns = { id = "data.after.id" }`), each
    /// value checked; `wrong` says what a value that is not a string should be.
    pub(super) fn paths(
        &mut self,
        table: Option<&Spanned<toml::Table>>,
        key: &str,
        wrong: &str,
    ) -> Vec<(String, EventPath)> {
        let Some(t) = table else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, v) in t.get_ref() {
            let at = format!("{key}.{name}");
            match v.as_str() {
                Some(text) => {
                    let path = self.path(t, &at, text);
                    out.push((name.clone(), path));
                }
                None => self.issue(t, at, wrong),
            }
        }
        out
    }

    pub(super) fn path(&mut self, at: &Spanned<impl Sized>, key: &str, text: &str) -> EventPath {
        let parts: Vec<String> = text.split('.').map(str::to_string).collect();
        if text.is_empty() || parts.iter().any(|p| p.is_empty()) {
            self.issue(
                at,
                key,
                format!(
                    "{text:?} is not a path into an event: use dots, like \"data.after.total\""
                ),
            );
        }
        parts
    }
}
