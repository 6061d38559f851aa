//! The values of a metric that does not come from the proxy, as an interval reads them:
//! each side (new release, old release) is a value, no data, or the source's failure,
//! with the counts behind the value when there are any (for the statistical judge). A
//! query that names `${HOST}` reads per host, and each host is judged on its own.
//!
//! No data, NaN, ±Inf or a failing source make the metric inconclusive, never a pass
//! (the new side always; the old side when a bound or judge compares with it).

use std::collections::BTreeMap;

use cutover_shared::plan::{Judge, Metric};
use serde::{Deserialize, Serialize};

use super::{MetricResult, Point, Verdict, breach, mann_whitney_greater, two_proportion_greater};

/// One side's value: `Err` when the source failed (why), `Ok(None)` without data.
pub type Side = Result<Option<f64>, String>;

/// The counts behind a pair of values, for `judge = "mann-whitney"`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Counts {
    /// A ratio's numerator and denominator per side: (failed, total).
    Proportion { new: (u64, u64), old: (u64, u64) },
    /// Observations per histogram bucket per side, over the same buckets.
    Buckets { new: Vec<u64>, old: Vec<u64> },
}

/// A metric's values, new against old.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Values {
    pub new: Side,
    pub old: Side,
    /// The counts behind them, when the source has counts.
    pub counts: Option<Counts>,
}

/// A metric's reading in one interval.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Reading {
    /// One pair of values for the whole step.
    Whole(Values),
    /// A pair per host (a query naming `${HOST}`), each judged on its own.
    PerHost(BTreeMap<String, Values>),
}

/// A query result the engine gathered off the decision loop, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// When the query was answered (unix ms): a result older than the interval's start
    /// does not speak for it.
    pub at_unix_ms: u64,
    pub reading: Reading,
}

/// The latest query result of each `source = "prometheus"` metric, by metric name.
pub type Queried = BTreeMap<String, Query>;

/// Judges metric `m` on its reading (`None`: nothing was read in the interval).
pub fn judge(m: &Metric, reading: Option<&Reading>) -> MetricResult {
    let inconclusive = |why: String| MetricResult {
        name: m.name.clone(),
        new: None,
        old: None,
        verdict: Verdict::Inconclusive(format!("{}: {why}", m.name)),
    };
    match reading {
        None => inconclusive("no data in this interval".into()),
        Some(Reading::Whole(v)) => {
            let (new, old, verdict) = judge_values(m, v);
            MetricResult {
                name: m.name.clone(),
                new,
                old,
                verdict: verdict.map_or(Verdict::Pass, |v| prefixed(v, &m.name, None)),
            }
        }
        Some(Reading::PerHost(hosts)) if hosts.is_empty() => {
            inconclusive("no host serves the new release".into())
        }
        Some(Reading::PerHost(hosts)) => per_host(m, hosts),
    }
}

/// Each host judged on its own: the first failing or inconclusive host decides, named;
/// the values shown are the means over the hosts with data.
fn per_host(m: &Metric, hosts: &BTreeMap<String, Values>) -> MetricResult {
    let mut news = Vec::new();
    let mut olds = Vec::new();
    let mut fail = None;
    let mut unknown = None;
    for (host, v) in hosts {
        let (new, old, verdict) = judge_values(m, v);
        news.extend(new);
        olds.extend(old);
        match verdict {
            Some(f @ Verdict::Fail(_)) => {
                fail.get_or_insert_with(|| prefixed(f, &m.name, Some(host)));
            }
            Some(i) => {
                unknown.get_or_insert_with(|| prefixed(i, &m.name, Some(host)));
            }
            None => {}
        }
    }
    let mean = |xs: &[f64]| (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64);
    MetricResult {
        name: m.name.clone(),
        new: mean(&news),
        old: mean(&olds),
        verdict: fail.or(unknown).unwrap_or(Verdict::Pass),
    }
}

/// `why` said of metric `name` (on `host`), unless it already names the metric.
fn prefixed(v: Verdict, name: &str, host: Option<&str>) -> Verdict {
    let on = host.map_or(String::new(), |h| format!(" on host {h}"));
    let say = |w: String| {
        if w.starts_with(name) {
            match host {
                Some(_) => format!("{w}{on}"),
                None => w,
            }
        } else {
            format!("{name}{on}: {w}")
        }
    };
    match v {
        Verdict::Fail(w) => Verdict::Fail(say(w)),
        Verdict::Inconclusive(w) => Verdict::Inconclusive(say(w)),
        Verdict::Pass => Verdict::Pass,
    }
}

/// (new, old, verdict unless a pass) of one pair of values.
fn judge_values(m: &Metric, v: &Values) -> (Option<f64>, Option<f64>, Option<Verdict>) {
    let new = match number(&v.new, "the new release") {
        Ok(Some(x)) => x,
        Ok(None) => {
            let why = "no data on the new release".to_string();
            return (None, None, Some(Verdict::Inconclusive(why)));
        }
        Err(why) => return (None, None, Some(Verdict::Inconclusive(why))),
    };
    let compares = m.max_vs_baseline.is_some() || m.min_vs_baseline.is_some() || m.judge.is_some();
    let old = match number(&v.old, "the old release") {
        Ok(o) => o,
        Err(why) if compares => return (Some(new), None, Some(Verdict::Inconclusive(why))),
        Err(_) => None,
    };
    let point = Point {
        new,
        old,
        significant: significant(m, v.counts.as_ref()),
    };
    let verdict = breach(m, &point).map(Verdict::Fail);
    (Some(new), old, verdict)
}

/// A side's finite value, no data, or why it cannot be used (a failed source, NaN, ±Inf).
fn number(side: &Side, which: &str) -> Result<Option<f64>, String> {
    match side {
        Err(e) => Err(e.clone()),
        Ok(Some(x)) if !x.is_finite() => Err(format!("{x} on {which}, not a number to judge")),
        Ok(x) => Ok(*x),
    }
}

/// Is "worse" beyond noise? Without a judge (or without counts), any breach counts.
fn significant(m: &Metric, counts: Option<&Counts>) -> bool {
    let alpha = 1.0 - m.confidence.unwrap_or(0.95);
    match (m.judge, counts) {
        (Some(Judge::MannWhitney), Some(Counts::Proportion { new, old })) => {
            two_proportion_greater(new.0, new.1, old.0, old.1) < alpha
        }
        (Some(Judge::MannWhitney), Some(Counts::Buckets { new, old })) => {
            mann_whitney_greater(new, old).1 < alpha
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_shared::plan::{SlotMeasure, Source};

    fn metric(name: &str) -> Metric {
        let mut m = Metric::proxy(cutover_shared::plan::MetricName::ErrorRate);
        m.name = name.into();
        m.source = Source::Prometheus;
        m.query = Some("q".into());
        m
    }

    fn whole(new: Side, old: Side) -> Reading {
        Reading::Whole(Values {
            new,
            old,
            counts: None,
        })
    }

    #[test]
    fn no_data_nan_infinity_and_errors_are_inconclusive_never_a_pass() {
        let m = Metric {
            max: Some(1.0),
            ..metric("orders")
        };
        let cases = [
            (None, "orders: no data in this interval"),
            (
                Some(whole(Ok(None), Ok(Some(1.0)))),
                "orders: no data on the new release",
            ),
            (
                Some(whole(Ok(Some(f64::NAN)), Ok(Some(1.0)))),
                "orders: NaN on the new release, not a number to judge",
            ),
            (
                Some(whole(Ok(Some(f64::INFINITY)), Ok(None))),
                "orders: inf on the new release",
            ),
            (
                Some(whole(
                    Err("prometheus: connection refused".into()),
                    Ok(None),
                )),
                "orders: prometheus: connection refused",
            ),
        ];
        for (reading, want) in cases {
            let r = judge(&m, reading.as_ref());
            match r.verdict {
                Verdict::Inconclusive(w) => assert!(w.starts_with(want), "{w} / {want}"),
                v => panic!("{v:?} for {reading:?}"),
            }
        }
        // The old side matters only when a bound compares with it.
        let r = judge(&m, Some(&whole(Ok(Some(0.5)), Err("down".into()))));
        assert_eq!(r.verdict, Verdict::Pass);
        let vs = Metric {
            min_vs_baseline: Some(0.8),
            ..metric("orders")
        };
        let r = judge(&vs, Some(&whole(Ok(Some(0.5)), Err("down".into()))));
        assert!(matches!(r.verdict, Verdict::Inconclusive(_)), "{r:?}");
    }

    #[test]
    fn bounds_judge_new_against_old() {
        let m = Metric {
            min_vs_baseline: Some(0.8),
            ..metric("orders per second")
        };
        let r = judge(&m, Some(&whole(Ok(Some(5.0)), Ok(Some(10.0)))));
        assert_eq!(
            r.verdict,
            Verdict::Fail(
                "orders per second 5 is 0.50x the baseline's 10 (min_vs_baseline 0.8)".into()
            )
        );
        assert_eq!((r.new, r.old), (Some(5.0), Some(10.0)));
        let r = judge(&m, Some(&whole(Ok(Some(9.0)), Ok(Some(10.0)))));
        assert_eq!(r.verdict, Verdict::Pass);
    }

    #[test]
    fn per_host_readings_name_the_host_that_fails() {
        let m = Metric {
            max: Some(0.1),
            ..metric("failures")
        };
        let v = |new: f64| Values {
            new: Ok(Some(new)),
            old: Ok(Some(0.0)),
            counts: None,
        };
        let hosts = [
            ("web-1".to_string(), v(0.05)),
            ("web-2".to_string(), v(0.25)),
        ]
        .into();
        let r = judge(&m, Some(&Reading::PerHost(hosts)));
        assert_eq!(
            r.verdict,
            Verdict::Fail("failures 0.25 above max 0.1 on host web-2".into())
        );
        assert_eq!(r.new, Some(0.15));
    }

    #[test]
    fn the_statistical_judge_uses_the_counts() {
        let mut m = metric("payment failures");
        m.source = Source::Slot;
        m.query = None;
        m.ratio = Some(vec!["f".into(), "t".into()]);
        m.max_vs_baseline = Some(1.0);
        m.judge = Some(Judge::MannWhitney);
        assert!(matches!(
            m.measure(),
            Some(cutover_shared::plan::Measure::Slot(
                SlotMeasure::Ratio(..),
                _
            ))
        ));
        let reading = |new: (u64, u64), old: (u64, u64)| {
            Reading::Whole(Values {
                new: Ok(Some(new.0 as f64 / new.1 as f64)),
                old: Ok(Some(old.0 as f64 / old.1 as f64)),
                counts: Some(Counts::Proportion { new, old }),
            })
        };
        let noise = judge(&m, Some(&reading((5, 1000), (4, 1000))));
        assert_eq!(noise.verdict, Verdict::Pass);
        let real = judge(&m, Some(&reading((30, 100), (10, 100))));
        assert!(matches!(real.verdict, Verdict::Fail(_)), "{real:?}");
    }
}
