//! The pure translation of a deployment into each host's desired state: the slot spec a
//! plan asks for, a host's part in a new deployment (`plan_host`), and what a host
//! should run and with which weights as the deployment stands (`target`, `changes`).

use std::collections::BTreeMap;

use cutover_proto::v1::{
    DesiredService, ExecCheck, HealthSpec, Protocol as WireProtocol, Release, RunSpec, SlotSpec,
    health_spec,
};
use cutover_shared::plan::{Check, Plan, Protocol};

use super::HostView;
use crate::model::{DeployHost, DeploymentRecord, Front, HostPhase, Slot, State};

/// The slot spec a plan asks for; with `[database]`, its environment names the
/// release's schema version.
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
            env: slot_env(plan).into_iter().collect(),
            stop_timeout_ms: plan.run.stop_timeout.as_millis(),
            user: plan.run.user.clone().unwrap_or_default(),
            env_files: plan.run.env_files.clone(),
            secret_env: plan.run.secret_env.clone(),
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

/// The slot's variables: the plan's `[run] env`, and its release's schema version.
fn slot_env(plan: &Plan) -> std::collections::BTreeMap<String, String> {
    let mut env = plan.run.env.clone();
    if let Some(db) = &plan.database {
        super::database::slot_env(db, &plan.release.version, &mut env);
    }
    env
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
    // The engine assigns generations; targets compare without them. A deployment
    // brings back a service its host was told to forget.
    d.generation = 0;
    d.removed = false;
    d.service = dep.service.clone();
    d.listen = u32::from(plan.run.listen);
    d.protocol = match plan.run.protocol {
        Protocol::Http => WireProtocol::Http,
        Protocol::Tcp => WireProtocol::Tcp,
    } as i32;
    d.drain_ms = plan.run.drain.as_millis();
    let (metrics_path, scrape) = super::scrape_spec(plan);
    d.metrics_path = metrics_path;
    // Slots are scraped only while there is an interval to judge.
    let judging = !dep.state.is_final() && dep.state != State::RollingBack;
    d.scrape = scrape.filter(|_| judging);
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

/// The hosts whose desired state must change for `dep` as it stands, with their new
/// state (generation unset): every host whose target (slots, weights and the database
/// task it is to run) differs from what it was last sent.
pub fn changes(
    dep: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
) -> BTreeMap<String, DesiredService> {
    differing(dep, views, |name, current| {
        let slots = dep.hosts.get(name).and_then(|h| target(dep, h, current));
        super::database::with_task(dep, name, slots, current)
    })
}

/// The hosts of `dep` whose desired state `want` (from the host's name and current
/// desired state) differs from what was last sent, with the new state (generation
/// unset).
pub fn differing(
    dep: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
    want: impl Fn(&str, Option<&DesiredService>) -> Option<DesiredService>,
) -> BTreeMap<String, DesiredService> {
    let mut out = BTreeMap::new();
    for name in dep.hosts.keys() {
        let current = views.get(name).and_then(|v| v.desired);
        let Some(t) = want(name, current) else {
            continue;
        };
        let mut have = current.cloned().unwrap_or_default();
        have.generation = 0;
        if have != t {
            out.insert(name.clone(), t);
        }
    }
    out
}
