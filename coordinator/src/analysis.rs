//! Judging a release: each analysis interval compares the new slot against the old slot
//! on the same hosts in the same interval (a live baseline), by the golden signals the
//! agents' proxies measure and by the plan's other metrics — the slots' own counters,
//! gauges and histograms (`scraped`), or a Prometheus query's result — read as data
//! (`reading`). Every metric goes through the same bounds. Pure functions, no IO.

use std::collections::BTreeMap;

use cutover_shared::plan::{Analysis, Judge, Measure, Metric, MetricName, SlotMeasure};
use serde::{Deserialize, Serialize};

pub mod reading;
pub mod scraped;

pub use reading::{Counts, Queried, Query, Reading, Side, Values};
pub use scraped::{Scrape, ScrapeSnapshot};

/// Counters of one slot (or a sum of slots) over some span.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Counters {
    /// Requests answered (or refused) by the slot.
    pub requests: u64,
    /// 5xx responses plus failed upstream connections.
    pub errors: u64,
    /// Upper bounds of the latency buckets, microseconds (last: everything above).
    pub le_us: Vec<u64>,
    /// Requests per latency bucket, in the order of `le_us`.
    pub buckets: Vec<u64>,
}

impl Counters {
    pub fn from_pb(m: &cutover_proto::v1::SlotMetrics) -> Counters {
        Counters {
            requests: m.requests,
            errors: m.responses_5xx + m.upstream_failures,
            le_us: m.latency_bucket_le_us.clone(),
            buckets: m.latency_counts.clone(),
        }
    }

    /// What happened since `earlier`. A counter that went down means the slot's process
    /// (and its counters) started afresh: everything counted now is new.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let restarted = self.requests < earlier.requests
            || self.errors < earlier.errors
            || self.buckets.len() != earlier.buckets.len()
            || self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .any(|(a, b)| a < b);
        if restarted {
            return self.clone();
        }
        Counters {
            requests: self.requests - earlier.requests,
            errors: self.errors - earlier.errors,
            le_us: self.le_us.clone(),
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| a - b)
                .collect(),
        }
    }

    pub fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.errors += other.errors;
        if self.le_us.is_empty() {
            self.le_us.clone_from(&other.le_us);
            self.buckets = vec![0; other.buckets.len()];
        }
        if self.buckets.len() == other.buckets.len() {
            for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
                *a += b;
            }
        }
    }

    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// The `q` quantile of latency in milliseconds, interpolated inside its bucket.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let target = q * total as f64;
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (seen + n) as f64 >= target {
                let lo = if i == 0 { 0 } else { self.le_us[i - 1] } as f64;
                let hi = match self.le_us.get(i) {
                    Some(&u) if u != u64::MAX => u as f64,
                    _ => lo * 2.0,
                };
                let frac = ((target - seen as f64) / n as f64).clamp(0.0, 1.0);
                return Some((lo + (hi - lo) * frac) / 1000.0);
            }
            seen += n;
        }
        None
    }
}

/// One interval's traffic: the new slot and the old slot, summed over the step's hosts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// The new release's slots.
    pub new: Counters,
    /// The old release's slots on the same hosts: the live baseline.
    pub old: Counters,
    /// How long the interval ran, for rates.
    pub seconds: f64,
    /// The values of the metrics that do not come from the proxy (`source = "slot"` or
    /// `"prometheus"`), by metric name; a metric missing here had no data.
    #[serde(default)]
    pub readings: BTreeMap<String, Reading>,
}

/// What an interval (or one metric in it) comes to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "verdict", content = "why", rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    /// A bound was broken; why, for people.
    Fail(String),
    /// Too little data to say; neither passes nor fails.
    Inconclusive(String),
}

/// One metric judged in one interval.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricResult {
    /// The metric's name, as the plan spells it.
    pub name: String,
    /// The new release's value (`None`: no data).
    pub new: Option<f64>,
    /// The old release's value on the same hosts (`None`: no data).
    pub old: Option<f64>,
    pub verdict: Verdict,
}

/// How a metric's values read: as the proxy's unit for its golden signals, as plain
/// numbers for the others.
fn fmt(name: &str, v: f64) -> String {
    match MetricName::parse(name) {
        Some(MetricName::ErrorRate) => format!("{:.2}%", v * 100.0),
        Some(MetricName::RequestRate) => format!("{v:.1}/s"),
        Some(_) => format!("{v:.1}ms"),
        None => plain(v),
    }
}

/// A number with four significant digits, without a trailing zero run.
pub fn plain(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 12) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The unit of a metric's values: `ratio` (0 to 1), `ms`, `per_second`, or `value` (a
/// gauge, a histogram's own unit, a query's result).
pub fn unit(m: &Metric) -> &'static str {
    match m.measure() {
        Some(Measure::Proxy(MetricName::ErrorRate)) => "ratio",
        Some(Measure::Proxy(MetricName::RequestRate)) => "per_second",
        Some(Measure::Proxy(_)) => "ms",
        Some(Measure::Slot(SlotMeasure::Ratio(..), _)) => "ratio",
        Some(Measure::Slot(SlotMeasure::Counter(_), _)) => "per_second",
        _ => "value",
    }
}

/// The bounds a metric is judged by, for people: `max 0.02, max_vs_baseline 1.5`.
pub fn threshold(m: &Metric) -> String {
    let mut parts: Vec<String> = [
        ("max", m.max),
        ("min", m.min),
        ("max_vs_baseline", m.max_vs_baseline),
        ("min_vs_baseline", m.min_vs_baseline),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some(format!("{k} {}", fmt_bound(k, &m.name, v?))))
    .collect();
    if m.judge.is_some() {
        parts.push(format!("mann-whitney at {}", m.confidence.unwrap_or(0.95)));
    }
    parts.join(", ")
}

/// A bound in the metric's unit (absolute bounds) or as a ratio (baseline bounds).
fn fmt_bound(key: &str, name: &str, v: f64) -> String {
    if key.ends_with("_vs_baseline") {
        format!("{v}x")
    } else {
        fmt(name, v)
    }
}

/// `latency_p99 212.0ms vs 180.5ms`: one judged metric, new against old, with units.
pub fn figure(m: &MetricResult) -> String {
    let v = |x: Option<f64>| x.map_or("-".to_string(), |x| fmt(&m.name, x));
    format!("{} {} vs {}", m.name, v(m.new), v(m.old))
}

/// Judges one interval against the plan's metrics: it fails when any metric fails (and
/// names every failing one), is inconclusive when any metric had no data, and passes
/// otherwise. `min_requests` makes the proxy's metrics inconclusive on thin traffic; a
/// plan with no metric of another source is then inconclusive as a whole.
pub fn judge(analysis: &Analysis, sample: &Sample) -> (Verdict, Vec<MetricResult>) {
    let thin = (sample.new.requests < analysis.min_requests).then(|| {
        format!(
            "{} requests on the new release, fewer than min_requests {}",
            sample.new.requests, analysis.min_requests
        )
    });
    let only_proxy = analysis
        .metric
        .iter()
        .all(|m| matches!(m.measure(), Some(Measure::Proxy(_))));
    if let (Some(why), true) = (&thin, only_proxy) {
        return (Verdict::Inconclusive(why.clone()), Vec::new());
    }
    let results: Vec<MetricResult> = analysis
        .metric
        .iter()
        .map(|m| match (m.measure(), &thin) {
            (Some(Measure::Proxy(_)), Some(why)) => MetricResult {
                name: m.name.clone(),
                new: None,
                old: None,
                verdict: Verdict::Inconclusive(format!("{}: {why}", m.name)),
            },
            (Some(Measure::Proxy(name)), None) => judge_proxy(m, name, sample),
            _ => reading::judge(m, sample.readings.get(&m.name)),
        })
        .collect();
    (overall(&results), results)
}

/// An interval's verdict from its metrics': every failure named, else every metric
/// without data, else a pass.
fn overall(results: &[MetricResult]) -> Verdict {
    let whys = |inconclusive: bool| -> Vec<&str> {
        results
            .iter()
            .filter_map(|r| match &r.verdict {
                Verdict::Fail(w) if !inconclusive => Some(w.as_str()),
                Verdict::Inconclusive(w) if inconclusive => Some(w.as_str()),
                _ => None,
            })
            .collect()
    };
    let failed = whys(false);
    if !failed.is_empty() {
        return Verdict::Fail(failed.join("; "));
    }
    let unknown = whys(true);
    if !unknown.is_empty() {
        return Verdict::Inconclusive(unknown.join("; "));
    }
    Verdict::Pass
}

/// A golden signal's value over `seconds` of counters `c`.
fn value(m: MetricName, c: &Counters, seconds: f64) -> Option<f64> {
    match m {
        MetricName::ErrorRate => c.error_rate(),
        MetricName::LatencyP50 => c.quantile_ms(0.50),
        MetricName::LatencyP90 => c.quantile_ms(0.90),
        MetricName::LatencyP99 => c.quantile_ms(0.99),
        MetricName::RequestRate => (seconds > 0.0).then(|| c.requests as f64 / seconds),
    }
}

fn judge_proxy(m: &Metric, name: MetricName, s: &Sample) -> MetricResult {
    let new = value(name, &s.new, s.seconds);
    let old = value(name, &s.old, s.seconds);
    let verdict = match new {
        None => Verdict::Inconclusive(format!("{}: no data on the new release", m.name)),
        Some(new) => {
            let r = Point {
                new,
                old: if s.old.requests > 0 { old } else { None },
                significant: worse_beyond_noise(m, name, s),
            };
            breach(m, &r).map_or(Verdict::Pass, Verdict::Fail)
        }
    };
    MetricResult {
        name: m.name.clone(),
        new,
        old,
        verdict,
    }
}

/// One metric's values in an interval, as its bounds judge them.
pub(crate) struct Point {
    /// The new release's value.
    pub new: f64,
    /// The old release's value on the same hosts, when there is a baseline to compare
    /// with (the old release had data).
    pub old: Option<f64>,
    /// The new release is worse beyond noise (always, without a judge).
    pub significant: bool,
}

/// Is "worse" beyond noise? Without a judge, any breach counts.
fn worse_beyond_noise(m: &Metric, name: MetricName, s: &Sample) -> bool {
    let alpha = 1.0 - m.confidence.unwrap_or(0.95);
    match (m.judge, name) {
        (None, _) => true,
        (Some(Judge::MannWhitney), MetricName::ErrorRate) => {
            two_proportion_greater(s.new.errors, s.new.requests, s.old.errors, s.old.requests)
                < alpha
        }
        (Some(Judge::MannWhitney), MetricName::RequestRate) => true,
        (Some(Judge::MannWhitney), _) => {
            mann_whitney_greater(&s.new.buckets, &s.old.buckets).1 < alpha
        }
    }
}

/// The bound the reading breaks, if any, said for people: `max`, `min`,
/// `max_vs_baseline`, `min_vs_baseline`, or — a judge without bounds — worse than the
/// baseline beyond noise.
pub(crate) fn breach(m: &Metric, r: &Point) -> Option<String> {
    let name = &m.name;
    let nv = r.new;
    if let Some(max) = m.max
        && nv > max
        && r.significant
    {
        let (v, max) = (fmt(name, nv), fmt(name, max));
        return Some(format!("{name} {v} above max {max}"));
    }
    if let Some(min) = m.min
        && nv < min
    {
        let (v, min) = (fmt(name, nv), fmt(name, min));
        return Some(format!("{name} {v} below min {min}"));
    }
    if let Some(why) = baseline_breach(m, r) {
        return Some(why);
    }
    let judge_only = m.judge.is_some()
        && m.max.is_none()
        && m.min.is_none()
        && m.max_vs_baseline.is_none()
        && m.min_vs_baseline.is_none();
    (judge_only && r.significant && r.old.is_some()).then(|| {
        format!(
            "{name} {} is worse than the baseline's {} beyond noise (confidence {})",
            fmt(name, nv),
            r.old.map_or("-".into(), |o| fmt(name, o)),
            m.confidence.unwrap_or(0.95)
        )
    })
}

/// `max_vs_baseline` and `min_vs_baseline`: the new value against the old one's on the
/// same hosts.
fn baseline_breach(m: &Metric, r: &Point) -> Option<String> {
    let ov = r.old?;
    if !r.significant {
        return None;
    }
    let name = &m.name;
    let nv = r.new;
    let times = |above: bool| {
        if ov > 0.0 {
            format!("{:.2}x", nv / ov)
        } else if above {
            "above a zero".into()
        } else {
            "below a zero".into()
        }
    };
    if let Some(ratio) = m.max_vs_baseline {
        // A baseline of zero (no errors) is honest data: any errors on the new slot are
        // then infinitely worse, not a division by zero.
        let worse = if ov <= 0.0 { nv > 0.0 } else { nv > ov * ratio };
        if worse {
            return Some(format!(
                "{name} {} is {} the baseline's {} (max_vs_baseline {ratio})",
                fmt(name, nv),
                times(true),
                fmt(name, ov)
            ));
        }
    }
    if let Some(ratio) = m.min_vs_baseline
        && ov > 0.0
        && nv < ov * ratio
    {
        return Some(format!(
            "{name} {} is {} the baseline's {} (min_vs_baseline {ratio})",
            fmt(name, nv),
            times(false),
            fmt(name, ov)
        ));
    }
    None
}

/// Standard normal upper tail, P(Z > z). Abramowitz & Stegun 7.1.26 (error < 1.5e-7).
pub fn normal_sf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erfc = poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * erfc
    } else {
        1.0 - 0.5 * erfc
    }
}

/// Mann-Whitney U test on two histograms over the same buckets, one-sided: is the new
/// distribution stochastically greater (slower) than the old? Returns (U of new, p).
/// Values in one bucket are ties; the normal approximation uses the tie correction and
/// a continuity correction. With no data on either side, p is 1.
pub fn mann_whitney_greater(new: &[u64], old: &[u64]) -> (f64, f64) {
    let n1: f64 = new.iter().sum::<u64>() as f64;
    let n2: f64 = old.iter().sum::<u64>() as f64;
    if n1 == 0.0 || n2 == 0.0 {
        return (0.0, 1.0);
    }
    let mut rank_sum_new = 0.0;
    let mut below = 0.0;
    let mut tie_term = 0.0;
    for i in 0..new.len().max(old.len()) {
        let a = new.get(i).copied().unwrap_or(0) as f64;
        let b = old.get(i).copied().unwrap_or(0) as f64;
        let t = a + b;
        if t == 0.0 {
            continue;
        }
        let avg_rank = below + (t + 1.0) / 2.0;
        rank_sum_new += a * avg_rank;
        tie_term += t * t * t - t;
        below += t;
    }
    let u = rank_sum_new - n1 * (n1 + 1.0) / 2.0;
    let n = n1 + n2;
    let mean = n1 * n2 / 2.0;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if var <= 0.0 {
        return (u, 1.0);
    }
    let z = (u - mean - 0.5) / var.sqrt();
    (u, normal_sf(z))
}

/// One-sided two-proportion z-test: is the new error rate greater than the old one?
/// Returns the p-value (1 when either side has no requests).
pub fn two_proportion_greater(x1: u64, n1: u64, x2: u64, n2: u64) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 1.0;
    }
    let (x1, n1, x2, n2) = (x1 as f64, n1 as f64, x2 as f64, n2 as f64);
    let p = (x1 + x2) / (n1 + n2);
    let se = (p * (1.0 - p) * (1.0 / n1 + 1.0 / n2)).sqrt();
    if se == 0.0 {
        return if x1 / n1 > x2 / n2 { 0.0 } else { 1.0 };
    }
    normal_sf((x1 / n1 - x2 / n2) / se)
}

#[cfg(test)]
mod tests;
