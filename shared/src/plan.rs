//! The plan file: its model, its parsing and its validation.
//!
//! Every error names the file, line and column, and an unknown key gets the nearest known
//! key as a suggestion. Parsing happens in two passes: serde builds the typed model
//! (catching unknown keys and wrong types with toml's own spans), then [`Plan::validate`]
//! checks values; its errors carry a key path that is located in the document afterwards.
//! Type errors are said in the plan's words, keyed by the value's path (`run.listen must
//! be a port number 1–65535`), whatever key they concern.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::names::{check_label, check_name};
use crate::placeholders;

/// The largest plan file, in bytes: parsing refuses anything longer, so `plan
/// validate` and `deploy` agree, and the coordinator's gRPC message limit is set above it.
pub const MAX_PLAN_BYTES: usize = 1024 * 1024;

/// The placeholders `[run] command` and `[run] env` values may hold.
pub const RUN_VARIABLES: &[&str] = &["PORT"];

/// A deployment plan, as written in the plan file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub service: String,
    pub release: Release,
    #[serde(default)]
    pub targets: Targets,
    pub run: Run,
    pub health: Health,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub analysis: Option<Analysis>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub version: String,
    pub artifact: String,
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
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub listen: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default = "defaults::stop_timeout")]
    pub stop_timeout: Duration,
    #[serde(default = "defaults::drain")]
    pub drain: Duration,
    /// Unprivileged user to run the slot process as.
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default)]
    pub http: Option<String>,
    #[serde(default)]
    pub tcp: Option<bool>,
    #[serde(default)]
    pub exec: Option<Vec<String>>,
    #[serde(default = "defaults::interval")]
    pub interval: Duration,
    #[serde(default = "defaults::timeout")]
    pub timeout: Duration,
    #[serde(default = "defaults::healthy_after")]
    pub healthy_after: u32,
    #[serde(default = "defaults::unhealthy_after")]
    pub unhealthy_after: u32,
    #[serde(default = "defaults::start_timeout")]
    pub start_timeout: Duration,
}

/// The one health check a plan names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Http(String),
    Tcp,
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
    #[serde(default = "defaults::max_parallel")]
    pub max_parallel: Count,
    #[serde(default)]
    pub max_failed_hosts: u32,
    #[serde(default = "defaults::keep_previous")]
    pub keep_previous: Duration,
    #[serde(default)]
    pub bake: Duration,
    #[serde(default = "defaults::steps")]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub on_host_lost: OnHostLost,
    #[serde(default = "defaults::host_lost_after")]
    pub host_lost_after: Duration,
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
    #[default]
    Pause,
    Rollback,
    Continue,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub traffic: u32,
    #[serde(default)]
    pub hold: Duration,
    #[serde(default)]
    pub pause: bool,
    #[serde(default)]
    pub hosts: Option<Count>,
}

/// A number of hosts: absolute (`3`) or a share of the targets (`"25%"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    Hosts(u32),
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
    #[serde(default = "defaults::analysis_interval")]
    pub interval: Duration,
    #[serde(default = "defaults::failure_limit")]
    pub failure_limit: u32,
    #[serde(default = "defaults::min_requests")]
    pub min_requests: u64,
    #[serde(default)]
    pub metric: Vec<Metric>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    pub name: MetricName,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max_vs_baseline: Option<f64>,
    /// `"mann-whitney"`: judge new against old with a statistical test.
    #[serde(default)]
    pub judge: Option<Judge>,
    #[serde(default)]
    pub confidence: Option<f64>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MetricName {
    ErrorRate,
    LatencyP50,
    LatencyP90,
    LatencyP99,
    RequestRate,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum Judge {
    #[serde(rename = "mann-whitney")]
    MannWhitney,
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
}

/// A plan that could not be read: `file:line:col: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PlanError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// A value problem found by [`Plan::validate`], located by key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Keys and array indices from the document root, e.g. `strategy.steps.2.traffic`.
    pub path: Vec<PathPart>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPart {
    /// A key of the plan's model.
    Key(Cow<'static, str>),
    Index(usize),
    /// A key the user chose: an env variable's or a label's name.
    Name(String),
}

#[allow(non_snake_case)]
fn K(key: &'static str) -> PathPart {
    PathPart::Key(Cow::Borrowed(key))
}

#[allow(non_snake_case)]
fn I(index: usize) -> PathPart {
    PathPart::Index(index)
}

/// `strategy.steps[2].traffic`.
fn key_path(path: &[PathPart]) -> String {
    let mut out = String::new();
    for p in path {
        match p {
            PathPart::Key(k) => push_key(&mut out, k),
            PathPart::Name(n) => push_key(&mut out, n),
            PathPart::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn push_key(out: &mut String, key: &str) {
    if !out.is_empty() {
        out.push('.');
    }
    out.push_str(key);
}

fn invalid(path: &[PathPart], message: impl Into<String>) -> Invalid {
    Invalid {
        path: path.to_vec(),
        message: message.into(),
    }
}

impl Plan {
    /// Parses and validates plan text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Plan, PlanError> {
        Plan::check_size(text.len() as u64, file)?;
        let plan: Plan = toml::from_str(text).map_err(|e| from_toml(&e, text, file))?;
        if let Err(inv) = plan.validate() {
            let offset = locate(text, &inv.path);
            let (line, column) = line_col(text, offset);
            let key = key_path(&inv.path);
            let message = if key.is_empty() {
                inv.message
            } else {
                format!("{key}: {}", inv.message)
            };
            return Err(PlanError {
                file: file.to_string(),
                line,
                column,
                message,
            });
        }
        Ok(plan)
    }

    /// Refuses a plan of `bytes` over [`MAX_PLAN_BYTES`] (before reading it, for a file).
    pub fn check_size(bytes: u64, file: &str) -> Result<(), PlanError> {
        if bytes <= MAX_PLAN_BYTES as u64 {
            return Ok(());
        }
        let mib = |b: f64| b / (1024.0 * 1024.0);
        Err(PlanError {
            file: file.to_string(),
            line: 1,
            column: 1,
            message: format!(
                "the plan is {:.1} MiB; a plan may be at most {:.0} MiB",
                mib(bytes as f64),
                mib(MAX_PLAN_BYTES as f64)
            ),
        })
    }

    /// Checks values that the types alone do not rule out.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_name("service", &self.service).map_err(|m| invalid(&[K("service")], m))?;
        for (k, v) in &self.targets.labels {
            check_label(k, v).map_err(|m| invalid(&[K("targets"), K("labels")], m))?;
        }

        let r = &self.release;
        if r.version.trim().is_empty() {
            return Err(invalid(&[K("release"), K("version")], "must not be empty"));
        }
        if r.version.len() > 128 || r.version.contains(['/', '\\', '\0']) || r.version == ".." {
            return Err(invalid(
                &[K("release"), K("version")],
                "must be at most 128 characters with no '/' or '\\'",
            ));
        }
        check_artifact_url(&r.artifact).map_err(|m| invalid(&[K("release"), K("artifact")], m))?;
        check_sha256(&r.sha256).map_err(|m| invalid(&[K("release"), K("sha256")], m))?;
        if let Some(sig) = &r.signature
            && !(sig.len() == 128 && sig.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(invalid(
                &[K("release"), K("signature")],
                "not an ed25519 signature (128 hexadecimal digits, as `cutover artifact sign` prints)",
            ));
        }

        let run = &self.run;
        if run.command.is_empty() || run.command[0].trim().is_empty() {
            return Err(invalid(
                &[K("run"), K("command")],
                "must name the program to run, e.g. [\"./bin/web\", \"--port\", \"${PORT}\"]",
            ));
        }
        for (i, arg) in run.command.iter().enumerate() {
            placeholders::check(arg, RUN_VARIABLES)
                .map_err(|e| invalid(&[K("run"), K("command"), I(i)], e.to_string()))?;
        }
        for (name, value) in &run.env {
            placeholders::check(value, RUN_VARIABLES).map_err(|e| {
                invalid(
                    &[K("run"), K("env"), PathPart::Name(name.clone())],
                    e.to_string(),
                )
            })?;
        }
        if run.listen < 1024 {
            return Err(invalid(
                &[K("run"), K("listen")],
                format!(
                    "port {} is below 1024; cutover's proxy binds unprivileged ports only",
                    run.listen
                ),
            ));
        }
        if run.stop_timeout.is_zero() {
            return Err(invalid(
                &[K("run"), K("stop_timeout")],
                "must be more than 0s",
            ));
        }
        for k in run.env.keys() {
            if k.is_empty() || k.contains(['=', '\0']) {
                return Err(invalid(
                    &[K("run"), K("env")],
                    format!("invalid variable name {k:?}"),
                ));
            }
        }
        if let Some(u) = &run.user
            && u.trim().is_empty()
        {
            return Err(invalid(&[K("run"), K("user")], "must not be empty"));
        }

        let h = &self.health;
        let named = [h.http.is_some(), h.tcp == Some(true), h.exec.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if named == 0 {
            return Err(invalid(
                &[K("health")],
                "no health check: set one of http = \"/healthz\", tcp = true or exec = [\"./check\"]",
            ));
        }
        if named > 1 {
            return Err(invalid(
                &[K("health")],
                "set only one of http, tcp and exec",
            ));
        }
        if let Some(p) = &h.http
            && !p.starts_with('/')
        {
            return Err(invalid(
                &[K("health"), K("http")],
                "must be a path starting with '/'",
            ));
        }
        if let Some(c) = &h.exec
            && (c.is_empty() || c[0].trim().is_empty())
        {
            return Err(invalid(
                &[K("health"), K("exec")],
                "must name a program to run",
            ));
        }
        for (key, d) in [
            ("interval", h.interval),
            ("timeout", h.timeout),
            ("start_timeout", h.start_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(&[K("health"), K(key)], "must be more than 0s"));
            }
        }
        if h.healthy_after == 0 {
            return Err(invalid(
                &[K("health"), K("healthy_after")],
                "must be at least 1",
            ));
        }
        if h.unhealthy_after == 0 {
            return Err(invalid(
                &[K("health"), K("unhealthy_after")],
                "must be at least 1",
            ));
        }

        let s = &self.strategy;
        check_count(&s.max_parallel, false)
            .map_err(|m| invalid(&[K("strategy"), K("max_parallel")], m))?;
        if s.steps.is_empty() {
            return Err(invalid(
                &[K("strategy"), K("steps")],
                "no steps: add at least { traffic = 100 }",
            ));
        }
        let mut prev_traffic = 0;
        let mut prev_hosts: Option<Count> = None;
        for (i, step) in s.steps.iter().enumerate() {
            let at = |k: &'static str| vec![K("strategy"), K("steps"), I(i), K(k)];
            if step.traffic == 0 || step.traffic > 100 {
                return Err(invalid(
                    &at("traffic"),
                    format!("traffic {} is not a percentage from 1 to 100", step.traffic),
                ));
            }
            if step.traffic < prev_traffic {
                return Err(invalid(
                    &at("traffic"),
                    format!(
                        "traffic goes down from {prev_traffic} to {}; steps must not lower traffic",
                        step.traffic
                    ),
                ));
            }
            if let Some(c) = &step.hosts {
                check_count(c, false).map_err(|m| invalid(&at("hosts"), m))?;
                if let Some(p) = prev_hosts
                    && same_kind_smaller(c, &p)
                {
                    return Err(invalid(
                        &at("hosts"),
                        format!("hosts goes down from {p} to {c}; later steps must not drop hosts"),
                    ));
                }
                prev_hosts = Some(*c);
            } else if prev_hosts.is_some() {
                // A step without `hosts` takes every target host: always a superset.
                prev_hosts = Some(Count::Percent(100));
            }
            if step.traffic == prev_traffic && step.hosts.is_none() && i > 0 && !step.pause {
                let same_hosts = s.steps[i - 1].hosts.is_none();
                if same_hosts && step.hold.is_zero() {
                    return Err(invalid(
                        &at("traffic"),
                        format!("step repeats traffic {} and changes nothing", step.traffic),
                    ));
                }
            }
            prev_traffic = step.traffic;
        }
        let last = s.steps.len() - 1;
        if s.steps[last].traffic != 100 {
            return Err(invalid(
                &[K("strategy"), K("steps"), I(last), K("traffic")],
                format!(
                    "the last step sends {}% to the new release; it must end at 100",
                    s.steps[last].traffic
                ),
            ));
        }
        if let Some(c) = &s.steps[last].hosts
            && *c != Count::Percent(100)
        {
            return Err(invalid(
                &[K("strategy"), K("steps"), I(last), K("hosts")],
                "the last step must cover every target host: leave hosts out or write \"100%\"",
            ));
        }
        if s.host_lost_after.is_zero() {
            return Err(invalid(
                &[K("strategy"), K("host_lost_after")],
                "must be more than 0s",
            ));
        }
        if s.progress_deadline.is_zero() {
            return Err(invalid(
                &[K("strategy"), K("progress_deadline")],
                "must be more than 0s",
            ));
        }

        if let Some(a) = &self.analysis {
            if a.interval.is_zero() {
                return Err(invalid(
                    &[K("analysis"), K("interval")],
                    "must be more than 0s",
                ));
            }
            if a.failure_limit == 0 {
                return Err(invalid(
                    &[K("analysis"), K("failure_limit")],
                    "must be at least 1",
                ));
            }
            for (i, m) in a.metric.iter().enumerate() {
                let at = |k: &'static str| vec![K("analysis"), K("metric"), I(i), K(k)];
                if m.max.is_none()
                    && m.min.is_none()
                    && m.max_vs_baseline.is_none()
                    && m.judge.is_none()
                {
                    return Err(invalid(
                        &[K("analysis"), K("metric"), I(i)],
                        "metric has no bound: set max, min, max_vs_baseline or judge",
                    ));
                }
                for (k, v) in [("max", m.max), ("min", m.min)] {
                    if let Some(v) = v
                        && (!v.is_finite() || v < 0.0)
                    {
                        return Err(invalid(&at(k), "must be a number of 0 or more"));
                    }
                }
                if let (Some(lo), Some(hi)) = (m.min, m.max)
                    && lo > hi
                {
                    return Err(invalid(&at("min"), format!("min {lo} is above max {hi}")));
                }
                if m.name == MetricName::ErrorRate
                    && let Some(v) = m.max
                    && v > 1.0
                {
                    return Err(invalid(
                        &at("max"),
                        format!("error_rate is a fraction from 0 to 1; {v} is above 1"),
                    ));
                }
                if let Some(v) = m.max_vs_baseline
                    && (!v.is_finite() || v <= 0.0)
                {
                    return Err(invalid(
                        &at("max_vs_baseline"),
                        "must be a ratio above 0, e.g. 1.5",
                    ));
                }
                if let Some(c) = m.confidence {
                    if m.judge.is_none() {
                        return Err(invalid(&at("confidence"), "needs judge = \"mann-whitney\""));
                    }
                    if !(c > 0.0 && c < 1.0) {
                        return Err(invalid(
                            &at("confidence"),
                            "must be between 0 and 1, e.g. 0.95",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn same_kind_smaller(now: &Count, before: &Count) -> bool {
    match (now, before) {
        (Count::Hosts(a), Count::Hosts(b)) | (Count::Percent(a), Count::Percent(b)) => a < b,
        _ => false,
    }
}

fn check_count(c: &Count, zero_ok: bool) -> Result<(), String> {
    match *c {
        Count::Hosts(0) if !zero_ok => Err("must be at least 1 host".into()),
        Count::Percent(p) if p == 0 || p > 100 => {
            Err(format!("{p}% is not a share from 1% to 100%"))
        }
        _ => Ok(()),
    }
}

/// Checks an artifact URL's scheme.
pub fn check_artifact_url(url: &str) -> Result<(), String> {
    let ok = ["file:///", "http://", "https://"]
        .iter()
        .any(|p| url.starts_with(p) && url.len() > p.len());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{url:?} is not a file:///, http:// or https:// URL"
        ))
    }
}

/// Checks that `hex` is a SHA-256 digest: 64 hexadecimal digits.
pub fn check_sha256(hex: &str) -> Result<(), String> {
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!(
            "{hex:?} is not a SHA-256 digest (64 hexadecimal digits; `sha256sum FILE` prints it)"
        ))
    }
}

/// Turns a toml/serde error into a located, one-line error in the plan's words: wrong
/// types name the key and what it takes, typos get the nearest known word.
fn from_toml(e: &toml::de::Error, text: &str, file: &str) -> PlanError {
    let span = e.span().filter(|s| text.get(s.clone()).is_some());
    let offset = span.as_ref().map_or(0, |s| s.start);
    let (line, column) = line_col(text, offset);
    let raw = e.message().trim().replace('\n', " ");
    let at = span.map(|span| At {
        spot: spot_at(text, span.start),
        text,
        span,
    });
    PlanError {
        file: file.to_string(),
        line,
        column,
        message: improve_message(&raw, at),
    }
}

/// Where a serde error points: what is there and its place in the text.
struct At<'a> {
    spot: Spot,
    text: &'a str,
    span: std::ops::Range<usize>,
}

fn improve_message(raw: &str, at: Option<At<'_>>) -> String {
    // serde: "unknown field `heath`, expected one of `a`, `b`" or "expected `a` or `b`"
    if let Some(rest) = raw.strip_prefix("unknown field `") {
        let name = rest.split('`').next().unwrap_or_default();
        let expected = quoted_words(rest);
        let mut msg = format!("unknown key `{name}`");
        if let Some(best) = nearest(name, &expected) {
            msg.push_str(&format!(": did you mean `{best}`?"));
        } else if !expected.is_empty() {
            msg.push_str(&format!("; known keys here: {}", expected.join(", ")));
        }
        return msg;
    }
    let key = at
        .as_ref()
        .map_or(String::new(), |a| key_path(&a.spot.path));
    let keyed = |msg: String| {
        if key.is_empty() {
            msg
        } else {
            format!("{key}: {msg}")
        }
    };
    if let Some(rest) = raw.strip_prefix("unknown variant `") {
        let name = rest.split('`').next().unwrap_or_default();
        let expected = quoted_words(rest);
        let mut msg = format!("unknown value {name:?}");
        if let Some(best) = nearest(name, &expected) {
            msg.push_str(&format!(": did you mean {best:?}?"));
        } else if !expected.is_empty() {
            msg.push_str(&format!("; expected one of {}", expected.join(", ")));
        }
        return keyed(msg);
    }
    if let Some(rest) = raw.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or_default();
        return match name {
            "health" => "missing [health] section: a health check is required".to_string(),
            "release" | "run" => format!("missing [{name}] section"),
            _ => keyed(format!("missing key `{name}`")),
        };
    }
    let Some(at) = at else {
        return raw.to_string();
    };
    // serde: "invalid type: string \"8080\", expected u16"; toml, for an enum given a
    // number or a list: "wanted string or table".
    let expected = raw
        .strip_prefix("invalid type: ")
        .or_else(|| raw.strip_prefix("invalid value: "))
        .and_then(|r| r.split_once(", expected "))
        .map(|(_, e)| e.to_string())
        .or_else(|| {
            (raw == "wanted string or table").then(|| one_of(&enum_words(at.text, at.span.clone())))
        });
    match expected {
        Some(expected) => {
            let found = at.text[at.span.clone()].trim();
            // A table whose text starts with `[` is a `[section]` header.
            let found = if at.spot.table && found.starts_with('[') {
                "a [section]"
            } else {
                found
            };
            type_message(&at.spot.path, &expected, found)
        }
        None => keyed(raw.to_string()),
    }
}

/// `run.listen must be a port number 1–65535 (found 80800)`.
fn type_message(path: &[PathPart], expected: &str, found: &str) -> String {
    // An element of a list or of a table of the user's keys is described by its key.
    let keep = path
        .iter()
        .rposition(|p| matches!(p, PathPart::Key(_)))
        .map_or(0, |i| i + 1);
    let path = &path[..keep];
    let lookup: Vec<&str> = path
        .iter()
        .filter_map(|p| match p {
            PathPart::Key(k) => Some(k.as_ref()),
            _ => None,
        })
        .collect();
    let lookup = lookup.join(".");
    let want = EXPECTED
        .iter()
        .find(|(k, _)| *k == lookup)
        .map_or_else(|| plain_expected(expected), |(_, w)| w.to_string());
    // One line, and short: a value may span lines.
    let found = found.split_whitespace().collect::<Vec<_>>().join(" ");
    let found = if found.chars().count() > 40 {
        format!("{}…", found.chars().take(40).collect::<String>())
    } else {
        found
    };
    let key = key_path(path);
    let key = if key.is_empty() { "the plan" } else { &key };
    format!("{key} must be {want} (found {found})")
}

/// What the keys whose type alone says too little take, by key path (list indices
/// left out). Every other key is described from its type by [`plain_expected`].
const EXPECTED: &[(&str, &str)] = &[
    ("service", "a service name in quotes, like \"web\""),
    ("release", "a [release] section"),
    ("release.version", "a version in quotes, like \"1.4.2\""),
    (
        "release.artifact",
        "a URL in quotes, like \"https://artifacts.example/web-1.4.2.tar.gz\"",
    ),
    (
        "release.sha256",
        "the artifact's SHA-256 in quotes (64 hexadecimal digits)",
    ),
    (
        "release.committed_at",
        "a time in quotes, like \"2025-01-31T12:00:00Z\"",
    ),
    ("targets", "a [targets] section"),
    (
        "targets.labels",
        "a table of labels like { env = \"prod\", role = \"web\" }",
    ),
    ("run", "a [run] section"),
    (
        "run.command",
        "a list of strings like [\"./bin/web\", \"--port\", \"${PORT}\"]",
    ),
    ("run.env", "a table of strings like { RUST_LOG = \"info\" }"),
    ("run.listen", "a port number 1–65535"),
    ("run.user", "a user name in quotes, like \"web\""),
    ("health", "a [health] section"),
    ("health.http", "a path in quotes, like \"/healthz\""),
    ("health.exec", "a list of strings like [\"./bin/check\"]"),
    ("health.healthy_after", "a number of checks, like 2"),
    ("health.unhealthy_after", "a number of checks, like 3"),
    ("strategy", "a [strategy] section"),
    ("strategy.max_failed_hosts", "a number of hosts, like 0"),
    (
        "strategy.steps",
        "a list of steps like [{ traffic = 10, hold = \"5m\" }, { traffic = 100 }]",
    ),
    (
        "strategy.steps.traffic",
        "a percentage from 1 to 100, like 10",
    ),
    ("analysis", "an [analysis] section"),
    ("analysis.failure_limit", "a number of intervals, like 2"),
    ("analysis.min_requests", "a number of requests, like 50"),
    (
        "analysis.metric",
        "[[analysis.metric]] sections, each naming a metric and its bounds",
    ),
    ("analysis.metric.max", "a number, like 0.01 or 500"),
    ("analysis.metric.min", "a number, like 0.01 or 500"),
    ("analysis.metric.max_vs_baseline", "a ratio, like 1.5"),
    (
        "analysis.metric.confidence",
        "a number between 0 and 1, like 0.95",
    ),
];

/// serde's name for a type, in the plan's words.
fn plain_expected(expected: &str) -> String {
    let plain = match expected {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" | "u64" | "usize" => "a whole number, 0 or more",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a string" | "a borrowed string" => "text in quotes",
        "a sequence" => "a list in brackets, like [\"a\", \"b\"]",
        "a map" => "a table, like { key = \"value\" }",
        e if e.starts_with("struct ") => "a table: a [section] or { key = value, ... }",
        // A visitor's own words ("a duration like \"30s\"", "one of ..."), already plain.
        e => return e.to_string(),
    };
    plain.to_string()
}

/// `"http" or "tcp"`; `one of the words this key takes` when they are not known.
fn one_of(words: &[String]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    match quoted.as_slice() {
        [] => "one of the words this key takes, in quotes".to_string(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The words a key taking one of a few (an enum) accepts: learnt by parsing the plan
/// again with an impossible word at `span`, which serde answers with the list.
fn enum_words(text: &str, span: std::ops::Range<usize>) -> Vec<String> {
    let probe = format!("{}\"?\"{}", &text[..span.start], &text[span.end..]);
    match toml::from_str::<Plan>(&probe) {
        Err(e) if e.span().is_some_and(|s| s.start == span.start) => {
            let m = e.message();
            m.strip_prefix("unknown variant `")
                .map(|rest| quoted_words(rest).iter().map(|w| w.to_string()).collect())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// The words between backticks after "expected" in a serde message.
fn quoted_words(rest: &str) -> Vec<&str> {
    rest.split_once("expected")
        .map(|(_, tail)| tail.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default()
}

/// What is at a byte offset of the plan: the key path of the narrowest key or value
/// holding it, and whether that value is a table.
#[derive(Default)]
struct Spot {
    path: Vec<PathPart>,
    table: bool,
    len: usize,
}

/// The [`Spot`] at byte `offset` of `text`.
fn spot_at(text: &str, offset: usize) -> Spot {
    let Ok(root) = toml::de::DeTable::parse(text) else {
        return Spot::default();
    };
    let mut best = None;
    let mut path = Vec::new();
    visit_table(root.get_ref(), false, offset, &mut path, &mut best);
    best.unwrap_or_default()
}

/// Tables whose keys the user chooses (label and variable names), not the model.
const USER_KEYED: &[&str] = &["labels", "env"];

fn visit_table(
    table: &toml::de::DeTable<'_>,
    user_keyed: bool,
    offset: usize,
    path: &mut Vec<PathPart>,
    best: &mut Option<Spot>,
) {
    for (k, v) in table.iter() {
        let key = k.get_ref().to_string();
        let children_user_keyed = !user_keyed && USER_KEYED.contains(&key.as_str());
        path.push(if user_keyed {
            PathPart::Name(key)
        } else {
            PathPart::Key(Cow::Owned(key))
        });
        consider(k.span(), false, offset, path, best);
        consider(v.span(), is_table(v), offset, path, best);
        visit_value(v.get_ref(), children_user_keyed, offset, path, best);
        path.pop();
    }
}

fn visit_value(
    value: &toml::de::DeValue<'_>,
    user_keyed: bool,
    offset: usize,
    path: &mut Vec<PathPart>,
    best: &mut Option<Spot>,
) {
    match value {
        toml::de::DeValue::Table(t) => visit_table(t, user_keyed, offset, path, best),
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(I(i));
                consider(item.span(), is_table(item), offset, path, best);
                visit_value(item.get_ref(), false, offset, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

fn is_table(v: &toml::Spanned<toml::de::DeValue<'_>>) -> bool {
    matches!(v.get_ref(), toml::de::DeValue::Table(_))
}

/// Keeps `path` when `span` holds `offset` and is the narrowest such span so far.
fn consider(
    span: std::ops::Range<usize>,
    table: bool,
    offset: usize,
    path: &[PathPart],
    best: &mut Option<Spot>,
) {
    if span.contains(&offset) && best.as_ref().is_none_or(|b| span.len() <= b.len) {
        *best = Some(Spot {
            path: path.to_vec(),
            table,
            len: span.len(),
        });
    }
}

/// The known word closest to `word`, if it is close enough to be a typo of it.
pub fn nearest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(word, k), *k))
        .filter(|(d, k)| *d <= (k.len().max(word.len()) / 3).max(1) + usize::from(k.len() > 5))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Byte offset of the value at `path`, or of the deepest part of it that exists.
fn locate(text: &str, path: &[PathPart]) -> usize {
    let Ok(root) = toml::de::DeTable::parse(text) else {
        return 0;
    };
    let mut best = 0;
    let mut table = Some(root.get_ref());
    let mut value: Option<&toml::Spanned<toml::de::DeValue<'_>>> = None;
    for part in path {
        let next = match (part, table, value) {
            (PathPart::Key(k), Some(t), _) => t.get(k.as_ref()),
            (PathPart::Key(k), None, Some(v)) => v.get_ref().get(k.as_ref()),
            (PathPart::Name(k), Some(t), _) => t.get(k.as_str()),
            (PathPart::Name(k), None, Some(v)) => v.get_ref().get(k.as_str()),
            (PathPart::Index(i), _, Some(v)) => v.get_ref().get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        best = next.span().start;
        value = Some(next);
        table = None;
    }
    best
}

#[cfg(test)]
mod tests;
