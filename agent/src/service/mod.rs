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
    DesiredService, LogRequest, ObservedService, Protocol, SlotPhase, SlotSpec, SlotStatus,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::artifact::Limits;
use crate::database::{self, Tasks};
use crate::handover::{Exe, Inherited};
use crate::hooks;
use crate::logs;
use crate::mirror::{Mirror, Rule, ShadowMetrics};
use crate::ports::PortRange;
use crate::proxy::{self, Mode, Proxy, Routes, SlotMetrics, Upstream};
use crate::scrape::Scraper;
use crate::slot::{self, SlotCtx, SlotState, adopt};
use crate::store::Store;
use crate::trust::TrustedKeys;

/// The private port of a slot whose process runs (healthy or not), if it does.
fn running_port(st: &SlotState) -> Option<u16> {
    matches!(st.phase, SlotPhase::Healthy | SlotPhase::Unhealthy)
        .then_some(st.port)
        .filter(|p| *p != 0)
}

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
    /// The secret values its process got, once known: log lines are masked with them.
    secrets: Arc<std::sync::OnceLock<cutover_shared::secrets::Secrets>>,
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
    /// Scrapes the slots' own metrics while the desired state asks for it.
    scraper: Option<Scraper>,
}

/// A removed service whose files go once its slots have stopped.
struct Removed {
    /// The service's name.
    service: String,
    /// What its slots report: every one stopped (or failed) lets the files go.
    slots: Vec<Arc<Mutex<SlotState>>>,
    /// When it was removed: after [`REMOVED_FILES_WAIT`] the files go anyway.
    since: std::time::Instant,
}

/// The slots a `cutover logs --slot` names: `blue`, `green`, `live` (the one carrying
/// the most traffic now), `new` (the other one, when it runs), or both (empty).
fn log_slots(rt: &Runtime, which: &str) -> Result<Vec<Slot>, String> {
    let live = || {
        Slot::BOTH
            .into_iter()
            .filter(|s| rt.effective[s.index()] > 0)
            .max_by_key(|s| rt.effective[s.index()])
            .ok_or_else(|| "no slot carries traffic on this host".to_string())
    };
    match which {
        "" => Ok(Slot::BOTH.to_vec()),
        "blue" => Ok(vec![Slot::Blue]),
        "green" => Ok(vec![Slot::Green]),
        "live" => Ok(vec![live()?]),
        "new" => {
            let new = live()?.other();
            if rt.slots[new.index()].is_none() {
                return Err("no new slot runs beside the live one on this host".into());
            }
            Ok(vec![new])
        }
        other => Err(format!("--slot {other}: must be blue, green, live or new")),
    }
}

/// How long a removed service's files wait for its slots to stop.
const REMOVED_FILES_WAIT: Duration = Duration::from_secs(600);

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
    /// Removed services whose release directories and logs are still on disk.
    removed: Mutex<Vec<Removed>>,
    /// How far each slot log had grown when, for `cutover logs --since`.
    pub log_marks: Arc<slot::LogMarks>,
    /// The database commands the coordinator asks this host to run, each once.
    database: Arc<Tasks>,
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
    /// Size past which a slot's log file is rotated.
    pub slot_log_size: u64,
}

impl Services {
    pub fn new(
        settings: Settings,
        store: Arc<Store>,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Services {
        let (phase_tx, phase_rx) = mpsc::unbounded_channel();
        let changed = Arc::new(Notify::new());
        let database = Arc::new(Tasks::new(
            database::Settings {
                data_dir: settings.data_dir.clone(),
                limits: settings.limits.clone(),
                trusted_keys: settings.trusted_keys.clone(),
                service_user: settings.service_user.clone(),
            },
            store.clone(),
            changed.clone(),
            cancel.clone(),
            tasks.clone(),
        ));
        Services {
            settings,
            store,
            runtimes: tokio::sync::Mutex::new(HashMap::new()),
            changed,
            phase_tx,
            phase_rx: Mutex::new(Some(phase_rx)),
            cancel,
            tasks,
            inherited: Mutex::new(Vec::new()),
            removed: Mutex::new(Vec::new()),
            log_marks: Arc::default(),
            database,
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

    /// Records and applies a desired state from the coordinator, and starts the database
    /// task it carries unless this host knows it already. Older generations than the one
    /// applied are ignored.
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
        if d.removed {
            self.remove(&d.service).await;
            return;
        }
        if let Err(e) = self.store.put_desired(&d) {
            // Not persisted: still apply, so the fleet converges; a restart before the
            // next write falls back to the previous stored state.
            tracing::error!(service = d.service, error = %e, "persist desired state");
        }
        if let Some(task) = &d.database_task {
            self.database.want(&d.service, task);
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
        self.converge_scraper(rt, &d);
        rt.desired = d;
        Self::route(rt);
        for old in retired {
            old.cancel.cancel();
        }
        drop(rts);
        self.changed.notify_one();
    }

    /// Forgets `service`: its slots drain and stop, its port goes, and so does its
    /// desired state; its releases and slot logs go once the slots have stopped (see
    /// [`Services::maintain`]). Removing a service this host does not run does nothing.
    async fn remove(&self, service: &str) {
        let rt = self.runtimes.lock().await.remove(service);
        if let Err(e) = self.store.remove_desired(service) {
            tracing::error!(service, error = %e, "forget desired state");
        }
        let Some(mut rt) = rt else { return };
        if let Some(p) = rt.proxy.take() {
            p.stop();
        }
        let slots: Vec<SlotRun> = rt.slots.into_iter().flatten().collect();
        for s in &slots {
            s.cancel.cancel();
        }
        tracing::info!(service, "service removed");
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Removed {
                service: service.to_string(),
                slots: slots.iter().map(|s| s.status.clone()).collect(),
                since: std::time::Instant::now(),
            });
        self.changed.notify_one();
    }

    /// Removes the files of removed services whose slots have stopped; a service that
    /// came back meanwhile keeps them.
    async fn forget_removed_files(&self) {
        let rts = self.runtimes.lock().await;
        let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        removed.retain(|r| {
            if rts.contains_key(&r.service) {
                return false;
            }
            let stopped = r.slots.iter().all(|s| {
                let phase = s.lock().unwrap_or_else(|p| p.into_inner()).phase;
                matches!(phase, SlotPhase::Stopped | SlotPhase::Failed)
            });
            if !stopped && r.since.elapsed() < REMOVED_FILES_WAIT {
                return true;
            }
            !slot::forget_files(&self.settings.data_dir, &r.service)
        });
    }

    /// Starts the slots `d` wants and that do not run yet (or run another spec, or
    /// failed and `d` is newer). Returns the runs they replace, still running. A stopped
    /// service wants none.
    fn converge_slots(&self, rt: &mut Runtime, d: &DesiredService) -> Vec<SlotRun> {
        let mut retired = Vec::new();
        for slot in Slot::BOTH {
            let i = slot.index();
            let want = if d.stopped { None } else { d.slot(slot) };
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

    /// Scrapes the slots as `d` asks: a changed spec or path starts a new task, none
    /// stops it.
    fn converge_scraper(&self, rt: &mut Runtime, d: &DesiredService) {
        let same = match (&rt.scraper, &d.scrape) {
            (Some(s), Some(spec)) => s.spec == *spec && s.path == d.metrics_path,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        if let Some(old) = rt.scraper.take() {
            old.stop();
        }
        if let Some(spec) = &d.scrape
            && !d.metrics_path.is_empty()
        {
            rt.scraper = Some(Scraper::start(
                &d.service,
                &d.metrics_path,
                spec.clone(),
                self.changed.clone(),
                &self.cancel,
                &self.tasks,
            ));
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
        if let Some(scraper) = &rt.scraper {
            scraper.set_ports(states.each_ref().map(|s| s.as_ref().and_then(running_port)));
        }
        let mirror = Self::mirror(rt, &states);
        let Some(proxy) = &rt.proxy else { return };
        let entries = rt
            .slots
            .iter()
            .zip(&states)
            .zip(weights)
            .filter_map(|((run, state), weight)| {
                let (run, state) = (run.as_ref()?, state.as_ref()?);
                // Where the process runs now: a failed start moves it.
                Some((weight, Upstream::new(state.port, run.metrics.clone())))
            })
            .collect();
        proxy.set_routes(Routes::new(entries, upstream_timeout(&rt.desired)).mirrored(mirror));
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
        let secrets: Arc<std::sync::OnceLock<cutover_shared::secrets::Secrets>> = Arc::default();
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
            log_cap: self.settings.slot_log_size,
            store: self.store.clone(),
            trusted_keys: self.settings.trusted_keys.clone(),
            adopt,
            service_user: self.settings.service_user.clone(),
            hook_context: hook_context.clone(),
            secrets: secrets.clone(),
            log_marks: self.log_marks.clone(),
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
            secrets,
        }
    }

    /// Every second: retries binding public ports that could not be bound before, and
    /// removes the files of removed services once their slots have stopped.
    pub async fn maintain(&self) {
        self.forget_removed_files().await;
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

    /// Where slot `slot` of `service` serves its own metrics now: its private port and
    /// the service's metrics path; why not, for a relay to say.
    pub async fn metrics_target(&self, service: &str, slot: Slot) -> Result<(u16, String), String> {
        let rts = self.runtimes.lock().await;
        let rt = rts
            .get(service)
            .ok_or_else(|| format!("no service {service:?} on this host"))?;
        if rt.desired.metrics_path.is_empty() {
            return Err(format!("service {service} has no [analysis] scrape path"));
        }
        let port = rt.slots[slot.index()]
            .as_ref()
            .and_then(|run| running_port(&run.state()))
            .ok_or_else(|| format!("slot {slot} of {service} is not running"))?;
        Ok((port, rt.desired.metrics_path.clone()))
    }

    /// Every running slot whose service has a metrics path: (service, slot, release).
    pub async fn metrics_slots(&self) -> Vec<(String, Slot, String)> {
        let rts = self.runtimes.lock().await;
        let mut out = Vec::new();
        for (name, rt) in rts.iter() {
            if rt.desired.metrics_path.is_empty() {
                continue;
            }
            for slot in Slot::BOTH {
                let Some(run) = &rt.slots[slot.index()] else {
                    continue;
                };
                let st = run.state();
                if running_port(&st).is_some() {
                    out.push((name.clone(), slot, st.release.clone()));
                }
            }
        }
        out.sort();
        out
    }

    /// The log files a `cutover logs` request reads on this host, or why there are none:
    /// the slots of the service it names (`slot`: blue, green, live, new, or both), with
    /// the release each runs and its secret values, or a deployment's files.
    pub async fn log_sources(&self, req: &LogRequest) -> Result<Vec<logs::Source>, String> {
        let data = &self.settings.data_dir;
        if !req.deployment.is_empty() {
            return logs::deployment_sources(data, &req.deployment);
        }
        let rts = self.runtimes.lock().await;
        let rt = rts
            .get(&req.service)
            .ok_or_else(|| format!("service {} does not run on this host", req.service))?;
        let sources: Vec<logs::Source> = log_slots(rt, &req.slot)?
            .into_iter()
            .filter_map(|slot| {
                let run = rt.slots[slot.index()].as_ref();
                let release = run.map(|r| r.state().release).unwrap_or_default();
                if !req.release.is_empty() && release != req.release {
                    return None;
                }
                let path = slot::log_path(data, &req.service, slot);
                if run.is_none() && !path.exists() {
                    return None;
                }
                Some(logs::Source {
                    slot: slot.as_str().to_string(),
                    release,
                    file: String::new(),
                    path,
                    secrets: run
                        .and_then(|r| r.secrets.get().cloned())
                        .unwrap_or_default(),
                })
            })
            .collect();
        if sources.is_empty() && !req.release.is_empty() {
            return Err(format!(
                "no slot of {} runs release {} on this host",
                req.service, req.release
            ));
        }
        Ok(sources)
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
                            scrape: rt.scraper.as_ref().and_then(|s| s.report(i)),
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
                    stopped: rt.desired.stopped,
                    releases: slot::kept_releases(&self.settings.data_dir, name, &self.store),
                    database_tasks: self.database.report(name),
                }
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }
}

/// How long the service's slots may take to begin answering a request (0 on the wire:
/// the default).
fn upstream_timeout(d: &DesiredService) -> Duration {
    match d.upstream_timeout_ms {
        0 => proxy::DEFAULT_UPSTREAM_TIMEOUT,
        ms => Duration::from_millis(ms),
    }
}
