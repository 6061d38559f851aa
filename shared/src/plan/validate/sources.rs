//! Validation of where metrics come from: `[analysis]`'s `scrape`, `prometheus` and
//! `inconclusive_limit`, and for each `[[analysis.metric]]` a unique name and exactly the
//! keys its `source` reads — a proxy name, one slot series kind, or a Prometheus query
//! whose placeholders are all known.

use super::super::QUERY_VARIABLES;
use super::super::model::{Analysis, Judge, Metric, MetricName, Source};
use super::super::path::{I, K, PathPart};
use super::{Invalid, at_least_one, invalid};
use crate::placeholders;

/// `[analysis]`'s own keys for sources: a limit above zero, a path, a server URL.
pub(super) fn validate_settings(a: &Analysis) -> Result<(), Invalid> {
    at_least_one(
        &[K("analysis"), K("inconclusive_limit")],
        a.inconclusive_limit,
    )?;
    if let Some(p) = &a.scrape
        && (!p.starts_with('/') || p.contains(char::is_whitespace))
    {
        return Err(invalid(
            &[K("analysis"), K("scrape")],
            "must be a path starting with '/', like \"/metrics\"",
        ));
    }
    if let Some(url) = &a.prometheus {
        check_server_url(url).map_err(|m| invalid(&[K("analysis"), K("prometheus")], m))?;
    }
    Ok(())
}

/// A Prometheus server's base URL: `http://` or `https://` and a host, no query.
fn check_server_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !r.contains(['?', '#', ' ']) => Ok(()),
        _ => Err(format!(
            "{url:?} is not a Prometheus server's URL, like \"http://127.0.0.1:9090\""
        )),
    }
}

/// Metric `i`: a name no earlier metric has, and the keys of its source only.
pub(super) fn validate_measure(a: &Analysis, i: usize, m: &Metric) -> Result<(), Invalid> {
    let here = [K("analysis"), K("metric"), I(i)];
    let name_at = [K("analysis"), K("metric"), I(i), K("name")];
    if m.name.trim().is_empty() {
        return Err(invalid(&name_at, "must not be empty"));
    }
    if a.metric[..i].iter().any(|other| other.name == m.name) {
        return Err(invalid(
            &name_at,
            format!("another metric is already named {:?}", m.name),
        ));
    }
    let at = |k: &'static str| [K("analysis"), K("metric"), I(i), K(k)];
    match m.source {
        Source::Proxy => proxy(m, &at),
        Source::Slot => slot(m, &here, &at),
        Source::Prometheus => prometheus(a, m, &at),
    }
}

/// The first of `keys` that is set on `m`, if any.
fn first_set(m: &Metric, keys: &[&'static str]) -> Option<&'static str> {
    keys.iter().copied().find(|k| match *k {
        "counter" => m.counter.is_some(),
        "gauge" => m.gauge.is_some(),
        "ratio" => m.ratio.is_some(),
        "histogram" => m.histogram.is_some(),
        "quantile" => m.quantile.is_some(),
        "labels" => !m.labels.is_empty(),
        "query" => m.query.is_some(),
        "baseline_query" => m.baseline_query.is_some(),
        _ => false,
    })
}

const SLOT_KEYS: [&str; 6] = [
    "counter",
    "gauge",
    "ratio",
    "histogram",
    "quantile",
    "labels",
];
const QUERY_KEYS: [&str; 2] = ["query", "baseline_query"];

/// `source = "proxy"`: one of the proxy's names, and no key of another source.
fn proxy(m: &Metric, at: &dyn Fn(&'static str) -> [PathPart; 4]) -> Result<(), Invalid> {
    if MetricName::parse(&m.name).is_none() {
        let known: Vec<&str> = MetricName::ALL.iter().map(|n| n.as_str()).collect();
        let hint = match crate::plan::nearest(&m.name, &known) {
            Some(best) => format!("did you mean {best:?}? "),
            None => format!("the proxy measures {}; ", known.join(", ")),
        };
        return Err(invalid(
            &at("name"),
            format!(
                "unknown metric {:?}: {hint}for a metric of the service itself set source = \"slot\" or \"prometheus\"",
                m.name
            ),
        ));
    }
    let other = first_set(m, &SLOT_KEYS).or_else(|| first_set(m, &QUERY_KEYS));
    if let Some(k) = other {
        let source = if QUERY_KEYS.contains(&k) {
            "prometheus"
        } else {
            "slot"
        };
        return Err(invalid(
            &at(k),
            format!("{k} needs source = \"{source}\" (this metric comes from the proxy)"),
        ));
    }
    Ok(())
}

/// `source = "slot"`: exactly one of `counter`, `gauge`, `ratio`, `histogram`, with
/// well-formed series and label names, and `quantile` only (and always) with `histogram`.
fn slot(
    m: &Metric,
    here: &[PathPart],
    at: &dyn Fn(&'static str) -> [PathPart; 4],
) -> Result<(), Invalid> {
    if let Some(k) = first_set(m, &QUERY_KEYS) {
        return Err(invalid(
            &at(k),
            format!("{k} needs source = \"prometheus\""),
        ));
    }
    let kinds: Vec<&str> = ["counter", "gauge", "ratio", "histogram"]
        .into_iter()
        .filter(|k| first_set(m, &[k]).is_some())
        .collect();
    match kinds.as_slice() {
        [] => {
            return Err(invalid(
                here,
                "a source = \"slot\" metric reads one of counter, gauge, ratio or histogram",
            ));
        }
        [_] => {}
        [_, second, ..] => {
            return Err(invalid(
                &at(second),
                format!(
                    "set only one of counter, gauge, ratio and histogram (this metric already has {})",
                    kinds[0]
                ),
            ));
        }
    }
    for (k, name) in [
        ("counter", &m.counter),
        ("gauge", &m.gauge),
        ("histogram", &m.histogram),
    ] {
        if let Some(n) = name {
            series_name(n).map_err(|e| invalid(&at(k), e))?;
        }
    }
    if let Some(r) = &m.ratio {
        if r.len() != 2 {
            return Err(invalid(
                &at("ratio"),
                "must name two counters, like [\"payments_failed_total\", \"payments_total\"]",
            ));
        }
        for n in r {
            series_name(n).map_err(|e| invalid(&at("ratio"), e))?;
        }
    }
    match (m.histogram.is_some(), m.quantile) {
        (true, None) => {
            return Err(invalid(
                &at("histogram"),
                "needs quantile, like quantile = 0.99",
            ));
        }
        (true, Some(q)) if !(q > 0.0 && q < 1.0) => {
            return Err(invalid(
                &at("quantile"),
                "must be between 0 and 1, like 0.99",
            ));
        }
        (false, Some(_)) => {
            return Err(invalid(&at("quantile"), "needs histogram"));
        }
        _ => {}
    }
    for key in m.labels.keys() {
        if !is_label_name(key) {
            return Err(invalid(
                &at("labels"),
                format!("{key:?} is not a Prometheus label name"),
            ));
        }
    }
    if m.judge == Some(Judge::MannWhitney) && m.ratio.is_none() && m.histogram.is_none() {
        return Err(invalid(
            &at("judge"),
            "judge = \"mann-whitney\" needs counts: use it with ratio or histogram",
        ));
    }
    Ok(())
}

/// `source = "prometheus"`: a query with known placeholders, a server to ask, and a
/// baseline that differs from the query when a bound compares with it.
fn prometheus(
    a: &Analysis,
    m: &Metric,
    at: &dyn Fn(&'static str) -> [PathPart; 4],
) -> Result<(), Invalid> {
    if let Some(k) = first_set(m, &SLOT_KEYS) {
        return Err(invalid(&at(k), format!("{k} needs source = \"slot\"")));
    }
    let Some(query) = &m.query else {
        return Err(invalid(
            &at("source"),
            "a source = \"prometheus\" metric needs query = '...'",
        ));
    };
    for (k, q) in [
        ("query", Some(query)),
        ("baseline_query", m.baseline_query.as_ref()),
    ] {
        let Some(q) = q else { continue };
        if q.trim().is_empty() {
            return Err(invalid(&at(k), "must not be empty"));
        }
        placeholders::check(q, QUERY_VARIABLES).map_err(|e| invalid(&at(k), e.to_string()))?;
    }
    if a.prometheus.is_none() {
        return Err(invalid(
            &at("source"),
            "needs [analysis] prometheus = \"http://HOST:9090\", the server to query",
        ));
    }
    let compares = m.max_vs_baseline.is_some() || m.min_vs_baseline.is_some();
    if compares && m.baseline_query.is_none() && !query.contains("${RELEASE}") {
        return Err(invalid(
            &at("query"),
            "the baseline would be this same query: name the release with ${RELEASE}, or set baseline_query",
        ));
    }
    if m.judge.is_some() {
        return Err(invalid(
            &at("judge"),
            "judge = \"mann-whitney\" needs counts, which a query result does not have",
        ));
    }
    Ok(())
}

/// A Prometheus metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn series_name(n: &str) -> Result<(), String> {
    let mut chars = n.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if ok {
        Ok(())
    } else {
        Err(format!("{n:?} is not a Prometheus metric name"))
    }
}

/// A Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
fn is_label_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::path::key_path;
    use crate::plan::{Measure, Plan, SlotMeasure};

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    /// A plan whose `[analysis]` section is `analysis`.
    fn parse(analysis: &str) -> Result<Plan, String> {
        let text = format!(
            "service = \"web\"\n[release]\nversion = \"1\"\nartifact = \"file:///a.tar.gz\"\nsha256 = \"{SHA}\"\n[run]\ncommand = [\"./web\"]\nlisten = 8080\n[health]\nhttp = \"/healthz\"\n{analysis}"
        );
        Plan::parse(&text, "plan.toml").map_err(|e| e.to_string())
    }

    #[track_caller]
    fn refused(analysis: &str, message: &str) {
        let e = parse(analysis).expect_err("refused");
        assert!(e.contains(message), "{e}");
    }

    #[test]
    fn slot_and_prometheus_metrics_parse_to_what_they_measure() {
        let p = parse(
            r#"[analysis]
scrape = "/metrics"
prometheus = "http://127.0.0.1:9090"
inconclusive_limit = 4

[[analysis.metric]]
name = "payment failure rate"
source = "slot"
ratio = ["payments_failed_total", "payments_total"]
labels = { method = "card" }
max = 0.02
max_vs_baseline = 1.5

[[analysis.metric]]
name = "checkout p99"
source = "slot"
histogram = "checkout_seconds"
quantile = 0.99
max = 2

[[analysis.metric]]
name = "orders per second"
source = "prometheus"
query = 'sum(rate(orders_total{service="${SERVICE}",release="${RELEASE}"}[30s]))'
min_vs_baseline = 0.8
"#,
        )
        .unwrap();
        let a = p.analysis.unwrap();
        assert_eq!(a.inconclusive_limit, 4);
        assert_eq!(a.scrape_path(), Some("/metrics"));
        let card = [("method".to_string(), "card".to_string())].into();
        assert_eq!(
            a.metric[0].measure(),
            Some(Measure::Slot(
                SlotMeasure::Ratio("payments_failed_total", "payments_total"),
                &card
            ))
        );
        assert!(matches!(
            a.metric[1].measure(),
            Some(Measure::Slot(SlotMeasure::Histogram("checkout_seconds", q), _)) if q == 0.99
        ));
        assert!(matches!(
            a.metric[2].measure(),
            Some(Measure::Prometheus(q, None)) if q.contains("${RELEASE}")
        ));
        assert_eq!(a.metric[2].min_vs_baseline, Some(0.8));
    }

    #[test]
    fn defaults_and_proxy_names() {
        let p = parse("[analysis]\n[[analysis.metric]]\nname = \"q\"\nsource = \"slot\"\ngauge = \"queue_depth\"\nmax = 5\n").unwrap();
        let a = p.analysis.unwrap();
        assert_eq!(a.inconclusive_limit, 3);
        assert_eq!(a.scrape_path(), Some("/metrics"), "the default path");
        let p =
            parse("[analysis]\n[[analysis.metric]]\nname = \"error_rate\"\nmax = 0.1\n").unwrap();
        let a = p.analysis.unwrap();
        assert_eq!(a.scrape_path(), None, "nothing to scrape");
        assert_eq!(a.metric[0].proxy_name(), Some(MetricName::ErrorRate));
    }

    #[test]
    fn each_refusal_names_the_key_and_what_to_do() {
        let m = |body: &str| {
            format!("[analysis]\nprometheus = \"http://p:9090\"\n[[analysis.metric]]\n{body}\n")
        };
        refused(
            &m("name = \"eror_rate\"\nmax = 1"),
            "analysis.metric[0].name: unknown metric \"eror_rate\": did you mean \"error_rate\"?",
        );
        refused(
            &m("name = \"payments\"\nmax = 1"),
            "set source = \"slot\" or \"prometheus\"",
        );
        refused(
            &m("name = \"error_rate\"\ncounter = \"x_total\"\nmax = 1"),
            "analysis.metric[0].counter: counter needs source = \"slot\"",
        );
        refused(
            &m("name = \"p\"\nsource = \"slot\"\nmax = 1"),
            "analysis.metric[0]: a source = \"slot\" metric reads one of counter, gauge, ratio or histogram",
        );
        refused(
            &m("name = \"p\"\nsource = \"slot\"\ncounter = \"a\"\ngauge = \"b\"\nmax = 1"),
            "analysis.metric[0].gauge: set only one of counter, gauge, ratio and histogram",
        );
        refused(
            &m("name = \"p\"\nsource = \"slot\"\nratio = [\"a\"]\nmax = 1"),
            "analysis.metric[0].ratio: must name two counters",
        );
        refused(
            &m("name = \"p\"\nsource = \"slot\"\ncounter = \"a-b\"\nmax = 1"),
            "\"a-b\" is not a Prometheus metric name",
        );
        refused(
            &m("name = \"p\"\nsource = \"slot\"\nhistogram = \"h\"\nmax = 1"),
            "analysis.metric[0].histogram: needs quantile",
        );
        refused(
            &m("name = \"p\"\nsource = \"slot\"\nhistogram = \"h\"\nquantile = 1.0\nmax = 1"),
            "analysis.metric[0].quantile: must be between 0 and 1",
        );
        refused(
            &m("name = \"p\"\nsource = \"slot\"\ncounter = \"c\"\nquantile = 0.5\nmax = 1"),
            "analysis.metric[0].quantile: needs histogram",
        );
        refused(
            &m(
                "name = \"p\"\nsource = \"slot\"\ncounter = \"c\"\nlabels = { \"a-b\" = \"x\" }\nmax = 1",
            ),
            "\"a-b\" is not a Prometheus label name",
        );
        refused(
            &m("name = \"p\"\nsource = \"slot\"\ncounter = \"c\"\nquery = \"up\"\nmax = 1"),
            "analysis.metric[0].query: query needs source = \"prometheus\"",
        );
        refused(
            &m("name = \"p\"\nsource = \"slot\"\ngauge = \"g\"\njudge = \"mann-whitney\""),
            "use it with ratio or histogram",
        );
        refused(
            &m("name = \"p\"\nsource = \"prometheus\"\nmax = 1"),
            "analysis.metric[0].source: a source = \"prometheus\" metric needs query",
        );
        refused(
            &m("name = \"p\"\nsource = \"prometheus\"\nquery = 'up{r=\"${RELASE}\"}'\nmax = 1"),
            "analysis.metric[0].query: unknown variable ${RELASE}: did you mean ${RELEASE}?",
        );
        refused(
            &m(
                "name = \"p\"\nsource = \"prometheus\"\nquery = 'up'\nbaseline_query = 'up{${X}}'\nmax = 1",
            ),
            "analysis.metric[0].baseline_query: unknown variable ${X}",
        );
        refused(
            &m("name = \"p\"\nsource = \"prometheus\"\nquery = 'up'\nmax_vs_baseline = 2"),
            "the baseline would be this same query",
        );
        refused(
            &m("name = \"p\"\nsource = \"prometheus\"\nquery = 'up'\ngauge = \"g\"\nmax = 1"),
            "analysis.metric[0].gauge: gauge needs source = \"slot\"",
        );
        refused(
            "[analysis]\n[[analysis.metric]]\nname = \"p\"\nsource = \"prometheus\"\nquery = 'up'\nmax = 1\n",
            "needs [analysis] prometheus = ",
        );
        refused(
            "[analysis]\n[[analysis.metric]]\nname = \"error_rate\"\nmax = 1\n[[analysis.metric]]\nname = \"error_rate\"\nmax = 0.5\n",
            "analysis.metric[1].name: another metric is already named \"error_rate\"",
        );
        refused(
            "[analysis]\nscrape = \"metrics\"\n",
            "analysis.scrape: must be a path starting with '/'",
        );
        refused(
            "[analysis]\nprometheus = \"127.0.0.1:9090\"\n",
            "analysis.prometheus: \"127.0.0.1:9090\" is not a Prometheus server's URL",
        );
        refused(
            "[analysis]\ninconclusive_limit = 0\n",
            "analysis.inconclusive_limit: must be at least 1",
        );
    }

    #[test]
    fn refusals_are_located_at_the_key() {
        let e = parse("[analysis]\n[[analysis.metric]]\nname = \"p\"\nsource = \"slot\"\nhistogram = \"h\"\nquantile = 2.0\nmax = 1\n")
            .expect_err("refused");
        assert!(e.starts_with("plan.toml:16:"), "{e}");
        let inv = Invalid {
            path: vec![K("analysis"), K("metric"), I(0), K("quantile")],
            message: String::new(),
        };
        assert_eq!(key_path(&inv.path), "analysis.metric[0].quantile");
    }
}
