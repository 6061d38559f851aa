use super::*;
use cutover_shared::plan::{Analysis, Judge, Metric, MetricName};

const LE: [u64; 5] = [1_000, 2_000, 5_000, 10_000, u64::MAX];

fn counters(requests: u64, errors: u64, buckets: [u64; 5]) -> Counters {
    Counters {
        requests,
        errors,
        le_us: LE.to_vec(),
        buckets: buckets.to_vec(),
    }
}

fn metric(name: MetricName) -> Metric {
    Metric::proxy(name)
}

fn analysis(metrics: Vec<Metric>) -> Analysis {
    Analysis {
        interval: cutover_shared::Duration::from_secs(10),
        failure_limit: 2,
        min_requests: 50,
        inconclusive_limit: 3,
        scrape: None,
        prometheus: None,
        metric: metrics,
    }
}

// Reference values: scipy.stats.mannwhitneyu(new, old, alternative="greater",
// use_continuity=True, method="asymptotic") on the histograms expanded to samples
// (bucket index as the value), scipy 1.17.1.
#[test]
fn mann_whitney_matches_reference() {
    let cases: [([u64; 5], [u64; 5], f64, f64); 3] = [
        (
            [0, 5, 10, 5, 0],
            [0, 10, 5, 5, 0],
            237.5,
            0.14293101985591705,
        ),
        (
            [1, 2, 3, 4, 5],
            [5, 4, 3, 2, 1],
            172.5,
            0.005910620343675633,
        ),
        (
            [0, 0, 3, 7, 10],
            [10, 7, 3, 0, 0],
            395.5,
            3.3901851046456955e-08,
        ),
    ];
    for (new, old, u_ref, p_ref) in cases {
        let (u, p) = mann_whitney_greater(&new, &old);
        assert!((u - u_ref).abs() < 1e-9, "U {u} vs {u_ref}");
        assert!((p - p_ref).abs() < 1e-6 + p_ref * 1e-4, "p {p} vs {p_ref}");
    }
    let (u, p) = mann_whitney_greater(&[2, 2, 2, 2], &[2, 2, 2, 2]);
    assert_eq!(u, 32.0);
    assert!((p - 0.5215828453290823).abs() < 1e-6, "{p}");
    assert_eq!(mann_whitney_greater(&[0, 0], &[1, 2]).1, 1.0);
}

// Reference: scipy.stats.norm.sf of the pooled two-proportion z statistic.
#[test]
fn two_proportion_matches_reference() {
    assert!((two_proportion_greater(30, 100, 10, 100) - 0.00020347600872247987).abs() < 1e-7);
    assert!((two_proportion_greater(5, 1000, 4, 1000) - 0.3691573795569618).abs() < 1e-6);
    assert_eq!(two_proportion_greater(0, 100, 0, 100), 1.0);
    assert_eq!(two_proportion_greater(3, 100, 0, 0), 1.0);
    assert!((normal_sf(1.6448536269514722) - 0.05).abs() < 1e-6);
    assert!((normal_sf(-0.5) - 0.6914624612740131).abs() < 1e-6);
}

#[test]
fn quantiles_interpolate_inside_buckets() {
    let c = counters(100, 0, [50, 50, 0, 0, 0]);
    assert!((c.quantile_ms(0.5).unwrap() - 1.0).abs() < 1e-9);
    assert!((c.quantile_ms(0.99).unwrap() - 1.98).abs() < 1e-9);
    assert_eq!(counters(0, 0, [0; 5]).quantile_ms(0.5), None);
}

#[test]
fn since_handles_restarted_counters() {
    let a = counters(100, 5, [50, 50, 0, 0, 0]);
    let b = counters(150, 6, [70, 80, 0, 0, 0]);
    assert_eq!(b.since(&a), counters(50, 1, [20, 30, 0, 0, 0]));
    let restarted = counters(10, 0, [10, 0, 0, 0, 0]);
    assert_eq!(restarted.since(&b), restarted);
}

#[test]
fn thin_interval_is_inconclusive() {
    let a = analysis(vec![Metric {
        max: Some(0.01),
        ..metric(MetricName::ErrorRate)
    }]);
    let s = Sample {
        new: counters(10, 10, [10, 0, 0, 0, 0]),
        old: counters(1000, 0, [1000, 0, 0, 0, 0]),
        seconds: 10.0,
        ..Sample::default()
    };
    assert!(matches!(judge(&a, &s).0, Verdict::Inconclusive(_)));
}

#[test]
fn bounds_and_baseline() {
    let a = analysis(vec![
        Metric {
            max: Some(0.05),
            ..metric(MetricName::ErrorRate)
        },
        Metric {
            max_vs_baseline: Some(1.5),
            ..metric(MetricName::LatencyP99)
        },
    ]);
    let healthy = Sample {
        new: counters(100, 1, [100, 0, 0, 0, 0]),
        old: counters(900, 9, [900, 0, 0, 0, 0]),
        seconds: 10.0,
        ..Sample::default()
    };
    assert_eq!(judge(&a, &healthy).0, Verdict::Pass);

    let errors = Sample {
        new: counters(100, 30, [100, 0, 0, 0, 0]),
        ..healthy.clone()
    };
    match judge(&a, &errors).0 {
        Verdict::Fail(why) => assert!(why.contains("error_rate 30.00% above max 5.00%"), "{why}"),
        v => panic!("{v:?}"),
    }

    let slow = Sample {
        new: counters(100, 0, [0, 0, 0, 100, 0]),
        ..healthy.clone()
    };
    match judge(&a, &slow).0 {
        Verdict::Fail(why) => assert!(
            why.contains("latency_p99") && why.contains("baseline"),
            "{why}"
        ),
        v => panic!("{v:?}"),
    }
}

#[test]
fn errors_against_a_clean_baseline_fail_without_dividing_by_zero() {
    let a = analysis(vec![Metric {
        max_vs_baseline: Some(2.0),
        ..metric(MetricName::ErrorRate)
    }]);
    let s = Sample {
        new: counters(100, 3, [100, 0, 0, 0, 0]),
        old: counters(900, 0, [900, 0, 0, 0, 0]),
        seconds: 10.0,
        ..Sample::default()
    };
    assert!(matches!(judge(&a, &s).0, Verdict::Fail(_)));
    // At 100 % there is no baseline traffic: only absolute bounds apply.
    let s = Sample {
        new: counters(100, 3, [100, 0, 0, 0, 0]),
        old: Counters::default(),
        seconds: 10.0,
        ..Sample::default()
    };
    assert_eq!(judge(&a, &s).0, Verdict::Pass);
}

#[test]
fn judge_ignores_noise_but_catches_real_regressions() {
    let a = analysis(vec![Metric {
        max_vs_baseline: Some(1.0),
        judge: Some(Judge::MannWhitney),
        confidence: Some(0.95),
        ..metric(MetricName::ErrorRate)
    }]);
    // 5/1000 vs 4/1000: higher, but not beyond noise.
    let noise = Sample {
        new: counters(1000, 5, [1000, 0, 0, 0, 0]),
        old: counters(1000, 4, [1000, 0, 0, 0, 0]),
        seconds: 10.0,
        ..Sample::default()
    };
    assert_eq!(judge(&a, &noise).0, Verdict::Pass);
    let real = Sample {
        new: counters(100, 30, [100, 0, 0, 0, 0]),
        old: counters(100, 10, [100, 0, 0, 0, 0]),
        seconds: 10.0,
        ..Sample::default()
    };
    assert!(matches!(judge(&a, &real).0, Verdict::Fail(_)));
}
