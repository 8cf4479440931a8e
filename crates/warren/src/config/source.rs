//! A config file's text as the toml crate parses it, with the byte span of every key and value,
//! so that every mistake in it is reported at once, each at its `line:column`.
//!
//! serde stops at the first error. [`Source::deserialize_all`] deserializes, and on an error
//! removes the entry it points at from a working copy of the document and tries again, until the
//! rest fits the schema: one error per wrong key, none hidden behind another. Paths and positions
//! always come from the original document, so indexes into `[[listener]]` arrays stay those of
//! the file.
//!
//! The working copy also presents each listener table to serde tagged by its protocol,
//! `{ pomelo = { … } }` (config/listener.rs says why), keeping every span of the file.

use std::borrow::Cow;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::ConfigError;

/// At most this many schema errors are collected from one file (each costs one more pass).
const MAX_ERRORS: usize = 100;

/// A parsed config file: its text and its spanned document.
pub(super) struct Source<'a> {
    text: &'a str,
    root: Spanned<DeTable<'a>>,
}

/// What a document holds: a whole config, or one listener (a `--listen` URL's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// A config file: listeners are the `[[listener]]` tables.
    Config,
    /// One listener table at the root.
    Listener,
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

impl<'a> Source<'a> {
    /// Parse the TOML text; every syntax error, in file order, one per line.
    pub(super) fn parse(text: &'a str) -> Result<Source<'a>, Vec<ConfigError>> {
        let (root, errors) = DeTable::parse_recoverable(text);
        if errors.is_empty() {
            return Ok(Source { text, root });
        }
        // recovery reports follow-on errors after a mistake: keep the first of each line
        let mut found: Vec<(usize, ConfigError)> = errors
            .iter()
            .map(|e| {
                let start = e.span().map_or(0, |s| s.start);
                let (line, column) = line_col(text, start);
                let error = ConfigError::Parse {
                    line: Some(line),
                    column: Some(column),
                    message: e.message().trim().to_owned(),
                };
                (start, error)
            })
            .collect();
        found.sort_by_key(|(start, _)| *start);
        let mut out: Vec<ConfigError> = Vec::new();
        for (_, e) in found {
            let same_line = matches!(
                (out.last(), &e),
                (Some(ConfigError::Parse { line: a, .. }), ConfigError::Parse { line: b, .. }) if a == b
            );
            if !same_line {
                out.push(e);
            }
        }
        Err(out)
    }

    /// Deserialize the whole document as `T`, reporting every entry that does not fit (unknown
    /// keys with the closest known one, wrong types, missing fields), each with its path and
    /// position.
    pub(super) fn deserialize_all<T: DeserializeOwned>(
        &self,
        shape: Shape,
    ) -> Result<T, Vec<ConfigError>> {
        let (mut work, tags) = self.tagged(shape);
        let mut errors = Vec::new();
        while errors.len() < MAX_ERRORS {
            let e = match T::deserialize(toml::de::Deserializer::from(work.clone())) {
                Ok(t) if errors.is_empty() => return Ok(t),
                Ok(_) => return Err(errors),
                Err(e) => e,
            };
            let Some(span) = e.span() else {
                errors.push(ConfigError::Parse {
                    line: None,
                    column: None,
                    message: e.message().trim().to_owned(),
                });
                return Err(errors);
            };
            let path = path_at(self.root.get_ref(), &span);
            let (line, column) = line_col(self.text, span.start);
            let listener = self.listener_protocol(&path, shape);
            errors.push(ConfigError::Invalid {
                key: if path.is_empty() {
                    "(top level)".into()
                } else {
                    path_string(&path)
                },
                why: explain(e.message().trim(), listener),
                line: Some(line),
                column: Some(column),
            });
            // a protocol that does not exist: nothing else of its listener can be judged
            let pruned = if tags.contains(&span) {
                shape == Shape::Config && drop_listener(work.get_mut(), &span)
            } else {
                prune(work.get_mut(), &span)
            };
            if !pruned {
                return Err(errors);
            }
        }
        Err(errors)
    }

    /// A working copy of the document in which each listener table `T` is `{ <protocol> = T }`,
    /// the protocol being `T`'s `protocol` value (`mqtt` when absent), so serde picks the table
    /// type by an externally tagged enum and every key keeps its span. Also the spans of the
    /// tags taken from a `protocol` value: an error there names a protocol that does not exist.
    fn tagged(&self, shape: Shape) -> (Spanned<DeTable<'a>>, Vec<Range<usize>>) {
        let mut work = self.root.clone();
        let mut tags = Vec::new();
        let mut tag = |table: &mut DeTable<'a>, span: Range<usize>| {
            let inner = std::mem::take(table);
            let (name, tag_span) = match inner.get("protocol") {
                Some(v) if v.get_ref().is_str() => {
                    tags.push(v.span());
                    (
                        v.get_ref().as_str().unwrap_or_default().to_owned(),
                        v.span(),
                    )
                }
                // no protocol, or not a string (the table type then says what is wrong with it)
                _ => ("mqtt".to_owned(), span.clone()),
            };
            table.insert(
                Spanned::new(tag_span, Cow::Owned(name)),
                Spanned::new(span, DeValue::Table(inner)),
            );
        };
        match shape {
            Shape::Listener => {
                let span = work.span();
                tag(work.get_mut(), span);
            }
            Shape::Config => {
                if let Some(v) = work.get_mut().get_mut("listener")
                    && let DeValue::Array(a) = v.get_mut()
                {
                    for el in a.iter_mut() {
                        let span = el.span();
                        if let DeValue::Table(t) = el.get_mut() {
                            tag(t, span);
                        }
                    }
                }
            }
        }
        (work, tags)
    }

    /// The protocol of the listener table that holds the key at `path`, when it is one.
    fn listener_protocol(&self, path: &[Step], shape: Shape) -> Option<&str> {
        let table = match (shape, path) {
            (Shape::Listener, [Step::Key(_)]) => self.root.get_ref(),
            (Shape::Config, [Step::Key(l), Step::Index(i), Step::Key(_)]) if l == "listener" => {
                match self.root.get_ref().get("listener")?.get_ref() {
                    DeValue::Array(a) => match a.get(*i)?.get_ref() {
                        DeValue::Table(t) => t,
                        _ => return None,
                    },
                    _ => return None,
                }
            }
            _ => return None,
        };
        match table.get("protocol") {
            Some(v) => v.get_ref().as_str(),
            None => Some("mqtt"),
        }
    }

    /// Fill in the position of an error whose key is a dotted path (`listener[1].addr`): the
    /// key's value, or the nearest table above it that the file has (a key left at its default
    /// is placed at its table's header).
    pub(super) fn locate(&self, e: ConfigError) -> ConfigError {
        match e {
            ConfigError::Invalid {
                key,
                why,
                line: None,
                ..
            } => {
                let (line, column) = match self.span_of(&key) {
                    Some(span) => {
                        let (l, c) = line_col(self.text, span.start);
                        (Some(l), Some(c))
                    }
                    None => (None, None),
                };
                ConfigError::Invalid {
                    key,
                    why,
                    line,
                    column,
                }
            }
            other => other,
        }
    }

    /// The span of the deepest part of `key` present in the file.
    fn span_of(&self, key: &str) -> Option<Range<usize>> {
        let steps = parse_path(key)?;
        let mut value: Option<&Spanned<DeValue<'a>>> = None;
        let mut table = self.root.get_ref();
        let mut best = None;
        for step in steps {
            let next = match (&step, value.map(|v| v.get_ref())) {
                (Step::Key(k), None) => table.get(k.as_str()),
                (Step::Key(k), Some(DeValue::Table(t))) => t.get(k.as_str()),
                (Step::Index(i), Some(DeValue::Array(a))) => a.get(*i),
                _ => None,
            };
            let Some(next) = next else { break };
            best = Some(next.span());
            if let DeValue::Table(t) = next.get_ref() {
                table = t;
            }
            value = Some(next);
        }
        best
    }
}

/// 1-based line and column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before[before.rfind('\n').map_or(0, |p| p + 1)..]
        .chars()
        .count()
        + 1;
    (line, col)
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer != &(0..0)
}

/// The path of the innermost key or array element of `table` whose span holds `span`.
fn path_at(table: &DeTable<'_>, span: &Range<usize>) -> Vec<Step> {
    for (k, v) in table.iter() {
        if contains(&k.span(), span) {
            return vec![Step::Key(k.get_ref().to_string())];
        }
        if contains(&v.span(), span) || value_holds(v, span) {
            let mut path = vec![Step::Key(k.get_ref().to_string())];
            path.extend(path_in_value(v, span));
            return path;
        }
    }
    Vec::new()
}

fn path_in_value(v: &Spanned<DeValue<'_>>, span: &Range<usize>) -> Vec<Step> {
    match v.get_ref() {
        DeValue::Table(t) => path_at(t, span),
        DeValue::Array(a) => {
            for (i, el) in a.iter().enumerate() {
                if contains(&el.span(), span) || value_holds(el, span) {
                    let mut path = vec![Step::Index(i)];
                    path.extend(path_in_value(el, span));
                    return path;
                }
            }
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// Whether a table or array holds `span` somewhere inside. An `[[array]]` element's own span is
/// only its header, and a `[table]`'s only its header, while their keys lie below.
fn value_holds(v: &Spanned<DeValue<'_>>, span: &Range<usize>) -> bool {
    match v.get_ref() {
        DeValue::Table(t) => t.iter().any(|(k, v)| {
            contains(&k.span(), span) || contains(&v.span(), span) || value_holds(v, span)
        }),
        DeValue::Array(a) => a
            .iter()
            .any(|el| contains(&el.span(), span) || value_holds(el, span)),
        _ => false,
    }
}

/// Remove from `table` the innermost key or array element whose span holds `span`; false when
/// nothing does.
fn prune(table: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    let key = table
        .iter()
        .find(|(k, v)| {
            contains(&k.span(), span) || contains(&v.span(), span) || value_holds(v, span)
        })
        .map(|(k, _)| k.clone());
    let Some(key) = key else { return false };
    if contains(&key.span(), span) {
        table.remove(&key);
        return true;
    }
    let Some(v) = table.get_mut(&key) else {
        return false;
    };
    if prune_value(v, span) {
        return true;
    }
    table.remove(&key);
    true
}

fn prune_value(v: &mut Spanned<DeValue<'_>>, span: &Range<usize>) -> bool {
    match v.get_mut() {
        DeValue::Table(t) => prune(t, span),
        DeValue::Array(a) => {
            let Some(i) = a
                .iter()
                .position(|el| contains(&el.span(), span) || value_holds(el, span))
            else {
                return false;
            };
            if !prune_value(&mut a.as_mut()[i], span) {
                let kept: Vec<_> = std::mem::replace(a, std::iter::empty().collect())
                    .into_iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, el)| el)
                    .collect();
                *a = kept.into_iter().collect();
            }
            true
        }
        _ => false,
    }
}

/// Remove from a config document's `[[listener]]` array the table tagged at `tag` (see
/// [`Source::tagged`]); false when none is.
fn drop_listener(root: &mut DeTable<'_>, tag: &Range<usize>) -> bool {
    let Some(v) = root.get_mut("listener") else {
        return false;
    };
    let DeValue::Array(a) = v.get_mut() else {
        return false;
    };
    let before = a.len();
    let kept: Vec<_> = std::mem::replace(a, std::iter::empty().collect())
        .into_iter()
        .filter(|el| match el.get_ref() {
            DeValue::Table(t) => !t.iter().any(|(k, _)| &k.span() == tag),
            _ => true,
        })
        .collect();
    let dropped = kept.len() < before;
    *a = kept.into_iter().collect();
    dropped
}

fn path_string(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// `listener[1].addr` → key `listener`, index 1, key `addr`; `None` for keys that are not paths
/// into the file (`--listen`).
fn parse_path(key: &str) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
        if !name.starts_with(|c: char| c.is_alphanumeric() || c == '_') || !name.chars().all(word) {
            return None;
        }
        steps.push(Step::Key(name.to_owned()));
        while !rest.is_empty() {
            let (index, after) = rest.split_once(']')?;
            steps.push(Step::Index(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    Some(steps)
}

/// serde's error text, made to say what to do: an unknown key names the closest known one
/// instead of listing them all, and, in a listener table (of protocol `listener`), the
/// protocols that take it when others do.
fn explain(message: &str, listener: Option<&str>) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let Some((field, expected)) = rest.split_once('`') else {
        return message.to_owned();
    };
    let known: Vec<&str> = expected
        .trim_start_matches(',')
        .trim()
        .trim_start_matches("expected one of")
        .trim_start_matches("expected")
        .split(',')
        .map(|k| k.trim().trim_matches('`'))
        .filter(|k| !k.is_empty() && !k.contains(' '))
        .collect();
    let others = listener.and_then(|p| Some((p, super::listener::taken_by_others(field, p)?)));
    match (others, closest(field, &known)) {
        (Some((p, owners)), Some(k)) => format!(
            "unknown key `{field}`, did you mean `{k}`? (`{field}` applies to {owners} listeners, not {p})"
        ),
        (Some((p, owners)), None) => {
            format!("unknown key `{field}`: it applies to {owners} listeners, not {p}")
        }
        (None, _) => unknown_key(field, &known),
    }
}

/// "unknown key `adr`, did you mean `addr`?", or, with nothing close, a pointer to the list.
pub(super) fn unknown_key(field: &str, known: &[&str]) -> String {
    match closest(field, known) {
        Some(k) => format!("unknown key `{field}`, did you mean `{k}`?"),
        None if known.is_empty() => format!("unknown key `{field}`: this table takes no keys"),
        None if known.len() <= 6 => format!(
            "unknown key `{field}` (known: {})",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => format!(
            "unknown key `{field}` (`warren print-default-config` shows every key with its default)"
        ),
    }
}

/// The known key nearest to a mistyped one, if near enough to be what was meant: a few edits
/// away (one per three letters), or one of them containing the other.
pub(super) fn closest<'k>(field: &str, known: &[&'k str]) -> Option<&'k str> {
    let field_l = field.to_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&field_l, &k.to_lowercase()), *k))
        .filter(|(d, k)| {
            let longest = field.chars().count().max(k.chars().count());
            *d <= (longest / 3).max(1)
                || (field_l.len() >= 4 && k.to_lowercase().contains(&field_l))
                || (k.len() >= 4 && field_l.contains(&k.to_lowercase()))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edits (insert, delete, replace, swap two neighbours) from one string to another: the optimal
/// string alignment distance. Keys are short, so the full table is cheap.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("adr", "addr"), 1);
        assert_eq!(edit_distance("protocl", "protocol"), 1);
        assert_eq!(edit_distance("ab", "ba"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn closest_keys() {
        let known = ["addr", "max_conn", "max_packet", "protocol", "transport"];
        assert_eq!(closest("adr", &known), Some("addr"));
        assert_eq!(closest("max_con", &known), Some("max_conn"));
        assert_eq!(closest("protocl", &known), Some("protocol"));
        assert_eq!(closest("Transport", &known), Some("transport"));
        assert_eq!(closest("zzz", &known), None);
        assert_eq!(closest("no_such_setting", &known), None);
    }

    #[test]
    fn explain_rewrites_unknown_fields() {
        assert_eq!(
            explain(
                "unknown field `adr`, expected one of `addr`, `max_conn`",
                None
            ),
            "unknown key `adr`, did you mean `addr`?"
        );
        assert_eq!(
            explain("unknown field `x`, expected `type`", None),
            "unknown key `x` (known: `type`)"
        );
        assert_eq!(
            explain("unknown field `x`, there are no fields", None),
            "unknown key `x`: this table takes no keys"
        );
        assert_eq!(
            explain("invalid type: integer", None),
            "invalid type: integer"
        );
        assert_eq!(
            explain(
                "unknown field `heartbeat_s`, expected one of `addr`, `mode`",
                Some("mqtt")
            ),
            "unknown key `heartbeat_s`: it applies to pomelo listeners, not mqtt"
        );
    }

    #[test]
    fn paths_parse() {
        assert_eq!(
            parse_path("listener[1].allow[0]"),
            Some(vec![
                Step::Key("listener".into()),
                Step::Index(1),
                Step::Key("allow".into()),
                Step::Index(0)
            ])
        );
        assert_eq!(parse_path("--listen.handler"), None);
        assert_eq!(line_col("a\nbé c", 6), (2, 4));
    }
}
