//! `[nats]` and `[[source]]` sections (the source's Postgres and stream sections in
//! `connection.rs`, its mappings in `mapping.rs`).

use super::*;

impl Validator<'_> {
    /// A section about a table the source does not stream: says so, with `fix`.
    fn unlisted(
        &mut self,
        tables: &TableSelection,
        (schema, table): (&str, &str),
        at: &Spanned<String>,
        key: String,
        fix: &str,
    ) {
        if let TableSelection::Listed(list) = tables
            && !list.iter().any(|(s, t)| s == schema && t == table)
        {
            self.issue(
                at,
                key,
                format!("{schema}.{table} is not in this source's tables: {fix}"),
            );
        }
    }

    pub(super) fn nats(&mut self, raw: Spanned<RawNats>) -> NatsConfig {
        let n = raw.get_ref();
        if n.servers.get_ref().is_empty() {
            self.issue(
                &n.servers,
                "nats.servers",
                "list at least one server, like \"nats://127.0.0.1:4222\"",
            );
        }
        let password = self.secret(
            "nats.password_env",
            &n.password_env,
            "nats.password_file",
            &n.password_file,
        );
        let token = self.secret(
            "nats.token_env",
            &n.token_env,
            "nats.token_file",
            &n.token_file,
        );
        let nkey = self.secret(
            "nats.nkey_seed_env",
            &n.nkey_seed_env,
            "nats.nkey_seed_file",
            &n.nkey_seed_file,
        );
        let auth = match (&n.user, password, token, &n.credentials_file) {
            (None, None, None, None) if nkey.is_some() => {
                NatsAuth::NKey(nkey.unwrap_or_else(|| Secret::new(String::new())))
            }
            (None, None, None, None) => NatsAuth::None,
            (Some(u), Some(p), None, None) => NatsAuth::UserPassword {
                user: u.get_ref().clone(),
                password: p,
            },
            (None, None, Some(t), None) => NatsAuth::Token(t),
            (None, None, None, Some(c)) => NatsAuth::CredentialsFile(self.base.join(c.get_ref())),
            (Some(u), None, None, None) => {
                if n.password_env.is_none() && n.password_file.is_none() {
                    self.issue(u, "nats.user", "a user needs password_env or password_file");
                }
                NatsAuth::None
            }
            _ => {
                if n.password_env.is_some()
                    || n.password_file.is_some()
                    || n.token_env.is_some()
                    || n.token_file.is_some()
                    || n.credentials_file.is_some()
                    || n.nkey_seed_env.is_some()
                    || n.nkey_seed_file.is_some()
                {
                    self.issue(&raw, "nats", "choose one way to authenticate: user with password, a token, a credentials file, or an NKey seed");
                }
                NatsAuth::None
            }
        };
        NatsConfig {
            servers: n.servers.get_ref().clone(),
            auth,
            connect_timeout: Duration::from_secs(self.number(
                &n.connect_timeout_secs,
                "nats.connect_timeout_secs",
                5,
                1..=600,
            )),
            tls_ca_file: n.tls_ca_file.as_ref().map(|f| self.base.join(f.get_ref())),
            tls_required: n.tls_required.unwrap_or(n.tls_ca_file.is_some()),
        }
    }

    pub(super) fn source(&mut self, prefix: &str, s: RawSource) -> SourceConfig {
        let name = s.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            self.issue(
                &s.name,
                format!("{prefix}.name"),
                "use letters, digits, '_' and '-' only: the name starts every subject and event id",
            );
        }
        let slot = s.slot.get_ref().clone();
        if slot.is_empty()
            || slot.len() > 63
            || !slot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            self.issue(
                &s.slot,
                format!("{prefix}.slot"),
                "a replication slot name has 1 to 63 lowercase letters, digits or '_'",
            );
        }
        let publication = s.publication.get_ref().clone();
        if publication.is_empty() || publication.len() > 63 {
            self.issue(
                &s.publication,
                format!("{prefix}.publication"),
                "a publication name has 1 to 63 characters",
            );
        }
        let all = s.all_tables.as_ref().map(|a| *a.get_ref());
        let tables = match (&s.tables, all) {
            (Some(t), None | Some(false)) => {
                let mut out = Vec::new();
                if t.get_ref().is_empty() {
                    self.issue(
                        t,
                        format!("{prefix}.tables"),
                        "list at least one table, or set all_tables = true",
                    );
                }
                for name in t.get_ref() {
                    match split_table(name) {
                        Some(pair) => out.push(pair),
                        None => self.issue(
                            t,
                            format!("{prefix}.tables"),
                            format!(
                                "{name:?} is not a table name: use \"table\" or \"schema.table\", with a name in double quotes when it holds spaces or dots ('\"order lines\"')"
                            ),
                        ),
                    }
                }
                TableSelection::Listed(out)
            }
            (Some(t), Some(true)) => {
                self.issue(
                    t,
                    format!("{prefix}.tables"),
                    "set either tables or all_tables = true, not both",
                );
                TableSelection::All
            }
            (None, Some(true)) => TableSelection::All,
            (None, _) => {
                self.issue(
                    &s.publication,
                    format!("{prefix}.tables"),
                    "say which tables to stream: tables = [\"orders\", ...] or all_tables = true",
                );
                TableSelection::All
            }
        };
        let pg = self.postgres(prefix, s.postgres.into_inner());
        let mut stream = self.stream(prefix, &name, s.stream.into_inner());
        stream.atomic = s.atomic_transactions.unwrap_or(false);
        let mut mappings = Vec::new();
        for (i, t) in s.table.iter().enumerate() {
            if let Some(spec) = self.table_mapping(&format!("{prefix}.table[{i}]"), &name, t) {
                if mappings
                    .iter()
                    .any(|m: &TableSpec| m.schema == spec.schema && m.table == spec.table)
                {
                    self.issue(
                        &t.get_ref().name,
                        format!("{prefix}.table[{i}].name"),
                        "this table already has a mapping: merge the two",
                    );
                }
                self.unlisted(
                    &tables,
                    (&spec.schema, &spec.table),
                    &t.get_ref().name,
                    format!("{prefix}.table[{i}].name"),
                    "add it there, or remove the mapping",
                );
                mappings.push(spec);
            }
        }
        let mut outboxes = Vec::new();
        for (i, o) in s.outbox.iter().enumerate() {
            if let Some(spec) = self.outbox(&format!("{prefix}.outbox[{i}]"), &name, o) {
                let mapped = mappings
                    .iter()
                    .any(|m| m.schema == spec.schema && m.table == spec.table);
                if mapped {
                    self.issue(
                        &o.get_ref().table,
                        format!("{prefix}.outbox[{i}].table"),
                        "this table also has a [[source.table]] mapping: an outbox table's rows are published verbatim, so remove one",
                    );
                }
                self.unlisted(
                    &tables,
                    (&spec.schema, &spec.table),
                    &o.get_ref().table,
                    format!("{prefix}.outbox[{i}].table"),
                    "add it there",
                );
                outboxes.push(spec);
            }
        }
        let snapshot = match s.snapshot.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "initial")) => SnapshotMode::Initial,
            Some((_, "never")) => SnapshotMode::Never,
            Some((m, other)) => {
                self.issue(
                    m,
                    format!("{prefix}.snapshot"),
                    format!("{other:?} is not a snapshot mode: use \"initial\" or \"never\""),
                );
                SnapshotMode::Never
            }
        };
        let snapshot_chunk_size = self.number(
            &s.snapshot_chunk_size,
            &format!("{prefix}.snapshot_chunk_size"),
            1000,
            1..=100_000,
        );
        let snapshot_tables = s.snapshot_tables.as_ref().map(|list| {
            let mut out = Vec::new();
            for name in list.get_ref() {
                match split_table(name) {
                    Some(pair) => {
                        if let TableSelection::Listed(streamed) = &tables
                            && !streamed.contains(&pair)
                        {
                            self.issue(
                                list,
                                format!("{prefix}.snapshot_tables"),
                                format!("{name:?} is not in this source's tables"),
                            );
                        }
                        out.push(pair);
                    }
                    None => self.issue(
                        list,
                        format!("{prefix}.snapshot_tables"),
                        format!("{name:?} is not a table name: use \"table\" or \"schema.table\", with a name in double quotes when it holds spaces or dots ('\"order lines\"')"),
                    ),
                }
            }
            out
        });
        let mut messages: Vec<MessageSpec> = Vec::new();
        for (i, m) in s.message.iter().enumerate() {
            if let Some(spec) = self.message(&format!("{prefix}.message[{i}]"), &name, m) {
                if messages.iter().any(|x| x.prefix == spec.prefix) {
                    self.issue(
                        &m.get_ref().prefix,
                        format!("{prefix}.message[{i}].prefix"),
                        "duplicate message prefix",
                    );
                }
                messages.push(spec);
            }
        }
        let publish_window = self.number(
            &s.publish_window,
            &format!("{prefix}.publish_window"),
            DEFAULT_PUBLISH_WINDOW as u64,
            1..=65_536,
        ) as usize;
        let max_event_bytes = self.number(
            &s.max_event_bytes,
            &format!("{prefix}.max_event_bytes"),
            DEFAULT_MAX_EVENT_BYTES as u64,
            1024..=64 * 1024 * 1024,
        ) as usize;
        let atomic_batch_max = self.number(
            &s.atomic_batch_max,
            &format!("{prefix}.atomic_batch_max"),
            DEFAULT_ATOMIC_BATCH_MAX.min(publish_window as u64),
            2..=1000,
        ) as usize;
        if let Some(b) = &s.atomic_batch_max
            && *b.get_ref() as usize > publish_window
        {
            self.issue(
                b,
                format!("{prefix}.atomic_batch_max"),
                format!("a batch must fit in the publish window ({publish_window}): lower it or raise publish_window"),
            );
        }
        let ack_timeout = Duration::from_secs(self.number(
            &s.ack_timeout_secs,
            &format!("{prefix}.ack_timeout_secs"),
            30,
            1..=3600,
        ));
        let status_interval = Duration::from_secs(self.number(
            &s.status_interval_secs,
            &format!("{prefix}.status_interval_secs"),
            10,
            1..=3600,
        ));
        let backoff_initial = Duration::from_millis(self.number(
            &s.restart_backoff_initial_ms,
            &format!("{prefix}.restart_backoff_initial_ms"),
            500,
            10..=600_000,
        ));
        let backoff_max = Duration::from_secs(self.number(
            &s.restart_backoff_max_secs,
            &format!("{prefix}.restart_backoff_max_secs"),
            30,
            1..=3600,
        ));
        // A row that could still become an event: JSON adds column names and quoting,
        // hex bytea shrinks to base64, so twice the event limit plus protocol room; a
        // table that shrinks oversized rows takes rows up to 64 MiB by default.
        let shrinks = mappings.iter().any(|m| m.oversized != Oversized::Fail);
        let default_row = if shrinks {
            (64 * 1024 * 1024).max(max_event_bytes * 2 + 64 * 1024)
        } else {
            max_event_bytes * 2 + 64 * 1024
        };
        let max_row_bytes = self.number(
            &s.max_row_bytes,
            &format!("{prefix}.max_row_bytes"),
            default_row as u64,
            1024..=1024 * 1024 * 1024,
        ) as usize;
        let signal_table = match &s.signal_table {
            None => ("tidemark".to_string(), "signal".to_string()),
            Some(t) => match split_table(t.get_ref()) {
                Some((schema, table)) if t.get_ref().contains('.') => (schema, table),
                _ => {
                    self.issue(
                        t,
                        format!("{prefix}.signal_table"),
                        "not a schema-qualified table name: use \"schema.table\" (the default is \"tidemark.signal\")",
                    );
                    ("tidemark".to_string(), "signal".to_string())
                }
            },
        };
        SourceConfig {
            name,
            postgres: pg,
            signal_table,
            publication,
            slot,
            tables,
            create_publication: s.create_publication.unwrap_or(true),
            create_slot: s.create_slot.unwrap_or(true),
            stream,
            publish_window,
            max_event_bytes,
            ack_timeout,
            status_interval,
            backoff_initial,
            backoff_max: backoff_max.max(backoff_initial),
            mappings,
            outboxes,
            messages,
            max_row_bytes,
            atomic_transactions: s.atomic_transactions.unwrap_or(false),
            atomic_batch_max,
            transaction_events: s.transaction_events.unwrap_or(false),
            snapshot,
            snapshot_chunk_size,
            snapshot_tables,
            heartbeat_interval: s.heartbeat_interval_secs.as_ref().map(|_| {
                Duration::from_secs(self.number(
                    &s.heartbeat_interval_secs,
                    &format!("{prefix}.heartbeat_interval_secs"),
                    10,
                    1..=86_400,
                ))
            }),
            stall_after: Duration::from_secs(self.number(
                &s.stall_after_secs,
                &format!("{prefix}.stall_after_secs"),
                120,
                1..=86_400,
            )),
            replication_timeout: Duration::from_secs(self.number(
                &s.replication_timeout_secs,
                &format!("{prefix}.replication_timeout_secs"),
                60,
                2..=86_400,
            )),
            warn_retained_wal_bytes: s.warn_retained_wal_bytes.as_ref().map(|_| {
                self.number(
                    &s.warn_retained_wal_bytes,
                    &format!("{prefix}.warn_retained_wal_bytes"),
                    0,
                    1..=u64::MAX,
                )
            }),
        }
    }
}
