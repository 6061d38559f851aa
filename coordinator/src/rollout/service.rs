//! A service between deployments: the plan `cutover rollback` deploys, what a
//! deployment's end leaves in the service's record, and retiring the previous release's
//! idle slots once `keep_previous` has passed. Pure, like the rest of rollout: the
//! engine writes what these return through the same path as a decision.

use std::collections::BTreeMap;

use cutover_proto::v1::{DesiredService, SlotSpec};
use cutover_shared::Duration;
use cutover_shared::plan::{Count, Plan, Step};

use crate::model::{DbPhase, DeploymentRecord, ServiceRecord, Slot, State};

/// The plan `cutover rollback` deploys: the previous release's, straight to 100 % on
/// every host at once, with no hold and no bake.
pub fn rollback_plan(mut previous: Plan) -> Plan {
    previous.strategy.steps = vec![Step {
        traffic: 100,
        hold: Duration::ZERO,
        pause: false,
        hosts: None,
    }];
    previous.strategy.bake = Duration::ZERO;
    previous.strategy.max_parallel = Count::Percent(100);
    previous
}

/// The plan `cutover rollback --to VERSION` deploys: the one the last successful
/// deployment of VERSION of `service` made live (not a restart's), as it was — the same
/// steps, holds and analysis as any deployment.
pub fn rollback_to_plan(
    records: &[DeploymentRecord],
    service: &str,
    version: &str,
) -> Option<Plan> {
    last_live(records, service, version).map(|d| d.plan.clone())
}

/// The last successful deployment (not a restart) that made `version` of `service` live.
fn last_live<'r>(
    records: &'r [DeploymentRecord],
    service: &str,
    version: &str,
) -> Option<&'r DeploymentRecord> {
    records
        .iter()
        .filter(|d| {
            d.service == service
                && d.release == version
                && d.state == State::Succeeded
                && !d.restart
        })
        .max_by_key(|d| (d.created_unix_ms, d.id.clone()))
}

/// Why `cutover rollback --to VERSION` must be refused for the database, if it must:
/// a schema change made since VERSION was live was contracted (or its contract runs or
/// failed), so VERSION's schema is gone; or VERSION's own change was undone since, so
/// its schema is not there. A change expanded and not contracted is fine: the rollback
/// undoes it, as `cutover rollback` does.
pub fn rollback_to_refusal(
    records: &[DeploymentRecord],
    service: &str,
    version: &str,
) -> Option<String> {
    let base = last_live(records, service, version)?;
    let phase = |d: &DeploymentRecord| d.database.change.as_ref().map(|c| c.phase);
    if phase(base) == Some(DbPhase::Aborted) {
        return Some(format!(
            "the database change of {} (release {version}) was undone since; deploy release {version} again instead",
            base.id
        ));
    }
    let later = records.iter().filter(|d| {
        d.service == service
            && d.state == State::Succeeded
            && (d.created_unix_ms, &d.id) > (base.created_unix_ms, &base.id)
    });
    for d in later {
        let why = match phase(d) {
            Some(DbPhase::Contracted) => "was contracted",
            Some(DbPhase::Contracting) => "is being contracted now",
            Some(DbPhase::Failed) => "failed its last command",
            _ => continue,
        };
        return Some(format!(
            "the database change of {} (release {}) {why}: release {version}'s schema may be gone; deploy a fix forward",
            d.id, d.release
        ));
    }
    None
}

/// The service's record once deployment `d` ended at `now`: no deployment in progress;
/// after a success the deployed plan is live, the one it replaced is kept for
/// `cutover rollback`, and its slots retire after the plan's `keep_previous` (at once
/// after a restart, which leaves live and previous as they were). A success that
/// expanded a schema change leaves it waiting for its contract; a `cutover rollback`
/// that undid one leaves the release it undid unable to come back.
pub fn concluded(mut svc: ServiceRecord, d: &DeploymentRecord, now: u64) -> ServiceRecord {
    svc.name.clone_from(&d.service);
    if svc.active.as_deref() == Some(d.id.as_str()) {
        svc.active = None;
    }
    if d.state == State::Succeeded && d.restart {
        // The same release again: live and previous stay; the processes it replaced
        // (and the warm previous release, whose slot it took) stop now.
        svc.retire_previous_at_unix_ms = Some(now);
    } else if d.state == State::Succeeded {
        if let Some(replaced) = svc.live.replace(d.plan.clone()) {
            svc.previous = Some(replaced);
        }
        let keep = d.plan.strategy.keep_previous.as_millis();
        svc.retire_previous_at_unix_ms = Some(now.saturating_add(keep));
        match &d.database.undoes {
            Some(undone) => {
                svc.rollback_refused = Some(format!(
                    "the database change of {undone} (release {}) is undone with it; deploy it again instead",
                    d.previous_release.as_deref().unwrap_or("before")
                ));
            }
            None if !d.hosts.values().all(|h| h.untouched) => {
                svc.rollback_refused = None;
                let expanded = d
                    .database
                    .change
                    .as_ref()
                    .is_some_and(|c| c.phase == DbPhase::Expanded);
                svc.db_pending = expanded.then(|| d.id.clone());
            }
            None => {}
        }
    }
    svc
}

/// The service's record after a decision took deployment `before` to `after`, when its
/// schema change was settled after success: a contracted change is the only version
/// left (the previous release cannot come back), an undone one is gone.
pub fn changed_service(
    svc: &ServiceRecord,
    before: &DeploymentRecord,
    after: &DeploymentRecord,
    when: &str,
) -> Option<ServiceRecord> {
    let phase = |d: &DeploymentRecord| d.database.change.as_ref().map(|c| c.phase);
    let now = phase(after)?;
    if phase(before) == Some(now) || !before.state.is_final() {
        return None;
    }
    let mut svc = svc.clone();
    if svc.db_pending.as_deref() == Some(after.id.as_str())
        && matches!(now, DbPhase::Contracted | DbPhase::Aborted)
    {
        svc.db_pending = None;
    }
    if now == DbPhase::Contracted
        && svc
            .live
            .as_ref()
            .is_some_and(|p| p.release.version == after.release)
    {
        svc.rollback_refused = Some(format!(
            "the database was contracted by {} at {when}: release {} would read a schema that no longer exists; deploy a fix forward",
            after.id,
            after.previous_release.as_deref().unwrap_or("before")
        ));
    }
    Some(svc)
}

/// The previous release of `svc` is due to retire at `now`: `keep_previous` has passed
/// and no deployment is in progress.
pub fn retiring(svc: &ServiceRecord, now: u64) -> bool {
    svc.active.is_none() && svc.retire_previous_at_unix_ms.is_some_and(|t| t <= now)
}

/// Retiring a service's previous release: its record, and the hosts' new desired state.
#[derive(Debug, PartialEq)]
pub struct Retirement {
    /// The service with nothing left to retire.
    pub service: ServiceRecord,
    /// Hosts whose desired state loses an idle slot (generation unset).
    pub targets: BTreeMap<String, DesiredService>,
}

/// Empties the idle slots (a spec, no weight) of every host that has a live slot for
/// `svc`, when its previous release is due to retire; `desired` is each host's
/// desired state for the service.
pub fn retire(
    svc: &ServiceRecord,
    desired: &BTreeMap<String, DesiredService>,
    now: u64,
) -> Option<Retirement> {
    if !retiring(svc, now) {
        return None;
    }
    let targets = desired
        .iter()
        .filter_map(|(host, d)| Some((host.clone(), without_idle_slots(d, |_| true)?)))
        .collect();
    let service = ServiceRecord {
        retire_previous_at_unix_ms: None,
        ..svc.clone()
    };
    Some(Retirement { service, targets })
}

/// `d` without its idle slots (a spec, no weight) that `which` picks, if it has any
/// beside a live one.
pub(super) fn without_idle_slots(
    d: &DesiredService,
    which: impl Fn(&SlotSpec) -> bool,
) -> Option<DesiredService> {
    d.live_slot()?;
    let idle: Vec<Slot> = Slot::BOTH
        .into_iter()
        .filter(|s| d.slot(*s).is_some_and(&which) && d.weight(*s) == 0)
        .collect();
    if idle.is_empty() {
        return None;
    }
    let mut t = d.clone();
    t.generation = 0;
    for s in idle {
        t.set_slot(s, None);
    }
    debug_assert!(t.live_slot().is_some());
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::tests::fixture::{SHA1, SHA2, Sim, plan};

    /// v1 then v2 live on a and b: v1 warm in the idle slot.
    fn two_releases() -> (Sim, ServiceRecord) {
        let mut sim = Sim::new(&["a", "b"]);
        let (_, now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
        let (v2, _) = sim.run(sim.start(&plan("2", SHA2, "")), now, 100, 50);
        let svc = ServiceRecord {
            name: "web".into(),
            active: Some(v2.id.clone()),
            ..Default::default()
        };
        (sim, concluded(svc, &v2, 10_000))
    }

    #[test]
    fn a_success_makes_its_plan_live_and_schedules_the_previous_to_retire() {
        let (_, svc) = two_releases();
        assert_eq!(svc.active, None);
        assert_eq!(
            svc.live.as_ref().map(|p| p.release.version.as_str()),
            Some("2")
        );
        let keep = plan("2", SHA2, "").strategy.keep_previous.as_millis();
        assert_eq!(svc.retire_previous_at_unix_ms, Some(10_000 + keep));
    }

    #[test]
    fn the_previous_release_retires_once_keep_previous_has_passed() {
        let (sim, svc) = two_releases();
        let at = svc.retire_previous_at_unix_ms.unwrap();
        assert_eq!(retire(&svc, &sim.desired, at - 1), None, "not yet");
        let busy = ServiceRecord {
            active: Some("d-3".into()),
            ..svc.clone()
        };
        assert_eq!(
            retire(&busy, &sim.desired, at),
            None,
            "not during a deployment"
        );
        let r = retire(&svc, &sim.desired, at).unwrap();
        assert_eq!(r.service.retire_previous_at_unix_ms, None);
        assert_eq!(r.targets.len(), 2);
        for (host, t) in &r.targets {
            let live = t.live_slot().unwrap();
            assert_eq!(
                t.slot(live),
                sim.desired[host].slot(live),
                "{host} keeps v2"
            );
            assert!(t.slot(live.other()).is_none(), "{host} lets v1 go");
        }
        // Nothing idle left: nothing to send.
        let mut retired = sim.desired.clone();
        for (host, t) in r.targets {
            retired.insert(host, t);
        }
        assert!(retire(&svc, &retired, at).unwrap().targets.is_empty());
    }

    #[test]
    fn rollback_to_deploys_the_plan_a_release_was_last_made_live_with() {
        let (mut sim, _) = two_releases();
        let (v3, _) = sim.run(sim.start(&plan("3", SHA1, "")), 20_000, 100, 50);
        let mut failed = sim.start(&plan("1", SHA2, "bake = \"1m\""));
        failed.state = State::RolledBack;
        let records = vec![v3.clone(), failed];
        assert_eq!(
            rollback_to_plan(&records, "web", "3"),
            Some(v3.plan.clone())
        );
        assert_eq!(
            rollback_to_plan(&records, "web", "1"),
            None,
            "it never went live"
        );
        assert_eq!(rollback_to_plan(&records, "api", "3"), None);
        let mut restarted = v3.clone();
        restarted.restart = true;
        restarted.plan.strategy.bake = Duration::from_secs(7);
        restarted.created_unix_ms += 1;
        assert_eq!(
            rollback_to_plan(&[v3.clone(), restarted], "web", "3"),
            Some(v3.plan),
            "a restart's plan is not a release's"
        );
    }

    #[test]
    fn a_rollback_plan_goes_to_100_percent_at_once() {
        let mut p = plan(
            "1",
            SHA1,
            "steps = [{ traffic = 10, hold = \"1h\" }, { traffic = 100 }]",
        );
        p.strategy.bake = Duration::from_secs(60);
        let r = rollback_plan(p.clone());
        assert_eq!(r.strategy.steps.len(), 1);
        assert_eq!(
            (r.strategy.steps[0].traffic, r.strategy.bake),
            (100, Duration::ZERO)
        );
        assert_eq!(r.strategy.max_parallel, Count::Percent(100));
        assert_eq!(r.release, p.release);
    }
}
