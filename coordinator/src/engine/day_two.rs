//! The engine's day-two work beside deployments: dry runs, `rollback --to`, the service
//! lifecycle (`restart` as a deployment of the live plan; `stop`, `start` and `remove`
//! as desired state published like a decision), the tombstones hosts keep being sent
//! until they report a service gone, and forgetting a first release that failed.

use std::collections::{BTreeMap, BTreeSet};

use cutover_proto::v1::DesiredService;
use cutover_shared::names::labels_match;
use cutover_shared::plan::Plan;
use prost::Message;

use super::{Batch, Change, Created, Engine, Error, Origin};
use crate::model::{DeploymentRecord, ServiceRecord};
use crate::store::Store;
use crate::{preview, rollout};

/// What `cutover service restart|stop|start|remove` asks of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceAction {
    /// Start the live release anew in each host's idle slot, host wave by host wave; on
    /// these hosts only when the list is not empty.
    Restart { hosts: Vec<String> },
    /// No slot process runs until `Start`; no deployment starts meanwhile.
    Stop,
    /// Run the slots again after `Stop`.
    Start,
    /// Stop both slots everywhere, let the port go, and forget the service.
    Remove,
}

/// What a service action did.
pub struct ServiceDone {
    /// The restart's deployment id.
    pub deployment: Option<String>,
    /// The hosts the action was sent to.
    pub hosts: Vec<String>,
    /// Nothing needed doing (already stopped, already started).
    pub noop: bool,
}

impl Engine {
    /// What deploying `plan` would do, planned as [`Engine::create`] plans it, from the
    /// same records and fleet; it writes nothing and sends nothing.
    pub(super) fn dry_run(&mut self, plan: &Plan) -> Result<preview::DryRun, Error> {
        let svc = self
            .store
            .service(&plan.service)?
            .unwrap_or_else(|| ServiceRecord {
                name: plan.service.clone(),
                ..Default::default()
            });
        let enrolled = self.store.hosts()?;
        let mut desired = BTreeMap::new();
        let mut connected = BTreeSet::new();
        for h in &enrolled {
            if !labels_match(&plan.targets.labels, &h.labels) {
                continue;
            }
            desired.insert(h.name.clone(), self.desired(&h.name, &plan.service)?);
            if self.fleet.is_connected(&h.name) {
                connected.insert(h.name.clone());
            }
        }
        let reachable: BTreeMap<String, Option<DesiredService>> = desired
            .iter()
            .filter(|(h, _)| connected.contains(*h))
            .map(|(h, d)| (h.clone(), d.clone()))
            .collect();
        let refusal = self
            .refuse_if_locked(&plan.service)
            .and_then(|()| self.refuse_if_busy(&svc))
            .and_then(|()| refuse_if_stopped(&svc))
            .and_then(|()| {
                // A change waiting for a manual contract, or `run_on` matching no
                // connected target host, refuses the deployment as it would this one.
                match reachable.is_empty() {
                    true => Ok(()),
                    false => self
                        .database_context(plan, &svc, &reachable, false)
                        .map(|_| ()),
                }
            })
            .err()
            .map(|e| e.to_string());
        let hosts = enrolled.into_iter().map(|h| (h.name, h.labels)).collect();
        Ok(preview::dry_run(&preview::Input {
            plan,
            service: &svc,
            hosts: &hosts,
            connected: &connected,
            desired: &desired,
            parts: &rollout::plan_hosts(plan, &reachable),
            refusal,
        }))
    }

    /// `cutover rollback SERVICE --to VERSION`: a deployment, health-gated like any
    /// other, of the plan VERSION was last made live with.
    pub(super) fn rollback_to(
        &mut self,
        service: &str,
        version: &str,
        actor: &str,
    ) -> Result<Created, Error> {
        if self.store.service(service)?.is_none() {
            return Err(Error::NotFound(format!(
                "unknown service {service:?} (see `cutover service list`)"
            )));
        }
        let records = self.store.deployments()?;
        let plan = rollout::rollback_to_plan(&records, service, version).ok_or_else(|| {
            Error::NotFound(format!(
                "release {version} of {service} was never live; `cutover releases {service}` lists the releases it can go back to"
            ))
        })?;
        if let Some(why) = rollout::rollback_to_refusal(&records, service, version) {
            return Err(Error::Refused(format!(
                "service {service} cannot roll back to {version}: {why}"
            )));
        }
        self.create(plan, Origin::RollbackTo(version.to_string()), actor)
    }

    /// `cutover service restart|stop|start|remove`: refused while a deployment of the
    /// service runs.
    pub(super) fn service_action(
        &mut self,
        name: &str,
        action: ServiceAction,
        actor: &str,
    ) -> Result<ServiceDone, Error> {
        let svc = self.store.service(name)?.ok_or_else(|| {
            Error::NotFound(format!(
                "unknown service {name:?} (see `cutover service list`)"
            ))
        })?;
        self.refuse_if_locked(name)?;
        self.refuse_if_busy(&svc)?;
        match action {
            ServiceAction::Restart { hosts } => self.restart(svc, &hosts, actor),
            ServiceAction::Stop => self.set_stopped(svc, true, actor),
            ServiceAction::Start => self.set_stopped(svc, false, actor),
            ServiceAction::Remove => self.remove_service(svc, actor),
        }
    }

    /// A deployment of the live plan that starts it anew in the idle slot of every
    /// connected host running it (or of `only`), wave by wave.
    pub(super) fn restart(
        &mut self,
        svc: ServiceRecord,
        only: &[String],
        actor: &str,
    ) -> Result<ServiceDone, Error> {
        refuse_if_stopped(&svc)?;
        let Some(live) = svc.live.clone() else {
            return Err(Error::Refused(format!(
                "service {} has no live release to restart",
                svc.name
            )));
        };
        let mut hosts = self.target_hosts(&live)?;
        hosts.retain(|_, d| {
            d.as_ref()
                .is_some_and(|d| !d.removed && d.live_slot().is_some())
        });
        if let Some(h) = only.iter().find(|h| !hosts.contains_key(*h)) {
            return Err(Error::Refused(format!(
                "--hosts {h}: not a connected host running service {}",
                svc.name
            )));
        }
        if !only.is_empty() {
            hosts.retain(|h, _| only.contains(h));
        }
        if hosts.is_empty() {
            return Err(Error::Refused(format!(
                "no connected host runs service {}",
                svc.name
            )));
        }
        let names: Vec<String> = hosts.keys().cloned().collect();
        let plan = rollout::restart_plan(live, hosts.len());
        let created = self.open(plan, hosts, Origin::Restart, actor, svc)?;
        Ok(ServiceDone {
            deployment: Some(created.id),
            hosts: names,
            noop: false,
        })
    }

    /// `service stop` (`stopped`) or `service start`: every host of the service is told.
    pub(super) fn set_stopped(
        &mut self,
        mut svc: ServiceRecord,
        stopped: bool,
        actor: &str,
    ) -> Result<ServiceDone, Error> {
        let targets = rollout::stopping(&self.service_desired(&svc.name)?, stopped);
        let noop = svc.stopped == stopped && targets.is_empty();
        let hosts: Vec<String> = targets.keys().cloned().collect();
        svc.stopped = stopped;
        let what = if stopped { "stopped" } else { "started" };
        tracing::info!(
            service = svc.name,
            actor,
            hosts = hosts.len(),
            "service {what}"
        );
        self.publish(Change {
            service: Some(svc),
            targets,
            ..Change::default()
        })?;
        Ok(ServiceDone {
            deployment: None,
            hosts,
            noop,
        })
    }

    /// `service remove`: every host is told to forget the service (and keeps being told
    /// until it reports it gone); the service's record goes at once.
    pub(super) fn remove_service(
        &mut self,
        svc: ServiceRecord,
        actor: &str,
    ) -> Result<ServiceDone, Error> {
        let targets = rollout::removal(&self.service_desired(&svc.name)?);
        let hosts: Vec<String> = targets.keys().cloned().collect();
        tracing::info!(
            service = svc.name,
            actor,
            hosts = hosts.len(),
            "service removed"
        );
        self.publish(Change {
            targets,
            forget: Some(svc.name),
            ..Change::default()
        })?;
        Ok(ServiceDone {
            deployment: None,
            hosts,
            noop: false,
        })
    }

    /// Every host's desired state for `service`, for the hosts that have one.
    pub(super) fn service_desired(
        &mut self,
        service: &str,
    ) -> Result<BTreeMap<String, DesiredService>, Error> {
        let mut out = BTreeMap::new();
        for host in self.store.hosts()? {
            if let Some(d) = self.desired(&host.name, service)? {
                out.insert(host.name, d);
            }
        }
        Ok(out)
    }

    /// Forgets the tombstones of hosts that reported the service gone since they were
    /// told to remove it.
    pub(super) fn confirm_removals(&mut self) -> Result<(), Error> {
        let gone: Vec<(String, String)> = self
            .removing
            .iter()
            .filter(|((host, service), told)| {
                self.fleet.last_report(host).is_some_and(|t| t > **told)
                    && self.fleet.observed(host, service).is_none()
            })
            .map(|(key, _)| key.clone())
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        for (host, service) in &gone {
            batch.remove_desired(host, service);
        }
        self.store.commit(batch)?;
        for key in gone {
            tracing::info!(host = key.0, service = key.1, "service gone from host");
            if let Some(m) = self.desired.get_mut(&key.1) {
                m.insert(key.0.clone(), None);
            }
            self.removing.remove(&key);
        }
        Ok(())
    }

    /// A first release that failed leaves nothing behind: each of `d`'s hosts whose
    /// desired state (after `targets`) is empty is told to forget the service. True when
    /// every host is left with nothing, so the service itself is forgotten.
    pub(super) fn forget_first_release(
        &mut self,
        d: &DeploymentRecord,
        targets: &mut BTreeMap<String, DesiredService>,
    ) -> Result<bool, Error> {
        let mut all_empty = true;
        for h in d.hosts.keys() {
            let last = match targets.get(h) {
                Some(t) => Some(t.clone()),
                None => self.desired(h, &d.service)?,
            };
            let Some(last) = last else { continue };
            match rollout::forget_if_empty(&last) {
                Some(t) => {
                    targets.insert(h.clone(), t);
                }
                None => all_empty &= last.removed,
            }
        }
        Ok(all_empty)
    }
}

/// No deployment starts while the service is stopped.
pub(super) fn refuse_if_stopped(service: &ServiceRecord) -> Result<(), Error> {
    if !service.stopped {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "service {} is stopped; `cutover service start {}` first",
        service.name, service.name
    )))
}

/// The services each host was told to forget and has not yet reported gone, from the
/// store: (host, service).
pub(super) fn tombstones(store: &Store) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    for host in store.hosts()? {
        for raw in store.desired_for_host(&host.name)? {
            if let Ok(d) = DesiredService::decode(raw.as_slice())
                && d.removed
            {
                out.push((host.name.clone(), d.service));
            }
        }
    }
    Ok(out)
}
