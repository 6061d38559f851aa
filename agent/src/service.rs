//! The services on this host: for each, the proxy on its public port and the blue and
//! green slots. [`Services::apply`] converges on a desired state idempotently — applying
//! the same state twice changes nothing — and [`Services::observe`] reports what runs.

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
use crate::ports::PortRange;
use crate::proxy::{self, Mode, Proxy, Routes, SlotMetrics, Upstream};
use crate::slot::{self, SlotCtx, SlotState, adopt};
use crate::store::Store;
use crate::trust::TrustedKeys;

struct SlotRun {
    spec: SlotSpec,
    /// The desired generation that started this run.
    generation: u64,
    metrics: Arc<SlotMetrics>,
    status: Arc<Mutex<SlotState>>,
    cancel: CancellationToken,
}

impl SlotRun {
    fn state(&self) -> SlotState {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

struct Runtime {
    desired: DesiredService,
    proxy: Option<Proxy>,
    error: String,
    slots: [Option<SlotRun>; 2],
    /// Weights in effect (blue, green): the desired ones unless the agent is routing
    /// around a slot that is not healthy.
    effective: [u32; 2],
    /// Why the effective weights differ from the desired ones.
    healing: String,
}

pub struct Services {
    data_dir: PathBuf,
    service_ip: IpAddr,
    limits: Limits,
    proxy_limits: proxy::Limits,
    store: Arc<Store>,
    runtimes: tokio::sync::Mutex<HashMap<String, Runtime>>,
    /// Signalled whenever something worth reporting changed.
    pub changed: Arc<Notify>,
    /// Names of services whose slots changed phase, for [`Services::run_rerouter`].
    phase_tx: mpsc::UnboundedSender<String>,
    phase_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    trusted_keys: Arc<TrustedKeys>,
    service_user: Option<String>,
    slot_ports: PortRange,
    /// Listening sockets from the agent run before this one, until a service claims its own.
    inherited: Mutex<Vec<Inherited>>,
}

/// How this host runs services: from the agent's configuration.
pub struct Settings {
    pub data_dir: PathBuf,
    /// The address public ports are bound on.
    pub service_ip: IpAddr,
    /// ed25519 public keys; when any are set, only artifacts signed by one of them run.
    pub trusted_keys: TrustedKeys,
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
        let Settings {
            data_dir,
            service_ip,
            trusted_keys,
            limits,
            service_user,
            slot_ports,
            proxy_limits,
        } = settings;
        let (phase_tx, phase_rx) = mpsc::unbounded_channel();
        Services {
            phase_tx,
            phase_rx: Mutex::new(Some(phase_rx)),
            data_dir,
            service_ip,
            limits,
            service_user,
            slot_ports,
            proxy_limits,
            store,
            runtimes: tokio::sync::Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
            cancel,
            tasks,
            trusted_keys: Arc::new(trusted_keys),
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
            let limits = self.proxy_limits;
            match Proxy::adopt(i.fd, addr, mode, limits, &self.cancel, &self.tasks) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "inherited socket not usable; binding anew")
                }
            }
        }
        Proxy::bind(addr, mode, self.proxy_limits, &self.cancel, &self.tasks)
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

    async fn converge(&self, d: DesiredService) {
        let mut rts = self.runtimes.lock().await;
        let rt = rts.entry(d.service.clone()).or_insert_with(|| Runtime {
            desired: DesiredService::default(),
            proxy: None,
            error: String::new(),
            slots: [None, None],
            effective: [0, 0],
            healing: String::new(),
        });
        let mode = if d.protocol == Protocol::Tcp as i32 {
            Mode::Tcp
        } else {
            Mode::Http
        };
        let addr = SocketAddr::new(self.service_ip, u16::try_from(d.listen).unwrap_or(0));

        // Slots first, so the routes below point at the right processes. A slot being
        // replaced or emptied is stopped only once the routes no longer name it, so no
        // request is sent to a process that is already stopping.
        let mut retired = Vec::new();
        for slot in Slot::BOTH {
            let (i, name) = (slot.index(), slot.as_str());
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
                tracing::info!(service = d.service, slot = name, "stopping slot");
                retired.push(old);
            }
            if let Some(spec) = want {
                rt.slots[i] = Some(self.start_slot(&d, slot, spec.clone()));
            }
        }

        // The public port: bind a new address before letting go of the old one, so a
        // port that cannot be bound leaves the service where it was.
        let bound = rt
            .proxy
            .as_ref()
            .is_some_and(|p| p.addr == addr && p.mode == mode);
        if bound {
            rt.error.clear();
        } else if d.listen == 0 {
            // Nothing to serve here (a first release that failed): no port is kept.
            if let Some(old) = rt.proxy.take() {
                tracing::info!(service = d.service, addr = %old.addr, "proxy stopped");
                old.stop();
            }
            rt.error.clear();
        } else {
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
        rt.desired = d;
        Self::route(rt);
        for old in retired {
            old.cancel.cancel();
        }
        drop(rts);
        self.changed.notify_one();
    }

    /// Points the proxy at the slots, in one atomic swap. Weights are the desired ones,
    /// except that traffic never stays on a slot that is not healthy while the other
    /// slot is: the agent moves it at once, without waiting for the coordinator, and
    /// says so in its report (the coordinator then rolls the fleet back).
    fn route(rt: &mut Runtime) {
        let state = |i: usize| rt.slots[i].as_ref().map(SlotRun::state);
        let mut w = [0u32; 2];
        for slot in Slot::BOTH {
            if rt.slots[slot.index()].is_some() {
                w[slot.index()] = rt.desired.weight(slot);
            }
        }
        rt.healing.clear();
        for slot in Slot::BOTH {
            let (i, other) = (slot.index(), slot.other().index());
            let (Some(me), Some(them)) = (state(i), state(other)) else {
                continue;
            };
            // A slot still starting up is not routed around (it has not failed); one
            // that crashed or turned unhealthy after serving is.
            let broken = matches!(
                me.phase,
                SlotPhase::Unhealthy | SlotPhase::Failed | SlotPhase::Stopped
            );
            if w[i] > 0 && broken && them.phase == SlotPhase::Healthy {
                let why = if me.error.is_empty() {
                    me.phase.name().to_string()
                } else {
                    me.error.clone()
                };
                rt.healing = format!(
                    "{} slot ({}) is {}: {why}",
                    slot.as_str(),
                    me.release,
                    me.phase.name()
                );
                w[other] += w[i];
                w[i] = 0;
            } else if w[i] > 0
                && them.phase == SlotPhase::Healthy
                && matches!(
                    me.phase,
                    SlotPhase::Fetching
                        | SlotPhase::Unpacking
                        | SlotPhase::Starting
                        | SlotPhase::Empty
                )
            {
                // Not ready yet (an agent restart, or a host catching up with its fleet):
                // the healthy slot serves until this one turns healthy. Nothing failed,
                // so nothing is reported.
                w[other] += w[i];
                w[i] = 0;
            }
        }
        if !rt.healing.is_empty() && rt.effective != w {
            tracing::warn!(
                service = rt.desired.service,
                healing = rt.healing,
                "routing around a slot that is not healthy"
            );
        }
        rt.effective = w;
        let Some(proxy) = &rt.proxy else { return };
        let entries = (0..2)
            .filter_map(|i| {
                let run = rt.slots[i].as_ref()?;
                Some((
                    w[i],
                    Upstream {
                        // Where the process runs now: a failed start moves it.
                        port: run.state().port,
                        metrics: run.metrics.clone(),
                    },
                ))
            })
            .collect();
        proxy.set_routes(Routes::new(entries));
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
        // An adopted process already listens: routes point at it from the start.
        let status = Arc::new(Mutex::new(SlotState {
            port: adopt.as_ref().map_or(0, |r| r.port),
            ..SlotState::default()
        }));
        let cancel = self.cancel.child_token();
        let ctx = SlotCtx {
            service: d.service.clone(),
            slot,
            spec: spec.clone(),
            ports: self.slot_ports,
            drain: Duration::from_millis(d.drain_ms),
            data_dir: self.data_dir.clone(),
            limits: self.limits.clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            changed: self.changed.clone(),
            phase_changed: self.phase_tx.clone(),
            log_cap: 10 << 20,
            store: self.store.clone(),
            trusted_keys: self.trusted_keys.clone(),
            adopt,
            service_user: self.service_user.clone(),
        };
        self.tasks.spawn(slot::run(ctx, cancel.clone()));
        SlotRun {
            spec,
            generation: d.generation,
            metrics,
            status,
            cancel,
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
