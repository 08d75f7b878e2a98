//! Configuration: the TOML file, parsed into a raw model, then validated into `Config`,
//! the only form the rest of the program sees.
//!
//! Every problem is reported as `file:line: key: message`, and validation collects all
//! of them before giving up, so an operator fixes a file in one pass. `${VAR}` in the
//! file is replaced by the environment variable before parsing (comments excepted), and
//! a missing variable is named with its line. Passwords never sit in the file: they come
//! from an environment variable or a file, and are `Secret`s that never reach `Debug`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::events::operation::Operation;
use crate::events::rules::{
    Choice, Literal, MESSAGE_PLACEHOLDERS, MessageSpec, OUTBOX_PLACEHOLDERS, OutboxSpec, Oversized,
    RuleSpec, TABLE_PLACEHOLDERS, TableSpec, Template,
};
pub use crate::jetstream::params::{NatsAuth, NatsConfig, Storage, StreamConfig};
pub use crate::postgres::params::{PostgresConfig, SslMode, TableSelection};
pub use crate::secret::Secret;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_issues(.path, .issues))]
    Invalid {
        path: PathBuf,
        issues: Vec<ConfigIssue>,
    },
}

impl ConfigError {
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { issues, .. } => issues,
        }
    }
}

fn render_issues(path: &Path, issues: &[ConfigIssue]) -> String {
    let lines: Vec<String> = issues
        .iter()
        .map(|i| {
            let loc = match i.line {
                Some(l) => format!("{}:{l}", path.display()),
                None => path.display().to_string(),
            };
            if i.key.is_empty() {
                format!("{loc}: {}", i.message)
            } else {
                format!("{loc}: {}: {}", i.key, i.message)
            }
        })
        .collect();
    lines.join("\n")
}

// ---------------------------------------------------------------------------------
// The raw model: what the file says, with spans kept on values checked later.
// ---------------------------------------------------------------------------------

mod connection;
mod mapping;
mod model;
mod projection;
mod raw;
mod source;
#[cfg(test)]
mod tests;
mod validate;

pub use model::*;
use raw::*;
use validate::Validator;

pub const DEFAULT_PUBLISH_WINDOW: usize = 1024;
/// nats-server's limit on messages in one atomic batch.
pub const DEFAULT_ATOMIC_BATCH_MAX: u64 = 1000;
/// Below nats-server's default `max_payload` (1 MiB), leaving room for headers.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1_000_000;

/// Loads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, &|k| std::env::var(k).ok())
}

/// Parses and validates config text; `env` looks up environment variables.
pub fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let invalid = |issues| ConfigError::Invalid {
        path: path.to_path_buf(),
        issues,
    };
    let text = interpolate(text, env).map_err(invalid)?;
    let raw: RawConfig = {
        let de = toml::Deserializer::parse(&text)
            .map_err(|e| invalid(vec![toml_issue(&text, &e, "")]))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            // Spanned wraps values in a private field whose name shows up in the path.
            let key = e
                .path()
                .to_string()
                .split('.')
                .filter(|seg| !seg.starts_with("$__serde_spanned"))
                .collect::<Vec<_>>()
                .join(".");
            let key = if key.is_empty() || key == "." {
                String::new()
            } else {
                key
            };
            invalid(vec![toml_issue(&text, e.inner(), &key)])
        })?
    };
    let mut v = Validator {
        text: &text,
        issues: Vec::new(),
        env,
        base: path.parent().unwrap_or(Path::new(".")),
    };
    let config = v.config(path, raw);
    if v.issues.is_empty() {
        Ok(config)
    } else {
        Err(invalid(v.issues))
    }
}

fn toml_issue(text: &str, e: &toml::de::Error, key: &str) -> ConfigIssue {
    ConfigIssue {
        line: e.span().map(|s| line_of(text, s.start)),
        key: key.to_string(),
        message: e.message().trim().to_string(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Replaces `${NAME}` with the variable's value, outside comments. Every missing
/// variable is an issue naming it and its line.
fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigIssue>> {
    let mut out = String::with_capacity(text.len());
    let mut issues = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        let mut in_string: Option<char> = None;
        while let Some(c) = rest.chars().next() {
            if in_string.is_none() && c == '#' {
                out.push_str(rest);
                break;
            }
            if c == '"' || c == '\'' {
                in_string = match in_string {
                    None => Some(c),
                    Some(q) if q == c => None,
                    other => other,
                };
            }
            if c == '\\' && in_string == Some('"') && rest.len() > 1 {
                let next = rest[1..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&rest[..1 + next]);
                rest = &rest[1 + next..];
                continue;
            }
            if rest.starts_with("${")
                && let Some(end) = rest.find('}')
            {
                let name = &rest[2..end];
                match env(name) {
                    Some(v) => out.push_str(&v),
                    None => issues.push(ConfigIssue {
                        line: Some(n + 1),
                        key: String::new(),
                        message: format!(
                            "environment variable {name} is not set (the file refers to it as ${{{name}}})"
                        ),
                    }),
                }
                rest = &rest[end + 1..];
                continue;
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(issues)
    }
}

/// `"orders"` is `public.orders`; `"sales.orders"` is schema `sales`. Names are taken
/// as written (case kept). A part in double quotes may hold anything, spaces and dots
/// too, with `""` for a quote: `'"order lines"'`, `'"my.schema"."Orders"'`.
pub fn split_table(name: &str) -> Option<(String, String)> {
    let mut parts = Vec::new();
    let mut rest = name;
    loop {
        let (part, after) = if let Some(quoted) = rest.strip_prefix('"') {
            // Up to the closing quote; `""` is a quote inside.
            let mut part = String::new();
            let mut chars = quoted.char_indices().peekable();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if chars.peek().is_some_and(|(_, n)| *n == '"') {
                        chars.next();
                        part.push('"');
                        continue;
                    }
                    end = Some(i + 1);
                    break;
                }
                part.push(c);
            }
            (part, &quoted[end?..])
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            let part = &rest[..end];
            if part.contains(char::is_whitespace) || part.contains('"') {
                return None;
            }
            (part.to_string(), &rest[end..])
        };
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match after.strip_prefix('.') {
            Some(next) => rest = next,
            None if after.is_empty() => break,
            None => return None,
        }
    }
    let mut parts = parts.into_iter();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(table), None, _) => Some(("public".into(), table)),
        (Some(schema), Some(table), None) => Some((schema, table)),
        _ => None,
    }
}
