//! The deployment engine: the one task that creates and advances deployments. It feeds
//! the pure [`crate::rollout`] decision with what the fleet reports, writes the outcome
//! to the store, and only then sends the new desired state to the hosts.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1::DesiredService;
use cutover_shared::names::labels_match;
use cutover_shared::plan::{Plan, Step};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::model::{DeploymentRecord, ServiceRecord, Slot, State};
use crate::rollout::{self, Command, HostView, Order};
use crate::store::{Batch, Store};
use crate::timeline;
use crate::webhooks::Webhooks;
use cutover_shared::clock::now_ms;

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

pub struct Created {
    pub id: String,
    pub noop: bool,
}

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
    Command {
        id: String,
        command: Command,
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

    /// `actor` says who asked (the CLI sends `user@host`), for the timeline.
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
}

pub struct Engine {
    store: Arc<Store>,
    fleet: Arc<Fleet>,
    rx: mpsc::Receiver<Request>,
    /// Deployments not yet ended, by id.
    active: BTreeMap<String, DeploymentRecord>,
    /// Desired state per (host, service), mirrored from the store.
    desired: HashMap<(String, String), DesiredService>,
    /// When to look for previous releases to retire next (unix ms).
    next_retire_check: u64,
    /// When this engine started (unix ms).
    started_ms: u64,
    /// Next timeline sequence number per active deployment.
    event_seq: HashMap<String, u64>,
    /// Where committed events go out.
    hooks: Webhooks,
    metrics: Arc<Metrics>,
    /// When the current step of each active deployment started (for its duration).
    step_started: HashMap<String, u64>,
}

/// How often the engine re-decides without being woken (holds, deadlines).
const TICK: Duration = Duration::from_millis(200);

impl Engine {
    pub fn new(
        store: Arc<Store>,
        fleet: Arc<Fleet>,
        hooks: Webhooks,
        metrics: Arc<Metrics>,
    ) -> Result<(Engine, Handle), Error> {
        let (tx, rx) = mpsc::channel(64);
        let active: BTreeMap<String, DeploymentRecord> = store
            .deployments()?
            .into_iter()
            .filter(|d| !d.state.is_final())
            .map(|d| (d.id.clone(), d))
            .collect();
        // Pick up each active deployment's timeline where it stopped.
        let mut event_seq = HashMap::new();
        for id in active.keys() {
            event_seq.insert(id.clone(), store.events(id)?.len() as u64);
        }
        Ok((
            Engine {
                store,
                fleet,
                rx,
                active,
                desired: HashMap::new(),
                next_retire_check: 0,
                started_ms: now_ms(),
                event_seq,
                hooks,
                metrics,
                step_started: HashMap::new(),
            },
            Handle { tx },
        ))
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                req = self.rx.recv() => match req {
                    Some(req) => self.handle(req),
                    None => break,
                },
                _ = self.fleet.changed() => {},
                _ = tick.tick() => {},
            }
            if let Err(e) = self.evaluate() {
                tracing::error!(error = %e, "advance deployments");
            }
        }
    }

    fn desired(&mut self, host: &str, service: &str) -> Result<Option<DesiredService>, Error> {
        let key = (host.to_string(), service.to_string());
        if let Some(d) = self.desired.get(&key) {
            return Ok(Some(d.clone()));
        }
        let Some(raw) = self.store.desired(host, service)? else {
            return Ok(None);
        };
        match DesiredService::decode(raw.as_slice()) {
            Ok(d) => {
                self.desired.insert(key, d.clone());
                Ok(Some(d))
            }
            Err(e) => {
                tracing::error!(host, service, error = %e, "stored desired state unreadable");
                Ok(None)
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
                let r = self.create(*plan, path, false, &actor);
                let _ = reply.send(r);
            }
            Request::Rollback {
                service,
                actor,
                reply,
            } => {
                let r = self.rollback(&service, &actor);
                let _ = reply.send(r);
            }
            Request::Command {
                id,
                command,
                actor,
                reply,
            } => {
                let r = self.command(&id, command, &actor);
                let _ = reply.send(r);
            }
        }
    }

    /// Feeds the duration histograms from committed events.
    fn measure(&mut self, d: &DeploymentRecord, events: &[timeline::Event]) {
        for e in events {
            match &e.kind {
                timeline::Kind::StepStarted { .. } | timeline::Kind::Ended { .. } => {
                    if let Some(t) = self.step_started.remove(&d.id) {
                        self.metrics.step.observe_ms(e.at_unix_ms.saturating_sub(t));
                    }
                    if matches!(e.kind, timeline::Kind::StepStarted { .. }) {
                        self.step_started.insert(d.id.clone(), e.at_unix_ms);
                    } else {
                        self.metrics
                            .deployment
                            .observe_ms(e.at_unix_ms.saturating_sub(d.created_unix_ms));
                    }
                }
                timeline::Kind::RollbackDone => {
                    if let Some(r) = &d.rollback {
                        self.metrics
                            .rollback
                            .observe_ms(e.at_unix_ms.saturating_sub(r.first_bad_unix_ms));
                    }
                }
                _ => {}
            }
        }
    }

    /// Adds `events` to `batch` under the deployment's next sequence numbers.
    fn record(&mut self, batch: &mut Batch, id: &str, events: Vec<timeline::Event>) {
        let seq = self.event_seq.entry(id.to_string()).or_insert(0);
        for e in events {
            batch.event(id, *seq, &e);
            *seq += 1;
        }
    }

    fn rollback(&mut self, service: &str, actor: &str) -> Result<Created, Error> {
        let rec = self.store.service(service)?.ok_or_else(|| {
            Error::NotFound(format!(
                "unknown service {service:?}: nothing was ever deployed under that name"
            ))
        })?;
        let Some(mut prev) = rec.previous.clone() else {
            return Err(Error::Refused(format!(
                "service {service} has no previous release to roll back to"
            )));
        };
        prev.strategy.steps = vec![Step {
            traffic: 100,
            hold: cutover_shared::Duration::ZERO,
            pause: false,
            hosts: None,
        }];
        prev.strategy.bake = cutover_shared::Duration::ZERO;
        prev.strategy.max_parallel = cutover_shared::plan::Count::Percent(100);
        self.create(prev, "(rollback)".into(), true, actor)
    }

    fn create(
        &mut self,
        plan: Plan,
        path: String,
        is_rollback: bool,
        actor: &str,
    ) -> Result<Created, Error> {
        let mut service = self
            .store
            .service(&plan.service)?
            .unwrap_or_else(|| ServiceRecord {
                name: plan.service.clone(),
                ..Default::default()
            });
        if let Some(active) = service.active.as_ref().and_then(|id| self.active.get(id)) {
            return Err(Error::Refused(format!(
                "service {} already has deployment {} in progress ({}); wait for it or run `cutover abort {}`",
                plan.service,
                active.id,
                active.state.as_str(),
                active.id
            )));
        }
        let mut targets: Vec<String> = self
            .store
            .hosts()?
            .into_iter()
            .filter(|h| labels_match(&plan.targets.labels, &h.labels))
            .map(|h| h.name)
            .collect();
        let matched = targets.len();
        targets.retain(|h| self.fleet.is_connected(h));
        if targets.is_empty() {
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
            return Err(Error::Refused(if matched == 0 {
                format!("no host matches the plan's targets ({sel})")
            } else {
                format!("{matched} host(s) match the plan's targets ({sel}) but none is connected")
            }));
        }
        let now = now_ms();
        let id = format!("d-{:06}", self.store.next_seq("deployment")?);
        let mut hosts = BTreeMap::new();
        for h in &targets {
            hosts.insert(h.clone(), self.desired(h, &plan.service)?);
        }
        let submission = rollout::Submission {
            id: id.clone(),
            previous_release: service.live.as_ref().map(|p| p.release.version.clone()),
            plan,
            plan_path: path,
            is_rollback,
            actor,
        };
        let decision = rollout::submit(submission, &hosts, now);
        let (dep, events) = (decision.deployment, decision.events);
        let noop = dep.state.is_final();
        if !noop {
            service.active = Some(id.clone());
        }
        let mut batch = Batch::default();
        batch.deployment(&dep).service(&service);
        self.record(&mut batch, &id, events.clone());
        self.store.commit(batch)?;
        self.hooks.send(&dep, &events);
        if noop {
            self.event_seq.remove(&id);
        }
        tracing::info!(
            id,
            service = dep.service,
            release = dep.release,
            hosts = dep.hosts.len(),
            noop,
            "deployment created"
        );
        if !noop {
            self.active.insert(id.clone(), dep);
        }
        Ok(Created { id, noop })
    }

    fn command(
        &mut self,
        id: &str,
        command: Command,
        actor: &str,
    ) -> Result<DeploymentRecord, Error> {
        let Some(dep) = self.active.get(id).cloned() else {
            return match self.store.deployment(id)? {
                Some(d) => Err(Error::Refused(format!(
                    "deployment {id} has already ended ({})",
                    d.state.as_str()
                ))),
                None => Err(Error::NotFound(format!("unknown deployment {id:?}"))),
            };
        };
        self.step(dep, Some((command, actor)))
    }

    /// Decides every active deployment once.
    fn evaluate(&mut self) -> Result<(), Error> {
        let ids: Vec<String> = self.active.keys().cloned().collect();
        for id in ids {
            if let Some(dep) = self.active.get(&id).cloned() {
                self.step(dep, None)?;
            }
        }
        self.retire_previous()?;
        Ok(())
    }

    fn step(
        &mut self,
        dep: DeploymentRecord,
        command: Option<(Command, &str)>,
    ) -> Result<DeploymentRecord, Error> {
        let now = now_ms();
        let mut desired: BTreeMap<String, Option<DesiredService>> = BTreeMap::new();
        let mut observed = BTreeMap::new();
        for h in dep.hosts.keys() {
            desired.insert(h.clone(), self.desired(h, &dep.service)?);
            observed.insert(h.clone(), self.fleet.observed(h, &dep.service));
        }
        let views: BTreeMap<String, HostView<'_>> = dep
            .hosts
            .keys()
            .map(|h| {
                // Never seen since this coordinator started: count from the start,
                // so a restart does not declare every host lost at once.
                let silent = now.saturating_sub(self.fleet.last_seen(h).unwrap_or(self.started_ms));
                // A partition closes nothing: a host must also have been heard from
                // lately to vouch for anything (see `Fleet::reachable`).
                let connected = self.fleet.reachable(h, now);
                let view = HostView {
                    connected,
                    lost_ms: if connected { 0 } else { silent },
                    desired: desired.get(h).and_then(Option::as_ref),
                    observed: observed.get(h).and_then(Option::as_ref),
                };
                (h.clone(), view)
            })
            .collect();
        let order = command.map(|(command, actor)| Order { command, actor });
        let decision = rollout::decide(&dep, &views, order, now);
        let events = decision.events;
        drop(views);
        let mut next = decision.deployment;
        if next == dep && decision.targets.is_empty() && events.is_empty() {
            return Ok(next);
        }
        let mut batch = Batch::default();
        self.record(&mut batch, &dep.id, events.clone());
        let mut sends = Vec::new();
        for (host, mut t) in decision.targets {
            let prev_gen = desired
                .get(&host)
                .and_then(|d| d.as_ref())
                .map_or(0, |d| d.generation);
            t.generation = prev_gen + 1;
            batch.desired(&host, &dep.service, t.encode_to_vec());
            sends.push((host, t));
        }
        if next.state.is_final() && next.ended_unix_ms.is_none() {
            next.ended_unix_ms = Some(now);
        }
        batch.deployment(&next);
        if next.state.is_final() {
            let mut svc = self.store.service(&next.service)?.unwrap_or_default();
            svc.name = next.service.clone();
            if svc.active.as_deref() == Some(next.id.as_str()) {
                svc.active = None;
            }
            if next.state == State::Succeeded {
                let replaced = svc.live.replace(next.plan.clone());
                if replaced.is_some() {
                    svc.previous = replaced;
                }
                let keep = next.plan.strategy.keep_previous.as_millis();
                svc.retire_previous_at_unix_ms = Some(now.saturating_add(keep));
            }
            batch.service(&svc);
            tracing::info!(
                id = next.id,
                state = next.state.as_str(),
                reason = next.reason.as_deref().unwrap_or(""),
                "deployment ended"
            );
        } else if next.state != dep.state {
            tracing::info!(
                id = next.id,
                state = next.state.as_str(),
                step = next.step,
                traffic = next.traffic,
                "deployment state"
            );
        }
        // Write what was decided before acting on it.
        self.store.commit(batch)?;
        self.hooks.send(&next, &events);
        self.measure(&next, &events);
        for (host, t) in sends {
            self.desired
                .insert((host.clone(), dep.service.clone()), t.clone());
            self.fleet.send_desired(&host, vec![t]);
        }
        if next.state.is_final() {
            self.active.remove(&next.id);
            self.event_seq.remove(&next.id);
        } else {
            self.active.insert(next.id.clone(), next.clone());
        }
        Ok(next)
    }

    /// Stops the previous release's idle slots once `keep_previous` has passed.
    fn retire_previous(&mut self) -> Result<(), Error> {
        let now = now_ms();
        if now < self.next_retire_check {
            return Ok(());
        }
        self.next_retire_check = now + 1_000;
        let services: Vec<ServiceRecord> = self
            .store
            .services()?
            .into_iter()
            .filter(|s| {
                s.active.is_none() && s.retire_previous_at_unix_ms.is_some_and(|t| t <= now)
            })
            .collect();
        for mut svc in services {
            let mut batch = Batch::default();
            let mut sends = Vec::new();
            for host in self.store.hosts()? {
                let Some(mut d) = self.desired(&host.name, &svc.name)? else {
                    continue;
                };
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
                if changed {
                    d.generation += 1;
                    batch.desired(&host.name, &svc.name, d.encode_to_vec());
                    sends.push((host.name.clone(), d));
                }
            }
            svc.retire_previous_at_unix_ms = None;
            batch.service(&svc);
            self.store.commit(batch)?;
            for (host, d) in sends {
                self.desired
                    .insert((host.clone(), svc.name.clone()), d.clone());
                self.fleet.send_desired(&host, vec![d]);
            }
            tracing::info!(service = svc.name, "previous release retired");
        }
        Ok(())
    }
}
