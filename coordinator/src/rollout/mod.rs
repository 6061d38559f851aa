//! The rollout decision: a pure function of (deployment, what the hosts report, command,
//! now) that returns the next deployment record and the desired state each host should
//! get. It does no IO and reads no clock; the engine calls it in a loop and carries out
//! what it returns.
//!
//! The decision is level-triggered: the desired state of every host is derived from the
//! deployment record alone (host phase, traffic), so deciding again on the same inputs
//! yields nothing new, and a restarted coordinator simply decides again.

use std::collections::BTreeMap;

use cutover_proto::v1::{DesiredService, ObservedService, SlotPhase, SlotStatus};
use cutover_shared::plan::OnHostLost;

use crate::analysis::{self, Counters, Sample, Verdict};
use crate::model::{
    DeployHost, DeploymentRecord, HostPhase, IntervalRecord, Pause, PauseCause, RollbackTiming,
    Slot, State,
};

mod desired;

pub use desired::{plan_host, slot_spec, target};

/// What the coordinator knows of one target host.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostView<'a> {
    pub connected: bool,
    /// How long the host has been unreachable (0 while connected), in milliseconds.
    pub lost_ms: u64,
    /// The desired state last written for this service on this host.
    pub desired: Option<&'a DesiredService>,
    /// The host's latest report for this service.
    pub observed: Option<&'a ObservedService>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Promote,
    Abort,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Promote => "promote",
            Command::Abort => "abort",
        }
    }
}

#[derive(Debug)]
pub struct Decision {
    pub deployment: DeploymentRecord,
    /// Hosts whose desired state must change, with the new state (generation unset).
    pub targets: BTreeMap<String, DesiredService>,
}

fn step_host_names(dep: &DeploymentRecord) -> Vec<String> {
    let names: Vec<&String> = dep.hosts.keys().collect();
    let step = &dep.plan.strategy.steps[(dep.step as usize).min(dep.plan.strategy.steps.len() - 1)];
    let n = step.hosts.map_or(names.len(), |c| c.of(names.len()));
    names.into_iter().take(n).cloned().collect()
}

fn new_status<'a>(view: &HostView<'a>, host: &DeployHost) -> Option<&'a SlotStatus> {
    view.observed.and_then(|o| o.slot(host.new_slot))
}

fn is_current(view: &HostView<'_>) -> bool {
    match (view.observed, view.desired) {
        (Some(o), Some(d)) => o.generation >= d.generation,
        _ => false,
    }
}

/// True when the host's latest report answers the desired state this deployment wants
/// of it now: that state has been written (it is the host's desired state) and the
/// agent has seen it. An older report may describe the host as it was before — a warm
/// slot holding the same release with another spec, or a port error of an earlier
/// attempt — and vouches for nothing in this deployment.
fn answers(dep: &DeploymentRecord, view: &HostView<'_>, host: &DeployHost) -> bool {
    let Some(d) = view.desired else {
        return false;
    };
    if let Some(want) = target(dep, host, Some(d)) {
        let mut have = d.clone();
        have.generation = 0;
        if have != want {
            return false;
        }
    }
    is_current(view)
}

/// True when the host answers what the deployment wants of it (see [`answers`]) with
/// that state's weights in effect.
fn weights_confirmed(dep: &DeploymentRecord, view: &HostView<'_>, host: &DeployHost) -> bool {
    let (Some(o), Some(d)) = (view.observed, view.desired) else {
        return false;
    };
    answers(dep, view, host)
        && o.weight(host.new_slot) == d.weight(host.new_slot)
        && host.old_slot.is_none_or(|s| o.weight(s) == d.weight(s))
}

/// Decides the next state of `dep`.
pub fn decide(
    dep: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
    command: Option<Command>,
    now: u64,
) -> Decision {
    let mut d = dep.clone();
    if !d.state.is_final() {
        advance(&mut d, views, command, now);
    }
    let mut targets = BTreeMap::new();
    for (name, host) in &d.hosts {
        let view = views.get(name).copied().unwrap_or_default();
        if let Some(t) = target(&d, host, view.desired) {
            let mut cur = view.desired.cloned().unwrap_or_default();
            cur.generation = 0;
            if cur != t {
                targets.insert(name.clone(), t);
            }
        }
    }
    Decision {
        deployment: d,
        targets,
    }
}

fn begin_rollback(
    d: &mut DeploymentRecord,
    ending: State,
    reason: String,
    first_bad: u64,
    now: u64,
) {
    let first_deployment = d
        .hosts
        .values()
        .all(|h| h.old_slot.is_none() && !h.untouched);
    d.ending = Some(if ending == State::RolledBack && first_deployment {
        State::Failed
    } else {
        ending
    });
    d.reason.get_or_insert(reason);
    d.rollback.get_or_insert(RollbackTiming {
        first_bad_unix_ms: first_bad.min(now),
        decided_unix_ms: now,
        done_unix_ms: None,
    });
    d.state = State::RollingBack;
    d.pause = None;
    d.phase_started_unix_ms = now;
    d.traffic = 0;
    for h in d.hosts.values_mut() {
        if h.untouched || h.phase == HostPhase::Waiting {
            continue;
        }
        h.phase = HostPhase::RolledBack;
        h.weight = 0;
    }
}

/// Pauses the deployment: it will come back to the state it is in now.
fn pause(d: &mut DeploymentRecord, cause: PauseCause, now: u64) {
    d.ending = Some(d.state);
    d.state = State::Paused;
    d.pause = Some(Pause {
        cause,
        since_unix_ms: now,
    });
}

/// Ends a pause. The time paused does not count against the step's hold or the
/// progress deadline: both clocks move forward by it.
fn resume(d: &mut DeploymentRecord, now: u64) {
    d.state = d.ending.take().unwrap_or(State::Progressing);
    match d.pause.take() {
        Some(p) => {
            let paused = now.saturating_sub(p.since_unix_ms);
            if let Some(at) = d.step_switched_unix_ms.as_mut() {
                *at = at.saturating_add(paused);
            }
            d.phase_started_unix_ms = d.phase_started_unix_ms.saturating_add(paused);
            match p.cause {
                PauseCause::StepGate => d.gate_passed = true,
                PauseCause::HostLost => d.reason = None,
                PauseCause::Operator => {}
            }
        }
        // A record written before pauses were timed: take it as the step's gate.
        None => d.gate_passed = d.step_switched_unix_ms.is_some(),
    }
}

fn advance(
    d: &mut DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
    command: Option<Command>,
    now: u64,
) {
    match command {
        Some(Command::Abort) if d.state != State::RollingBack => {
            begin_rollback(d, State::Aborted, "aborted by operator".into(), now, now);
        }
        Some(Command::Pause) if matches!(d.state, State::Preparing | State::Progressing) => {
            pause(d, PauseCause::Operator, now);
        }
        Some(c @ (Command::Resume | Command::Promote)) if d.state == State::Paused => {
            resume(d, now);
            if c == Command::Promote {
                d.promoted = true;
            }
        }
        Some(Command::Promote) if d.state == State::Progressing => d.promoted = true,
        _ => {}
    }

    // Settle: a transition (next step, say) may enable another at the same instant, and
    // taking them all now keeps deciding idempotent.
    for _ in 0..8 {
        let before = (d.state, d.step, d.step_switched_unix_ms);
        settle(d, views, now);
        if d.state.is_final() || (d.state, d.step, d.step_switched_unix_ms) == before {
            break;
        }
    }
}

fn settle(d: &mut DeploymentRecord, views: &BTreeMap<String, HostView<'_>>, now: u64) {
    let view = |name: &str| views.get(name).copied().unwrap_or_default();
    if d.state == State::Pending {
        d.state = State::Preparing;
        d.phase_started_unix_ms = now;
    }
    if matches!(d.state, State::Preparing | State::Progressing) && hosts_lost(d, views, now) {
        return;
    }

    // Health watch: a new slot that carries traffic and turns unhealthy rolls back.
    if matches!(d.state, State::Progressing | State::Paused) {
        let bad = d.hosts.iter().find_map(|(name, h)| {
            if h.untouched
                || !matches!(h.phase, HostPhase::Ready | HostPhase::Switched)
                || h.weight == 0
            {
                return None;
            }
            let v = view(name);
            if let Some(o) = v.observed
                && !o.error.is_empty()
                && is_current(&v)
            {
                return Some(format!("host {name}: {}", o.error));
            }
            if let Some(o) = v.observed
                && !o.healing.is_empty()
            {
                return Some(format!(
                    "host {name}: {} while serving {}%; the agent moved its traffic back",
                    o.healing, h.weight
                ));
            }
            let st = new_status(&v, h)?;
            let phase = SlotPhase::try_from(st.phase).unwrap_or(SlotPhase::Empty);
            (st.release == d.release && matches!(phase, SlotPhase::Unhealthy | SlotPhase::Failed))
                .then(|| {
                    let why = if st.error.is_empty() {
                        SlotPhase::of(st.phase).name().to_string()
                    } else {
                        st.error.clone()
                    };
                    format!(
                        "host {name}: new release {} while serving {}%: {why}",
                        SlotPhase::of(st.phase).name(),
                        h.weight
                    )
                })
        });
        if let Some(reason) = bad {
            begin_rollback(d, State::RolledBack, reason, now, now);
        }
    }

    let strategy = d.plan.strategy.clone();
    if d.state == State::Paused && d.step_switched_unix_ms.is_some() && analyse(d, views, now) {
        return;
    }
    match d.state {
        State::Preparing => {
            let step_hosts = step_host_names(d);
            // Observe hosts in preparation.
            for name in &step_hosts {
                let v = view(name);
                let answered = d.hosts.get(name).is_some_and(|h| answers(d, &v, h));
                let Some(h) = d.hosts.get_mut(name) else {
                    continue;
                };
                if h.phase != HostPhase::Preparing || !answered {
                    continue;
                }
                let svc_error = v.observed.map(|o| o.error.as_str()).unwrap_or_default();
                if let Some(st) = new_status(&v, h)
                    && st.release == d.release
                {
                    match SlotPhase::try_from(st.phase).unwrap_or(SlotPhase::Empty) {
                        SlotPhase::Healthy => h.phase = HostPhase::Ready,
                        SlotPhase::Failed => {
                            h.phase = HostPhase::Failed;
                            h.error = Some(if st.error.is_empty() {
                                "slot failed".into()
                            } else {
                                st.error.clone()
                            });
                        }
                        _ => {}
                    }
                }
                if h.phase == HostPhase::Preparing && !svc_error.is_empty() {
                    h.phase = HostPhase::Failed;
                    h.error = Some(svc_error.to_string());
                }
            }
            let failed: Vec<(&String, &DeployHost)> = d
                .hosts
                .iter()
                .filter(|(_, h)| h.phase == HostPhase::Failed && !h.lost)
                .collect();
            let candidates = d.hosts.values().filter(|h| !h.untouched).count();
            if failed.len() > strategy.max_failed_hosts as usize
                || (!failed.is_empty() && failed.len() == candidates)
            {
                let (name, h) = failed[0];
                let reason = format!(
                    "host {name}: {}",
                    h.error.as_deref().unwrap_or("preparation failed")
                );
                begin_rollback(d, State::RolledBack, reason, now, now);
                return;
            }
            // The same error on several hosts is the release's fault, not the hosts':
            // no tolerance for it. One host's own error is quarantined within
            // max_failed_hosts.
            let mut by_error: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
            for (name, h) in &failed {
                by_error
                    .entry(h.error.as_deref().unwrap_or(""))
                    .or_default()
                    .push(name);
            }
            let shared = by_error.iter().find(|(_, hosts)| hosts.len() >= 2);
            if let Some((error, hosts)) = shared {
                let names: Vec<&str> = hosts.iter().map(|s| s.as_str()).collect();
                let reason = format!(
                    "hosts {}: {error} (the same failure on {} hosts: a release fault, not a host fault)",
                    names.join(", "),
                    names.len()
                );
                begin_rollback(d, State::RolledBack, reason, now, now);
                return;
            }
            // Start more hosts, max_parallel at a time.
            let limit = strategy.max_parallel.of(d.hosts.len()).max(1);
            let mut in_flight = d
                .hosts
                .values()
                .filter(|h| h.phase == HostPhase::Preparing)
                .count();
            for name in &step_hosts {
                if in_flight >= limit {
                    break;
                }
                if let Some(h) = d.hosts.get_mut(name)
                    && h.phase == HostPhase::Waiting
                {
                    h.phase = HostPhase::Preparing;
                    in_flight += 1;
                }
            }
            let done = step_hosts.iter().all(|n| {
                d.hosts.get(n).is_some_and(|h| {
                    matches!(
                        h.phase,
                        HostPhase::Ready | HostPhase::Switched | HostPhase::Failed
                    )
                })
            });
            if done {
                let traffic = strategy.steps[d.step as usize].traffic;
                d.traffic = traffic;
                for name in &step_hosts {
                    if let Some(h) = d.hosts.get_mut(name)
                        && !h.untouched
                        && matches!(h.phase, HostPhase::Ready | HostPhase::Switched)
                    {
                        h.phase = HostPhase::Ready;
                        h.weight = traffic;
                    }
                }
                d.state = State::Progressing;
                d.phase_started_unix_ms = now;
                d.step_switched_unix_ms = None;
            } else if now.saturating_sub(d.phase_started_unix_ms)
                > strategy.progress_deadline.as_millis()
            {
                let slow: Vec<String> = step_hosts
                    .iter()
                    .filter(|n| {
                        d.hosts.get(*n).is_some_and(|h| {
                            matches!(h.phase, HostPhase::Preparing | HostPhase::Waiting)
                        })
                    })
                    .take(5)
                    .cloned()
                    .collect();
                let reason = format!(
                    "progress deadline {} passed while preparing hosts {}",
                    strategy.progress_deadline,
                    slow.join(", ")
                );
                begin_rollback(d, State::RolledBack, reason, now, now);
            }
        }
        State::Progressing => {
            let confirmed: Vec<String> = d
                .hosts
                .iter()
                .filter(|(name, h)| {
                    h.phase == HostPhase::Ready && weights_confirmed(d, &view(name), h)
                })
                .map(|(name, _)| name.clone())
                .collect();
            for name in confirmed {
                if let Some(h) = d.hosts.get_mut(&name) {
                    h.phase = HostPhase::Switched;
                }
            }
            let step_hosts = step_host_names(d);
            let all_switched = step_hosts.iter().all(|n| {
                d.hosts
                    .get(n)
                    .is_some_and(|h| matches!(h.phase, HostPhase::Switched | HostPhase::Failed))
            });
            if d.step_switched_unix_ms.is_none() {
                if all_switched {
                    d.step_switched_unix_ms = Some(now);
                    d.analysis.interval_started_unix_ms = None;
                    d.analysis.passes_in_step = 0;
                } else if now.saturating_sub(d.phase_started_unix_ms)
                    > strategy.progress_deadline.as_millis()
                {
                    begin_rollback(
                        d,
                        State::RolledBack,
                        format!(
                            "progress deadline {} passed while switching traffic",
                            strategy.progress_deadline
                        ),
                        now,
                        now,
                    );
                    return;
                }
            }
            let Some(held) = d.held_ms(now) else {
                return;
            };
            if analyse(d, views, now) {
                return;
            }
            let step = &strategy.steps[d.step as usize];
            let last = d.step as usize + 1 == strategy.steps.len();
            if step.pause && !d.promoted && !d.gate_passed {
                pause(d, PauseCause::StepGate, now);
                return;
            }
            let mut wait = step.hold.as_millis();
            if last {
                wait += strategy.bake.as_millis();
            }
            if !d.promoted && held < wait {
                return;
            }
            // A step is proven only by at least one conclusive passing interval.
            if !d.promoted && d.plan.analysis.is_some() && d.analysis.passes_in_step == 0 {
                if held > wait + strategy.progress_deadline.as_millis() {
                    let reason = format!(
                        "no conclusive analysis interval within progress deadline {} at {}%",
                        strategy.progress_deadline, d.traffic
                    );
                    begin_rollback(d, State::RolledBack, reason, now, now);
                }
                return;
            }
            // A host that is not reporting cannot vouch for this step: wait for it, or
            // for `host_lost_after` to set it aside, before going further.
            let silent = d
                .hosts
                .iter()
                .any(|(n, h)| !h.untouched && h.phase == HostPhase::Switched && !view(n).connected);
            if silent {
                return;
            }
            d.promoted = false;
            d.gate_passed = false;
            if last {
                d.state = State::Succeeded;
                d.ended_unix_ms = Some(now);
                d.reason = None;
                // Hosts set aside while unreachable follow the fleet: they are told to
                // run the new release, and their agent moves traffic to it once it is
                // healthy there.
                for h in d.hosts.values_mut() {
                    if h.lost && h.old_slot.is_some() {
                        h.phase = HostPhase::Switched;
                        h.weight = 100;
                        h.error = Some("was unreachable; takes the release when it returns".into());
                    }
                }
                return;
            }
            d.step += 1;
            d.step_switched_unix_ms = None;
            d.phase_started_unix_ms = now;
            d.state = State::Preparing;
        }
        State::RollingBack => {
            let converged = d.hosts.iter().all(|(name, h)| {
                let v = view(name);
                h.untouched
                    || h.phase == HostPhase::Waiting
                    || !v.connected
                    || weights_confirmed(d, &v, h)
            });
            if converged {
                d.state = d.ending.take().unwrap_or(State::RolledBack);
                d.ended_unix_ms = Some(now);
                if let Some(r) = d.rollback.as_mut() {
                    r.done_unix_ms = Some(now);
                }
            }
        }
        _ => {}
    }
}

/// Applies `on_host_lost` to hosts unreachable for `host_lost_after`. A lost host is
/// never counted as healthy: it is set aside (it converges on the fleet's state when it
/// comes back). Returns true when the deployment stopped or paused because of it.
fn hosts_lost(d: &mut DeploymentRecord, views: &BTreeMap<String, HostView<'_>>, now: u64) -> bool {
    let after = d.plan.strategy.host_lost_after;
    let lost: Vec<String> = d
        .hosts
        .iter()
        .filter(|(name, h)| {
            !h.untouched
                && matches!(
                    h.phase,
                    HostPhase::Preparing | HostPhase::Ready | HostPhase::Switched
                )
                && views
                    .get(*name)
                    .is_some_and(|v| !v.connected && v.lost_ms >= after.as_millis())
        })
        .map(|(name, _)| name.clone())
        .collect();
    if lost.is_empty() {
        return false;
    }
    let names = lost.join(", ");
    for name in &lost {
        if let Some(h) = d.hosts.get_mut(name) {
            h.phase = HostPhase::Failed;
            h.lost = true;
            h.weight = 0;
            h.error = Some(format!("unreachable for more than {after}"));
        }
    }
    match d.plan.strategy.on_host_lost {
        OnHostLost::Rollback => {
            let reason = format!(
                "host {names} unreachable for more than {after} (on_host_lost = \"rollback\")"
            );
            begin_rollback(d, State::RolledBack, reason, now, now);
            true
        }
        OnHostLost::Pause => {
            pause(d, PauseCause::HostLost, now);
            d.reason = Some(format!(
                "paused: host {names} unreachable for more than {after} (on_host_lost = \"pause\"); `resume` goes on without it, `abort` rolls back"
            ));
            true
        }
        OnHostLost::Continue => false,
    }
}

/// Newest intervals kept in a deployment record.
const KEEP_INTERVALS: usize = 500;

/// Runs the analysis interval that is due, if any. Returns true when it started a
/// rollback.
fn analyse(d: &mut DeploymentRecord, views: &BTreeMap<String, HostView<'_>>, now: u64) -> bool {
    let Some(plan) = d.plan.analysis.clone() else {
        return false;
    };
    // Counters of the hosts that carry the new release next to the old one.
    let mut current = BTreeMap::new();
    for (name, h) in &d.hosts {
        if h.untouched || h.phase != HostPhase::Switched || h.weight == 0 {
            continue;
        }
        let Some(o) = views.get(name).and_then(|v| v.observed) else {
            continue;
        };
        let counters = |s: Option<Slot>| {
            s.and_then(|s| o.slot(s))
                .and_then(|st| st.metrics.as_ref())
                .map(Counters::from_pb)
                .unwrap_or_default()
        };
        current.insert(
            name.clone(),
            (counters(Some(h.new_slot)), counters(h.old_slot)),
        );
    }
    let Some(started) = d.analysis.interval_started_unix_ms else {
        d.analysis.interval_started_unix_ms = Some(now);
        d.analysis.snapshot = current;
        return false;
    };
    if now.saturating_sub(started) < plan.interval.as_millis() {
        return false;
    }
    let mut sample = Sample {
        seconds: now.saturating_sub(started) as f64 / 1000.0,
        ..Sample::default()
    };
    for (name, (new, old)) in &current {
        let (snap_new, snap_old) = d.analysis.snapshot.get(name).cloned().unwrap_or_default();
        sample.new.add(&new.since(&snap_new));
        sample.old.add(&old.since(&snap_old));
    }
    let (verdict, metrics) = analysis::judge(&plan, &sample);
    d.analysis.snapshot = current;
    d.analysis.interval_started_unix_ms = Some(now);
    d.analysis.intervals.push(IntervalRecord {
        step: d.step,
        traffic: d.traffic,
        started_unix_ms: started,
        ended_unix_ms: now,
        new_requests: sample.new.requests,
        old_requests: sample.old.requests,
        verdict: verdict.clone(),
        metrics,
    });
    if d.analysis.intervals.len() > KEEP_INTERVALS {
        let extra = d.analysis.intervals.len() - KEEP_INTERVALS;
        d.analysis.intervals.drain(..extra);
    }
    match verdict {
        Verdict::Pass => {
            d.analysis.consecutive_failures = 0;
            d.analysis.first_failure_unix_ms = None;
            d.analysis.passes_in_step += 1;
        }
        Verdict::Inconclusive(_) => {}
        Verdict::Fail(why) => {
            d.analysis.consecutive_failures += 1;
            let first = *d.analysis.first_failure_unix_ms.get_or_insert(now);
            if d.analysis.consecutive_failures >= plan.failure_limit {
                let reason = format!(
                    "analysis failed {} interval(s) in a row at {}%: {why}",
                    d.analysis.consecutive_failures, d.traffic
                );
                begin_rollback(d, State::RolledBack, reason, first, now);
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests;
