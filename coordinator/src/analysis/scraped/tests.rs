use super::*;
use cutover_shared::plan::{Metric, MetricName, Source};
use proptest::prelude::*;

fn slot_metric(name: &str, f: impl FnOnce(&mut Metric)) -> Metric {
    let mut m = Metric::proxy(MetricName::ErrorRate);
    m.name = name.into();
    m.source = Source::Slot;
    m.max = Some(1.0);
    f(&mut m);
    m
}

fn analysis(metrics: Vec<Metric>) -> Analysis {
    Analysis {
        interval: cutover_shared::Duration::from_secs(10),
        failure_limit: 1,
        min_requests: 0,
        inconclusive_limit: 3,
        scrape: None,
        prometheus: None,
        metric: metrics,
    }
}

fn payments() -> Metric {
    slot_metric("payment failure rate", |m| {
        m.ratio = Some(vec![
            "payments_failed_total".into(),
            "payments_total".into(),
        ]);
    })
}

fn scrape(seq: u64, failed: f64, total: f64) -> Scrape {
    let sel = BTreeMap::new();
    Scrape {
        seq,
        error: None,
        values: [
            (
                key("payments_failed_total", &sel, false),
                Some(Series::Sum(failed)),
            ),
            (key("payments_total", &sel, false), Some(Series::Sum(total))),
        ]
        .into(),
    }
}

fn whole(r: &Reading) -> &Values {
    match r {
        Reading::Whole(v) => v,
        Reading::PerHost(_) => panic!("per host"),
    }
}

#[test]
fn a_ratio_sums_increases_over_hosts_and_sides() {
    let a = analysis(vec![payments()]);
    let (s1, e1) = (scrape(1, 10.0, 100.0), scrape(5, 40.0, 200.0));
    let (s2, e2) = (scrape(1, 0.0, 0.0), scrape(4, 20.0, 100.0));
    let (o1, p1) = (scrape(1, 5.0, 1000.0), scrape(5, 7.0, 2000.0));
    let span = |s, e| Span {
        start: Some(s),
        end: Some(e),
    };
    let hosts = [
        HostSpan {
            host: "web-1",
            new: span(&s1, &e1),
            old: Some(span(&o1, &p1)),
        },
        HostSpan {
            host: "web-2",
            new: span(&s2, &e2),
            old: None,
        },
    ];
    let r = readings(&a, &hosts, 10.0);
    let v = whole(&r["payment failure rate"]);
    assert_eq!(v.new, Ok(Some(50.0 / 200.0)));
    assert_eq!(v.old, Ok(Some(2.0 / 1000.0)));
    assert_eq!(
        v.counts,
        Some(Counts::Proportion {
            new: (50, 200),
            old: (2, 1000)
        })
    );
}

#[test]
fn a_counter_that_went_down_was_reset_by_a_restart() {
    assert_eq!(
        sum_increase(&Series::Sum(30.0), Some(&Series::Sum(10.0))),
        20.0
    );
    assert_eq!(
        sum_increase(&Series::Sum(4.0), Some(&Series::Sum(100.0))),
        4.0
    );
    assert_eq!(sum_increase(&Series::Sum(4.0), None), 4.0, "a new series");
    let a = analysis(vec![slot_metric("orders", |m| {
        m.counter = Some("orders_total".into())
    })]);
    let sel = BTreeMap::new();
    let k = key("orders_total", &sel, false);
    let at = |seq, v| Scrape {
        seq,
        error: None,
        values: [(k.clone(), Some(Series::Sum(v)))].into(),
    };
    let (start, end) = (at(3, 500.0), at(1, 40.0));
    let hosts = [HostSpan {
        host: "web-1",
        new: Span {
            start: Some(&start),
            end: Some(&end),
        },
        old: None,
    }];
    let r = readings(&a, &hosts, 10.0);
    assert_eq!(
        whole(&r["orders"]).new,
        Ok(Some(4.0)),
        "40 new orders in 10 s"
    );
}

#[test]
fn failed_stale_or_missing_scrapes_are_no_value() {
    let a = analysis(vec![payments()]);
    let good = scrape(1, 0.0, 10.0);
    let same = scrape(1, 1.0, 20.0);
    let failed = Scrape {
        seq: 2,
        error: Some("GET /metrics: 500".into()),
        values: BTreeMap::new(),
    };
    let empty = Scrape {
        seq: 2,
        error: None,
        values: BTreeMap::new(),
    };
    let new_side = |start: Option<&Scrape>, end: Option<&Scrape>| {
        let hosts = [HostSpan {
            host: "web-1",
            new: Span { start, end },
            old: None,
        }];
        whole(&readings(&a, &hosts, 1.0)["payment failure rate"])
            .new
            .clone()
    };
    assert_eq!(
        new_side(Some(&good), Some(&failed)),
        Err("scrape of the new slot on host web-1 failed: GET /metrics: 500".into())
    );
    assert_eq!(
        new_side(Some(&good), Some(&same)),
        Err("no new scrape of the new slot on host web-1 in this interval".into())
    );
    assert_eq!(
        new_side(None, Some(&same)),
        Err("no scrape of the new slot on host web-1 at the interval's start".into())
    );
    assert_eq!(
        new_side(Some(&good), None),
        Err("the new slot on host web-1 has not been scraped".into())
    );
    assert_eq!(new_side(Some(&good), Some(&empty)), Ok(None), "no series");
    let no_payments = scrape(2, 0.0, 10.0);
    assert_eq!(new_side(Some(&good), Some(&no_payments)), Ok(None), "0 / 0");
}

#[test]
fn a_gauge_is_its_last_value_summed_over_hosts() {
    let a = analysis(vec![slot_metric("queue", |m| {
        m.gauge = Some("queue_depth".into())
    })]);
    let sel = BTreeMap::new();
    let at = |v| Scrape {
        seq: 9,
        error: None,
        values: [(key("queue_depth", &sel, false), Some(Series::Sum(v)))].into(),
    };
    let (a1, a2) = (at(3.0), at(4.0));
    let span = |e| Span {
        start: None,
        end: Some(e),
    };
    let hosts = [
        HostSpan {
            host: "web-1",
            new: span(&a1),
            old: Some(span(&a2)),
        },
        HostSpan {
            host: "web-2",
            new: span(&a2),
            old: Some(span(&a1)),
        },
    ];
    let r = readings(&a, &hosts, 1.0);
    assert_eq!(whole(&r["queue"]).new, Ok(Some(7.0)));
    assert_eq!(whole(&r["queue"]).old, Ok(Some(7.0)));
}

#[test]
fn series_are_asked_for_once_with_their_labels() {
    let card = slot_metric("card", |m| {
        m.counter = Some("payments_total".into());
        m.labels = [("method".to_string(), "card".to_string())].into();
    });
    let h = slot_metric("p99", |m| {
        m.histogram = Some("checkout_seconds".into());
        m.quantile = Some(0.99);
    });
    let s = series(&analysis(vec![payments(), card, h, payments()]));
    let keys: Vec<&str> = s.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "payments_failed_total{}",
            "payments_total{}",
            "payments_total{method=\"card\"}",
            "checkout_seconds_bucket{}"
        ]
    );
    assert!(s[3].histogram && s[2].labels["method"] == "card");
}

#[test]
fn histogram_buckets_reset_when_they_go_down_or_change_bounds() {
    let before = [(0.1, 5.0), (1.0, 8.0), (f64::INFINITY, 10.0)];
    let now = [(0.1, 7.0), (1.0, 12.0), (f64::INFINITY, 20.0)];
    assert_eq!(
        buckets_increase(&now, Some(&before)),
        [(0.1, 2.0), (1.0, 4.0), (f64::INFINITY, 10.0)]
    );
    let restarted = [(0.1, 1.0), (1.0, 1.0), (f64::INFINITY, 2.0)];
    assert_eq!(buckets_increase(&restarted, Some(&before)), restarted);
    let other = [(0.5, 9.0), (f64::INFINITY, 30.0)];
    assert_eq!(buckets_increase(&other, Some(&before)), other);
}

/// Bounds of the test histograms, seconds.
const BOUNDS: [f64; 6] = [0.005, 0.01, 0.05, 0.1, 0.5, 1.0];

/// Cumulative buckets (with +Inf) of `values`.
fn cumulative(values: &[f64]) -> Vec<(f64, f64)> {
    BOUNDS
        .iter()
        .chain([f64::INFINITY].iter())
        .map(|le| (*le, values.iter().filter(|v| **v <= *le).count() as f64))
        .collect()
}

/// Where the q quantile of `values` falls: the bounds of the bucket holding the
/// observation of rank ceil(q * n), computed from the values themselves.
fn bucket_of_rank(q: f64, values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    let v = sorted[rank - 1];
    let mut lo = 0.0;
    for le in BOUNDS {
        if v <= le {
            return (lo, le);
        }
        lo = le;
    }
    (lo, lo)
}

proptest! {
    /// The quantile of an interval, from the increase of cumulative buckets between two
    /// scrapes, falls in the bucket that holds that rank among the interval's own
    /// observations — whatever was observed before the interval.
    #[test]
    fn quantiles_from_bucket_increases_match_the_observations(
        before in proptest::collection::vec(0.0f64..0.8, 0..50),
        during in proptest::collection::vec(0.0f64..0.8, 1..200),
        q in 0.01f64..0.99,
    ) {
        let start = cumulative(&before);
        let all: Vec<f64> = before.iter().chain(&during).copied().collect();
        let end = cumulative(&all);
        let increase = buckets_increase(&end, Some(&start));
        prop_assert_eq!(&increase, &cumulative(&during));
        let got = bucket_quantile(q, &increase).expect("observations");
        let (lo, hi) = bucket_of_rank(q, &during);
        prop_assert!(got >= lo - 1e-9 && got <= hi + 1e-9, "{} not in [{}, {}]", got, lo, hi);
    }

    /// Counters across any number of restarts never count less than what was added
    /// since the last restart, nor negative.
    #[test]
    fn counter_increases_are_never_negative(now in 0.0f64..1e9, before in 0.0f64..1e9) {
        let inc = sum_increase(&Series::Sum(now), Some(&Series::Sum(before)));
        prop_assert!(inc >= 0.0);
        prop_assert!(inc == now - before || inc == now);
    }
}

#[test]
fn scrapes_with_infinite_bounds_and_nan_survive_the_record() {
    let s = Scrape {
        seq: 3,
        error: None,
        values: [
            (
                "h".to_string(),
                Some(Series::Buckets(vec![(0.1, 1.0), (f64::INFINITY, 2.0)])),
            ),
            ("g".to_string(), Some(Series::Sum(f64::NEG_INFINITY))),
            ("n".to_string(), None),
        ]
        .into(),
    };
    let text = serde_json::to_string(&s).unwrap();
    assert!(text.contains("\"+Inf\""), "{text}");
    let back: Scrape = serde_json::from_str(&text).unwrap();
    assert_eq!(back, s);
    let nan: Scrape = serde_json::from_str(
        &serde_json::to_string(&Scrape {
            values: [("x".to_string(), Some(Series::Sum(f64::NAN)))].into(),
            ..Scrape::default()
        })
        .unwrap(),
    )
    .unwrap();
    assert!(matches!(nan.values["x"], Some(Series::Sum(v)) if v.is_nan()));
}
