//! What operators read about deployments, computed from the records and their
//! timelines: history, one deployment's story (`show`), typical phase durations and the
//! ETA they give, stragglers, and the DORA figures (`stats`). Pure: records and events
//! in, serialisable values out; `now` is an argument.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use crate::model::{DeploymentRecord, HostPhase, State};
use crate::timeline::{Event, Kind};

pub fn rfc3339(ms: u64) -> Value {
    if ms == 0 {
        return Value::Null;
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    Value::String(humantime::format_rfc3339_millis(t).to_string())
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Count, mean, median and 90th percentile (nearest rank) of durations, in seconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Spread {
    pub count: usize,
    pub mean_s: Option<f64>,
    pub median_s: Option<f64>,
    pub p90_s: Option<f64>,
}

pub fn spread(ms: &[u64]) -> Spread {
    if ms.is_empty() {
        return Spread::default();
    }
    let mut v = ms.to_vec();
    v.sort_unstable();
    let rank = |p: f64| {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        secs(v[i])
    };
    let median = if v.len() % 2 == 1 {
        secs(v[v.len() / 2])
    } else {
        secs((v[v.len() / 2 - 1] + v[v.len() / 2]) / 2)
    };
    Spread {
        count: v.len(),
        mean_s: Some(secs(v.iter().sum::<u64>() / v.len() as u64)),
        median_s: Some(median),
        p90_s: Some(rank(0.9)),
    }
}

/// How long the phases of one deployment took, from its timeline.
#[derive(Debug, Default, PartialEq)]
pub struct Phases {
    /// Submitted to the first step's weights going out (every host prepared).
    pub prepare_ms: Option<u64>,
    /// Per host: its first reported phase to ready.
    pub host_prepare_ms: BTreeMap<String, u64>,
    /// Per step: weights sent to confirmed by every host.
    pub switch_ms: Vec<u64>,
    /// Submitted to ended.
    pub total_ms: Option<u64>,
}

pub fn phases(d: &DeploymentRecord, events: &[Event]) -> Phases {
    let mut p = Phases::default();
    let mut host_start: BTreeMap<&str, u64> = BTreeMap::new();
    let mut step_start: Option<u64> = None;
    for e in events {
        match &e.kind {
            Kind::HostPhase { host, .. } => {
                host_start.entry(host.as_str()).or_insert(e.at_unix_ms);
            }
            Kind::HostReady {
                host,
                timings: Some(t),
            } => {
                // The agent's own measure, exact even for phases too short to be seen.
                p.host_prepare_ms
                    .insert(host.clone(), t.fetch_ms + t.unpack_ms + t.start_ms);
            }
            Kind::HostReady { host, .. } => {
                if let Some(t) = host_start.get(host.as_str()) {
                    p.host_prepare_ms
                        .insert(host.clone(), e.at_unix_ms.saturating_sub(*t));
                }
            }
            Kind::StepStarted { .. } => {
                if p.prepare_ms.is_none() {
                    p.prepare_ms = Some(e.at_unix_ms.saturating_sub(d.created_unix_ms));
                }
                step_start = Some(e.at_unix_ms);
            }
            Kind::StepHolding { .. } => {
                if let Some(t) = step_start.take() {
                    p.switch_ms.push(e.at_unix_ms.saturating_sub(t));
                }
            }
            _ => {}
        }
    }
    p.total_ms = d.ended_unix_ms.map(|e| e.saturating_sub(d.created_unix_ms));
    p
}

/// Typical durations over a service's past successful deployments.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Typical {
    /// How many past successful deployments they come from.
    pub deployments: usize,
    pub prepare: Spread,
    pub host_prepare: Spread,
    pub switch: Spread,
    pub total: Spread,
}

/// A deployment made by `cutover deploy` that changed something (not a rollback, not a
/// no-op).
fn is_change(d: &DeploymentRecord) -> bool {
    !d.is_rollback && !d.hosts.values().all(|h| h.untouched)
}

pub fn typical(
    records: &[DeploymentRecord],
    events: &BTreeMap<String, Vec<Event>>,
    service: &str,
) -> Typical {
    let mut t = Typical::default();
    let (mut prep, mut host, mut switch, mut total) = (vec![], vec![], vec![], vec![]);
    for d in records
        .iter()
        .filter(|d| d.service == service && d.state == State::Succeeded && is_change(d))
    {
        let p = phases(d, events.get(&d.id).map_or(&[][..], Vec::as_slice));
        t.deployments += 1;
        prep.extend(p.prepare_ms);
        host.extend(p.host_prepare_ms.values());
        switch.extend(p.switch_ms);
        total.extend(p.total_ms);
    }
    t.prepare = spread(&prep);
    t.host_prepare = spread(&host);
    t.switch = spread(&switch);
    t.total = spread(&total);
    t
}

fn ms_of(s: Option<f64>) -> u64 {
    s.map_or(0, |v| (v * 1000.0) as u64)
}

/// Time left for an active deployment, in ms: the typical (median) preparation and
/// switch times still ahead, the holds and bake the plan still has to wait, minus what
/// the current phase has used already.
pub fn eta_ms(d: &DeploymentRecord, events: &[Event], t: &Typical, now: u64) -> Option<u64> {
    if d.state.is_final() {
        return None;
    }
    let steps = &d.plan.strategy.steps;
    let switch = ms_of(t.switch.median_s);
    let current = d.step as usize;
    let started_steps = events
        .iter()
        .any(|e| matches!(e.kind, Kind::StepStarted { .. }));
    let mut left: u64 = 0;
    if !started_steps {
        let elapsed = now.saturating_sub(d.created_unix_ms);
        left += ms_of(t.prepare.median_s).saturating_sub(elapsed);
    }
    for (i, s) in steps.iter().enumerate().skip(current) {
        let hold = s.hold.as_millis();
        if i == current {
            match d.held_ms(now) {
                Some(held) => left += hold.saturating_sub(held),
                None => left += switch + hold,
            }
        } else {
            left += switch + hold;
        }
    }
    left += d.plan.strategy.bake.as_millis();
    Some(left)
}

/// Hosts far slower than the others in preparation: still preparing after three times
/// the median of the hosts that finished (or of the typical host preparation), and at
/// least 5 s. Returns (host, seconds so far).
pub fn stragglers(
    d: &DeploymentRecord,
    events: &[Event],
    t: &Typical,
    now: u64,
) -> Vec<(String, f64)> {
    let p = phases(d, events);
    let done: Vec<u64> = p.host_prepare_ms.values().copied().collect();
    let reference = spread(&done).median_s.or(t.host_prepare.median_s);
    let Some(reference) = reference else {
        return Vec::new();
    };
    let limit = ((reference * 3000.0) as u64).max(5_000);
    let mut first: BTreeMap<&str, u64> = BTreeMap::new();
    for e in events {
        if let Kind::HostPhase { host, .. } = &e.kind {
            first.entry(host.as_str()).or_insert(e.at_unix_ms);
        }
    }
    d.hosts
        .iter()
        .filter(|(_, h)| h.phase == HostPhase::Preparing)
        .filter_map(|(name, _)| {
            let since = *first.get(name.as_str())?;
            let elapsed = now.saturating_sub(since);
            (elapsed > limit).then(|| (name.clone(), secs(elapsed)))
        })
        .collect()
}

/// One line per deployment, newest first.
pub fn history(
    records: &[DeploymentRecord],
    service: Option<&str>,
    since: u64,
    limit: usize,
) -> Value {
    let mut rows: Vec<&DeploymentRecord> = records
        .iter()
        .filter(|d| service.is_none_or(|s| d.service == s) && d.created_unix_ms >= since)
        .collect();
    rows.sort_by(|a, b| {
        b.created_unix_ms
            .cmp(&a.created_unix_ms)
            .then(b.id.cmp(&a.id))
    });
    Value::Array(
        rows.into_iter()
            .take(limit)
            .map(|d| {
                json!({
                    "id": d.id,
                    "service": d.service,
                    "release": d.release,
                    "previous_release": d.previous_release,
                    "state": d.state.as_str(),
                    "rollback": d.is_rollback,
                    "created_at": rfc3339(d.created_unix_ms),
                    "ended_at": d.ended_unix_ms.map_or(Value::Null, rfc3339),
                    "duration_s": d.ended_unix_ms.map(|e| secs(e.saturating_sub(d.created_unix_ms))),
                    "reason": d.reason,
                })
            })
            .collect(),
    )
}

/// Where a deployment that did not succeed went wrong: the phase, the reason and the
/// hosts that failed.
pub fn failure(d: &DeploymentRecord, events: &[Event]) -> Value {
    if matches!(d.state, State::Succeeded) || !d.state.is_final() && d.rollback.is_none() {
        return Value::Null;
    }
    json!({
        "phase": failure_phase(d, events),
        "reason": d.reason,
        "hosts": d.hosts.iter()
            .filter(|(_, h)| h.phase == HostPhase::Failed || failed_preparing(h))
            .map(|(n, h)| json!({"name": n, "error": h.error}))
            .collect::<Vec<_>>(),
    })
}

/// A host whose preparation failed and that the fleet-wide rollback then set back: its
/// phase says `rolled_back`, its error why it failed.
fn failed_preparing(h: &crate::model::DeployHost) -> bool {
    h.phase == HostPhase::RolledBack && h.error.is_some() && !h.lost
}

/// The hosts whose preparation failed in a deployment: from its timeline, and from its
/// record (a failure that triggered the rollback in the same decision left no event in
/// timelines written before that was recorded).
fn hosts_failed(d: &DeploymentRecord, events: &[Event]) -> std::collections::BTreeSet<String> {
    let mut hosts: std::collections::BTreeSet<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::HostFailed { host, .. } => Some(host.clone()),
            _ => None,
        })
        .collect();
    hosts.extend(
        d.hosts
            .iter()
            .filter(|(_, h)| !h.lost && (h.phase == HostPhase::Failed || failed_preparing(h)))
            .map(|(n, _)| n.clone()),
    );
    hosts
}

/// Whether the new release carried traffic before the deployment ended or rolled back:
/// a step's weights went out.
fn carried_traffic(events: &[Event]) -> bool {
    events
        .iter()
        .take_while(|e| !matches!(e.kind, Kind::RollbackStarted { .. } | Kind::Ended { .. }))
        .any(|e| matches!(e.kind, Kind::StepStarted { traffic, .. } if traffic > 0))
}

/// `preparing`, `at N%` (the traffic the new release had), or `baking`.
fn failure_phase(d: &DeploymentRecord, events: &[Event]) -> String {
    let end = events
        .iter()
        .position(|e| matches!(e.kind, Kind::RollbackStarted { .. } | Kind::Ended { .. }))
        .unwrap_or(events.len());
    let mut traffic = None;
    let mut held_last = false;
    for e in &events[..end] {
        match e.kind {
            Kind::StepStarted { traffic: t, .. } => {
                traffic = Some(t);
                held_last = false;
            }
            Kind::StepHolding { step, .. } => {
                held_last = step as usize + 1 == d.plan.strategy.steps.len();
            }
            _ => {}
        }
    }
    match traffic {
        None => "preparing".into(),
        Some(_) if held_last && !d.plan.strategy.bake.is_zero() => "baking".into(),
        Some(t) => format!("at {t}%"),
    }
}

/// One deployment's story: failure first (if any), then its timeline, typical times, the
/// ETA and stragglers.
pub fn show(d: &DeploymentRecord, events: &[Event], typical: &Typical, now: u64) -> Value {
    let timeline: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("at".into(), rfc3339(e.at_unix_ms));
                m.insert(
                    "offset_s".into(),
                    json!(secs(e.at_unix_ms.saturating_sub(d.created_unix_ms))),
                );
                m.insert("text".into(), json!(e.describe()));
            }
            v
        })
        .collect();
    let elapsed = d
        .ended_unix_ms
        .unwrap_or(now)
        .saturating_sub(d.created_unix_ms);
    // Holding: the step's weights are confirmed everywhere and the deployment waits out
    // its hold (and, at the last step, the bake) before moving on.
    let holding = d.state == State::Progressing && d.step_switched_unix_ms.is_some();
    let last = d.step as usize + 1 == d.plan.strategy.steps.len();
    let bake_ms = (holding && last && !d.plan.strategy.bake.is_zero())
        .then(|| d.plan.strategy.bake.as_millis());
    let hold_ms = d
        .plan
        .strategy
        .steps
        .get(d.step as usize)
        .filter(|_| holding)
        .map(|s| s.hold.as_millis() + bake_ms.unwrap_or(0));
    json!({
        "id": d.id,
        "service": d.service,
        "release": d.release,
        "previous_release": d.previous_release,
        "state": d.state.as_str(),
        "reason": d.reason,
        "failure": failure(d, events),
        "step": d.step,
        "steps": d.plan.strategy.steps.len(),
        "traffic": d.traffic,
        "created_at": rfc3339(d.created_unix_ms),
        "ended_at": d.ended_unix_ms.map_or(Value::Null, rfc3339),
        "elapsed_s": secs(elapsed),
        "phase_elapsed_s": secs(d.held_ms(d.ended_unix_ms.unwrap_or(now)).unwrap_or_else(|| d.ended_unix_ms.unwrap_or(now).saturating_sub(d.phase_started_unix_ms))),
        "holding": holding,
        "hold_s": hold_ms.map(secs),
        "bake_s": bake_ms.map(secs),
        "hosts": d.hosts.iter().map(|(n, h)| json!({
            "name": n,
            "phase": h.phase.as_str(),
            "weight": h.weight,
            "error": h.error,
        })).collect::<Vec<_>>(),
        "last_interval": d.analysis.intervals.last().map(|i| json!({
            "traffic": i.traffic,
            "verdict": match &i.verdict {
                crate::analysis::Verdict::Pass => "pass".to_string(),
                crate::analysis::Verdict::Fail(w) => format!("fail: {w}"),
                crate::analysis::Verdict::Inconclusive(w) => format!("inconclusive: {w}"),
            },
            "new_requests": i.new_requests,
            "old_requests": i.old_requests,
            "metrics": i.metrics.iter().map(|m| json!({
                "name": crate::analysis::metric_name(m.name),
                "new": m.new, "old": m.old,
                "unit": crate::analysis::unit(m.name),
                "text": crate::analysis::figure(m),
            })).collect::<Vec<_>>(),
        })),
        "host_prepare_s": phases(d, events).host_prepare_ms.into_iter().map(|(h, ms)| (h, secs(ms))).collect::<BTreeMap<_, _>>(),
        "typical": typical,
        "eta_s": eta_ms(d, events, typical, now).map(secs),
        "stragglers": stragglers(d, events, typical, now).into_iter()
            .map(|(h, s)| json!({"host": h, "preparing_s": s})).collect::<Vec<_>>(),
        "timeline": timeline,
    })
}

/// DORA figures and where failures happen, over deployments created since `since`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Stats {
    pub service: Option<String>,
    pub since: Value,
    pub days: f64,
    /// Deployments that changed something (`cutover deploy`, not rollbacks or no-ops).
    pub deployments: usize,
    pub deployments_per_day: f64,
    pub succeeded: usize,
    pub rolled_back: usize,
    pub failed: usize,
    pub aborted: usize,
    /// Succeeded, then undone by `cutover rollback` before anything else succeeded.
    pub rolled_back_manually: usize,
    /// Ended without success before the new release carried any traffic (a failed
    /// preparation, say): no user saw it, so not a change failure.
    pub failed_before_traffic: usize,
    /// Deployments that degraded service: rolled back (or failed, or aborted after a
    /// failing analysis interval) once the new release carried traffic, or succeeded and
    /// were then rolled back by hand.
    pub change_failures: usize,
    /// change failures / deployments.
    pub change_failure_rate: Option<f64>,
    /// For each change failure: first bad signal to the last host back on the previous
    /// release, or the manual rollback's own duration.
    pub time_to_restore: Spread,
    pub deployment_duration: Spread,
    /// `[release] committed_at` to the end of a successful deployment.
    pub lead_time: Spread,
    pub failures_by_phase: BTreeMap<String, usize>,
    pub failures_by_host: BTreeMap<String, usize>,
}

pub fn stats(
    records: &[DeploymentRecord],
    events: &BTreeMap<String, Vec<Event>>,
    service: Option<&str>,
    since: u64,
    now: u64,
) -> Stats {
    let mut s = Stats {
        service: service.map(String::from),
        since: rfc3339(since),
        days: ((now.saturating_sub(since)) as f64 / 86_400_000.0 * 1000.0).round() / 1000.0,
        ..Stats::default()
    };
    let mut all: Vec<&DeploymentRecord> = records
        .iter()
        .filter(|d| service.is_none_or(|sv| d.service == sv))
        .collect();
    all.sort_by_key(|d| (d.created_unix_ms, d.id.clone()));
    let (mut restore, mut duration, mut lead) = (vec![], vec![], vec![]);
    let none: Vec<Event> = Vec::new();
    for (i, d) in all.iter().enumerate() {
        if d.created_unix_ms < since || !is_change(d) || !d.state.is_final() {
            continue;
        }
        s.deployments += 1;
        let evs = events.get(&d.id).unwrap_or(&none);
        match d.state {
            State::Succeeded => {
                s.succeeded += 1;
                if let Some(e) = d.ended_unix_ms {
                    duration.push(e.saturating_sub(d.created_unix_ms));
                    lead.extend(lead_time(d, e));
                }
                if let Some(r) = manual_undo(d, &all[i + 1..]) {
                    s.rolled_back_manually += 1;
                    s.change_failures += 1;
                    if let Some(e) = r.ended_unix_ms {
                        restore.push(e.saturating_sub(r.created_unix_ms));
                    }
                    *s.failures_by_phase
                        .entry("after success (manual rollback)".into())
                        .or_default() += 1;
                }
            }
            State::RolledBack | State::Failed | State::Aborted => {
                match d.state {
                    State::RolledBack => s.rolled_back += 1,
                    State::Failed => s.failed += 1,
                    _ => s.aborted += 1,
                }
                let miss = miss(d, evs);
                match miss {
                    Miss::BeforeTraffic => s.failed_before_traffic += 1,
                    Miss::ChangeFailure => {
                        s.change_failures += 1;
                        if let Some(r) = &d.rollback
                            && let Some(done) = r.done_unix_ms
                        {
                            restore.push(done.saturating_sub(r.first_bad_unix_ms));
                        }
                    }
                    Miss::Stopped => {}
                }
                if miss != Miss::Stopped {
                    *s.failures_by_phase
                        .entry(failure_phase(d, evs))
                        .or_default() += 1;
                }
            }
            _ => {}
        }
        for host in hosts_failed(d, evs) {
            *s.failures_by_host.entry(host).or_default() += 1;
        }
    }
    if s.days > 0.0 {
        s.deployments_per_day = ((s.deployments as f64 / s.days) * 1000.0).round() / 1000.0;
    }
    if s.deployments > 0 {
        s.change_failure_rate =
            Some(((s.change_failures as f64 / s.deployments as f64) * 10_000.0).round() / 10_000.0);
    }
    s.time_to_restore = spread(&restore);
    s.deployment_duration = spread(&duration);
    s.lead_time = spread(&lead);
    s
}

/// How a deployment that ended without success counts in the figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Miss {
    /// It failed before the new release carried any traffic: no user saw it.
    BeforeTraffic,
    /// It degraded service: the new release carried traffic and was found bad (by
    /// analysis, the health watch, or an operator after a failing interval).
    ChangeFailure,
    /// An operator stopped a release that nothing had found bad.
    Stopped,
}

fn miss(d: &DeploymentRecord, events: &[Event]) -> Miss {
    let failing_interval = || {
        d.analysis
            .intervals
            .iter()
            .any(|i| matches!(i.verdict, crate::analysis::Verdict::Fail(_)))
    };
    match (d.state, carried_traffic(events)) {
        (State::Aborted, true) if failing_interval() => Miss::ChangeFailure,
        (State::Aborted, _) => Miss::Stopped,
        (_, false) => Miss::BeforeTraffic,
        (_, true) => Miss::ChangeFailure,
    }
}

/// `[release] committed_at` to `ended`, in ms, when the plan says when.
fn lead_time(d: &DeploymentRecord, ended: u64) -> Option<u64> {
    let committed = d.plan.release.committed_at.as_deref()?;
    let at = humantime::parse_rfc3339_weak(committed).ok()?;
    let at = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(ended.saturating_sub(at.as_millis() as u64))
}

/// The `cutover rollback` that undid successful deployment `d`, if the next finished
/// deployment of its service is one; `later` are the deployments created after `d`.
fn manual_undo<'a>(
    d: &DeploymentRecord,
    later: &[&'a DeploymentRecord],
) -> Option<&'a DeploymentRecord> {
    later
        .iter()
        .filter(|n| n.service == d.service && n.state.is_final())
        .find(|n| n.state == State::Succeeded)
        .filter(|n| n.is_rollback && n.previous_release.as_deref() == Some(&d.release))
        .copied()
}

#[cfg(test)]
mod tests;
