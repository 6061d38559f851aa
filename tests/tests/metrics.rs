//! Business metrics end to end: releases judged by what the service itself counts
//! (`source = "slot"`, scraped by the agents) and by a real Prometheus server
//! (`source = "prometheus"`, discovering the slots through the agents'
//! `/sd/prometheus`), against real `cutover` and `cutover-agent` processes. The sample
//! service answers every request with 200; a bad release fails payments, not HTTP.

use std::time::Duration;

use tests::{Cluster, Load, Prometheus, Value, fifteen_metrics, wait_until};

/// v1, a good release, live on every host.
fn deploy_v1(c: &Cluster) {
    let plan = c.plan("1.0.0").write("v1");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "v1: {err}");
}

/// v1 live on every host, its slots' metrics path known, so that the agents list them
/// for Prometheus.
fn deploy_v1_scraped(c: &Cluster) {
    let plan = c
        .plan("1.0.0")
        .analysis("[analysis]\ninterval = \"1s\"\nmin_requests = 0\nscrape = \"/metrics\"\n")
        .write("v1");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "v1: {err}");
}

/// Client load on every host, once some of it has been served.
fn load(c: &Cluster) -> Load {
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 200);
    load
}

/// A 10 % step held long enough that only analysis can end it, then 100 %.
const CANARY: &str = r#"[{ traffic = 10, hold = "60s" }, { traffic = 100 }]"#;

/// The payment failure ratio from the slots' own counters, with the proxy's error rate.
const SLOT_RATIO: &str = r#"[analysis]
interval = "1s"
failure_limit = 2
min_requests = 10

[[analysis.metric]]
name = "error_rate"
max = 0.05

[[analysis.metric]]
name = "payment failure rate"
source = "slot"
ratio = ["payments_failed_total", "payments_total"]
max = 0.05
max_vs_baseline = 2
"#;

fn metric<'a>(interval: &'a Value, name: &str) -> &'a Value {
    interval["metrics"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .unwrap_or(&Value::Null)
}

#[test]
fn a_release_failing_payments_behind_200s_rolls_back_on_the_slots_own_counters() {
    let c = Cluster::start(100, 3);
    deploy_v1(&c);
    let load = load(&c);
    let plan = c
        .plan("2.0.0")
        .behaviour(&["payment_failure_rate=0.3"])
        .steps(CANARY)
        .analysis(SLOT_RATIO)
        .write("payments");
    let (code, id, err) = c.deploy_wait(&plan);
    let report = load.stop();
    assert_eq!(code, 3, "{err}");
    report.assert_none_failed();
    let s = c.status(&id);
    assert_eq!(
        (s["state"].as_str(), s["step"].as_u64()),
        (Some("rolled_back"), Some(0))
    );
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("payment failure rate") && reason.contains("above max 0.05"),
        "{reason}"
    );
    assert!(!reason.contains("error_rate"), "HTTP was fine: {reason}");
    let last = &s["last_interval"];
    let failed = metric(last, "payment failure rate");
    assert_eq!(failed["verdict"], "fail", "{last}");
    let new = failed["new"].as_f64().unwrap_or_default();
    assert!((0.25..0.35).contains(&new), "new {new}");
    assert!(failed["old"].as_f64().is_some_and(|o| o < 0.01), "{failed}");
    assert_eq!(failed["threshold"], "max 0.05, max_vs_baseline 2x");
    assert_eq!(metric(last, "error_rate")["verdict"], "pass", "{last}");
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
}

/// A metric whose series never appears is no data: `inconclusive_limit` intervals in a
/// row pause the deployment with the metric named, and nothing advances meanwhile.
#[test]
fn a_metric_that_never_appears_pauses_the_deployment() {
    let c = Cluster::start(102, 2);
    deploy_v1(&c);
    let load = load(&c);
    let analysis = r#"[analysis]
interval = "1s"
failure_limit = 1
min_requests = 10
inconclusive_limit = 3

[[analysis.metric]]
name = "refund rate"
source = "slot"
counter = "refunds_total"
max = 100
"#;
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 10, hold = "1s" }, { traffic = 100 }]"#)
        .analysis(analysis)
        .write("refunds");
    let id = c.deploy(&plan);
    wait_until(Duration::from_secs(40), "the deployment to pause", || {
        c.status(&id)["state"] == "paused"
    });
    let s = c.status(&id);
    load.stop().assert_none_failed();
    assert_eq!(
        (s["step"].as_u64(), s["traffic"].as_u64()),
        (Some(0), Some(10))
    );
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("inconclusive 3 interval(s) in a row")
            && reason.contains("refund rate: no data on the new release"),
        "{reason}"
    );
    let intervals = s["intervals"].as_array().cloned().unwrap_or_default();
    assert!(intervals.len() >= 3, "{intervals:?}");
    assert!(
        intervals.iter().all(|i| i["verdict"] == "inconclusive"),
        "never a pass: {intervals:?}"
    );
    c.cli_ok(&["abort", &id]);
}

/// The same bad release judged by a real Prometheus that scrapes every release
/// separately through the agents' discovery and relay.
#[test]
fn a_prometheus_query_per_release_rolls_back_the_release_that_fails_payments() {
    let c = Cluster::start_scraped(101, 3);
    let prom = Prometheus::start(&c.dir, &c.discovery_urls());
    deploy_v1_scraped(&c);
    wait_until(Duration::from_secs(30), "prometheus to scrape v1", || {
        prom.has_series("payments_total", "1.0.0")
    });
    let load = load(&c);
    let analysis = format!(
        r#"[analysis]
interval = "2s"
failure_limit = 2
min_requests = 10
scrape = "/metrics"
prometheus = "{}"

[[analysis.metric]]
name = "payment failure share"
source = "prometheus"
query = 'sum(increase(payments_failed_total{{service="${{SERVICE}}",release="${{RELEASE}}"}}[5s])) / sum(increase(payments_total{{service="${{SERVICE}}",release="${{RELEASE}}"}}[5s]))'
max = 0.05
"#,
        prom.url
    );
    let plan = c
        .plan("2.0.0")
        .behaviour(&["payment_failure_rate=0.3"])
        .steps(CANARY)
        .analysis(&analysis)
        .write("prom");
    let (code, id, err) = c.deploy_wait(&plan);
    let report = load.stop();
    assert_eq!(code, 3, "{err}");
    report.assert_none_failed();
    let s = c.status(&id);
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("payment failure share") && reason.contains("above max 0.05"),
        "{reason}"
    );
    // Prometheus saw both releases apart, labelled by the discovery. Over a range: once
    // the rolled-back slot left the discovery, its series are marked stale, and an
    // instant query no longer returns them.
    let v2 = prom.query(r#"max_over_time(payments_total{release="2.0.0",slot!="",host!=""}[10m])"#);
    assert!(v2.is_ok_and(|r| r.as_array().is_some_and(|a| !a.is_empty())));
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
}

/// A Prometheus that does not answer makes every interval inconclusive, never a pass:
/// the step does not advance, and the deployment pauses naming the metric.
#[test]
fn a_prometheus_that_is_down_is_never_a_pass() {
    let c = Cluster::start(103, 2);
    deploy_v1(&c);
    let load = load(&c);
    let down = format!("http://127.0.0.1:{}", tests::free_port());
    let analysis = format!(
        r#"[analysis]
interval = "1s"
failure_limit = 1
min_requests = 10
inconclusive_limit = 3
prometheus = "{down}"

[[analysis.metric]]
name = "error_rate"
max = 0.05

[[analysis.metric]]
name = "orders"
source = "prometheus"
query = 'sum(rate(payments_total{{release="${{RELEASE}}"}}[10s]))'
min = 0
"#
    );
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 10, hold = "1s" }, { traffic = 100 }]"#)
        .analysis(&analysis)
        .write("down");
    let id = c.deploy(&plan);
    wait_until(Duration::from_secs(40), "the deployment to pause", || {
        c.status(&id)["state"] == "paused"
    });
    load.stop().assert_none_failed();
    let s = c.status(&id);
    assert_eq!(
        s["step"].as_u64(),
        Some(0),
        "a step held 1 s never advanced"
    );
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("orders: prometheus: "), "{reason}");
    let intervals = s["intervals"].as_array().cloned().unwrap_or_default();
    assert!(
        intervals.iter().all(|i| i["verdict"] == "inconclusive"),
        "{intervals:?}"
    );
    assert_eq!(metric(&s["last_interval"], "error_rate")["verdict"], "pass");
    c.cli_ok(&["abort", &id]);
}

/// Fifteen metrics at once on three hosts — the proxy's five, five from the slots'
/// own metrics and five from Prometheus — judged every interval: a good release walks
/// its steps, and every interval lists all fifteen with values, bounds and verdicts.
#[test]
fn fifteen_metrics_are_judged_every_interval_on_a_fleet() {
    let c = Cluster::start_scraped(104, 3);
    let prom = Prometheus::start(&c.dir, &c.discovery_urls());
    deploy_v1_scraped(&c);
    wait_until(Duration::from_secs(30), "prometheus to scrape v1", || {
        prom.has_series("payments_total", "1.0.0")
    });
    let load = load(&c);
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 50, hold = "6s" }, { traffic = 100, hold = "2s" }]"#)
        .analysis(&fifteen_metrics(&prom.url))
        .write("fifteen");
    let (code, id, err) = c.deploy_wait(&plan);
    load.stop().assert_none_failed();
    assert_eq!(code, 0, "{err}");
    let s = c.status(&id);
    let intervals = s["intervals"].as_array().cloned().unwrap_or_default();
    let passing: Vec<&Value> = intervals
        .iter()
        .filter(|i| i["verdict"] == "pass")
        .collect();
    assert!(!passing.is_empty(), "{intervals:?}");
    for i in passing {
        let ms = i["metrics"].as_array().cloned().unwrap_or_default();
        assert_eq!(ms.len(), 15, "{i}");
        assert!(
            ms.iter().all(|m| m["verdict"] == "pass"
                && m["new"].is_number()
                && m["threshold"].as_str().is_some_and(|t| !t.is_empty())),
            "{i}"
        );
    }
}
