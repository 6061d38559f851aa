//! Judging a release by the golden signals the agents' proxies measure: each analysis
//! interval compares the new slot against the old slot on the same hosts in the same
//! interval (a live baseline). Pure functions, no IO.

use cutover_shared::plan::{Analysis, Judge, Metric, MetricName};
use serde::{Deserialize, Serialize};

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
    /// Shadow traffic only: copies whose answer could be compared with the live one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub compared: u64,
    /// Shadow traffic only: of those, copies answered with the live status class.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub matched: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Counters {
    pub fn from_pb(m: &cutover_proto::v1::SlotMetrics) -> Counters {
        Counters {
            requests: m.requests,
            errors: m.responses_5xx + m.upstream_failures,
            le_us: m.latency_bucket_le_us.clone(),
            buckets: m.latency_counts.clone(),
            compared: m.status_compared,
            matched: m.status_matched,
        }
    }

    /// What happened since `earlier`. A counter that went down means the slot's process
    /// (and its counters) started afresh: everything counted now is new.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let restarted = self.requests < earlier.requests
            || self.errors < earlier.errors
            || self.compared < earlier.compared
            || self.matched < earlier.matched
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
            compared: self.compared - earlier.compared,
            matched: self.matched - earlier.matched,
        }
    }

    pub fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.compared += other.compared;
        self.matched += other.matched;
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

    /// The share of compared copies answered with the live status class.
    pub fn status_match(&self) -> Option<f64> {
        (self.compared > 0).then(|| self.matched as f64 / self.compared as f64)
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
    /// The new release's slots: their live answers, or during shadow traffic their
    /// answers to the copies of live requests.
    pub new: Counters,
    /// The old release's slots on the same hosts: the live baseline.
    pub old: Counters,
    /// How long the interval ran, for rates.
    pub seconds: f64,
    /// The new release answered copies of live requests (shadow traffic): the only
    /// time `status_match` is measured.
    #[serde(default)]
    pub shadow: bool,
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
    pub name: MetricName,
    /// The new release's value (`None`: no data).
    pub new: Option<f64>,
    /// The old release's value on the same hosts (`None`: no data).
    pub old: Option<f64>,
    pub verdict: Verdict,
}

pub fn metric_name(m: MetricName) -> &'static str {
    match m {
        MetricName::ErrorRate => "error_rate",
        MetricName::LatencyP50 => "latency_p50",
        MetricName::LatencyP90 => "latency_p90",
        MetricName::LatencyP99 => "latency_p99",
        MetricName::RequestRate => "request_rate",
        MetricName::StatusMatch => "status_match",
    }
}

fn value(m: MetricName, c: &Counters, seconds: f64) -> Option<f64> {
    match m {
        MetricName::ErrorRate => c.error_rate(),
        MetricName::LatencyP50 => c.quantile_ms(0.50),
        MetricName::LatencyP90 => c.quantile_ms(0.90),
        MetricName::LatencyP99 => c.quantile_ms(0.99),
        MetricName::RequestRate => (seconds > 0.0).then(|| c.requests as f64 / seconds),
        MetricName::StatusMatch => c.status_match(),
    }
}

fn fmt(m: MetricName, v: f64) -> String {
    match m {
        MetricName::ErrorRate | MetricName::StatusMatch => format!("{:.2}%", v * 100.0),
        MetricName::RequestRate => format!("{v:.1}/s"),
        _ => format!("{v:.1}ms"),
    }
}

/// The unit of a metric's values: `ratio` (0 to 1), `ms` or `per_second`.
pub fn unit(m: MetricName) -> &'static str {
    match m {
        MetricName::ErrorRate | MetricName::StatusMatch => "ratio",
        MetricName::RequestRate => "per_second",
        MetricName::LatencyP50 | MetricName::LatencyP90 | MetricName::LatencyP99 => "ms",
    }
}

/// `latency_p99 212.0ms vs 180.5ms`: one judged metric, new against old, with units.
pub fn figure(m: &MetricResult) -> String {
    let v = |x: Option<f64>| x.map_or("-".to_string(), |x| fmt(m.name, x));
    format!("{} {} vs {}", metric_name(m.name), v(m.new), v(m.old))
}

/// Judges one interval against the plan's metrics.
pub fn judge(analysis: &Analysis, sample: &Sample) -> (Verdict, Vec<MetricResult>) {
    if sample.new.requests < analysis.min_requests {
        let why = format!(
            "{} requests on the new release, fewer than min_requests {}",
            sample.new.requests, analysis.min_requests
        );
        return (Verdict::Inconclusive(why), Vec::new());
    }
    // `status_match` compares copies with live answers: outside shadow traffic there
    // is nothing to compare, so it is not judged.
    let results: Vec<MetricResult> = analysis
        .metric
        .iter()
        .filter(|m| sample.shadow || m.name != MetricName::StatusMatch)
        .map(|m| judge_metric(m, sample))
        .collect();
    let verdict = results
        .iter()
        .find_map(|r| match &r.verdict {
            Verdict::Fail(why) => Some(Verdict::Fail(why.clone())),
            _ => None,
        })
        .unwrap_or(Verdict::Pass);
    (verdict, results)
}

fn judge_metric(m: &Metric, s: &Sample) -> MetricResult {
    let new = value(m.name, &s.new, s.seconds);
    let old = value(m.name, &s.old, s.seconds);
    let verdict = match new {
        None => Verdict::Inconclusive(format!(
            "{}: no data on the new release",
            metric_name(m.name)
        )),
        Some(new) => {
            let reading = Reading {
                new,
                old,
                baseline_requests: s.old.requests,
                significant: worse_beyond_noise(m, s),
            };
            breach(m, &reading).map_or(Verdict::Pass, Verdict::Fail)
        }
    };
    MetricResult {
        name: m.name,
        new,
        old,
        verdict,
    }
}

/// One metric's values in an interval, as its bounds judge them.
struct Reading {
    /// The new release's value.
    new: f64,
    /// The old release's value on the same hosts, if it had data.
    old: Option<f64>,
    /// Requests the old release served: without any there is no baseline.
    baseline_requests: u64,
    /// The new release is worse beyond noise (always, without a judge).
    significant: bool,
}

/// Is "worse" beyond noise? Without a judge, any breach counts.
fn worse_beyond_noise(m: &Metric, s: &Sample) -> bool {
    let alpha = 1.0 - m.confidence.unwrap_or(0.95);
    match (m.judge, m.name) {
        (None, _) => true,
        (Some(Judge::MannWhitney), MetricName::ErrorRate) => {
            two_proportion_greater(s.new.errors, s.new.requests, s.old.errors, s.old.requests)
                < alpha
        }
        (Some(Judge::MannWhitney), MetricName::RequestRate | MetricName::StatusMatch) => true,
        (Some(Judge::MannWhitney), _) => {
            mann_whitney_greater(&s.new.buckets, &s.old.buckets).1 < alpha
        }
    }
}

/// The bound the reading breaks, if any, said for people: `max`, `min`,
/// `max_vs_baseline`, or — a judge without bounds — worse than the baseline beyond noise.
fn breach(m: &Metric, r: &Reading) -> Option<String> {
    let name = metric_name(m.name);
    let nv = r.new;
    if let Some(max) = m.max
        && nv > max
        && r.significant
    {
        let (v, max) = (fmt(m.name, nv), fmt(m.name, max));
        return Some(format!("{name} {v} above max {max}"));
    }
    if let Some(min) = m.min
        && nv < min
    {
        let (v, min) = (fmt(m.name, nv), fmt(m.name, min));
        return Some(format!("{name} {v} below min {min}"));
    }
    if let Some(why) = baseline_breach(m, r) {
        return Some(why);
    }
    let judge_only =
        m.judge.is_some() && m.max.is_none() && m.min.is_none() && m.max_vs_baseline.is_none();
    (judge_only && r.significant && r.baseline_requests > 0).then(|| {
        format!(
            "{name} {} is worse than the baseline's {} beyond noise (confidence {})",
            fmt(m.name, nv),
            r.old.map_or("-".into(), |o| fmt(m.name, o)),
            m.confidence.unwrap_or(0.95)
        )
    })
}

/// `max_vs_baseline`: the new value against the old one's on the same hosts.
fn baseline_breach(m: &Metric, r: &Reading) -> Option<String> {
    let ratio = m.max_vs_baseline?;
    let ov = r.old?;
    if r.baseline_requests == 0 || !r.significant {
        return None;
    }
    let nv = r.new;
    // A baseline of zero (no errors) is honest data: any errors on the new slot are
    // then infinitely worse, not a division by zero.
    let worse = if ov <= 0.0 { nv > 0.0 } else { nv > ov * ratio };
    if !worse {
        return None;
    }
    let times = if ov > 0.0 {
        format!("{:.2}x", nv / ov)
    } else {
        "above a zero".into()
    };
    Some(format!(
        "{} {} is {times} the baseline's {} (max_vs_baseline {ratio})",
        metric_name(m.name),
        fmt(m.name, nv),
        fmt(m.name, ov)
    ))
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
