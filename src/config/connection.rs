//! `[source.postgres]` and `[source.stream]`: what the adapters connect with.

use super::*;

impl Validator<'_> {
    pub(super) fn postgres(&mut self, prefix: &str, p: RawPostgres) -> PostgresConfig {
        let port = self.number(
            &p.port,
            &format!("{prefix}.postgres.port"),
            5432,
            1..=65_535,
        ) as u16;
        let password = self.secret(
            &format!("{prefix}.postgres.password_env"),
            &p.password_env,
            &format!("{prefix}.postgres.password_file"),
            &p.password_file,
        );
        if p.host.get_ref().is_empty() {
            self.issue(
                &p.host,
                format!("{prefix}.postgres.host"),
                "set a host name, an address, or a Unix socket directory",
            );
        }
        let sslmode = match p.sslmode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "prefer")) => SslMode::Prefer,
            Some((_, "disable")) => SslMode::Disable,
            Some((_, "require")) => SslMode::Require,
            Some((_, "verify-ca")) => SslMode::VerifyCa,
            Some((_, "verify-full")) => SslMode::VerifyFull,
            Some((m, other)) => {
                self.issue(
                    m,
                    format!("{prefix}.postgres.sslmode"),
                    format!("{other:?} is not an sslmode: use disable, prefer, require, verify-ca or verify-full"),
                );
                SslMode::Prefer
            }
        };
        let sslrootcert = p.sslrootcert.as_ref().map(|r| self.base.join(r.get_ref()));
        if matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            && sslrootcert.is_none()
            && let Some(m) = &p.sslmode
        {
            self.issue(
                m,
                format!("{prefix}.postgres.sslrootcert"),
                "verify-ca and verify-full need sslrootcert: the CA certificate(s) of the server",
            );
        }
        PostgresConfig {
            sslmode,
            sslrootcert,
            host: p.host.into_inner(),
            port,
            dbname: p.dbname.into_inner(),
            user: p.user.into_inner(),
            password,
            connect_timeout: Duration::from_secs(self.number(
                &p.connect_timeout_secs,
                &format!("{prefix}.postgres.connect_timeout_secs"),
                10,
                1..=600,
            )),
        }
    }

    pub(super) fn stream(&mut self, prefix: &str, source: &str, s: RawStream) -> StreamConfig {
        let name = s.name.get_ref().clone();
        if name.is_empty()
            || name
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            self.issue(
                &s.name,
                format!("{prefix}.stream.name"),
                "a stream name cannot be empty or hold spaces, '.', '*', '>', '/' or '\\'",
            );
        }
        let own = format!("{source}.>");
        let subjects = match &s.subjects {
            None => vec![own.clone()],
            Some(list) => {
                if !list.get_ref().iter().any(|x| x == &own || x == ">") {
                    self.issue(
                        list,
                        format!("{prefix}.stream.subjects"),
                        format!("the stream must capture {own:?}, where this source publishes"),
                    );
                }
                list.get_ref().clone()
            }
        };
        let storage = match s.storage.as_ref().map(|x| x.get_ref().as_str()) {
            None | Some("file") => Storage::File,
            Some("memory") => Storage::Memory,
            Some(other) => {
                let at = s.storage.as_ref().map(|x| x.span());
                if let Some(span) = at {
                    self.issues.push(ConfigIssue {
                        line: Some(line_of(self.text, span.start)),
                        key: format!("{prefix}.stream.storage"),
                        message: format!("{other:?} is not a storage: use \"file\" or \"memory\""),
                    });
                }
                Storage::File
            }
        };
        let replicas =
            self.number(&s.replicas, &format!("{prefix}.stream.replicas"), 1, 1..=5) as usize;
        let max_age = s.max_age_secs.as_ref().map(|_| {
            Duration::from_secs(self.number(
                &s.max_age_secs,
                &format!("{prefix}.stream.max_age_secs"),
                0,
                1..=u64::from(u32::MAX),
            ))
        });
        let max_bytes = s.max_bytes.as_ref().map(|_| {
            self.number(
                &s.max_bytes,
                &format!("{prefix}.stream.max_bytes"),
                0,
                1024..=i64::MAX as u64,
            ) as i64
        });
        // JetStream refuses a duplicate window longer than the retention: the default
        // shrinks to fit, an explicit one that does not fit is an error.
        let default_window = max_age.map_or(120, |a| a.as_secs().clamp(1, 120));
        let duplicate_window = Duration::from_secs(self.number(
            &s.duplicate_window_secs,
            &format!("{prefix}.stream.duplicate_window_secs"),
            default_window,
            1..=86_400,
        ));
        if let (Some(w), Some(age)) = (&s.duplicate_window_secs, max_age)
            && Duration::from_secs(*w.get_ref()) > age
        {
            self.issue(
                w,
                format!("{prefix}.stream.duplicate_window_secs"),
                format!(
                    "must not be longer than max_age_secs ({}): JetStream refuses such a stream",
                    age.as_secs()
                ),
            );
        }
        StreamConfig {
            name,
            subjects,
            storage,
            replicas,
            max_age,
            max_bytes,
            duplicate_window,
            atomic: false,
        }
    }
}
