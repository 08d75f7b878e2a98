//! Binding a table's spec to the live table: columns, key, events, rules, subject and
//! the schema fingerprint, or an error naming the table and the column.

use std::fmt::Write as _;

use super::*;

fn column_index(
    live: &LiveTable<'_>,
    line: usize,
    what: &str,
    name: &str,
) -> Result<usize, BindError> {
    live.columns
        .iter()
        .position(|(n, _)| n == name)
        .ok_or_else(|| BindError::UnknownColumn {
            table: live.qualified.to_string(),
            line,
            what: what.to_string(),
            column: name.to_string(),
            columns: live
                .columns
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn default_event(token: &str, op: Operation) -> Bound {
    Bound::Event {
        ty: format!("{token}.{}", op.event_name()),
        name: op.event_name().to_string(),
    }
}

fn bind_choice(c: &Choice) -> Bound {
    match c {
        Choice::Event(t) => Bound::Event {
            ty: t.clone(),
            name: t.clone(),
        },
        Choice::Drop => Bound::Drop,
    }
}

/// Binds the table's spec (or none: the default mapping) and outbox spec to the live
/// table.
pub fn bind(
    live: &LiveTable<'_>,
    spec: Option<&TableSpec>,
    outbox: Option<&OutboxSpec>,
) -> Result<TablePlan, BindError> {
    let empty = TableSpec::default();
    let spec = spec.unwrap_or(&empty);
    let line = spec.line;
    let idx = |what: &str, name: &str| column_index(live, line, what, name);

    let key: Vec<usize> = match &spec.key {
        Some(names) => names
            .iter()
            .map(|n| idx("key", n))
            .collect::<Result<_, _>>()?,
        None => live.default_key.to_vec(),
    };
    let mut included: Vec<usize> = match &spec.include {
        Some(names) => names
            .iter()
            .map(|n| idx("include", n))
            .collect::<Result<_, _>>()?,
        None => (0..live.columns.len()).collect(),
    };
    for n in &spec.exclude {
        let i = idx("exclude", n)?;
        included.retain(|&c| c != i);
    }
    let mut renames = Vec::with_capacity(spec.rename.len());
    for (from, to) in &spec.rename {
        renames.push((idx("rename", from)?, to.as_str()));
    }
    let out_name = |i: usize| -> String {
        renames
            .iter()
            .find(|(c, _)| *c == i)
            .map(|(_, to)| to.to_string())
            .unwrap_or_else(|| live.columns[i].0.clone())
    };
    let columns: Vec<OutColumn> = included
        .iter()
        .map(|&i| OutColumn::new(i, out_name(i)))
        .collect();
    for (n, c) in columns.iter().enumerate() {
        if columns[..n].iter().any(|o| o.name == c.name) {
            return Err(BindError::DuplicateOutput {
                table: live.qualified.to_string(),
                line,
                name: c.name.clone(),
            });
        }
    }
    let key: Vec<OutColumn> = key
        .into_iter()
        .map(|i| OutColumn::new(i, out_name(i)))
        .collect();

    let ops = [
        Operation::Insert,
        Operation::Update,
        Operation::Delete,
        Operation::Truncate,
        Operation::Read,
    ];
    let events = ops.map(|op| match &spec.events[op_slot(op)] {
        Some(c) => bind_choice(c),
        None => default_event(live.token, op),
    });

    let mut rules = Vec::with_capacity(spec.rules.len());
    for (n, r) in spec.rules.iter().enumerate() {
        let what = format!("rule {}", n + 1);
        if (!r.changed.is_empty() || !r.old.is_empty())
            && live.replica_identity != ReplicaIdentity::Full
        {
            return Err(BindError::NeedsFullIdentity {
                table: live.qualified.to_string(),
                line,
                what,
            });
        }
        let cond = |list: &[(String, Vec<Literal>)], part: &str| {
            list.iter()
                .map(|(c, v)| Ok((idx(&format!("{what} ({part})"), c)?, v.clone())))
                .collect::<Result<Vec<_>, BindError>>()
        };
        rules.push(Rule {
            ops: r.ops.clone(),
            changed: r
                .changed
                .iter()
                .map(|c| idx(&format!("{what} (changed)"), c))
                .collect::<Result<_, _>>()?,
            new: cond(&r.new, "new")?,
            old: cond(&r.old, "old")?,
            bound: bind_choice(&r.choice),
        });
    }

    let (subject, mut missing_key) = match &spec.subject {
        Some(t) => {
            let mut missing = None;
            for p in &t.parts {
                if let Part::Var(v) = p
                    && let Some(col) = v.strip_prefix("key.")
                    && !key
                        .iter()
                        .any(|k| k.name == col || live.columns[k.index].0 == col)
                {
                    missing = Some(col.to_string());
                }
            }
            (Some(t.clone()), missing)
        }
        None => (None, None),
    };
    if let Some(col) = missing_key.take() {
        return Err(BindError::UnknownColumn {
            table: live.qualified.to_string(),
            line,
            what: "subject template {key.…}".into(),
            column: col,
            columns: key
                .iter()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }

    let outbox = match outbox {
        Some(o) => {
            let oidx = |what: &str, name: &str| column_index(live, o.line, what, name);
            Some(OutboxPlan {
                id: oidx("outbox id", &o.id)?,
                aggregate_type: oidx("outbox aggregate_type", &o.aggregate_type)?,
                aggregate_id: oidx("outbox aggregate_id", &o.aggregate_id)?,
                event_type: oidx("outbox event_type", &o.event_type)?,
                payload: oidx("outbox payload", &o.payload)?,
                headers: match &o.headers {
                    Some(h) => Some(oidx("outbox headers", h)?),
                    None => None,
                },
                subject: o.subject.clone(),
            })
        }
        None => None,
    };

    let oversized = match &spec.oversized {
        Oversized::Fail => OversizedPlan::Fail,
        Oversized::Omit(cols) => OversizedPlan::Omit(
            cols.iter()
                .map(|c| idx("oversized omit", c))
                .collect::<Result<_, _>>()?,
        ),
        Oversized::Truncate(cols) => OversizedPlan::Truncate(
            cols.iter()
                .map(|c| idx("oversized truncate", c))
                .collect::<Result<_, _>>()?,
        ),
    };

    let fingerprint = fingerprint(live, &columns, &key);
    Ok(TablePlan {
        columns,
        key,
        events,
        rules,
        subject,
        attributes: spec.attributes.clone(),
        fingerprint,
        outbox,
        oversized,
    })
}

/// FNV-1a over the output shape, as 8 hex digits: changes when a column is added,
/// dropped, renamed or changes type, or the key changes.
fn fingerprint(live: &LiveTable<'_>, columns: &[OutColumn], key: &[OutColumn]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for c in columns {
        eat(c.name.as_bytes());
        eat(b":");
        eat(&live.columns[c.index].1.to_le_bytes());
        eat(b",");
    }
    eat(b"|");
    for k in key {
        eat(k.name.as_bytes());
        eat(b",");
    }
    let mut out = String::with_capacity(8);
    let _ = write!(out, "{:08x}", (h >> 32) as u32 ^ h as u32);
    out
}
