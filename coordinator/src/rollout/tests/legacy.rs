//! The decision core as it was before it was split into named phases, kept verbatim
//! (rollout's `decide` with its translation to desired state, and the timeline's
//! `diff`, `host_progress` and `add_timings`) so that the equivalence test can drive it
//! and the reshaped core through the same histories.

#![allow(clippy::all, dead_code)]

use std::collections::{BTreeMap, HashMap};

use cutover_proto::v1::{
    DesiredService, ExecCheck, HealthSpec, Protocol as WireProtocol, Release, RunSpec, SlotPhase,
    SlotSpec, SlotStatus, health_spec,
};
use cutover_shared::plan::{Check, OnHostLost, Plan, Protocol};

use crate::analysis::{self, Counters, Sample, Verdict, figure};
use crate::model::{
    DeployHost, DeploymentRecord, Front, HostPhase, IntervalRecord, Pause, PauseCause,
    RollbackTiming, Slot, State,
};
use crate::rollout::{Command, HostView};
use crate::timeline::{Event, Kind, Timings};

#[derive(Debug)]
pub struct Decision {
    pub deployment: DeploymentRecord,
    /// Hosts whose desired state must change, with the new state (generation unset).
    pub targets: BTreeMap<String, DesiredService>,
}

/// The slot spec a plan asks for.
pub fn slot_spec(plan: &Plan) -> SlotSpec {
    let h = &plan.health;
    let check = match h.check() {
        Some(Check::Http(p)) => Some(health_spec::Check::HttpPath(p)),
        Some(Check::Tcp) => Some(health_spec::Check::Tcp(true)),
        Some(Check::Exec(c)) => Some(health_spec::Check::Exec(ExecCheck { command: c })),
        None => None,
    };
    SlotSpec {
        release: Some(Release {
            version: plan.release.version.clone(),
            artifact: plan.release.artifact.clone(),
            sha256: plan.release.sha256.to_ascii_lowercase(),
            signature: plan.release.signature.clone().unwrap_or_default(),
        }),
        run: Some(RunSpec {
            command: plan.run.command.clone(),
            env: plan.run.env.clone().into_iter().collect(),
            stop_timeout_ms: plan.run.stop_timeout.as_millis(),
            user: plan.run.user.clone().unwrap_or_default(),
        }),
        health: Some(HealthSpec {
            check,
            interval_ms: h.interval.as_millis(),
            timeout_ms: h.timeout.as_millis(),
            healthy_after: h.healthy_after,
            unhealthy_after: h.unhealthy_after,
            start_timeout_ms: h.start_timeout.as_millis(),
        }),
    }
}

/// Plans a host's part in a new deployment of `plan`, from the host's current desired
/// state: which slot gets the release, which slot was live, and whether the host already
/// runs this release.
pub fn plan_host(plan: &Plan, current: Option<&DesiredService>) -> DeployHost {
    let want = (plan.release.version.as_str(), plan.release.sha256.as_str());
    let mut host = DeployHost {
        phase: HostPhase::Waiting,
        new_slot: Slot::Blue,
        old_slot: None,
        weight: 0,
        error: None,
        untouched: false,
        lost: false,
        old_front: None,
        reported: None,
    };
    let Some(cur) = current else { return host };
    if cur.listen != 0 {
        host.old_front = Some(Front {
            listen: cur.listen,
            protocol: cur.protocol,
            drain_ms: cur.drain_ms,
        });
    }
    let live = cur.live_slot();
    let holds = |s: Slot| {
        cur.slot(s)
            .and_then(SlotSpec::release_key)
            .is_some_and(|(v, sha)| v == want.0 && sha.eq_ignore_ascii_case(want.1))
    };
    // Untouched only when the live slot runs exactly what the plan asks for: the same
    // release with the same run and health spec. A changed command, env, user or health
    // check is a change to deploy, even for the same release.
    let spec = slot_spec(plan);
    if let Some(l) = live
        && cur.slot(l) == Some(&spec)
        && cur.weight(l) == 100
    {
        host.new_slot = l;
        host.phase = HostPhase::Switched;
        host.weight = 100;
        host.untouched = true;
        return host;
    }
    host.old_slot = live;
    host.new_slot = match live {
        Some(l) if holds(l.other()) => l.other(),
        Some(l) => l.other(),
        None if holds(Slot::Green) => Slot::Green,
        None => Slot::Blue,
    };
    host
}

/// The desired state of one host for the deployment as it stands.
pub fn target(
    dep: &DeploymentRecord,
    host: &DeployHost,
    current: Option<&DesiredService>,
) -> Option<DesiredService> {
    if host.untouched || host.phase == HostPhase::Waiting {
        return None;
    }
    let plan = &dep.plan;
    let mut d = current.cloned().unwrap_or_default();
    // The engine assigns generations; targets compare without them.
    d.generation = 0;
    d.service = dep.service.clone();
    d.listen = u32::from(plan.run.listen);
    d.protocol = match plan.run.protocol {
        Protocol::Http => WireProtocol::Http,
        Protocol::Tcp => WireProtocol::Tcp,
    } as i32;
    d.drain_ms = plan.run.drain.as_millis();
    let new = host.new_slot;
    let has_old = host.old_slot.is_some();
    let (spec, new_weight) = match host.phase {
        HostPhase::Waiting => return None,
        HostPhase::Preparing | HostPhase::Ready | HostPhase::Switched => {
            let w = if dep.state == State::RollingBack {
                0
            } else if !has_old {
                // Nothing else can serve on a host that had no release: once the step
                // switches, the new slot takes all of it.
                if host.weight > 0 { 100 } else { 0 }
            } else {
                host.weight
            };
            (Some(slot_spec(plan)), w)
        }
        HostPhase::Failed | HostPhase::RolledBack => (None, 0),
    };
    // The public side follows the release that takes traffic: the new plan's once the
    // new slot has weight (or nothing else serves), the old one's before and after. A
    // host that had no release and failed keeps no port: the failed attempt's `listen`
    // must not outlive it.
    let ended = matches!(host.phase, HostPhase::Failed | HostPhase::RolledBack);
    if new_weight == 0 {
        match host.old_front {
            Some(front) if has_old => {
                d.listen = front.listen;
                d.protocol = front.protocol;
                d.drain_ms = front.drain_ms;
            }
            _ if !has_old && ended => d.listen = 0,
            _ => {}
        }
    }
    d.set_slot(new, spec);
    d.set_weight(new, new_weight);
    if let Some(old) = host.old_slot {
        d.set_weight(old, 100 - new_weight);
    }
    Some(d)
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

// ---- timeline (diff, host_progress, add_timings) ----

fn step_traffic(d: &DeploymentRecord, step: u32) -> u32 {
    d.plan
        .strategy
        .steps
        .get(step as usize)
        .map_or(d.traffic, |s| s.traffic)
}

/// The events between two versions of a deployment record (`before` is `None` for a
/// new deployment).
pub fn diff(before: Option<&DeploymentRecord>, after: &DeploymentRecord, now: u64) -> Vec<Event> {
    let mut out = Vec::new();
    let mut ev = |kind: Kind| {
        out.push(Event {
            at_unix_ms: now,
            kind,
        })
    };
    let Some(b) = before else {
        ev(Kind::Submitted {
            release: after.release.clone(),
            previous_release: after.previous_release.clone(),
            hosts: after.hosts.values().filter(|h| !h.untouched).count(),
            steps: after.plan.strategy.steps.len(),
            actor: String::new(),
        });
        return out;
    };
    for (name, h) in &after.hosts {
        let was = b.hosts.get(name);
        if was.map(|w| w.phase) == Some(h.phase) {
            continue;
        }
        match h.phase {
            // Ready again between steps is not news; ready after preparing is.
            HostPhase::Ready if was.is_none_or(|w| w.phase == HostPhase::Preparing) => {
                ev(Kind::HostReady {
                    host: name.clone(),
                    timings: None,
                })
            }
            HostPhase::Failed if h.lost => ev(Kind::HostLost { host: name.clone() }),
            HostPhase::Failed => ev(Kind::HostFailed {
                host: name.clone(),
                error: h.error.clone().unwrap_or_default(),
            }),
            // Failed and, in the same decision, set back by the rollback its failure
            // began: the new error says so.
            HostPhase::RolledBack
                if !h.lost
                    && h.error.is_some()
                    && was.and_then(|w| w.error.as_ref()) != h.error.as_ref() =>
            {
                ev(Kind::HostFailed {
                    host: name.clone(),
                    error: h.error.clone().unwrap_or_default(),
                })
            }
            _ => {}
        }
    }
    // A step starts when its weights go out: on entering `progressing` (from preparing
    // its hosts), or on moving to the next step within one decision.
    let entered =
        after.state == State::Progressing && !matches!(b.state, State::Progressing | State::Paused);
    let moved_on = after.step != b.step
        && matches!(
            after.state,
            State::Progressing | State::Paused | State::Succeeded
        );
    if entered || moved_on {
        ev(Kind::StepStarted {
            step: after.step,
            traffic: step_traffic(after, after.step),
        });
    }
    if after.step_switched_unix_ms.is_some()
        && (b.step_switched_unix_ms.is_none() || after.step != b.step)
    {
        ev(Kind::StepHolding {
            step: after.step,
            traffic: after.traffic,
        });
    }
    let old_n = b.analysis.intervals.len();
    let new_intervals: Vec<_> = if after.analysis.intervals.len() >= old_n {
        after.analysis.intervals[old_n..].to_vec()
    } else {
        // The record keeps the newest intervals only: anything newer than the last one
        // seen is new.
        let last = b.analysis.intervals.last().map_or(0, |i| i.ended_unix_ms);
        after
            .analysis
            .intervals
            .iter()
            .filter(|i| i.ended_unix_ms > last)
            .cloned()
            .collect()
    };
    for i in new_intervals {
        let (verdict, why) = match &i.verdict {
            Verdict::Pass => ("pass".to_string(), String::new()),
            Verdict::Fail(w) => ("fail".to_string(), w.clone()),
            Verdict::Inconclusive(w) => ("inconclusive".to_string(), w.clone()),
        };
        out.push(Event {
            at_unix_ms: i.ended_unix_ms,
            kind: Kind::Interval {
                step: i.step,
                traffic: i.traffic,
                verdict,
                why,
                new_requests: i.new_requests,
                old_requests: i.old_requests,
                figures: i.metrics.iter().map(figure).collect(),
            },
        });
    }
    let mut ev = |kind: Kind| {
        out.push(Event {
            at_unix_ms: now,
            kind,
        })
    };
    if after.state == State::Paused && b.state != State::Paused {
        ev(Kind::Paused {
            reason: after.reason.clone(),
        });
    }
    if let (Some(r), None) = (&after.rollback, &b.rollback) {
        ev(Kind::RollbackStarted {
            reason: after.reason.clone().unwrap_or_default(),
            first_bad_unix_ms: r.first_bad_unix_ms,
            decided_unix_ms: r.decided_unix_ms,
        });
    }
    if let Some(r) = &after.rollback
        && r.done_unix_ms.is_some()
        && b.rollback.as_ref().and_then(|r| r.done_unix_ms).is_none()
    {
        ev(Kind::RollbackDone);
    }
    if after.state.is_final() && !b.state.is_final() {
        ev(Kind::Ended {
            state: after.state.as_str().to_string(),
            reason: after.reason.clone(),
        });
    }
    out
}

/// The phases of a preparing slot that its timeline records.
fn preparation_phase(p: SlotPhase) -> Option<&'static str> {
    matches!(
        p,
        SlotPhase::Fetching | SlotPhase::Unpacking | SlotPhase::Starting | SlotPhase::Healthy
    )
    .then(|| p.name())
}

/// Phases of the new slot on each preparing host, as its agent reports them; `seen`
/// holds the last phase recorded per host and is updated.
pub fn host_progress(
    d: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
    seen: &mut HashMap<String, String>,
    now: u64,
) -> Vec<Event> {
    let mut out = Vec::new();
    for (name, h) in &d.hosts {
        if h.phase != HostPhase::Preparing {
            continue;
        }
        let Some(status) = views
            .get(name)
            .and_then(|v| v.observed)
            .and_then(|o| o.slot(h.new_slot))
        else {
            continue;
        };
        if status.release != d.release {
            continue;
        }
        let Some(phase) = preparation_phase(SlotPhase::of(status.phase)) else {
            continue;
        };
        if seen.get(name).map(String::as_str) != Some(phase) {
            seen.insert(name.clone(), phase.to_string());
            out.push(Event {
                at_unix_ms: now,
                kind: Kind::HostPhase {
                    host: name.clone(),
                    phase: phase.to_string(),
                },
            });
        }
    }
    out
}

/// Adds each ready host's own timings (from its report) to its `HostReady` event.
pub fn add_timings(
    events: &mut [Event],
    d: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
) {
    for e in events {
        let Kind::HostReady { host, timings } = &mut e.kind else {
            continue;
        };
        let status = d.hosts.get(host.as_str()).and_then(|h| {
            views
                .get(host.as_str())
                .and_then(|v| v.observed)
                .and_then(|o| o.slot(h.new_slot))
        });
        if let Some(st) = status.filter(|st| st.release == d.release) {
            *timings = Some(Timings {
                fetch_ms: st.fetch_ms,
                unpack_ms: st.unpack_ms,
                start_ms: st.start_ms,
            });
        }
    }
}

// ---- the engine's use of them ----

/// What one decision wrote: the record, the hosts' new desired state and the events.
pub struct Outcome {
    pub record: DeploymentRecord,
    pub targets: BTreeMap<String, DesiredService>,
    pub events: Vec<Event>,
}

/// One decision as the engine made it: the phases preparing hosts reported, the
/// operator's command, then the events diffed from the record before and after.
/// `seen` is the engine's last phase recorded per host of this deployment.
pub fn step(
    dep: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
    command: Option<(Command, &str)>,
    seen: &mut HashMap<String, String>,
    now: u64,
) -> Outcome {
    let decision = decide(dep, views, command.map(|c| c.0), now);
    let mut events = host_progress(dep, views, seen, now);
    if let Some((c, actor)) = command {
        events.push(Event {
            at_unix_ms: now,
            kind: Kind::Command {
                command: c.as_str().to_string(),
                actor: actor.to_string(),
            },
        });
    }
    let mut changes = diff(Some(dep), &decision.deployment, now);
    add_timings(&mut changes, &decision.deployment, views);
    events.extend(changes);
    let mut record = decision.deployment;
    if record.state.is_final() && record.ended_unix_ms.is_none() {
        record.ended_unix_ms = Some(now);
    }
    Outcome {
        record,
        targets: decision.targets,
        events,
    }
}

/// What a new deployment is made of, as the engine had it.
pub struct New<'a> {
    pub id: String,
    pub plan: Plan,
    pub path: String,
    pub is_rollback: bool,
    pub actor: &'a str,
    pub previous_release: Option<String>,
    /// Each target host's desired state for the service.
    pub desired: BTreeMap<String, Option<DesiredService>>,
}

/// A new deployment's record and first events, as the engine created them.
pub fn create(new: New<'_>, now: u64) -> Outcome {
    let hosts: BTreeMap<String, DeployHost> = new
        .desired
        .iter()
        .map(|(h, cur)| (h.clone(), plan_host(&new.plan, cur.as_ref())))
        .collect();
    let noop = hosts.values().all(|h| h.untouched);
    let dep = DeploymentRecord {
        id: new.id,
        service: new.plan.service.clone(),
        release: new.plan.release.version.clone(),
        plan: new.plan,
        plan_path: new.path,
        previous_release: new.previous_release,
        is_rollback: new.is_rollback,
        state: if noop {
            State::Succeeded
        } else {
            State::Pending
        },
        ending: None,
        step: 0,
        traffic: if noop { 100 } else { 0 },
        reason: None,
        created_unix_ms: now,
        ended_unix_ms: noop.then_some(now),
        phase_started_unix_ms: now,
        step_switched_unix_ms: None,
        promoted: false,
        gate_passed: false,
        pause: None,
        analysis: Default::default(),
        rollback: None,
        hosts,
    };
    let mut events = diff(None, &dep, now);
    for e in &mut events {
        if let Kind::Submitted { actor: a, .. } = &mut e.kind {
            *a = new.actor.to_string();
        }
    }
    if noop {
        events.push(Event {
            at_unix_ms: now,
            kind: Kind::Ended {
                state: "succeeded".into(),
                reason: Some("the release was already live on every target host".into()),
            },
        });
    }
    Outcome {
        record: dep,
        targets: BTreeMap::new(),
        events,
    }
}

/// The engine's retiring of one host's previous release: its idle slots emptied once
/// `keep_previous` has passed (generation unset).
pub fn retire(current: &DesiredService) -> Option<DesiredService> {
    let mut d = current.clone();
    let mut changed = false;
    for s in [Slot::Blue, Slot::Green] {
        if d.slot(s).is_some() && d.weight(s) == 0 && d.live_slot().is_some() {
            match s {
                Slot::Blue => d.blue = None,
                Slot::Green => d.green = None,
            }
            changed = true;
        }
    }
    d.generation = 0;
    changed.then_some(d)
}
