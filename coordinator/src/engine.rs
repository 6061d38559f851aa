//! The deployment engine: the one task that creates and advances deployments. It feeds
//! the pure [`crate::rollout`] decisions with what the fleet reports, and carries out
//! each outcome the same way (`Engine::publish`): the record, the hosts' desired state
//! and the timeline events in one transaction, and only then desired state to the
//! hosts, events to the webhooks and durations to the histograms.
//!
//! It decides on change, not per report: a deployment is decided again when one of its
//! hosts changed in a way decisions read (the fleet collects those hosts, and `by_host`
//! finds their deployments), on an operator's order, and on the engine's clock (holds,
//! deadlines, analysis intervals, hosts going silent). A decision reads the fleet and
//! the desired state in place, without copying either.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1::DesiredService;
use cutover_shared::clock::now_ms;
use cutover_shared::names::labels_match;
use cutover_shared::plan::{ContractAfter, Plan};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::model::{DeploymentRecord, ServiceRecord, State};
use crate::preview;
use crate::prometheus::Pollers;
use crate::rollout::{self, Command, HostView, Order};
use crate::store::{Batch, Store};
use crate::timeline::{Event, Kind};
use crate::webhooks::Webhooks;

mod day_two;

pub use day_two::{ServiceAction, ServiceDone};
use day_two::{refuse_if_stopped, tombstones};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    NotFound(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::Error),
    #[error("the coordinator is shutting down")]
    Stopped,
}

/// A deployment just created.
pub struct Created {
    pub id: String,
    /// Every target host already ran the plan: the deployment ended at once.
    pub noop: bool,
}

/// What the engine is asked to do, with where the answer goes.
enum Request {
    Deploy {
        plan: Box<Plan>,
        path: String,
        actor: String,
        reply: oneshot::Sender<Result<Created, Error>>,
    },
    Rollback {
        service: String,
        actor: String,
        reply: oneshot::Sender<Result<Created, Error>>,
    },
    RollbackTo {
        service: String,
        version: String,
        actor: String,
        reply: oneshot::Sender<Result<Created, Error>>,
    },
    DryRun {
        plan: Box<Plan>,
        reply: oneshot::Sender<Result<preview::DryRun, Error>>,
    },
    Command {
        id: String,
        command: Command,
        actor: String,
        reply: oneshot::Sender<Result<DeploymentRecord, Error>>,
    },
    Service {
        service: String,
        action: ServiceAction,
        actor: String,
        reply: oneshot::Sender<Result<ServiceDone, Error>>,
    },
    Contract {
        service: String,
        actor: String,
        reply: oneshot::Sender<Result<DeploymentRecord, Error>>,
    },
}

/// Cheap handle to the engine task.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
}

impl Handle {
    /// What deploying `plan` would do; nothing is written or sent.
    pub async fn dry_run(&self, plan: Plan) -> Result<preview::DryRun, Error> {
        self.call(|reply| Request::DryRun {
            plan: Box::new(plan),
            reply,
        })
        .await
    }

    /// `cutover rollback SERVICE --to VERSION`.
    pub async fn rollback_to(
        &self,
        service: String,
        version: String,
        actor: String,
    ) -> Result<Created, Error> {
        self.call(|reply| Request::RollbackTo {
            service,
            version,
            actor,
            reply,
        })
        .await
    }

    /// `cutover service restart|stop|start|remove SERVICE`.
    pub async fn service(
        &self,
        service: String,
        action: ServiceAction,
        actor: String,
    ) -> Result<ServiceDone, Error> {
        self.call(|reply| Request::Service {
            service,
            action,
            actor,
            reply,
        })
        .await
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Request,
    ) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// `actor` is who asked (the name of the certificate that called), for the timeline.
    pub async fn deploy(&self, plan: Plan, path: String, actor: String) -> Result<Created, Error> {
        self.call(|reply| Request::Deploy {
            plan: Box::new(plan),
            path,
            actor,
            reply,
        })
        .await
    }

    pub async fn rollback(&self, service: String, actor: String) -> Result<Created, Error> {
        self.call(|reply| Request::Rollback {
            service,
            actor,
            reply,
        })
        .await
    }

    pub async fn command(
        &self,
        id: String,
        command: Command,
        actor: String,
    ) -> Result<DeploymentRecord, Error> {
        self.call(|reply| Request::Command {
            id,
            command,
            actor,
            reply,
        })
        .await
    }

    /// `cutover contract SERVICE`: contracts the live release's schema change (again,
    /// after it failed or stood still). Returns the deployment that made the change.
    pub async fn contract(
        &self,
        service: String,
        actor: String,
    ) -> Result<DeploymentRecord, Error> {
        self.call(|reply| Request::Contract {
            service,
            actor,
            reply,
        })
        .await
    }
}

pub struct Engine {
    /// Where every outcome is written before it is carried out.
    store: Arc<Store>,
    /// The connected hosts: what they report, where desired state is sent.
    fleet: Arc<Fleet>,
    /// Requests from the control API, through [`Handle`].
    rx: mpsc::Receiver<Request>,
    /// Deployments not yet ended (or whose schema change is being contracted or aborted
    /// after their end), by id, with what the engine keeps for each.
    active: BTreeMap<String, Active>,
    /// The active deployments of each host, by id: whom a change of that host concerns.
    by_host: HashMap<String, BTreeSet<String>>,
    /// Desired state per service and host, mirrored from the store (`None`: the store
    /// has none).
    desired: HashMap<String, HashMap<String, Option<DesiredService>>>,
    /// When to look for previous releases to retire next (unix ms).
    next_retire_check: u64,
    /// When this engine started (unix ms): a host never heard from since counts as
    /// unreachable from then, so a restart does not declare every host lost at once.
    started_ms: u64,
    /// Where committed events go out.
    hooks: Webhooks,
    /// Duration histograms fed from committed events.
    metrics: Arc<Metrics>,
    /// The Prometheus queries of deployments' `source = "prometheus"` metrics, run off
    /// this loop; their latest results go into each decision.
    prometheus: Pollers,
    /// Services each host was told to forget (host, service), with when (unix ms): the
    /// tombstone is kept, and resent on every reconnect, until a report made after it
    /// no longer lists the service.
    removing: BTreeMap<(String, String), u64>,
}

/// A deployment in progress.
struct Active {
    /// The deployment as last committed.
    record: DeploymentRecord,
    /// Sequence number of its next timeline event.
    next_event: u64,
    /// When its current step started (unix ms), for the step duration histogram;
    /// unknown after a restart until the next step starts.
    step_started: Option<u64>,
}

/// One outcome to carry out: written in one transaction, then sent.
#[derive(Default)]
struct Change {
    /// The deployment as decided, with what happened (its timeline events).
    deployment: Option<(DeploymentRecord, Vec<Event>)>,
    /// The service's record, when the outcome changes it.
    service: Option<ServiceRecord>,
    /// Each host's new desired state (for the service it names; generation unset).
    targets: BTreeMap<String, DesiredService>,
    /// A service whose record goes (`service remove`, a first release that failed).
    forget: Option<String>,
}

/// What deciding a deployment once came to.
enum Outcome {
    /// Nothing changed: the deployment as it stands.
    Same(DeploymentRecord),
    /// The deployment as decided, and what to carry out.
    Changed(DeploymentRecord, Box<Change>),
}

/// Where a deployment's plan comes from.
enum Origin {
    /// A plan file, as the CLI named it.
    File(String),
    /// `cutover rollback`: the previous release's plan.
    Rollback,
    /// `cutover service restart`: the live plan again, in the idle slots.
    Restart,
    /// `cutover rollback --to`: the plan an earlier release was deployed with.
    RollbackTo(String),
}

/// How often the engine re-decides without being woken (holds, deadlines).
const TICK: Duration = Duration::from_millis(200);

/// How long the engine gathers the hosts' changes before deciding on them.
const GATHER: Duration = Duration::from_millis(50);

/// How often the engine looks for previous releases to retire.
const RETIRE_CHECK_MS: u64 = 1_000;

impl Engine {
    pub fn new(
        store: Arc<Store>,
        fleet: Arc<Fleet>,
        hooks: Webhooks,
        metrics: Arc<Metrics>,
    ) -> Result<(Engine, Handle), Error> {
        let (tx, rx) = mpsc::channel(64);
        let mut active = BTreeMap::new();
        let mut by_host: HashMap<String, BTreeSet<String>> = HashMap::new();
        for record in store.deployments()? {
            if !decided(&record) {
                continue;
            }
            // Pick up the timeline where it stopped.
            let next_event = store.events(&record.id)?.len() as u64;
            let id = record.id.clone();
            for h in record.hosts.keys() {
                by_host.entry(h.clone()).or_default().insert(id.clone());
            }
            let a = Active {
                record,
                next_event,
                step_started: None,
            };
            active.insert(id, a);
        }
        let started_ms = now_ms();
        let removing = tombstones(&store)?
            .into_iter()
            .map(|key| (key, started_ms))
            .collect();
        let engine = Engine {
            store,
            fleet,
            rx,
            active,
            by_host,
            desired: HashMap::new(),
            next_retire_check: 0,
            started_ms,
            hooks,
            metrics,
            prometheus: Pollers::new(),
            removing,
        };
        Ok((engine, Handle { tx }))
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let all = tokio::select! {
                _ = cancel.cancelled() => break,
                req = self.rx.recv() => match req {
                    Some(req) => {
                        self.handle(req);
                        true
                    }
                    None => break,
                },
                _ = self.fleet.changed() => {
                    // Changes come in bursts (a fan-out's acknowledgements): gathered
                    // for a moment, they cost one decision per deployment, not one
                    // per report, and that decision reads them all (level-triggered).
                    tokio::time::sleep(GATHER).await;
                    false
                }
                // Read by the next decision on the clock.
                Some(answer) = self.prometheus.recv() => {
                    self.prometheus.record(answer);
                    continue;
                }
                _ = tick.tick() => true,
            };
            if let Err(e) = self.evaluate(all) {
                tracing::error!(error = %e, "advance deployments");
            }
        }
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Deploy {
                plan,
                path,
                actor,
                reply,
            } => {
                let _ = reply.send(self.create(*plan, Origin::File(path), &actor));
            }
            Request::Rollback {
                service,
                actor,
                reply,
            } => {
                let _ = reply.send(self.rollback(&service, &actor));
            }
            Request::Command {
                id,
                command,
                actor,
                reply,
            } => {
                let _ = reply.send(self.command(&id, command, &actor));
            }
            Request::RollbackTo {
                service,
                version,
                actor,
                reply,
            } => {
                let _ = reply.send(self.rollback_to(&service, &version, &actor));
            }
            Request::DryRun { plan, reply } => {
                let _ = reply.send(self.dry_run(&plan));
            }
            Request::Service {
                service,
                action,
                actor,
                reply,
            } => {
                let _ = reply.send(self.service_action(&service, action, &actor));
            }
            Request::Contract {
                service,
                actor,
                reply,
            } => {
                let _ = reply.send(self.contract(&service, &actor));
            }
        }
    }

    /// Decides every active deployment once (`all`), or those of the hosts that changed
    /// since the last time, then retires what is due.
    fn evaluate(&mut self, all: bool) -> Result<(), Error> {
        // Taken before deciding: a change made meanwhile wakes the engine again.
        let changed = self.fleet.take_changed();
        let ids: Vec<String> = if all {
            self.active.keys().cloned().collect()
        } else {
            let ids: BTreeSet<&String> = changed
                .iter()
                .filter_map(|h| self.by_host.get(h))
                .flatten()
                .collect();
            ids.into_iter().cloned().collect()
        };
        for id in ids {
            if self.active.contains_key(&id) {
                self.step(&id, None)?;
            }
        }
        self.confirm_removals()?;
        self.retire_previous()
    }

    fn command(
        &mut self,
        id: &str,
        command: Command,
        actor: &str,
    ) -> Result<DeploymentRecord, Error> {
        let Some(d) = self.active.get(id).map(|a| a.record.clone()) else {
            return match self.store.deployment(id)? {
                Some(d) => Err(ended(&d)),
                None => Err(Error::NotFound(format!("unknown deployment {id:?}"))),
            };
        };
        if d.state.is_final() {
            return Err(ended(&d));
        }
        // Resuming a deployment that waits for an earlier contract that failed or stood
        // still runs that contract again first.
        if matches!(command, Command::Resume | Command::Promote)
            && let Some(after) = &d.database.after
        {
            self.order_ended(after, Command::Contract, actor)?;
        }
        self.step(id, Some(Order { command, actor }))
    }

    /// `cutover contract SERVICE`.
    fn contract(&mut self, service: &str, actor: &str) -> Result<DeploymentRecord, Error> {
        let svc = self.store.service(service)?.ok_or_else(|| {
            Error::NotFound(format!(
                "unknown service {service:?}: nothing was ever deployed under that name"
            ))
        })?;
        let Some(pending) = svc.db_pending.clone() else {
            let why = svc
                .rollback_refused
                .map_or(String::new(), |r| format!(" ({r})"));
            return Err(Error::Refused(format!(
                "service {service} has no database change waiting to be contracted{why}"
            )));
        };
        self.refuse_if_busy(&svc)?;
        self.order_ended(&pending, Command::Contract, actor)
    }

    /// Gives `command` to deployment `id`, which has ended, about its schema change.
    fn order_ended(
        &mut self,
        id: &str,
        command: Command,
        actor: &str,
    ) -> Result<DeploymentRecord, Error> {
        if !self.active.contains_key(id) {
            let record = self
                .store
                .deployment(id)?
                .ok_or_else(|| Error::NotFound(format!("unknown deployment {id:?}")))?;
            let next_event = self.store.events(id)?.len() as u64;
            let a = Active {
                record,
                next_event,
                step_started: None,
            };
            self.activate(a);
        }
        self.step(id, Some(Order { command, actor }))
    }

    fn rollback(&mut self, service: &str, actor: &str) -> Result<Created, Error> {
        let rec = self.store.service(service)?.ok_or_else(|| {
            Error::NotFound(format!(
                "unknown service {service:?}: nothing was ever deployed under that name"
            ))
        })?;
        if let Some(why) = &rec.rollback_refused {
            return Err(Error::Refused(format!(
                "service {service} cannot roll back: {why}"
            )));
        }
        let Some(prev) = rec.previous.clone() else {
            return Err(Error::Refused(format!(
                "service {service} has no previous release to roll back to"
            )));
        };
        if let Some(d) = self.pending_change(&rec)?
            && let Some(why) = d.database.change.as_ref().and_then(no_undo)
        {
            return Err(Error::Refused(format!(
                "service {service} cannot roll back: the database change of {} {why}",
                d.id
            )));
        }
        self.create(rollout::rollback_plan(prev), Origin::Rollback, actor)
    }

    /// Refuses anything that would change a locked service (`cutover lock`), with the
    /// lock's message, who set it and when.
    fn refuse_if_locked(&self, service: &str) -> Result<(), Error> {
        match self.store.lock(service)? {
            Some(lock) => Err(Error::Refused(lock.refusal())),
            None => Ok(()),
        }
    }

    /// Creates a deployment of `plan` over the connected hosts it targets, unless its
    /// service is locked or busy.
    fn create(&mut self, plan: Plan, origin: Origin, actor: &str) -> Result<Created, Error> {
        let service = self
            .store
            .service(&plan.service)?
            .unwrap_or_else(|| ServiceRecord {
                name: plan.service.clone(),
                ..Default::default()
            });
        self.refuse_if_locked(&plan.service)?;
        self.refuse_if_busy(&service)?;
        refuse_if_stopped(&service)?;
        let hosts = self.target_hosts(&plan)?;
        self.open(plan, hosts, origin, actor, service)
    }

    /// Opens a deployment of `plan` over `hosts` (each with its desired state for the
    /// service) and publishes it.
    fn open(
        &mut self,
        plan: Plan,
        hosts: BTreeMap<String, Option<DesiredService>>,
        origin: Origin,
        actor: &str,
        mut service: ServiceRecord,
    ) -> Result<Created, Error> {
        let (plan_path, is_rollback, restart) = match origin {
            Origin::File(path) => (path, false, false),
            Origin::Rollback => ("(rollback)".to_string(), true, false),
            Origin::Restart => ("(restart)".to_string(), false, true),
            Origin::RollbackTo(v) => (format!("(rollback to {v})"), true, false),
        };
        // A restart starts the live release anew: no change of its own to wait for.
        let database = self.database_context(&plan, &service, &hosts, is_rollback || restart)?;
        let id = format!("d-{:06}", self.store.next_seq("deployment")?);
        let submission = rollout::Submission {
            id: id.clone(),
            previous_release: service.live.as_ref().map(|p| p.release.version.clone()),
            plan,
            plan_path,
            is_rollback,
            restart,
            actor,
            database,
        };
        let decision = rollout::submit(submission, &hosts, now_ms());
        let d = &decision.deployment;
        let noop = d.state.is_final();
        let after = d.database.after.clone();
        if !noop {
            service.active = Some(id.clone());
        }
        tracing::info!(
            id,
            service = d.service,
            release = d.release,
            hosts = d.hosts.len(),
            noop,
            "deployment created"
        );
        self.publish(Change {
            deployment: Some((decision.deployment, decision.events)),
            service: Some(service),
            targets: decision.targets,
            forget: None,
        })?;
        if let Some(after) = after {
            let why = format!("{id}, which needs the old slot");
            self.order_ended(&after, Command::Contract, &why)?;
        }
        Ok(Created { id, noop })
    }

    /// What a new deployment of `plan` over `hosts` needs to know of the service's
    /// database: who may run its commands (`run_on` must match a target host), the live
    /// release's schema, and the change waiting for its contract — which a manual
    /// contract must have had before the next deployment.
    fn database_context(
        &self,
        plan: &Plan,
        svc: &ServiceRecord,
        hosts: &BTreeMap<String, Option<DesiredService>>,
        is_rollback: bool,
    ) -> Result<rollout::DatabaseContext, Error> {
        let pending = self.pending_change(svc)?;
        if !is_rollback
            && let Some(d) = &pending
            && d.plan.database.as_ref().map(|db| db.contract_after) == Some(ContractAfter::Manual)
        {
            return Err(Error::Refused(format!(
                "service {} has a database change waiting for `cutover contract {}` ({}, release {}, contract_after = \"manual\"); contract it first, or `cutover rollback {}`",
                svc.name, svc.name, d.id, d.release, svc.name
            )));
        }
        let mut runners = Vec::new();
        if let Some(db) = &plan.database
            && !db.run_on.is_empty()
        {
            let labels: BTreeMap<String, BTreeMap<String, String>> = self
                .store
                .hosts()?
                .into_iter()
                .map(|h| (h.name, h.labels))
                .collect();
            runners = hosts
                .keys()
                .filter(|h| labels.get(*h).is_some_and(|l| labels_match(&db.run_on, l)))
                .cloned()
                .collect();
            if runners.is_empty() {
                let on: Vec<String> = db.run_on.iter().map(|(k, v)| format!("{k}={v}")).collect();
                return Err(Error::Refused(format!(
                    "[database] run_on ({}) matches none of the {} target host(s) ({}); label a target host so, or change run_on",
                    on.join(","),
                    hosts.len(),
                    hosts.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let previous_schema = svc.live.as_ref().and_then(|live| {
            let db = live.database.as_ref()?;
            Some(db.schema_name(&live.release.version))
        });
        Ok(rollout::DatabaseContext {
            runners,
            previous_schema,
            pending: pending.map(|d| d.id),
        })
    }

    /// The deployment whose schema change is live and not contracted yet, if any.
    fn pending_change(&self, svc: &ServiceRecord) -> Result<Option<DeploymentRecord>, Error> {
        let Some(id) = &svc.db_pending else {
            return Ok(None);
        };
        self.record(id)
    }

    /// Deployment `id` as last committed.
    fn record(&self, id: &str) -> Result<Option<DeploymentRecord>, Error> {
        match self.active.get(id) {
            Some(a) => Ok(Some(a.record.clone())),
            None => Ok(self.store.deployment(id)?),
        }
    }

    /// One deployment at a time per service.
    fn refuse_if_busy(&self, service: &ServiceRecord) -> Result<(), Error> {
        let Some(a) = service.active.as_ref().and_then(|id| self.active.get(id)) else {
            return Ok(());
        };
        let d = &a.record;
        Err(Error::Refused(format!(
            "service {} already has deployment {} in progress ({}); wait for it or run `cutover abort {}`",
            service.name,
            d.id,
            d.state.as_str(),
            d.id
        )))
    }

    /// The connected hosts `plan` targets, each with its desired state for the service.
    fn target_hosts(
        &mut self,
        plan: &Plan,
    ) -> Result<BTreeMap<String, Option<DesiredService>>, Error> {
        let matching: Vec<String> = self
            .store
            .hosts()?
            .into_iter()
            .filter(|h| labels_match(&plan.targets.labels, &h.labels))
            .map(|h| h.name)
            .collect();
        let connected: Vec<&String> = matching
            .iter()
            .filter(|h| self.fleet.is_connected(h))
            .collect();
        let mut hosts = BTreeMap::new();
        for h in connected {
            hosts.insert(h.clone(), self.desired(h, &plan.service)?);
        }
        if hosts.is_empty() {
            return Err(Error::Refused(no_targets(plan, matching.len())));
        }
        Ok(hosts)
    }

    /// Decides deployment `id` once (with the operator's order, if any) and carries out
    /// the decision. Returns the deployment as decided.
    fn step(&mut self, id: &str, order: Option<Order<'_>>) -> Result<DeploymentRecord, Error> {
        // The record is taken out while the decision reads it (nothing is copied unless
        // the decision changes something), and back in before anything is published.
        let Some(a) = self.active.remove(id) else {
            return Err(Error::NotFound(format!("unknown deployment {id:?}")));
        };
        let outcome = self.decide(&a.record, order);
        let was_final = a.record.state.is_final();
        self.active.insert(id.to_string(), a);
        let (next, change) = match outcome? {
            Outcome::Same(next) => return Ok(next),
            Outcome::Changed(next, change) => (next, change),
        };
        self.publish(*change)?;
        // A `cutover rollback` that succeeded undoes the schema change it rolled back.
        if next.state == State::Succeeded
            && !was_final
            && let Some(undone) = &next.database.undoes
        {
            self.order_ended(undone, Command::Undo, &next.id)?;
        }
        Ok(next)
    }

    /// Decides `dep` once, reading the fleet and the desired state in place.
    fn decide(
        &mut self,
        dep: &DeploymentRecord,
        order: Option<Order<'_>>,
    ) -> Result<Outcome, Error> {
        let now = now_ms();
        let previous = match &dep.database.after {
            Some(after) => self.record(after)?,
            None => None,
        };
        let queried = self.prometheus.sync(dep);
        for h in dep.hosts.keys() {
            self.cached_desired(h, &dep.service)?;
        }
        let states = self.fleet.views(dep.hosts.keys(), &dep.service, now);
        let desired = self.desired.get(&dep.service);
        let views: BTreeMap<String, HostView<'_>> = dep
            .hosts
            .keys()
            .zip(&states)
            .map(|(h, st)| {
                // A partition closes nothing: a host must also have been heard from
                // lately to vouch for anything (see `Fleet::reachable`).
                let heard = st.last_seen.unwrap_or(self.started_ms);
                let view = HostView {
                    connected: st.reachable,
                    lost_ms: if st.reachable {
                        0
                    } else {
                        now.saturating_sub(heard)
                    },
                    desired: desired.and_then(|m| m.get(h)).and_then(Option::as_ref),
                    observed: st.observed.as_deref(),
                };
                (h.clone(), view)
            })
            .collect();
        let inputs = rollout::Inputs {
            previous: previous.as_ref(),
            queried: &queried,
        };
        let decision = rollout::decide_with(dep, &views, inputs, order, now);
        drop(views);
        let next = decision.deployment;
        if next == *dep && decision.targets.is_empty() && decision.events.is_empty() {
            return Ok(Outcome::Same(next));
        }
        log_state(dep, &next);
        let mut targets = decision.targets;
        let mut service = self.service_after(dep, &next, now)?;
        let mut forget = None;
        if next.state.is_final()
            && !dep.state.is_final()
            && let Some(svc) = &service
            && svc.live.is_none()
            && self.forget_first_release(&next, &mut targets)?
        {
            forget = Some(svc.name.clone());
            service = None;
        }
        let change = Change {
            deployment: Some((next.clone(), decision.events)),
            service,
            targets,
            forget,
        };
        Ok(Outcome::Changed(next, Box::new(change)))
    }

    /// The service's record after `before` became `after`, when that changes it: the
    /// end of a deployment, or its schema change settled after its end.
    fn service_after(
        &self,
        before: &DeploymentRecord,
        after: &DeploymentRecord,
        now: u64,
    ) -> Result<Option<ServiceRecord>, Error> {
        let svc = self.store.service(&after.service)?.unwrap_or_default();
        if after.state.is_final() && !before.state.is_final() {
            return Ok(Some(rollout::concluded(svc, after, now)));
        }
        let when = crate::views::rfc3339(now).unwrap_or_default();
        Ok(rollout::changed_service(&svc, before, after, &when))
    }

    /// Stops the previous release's idle slots of each service once `keep_previous` has
    /// passed.
    fn retire_previous(&mut self) -> Result<(), Error> {
        let now = now_ms();
        if now < self.next_retire_check {
            return Ok(());
        }
        self.next_retire_check = now + RETIRE_CHECK_MS;
        for svc in self.store.services()? {
            if !rollout::retiring(&svc, now) {
                continue;
            }
            let desired = self.service_desired(&svc.name)?;
            let Some(r) = rollout::retire(&svc, &desired, now) else {
                continue;
            };
            self.publish(Change {
                service: Some(r.service),
                targets: r.targets,
                ..Change::default()
            })?;
            tracing::info!(service = svc.name, "previous release retired");
            // With the previous release gone, its schema version may go too.
            if let Some(d) = self.pending_change(&svc)?
                && d.plan.database.as_ref().map(|db| db.contract_after)
                    == Some(ContractAfter::Retire)
            {
                self.order_ended(
                    &d.id,
                    Command::Contract,
                    "keep_previous (the previous release retired)",
                )?;
            }
        }
        Ok(())
    }

    /// Carries out `change`: writes the deployment record, its events, the service
    /// record and the hosts' desired state (each with its next generation) in one
    /// transaction, then sends the desired state to the hosts, the events to the
    /// webhooks and the durations to the histograms.
    fn publish(&mut self, change: Change) -> Result<(), Error> {
        let mut batch = Batch::default();
        let mut sends = Vec::new();
        for (host, mut t) in change.targets {
            let current = self.cached_desired(&host, &t.service)?;
            let generation = current.map_or(0, |d| d.generation);
            t.generation = generation;
            // Only a host whose desired state changes is written to and sent anything.
            if current == Some(&t) {
                continue;
            }
            t.generation = generation + 1;
            batch.desired(&host, &t.service, t.encode_to_vec());
            sends.push((host, t));
        }
        if let Some((d, events)) = &change.deployment {
            let first = self.active.get(&d.id).map_or(0, |a| a.next_event);
            for (seq, e) in (first..).zip(events) {
                batch.event(&d.id, seq, e);
            }
            batch.deployment(d);
        }
        if let Some(svc) = &change.service {
            batch.service(svc);
        }
        if let Some(name) = &change.forget {
            batch.remove_service(name);
        }
        // Write what was decided before acting on it.
        self.store.commit(batch)?;
        let now = now_ms();
        for (host, t) in sends {
            self.fleet.send_desired(&host, vec![t.clone()]);
            let key = (host, t.service.clone());
            if t.removed {
                self.removing.insert(key.clone(), now);
            } else {
                self.removing.remove(&key);
            }
            let (host, service) = key;
            self.desired
                .entry(service)
                .or_default()
                .insert(host, Some(t));
        }
        if let Some((record, events)) = change.deployment {
            self.hooks.send(&record, &events);
            self.track(record, &events);
        }
        Ok(())
    }

    /// Keeps a committed deployment in `active` until it ends, its timeline's next
    /// sequence number with it, and feeds the histograms from its events.
    fn track(&mut self, record: DeploymentRecord, events: &[Event]) {
        let id = record.id.clone();
        let known = self.active.remove(&id);
        let new = known.is_none();
        let mut a = known.unwrap_or(Active {
            record: record.clone(),
            next_event: 0,
            step_started: None,
        });
        a.record = record;
        a.next_event += events.len() as u64;
        a.measure(events, &self.metrics);
        if a.record.state.is_final() {
            self.prometheus.forget(&id);
        }
        if decided(&a.record) && new {
            self.activate(a);
        } else if decided(&a.record) {
            self.active.insert(id, a);
        } else {
            for h in a.record.hosts.keys() {
                if let Some(ids) = self.by_host.get_mut(h) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_host.remove(h);
                    }
                }
            }
        }
    }

    /// Keeps `a`, not active until now, among the active deployments, indexed by its
    /// hosts (a deployment's hosts are fixed when it is created).
    fn activate(&mut self, a: Active) {
        for h in a.record.hosts.keys() {
            self.by_host
                .entry(h.clone())
                .or_default()
                .insert(a.record.id.clone());
        }
        self.active.insert(a.record.id.clone(), a);
    }

    fn desired(&mut self, host: &str, service: &str) -> Result<Option<DesiredService>, Error> {
        Ok(self.cached_desired(host, service)?.cloned())
    }

    /// `host`'s desired state for `service` as last written, read from the store once.
    fn cached_desired(
        &mut self,
        host: &str,
        service: &str,
    ) -> Result<Option<&DesiredService>, Error> {
        let known = self
            .desired
            .get(service)
            .is_some_and(|m| m.contains_key(host));
        if !known {
            let stored = match self.store.desired(host, service)? {
                None => None,
                Some(raw) => match DesiredService::decode(raw.as_slice()) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::error!(host, service, error = %e, "stored desired state unreadable");
                        None
                    }
                },
            };
            self.desired
                .entry(service.to_string())
                .or_default()
                .insert(host.to_string(), stored);
        }
        Ok(self
            .desired
            .get(service)
            .and_then(|m| m.get(host))
            .and_then(Option::as_ref))
    }
}

impl Active {
    /// Feeds the duration histograms from the deployment's committed events: each
    /// step from its start to the next one's (or the end), the whole deployment, and a
    /// rollback from its first bad signal to the last host confirmed. A no-op, which
    /// ends as it is created, is no deployment to measure.
    fn measure(&mut self, events: &[Event], metrics: &Metrics) {
        let d = &self.record;
        if d.hosts.values().all(|h| h.untouched) {
            return;
        }
        for e in events {
            match &e.kind {
                Kind::StepStarted { .. } | Kind::Ended { .. } => {
                    if let Some(t) = self.step_started.take() {
                        metrics.step.observe_ms(e.at_unix_ms.saturating_sub(t));
                    }
                    if matches!(e.kind, Kind::StepStarted { .. }) {
                        self.step_started = Some(e.at_unix_ms);
                    } else {
                        let ms = e.at_unix_ms.saturating_sub(d.created_unix_ms);
                        metrics.deployment.observe_ms(ms);
                    }
                }
                Kind::RollbackDone => {
                    if let Some(r) = &d.rollback {
                        let ms = e.at_unix_ms.saturating_sub(r.first_bad_unix_ms);
                        metrics.rollback.observe_ms(ms);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Whether the engine keeps deciding `d`: until it ends, and after that while its schema
/// change is being contracted or aborted.
fn decided(d: &DeploymentRecord) -> bool {
    !d.state.is_final() || d.database.change.as_ref().is_some_and(|c| c.busy())
}

/// Why a `cutover rollback` cannot undo schema change `c` now, if it cannot: its
/// contract runs or has failed (the previous release's version may be gone).
fn no_undo(c: &crate::model::SchemaChange) -> Option<String> {
    use crate::model::DbPhase;
    match c.phase {
        DbPhase::Contracting => Some("is being contracted now".into()),
        DbPhase::Aborting => Some("is being aborted now".into()),
        DbPhase::Failed => Some(format!(
            "failed its last command ({}); the previous release's schema may be gone: fix the database and run `cutover contract`, or deploy a fix forward",
            crate::rollout::database_failure(c).unwrap_or_default()
        )),
        _ => None,
    }
}

/// Why a command to ended deployment `d` is refused.
fn ended(d: &DeploymentRecord) -> Error {
    Error::Refused(format!(
        "deployment {} has already ended ({})",
        d.id,
        d.state.as_str()
    ))
}

/// Logs a deployment's change of state.
fn log_state(before: &DeploymentRecord, after: &DeploymentRecord) {
    if after.state.is_final() && before.state.is_final() {
        let phase = |d: &DeploymentRecord| d.database.change.as_ref().map(|c| c.phase);
        if let Some(p) = phase(after).filter(|p| phase(before) != Some(*p)) {
            tracing::info!(id = after.id, phase = p.as_str(), "database change");
        }
    } else if after.state.is_final() {
        tracing::info!(
            id = after.id,
            state = after.state.as_str(),
            reason = after.reason.as_deref().unwrap_or(""),
            "deployment ended"
        );
    } else if after.state != before.state {
        tracing::info!(
            id = after.id,
            state = after.state.as_str(),
            step = after.step,
            traffic = after.traffic,
            "deployment state"
        );
    }
}

/// Why a plan has no host to deploy to: none matches its targets, or none of those is
/// connected.
fn no_targets(plan: &Plan, matched: usize) -> String {
    let sel = if plan.targets.labels.is_empty() {
        "no labels (every host)".to_string()
    } else {
        plan.targets
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    if matched == 0 {
        format!("no host matches the plan's targets ({sel})")
    } else {
        format!("{matched} host(s) match the plan's targets ({sel}) but none is connected")
    }
}
