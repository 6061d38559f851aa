use super::*;
use proptest::prelude::*;

/// The example from the format's documentation.
const SPEC_EXAMPLE: &str = r#"# HELP http_requests_total The total number of HTTP requests.
# TYPE http_requests_total counter
http_requests_total{method="post",code="200"} 1027 1395066363000
http_requests_total{method="post",code="400"}    3 1395066363000

# Escaping in label values:
msdos_file_access_time_seconds{path="C:\\DIR\\FILE.TXT",error="Cannot find file:\n\"FILE.TXT\""} 1.458255915e9

# Minimalistic line:
metric_without_timestamp_and_labels 12.47

# A weird metric from before the epoch:
something_weird{problem="division by zero"} +Inf -3982045

# A histogram, which has a pretty complex representation in the text format:
# HELP http_request_duration_seconds A histogram of the request duration.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.05"} 24054
http_request_duration_seconds_bucket{le="0.1"} 33444
http_request_duration_seconds_bucket{le="0.2"} 100392
http_request_duration_seconds_bucket{le="0.5"} 129389
http_request_duration_seconds_bucket{le="1"} 133988
http_request_duration_seconds_bucket{le="+Inf"} 144320
http_request_duration_seconds_sum 53423
http_request_duration_seconds_count 144320

# Finally a summary, which has a complex representation, too:
# HELP rpc_duration_seconds A summary of the RPC duration in seconds.
# TYPE rpc_duration_seconds summary
rpc_duration_seconds{quantile="0.01"} 3102
rpc_duration_seconds{quantile="0.05"} 3272
rpc_duration_seconds{quantile="0.5"} 4773
rpc_duration_seconds{quantile="0.9"} 9001
rpc_duration_seconds{quantile="0.99"} 76656
rpc_duration_seconds_sum 1.7560473e+07
rpc_duration_seconds_count 2693
"#;

fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_documented_example_parses_to_what_it_says() {
    let e = parse(SPEC_EXAMPLE).unwrap();
    assert_eq!(e.samples.len(), 20);
    assert_eq!(e.types["http_requests_total"], MetricType::Counter);
    assert_eq!(
        e.types["http_request_duration_seconds"],
        MetricType::Histogram
    );
    assert_eq!(e.types["rpc_duration_seconds"], MetricType::Summary);
    assert_eq!(
        e.samples[0],
        Sample {
            name: "http_requests_total".into(),
            labels: vec![
                ("method".into(), "post".into()),
                ("code".into(), "200".into())
            ],
            value: 1027.0,
            timestamp_ms: Some(1_395_066_363_000),
        }
    );
    assert_eq!(
        e.samples[2].labels,
        vec![
            ("path".to_string(), r"C:\DIR\FILE.TXT".to_string()),
            (
                "error".to_string(),
                "Cannot find file:\n\"FILE.TXT\"".to_string()
            )
        ]
    );
    assert_eq!(e.samples[2].value, 1.458255915e9);
    assert_eq!(e.samples[3].value, 12.47);
    assert_eq!(e.samples[4].value, f64::INFINITY);
    assert_eq!(e.samples[4].timestamp_ms, Some(-3_982_045));
    assert_eq!(e.sum("http_requests_total", &sel(&[])), Some(1030.0));
    assert_eq!(
        e.sum("http_requests_total", &sel(&[("code", "400")])),
        Some(3.0)
    );
    assert_eq!(e.sum("http_requests_total", &sel(&[("code", "500")])), None);
    assert_eq!(e.sum("no_such_metric", &sel(&[])), None);
    let h = e
        .histogram("http_request_duration_seconds", &sel(&[]))
        .unwrap();
    assert_eq!(h.len(), 6);
    assert_eq!(h[0], (0.05, 24054.0));
    assert_eq!(h[5], (f64::INFINITY, 144_320.0));
}

#[test]
fn nan_and_signed_infinities_are_values() {
    let e = parse("a NaN\nb -Inf\nc +Inf 5\nd 1e-3\ne -0.5\n").unwrap();
    assert!(e.samples[0].value.is_nan());
    assert_eq!(e.samples[1].value, f64::NEG_INFINITY);
    assert_eq!(e.samples[2].value, f64::INFINITY);
    assert_eq!(e.samples[3].value, 0.001);
    assert_eq!(e.samples[4].value, -0.5);
}

#[test]
fn blanks_windows_line_ends_and_a_trailing_comma_are_accepted() {
    let e = parse("\t x{a=\"1\" , b = \"2\",} 3 \r\n\n# just a comment\n").unwrap();
    assert_eq!(e.samples.len(), 1);
    assert_eq!(e.samples[0].labels.len(), 2);
    assert_eq!(e.samples[0].value, 3.0);
}

#[test]
fn lines_outside_the_format_are_errors_that_name_the_line() {
    for (text, line, says) in [
        ("ok 1\n9bad 1\n", 2, "metric name"),
        ("x{a=1} 2\n", 1, "double quotes"),
        ("x{a=\"1} 2\n", 1, "not closed"),
        ("x{a=\"\\q\"} 2\n", 1, "unknown escape"),
        ("x{a=\"1\" b=\"2\"} 2\n", 1, "expected ','"),
        ("x{a=\"1\",a=\"2\"} 2\n", 1, "twice"),
        ("x\n", 1, "no value"),
        ("x one\n", 1, "not a number"),
        ("x inf\n", 1, "not a number"),
        ("x 1 2.5\n", 1, "timestamp"),
        ("x 1 2 3\n", 1, "unexpected"),
        ("# TYPE x countre\n", 1, "unknown type"),
        ("# TYPE 1x counter\n", 1, "not a metric name"),
        ("x{1a=\"b\"} 1\n", 1, "label name"),
    ] {
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, line, "{text:?}: {e}");
        assert!(e.message.contains(says), "{text:?}: {e}");
    }
}

#[test]
fn summed_series_and_histograms_follow_the_selector() {
    let text = "\
req_bucket{route=\"/a\",le=\"0.1\"} 1
req_bucket{route=\"/a\",le=\"1\"} 3
req_bucket{route=\"/a\",le=\"+Inf\"} 4
req_bucket{route=\"/b\",le=\"0.1\"} 10
req_bucket{route=\"/b\",le=\"1\"} 10
req_bucket{route=\"/b\",le=\"+Inf\"} 10
";
    let e = parse(text).unwrap();
    assert_eq!(
        e.histogram("req", &sel(&[])).unwrap(),
        vec![(0.1, 11.0), (1.0, 13.0), (f64::INFINITY, 14.0)]
    );
    assert_eq!(
        e.histogram("req", &sel(&[("route", "/a")])).unwrap(),
        vec![(0.1, 1.0), (1.0, 3.0), (f64::INFINITY, 4.0)]
    );
    assert!(e.histogram("req", &sel(&[("route", "/c")])).is_none());
    let bad = parse("req_bucket{le=\"x\"} 1\n").unwrap();
    assert!(bad.histogram("req", &sel(&[])).is_none());
}

#[test]
fn quantiles_interpolate_inside_their_bucket() {
    let b = [(1.0, 10.0), (2.0, 20.0), (f64::INFINITY, 20.0)];
    assert_eq!(bucket_quantile(0.5, &b), Some(1.0));
    assert_eq!(bucket_quantile(0.75, &b), Some(1.5));
    assert_eq!(bucket_quantile(0.25, &b), Some(0.5));
    assert_eq!(
        bucket_quantile(0.99, &[(1.0, 0.0), (f64::INFINITY, 5.0)]),
        Some(1.0),
        "a quantile in +Inf is the highest finite bound"
    );
    assert_eq!(
        bucket_quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]),
        None
    );
    assert_eq!(bucket_quantile(0.5, &[]), None);
}

#[test]
fn a_large_exposition_parses() {
    let mut text = String::new();
    for i in 0..50_000 {
        text.push_str(&format!("series_{}{{shard=\"{i}\"}} {i}\n", i % 7));
    }
    let e = parse(&text).unwrap();
    assert_eq!(e.samples.len(), 50_000);
    assert_eq!(
        e.sum("series_3", &sel(&[])),
        Some((0..50_000).filter(|i| i % 7 == 3).sum::<i64>() as f64)
    );
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}"
}

fn label_name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_]{0,10}"
}

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |v| v.is_finite()),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        (-1_000_000i64..1_000_000).prop_map(|v| v as f64),
    ]
}

fn render_value(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v:?}")
    }
}

proptest! {
    #[test]
    fn rendered_samples_parse_back(
        samples in proptest::collection::vec(
            (
                name(),
                proptest::collection::btree_map(label_name(), "\\PC{0,12}", 0..4),
                value(),
                proptest::option::of(any::<i64>()),
            ),
            0..20,
        )
    ) {
        let mut text = String::new();
        for (n, labels, v, ts) in &samples {
            text.push_str(n);
            if !labels.is_empty() {
                let body: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                text.push_str(&format!("{{{}}}", body.join(",")));
            }
            text.push(' ');
            text.push_str(&render_value(*v));
            if let Some(t) = ts {
                text.push_str(&format!(" {t}"));
            }
            text.push('\n');
        }
        let parsed = parse(&text).expect("rendered text parses");
        prop_assert_eq!(parsed.samples.len(), samples.len());
        for (got, (n, labels, v, ts)) in parsed.samples.iter().zip(&samples) {
            prop_assert_eq!(&got.name, n);
            let want: Vec<(String, String)> =
                labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            prop_assert_eq!(&got.labels, &want);
            prop_assert_eq!(got.value, *v);
            prop_assert_eq!(got.timestamp_ms, *ts);
        }
    }

    #[test]
    fn garbage_is_an_error_or_a_parse_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse(&text);
    }

    #[test]
    fn a_quantile_from_buckets_falls_in_the_bucket_of_the_true_quantile(
        mut observations in proptest::collection::vec(0.0f64..10.0, 1..300),
        q in 0.01f64..0.99,
    ) {
        let bounds = [0.1, 0.5, 1.0, 2.5, 5.0, 7.5, f64::INFINITY];
        let buckets: Vec<(f64, f64)> = bounds
            .iter()
            .map(|b| (*b, observations.iter().filter(|o| *o <= b).count() as f64))
            .collect();
        observations.sort_by(f64::total_cmp);
        let rank = ((q * observations.len() as f64).ceil() as usize).clamp(1, observations.len());
        let truth = observations[rank - 1];
        let estimate = bucket_quantile(q, &buckets).expect("observations");
        let upper = bounds.iter().copied().find(|b| truth <= *b).unwrap_or(f64::INFINITY);
        let lower = bounds.iter().copied().rfind(|b| *b < upper).unwrap_or(0.0);
        prop_assert!(
            estimate >= lower - 1e-9 && estimate <= upper + 1e-9,
            "q {} truth {} in ({}, {}], estimate {}", q, truth, lower, upper, estimate
        );
    }
}
