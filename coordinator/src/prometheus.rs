//! `source = "prometheus"` metrics: the engine's pollers of a Prometheus server's query
//! API. While a deployment judges intervals, one task per deployment asks
//! `/api/v1/query` for each such metric — the plan's query and its baseline, with
//! `${SERVICE}`, `${RELEASE}`, `${PREVIOUS_RELEASE}` (and `${HOST}`, once per host of
//! the step) filled in — three times an interval, off the decision loop, and sends each
//! result to the engine, which hands the latest to the decision as data. A timeout, an
//! HTTP or query error, an empty result, several series or a matrix is the reason the
//! value is missing, which makes the interval inconclusive, never a pass.

use std::collections::BTreeMap;
use std::time::Duration;

use cutover_shared::clock::now_ms;
use cutover_shared::placeholders;
use cutover_shared::plan::{Analysis, Measure};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::analysis::{Queried, Query, Reading, Side, Values};
use crate::model::{DeploymentRecord, HostPhase, State};

/// Queries are never more frequent than this, whatever the interval.
const MIN_EVERY_MS: u64 = 200;
/// Nor rarer than this.
const MAX_EVERY_MS: u64 = 10_000;
/// One query's time limit, at most.
const MAX_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read from the server.
const MAX_ANSWER: usize = 1 << 20;

/// A query result on its way to the engine: (deployment, metric, result).
pub type Answer = (String, String, Query);

/// The pollers of every deployment that has `source = "prometheus"` metrics, and the
/// latest result of each of their queries.
pub struct Pollers {
    /// Each polled deployment: its task's stop and the hosts its queries cover.
    running: BTreeMap<String, Poller>,
    /// The latest result per deployment and metric.
    latest: BTreeMap<String, Queried>,
    /// Where the tasks send their results.
    tx: mpsc::Sender<Answer>,
    rx: mpsc::Receiver<Answer>,
    /// Stops every poller when the engine goes.
    cancel: CancellationToken,
}

struct Poller {
    stop: CancellationToken,
    hosts: watch::Sender<Vec<String>>,
}

impl Default for Pollers {
    fn default() -> Self {
        Pollers::new()
    }
}

impl Pollers {
    pub fn new() -> Pollers {
        let (tx, rx) = mpsc::channel(256);
        Pollers {
            running: BTreeMap::new(),
            latest: BTreeMap::new(),
            tx,
            rx,
            cancel: CancellationToken::new(),
        }
    }

    /// The next result from any poller.
    pub async fn recv(&mut self) -> Option<Answer> {
        self.rx.recv().await
    }

    /// Keeps a result, unless its deployment is no longer polled.
    pub fn record(&mut self, (id, metric, q): Answer) {
        if self.running.contains_key(&id) {
            self.latest.entry(id).or_default().insert(metric, q);
        }
    }

    /// Starts, updates or stops `d`'s poller as the deployment stands, and returns the
    /// latest results of its queries.
    pub fn sync(&mut self, d: &DeploymentRecord) -> Queried {
        let wanted = d.plan.analysis.as_ref().filter(|a| {
            a.metric
                .iter()
                .any(|m| matches!(m.measure(), Some(Measure::Prometheus(..))))
        });
        let judging = matches!(d.state, State::Progressing | State::Paused);
        let (Some(analysis), true) = (wanted, judging) else {
            self.forget(&d.id);
            return Queried::new();
        };
        let hosts = serving_hosts(d);
        match self.running.get(&d.id) {
            Some(p) => {
                p.hosts.send_if_modified(|h| {
                    let changed = *h != hosts;
                    *h = hosts;
                    changed
                });
            }
            None => {
                let (tx_hosts, rx_hosts) = watch::channel(hosts);
                let stop = self.cancel.child_token();
                let task = Task {
                    id: d.id.clone(),
                    analysis: analysis.clone(),
                    vars: Vars {
                        service: d.service.clone(),
                        release: d.release.clone(),
                        previous: d.previous_release.clone().unwrap_or_default(),
                    },
                    hosts: rx_hosts,
                    tx: self.tx.clone(),
                };
                tokio::spawn(task.run(stop.clone()));
                let poller = Poller {
                    stop,
                    hosts: tx_hosts,
                };
                self.running.insert(d.id.clone(), poller);
            }
        }
        self.latest.get(&d.id).cloned().unwrap_or_default()
    }

    /// Stops deployment `id`'s poller and forgets its results.
    pub fn forget(&mut self, id: &str) {
        if let Some(p) = self.running.remove(id) {
            p.stop.cancel();
        }
        self.latest.remove(id);
    }
}

impl Drop for Pollers {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The hosts that serve the new release next to the old one, by name.
fn serving_hosts(d: &DeploymentRecord) -> Vec<String> {
    d.hosts
        .iter()
        .filter(|(_, h)| !h.untouched && h.phase == HostPhase::Switched && h.weight > 0)
        .map(|(n, _)| n.clone())
        .collect()
}

/// What the placeholders of a deployment's queries stand for.
#[derive(Clone)]
struct Vars {
    service: String,
    release: String,
    previous: String,
}

impl Vars {
    /// `query` for the new release (`baseline` false) or the old one, on `host`.
    fn fill(&self, query: &str, baseline: bool, host: &str) -> String {
        let release = if baseline {
            &self.previous
        } else {
            &self.release
        };
        placeholders::fill(
            query,
            &[
                ("SERVICE", &self.service),
                ("RELEASE", release),
                ("PREVIOUS_RELEASE", &self.previous),
                ("HOST", host),
            ],
        )
    }
}

/// One deployment's poller.
struct Task {
    id: String,
    analysis: Analysis,
    vars: Vars,
    hosts: watch::Receiver<Vec<String>>,
    tx: mpsc::Sender<Answer>,
}

impl Task {
    async fn run(self, stop: CancellationToken) {
        let every = (self.analysis.interval.as_millis() / 3).clamp(MIN_EVERY_MS, MAX_EVERY_MS);
        let timeout = Duration::from_millis(every).min(MAX_TIMEOUT);
        let Some(server) = self.analysis.prometheus.clone() else {
            return;
        };
        let client = match reqwest::Client::builder().timeout(timeout).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(deployment = self.id, error = %e, "prometheus client");
                return;
            }
        };
        let api = Api { client, server };
        let mut tick = tokio::time::interval(Duration::from_millis(every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let hosts = self.hosts.borrow().clone();
            for m in &self.analysis.metric {
                let Some(Measure::Prometheus(query, baseline)) = m.measure() else {
                    continue;
                };
                let reading = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.read(&api, query, baseline, &hosts) => r,
                };
                let q = Query {
                    at_unix_ms: now_ms(),
                    reading,
                };
                if self
                    .tx
                    .send((self.id.clone(), m.name.clone(), q))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }

    /// Both queries of one metric, once for the step or once per host.
    async fn read(
        &self,
        api: &Api,
        query: &str,
        baseline: Option<&str>,
        hosts: &[String],
    ) -> Reading {
        let pair = |host: &str| {
            let new = self.vars.fill(query, false, host);
            let old = match baseline {
                Some(b) => self.vars.fill(b, true, host),
                None => self.vars.fill(query, true, host),
            };
            async move {
                let (new, old) = tokio::join!(api.value(&new), api.value(&old));
                Values {
                    new,
                    old,
                    counts: None,
                }
            }
        };
        let per_host = query.contains("${HOST}") || baseline.is_some_and(|b| b.contains("${HOST}"));
        if !per_host {
            return Reading::Whole(pair("").await);
        }
        let mut out = BTreeMap::new();
        for h in hosts {
            out.insert(h.clone(), pair(h).await);
        }
        Reading::PerHost(out)
    }
}

/// A Prometheus server's query API.
struct Api {
    client: reqwest::Client,
    /// The server's base URL, `[analysis] prometheus`.
    server: String,
}

impl Api {
    /// The value of an instant query: a scalar or a one-series vector.
    async fn value(&self, query: &str) -> Side {
        let url = format!(
            "{}/api/v1/query?query={}",
            self.server.trim_end_matches('/'),
            encode(query)
        );
        let resp = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("prometheus: {}", cutover_shared::errors::chain(&e)))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("prometheus: {}", cutover_shared::errors::chain(&e)))?;
        if body.len() > MAX_ANSWER {
            return Err(format!("prometheus: an answer of {} bytes", body.len()));
        }
        let doc: Value = serde_json::from_slice(&body)
            .map_err(|_| format!("prometheus: HTTP {} with no query answer", status.as_u16()))?;
        result_value(&doc).map(Some)
    }
}

/// The value in a `/api/v1/query` answer, or why there is none.
pub fn result_value(doc: &Value) -> Result<f64, String> {
    if doc["status"] != "success" {
        let kind = doc["errorType"].as_str().unwrap_or("error");
        let error = doc["error"].as_str().unwrap_or("no reason given");
        return Err(format!("prometheus: {kind}: {error}"));
    }
    let data = &doc["data"];
    let sample = match data["resultType"].as_str() {
        Some("scalar") => &data["result"],
        Some("vector") => match data["result"].as_array().map(Vec::as_slice) {
            Some([one]) => &one["value"],
            Some([]) | None => return Err("prometheus: the query returned no series".into()),
            Some(many) => {
                return Err(format!(
                    "prometheus: the query returned {} series; it must return one (aggregate it, e.g. sum(...))",
                    many.len()
                ));
            }
        },
        Some(other) => {
            return Err(format!(
                "prometheus: the query returned a {other}; it must return a scalar or one series"
            ));
        }
        None => return Err("prometheus: an answer without a result type".into()),
    };
    // [unix time, "value"]; Prometheus writes NaN and ±Inf as "NaN", "+Inf", "-Inf".
    let text = sample[1]
        .as_str()
        .ok_or("prometheus: a sample without a value")?;
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        t => t
            .parse()
            .map_err(|_| format!("prometheus: {t:?} is not a number")),
    }
}

/// `text` percent-encoded for a URL's query string.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_a_scalar_or_one_series_is_a_value() {
        let vector = |result: Value| json!({"status": "success", "data": {"resultType": "vector", "result": result}});
        let one = vector(json!([{"metric": {}, "value": [1.5, "0.25"]}]));
        assert_eq!(result_value(&one), Ok(0.25));
        let scalar =
            json!({"status": "success", "data": {"resultType": "scalar", "result": [1.5, "7"]}});
        assert_eq!(result_value(&scalar), Ok(7.0));
        let nan = vector(json!([{"metric": {}, "value": [1.5, "NaN"]}]));
        assert!(result_value(&nan).unwrap().is_nan());
        assert_eq!(
            result_value(&vector(json!([]))),
            Err("prometheus: the query returned no series".into())
        );
        let two = vector(json!([{"value": [1, "1"]}, {"value": [1, "2"]}]));
        assert!(
            result_value(&two)
                .unwrap_err()
                .contains("returned 2 series")
        );
        let matrix = json!({"status": "success", "data": {"resultType": "matrix", "result": []}});
        assert!(
            result_value(&matrix)
                .unwrap_err()
                .contains("returned a matrix")
        );
        let error =
            json!({"status": "error", "errorType": "bad_data", "error": "parse error at char 5"});
        assert_eq!(
            result_value(&error),
            Err("prometheus: bad_data: parse error at char 5".into())
        );
    }

    #[test]
    fn queries_are_filled_for_each_side_and_encoded() {
        let v = Vars {
            service: "web".into(),
            release: "2.0".into(),
            previous: "1.0".into(),
        };
        let q = r#"sum(rate(x{service="${SERVICE}",release="${RELEASE}",host="${HOST}"}[30s]))"#;
        assert_eq!(
            v.fill(q, false, "web-1"),
            r#"sum(rate(x{service="web",release="2.0",host="web-1"}[30s]))"#
        );
        assert_eq!(
            v.fill(q, true, "web-1"),
            r#"sum(rate(x{service="web",release="1.0",host="web-1"}[30s]))"#
        );
        assert_eq!(v.fill("${PREVIOUS_RELEASE}", false, ""), "1.0");
        assert_eq!(
            encode("sum(x{a=\"b c\"})"),
            "sum%28x%7Ba%3D%22b%20c%22%7D%29"
        );
    }
}
