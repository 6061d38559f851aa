//! The Prometheus text exposition format (version 0.0.4), parsed strictly: what a slot
//! serves on its metrics path, read by the agent to judge business metrics. Comments and
//! `# HELP` are skipped, `# TYPE` is kept, every sample line is checked against the
//! format (metric and label names, quoted label values with `\\`, `\"` and `\n`
//! escapes, values including `NaN`, `+Inf` and `-Inf`, an optional timestamp), and any
//! line that does not fit is an error naming the line: a half-read exposition must not
//! pass for data.
//!
//! On top of the parse, [`Exposition`] answers what a plan's metric asks: the sum of the
//! series of a name that carry some labels, and a histogram's cumulative buckets.
//! Linear in the input, no recursion, no regex.

use std::collections::BTreeMap;

/// What a `# TYPE` line says a metric family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Label pairs in the order written.
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Milliseconds since the epoch, when the line carries one.
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// True when every `(key, value)` of `selector` is among this sample's labels.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.label(k) == Some(v.as_str()))
    }
}

/// A parsed exposition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family name → type, from `# TYPE` lines.
    pub types: BTreeMap<String, MetricType>,
}

/// A line that is not in the format: its number (1-based) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// Parses a whole exposition.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let err = |message: String| ParseError {
            line: i + 1,
            message,
        };
        let trimmed = line.trim_start_matches([' ', '\t']);
        if trimmed.is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            if let Some((name, kind)) = type_line(comment).map_err(err)? {
                out.types.insert(name, kind);
            }
            continue;
        }
        out.samples.push(sample_line(trimmed).map_err(err)?);
    }
    Ok(out)
}

/// `# TYPE name kind` gives `Some`; `# HELP` and other comments `None`.
fn type_line(comment: &str) -> Result<Option<(String, MetricType)>, String> {
    let mut words = comment.split_ascii_whitespace();
    if words.next() != Some("TYPE") {
        return Ok(None);
    }
    let name = words
        .next()
        .ok_or_else(|| "# TYPE without a metric name".to_string())?;
    if !is_metric_name(name) {
        return Err(format!("# TYPE: {name:?} is not a metric name"));
    }
    let kind = match words.next() {
        Some("counter") => MetricType::Counter,
        Some("gauge") => MetricType::Gauge,
        Some("histogram") => MetricType::Histogram,
        Some("summary") => MetricType::Summary,
        Some("untyped") => MetricType::Untyped,
        Some(other) => return Err(format!("# TYPE {name}: unknown type {other:?}")),
        None => return Err(format!("# TYPE {name}: no type")),
    };
    if let Some(extra) = words.next() {
        return Err(format!("# TYPE {name}: unexpected {extra:?}"));
    }
    Ok(Some((name.to_string(), kind)))
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A cursor over one sample line.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn skip_blanks(&mut self) {
        self.rest = self.rest.trim_start_matches([' ', '\t']);
    }

    /// The longest prefix whose characters satisfy `ok`.
    fn take_while(&mut self, ok: impl Fn(char) -> bool) -> &'a str {
        let end = self
            .rest
            .char_indices()
            .find(|(_, c)| !ok(*c))
            .map_or(self.rest.len(), |(i, _)| i);
        let (head, tail) = self.rest.split_at(end);
        self.rest = tail;
        head
    }

    fn eat(&mut self, c: char) -> bool {
        match self.rest.strip_prefix(c) {
            Some(tail) => {
                self.rest = tail;
                true
            }
            None => false,
        }
    }

    /// A quoted label value, with its escapes resolved.
    fn quoted(&mut self) -> Result<String, String> {
        if !self.eat('"') {
            return Err("a label value must be in double quotes".into());
        }
        let mut value = String::new();
        let mut chars = self.rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &self.rest[i + 1..];
                    return Ok(value);
                }
                '\\' => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => {
                        return Err(format!("unknown escape \\{other} in a label value"));
                    }
                    None => break,
                },
                c => value.push(c),
            }
        }
        Err("a label value is not closed".into())
    }
}

fn sample_line(line: &str) -> Result<Sample, String> {
    let mut cur = Cursor { rest: line };
    let name = cur.take_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if !is_metric_name(name) {
        return Err(format!(
            "{:?} does not start with a metric name",
            truncate(line)
        ));
    }
    cur.skip_blanks();
    let labels = if cur.eat('{') {
        label_set(&mut cur, name)?
    } else {
        Vec::new()
    };
    cur.skip_blanks();
    let value_text = cur.take_while(|c| c != ' ' && c != '\t');
    let value = parse_value(value_text).ok_or_else(|| {
        if value_text.is_empty() {
            format!("{name}: no value")
        } else {
            format!("{name}: {value_text:?} is not a number")
        }
    })?;
    cur.skip_blanks();
    let timestamp_ms = if cur.rest.is_empty() {
        None
    } else {
        let t = cur.take_while(|c| c != ' ' && c != '\t');
        Some(
            t.parse::<i64>()
                .map_err(|_| format!("{name}: {t:?} is not a timestamp in milliseconds"))?,
        )
    };
    cur.skip_blanks();
    if !cur.rest.is_empty() {
        return Err(format!("{name}: unexpected {:?}", truncate(cur.rest)));
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
        timestamp_ms,
    })
}

/// The labels after an opening `{`, up to and including the closing `}`.
fn label_set(cur: &mut Cursor<'_>, name: &str) -> Result<Vec<(String, String)>, String> {
    let mut labels: Vec<(String, String)> = Vec::new();
    loop {
        cur.skip_blanks();
        if cur.eat('}') {
            return Ok(labels);
        }
        let key = cur.take_while(|c| c.is_ascii_alphanumeric() || c == '_');
        if !is_label_name(key) {
            return Err(format!("{name}: a label name is expected"));
        }
        cur.skip_blanks();
        if !cur.eat('=') {
            return Err(format!("{name}: label {key} has no '='"));
        }
        cur.skip_blanks();
        let value = cur
            .quoted()
            .map_err(|e| format!("{name}: label {key}: {e}"))?;
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("{name}: label {key} appears twice"));
        }
        labels.push((key.to_string(), value));
        cur.skip_blanks();
        if cur.eat('}') {
            return Ok(labels);
        }
        if !cur.eat(',') {
            return Err(format!("{name}: expected ',' or '}}' after label {key}"));
        }
    }
}

/// A sample value: a decimal or exponent number, `NaN`, `+Inf`, `-Inf` (and `Inf`).
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        // Rust accepts "inf", "infinity" and "nan" in any case; the format does not.
        _ if s
            .bytes()
            .any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E') =>
        {
            None
        }
        _ => s.parse().ok(),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

impl Exposition {
    /// The sum of the samples named `name` whose labels include `selector`, or `None`
    /// when no sample matches.
    pub fn sum(&self, name: &str, selector: &BTreeMap<String, String>) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for s in self
            .samples
            .iter()
            .filter(|s| s.name == name && s.matches(selector))
        {
            found = true;
            total += s.value;
        }
        found.then_some(total)
    }

    /// The cumulative buckets of histogram `name` (its `name_bucket` series) whose
    /// labels include `selector`, summed over the matching series per upper bound and
    /// sorted by bound; `None` when no bucket matches or one has no valid `le`.
    pub fn histogram(
        &self,
        name: &str,
        selector: &BTreeMap<String, String>,
    ) -> Option<Vec<(f64, f64)>> {
        let bucket = format!("{name}_bucket");
        let mut by_le: Vec<(f64, f64)> = Vec::new();
        for s in self
            .samples
            .iter()
            .filter(|s| s.name == bucket && s.matches(selector))
        {
            let le = parse_value(s.label("le")?)?;
            if le.is_nan() {
                return None;
            }
            match by_le.iter_mut().find(|(b, _)| *b == le) {
                Some((_, count)) => *count += s.value,
                None => by_le.push((le, s.value)),
            }
        }
        if by_le.is_empty() {
            return None;
        }
        by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(by_le)
    }
}

/// The `q` quantile of a distribution given by cumulative buckets `(upper bound,
/// count)` sorted by bound, interpolated linearly inside its bucket as Prometheus'
/// `histogram_quantile` does (the first bucket starts at 0; a quantile in the `+Inf`
/// bucket is the highest finite bound). `None` without observations.
pub fn bucket_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    // NaN counts and quantiles fail these checks too.
    if total.is_nan() || total <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(prev_bound);
            }
            let in_bucket = count - prev_count;
            if in_bucket <= 0.0 {
                return Some(bound);
            }
            return Some(prev_bound + (bound - prev_bound) * (rank - prev_count) / in_bucket);
        }
        prev_bound = bound;
        prev_count = count;
    }
    Some(prev_bound)
}

#[cfg(test)]
mod tests;
