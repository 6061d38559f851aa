//! A service's life without a new release, decided as purely as the rest of rollout:
//! the plan `cutover service restart` deploys and each host's part in it, the desired
//! state of `service stop`/`start`, and the tombstones of `service remove` (also what a
//! first release that failed leaves, so that no empty service lingers on its hosts).
//! The engine writes what these return through the same path as a decision.

use std::collections::BTreeMap;

use cutover_proto::v1::DesiredService;
use cutover_shared::Duration;
use cutover_shared::plan::{Count, Plan, Step};

use super::desired::plan_host;
use crate::model::{DeployHost, HostPhase};

/// The plan `cutover service restart` deploys over `hosts` target hosts: the live plan,
/// in waves of its `max_parallel` hosts at 100 % each (a wave is prepared in the idle
/// slot, health-checked, switched, then the next one starts), with no hold, bake or
/// analysis — the release is the one already live.
pub fn restart_plan(mut live: Plan, hosts: usize) -> Plan {
    let wave = live.strategy.max_parallel.of(hosts).max(1);
    let mut steps: Vec<Step> = (1..)
        .map(|i| i * wave)
        .take_while(|n| *n < hosts)
        .map(|n| Step {
            traffic: 100,
            hold: Duration::ZERO,
            pause: false,
            hosts: Some(Count::Hosts(n as u32)),
        })
        .collect();
    steps.push(Step {
        traffic: 100,
        hold: Duration::ZERO,
        pause: false,
        hosts: None,
    });
    live.strategy.steps = steps;
    live.strategy.bake = Duration::ZERO;
    live.strategy.keep_previous = Duration::ZERO;
    live.analysis = None;
    live
}

/// A host's part in a restart: like any deployment of the plan, except that a host
/// already running it is not left alone — the release starts anew in its idle slot and
/// traffic moves there once it is healthy.
pub fn plan_restart(plan: &Plan, current: Option<&DesiredService>) -> DeployHost {
    let mut host = plan_host(plan, current);
    if host.untouched {
        let live = host.new_slot;
        host.untouched = false;
        host.phase = HostPhase::Waiting;
        host.weight = 0;
        host.old_slot = Some(live);
        host.new_slot = live.other();
    }
    host
}

/// The hosts whose desired state changes for `service stop` (`stopped`) or `start`,
/// with the new state (generation unset); hosts already so are left out.
pub fn stopping(
    desired: &BTreeMap<String, DesiredService>,
    stopped: bool,
) -> BTreeMap<String, DesiredService> {
    desired
        .iter()
        .filter(|(_, d)| d.stopped != stopped && !d.removed)
        .map(|(host, d)| {
            let mut t = d.clone();
            t.generation = 0;
            t.stopped = stopped;
            (host.clone(), t)
        })
        .collect()
}

/// What a host is told to forget a service with: nothing to run, no port, `removed`.
pub fn tombstone(service: &str) -> DesiredService {
    DesiredService {
        service: service.to_string(),
        removed: true,
        ..Default::default()
    }
}

/// `service remove`: a tombstone for every host that has the service.
pub fn removal(desired: &BTreeMap<String, DesiredService>) -> BTreeMap<String, DesiredService> {
    desired
        .iter()
        .filter(|(_, d)| !d.removed)
        .map(|(host, d)| (host.clone(), tombstone(&d.service)))
        .collect()
}

/// A tombstone for a host left with nothing of the service: no slot and no port, as a
/// first release that failed leaves it.
pub fn forget_if_empty(d: &DesiredService) -> Option<DesiredService> {
    let empty = d.blue.is_none() && d.green.is_none() && d.listen == 0 && !d.removed;
    empty.then(|| tombstone(&d.service))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Slot;
    use crate::rollout::tests::fixture::{SHA1, Sim, plan};

    #[test]
    fn a_restart_prepares_every_host_anew_in_its_idle_slot() {
        let mut sim = Sim::new(&["a"]);
        let v1 = plan("1", SHA1, "");
        sim.run(sim.start(&v1), 0, 100, 50);
        let current = sim.desired.get("a");
        assert!(
            plan_host(&v1, current).untouched,
            "a deploy would do nothing"
        );
        let live = current.and_then(DesiredService::live_slot).unwrap();
        let h = plan_restart(&v1, current);
        assert!(!h.untouched);
        assert_eq!(
            (h.phase, h.old_slot, h.new_slot, h.weight),
            (HostPhase::Waiting, Some(live), live.other(), 0)
        );
        // A host that never ran it is a plain deployment.
        let fresh = plan_restart(&v1, None);
        assert_eq!((fresh.old_slot, fresh.new_slot), (None, Slot::Blue));
    }

    #[test]
    fn a_restart_goes_in_waves_of_max_parallel_with_no_hold_bake_or_analysis() {
        let mut live = plan(
            "1",
            SHA1,
            "bake = \"5m\"\nsteps = [{ traffic = 10, hold = \"1h\" }, { traffic = 100 }]",
        );
        live.strategy.max_parallel = Count::Hosts(2);
        let p = restart_plan(live.clone(), 5);
        let waves: Vec<Option<Count>> = p.strategy.steps.iter().map(|s| s.hosts).collect();
        assert_eq!(
            waves,
            [Some(Count::Hosts(2)), Some(Count::Hosts(4)), None],
            "2, then 4, then all 5"
        );
        assert!(
            p.strategy
                .steps
                .iter()
                .all(|s| s.traffic == 100 && s.hold.is_zero())
        );
        assert_eq!(
            (p.strategy.bake, p.strategy.keep_previous),
            (Duration::ZERO, Duration::ZERO)
        );
        assert_eq!(p.validate(), Ok(()), "a plan like any other");
        assert_eq!(restart_plan(live, 1).strategy.steps.len(), 1);
    }

    #[test]
    fn stop_start_and_remove_change_only_what_differs() {
        let mut sim = Sim::new(&["a", "b"]);
        sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
        let stop = stopping(&sim.desired, true);
        assert_eq!(stop.len(), 2);
        assert!(stop.values().all(|t| t.stopped && t.generation == 0));
        assert_eq!(stop["a"].blue, sim.desired["a"].blue, "the specs stay");
        assert!(stopping(&stop, true).is_empty(), "already stopped");
        assert_eq!(stopping(&stop, false).len(), 2);
        let gone = removal(&sim.desired);
        assert!(
            gone.values()
                .all(|t| t.removed && t.blue.is_none() && t.listen == 0)
        );
        assert!(removal(&gone).is_empty());
        assert_eq!(
            forget_if_empty(&sim.desired["a"]),
            None,
            "it runs something"
        );
        let empty = DesiredService {
            service: "web".into(),
            generation: 4,
            ..Default::default()
        };
        assert_eq!(forget_if_empty(&empty), Some(tombstone("web")));
    }
}
