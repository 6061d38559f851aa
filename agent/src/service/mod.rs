//! The services on this host: for each, the proxy on its public port and the blue and
//! green slots. [`Services::apply`] converges on a desired state idempotently — applying
//! the same state twice changes nothing — and [`Services::observe`] reports what runs.
//! Which weights the proxy gets is the healing rule's answer (`heal`), recomputed
//! whenever a slot changes phase; during a deployment's shadow phase the routes also
//! name the slot that gets copies of live requests ([`crate::mirror`]).

mod heal;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_proto::Slot;
use cutover_proto::v1::{
    DesiredService, ObservedService, Protocol, SlotPhase, SlotSpec, SlotStatus,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::artifact::Limits;
use crate::handover::{Exe, Inherited};
use crate::hooks;
use crate::mirror::{Mirror, Rule, ShadowMetrics};
use crate::ports::PortRange;
use crate::proxy::{self, Mode, Proxy, Routes, SlotMetrics, Upstream};
use crate::slot::{self, SlotCtx, SlotState, adopt};
use crate::store::Store;
use crate::trust::TrustedKeys;

/// A slot's task, as the service holds it.
struct SlotRun {
    /// The spec it runs: a new desired spec replaces the run.
    spec: SlotSpec,
    /// The desired generation that started this run.
    generation: u64,
    /// Its proxy counters, shared with the routes.
    metrics: Arc<SlotMetrics>,
    /// Its answers to copies of live requests (shadow traffic), apart from the above.
    shadow: Arc<ShadowMetrics>,
    /// What the slot reports, written by its task.
    status: Arc<Mutex<SlotState>>,
    /// Stops the slot (drain, then stop the process).
    cancel: CancellationToken,
    /// What its hooks are told of the deployment: the latest desired state's.
    hook_context: Arc<Mutex<hooks::Context>>,
}

impl SlotRun {
    fn state(&self) -> SlotState {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One service on this host: what is desired, and what runs for it.
#[derive(Default)]
struct Runtime {
    /// The desired state applied last (its generation guards against older ones).
    desired: DesiredService,
    /// The public port's listener and routes; `None` while nothing is served.
    proxy: Option<Proxy>,
    /// Why the public port could not be bound as desired; empty when it is.
    error: String,
    /// The blue and green slots, indexed by [`Slot::index`].
    slots: [Option<SlotRun>; 2],
    /// Weights in effect (blue, green): the desired ones unless the agent is routing
    /// around a slot that is not healthy.
    effective: [u32; 2],
    /// Why the effective weights differ from the desired ones.
    healing: String,
    /// Where copies of live requests go, while the desired state asks for them and the
    /// slot can answer.
    mirror: Option<Arc<Mirror>>,
}

/// The services on this host and how they run.
pub struct Services {
    /// How services run here, from the agent's configuration.
    settings: Settings,
    /// The agent's database: desired states and slot processes.
    store: Arc<Store>,
    /// Each service by name.
    runtimes: tokio::sync::Mutex<HashMap<String, Runtime>>,
    /// Signalled whenever something worth reporting changed.
    pub changed: Arc<Notify>,
    /// Names of services whose slots changed phase, for [`Services::run_rerouter`].
    phase_tx: mpsc::UnboundedSender<String>,
    /// Its receiving end, until the rerouter takes it.
    phase_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// The agent's shutdown: slots and proxies stop with it.
    cancel: CancellationToken,
    /// Slot and proxy tasks, waited for at shutdown.
    tasks: TaskTracker,
    /// Listening sockets from the agent run before this one, until a service claims its own.
    inherited: Mutex<Vec<Inherited>>,
}

/// How this host runs services: from the agent's configuration.
pub struct Settings {
    /// The agent's data dir: releases, logs, state directories.
    pub data_dir: PathBuf,
    /// The address public ports are bound on.
    pub service_ip: IpAddr,
    /// When any key is trusted, only artifacts signed by one of them run.
    pub trusted_keys: Arc<TrustedKeys>,
    /// Artifact size limits and download timeouts.
    pub limits: Limits,
    /// Whom slot processes run as when the plan names no user (agent running as root).
    pub service_user: Option<String>,
    /// Where slot processes' private ports come from.
    pub slot_ports: PortRange,
    /// Connection cap and idle timeouts of the public ports.
    pub proxy_limits: proxy::Limits,
}

impl Services {
    pub fn new(
        settings: Settings,
        store: Arc<Store>,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Services {
        let (phase_tx, phase_rx) = mpsc::unbounded_channel();
        Services {
            settings,
            store,
            runtimes: tokio::sync::Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
            phase_tx,
            phase_rx: Mutex::new(Some(phase_rx)),
            cancel,
            tasks,
            inherited: Mutex::new(Vec::new()),
        }
    }

    /// False while the agent's store cannot be written (e.g. a full disk).
    pub fn store_writable(&self) -> bool {
        self.store.writable()
    }

    /// Listening sockets inherited from the previous run; [`Services::restore`] hands
    /// each to its service and closes the ones no service wants any more.
    pub fn inherit(&self, sockets: Vec<Inherited>) {
        *self.inherited.lock().unwrap_or_else(|p| p.into_inner()) = sockets;
    }

    /// Binds the public port, or takes it over from the previous run.
    fn listen(&self, addr: SocketAddr, mode: Mode) -> std::io::Result<Proxy> {
        let taken = {
            let mut inh = self.inherited.lock().unwrap_or_else(|p| p.into_inner());
            inh.iter()
                .position(|i| i.addr == addr && i.mode == mode)
                .map(|at| inh.swap_remove(at))
        };
        if let Some(i) = taken {
            let limits = self.settings.proxy_limits;
            match Proxy::adopt(i.fd, addr, mode, limits, &self.cancel, &self.tasks) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "inherited socket not usable; binding anew")
                }
            }
        }
        Proxy::bind(
            addr,
            mode,
            self.settings.proxy_limits,
            &self.cancel,
            &self.tasks,
        )
    }

    /// Applies every desired state kept in the store (start-up, before any coordinator).
    pub async fn restore(&self) -> Result<usize, crate::store::Error> {
        let all = self.store.desired()?;
        let n = all.len();
        for d in all {
            self.converge(d).await;
        }
        let unclaimed =
            std::mem::take(&mut *self.inherited.lock().unwrap_or_else(|p| p.into_inner()));
        for i in unclaimed {
            tracing::info!(addr = %i.addr, "closing an inherited port no service uses");
        }
        Ok(n)
    }

    /// Records and applies a desired state from the coordinator. Older generations than
    /// the one applied are ignored.
    pub async fn apply(&self, d: DesiredService) {
        {
            let rts = self.runtimes.lock().await;
            if let Some(rt) = rts.get(&d.service)
                && rt.desired.generation > d.generation
            {
                tracing::debug!(service = d.service, "stale desired state ignored");
                return;
            }
        }
        if let Err(e) = self.store.put_desired(&d) {
            // Not persisted: still apply, so the fleet converges; a restart before the
            // next write falls back to the previous stored state.
            tracing::error!(service = d.service, error = %e, "persist desired state");
        }
        self.converge(d).await;
    }

    /// Converges one service on `d`: its slots, then its public port, then the routes
    /// between them; slots being replaced or emptied are stopped last.
    async fn converge(&self, d: DesiredService) {
        let mut rts = self.runtimes.lock().await;
        let rt = rts
            .entry(d.service.clone())
            .or_insert_with(Runtime::default);
        // Slots first, so the routes below point at the right processes. A slot being
        // replaced or emptied is stopped only once the routes no longer name it, so no
        // request is sent to a process that is already stopping.
        let retired = self.converge_slots(rt, &d);
        for run in rt.slots.iter().flatten() {
            *run.hook_context.lock().unwrap_or_else(|p| p.into_inner()) = hooks::Context::of(&d);
        }
        self.converge_port(rt, &d);
        rt.desired = d;
        Self::route(rt);
        for old in retired {
            old.cancel.cancel();
        }
        drop(rts);
        self.changed.notify_one();
    }

    /// Starts the slots `d` wants and that do not run yet (or run another spec, or
    /// failed and `d` is newer). Returns the runs they replace, still running.
    fn converge_slots(&self, rt: &mut Runtime, d: &DesiredService) -> Vec<SlotRun> {
        let mut retired = Vec::new();
        for slot in Slot::BOTH {
            let i = slot.index();
            let want = d.slot(slot);
            let keep = match (&rt.slots[i], want) {
                (Some(run), Some(spec)) => {
                    let failed = run.state().phase == SlotPhase::Failed;
                    run.spec == *spec && !(failed && d.generation > run.generation)
                }
                (None, None) => true,
                _ => false,
            };
            if keep {
                continue;
            }
            if let Some(old) = rt.slots[i].take() {
                tracing::info!(service = d.service, slot = slot.as_str(), "stopping slot");
                retired.push(old);
            }
            if let Some(spec) = want {
                rt.slots[i] = Some(self.start_slot(d, slot, spec.clone()));
            }
        }
        retired
    }

    /// The public port: binds a new address before letting go of the old one, so a
    /// port that cannot be bound leaves the service where it was (and says why).
    fn converge_port(&self, rt: &mut Runtime, d: &DesiredService) {
        let mode = if d.protocol == Protocol::Tcp as i32 {
            Mode::Tcp
        } else {
            Mode::Http
        };
        let addr = SocketAddr::new(
            self.settings.service_ip,
            u16::try_from(d.listen).unwrap_or(0),
        );
        let bound = rt
            .proxy
            .as_ref()
            .is_some_and(|p| p.addr == addr && p.mode == mode);
        if bound {
            rt.error.clear();
            return;
        }
        if d.listen == 0 {
            // Nothing to serve here (a first release that failed): no port is kept.
            if let Some(old) = rt.proxy.take() {
                tracing::info!(service = d.service, addr = %old.addr, "proxy stopped");
                old.stop();
            }
            rt.error.clear();
            return;
        }
        if rt.proxy.as_ref().is_some_and(|p| p.addr == addr)
            && let Some(old) = rt.proxy.take()
        {
            // Same port, other protocol: it must be released first.
            old.stop();
        }
        match self.listen(addr, mode) {
            Ok(p) => {
                tracing::info!(service = d.service, %addr, "proxy listening");
                if let Some(old) = rt.proxy.replace(p) {
                    old.stop();
                }
                rt.error.clear();
            }
            Err(e) => {
                rt.error = format!("bind {addr}: {e}");
                tracing::error!(service = d.service, error = rt.error, "proxy");
            }
        }
    }

    /// Points the proxy at the slots, in one atomic swap, with the weights the healing
    /// rule ([`heal::route`]) gives for the desired ones and the slots' phases.
    fn route(rt: &mut Runtime) {
        let states = rt.slots.each_ref().map(|s| s.as_ref().map(SlotRun::state));
        let views = states.each_ref().map(|s| {
            s.as_ref().map(|st| heal::SlotView {
                phase: st.phase,
                release: &st.release,
                error: &st.error,
            })
        });
        let desired = Slot::BOTH.map(|slot| rt.desired.weight(slot));
        let heal::Routing { weights, healing } = heal::route(desired, views);
        if !healing.is_empty() && rt.effective != weights {
            tracing::warn!(
                service = rt.desired.service,
                healing,
                "routing around a slot that is not healthy"
            );
        }
        rt.effective = weights;
        rt.healing = healing;
        let mirror = Self::mirror(rt, &states);
        let Some(proxy) = &rt.proxy else { return };
        let entries = rt
            .slots
            .iter()
            .zip(&states)
            .zip(weights)
            .filter_map(|((run, state), weight)| {
                let (run, state) = (run.as_ref()?, state.as_ref()?);
                Some((
                    weight,
                    Upstream {
                        // Where the process runs now: a failed start moves it.
                        port: state.port,
                        metrics: run.metrics.clone(),
                    },
                ))
            })
            .collect();
        proxy.set_routes(Routes::new(entries).mirrored(mirror));
    }

    /// The slot that gets copies of live requests, when the desired state asks for it
    /// and the slot can answer (healthy, or failing its checks: its answers count
    /// either way). The same mirror is kept while nothing about it changes, so its
    /// share and its copies in flight carry on.
    fn mirror(rt: &mut Runtime, states: &[Option<SlotState>; 2]) -> Option<Arc<Mirror>> {
        let wanted = rt.desired.shadow.as_ref().and_then(|spec| {
            let slot = Slot::parse(&spec.slot)?;
            let run = rt.slots[slot.index()].as_ref()?;
            let st = states[slot.index()].as_ref()?;
            let answers = matches!(st.phase, SlotPhase::Healthy | SlotPhase::Unhealthy);
            (answers && st.port != 0).then(|| (slot, Rule::of(spec), st.port, run.shadow.clone()))
        });
        let Some((slot, rule, port, metrics)) = wanted else {
            if rt.mirror.take().is_some() {
                tracing::info!(
                    service = rt.desired.service,
                    "stopped copying live requests"
                );
            }
            return None;
        };
        let same = rt
            .mirror
            .as_ref()
            .is_some_and(|m| m.rule == rule && m.port == port && Arc::ptr_eq(&m.metrics, &metrics));
        if !same {
            tracing::info!(
                service = rt.desired.service,
                slot = slot.as_str(),
                share = rule.share,
                "copying live requests to the slot being verified"
            );
            rt.mirror = Some(Arc::new(Mirror::new(rule, port, metrics)));
        }
        rt.mirror.clone()
    }

    /// Re-routes a service whenever one of its slots changes phase.
    pub async fn run_rerouter(self: Arc<Self>, cancel: CancellationToken) {
        let Some(mut rx) = self
            .phase_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        loop {
            let service = tokio::select! {
                _ = cancel.cancelled() => return,
                s = rx.recv() => match s { Some(s) => s, None => return },
            };
            let mut rts = self.runtimes.lock().await;
            if let Some(rt) = rts.get_mut(&service) {
                Self::route(rt);
            }
            drop(rts);
            self.changed.notify_one();
        }
    }

    fn start_slot(&self, d: &DesiredService, slot: Slot, spec: SlotSpec) -> SlotRun {
        let adopt = adopt::find(&self.store, &adopt::Claim::new(&d.service, slot, &spec));
        let metrics = Arc::new(SlotMetrics::default());
        let shadow = Arc::new(ShadowMetrics::default());
        // An adopted process already listens: routes point at it from the start.
        let status = Arc::new(Mutex::new(SlotState {
            port: adopt.as_ref().map_or(0, |r| r.port),
            ..SlotState::default()
        }));
        let cancel = self.cancel.child_token();
        let hook_context = Arc::new(Mutex::new(hooks::Context::of(d)));
        let ctx = SlotCtx {
            service: d.service.clone(),
            slot,
            spec: spec.clone(),
            ports: self.settings.slot_ports,
            drain: Duration::from_millis(d.drain_ms),
            data_dir: self.settings.data_dir.clone(),
            limits: self.settings.limits.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            changed: self.changed.clone(),
            phase_changed: self.phase_tx.clone(),
            log_cap: 10 << 20,
            store: self.store.clone(),
            trusted_keys: self.settings.trusted_keys.clone(),
            adopt,
            service_user: self.settings.service_user.clone(),
            hook_context: hook_context.clone(),
        };
        self.tasks.spawn(slot::run(ctx, cancel.clone()));
        SlotRun {
            spec,
            generation: d.generation,
            metrics,
            shadow,
            status,
            cancel,
            hook_context,
        }
    }

    /// Retries binding public ports that could not be bound before.
    pub async fn maintain(&self) {
        let pending: Vec<DesiredService> = {
            let rts = self.runtimes.lock().await;
            rts.values()
                .filter(|rt| !rt.error.is_empty() && rt.desired.listen != 0)
                .map(|rt| rt.desired.clone())
                .collect()
        };
        for d in pending {
            self.converge(d).await;
        }
    }

    /// Re-executes the agent with its public ports open and its slot processes running
    /// (see [`crate::handover`]): stops accepting, waits up to `drain` for client
    /// connections to end (idle ones are closed after a second), then execs. Returns only
    /// if the agent could not be re-executed, serving again as before.
    pub async fn hand_over(&self, exe: &Exe, drain: Duration) -> String {
        if let Err(e) = exe.check() {
            return e;
        }
        // Held until the exec: nothing converges meanwhile.
        let rts = self.runtimes.lock().await;
        let proxies: Vec<&Proxy> = rts.values().filter_map(|rt| rt.proxy.as_ref()).collect();
        for p in &proxies {
            p.begin_handover();
        }
        let start = std::time::Instant::now();
        let mut idle_closed = false;
        while proxies.iter().any(|p| p.connections() > 0) && start.elapsed() < drain {
            if !idle_closed && start.elapsed() >= Duration::from_secs(1) {
                for p in &proxies {
                    p.close_idle();
                }
                idle_closed = true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let open: usize = proxies.iter().map(|p| p.connections()).sum();
        tracing::info!(
            drained_ms = start.elapsed().as_millis() as u64,
            connections_cut = open,
            exe = %exe.path.display(),
            "re-executing the agent"
        );
        let fds: Vec<_> = proxies
            .iter()
            .map(|p| (p.addr, p.mode, p.listener_fd()))
            .collect();
        let err = exe.exec(&fds);
        for p in &proxies {
            if let Err(e) = p.resume() {
                tracing::error!(addr = %p.addr, error = %e, "accept again after a failed restart");
            }
        }
        err.to_string()
    }

    /// What runs now, per service.
    pub async fn observe(&self) -> Vec<ObservedService> {
        let rts = self.runtimes.lock().await;
        let mut out: Vec<ObservedService> = rts
            .iter()
            .map(|(name, rt)| {
                let slot = |i: usize| {
                    rt.slots[i].as_ref().map(|run| {
                        let st = run.state();
                        SlotStatus {
                            release: st.release,
                            phase: st.phase as i32,
                            error: st.error,
                            restarts: st.restarts,
                            port: u32::from(st.port),
                            metrics: Some(run.metrics.snapshot()),
                            fetch_ms: st.fetch_ms,
                            unpack_ms: st.unpack_ms,
                            start_ms: st.start_ms,
                            hooks: st.hooks,
                            hook_log: st.hook_log,
                            shadow: run.shadow.snapshot(),
                        }
                    })
                };
                // Weights are in effect only where the proxy is bound as desired.
                let serving = rt.proxy.is_some() && rt.error.is_empty();
                let [bw, gw] = rt.effective;
                ObservedService {
                    service: name.clone(),
                    generation: rt.desired.generation,
                    blue: slot(Slot::Blue.index()),
                    green: slot(Slot::Green.index()),
                    blue_weight: if serving { bw } else { 0 },
                    green_weight: if serving { gw } else { 0 },
                    error: rt.error.clone(),
                    healing: rt.healing.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }
}
