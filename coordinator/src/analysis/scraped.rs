//! `source = "slot"` metrics: what the agents scrape from each slot's own Prometheus
//! text, turned into interval values the way the proxy's counters are — each slot's
//! raw cumulative values at the interval's start and end, their increase (a value that
//! went down means the process restarted: everything counted now is new), summed over
//! the step's hosts for each side, then the metric's value: a counter's increase per
//! second, a ratio of two increases, a gauge's last value, a histogram's quantile from
//! its buckets' increases.

use std::collections::BTreeMap;

use cutover_proto::v1::{ScrapeSeries, SlotScrape};
use cutover_shared::exposition::bucket_quantile;
use cutover_shared::plan::{Analysis, Measure, Metric, SlotMeasure};
use serde::{Deserialize, Serialize};

use super::reading::{Counts, Reading, Side, Values};

/// One slot's scrape, as the coordinator keeps it from one interval to the next.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Scrape {
    /// The agent's count of scrapes of this slot: the same number twice is no new data.
    pub seq: u64,
    /// Why the scrape failed, when it did.
    pub error: Option<String>,
    /// Each series asked for, by key: `None` when no sample matched.
    pub values: BTreeMap<String, Option<Series>>,
}

/// A series' raw value in one scrape.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(into = "Stored", from = "Stored")]
pub enum Series {
    /// The sum of the matching samples (a counter or a gauge).
    Sum(f64),
    /// Cumulative histogram buckets: (upper bound, count), sorted by bound.
    Buckets(Vec<(f64, f64)>),
}

/// A [`Series`] as the deployment record stores it: JSON has no `+Inf` (every
/// histogram's last bound) nor NaN, so those are written as the exposition writes them.
#[derive(Serialize, Deserialize)]
enum Stored {
    Sum(Num),
    Buckets(Vec<(Num, Num)>),
}

/// A number, or its exposition text when it is not finite.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum Num {
    Finite(f64),
    Text(String),
}

impl Num {
    fn of(v: f64) -> Num {
        match v {
            v if v.is_finite() => Num::Finite(v),
            v if v.is_nan() => Num::Text("NaN".into()),
            v if v > 0.0 => Num::Text("+Inf".into()),
            _ => Num::Text("-Inf".into()),
        }
    }

    fn value(self) -> f64 {
        match self {
            Num::Finite(v) => v,
            Num::Text(t) if t == "+Inf" => f64::INFINITY,
            Num::Text(t) if t == "-Inf" => f64::NEG_INFINITY,
            Num::Text(_) => f64::NAN,
        }
    }
}

impl From<Series> for Stored {
    fn from(s: Series) -> Stored {
        match s {
            Series::Sum(v) => Stored::Sum(Num::of(v)),
            Series::Buckets(b) => Stored::Buckets(
                b.into_iter()
                    .map(|(l, c)| (Num::of(l), Num::of(c)))
                    .collect(),
            ),
        }
    }
}

impl From<Stored> for Series {
    fn from(s: Stored) -> Series {
        match s {
            Stored::Sum(v) => Series::Sum(v.value()),
            Stored::Buckets(b) => {
                Series::Buckets(b.into_iter().map(|(l, c)| (l.value(), c.value())).collect())
            }
        }
    }
}

impl Scrape {
    pub fn from_pb(s: &SlotScrape) -> Scrape {
        let values = s
            .values
            .iter()
            .map(|v| {
                let series = v.found.then(|| {
                    if v.bucket_le.is_empty() {
                        Series::Sum(v.sum)
                    } else {
                        Series::Buckets(
                            v.bucket_le
                                .iter()
                                .copied()
                                .zip(v.bucket_counts.iter().copied())
                                .collect(),
                        )
                    }
                });
                (v.key.clone(), series)
            })
            .collect();
        Scrape {
            seq: s.seq,
            error: (!s.error.is_empty()).then(|| s.error.clone()),
            values,
        }
    }
}

/// Each host's scrapes at the interval's start: (new slot, old slot).
pub type ScrapeSnapshot = BTreeMap<String, (Option<Scrape>, Option<Scrape>)>;

/// The series a plan's slot metrics need from every slot, each once.
pub fn series(analysis: &Analysis) -> Vec<ScrapeSeries> {
    let mut out: Vec<ScrapeSeries> = Vec::new();
    for m in &analysis.metric {
        for s in metric_series(m) {
            if !out.iter().any(|o| o.key == s.key) {
                out.push(s);
            }
        }
    }
    out
}

/// The series metric `m` reads (none unless it is a slot metric).
fn metric_series(m: &Metric) -> Vec<ScrapeSeries> {
    let Some(Measure::Slot(kind, labels)) = m.measure() else {
        return Vec::new();
    };
    let one = |name: &str, histogram: bool| ScrapeSeries {
        key: key(name, labels, histogram),
        name: name.to_string(),
        labels: labels.clone().into_iter().collect(),
        histogram,
    };
    match kind {
        SlotMeasure::Counter(n) | SlotMeasure::Gauge(n) => vec![one(n, false)],
        SlotMeasure::Ratio(a, b) => vec![one(a, false), one(b, false)],
        SlotMeasure::Histogram(n, _) => vec![one(n, true)],
    }
}

/// `payments_total{method="card"}`, and `checkout_seconds_bucket{…}` for a histogram.
fn key(name: &str, labels: &BTreeMap<String, String>, histogram: bool) -> String {
    let suffix = if histogram { "_bucket" } else { "" };
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{suffix}{{{}}}", labels.join(","))
}

/// One slot's scrapes at the interval's start and now.
#[derive(Clone, Copy, Debug)]
pub struct Span<'a> {
    pub start: Option<&'a Scrape>,
    pub end: Option<&'a Scrape>,
}

/// One host's slots over the interval.
#[derive(Clone, Copy, Debug)]
pub struct HostSpan<'a> {
    pub host: &'a str,
    pub new: Span<'a>,
    /// `None` on a host that had no release before this one.
    pub old: Option<Span<'a>>,
}

/// The reading of every slot metric of `analysis` over an interval of `seconds`.
pub fn readings(
    analysis: &Analysis,
    hosts: &[HostSpan<'_>],
    seconds: f64,
) -> BTreeMap<String, Reading> {
    analysis
        .metric
        .iter()
        .filter_map(|m| match m.measure() {
            Some(Measure::Slot(kind, labels)) => {
                Some((m.name.clone(), read(&kind, labels, hosts, seconds)))
            }
            _ => None,
        })
        .collect()
}

/// Which side of a host a value comes from, for messages.
#[derive(Clone, Copy)]
enum Which {
    New,
    Old,
}

impl Which {
    fn slot(self) -> &'static str {
        match self {
            Which::New => "new",
            Which::Old => "old",
        }
    }
}

fn read(
    kind: &SlotMeasure<'_>,
    labels: &BTreeMap<String, String>,
    hosts: &[HostSpan<'_>],
    seconds: f64,
) -> Reading {
    let side = |which: Which| -> Result<Option<Total>, String> {
        let mut total: Option<Total> = None;
        for h in hosts {
            let span = match which {
                Which::New => Some(h.new),
                Which::Old => h.old,
            };
            let Some(span) = span else { continue };
            let at = || format!("the {} slot on host {}", which.slot(), h.host);
            if let Some(t) = host_total(kind, labels, span, &at)? {
                total.get_or_insert_with(|| Total::empty(kind)).add(&t);
            }
        }
        Ok(total)
    };
    let (new, old) = (side(Which::New), side(Which::Old));
    let counts = match (&new, &old) {
        (Ok(Some(n)), Ok(Some(o))) => Total::counts(n, o),
        _ => None,
    };
    let value = |t: Result<Option<Total>, String>| -> Side {
        t.map(|t| t.and_then(|t| t.value(kind, seconds)))
    };
    Reading::Whole(Values {
        new: value(new),
        old: value(old),
        counts,
    })
}

/// What one side adds up to over the interval, before it becomes the metric's value.
#[derive(Clone, Debug, PartialEq)]
enum Total {
    /// Summed increases (counter) or last values (gauge).
    Sum(f64),
    /// A ratio's numerator and denominator increases.
    Pair(f64, f64),
    /// Cumulative bucket increases per bound.
    Buckets(Vec<(f64, f64)>),
}

impl Total {
    fn empty(kind: &SlotMeasure<'_>) -> Total {
        match kind {
            SlotMeasure::Counter(_) | SlotMeasure::Gauge(_) => Total::Sum(0.0),
            SlotMeasure::Ratio(..) => Total::Pair(0.0, 0.0),
            SlotMeasure::Histogram(..) => Total::Buckets(Vec::new()),
        }
    }

    fn add(&mut self, other: &Total) {
        match (self, other) {
            (Total::Sum(a), Total::Sum(b)) => *a += b,
            (Total::Pair(a, b), Total::Pair(c, d)) => {
                *a += c;
                *b += d;
            }
            (Total::Buckets(a), Total::Buckets(b)) => {
                for &(le, n) in b {
                    match a.iter_mut().find(|(l, _)| *l == le) {
                        Some((_, count)) => *count += n,
                        None => a.push((le, n)),
                    }
                }
                a.sort_by(|x, y| x.0.total_cmp(&y.0));
            }
            _ => {}
        }
    }

    /// The metric's value; `None` without data (no increase of a ratio's denominator,
    /// no observation in a histogram).
    fn value(&self, kind: &SlotMeasure<'_>, seconds: f64) -> Option<f64> {
        match (self, kind) {
            (Total::Sum(v), SlotMeasure::Counter(_)) => (seconds > 0.0).then(|| v / seconds),
            (Total::Sum(v), _) => Some(*v),
            (Total::Pair(n, d), _) => (*d > 0.0).then(|| n / d),
            (Total::Buckets(b), SlotMeasure::Histogram(_, q)) => bucket_quantile(*q, b),
            (Total::Buckets(_), _) => None,
        }
    }

    /// The counts behind both sides, for the statistical judge.
    fn counts(new: &Total, old: &Total) -> Option<Counts> {
        let whole = |x: f64| x.max(0.0).round() as u64;
        match (new, old) {
            (Total::Pair(a, b), Total::Pair(c, d)) => Some(Counts::Proportion {
                new: (whole(*a), whole(*b)),
                old: (whole(*c), whole(*d)),
            }),
            (Total::Buckets(n), Total::Buckets(o)) => {
                let mut bounds: Vec<f64> = n.iter().chain(o).map(|(le, _)| *le).collect();
                bounds.sort_by(f64::total_cmp);
                bounds.dedup();
                let per_bucket = |b: &[(f64, f64)]| -> Vec<u64> {
                    let mut prev = 0.0;
                    bounds
                        .iter()
                        .map(|le| {
                            let cum = b
                                .iter()
                                .take_while(|(l, _)| l <= le)
                                .last()
                                .map_or(0.0, |(_, c)| *c);
                            let n = whole(cum - prev);
                            prev = cum.max(prev);
                            n
                        })
                        .collect()
                };
                Some(Counts::Buckets {
                    new: per_bucket(n),
                    old: per_bucket(o),
                })
            }
            _ => None,
        }
    }
}

/// One slot's contribution over the interval: `Ok(None)` when none of its series had a
/// sample, `Err` when its scrape failed or brought nothing new.
fn host_total(
    kind: &SlotMeasure<'_>,
    labels: &BTreeMap<String, String>,
    span: Span<'_>,
    at: &dyn Fn() -> String,
) -> Result<Option<Total>, String> {
    let Some(end) = span.end else {
        return Err(format!("{} has not been scraped", at()));
    };
    if let Some(e) = &end.error {
        return Err(format!("scrape of {} failed: {e}", at()));
    }
    let gauge = matches!(kind, SlotMeasure::Gauge(_));
    let start = match span.start {
        _ if gauge => None,
        Some(s) if s.seq == end.seq => {
            return Err(format!("no new scrape of {} in this interval", at()));
        }
        Some(s) if s.error.is_none() => Some(s),
        _ => return Err(format!("no scrape of {} at the interval's start", at())),
    };
    let get = |s: Option<&Scrape>, name: &str, histogram: bool| {
        s.and_then(|s| {
            s.values
                .get(&key(name, labels, histogram))
                .cloned()
                .flatten()
        })
    };
    let increase = |name: &str| -> Option<f64> {
        let now = get(Some(end), name, false)?;
        let before = get(start, name, false);
        Some(sum_increase(&now, before.as_ref()))
    };
    Ok(match kind {
        SlotMeasure::Gauge(n) => match get(Some(end), n, false) {
            Some(Series::Sum(v)) => Some(Total::Sum(v)),
            _ => None,
        },
        SlotMeasure::Counter(n) => increase(n).map(Total::Sum),
        SlotMeasure::Ratio(a, b) => match (increase(a), increase(b)) {
            (None, None) => None,
            (x, y) => Some(Total::Pair(x.unwrap_or(0.0), y.unwrap_or(0.0))),
        },
        SlotMeasure::Histogram(n, _) => match get(Some(end), n, true) {
            Some(Series::Buckets(now)) => {
                let before = match get(start, n, true) {
                    Some(Series::Buckets(b)) => Some(b),
                    _ => None,
                };
                Some(Total::Buckets(buckets_increase(&now, before.as_deref())))
            }
            _ => None,
        },
    })
}

/// A counter's increase from `before` to `now`. A counter that went down was reset by a
/// restart, so all of `now` is new; a series that was not there yet started at zero.
pub fn sum_increase(now: &Series, before: Option<&Series>) -> f64 {
    let now = match now {
        Series::Sum(v) => *v,
        Series::Buckets(_) => return 0.0,
    };
    match before {
        Some(Series::Sum(b)) if now >= *b => now - b,
        _ => now,
    }
}

/// A histogram's cumulative bucket increases from `before` to `now`. Any bucket that
/// went down, or other bounds, mean a restart: all of `now` is new.
pub fn buckets_increase(now: &[(f64, f64)], before: Option<&[(f64, f64)]>) -> Vec<(f64, f64)> {
    let Some(before) = before else {
        return now.to_vec();
    };
    let same_bounds = before.len() == now.len() && before.iter().zip(now).all(|(a, b)| a.0 == b.0);
    if !same_bounds || before.iter().zip(now).any(|(a, b)| b.1 < a.1) {
        return now.to_vec();
    }
    now.iter()
        .zip(before)
        .map(|(n, b)| (n.0, n.1 - b.1))
        .collect()
}

#[cfg(test)]
mod tests;
