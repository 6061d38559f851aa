//! Validation: the values a plan's types alone do not rule out, checked section by
//! section in the order of the file (service, targets, release, run, health, strategy,
//! analysis, database). The first problem found is the one reported, as a key path and a message
//! in the plan's words; `Plan::parse` locates the path in the text.

use super::RUN_VARIABLES;
use super::model::{
    Analysis, Count, Database, Health, Metric, MetricName, Plan, Release, Run, Step, Strategy,
    Targets,
};

mod sources;
use super::path::{I, K, PathPart};
use crate::names::{check_label, check_name};
use crate::placeholders;

/// A value problem found by [`Plan::validate`], located by key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Keys and array indices from the document root, e.g. `strategy.steps.2.traffic`.
    pub path: Vec<PathPart>,
    /// What is wrong there, in the plan's words.
    pub message: String,
}

/// An [`Invalid`] at `path`.
fn invalid(path: &[PathPart], message: impl Into<String>) -> Invalid {
    Invalid {
        path: path.to_vec(),
        message: message.into(),
    }
}

/// Fails at `path` when the duration `d` is zero.
fn more_than_zero(path: &[PathPart], d: crate::duration::Duration) -> Result<(), Invalid> {
    if d.is_zero() {
        return Err(invalid(path, "must be more than 0s"));
    }
    Ok(())
}

/// Fails at `path` when the count `n` is zero.
fn at_least_one(path: &[PathPart], n: u32) -> Result<(), Invalid> {
    if n == 0 {
        return Err(invalid(path, "must be at least 1"));
    }
    Ok(())
}

impl Plan {
    /// Checks values that the types alone do not rule out.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_name("service", &self.service).map_err(|m| invalid(&[K("service")], m))?;
        validate_targets(&self.targets)?;
        validate_release(&self.release)?;
        validate_run(&self.run)?;
        validate_env_sources(&self.run)?;
        validate_health(&self.health)?;
        validate_strategy(&self.strategy)?;
        if let Some(a) = &self.analysis {
            validate_analysis(a)?;
        }
        if let Some(db) = &self.database {
            validate_database(db, &self.release.version)?;
        }
        Ok(())
    }
}

/// `[targets]`: every label follows the one label rule.
fn validate_targets(t: &Targets) -> Result<(), Invalid> {
    for (k, v) in &t.labels {
        check_label(k, v).map_err(|m| invalid(&[K("targets"), K("labels")], m))?;
    }
    Ok(())
}

/// `[release]`: a version usable as a directory name, a fetchable URL, a SHA-256, and a
/// signature that looks like one.
fn validate_release(r: &Release) -> Result<(), Invalid> {
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
    Ok(())
}

/// `[run]`: a program to run, only known placeholders, an unprivileged port, a stop
/// timeout, usable variable names and a user if one is named.
fn validate_run(run: &Run) -> Result<(), Invalid> {
    validate_command(run)?;
    if run.listen < 1024 {
        return Err(invalid(
            &[K("run"), K("listen")],
            format!(
                "port {} is below 1024; cutover's proxy binds unprivileged ports only",
                run.listen
            ),
        ));
    }
    more_than_zero(&[K("run"), K("stop_timeout")], run.stop_timeout)?;
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
    Ok(())
}

/// `[run] env_files` and `secret_env`: absolute paths the agent can read on each host
/// (no two alike), and secret names that are variable names.
fn validate_env_sources(run: &Run) -> Result<(), Invalid> {
    for (i, f) in run.env_files.iter().enumerate() {
        let at = [K("run"), K("env_files"), I(i)];
        if !f.starts_with('/') || f.contains('\0') {
            return Err(invalid(
                &at,
                format!("{f:?} is not an absolute path; write e.g. \"/etc/cutover/web.env\""),
            ));
        }
        if run.env_files[..i].contains(f) {
            return Err(invalid(&at, format!("{f} is listed twice")));
        }
    }
    for (i, k) in run.secret_env.iter().enumerate() {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(invalid(
                &[K("run"), K("secret_env"), I(i)],
                format!("invalid variable name {k:?}"),
            ));
        }
    }
    Ok(())
}

/// `[run] command` names a program, and it and `env` hold only `${PORT}`.
fn validate_command(run: &Run) -> Result<(), Invalid> {
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
    Ok(())
}

/// `[health]`: exactly one well-formed check, and timings and thresholds above zero.
fn validate_health(h: &Health) -> Result<(), Invalid> {
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
    more_than_zero(&[K("health"), K("interval")], h.interval)?;
    more_than_zero(&[K("health"), K("timeout")], h.timeout)?;
    more_than_zero(&[K("health"), K("start_timeout")], h.start_timeout)?;
    at_least_one(&[K("health"), K("healthy_after")], h.healthy_after)?;
    at_least_one(&[K("health"), K("unhealthy_after")], h.unhealthy_after)
}

/// `[strategy]`: a host count for preparing, a ladder of steps, and deadlines above zero.
fn validate_strategy(s: &Strategy) -> Result<(), Invalid> {
    check_count(&s.max_parallel).map_err(|m| invalid(&[K("strategy"), K("max_parallel")], m))?;
    validate_steps(&s.steps)?;
    more_than_zero(&[K("strategy"), K("host_lost_after")], s.host_lost_after)?;
    more_than_zero(
        &[K("strategy"), K("progress_deadline")],
        s.progress_deadline,
    )
}

/// `[strategy] steps`: at least one; traffic from 1 to 100 and never lower; host waves
/// never smaller; no step that changes nothing; the last at 100 % of every target host.
fn validate_steps(steps: &[Step]) -> Result<(), Invalid> {
    let Some(last) = steps.len().checked_sub(1) else {
        return Err(invalid(
            &[K("strategy"), K("steps")],
            "no steps: add at least { traffic = 100 }",
        ));
    };
    let mut before = Ladder::default();
    for (i, step) in steps.iter().enumerate() {
        before = check_step(i, step, before)?;
    }
    let at = |k: &'static str| [K("strategy"), K("steps"), I(last), K(k)];
    if steps[last].traffic != 100 {
        return Err(invalid(
            &at("traffic"),
            format!(
                "the last step sends {}% to the new release; it must end at 100",
                steps[last].traffic
            ),
        ));
    }
    if let Some(c) = &steps[last].hosts
        && *c != Count::Percent(100)
    {
        return Err(invalid(
            &at("hosts"),
            "the last step must cover every target host: leave hosts out or write \"100%\"",
        ));
    }
    Ok(())
}

/// Where the steps so far have brought traffic and hosts.
#[derive(Default)]
struct Ladder {
    /// The previous step's traffic (0 before the first).
    traffic: u32,
    /// The widest host wave so far, once a step has named one; a step without `hosts`
    /// after that counts as every host.
    hosts: Option<Count>,
    /// Whether the previous step named no hosts (so took every target host); false
    /// before the first step.
    all_hosts: bool,
}

/// Step `i` against the ladder before it; returns the ladder after it.
fn check_step(i: usize, step: &Step, before: Ladder) -> Result<Ladder, Invalid> {
    let at = |k: &'static str| [K("strategy"), K("steps"), I(i), K(k)];
    if step.traffic == 0 || step.traffic > 100 {
        return Err(invalid(
            &at("traffic"),
            format!("traffic {} is not a percentage from 1 to 100", step.traffic),
        ));
    }
    if step.traffic < before.traffic {
        return Err(invalid(
            &at("traffic"),
            format!(
                "traffic goes down from {} to {}; steps must not lower traffic",
                before.traffic, step.traffic
            ),
        ));
    }
    let hosts = match &step.hosts {
        Some(c) => {
            check_count(c).map_err(|m| invalid(&at("hosts"), m))?;
            if let Some(p) = before.hosts
                && same_kind_smaller(c, &p)
            {
                return Err(invalid(
                    &at("hosts"),
                    format!("hosts goes down from {p} to {c}; later steps must not drop hosts"),
                ));
            }
            Some(*c)
        }
        // A step without `hosts` takes every target host: always a superset.
        None => before.hosts.map(|_| Count::Percent(100)),
    };
    let repeats = step.traffic == before.traffic && before.all_hosts;
    if repeats && step.hosts.is_none() && !step.pause && step.hold.is_zero() {
        return Err(invalid(
            &at("traffic"),
            format!("step repeats traffic {} and changes nothing", step.traffic),
        ));
    }
    Ok(Ladder {
        traffic: step.traffic,
        hosts,
        all_hosts: step.hosts.is_none(),
    })
}

/// True when `now` is a smaller count of the same kind (hosts or share) than `before`.
fn same_kind_smaller(now: &Count, before: &Count) -> bool {
    match (now, before) {
        (Count::Hosts(a), Count::Hosts(b)) | (Count::Percent(a), Count::Percent(b)) => a < b,
        _ => false,
    }
}

/// A host count of at least 1, or a share from 1 % to 100 %.
fn check_count(c: &Count) -> Result<(), String> {
    match *c {
        Count::Hosts(0) => Err("must be at least 1 host".into()),
        Count::Percent(p) if p == 0 || p > 100 => {
            Err(format!("{p}% is not a share from 1% to 100%"))
        }
        _ => Ok(()),
    }
}

/// `[analysis]`: an interval and limits above zero, where metrics come from, and every
/// metric measuring one thing, bounded.
fn validate_analysis(a: &Analysis) -> Result<(), Invalid> {
    more_than_zero(&[K("analysis"), K("interval")], a.interval)?;
    at_least_one(&[K("analysis"), K("failure_limit")], a.failure_limit)?;
    sources::validate_settings(a)?;
    for (i, m) in a.metric.iter().enumerate() {
        sources::validate_measure(a, i, m)?;
        validate_metric(i, m)?;
    }
    Ok(())
}

/// `[[analysis.metric]]` number `i`: a bound of some kind, each bound a sensible number,
/// and a confidence only for a judge.
fn validate_metric(i: usize, m: &Metric) -> Result<(), Invalid> {
    let at = |k: &'static str| [K("analysis"), K("metric"), I(i), K(k)];
    if m.max.is_none()
        && m.min.is_none()
        && m.max_vs_baseline.is_none()
        && m.min_vs_baseline.is_none()
        && m.judge.is_none()
    {
        return Err(invalid(
            &[K("analysis"), K("metric"), I(i)],
            "metric has no bound: set max, min, max_vs_baseline, min_vs_baseline or judge",
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
    if m.proxy_name() == Some(MetricName::ErrorRate)
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
    if let Some(v) = m.min_vs_baseline
        && (!v.is_finite() || v <= 0.0)
    {
        return Err(invalid(
            &at("min_vs_baseline"),
            "must be a ratio above 0, e.g. 0.8",
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
    Ok(())
}

/// `[database]`: a schema template that gives a usable schema name for this release,
/// three commands that each name a program, a timeout and `run_on` labels.
fn validate_database(db: &Database, version: &str) -> Result<(), Invalid> {
    let at = |k: &'static str| [K("database"), K(k)];
    placeholders::check(&db.schema, &["RELEASE"])
        .map_err(|e| invalid(&at("schema"), e.to_string()))?;
    let name = db.schema_name(version);
    check_schema_name(&name).map_err(|why| {
        invalid(
            &at("schema"),
            format!(
                "{:?} gives {name:?} for release {version}, which {why}",
                db.schema
            ),
        )
    })?;
    for (key, command) in [
        ("expand", &db.expand),
        ("contract", &db.contract),
        ("abort", &db.abort),
    ] {
        if command.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(invalid(
                &at(key),
                "must name the program to run, e.g. [\"psql\", \"-v\", \"ON_ERROR_STOP=1\", \"-f\", \"db/expand.sql\"]",
            ));
        }
    }
    more_than_zero(&at("timeout"), db.timeout)?;
    for (k, v) in &db.run_on {
        check_label(k, v).map_err(|m| invalid(&at("run_on"), m))?;
    }
    Ok(())
}

/// A schema name PostgreSQL takes unquoted: a letter or `_`, then letters, digits and
/// `_`, at most 63 bytes (longer names are cut by the server), and not `pg_…` (names
/// the server keeps for itself). Returns what is wrong with it.
pub fn check_schema_name(name: &str) -> Result<(), &'static str> {
    let first_ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    if name.is_empty() {
        Err("is empty")
    } else if name.len() > 63 {
        Err("is longer than 63 characters")
    } else if !first_ok || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Err("is not a schema name (a letter or _ first, then letters, digits and _)")
    } else if name.to_ascii_lowercase().starts_with("pg_") {
        Err("starts with pg_, which PostgreSQL keeps for its own schemas")
    } else {
        Ok(())
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

#[cfg(test)]
mod tests;
