//! The plan file's model: one type per section, as serde reads it from TOML, with the
//! defaults a plan may leave out. What the types alone cannot rule out is checked by
//! `validate`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// A deployment plan, as written in the plan file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The service deployed: one public port and one blue/green pair per host.
    pub service: String,
    /// What is deployed.
    pub release: Release,
    /// Where it is deployed.
    #[serde(default)]
    pub targets: Targets,
    /// How a slot process runs.
    pub run: Run,
    /// How the agent knows a slot process is fit to serve.
    pub health: Health,
    /// How traffic moves to the new release, and how much failure it stands.
    #[serde(default)]
    pub strategy: Strategy,
    /// How the new release is judged against the old one while it takes traffic.
    #[serde(default)]
    pub analysis: Option<Analysis>,
    /// The schema change that rides the rollout: expand, contract and abort commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<Database>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Names the release in reports and on disk (`releases/<service>/<version>-…`).
    pub version: String,
    /// Where agents fetch the artifact: a `file://`, `http://` or `https://` URL.
    pub artifact: String,
    /// The artifact's SHA-256: nothing from it runs unless it matches.
    pub sha256: String,
    /// When the release's commit was made (RFC 3339), for lead-time figures.
    #[serde(default)]
    pub committed_at: Option<String>,
    /// ed25519 signature (hex) made by `cutover artifact sign`, checked against the
    /// agents' trusted keys.
    #[serde(default)]
    pub signature: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Every connected host whose labels include all of these.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// The program and its arguments, run in the release directory; `${PORT}` is the
    /// slot's private port.
    pub command: Vec<String>,
    /// Variables the service gets besides the agent's own few (`PORT`, `CUTOVER_*`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The public port the agent's proxy binds for the service.
    pub listen: u16,
    /// How the proxy splits traffic: per request or per connection.
    #[serde(default)]
    pub protocol: Protocol,
    /// How long a stopping slot process has between SIGTERM and SIGKILL.
    #[serde(default = "defaults::stop_timeout")]
    pub stop_timeout: Duration,
    /// How long an old slot keeps its in-flight requests after losing its weight.
    #[serde(default = "defaults::drain")]
    pub drain: Duration,
    /// Unprivileged user to run the slot process as.
    #[serde(default)]
    pub user: Option<String>,
    /// Files of `KEY=value` lines each host reads when a slot starts, in order, over
    /// `env`: host-specific settings and secrets that never travel through cutover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_files: Vec<String>,
    /// Variables whose values are secret: masked wherever cutover shows or reports
    /// them, whether `env` or an env file sets them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Each request goes to a slot by weight; responses are counted per status.
    #[default]
    Http,
    /// Each connection goes to a slot by weight; bytes pass through untouched.
    Tcp,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// An HTTP check: this path on the slot's port answers 2xx.
    #[serde(default)]
    pub http: Option<String>,
    /// A TCP check: the slot's port accepts a connection.
    #[serde(default)]
    pub tcp: Option<bool>,
    /// A command check: this program, run in the release as the service's user, exits 0.
    #[serde(default)]
    pub exec: Option<Vec<String>>,
    /// Time between two checks.
    #[serde(default = "defaults::interval")]
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    #[serde(default = "defaults::timeout")]
    pub timeout: Duration,
    /// Consecutive passes before a slot counts as healthy.
    #[serde(default = "defaults::healthy_after")]
    pub healthy_after: u32,
    /// Consecutive failures before a healthy slot counts as unhealthy.
    #[serde(default = "defaults::unhealthy_after")]
    pub unhealthy_after: u32,
    /// From process start to healthy, or the host fails preparation.
    #[serde(default = "defaults::start_timeout")]
    pub start_timeout: Duration,
}

/// The one health check a plan names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// GET this path on the slot's port.
    Http(String),
    /// Connect to the slot's port.
    Tcp,
    /// Run this command.
    Exec(Vec<String>),
}

impl Health {
    /// The check this section names; `None` until [`Plan::validate`] has passed.
    pub fn check(&self) -> Option<Check> {
        match (&self.http, self.tcp, &self.exec) {
            (Some(p), None | Some(false), None) => Some(Check::Http(p.clone())),
            (None, Some(true), None) => Some(Check::Tcp),
            (None, None | Some(false), Some(c)) => Some(Check::Exec(c.clone())),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    /// Hosts preparing the new release at once.
    #[serde(default = "defaults::max_parallel")]
    pub max_parallel: Count,
    /// Hosts that may fail preparation before the release is judged bad.
    #[serde(default)]
    pub max_failed_hosts: u32,
    /// How long the old slot keeps running after success, for an instant rollback.
    #[serde(default = "defaults::keep_previous")]
    pub keep_previous: Duration,
    /// After the last step, how long analysis keeps watching; a breach still rolls back.
    #[serde(default)]
    pub bake: Duration,
    /// The traffic ladder, ending at 100 %.
    #[serde(default = "defaults::steps")]
    pub steps: Vec<Step>,
    /// What a host silent for `host_lost_after` does to the deployment.
    #[serde(default)]
    pub on_host_lost: OnHostLost,
    /// How long a host may be unreachable before it counts as lost.
    #[serde(default = "defaults::host_lost_after")]
    pub host_lost_after: Duration,
    /// How long preparing hosts or a step may take before the deployment rolls back.
    #[serde(default = "defaults::progress_deadline")]
    pub progress_deadline: Duration,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy {
            max_parallel: defaults::max_parallel(),
            max_failed_hosts: 0,
            keep_previous: defaults::keep_previous(),
            bake: Duration::ZERO,
            steps: defaults::steps(),
            on_host_lost: OnHostLost::default(),
            host_lost_after: defaults::host_lost_after(),
            progress_deadline: defaults::progress_deadline(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnHostLost {
    /// Pause the deployment until an operator resumes (without the host) or aborts.
    #[default]
    Pause,
    /// Roll the whole fleet back.
    Rollback,
    /// Set the host aside and go on; it follows the fleet when it returns.
    Continue,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Percent of each selected host's requests (or connections) for the new slot.
    pub traffic: u32,
    /// How long the step holds, and is analysed, before the next one.
    #[serde(default)]
    pub hold: Duration,
    /// Wait for `cutover promote` after the hold.
    #[serde(default)]
    pub pause: bool,
    /// Only this many target hosts get the new slot (a host wave); all when left out.
    #[serde(default)]
    pub hosts: Option<Count>,
}

/// A number of hosts: absolute (`3`) or a share of the targets (`"25%"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// This many hosts.
    Hosts(u32),
    /// This share of the target hosts, rounded up.
    Percent(u32),
}

impl Count {
    /// How many of `total` hosts this is: at least 1 when `total` > 0, at most `total`.
    pub fn of(&self, total: usize) -> usize {
        if total == 0 {
            return 0;
        }
        let n = match *self {
            Count::Hosts(n) => n as usize,
            Count::Percent(p) => (total * p as usize).div_ceil(100),
        };
        n.clamp(1, total)
    }
}

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Count::Hosts(n) => write!(f, "{n}"),
            Count::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a host count like 2 or a share like \"25%\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Count, E> {
                u32::try_from(v)
                    .map(Count::Hosts)
                    .map_err(|_| E::custom(format!("host count {v} is out of range")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Count, E> {
                let t = v.trim();
                if let Some(p) = t.strip_suffix('%') {
                    p.trim()
                        .parse()
                        .map(Count::Percent)
                        .map_err(|_| E::custom(format!("{v:?} is not a share like \"25%\"")))
                } else {
                    t.parse().map(Count::Hosts).map_err(|_| {
                        E::custom(format!(
                            "{v:?} is not a host count like 2 or a share like \"25%\""
                        ))
                    })
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Count {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Count::Hosts(n) => s.serialize_u32(*n),
            Count::Percent(_) => s.collect_str(self),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Analysis {
    /// How often the new slot's counters are judged against the old slot's.
    #[serde(default = "defaults::analysis_interval")]
    pub interval: Duration,
    /// Consecutive failing intervals before rollback.
    #[serde(default = "defaults::failure_limit")]
    pub failure_limit: u32,
    /// Fewer requests on the new slot in an interval make it inconclusive.
    #[serde(default = "defaults::min_requests")]
    pub min_requests: u64,
    /// Consecutive inconclusive intervals before the deployment pauses.
    #[serde(default = "defaults::inconclusive_limit")]
    pub inconclusive_limit: u32,
    /// The path of each slot's Prometheus text on its private port: what the agent
    /// scrapes for `source = "slot"` metrics and relays to a Prometheus server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrape: Option<String>,
    /// The Prometheus server `source = "prometheus"` metrics query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<String>,
    /// What is judged, each with its bounds.
    #[serde(default)]
    pub metric: Vec<Metric>,
}

impl Analysis {
    /// The path slots serve their metrics on, if the plan scrapes them: `scrape`, or
    /// `/metrics` when a `source = "slot"` metric needs one and `scrape` is left out.
    pub fn scrape_path(&self) -> Option<&str> {
        match &self.scrape {
            Some(p) => Some(p),
            None if self.metric.iter().any(|m| m.source == Source::Slot) => Some("/metrics"),
            None => None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    /// What is measured: one of the proxy's names, or (with another `source`) free text
    /// naming the metric in reports.
    pub name: String,
    /// Where its values come from.
    #[serde(default, skip_serializing_if = "Source::is_proxy")]
    pub source: Source,
    /// `source = "slot"`: the increase per second of this counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<String>,
    /// `source = "slot"`: the last value of this gauge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gauge: Option<String>,
    /// `source = "slot"`: the increase of the first counter over that of the second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<Vec<String>>,
    /// `source = "slot"`: a quantile of this histogram over the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<String>,
    /// With `histogram`: which quantile, between 0 and 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantile: Option<f64>,
    /// `source = "slot"`: only the series carrying all of these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `source = "prometheus"`: the query for the new release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// `source = "prometheus"`: the query for the old release (default: `query` with
    /// `${RELEASE}` standing for the previous release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_query: Option<String>,
    /// The new slot fails an interval above this.
    #[serde(default)]
    pub max: Option<f64>,
    /// The new slot fails an interval below this.
    #[serde(default)]
    pub min: Option<f64>,
    /// The new slot fails an interval above this many times the old slot's value.
    #[serde(default)]
    pub max_vs_baseline: Option<f64>,
    /// The new slot fails an interval below this many times the old slot's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_vs_baseline: Option<f64>,
    /// `"mann-whitney"`: judge new against old with a statistical test.
    #[serde(default)]
    pub judge: Option<Judge>,
    /// How sure the judge must be that the new slot is worse before it fails it.
    #[serde(default)]
    pub confidence: Option<f64>,
}

/// Where a metric's values come from.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The agent's proxy: the golden signals it measures per slot.
    #[default]
    Proxy,
    /// The slot's own Prometheus text, scraped by the agent.
    Slot,
    /// A Prometheus server's query API.
    Prometheus,
}

impl Source {
    fn is_proxy(&self) -> bool {
        *self == Source::Proxy
    }
}

/// What a `source = "slot"` metric reads from each slot's exposition.
#[derive(Clone, Debug, PartialEq)]
pub enum SlotMeasure<'a> {
    /// The increase per second of a counter.
    Counter(&'a str),
    /// The last value of a gauge.
    Gauge(&'a str),
    /// The increase of the first counter over the increase of the second.
    Ratio(&'a str, &'a str),
    /// The quantile of a histogram's observations in the interval.
    Histogram(&'a str, f64),
}

/// What a metric measures, by source.
#[derive(Clone, Debug, PartialEq)]
pub enum Measure<'a> {
    /// One of the proxy's golden signals.
    Proxy(MetricName),
    /// Series of the slot's own exposition, and the labels that select them.
    Slot(SlotMeasure<'a>, &'a BTreeMap<String, String>),
    /// A Prometheus query for the new release and one for the old (`None`: `query`
    /// with the previous release).
    Prometheus(&'a str, Option<&'a str>),
}

impl Metric {
    /// A proxy metric with this name and no bounds yet.
    pub fn proxy(name: MetricName) -> Metric {
        Metric {
            name: name.as_str().to_string(),
            source: Source::Proxy,
            counter: None,
            gauge: None,
            ratio: None,
            histogram: None,
            quantile: None,
            labels: BTreeMap::new(),
            query: None,
            baseline_query: None,
            max: None,
            min: None,
            max_vs_baseline: None,
            min_vs_baseline: None,
            judge: None,
            confidence: None,
        }
    }

    /// What the metric measures; `None` until [`Plan::validate`] has passed.
    pub fn measure(&self) -> Option<Measure<'_>> {
        match self.source {
            Source::Proxy => MetricName::parse(&self.name).map(Measure::Proxy),
            Source::Slot => {
                let m = match (&self.counter, &self.gauge, &self.ratio, &self.histogram) {
                    (Some(c), None, None, None) => SlotMeasure::Counter(c),
                    (None, Some(g), None, None) => SlotMeasure::Gauge(g),
                    (None, None, Some(r), None) if r.len() == 2 => SlotMeasure::Ratio(&r[0], &r[1]),
                    (None, None, None, Some(h)) => SlotMeasure::Histogram(h, self.quantile?),
                    _ => return None,
                };
                Some(Measure::Slot(m, &self.labels))
            }
            Source::Prometheus => Some(Measure::Prometheus(
                self.query.as_deref()?,
                self.baseline_query.as_deref(),
            )),
        }
    }

    /// The proxy's golden signal this metric judges, if it is one.
    pub fn proxy_name(&self) -> Option<MetricName> {
        match self.measure() {
            Some(Measure::Proxy(n)) => Some(n),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MetricName {
    /// 5xx responses and failed upstream connections, per request.
    ErrorRate,
    /// Median latency, in milliseconds.
    LatencyP50,
    /// 90th percentile latency, in milliseconds.
    LatencyP90,
    /// 99th percentile latency, in milliseconds.
    LatencyP99,
    /// Requests per second.
    RequestRate,
}

impl MetricName {
    /// Every name, as a plan writes them.
    pub const ALL: [MetricName; 5] = [
        MetricName::ErrorRate,
        MetricName::LatencyP50,
        MetricName::LatencyP90,
        MetricName::LatencyP99,
        MetricName::RequestRate,
    ];

    /// The name as a plan writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricName::ErrorRate => "error_rate",
            MetricName::LatencyP50 => "latency_p50",
            MetricName::LatencyP90 => "latency_p90",
            MetricName::LatencyP99 => "latency_p99",
            MetricName::RequestRate => "request_rate",
        }
    }

    /// The proxy metric named `name`, if there is one.
    pub fn parse(name: &str) -> Option<MetricName> {
        MetricName::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum Judge {
    /// The Mann-Whitney U test (latency) or a two-proportion test (error rate).
    #[serde(rename = "mann-whitney")]
    MannWhitney,
}

/// `[database]`: the release's schema change, made by the user's own commands at the
/// moments the rollout gives them (expand before any new slot starts, contract once the
/// previous release is retired, abort when the deployment ends without success).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// This release's schema version name; `${RELEASE}` is the release's version with
    /// every character outside `[A-Za-z0-9_]` replaced by `_` ([`Database::schema_name`]).
    pub schema: String,
    /// Makes the new schema version while the old release still serves.
    pub expand: Vec<String>,
    /// Removes what only the previous release needed, once it is retired.
    pub contract: Vec<String>,
    /// Undoes the expand when the deployment ends without success.
    pub abort: Vec<String>,
    /// How long each command may run before its whole process group is stopped.
    #[serde(default = "defaults::database_timeout")]
    pub timeout: Duration,
    /// Labels choosing the target hosts that may run the commands (the first by name
    /// runs them); none: every target host, so the first by name.
    #[serde(default)]
    pub run_on: BTreeMap<String, String>,
    /// When the contract runs.
    #[serde(default)]
    pub contract_after: ContractAfter,
}

impl Database {
    /// The placeholder `schema` may hold.
    pub const RELEASE: &'static str = "${RELEASE}";

    /// The schema version name for release `version`: `schema` with `${RELEASE}`
    /// replaced by the version, every character outside `[A-Za-z0-9_]` as `_`.
    pub fn schema_name(&self, version: &str) -> String {
        let safe: String = version
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.schema.replace(Self::RELEASE, &safe)
    }
}

/// When a release's schema change is contracted.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContractAfter {
    /// When the previous release is retired: `keep_previous` has passed, or the next
    /// deployment needs its slot.
    #[default]
    Retire,
    /// When an operator runs `cutover contract SERVICE`.
    Manual,
}

mod defaults {
    use super::{Count, Duration, Step};
    pub fn stop_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn drain() -> Duration {
        Duration::from_secs(5)
    }
    pub fn interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn healthy_after() -> u32 {
        2
    }
    pub fn unhealthy_after() -> u32 {
        3
    }
    pub fn start_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_parallel() -> Count {
        Count::Percent(25)
    }
    pub fn keep_previous() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn steps() -> Vec<Step> {
        vec![Step {
            traffic: 100,
            hold: Duration::ZERO,
            pause: false,
            hosts: None,
        }]
    }
    pub fn host_lost_after() -> Duration {
        Duration::from_secs(30)
    }
    pub fn database_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub fn progress_deadline() -> Duration {
        Duration::from_secs(600)
    }
    pub fn analysis_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn failure_limit() -> u32 {
        2
    }
    pub fn min_requests() -> u64 {
        50
    }
    pub fn inconclusive_limit() -> u32 {
        3
    }
}
