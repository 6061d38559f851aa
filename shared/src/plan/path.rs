//! Key paths in a plan: how a problem's place is named (`strategy.steps[2].traffic`), and
//! how a path and a byte offset of the text are matched to each other — a path to where
//! its value is written, an offset to the narrowest key or value holding it.

use std::borrow::Cow;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPart {
    /// A key of the plan's model.
    Key(Cow<'static, str>),
    /// An element of a list.
    Index(usize),
    /// A key the user chose: an env variable's or a label's name.
    Name(String),
}

/// A model key, as a path step; short because validation writes many paths.
#[allow(non_snake_case)]
pub(super) fn K(key: &'static str) -> PathPart {
    PathPart::Key(Cow::Borrowed(key))
}

/// A list index, as a path step.
#[allow(non_snake_case)]
pub(super) fn I(index: usize) -> PathPart {
    PathPart::Index(index)
}

/// `strategy.steps[2].traffic`.
pub(super) fn key_path(path: &[PathPart]) -> String {
    let mut out = String::new();
    for p in path {
        match p {
            PathPart::Key(k) => push_key(&mut out, k),
            PathPart::Name(n) => push_key(&mut out, n),
            PathPart::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn push_key(out: &mut String, key: &str) {
    if !out.is_empty() {
        out.push('.');
    }
    out.push_str(key);
}

/// Byte offset of the value at `path`, or of the deepest part of it that exists.
pub(super) fn locate(text: &str, path: &[PathPart]) -> usize {
    let Ok(root) = toml::de::DeTable::parse(text) else {
        return 0;
    };
    let mut best = 0;
    let mut table = Some(root.get_ref());
    let mut value: Option<&toml::Spanned<toml::de::DeValue<'_>>> = None;
    for part in path {
        let next = match (part, table, value) {
            (PathPart::Key(k), Some(t), _) => t.get(k.as_ref()),
            (PathPart::Key(k), None, Some(v)) => v.get_ref().get(k.as_ref()),
            (PathPart::Name(k), Some(t), _) => t.get(k.as_str()),
            (PathPart::Name(k), None, Some(v)) => v.get_ref().get(k.as_str()),
            (PathPart::Index(i), _, Some(v)) => v.get_ref().get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        best = next.span().start;
        value = Some(next);
        table = None;
    }
    best
}

/// What is at a byte offset of the plan: the key path of the narrowest key or value
/// holding it, and whether that value is a table.
#[derive(Default)]
pub(super) struct Spot {
    /// The key path of the narrowest key or value at the offset.
    pub(super) path: Vec<PathPart>,
    /// Whether that value is a table (a `[section]` or `{ ... }`).
    pub(super) table: bool,
    /// Its length in bytes, to keep the narrowest.
    len: usize,
}

/// The [`Spot`] at byte `offset` of `text`.
pub(super) fn spot_at(text: &str, offset: usize) -> Spot {
    let Ok(root) = toml::de::DeTable::parse(text) else {
        return Spot::default();
    };
    let mut best = None;
    let mut path = Vec::new();
    visit_table(root.get_ref(), false, offset, &mut path, &mut best);
    best.unwrap_or_default()
}

/// Tables whose keys the user chooses (label and variable names), not the model.
const USER_KEYED: &[&str] = &["labels", "env"];

fn visit_table(
    table: &toml::de::DeTable<'_>,
    user_keyed: bool,
    offset: usize,
    path: &mut Vec<PathPart>,
    best: &mut Option<Spot>,
) {
    for (k, v) in table.iter() {
        let key = k.get_ref().to_string();
        let children_user_keyed = !user_keyed && USER_KEYED.contains(&key.as_str());
        path.push(if user_keyed {
            PathPart::Name(key)
        } else {
            PathPart::Key(Cow::Owned(key))
        });
        consider(k.span(), false, offset, path, best);
        consider(v.span(), is_table(v), offset, path, best);
        visit_value(v.get_ref(), children_user_keyed, offset, path, best);
        path.pop();
    }
}

fn visit_value(
    value: &toml::de::DeValue<'_>,
    user_keyed: bool,
    offset: usize,
    path: &mut Vec<PathPart>,
    best: &mut Option<Spot>,
) {
    match value {
        toml::de::DeValue::Table(t) => visit_table(t, user_keyed, offset, path, best),
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(I(i));
                consider(item.span(), is_table(item), offset, path, best);
                visit_value(item.get_ref(), false, offset, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

fn is_table(v: &toml::Spanned<toml::de::DeValue<'_>>) -> bool {
    matches!(v.get_ref(), toml::de::DeValue::Table(_))
}

/// Keeps `path` when `span` holds `offset` and is the narrowest such span so far.
fn consider(
    span: std::ops::Range<usize>,
    table: bool,
    offset: usize,
    path: &[PathPart],
    best: &mut Option<Spot>,
) {
    if span.contains(&offset) && best.as_ref().is_none_or(|b| span.len() <= b.len) {
        *best = Some(Spot {
            path: path.to_vec(),
            table,
            len: span.len(),
        });
    }
}
