//! Errors in the plan's words: a plan that cannot be read is one line, `file:line:col:
//! message`, located where the problem is written. serde's and toml's messages are
//! reworded — an unknown key or value gets the nearest known word, a wrong type names
//! the key and what it takes (`run.listen must be a port number 1–65535`), never a Rust
//! type.

use super::Plan;
use super::path::{PathPart, Spot, key_path, spot_at};

/// A plan that could not be read: `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PlanError {
    /// The plan file as the user named it.
    pub file: String,
    /// 1-based line of the problem.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong, in the plan's words, with its key path first when it has one.
    pub message: String,
}

/// Turns a toml/serde error into a located, one-line error in the plan's words: wrong
/// types name the key and what it takes, typos get the nearest known word.
pub(super) fn from_toml(e: &toml::de::Error, text: &str, file: &str) -> PlanError {
    let span = e.span().filter(|s| text.get(s.clone()).is_some());
    let offset = span.as_ref().map_or(0, |s| s.start);
    let (line, column) = line_col(text, offset);
    let raw = e.message().trim().replace('\n', " ");
    let at = span.map(|span| At {
        spot: spot_at(text, span.start),
        text,
        span,
    });
    PlanError {
        file: file.to_string(),
        line,
        column,
        message: improve_message(&raw, at),
    }
}

/// Where a serde error points: what is there and its place in the text.
struct At<'a> {
    /// The key path at the error and whether its value is a table.
    spot: Spot,
    /// The whole plan.
    text: &'a str,
    /// The bytes of `text` the error points at.
    span: std::ops::Range<usize>,
}

/// serde's or toml's message in the plan's words: typos get the nearest known word,
/// wrong types name the key and what it takes.
fn improve_message(raw: &str, at: Option<At<'_>>) -> String {
    // serde: "unknown field `heath`, expected one of `a`, `b`" or "expected `a` or `b`"
    if let Some(rest) = raw.strip_prefix("unknown field `") {
        return unknown(Unknown::Key, rest);
    }
    let key = at
        .as_ref()
        .map_or(String::new(), |a| key_path(&a.spot.path));
    let keyed = |msg: String| {
        if key.is_empty() {
            msg
        } else {
            format!("{key}: {msg}")
        }
    };
    if let Some(rest) = raw.strip_prefix("unknown variant `") {
        return keyed(unknown(Unknown::Value, rest));
    }
    if let Some(rest) = raw.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or_default();
        return match name {
            "health" => "missing [health] section: a health check is required".to_string(),
            "release" | "run" => format!("missing [{name}] section"),
            _ => keyed(format!("missing key `{name}`")),
        };
    }
    let Some(at) = at else {
        return raw.to_string();
    };
    wrong_type(raw, &at).unwrap_or_else(|| keyed(raw.to_string()))
}

/// What an unknown word in a plan is.
#[derive(Clone, Copy)]
enum Unknown {
    /// A key the model does not have, named in backticks.
    Key,
    /// A value a key does not take, named in quotes as the plan writes it.
    Value,
}

impl Unknown {
    /// `word` as this kind of word is named in messages.
    fn named(self, word: &str) -> String {
        match self {
            Unknown::Key => format!("`{word}`"),
            Unknown::Value => format!("{word:?}"),
        }
    }
}

/// ``unknown key `heath`: did you mean `health`?`` or `unknown value "htp": did you
/// mean "http"?`, from what follows the word's opening backtick in serde's message.
fn unknown(kind: Unknown, rest: &str) -> String {
    let name = rest.split('`').next().unwrap_or_default();
    let expected = quoted_words(rest);
    let (what, others) = match kind {
        Unknown::Key => ("key", "known keys here:"),
        Unknown::Value => ("value", "expected one of"),
    };
    let mut msg = format!("unknown {what} {}", kind.named(name));
    if let Some(best) = nearest(name, &expected) {
        msg.push_str(&format!(": did you mean {}?", kind.named(best)));
    } else if !expected.is_empty() {
        msg.push_str(&format!("; {others} {}", expected.join(", ")));
    }
    msg
}

/// `run.listen must be a port number 1–65535 (found "8080")` when `raw` says a value
/// has the wrong type; `None` for any other message.
fn wrong_type(raw: &str, at: &At<'_>) -> Option<String> {
    // serde: "invalid type: string \"8080\", expected u16"; toml, for an enum given a
    // number or a list: "wanted string or table".
    let expected = raw
        .strip_prefix("invalid type: ")
        .or_else(|| raw.strip_prefix("invalid value: "))
        .and_then(|r| r.split_once(", expected "))
        .map(|(_, e)| e.to_string())
        .or_else(|| {
            (raw == "wanted string or table").then(|| one_of(&enum_words(at.text, at.span.clone())))
        })?;
    let found = at.text[at.span.clone()].trim();
    // A table whose text starts with `[` is a `[section]` header.
    let found = if at.spot.table && found.starts_with('[') {
        "a [section]"
    } else {
        found
    };
    Some(type_message(&at.spot.path, &expected, found))
}

/// `run.listen must be a port number 1–65535 (found 80800)`.
fn type_message(path: &[PathPart], expected: &str, found: &str) -> String {
    // An element of a list or of a table of the user's keys is described by its key.
    let keep = path
        .iter()
        .rposition(|p| matches!(p, PathPart::Key(_)))
        .map_or(0, |i| i + 1);
    let path = &path[..keep];
    let lookup: Vec<&str> = path
        .iter()
        .filter_map(|p| match p {
            PathPart::Key(k) => Some(k.as_ref()),
            _ => None,
        })
        .collect();
    let lookup = lookup.join(".");
    let want = EXPECTED
        .iter()
        .find(|(k, _)| *k == lookup)
        .map_or_else(|| plain_expected(expected), |(_, w)| w.to_string());
    // One line, and short: a value may span lines.
    let found = found.split_whitespace().collect::<Vec<_>>().join(" ");
    let found = if found.chars().count() > 40 {
        format!("{}…", found.chars().take(40).collect::<String>())
    } else {
        found
    };
    let key = key_path(path);
    let key = if key.is_empty() { "the plan" } else { &key };
    format!("{key} must be {want} (found {found})")
}

/// What the keys whose type alone says too little take, by key path (list indices
/// left out). Every other key is described from its type by [`plain_expected`].
const EXPECTED: &[(&str, &str)] = &[
    ("service", "a service name in quotes, like \"web\""),
    ("release", "a [release] section"),
    ("release.version", "a version in quotes, like \"1.4.2\""),
    (
        "release.artifact",
        "a URL in quotes, like \"https://artifacts.example/web-1.4.2.tar.gz\"",
    ),
    (
        "release.sha256",
        "the artifact's SHA-256 in quotes (64 hexadecimal digits)",
    ),
    (
        "release.committed_at",
        "a time in quotes, like \"2025-01-31T12:00:00Z\"",
    ),
    ("targets", "a [targets] section"),
    (
        "targets.labels",
        "a table of labels like { env = \"prod\", role = \"web\" }",
    ),
    ("run", "a [run] section"),
    (
        "run.command",
        "a list of strings like [\"./bin/web\", \"--port\", \"${PORT}\"]",
    ),
    ("run.env", "a table of strings like { RUST_LOG = \"info\" }"),
    ("run.listen", "a port number 1–65535"),
    ("run.user", "a user name in quotes, like \"web\""),
    ("health", "a [health] section"),
    ("health.http", "a path in quotes, like \"/healthz\""),
    ("health.exec", "a list of strings like [\"./bin/check\"]"),
    ("health.healthy_after", "a number of checks, like 2"),
    ("health.unhealthy_after", "a number of checks, like 3"),
    ("strategy", "a [strategy] section"),
    ("strategy.max_failed_hosts", "a number of hosts, like 0"),
    (
        "strategy.steps",
        "a list of steps like [{ traffic = 10, hold = \"5m\" }, { traffic = 100 }]",
    ),
    (
        "strategy.steps.traffic",
        "a percentage from 1 to 100, like 10",
    ),
    ("analysis", "an [analysis] section"),
    ("analysis.failure_limit", "a number of intervals, like 2"),
    ("analysis.min_requests", "a number of requests, like 50"),
    (
        "analysis.inconclusive_limit",
        "a number of intervals, like 3",
    ),
    ("analysis.scrape", "a path in quotes, like \"/metrics\""),
    (
        "analysis.prometheus",
        "a URL in quotes, like \"http://127.0.0.1:9090\"",
    ),
    (
        "analysis.metric",
        "[[analysis.metric]] sections, each naming a metric and its bounds",
    ),
    ("analysis.metric.max", "a number, like 0.01 or 500"),
    ("analysis.metric.min", "a number, like 0.01 or 500"),
    ("analysis.metric.max_vs_baseline", "a ratio, like 1.5"),
    ("analysis.metric.min_vs_baseline", "a ratio, like 0.8"),
    (
        "analysis.metric.name",
        "a metric name in quotes, like \"error_rate\" or \"payment failure rate\"",
    ),
    (
        "analysis.metric.counter",
        "a metric name in quotes, like \"orders_total\"",
    ),
    (
        "analysis.metric.gauge",
        "a metric name in quotes, like \"queue_depth\"",
    ),
    (
        "analysis.metric.histogram",
        "a metric name in quotes, like \"checkout_seconds\"",
    ),
    (
        "analysis.metric.ratio",
        "two counter names, like [\"payments_failed_total\", \"payments_total\"]",
    ),
    (
        "analysis.metric.quantile",
        "a number between 0 and 1, like 0.99",
    ),
    (
        "analysis.metric.labels",
        "a table of labels like { method = \"card\" }",
    ),
    ("analysis.metric.query", "a PromQL query in quotes"),
    ("analysis.metric.baseline_query", "a PromQL query in quotes"),
    (
        "analysis.metric.confidence",
        "a number between 0 and 1, like 0.95",
    ),
];

/// serde's name for a type, in the plan's words.
fn plain_expected(expected: &str) -> String {
    let plain = match expected {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" | "u64" | "usize" => "a whole number, 0 or more",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a string" | "a borrowed string" => "text in quotes",
        "a sequence" => "a list in brackets, like [\"a\", \"b\"]",
        "a map" => "a table, like { key = \"value\" }",
        e if e.starts_with("struct ") => "a table: a [section] or { key = value, ... }",
        // A visitor's own words ("a duration like \"30s\"", "one of ..."), already plain.
        e => return e.to_string(),
    };
    plain.to_string()
}

/// `"http" or "tcp"`; `one of the words this key takes` when they are not known.
fn one_of(words: &[String]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    match quoted.as_slice() {
        [] => "one of the words this key takes, in quotes".to_string(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The words a key taking one of a few (an enum) accepts: learnt by parsing the plan
/// again with an impossible word at `span`, which serde answers with the list.
fn enum_words(text: &str, span: std::ops::Range<usize>) -> Vec<String> {
    let probe = format!("{}\"?\"{}", &text[..span.start], &text[span.end..]);
    match toml::from_str::<Plan>(&probe) {
        Err(e) if e.span().is_some_and(|s| s.start == span.start) => {
            let m = e.message();
            m.strip_prefix("unknown variant `")
                .map(|rest| quoted_words(rest).iter().map(|w| w.to_string()).collect())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// The words between backticks after "expected" in a serde message.
fn quoted_words(rest: &str) -> Vec<&str> {
    rest.split_once("expected")
        .map(|(_, tail)| tail.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default()
}

/// The known word closest to `word`, if it is close enough to be a typo of it.
pub fn nearest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(word, k), *k))
        .filter(|(d, k)| *d <= (k.len().max(word.len()) / 3).max(1) + usize::from(k.len() > 5))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}
