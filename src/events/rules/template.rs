//! Subject templates: literal text and {placeholder}s, each placeholder one sanitized token.

/// A subject template: literal text and `{placeholder}`s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub text: String,
    pub parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    /// A named placeholder, resolved per event.
    Var(String),
}

impl Template {
    /// Parses `a.{b}.c`; `allowed` lists the placeholder names (a `key.` prefix is
    /// allowed when `allowed` contains `key.*`).
    pub fn parse(text: &str, allowed: &[&str]) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in subject template {text:?}"))?;
            let name = &after[..close];
            let ok = allowed.contains(&name)
                || (allowed.contains(&"key.*") && name.starts_with("key.") && name.len() > 4);
            if !ok {
                return Err(format!(
                    "unknown placeholder {{{name}}} in subject template {text:?}: use {}",
                    allowed
                        .iter()
                        .map(|a| format!("{{{a}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            parts.push(Part::Var(name.to_string()));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        if text.split('.').any(|t| t.is_empty()) || text.contains(['*', '>', ' ']) {
            return Err(format!(
                "subject template {text:?} must be dot-separated tokens without spaces or wildcards"
            ));
        }
        Ok(Template {
            text: text.to_string(),
            parts,
        })
    }

    /// Whether the rendered subject starts with `<source>.`, so the source's stream
    /// captures it.
    pub fn starts_with_source(&self, source: &str) -> bool {
        match self.parts.first() {
            Some(Part::Var(v)) => v == "source",
            Some(Part::Lit(l)) => l.starts_with(&format!("{source}.")),
            None => false,
        }
    }

    /// Renders with `lookup` giving each placeholder's value, made subject-safe.
    pub fn render(&self, mut lookup: impl FnMut(&str, &mut String)) -> String {
        let mut out = String::with_capacity(64);
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Var(v) => {
                    let start = out.len();
                    lookup(v, &mut out);
                    if out.len() == start {
                        out.push('_');
                    }
                    sanitize_from(&mut out, start);
                }
            }
        }
        out
    }
}

/// Makes `out[start..]` one subject token: characters NATS does not allow in a token
/// become `_`.
pub(super) fn sanitize_from(out: &mut String, start: usize) {
    if out[start..]
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>') || c.is_control())
    {
        let fixed: String = out[start..]
            .chars()
            .map(|c| {
                if c.is_whitespace() || matches!(c, '.' | '*' | '>') || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        out.truncate(start);
        out.push_str(&fixed);
    }
}
