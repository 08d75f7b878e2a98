//! Unit tests of config parsing and validation, and of the example config.

use super::*;

mod parsing {
    use super::*;
    use crate::events::rules::{Choice, Literal};

    const GOOD: &str = r#"
[nats]
servers = ["nats://127.0.0.1:4222"]

[[source]]
name = "store"
publication = "tidemark_store"
slot = "tidemark_store"
tables = ["orders", "sales.customers"]

[source.postgres]
host = "127.0.0.1"
dbname = "store"
user = "tidemark"
password_env = "STORE_PG_PASSWORD"

[source.stream]
name = "STORE"
"#;

    fn env(k: &str) -> Option<String> {
        match k {
            "STORE_PG_PASSWORD" => Some("s3cret".into()),
            "HOST" => Some("db.internal".into()),
            _ => None,
        }
    }

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("tidemark.toml"), text, &env)
    }

    fn errors(text: &str) -> String {
        parse_str(text).unwrap_err().to_string()
    }

    #[test]
    fn a_dead_letter_subject_the_sources_stream_captures_is_refused() {
        let projection = |dead: &str| {
            format!(
                "{GOOD}\n[[projection]]\nname = \"stats\"\nsource = \"store\"\ndead_letter = \"{dead}\"\nkv_bucket = \"STATS\"\n\n[[projection.on]]\ntype = \"t.created\"\nkv = \"put\"\nkey = \"k.{{data.after.id}}\"\nvalue = {{ id = \"data.after.id\" }}\n"
            )
        };
        let err = errors(&projection("store.dead"));
        assert!(
            err.contains("projection[0].dead_letter")
                && err.contains("captured by the source's stream \"STORE\""),
            "{err}"
        );
        parse_str(&projection("deadletter.stats")).unwrap();
    }

    #[test]
    fn a_kv_clear_takes_a_prefix_or_nothing() {
        let projection = |handler: &str| {
            format!(
                "{GOOD}\n[[projection]]\nname = \"v\"\nsource = \"store\"\nkv_bucket = \"V\"\n\n[[projection.on]]\ntype = \"t.truncated\"\nkv = \"clear\"\n{handler}"
            )
        };
        let c = parse_str(&projection("key = \"t.\"\n")).unwrap();
        assert_eq!(
            c.projections[0].handlers[0].action,
            Action::Kv {
                op: KvOp::Clear,
                key: vec![KeyPart::Lit("t.".into())],
                value: Vec::new()
            }
        );
        let c = parse_str(&projection("")).unwrap();
        assert!(
            matches!(&c.projections[0].handlers[0].action, Action::Kv { op: KvOp::Clear, key, .. } if key.is_empty())
        );
        for bad in [
            "key = \"t.{data.after.id}\"\n",
            "key = \"t.\"\nvalue = { n = \"data.after.n\" }\n",
        ] {
            let err = errors(&projection(bad));
            assert!(
                err.contains("projection[0].on[0].key") && err.contains("a prefix without paths"),
                "{err}"
            );
        }
    }

    #[test]
    fn good_config_with_defaults() {
        let c = parse_str(GOOD).unwrap();
        let s = &c.sources[0];
        assert_eq!(s.name, "store");
        assert_eq!(s.postgres.port, 5432);
        assert_eq!(
            s.postgres.password.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert_eq!(
            s.tables,
            TableSelection::Listed(vec![
                ("public".into(), "orders".into()),
                ("sales".into(), "customers".into())
            ])
        );
        assert_eq!(s.stream.subjects, vec!["store.>"]);
        assert_eq!(s.stream.storage, Storage::File);
        assert_eq!(s.publish_window, DEFAULT_PUBLISH_WINDOW);
        assert!(s.create_slot && s.create_publication);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "secret leaked into Debug"
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = GOOD.replace(
            "slot = \"tidemark_store\"",
            "slott = \"x\"\nslot = \"tidemark_store\"",
        );
        let msg = errors(&text);
        assert!(
            msg.starts_with("tidemark.toml:8: source[0].slott: unknown field `slott`"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = GOOD.replace("dbname = \"store\"", "dbname = 5");
        let msg = errors(&text);
        assert!(
            msg.starts_with("tidemark.toml:13: source[0].postgres.dbname: invalid type"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_error_names_the_line() {
        let msg = errors("[nats]\nservers = [\n");
        assert!(msg.starts_with("tidemark.toml:"), "{msg}");
    }

    #[test]
    fn validation_collects_every_problem() {
        let text = GOOD
            .replace("slot = \"tidemark_store\"", "slot = \"Bad-Slot\"")
            .replace("name = \"STORE\"", "name = \"STORE.X\"\nreplicas = 9")
            .replace("STORE_PG_PASSWORD", "MISSING_VAR");
        let err = parse_str(&text).unwrap_err();
        let keys: Vec<&str> = err.issues().iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "source[0].slot",
                "source[0].postgres.password_env",
                "source[0].stream.name",
                "source[0].stream.replicas"
            ],
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("tidemark.toml:8: source[0].slot: a replication slot name"),
            "{msg}"
        );
        assert!(msg.contains("tidemark.toml:15: source[0].postgres.password_env: environment variable MISSING_VAR is not set"), "{msg}");
    }

    const MAPPING: &str = r#"
[[source.table]]
name = "orders"
key = ["id"]
exclude = ["secret"]
rename = { customer_id = "customer" }
subject = "{source}.order.{event}.{key.id}"
attributes = { aggregate = "order" }
insert = "OrderPlaced"
update = false

[[source.table.rule]]
on = ["update"]
changed = ["status"]
old = { status = ["paid", "packed"] }
new = { status = "shipped", express = true, qty = 3 }
event = "OrderShipped"

[[source.table.rule]]
on = "delete"
drop = true

[[source.outbox]]
table = "sales.customers"
payload_column = "body"

[[source.message]]
prefix = "domain"
type_field = "type"
"#;

    #[test]
    fn mappings_outboxes_and_messages_parse() {
        let c = parse_str(&format!("{GOOD}{MAPPING}")).unwrap();
        let s = &c.sources[0];
        let m = &s.mappings[0];
        assert_eq!((m.schema.as_str(), m.table.as_str()), ("public", "orders"));
        assert_eq!(m.key, Some(vec!["id".to_string()]));
        assert_eq!(m.exclude, vec!["secret"]);
        assert_eq!(
            m.rename,
            vec![("customer_id".to_string(), "customer".to_string())]
        );
        assert_eq!(m.events[0], Some(Choice::Event("OrderPlaced".into())));
        assert_eq!(m.events[1], Some(Choice::Drop));
        assert_eq!(m.events[2], None);
        assert_eq!(
            m.attributes,
            vec![("aggregate".to_string(), "order".to_string())]
        );
        assert_eq!(
            m.subject.as_ref().map(|t| t.text.as_str()),
            Some("{source}.order.{event}.{key.id}")
        );
        assert_eq!(m.line, 20, "the [[source.table]] header line");
        let r = &m.rules[0];
        assert_eq!(r.ops, vec![Operation::Update]);
        assert_eq!(r.changed, vec!["status"]);
        assert_eq!(
            r.old,
            vec![(
                "status".to_string(),
                vec![Literal::Text("paid".into()), Literal::Text("packed".into())]
            )]
        );
        assert!(
            r.new
                .contains(&("express".to_string(), vec![Literal::Bool(true)]))
        );
        assert!(r.new.contains(&("qty".to_string(), vec![Literal::Int(3)])));
        assert_eq!(r.choice, Choice::Event("OrderShipped".into()));
        assert_eq!(m.rules[1].choice, Choice::Drop);
        let o = &s.outboxes[0];
        assert_eq!(
            (
                o.schema.as_str(),
                o.table.as_str(),
                o.payload.as_str(),
                o.id.as_str()
            ),
            ("sales", "customers", "body", "id")
        );
        assert_eq!(o.subject.text, "{source}.{aggregate_type}.{event}");
        assert_eq!(s.messages[0].prefix, "domain");
        assert_eq!(s.messages[0].type_field.as_deref(), Some("type"));
        assert!(!s.atomic_transactions && !s.transaction_events);
    }

    #[test]
    fn mapping_mistakes_are_named_with_line_and_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "subject = \"{source}.order.{event}.{key.id}\"",
                "subject = \"{source}.{nope}\"",
                "source[0].table[0].subject: unknown placeholder {nope}",
            ),
            (
                "subject = \"{source}.order.{event}.{key.id}\"",
                "subject = \"orders.{event}\"",
                "source[0].table[0].subject: the subject must start with {source}",
            ),
            (
                "event = \"OrderShipped\"",
                "",
                "source[0].table[0].rule[0]: a rule needs event",
            ),
            (
                "on = [\"update\"]",
                "on = [\"upsert\"]",
                "source[0].table[0].rule[0].on: use \"insert\"",
            ),
            (
                "attributes = { aggregate = \"order\" }",
                "attributes = { Aggregate = \"order\" }",
                "source[0].table[0].attributes.Aggregate: an attribute name",
            ),
            (
                "attributes = { aggregate = \"order\" }",
                "attributes = { txlast = \"x\" }",
                "source[0].table[0].attributes.txlast",
            ),
            (
                "name = \"orders\"\nkey",
                "name = \"invoices\"\nkey",
                "source[0].table[0].name: public.invoices is not in this source's tables",
            ),
            (
                "update = false",
                "update = 3",
                "source[0].table[0].update: use an event type",
            ),
            (
                "insert = \"OrderPlaced\"",
                "insert = \"Order Placed\"",
                "source[0].table[0].insert: an event type is a non-empty name without spaces",
            ),
            (
                "table = \"sales.customers\"",
                "table = \"orders\"",
                "source[0].outbox[0].table: this table also has a [[source.table]] mapping",
            ),
            (
                "new = { status = \"shipped\", express = true, qty = 3 }",
                "new = { status = [] }",
                "source[0].table[0].rule[0].new.status: compare with a string",
            ),
            (
                "update = false",
                "update = false\noversized = \"omit\"",
                "source[0].table[0].oversized_columns: say which columns",
            ),
        ];
        for (from, to, want) in cases {
            let text = format!("{GOOD}{MAPPING}").replacen(from, to, 1);
            assert_ne!(text, format!("{GOOD}{MAPPING}"), "{from} not found");
            let err = errors(&text);
            assert!(err.contains(want), "want {want:?} in:\n{err}");
            assert!(err.contains("tidemark.toml:"), "{err}");
        }
        let atomic = GOOD.replace(
            "tables = [",
            "atomic_transactions = true\natomic_batch_max = 900\npublish_window = 100\ntables = [",
        );
        assert!(
            errors(&atomic).contains(
                "source[0].atomic_batch_max: a batch must fit in the publish window (100)"
            )
        );
    }

    #[test]
    fn the_duplicate_window_fits_the_retention() {
        let short = GOOD.replace("name = \"STORE\"", "name = \"STORE\"\nmax_age_secs = 60");
        let c = parse_str(&short).unwrap();
        assert_eq!(
            c.sources[0].stream.duplicate_window,
            Duration::from_secs(60)
        );
        let err = errors(&short.replace(
            "max_age_secs = 60",
            "max_age_secs = 60\nduplicate_window_secs = 300",
        ));
        assert!(
            err.contains(
                "source[0].stream.duplicate_window_secs: must not be longer than max_age_secs (60)"
            ),
            "{err}"
        );
    }

    #[test]
    fn env_interpolation_and_missing_variable() {
        let c = parse_str(&GOOD.replace("\"127.0.0.1\"", "\"${HOST}\" # not ${NOPE}")).unwrap();
        assert_eq!(c.sources[0].postgres.host, "db.internal");
        let msg = errors(&GOOD.replace("\"127.0.0.1\"", "\"${NOPE}\""));
        assert_eq!(
            msg,
            "tidemark.toml:12: environment variable NOPE is not set (the file refers to it as ${NOPE})"
        );
    }

    #[test]
    fn tables_or_all_tables() {
        let msg = errors(&GOOD.replace("tables = [\"orders\", \"sales.customers\"]", ""));
        assert!(msg.contains("source[0].tables: say which tables"), "{msg}");
        let c = parse_str(&GOOD.replace(
            "tables = [\"orders\", \"sales.customers\"]",
            "all_tables = true",
        ))
        .unwrap();
        assert_eq!(c.sources[0].tables, TableSelection::All);
        let msg = errors(&GOOD.replace("\"sales.customers\"", "\"a.b.c\""));
        assert!(msg.contains("\"a.b.c\" is not a table name"), "{msg}");
    }

    #[test]
    fn subjects_must_cover_the_source() {
        let msg = errors(&GOOD.replace(
            "name = \"STORE\"",
            "name = \"STORE\"\nsubjects = [\"other.>\"]",
        ));
        assert!(msg.contains("the stream must capture \"store.>\""), "{msg}");
    }

    #[test]
    fn no_sources_is_an_error() {
        let msg = errors("[nats]\nservers = [\"nats://x:4222\"]\n");
        assert!(msg.contains("no [[source]] is configured"), "{msg}");
    }
}

mod example_config {
    /// The shipped example config is valid.
    #[test]
    fn example_config_parses() {
        let path =
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tidemark.toml"));
        let text = std::fs::read_to_string(path).unwrap();
        let cfg = super::parse(path, &text, &|k| {
            (k == "TIDEMARK_PG_PASSWORD").then(|| "pw".to_string())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.sources[0].name, "store");
        assert_eq!(cfg.sources[0].stream.name, "STORE");
        assert_eq!(cfg.sources[0].mappings.len(), 2);
        assert_eq!(cfg.sources[0].messages.len(), 1);
    }

    #[test]
    fn table_names_bare_or_quoted() {
        let split = |n: &str| super::split_table(n);
        let pair = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
        assert_eq!(split("orders"), pair("public", "orders"));
        assert_eq!(split("Sales.OrderItems"), pair("Sales", "OrderItems"));
        assert_eq!(split("\"order lines\""), pair("public", "order lines"));
        assert_eq!(split("\"my.schema\".\"a\"\"b\""), pair("my.schema", "a\"b"));
        assert_eq!(split("sales.\"Order Items\""), pair("sales", "Order Items"));
        for bad in [
            "",
            "a.b.c",
            "order lines",
            "\"open",
            "\"\"",
            "a.",
            ".a",
            "\"a\"b",
            "a\"b",
        ] {
            assert_eq!(split(bad), None, "{bad:?}");
        }
    }
}
