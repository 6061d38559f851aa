//! One slot's life as named steps:
//!
//! 1. [`prepare_release`] — the release on disk (fetched and unpacked once), then the
//!    `before_start` hook ([`Life::before_start`]) unless a live process is adopted;
//! 2. [`Life::start_or_adopt`] — the process an earlier agent run left for this very
//!    spec, or a new one on a port picked right before the start;
//! 3. [`Life::watch`] — health checks for as long as it runs, and the `validate` hook
//!    once it first turns healthy (it is reported healthy only once that passed); an
//!    exit is followed by a restart after a backoff ([`super::restart`]), or by giving
//!    up;
//! 4. [`drain_and_stop`] — when the slot is emptied or replaced: the `before_stop` hook
//!    while in-flight requests finish, then SIGTERM and SIGKILL after the stop timeout.
//!
//! Every step reports through the slot's state; how the life ended ([`End`]) is
//! reported once, by [`run`].

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use cutover_proto::v1::SlotPhase;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::hooks::{self, Validation};
use super::launch::Launch;
use super::log::SlotLog;
use super::process::Running;
use super::restart::{Next, Restarts};
use super::{SlotCtx, adopt, release};
use crate::health::{Checker, HealthPlan, Tally};
use crate::spawn::Launcher;
use crate::store::ProcessRecord;

/// How often drain looks at the slot's in-flight requests.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Why a slot's life ended.
enum End {
    /// Emptied or replaced: whatever ran is drained and stopped.
    Stopped,
    /// The slot cannot serve; the text says why (a failed download, a process that
    /// cannot start or never turned healthy...).
    Failed(String),
}

/// Runs one slot until `cancel`, then drains and stops it.
pub async fn run(ctx: SlotCtx, cancel: CancellationToken) {
    let version = ctx.version().to_string();
    ctx.set(|s| {
        s.release = version;
        s.phase = SlotPhase::Fetching;
        s.error.clear();
    });
    let Err(end) = live(&ctx, &cancel).await;
    match end {
        End::Stopped => ctx.phase(SlotPhase::Stopped, ""),
        End::Failed(why) => ctx.phase(SlotPhase::Failed, why),
    }
}

/// The steps, until the slot stops or fails.
async fn live(ctx: &SlotCtx, cancel: &CancellationToken) -> Result<Infallible, End> {
    let dir = prepare_release(ctx, cancel).await?;
    let launch = Launch::new(ctx, dir).map_err(|e| {
        tracing::warn!(service = ctx.service, slot = ctx.slot.as_str(), release = ctx.version(), error = %e, "slot process cannot run");
        End::Failed(e)
    })?;
    let _ = ctx.secrets.set(launch.secrets());
    let mut life = Life::new(ctx, launch);
    life.before_start(cancel).await?;
    loop {
        let mut current = life.start_or_adopt().await?;
        match life.watch(&mut current, cancel).await {
            Watched::Cancelled => {
                drain_and_stop(ctx, &life.launch, current).await;
                return Err(End::Stopped);
            }
            Watched::Invalid(why) => {
                current
                    .running
                    .stop(life.launch.stop_timeout(), &ctx.store)
                    .await;
                return Err(End::Failed(why));
            }
            Watched::NotHealthyInTime(why) => {
                current
                    .running
                    .stop(life.launch.stop_timeout(), &ctx.store)
                    .await;
                return Err(End::Failed(why));
            }
            Watched::Exited(status) => {
                let wait = life.after_exit(current, &status)?;
                tokio::select! {
                    _ = cancel.cancelled() => return Err(End::Stopped),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Step 1: the release directory, unless the slot is cancelled first or it cannot be
/// had. Old releases of the service are pruned once this one is on disk.
async fn prepare_release(ctx: &SlotCtx, cancel: &CancellationToken) -> Result<PathBuf, End> {
    let prepared = tokio::select! {
        _ = cancel.cancelled() => return Err(End::Stopped),
        r = release::prepare(ctx) => r,
    };
    let dir = prepared.map_err(|e| {
        tracing::warn!(service = ctx.service, slot = ctx.slot.as_str(), release = ctx.version(), error = %e, "slot preparation failed");
        End::Failed(e)
    })?;
    release::prune(
        &ctx.data_dir,
        &ctx.service,
        release::KEEP,
        std::slice::from_ref(&dir),
    );
    Ok(dir)
}

/// Step 4: runs the `before_stop` hook while the slot's in-flight requests finish (up
/// to the service's drain time), ends the byte streams still open on it, then stops
/// the process.
async fn drain_and_stop(ctx: &SlotCtx, launch: &Launch, current: Current) {
    let drained = async {
        let until = Instant::now() + ctx.drain;
        while ctx.metrics.in_flight() > 0 && Instant::now() < until {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    };
    tokio::join!(hooks::before_stop(ctx, launch, current.port), drained);
    // Byte streams (TCP, upgraded HTTP) do not end by themselves: they end here.
    ctx.metrics.drained.cancel();
    current
        .running
        .stop(launch.stop_timeout(), &ctx.store)
        .await;
    tracing::info!(
        service = ctx.service,
        slot = ctx.slot.as_str(),
        release = ctx.version(),
        "slot stopped"
    );
}

/// How watching a process ended.
enum Watched {
    /// The slot was emptied or replaced; the process still runs.
    Cancelled,
    /// The process exited (its group is gone); how it ended.
    Exited(String),
    /// The slot never turned healthy within its start timeout; why not.
    NotHealthyInTime(String),
    /// Its `validate` hook failed: how.
    Invalid(String),
}

/// What a slot keeps across restarts of its process.
struct Life<'a> {
    /// The slot's task context: spec, state, store.
    ctx: &'a SlotCtx,
    /// As whom, where and with what the process runs.
    launch: Launch,
    /// How health is judged.
    health: HealthPlan,
    /// Runs the checks.
    checker: Checker,
    /// The process's output; its last line says why it exited.
    log: SlotLog,
    /// The process an earlier agent run left for this spec, until it is taken up.
    adopt: Option<ProcessRecord>,
    /// When the slot's first process started: the start timeout counts from here.
    first_start: Instant,
    /// The slot passed its thresholds once: a failure from then on is "unhealthy", not
    /// "starting", and no longer a reason to give up.
    ever_healthy: bool,
    /// When to start again after an exit.
    restarts: Restarts,
    /// The port of the last start, so a failed start moves to another one.
    last_port: Option<u16>,
    /// The port `before_start` was told, which the first start takes.
    next_port: Option<u16>,
    /// The slot's `validate` hook passed (or it has none): it may be reported healthy.
    validated: bool,
}

/// The slot's current process while it is watched.
struct Current {
    /// The process itself.
    running: Running,
    /// How its check commands run (its user, release and environment).
    launcher: Launcher,
    /// The port it listens on; checks go there.
    port: u16,
    /// Consecutive check results of this process.
    tally: Tally,
    /// When it started (or was adopted), to tell a long run from a crash loop.
    started: Instant,
    /// The last failed check's reason, for the unhealthy and start-timeout reports.
    last_check_error: String,
}

impl<'a> Life<'a> {
    fn new(ctx: &'a SlotCtx, launch: Launch) -> Life<'a> {
        let health = HealthPlan::of(&ctx.spec);
        Life {
            checker: health.checker(),
            health,
            log: SlotLog::of(&ctx.data_dir, &ctx.service, ctx.slot, ctx.log_cap),
            adopt: ctx.adopt.clone(),
            first_start: Instant::now(),
            ever_healthy: false,
            restarts: Restarts::default(),
            last_port: None,
            next_port: None,
            validated: !ctx.has_validate(),
            launch,
            ctx,
        }
    }

    /// Step 1b: the `before_start` hook, on the port the first start will take, unless
    /// a live process is adopted (its hooks ran when it started). The start timeout
    /// counts from the end of the hook.
    async fn before_start(&mut self, cancel: &CancellationToken) -> Result<(), End> {
        if self.adopt.as_ref().is_some_and(adopt::runs) {
            return Ok(());
        }
        let ctx = self.ctx;
        ctx.set(|s| s.phase = SlotPhase::Starting);
        let port = ctx
            .ports
            .pick(None)
            .map_err(|e| End::Failed(e.to_string()))?;
        tokio::select! {
            _ = cancel.cancelled() => return Err(End::Stopped),
            r = hooks::before_start(ctx, &self.launch, port) => r.map_err(End::Failed)?,
        }
        self.next_port = Some(port);
        self.first_start = Instant::now();
        Ok(())
    }

    /// The phase of a slot whose process is (re)starting.
    fn starting_phase(&self) -> SlotPhase {
        if self.ever_healthy {
            SlotPhase::Unhealthy
        } else {
            SlotPhase::Starting
        }
    }

    /// Step 2: the live process an earlier run left for this spec, else a new one.
    async fn start_or_adopt(&mut self) -> Result<Current, End> {
        let phase = self.starting_phase();
        self.ctx.set(|s| s.phase = phase);
        match self.adopt.take().filter(adopt::runs) {
            Some(record) => Ok(self.take_over(record).await),
            None => self.start(),
        }
    }

    /// Adopts `record`'s process. It served before the agent restarted; one passing
    /// check confirms it still does, so traffic is not held back while the usual
    /// thresholds fill up.
    async fn take_over(&mut self, record: ProcessRecord) -> Current {
        let (port, pid) = (record.port, record.pid);
        self.ctx.set_port(port);
        tracing::info!(
            service = self.ctx.service,
            slot = self.ctx.slot.as_str(),
            release = self.ctx.version(),
            port,
            pid,
            "adopted the slot process an earlier agent run started"
        );
        // Its `validate` hook passed in the run that started it, if it was recorded so.
        self.validated |= record.validated;
        let mut current = self.current(Running::adopted(record), port);
        if self.checker.run(port, &current.launcher).await.is_ok() {
            current.tally.healthy = Some(true);
            self.ever_healthy = true;
            self.ctx.phase(self.healthy_phase(), "");
        }
        current
    }

    /// Starts a new process. Its port is picked right before the start, and another one
    /// after a failed start: a port taken meanwhile by someone else costs one restart,
    /// not the slot.
    fn start(&mut self) -> Result<Current, End> {
        let ctx = self.ctx;
        let port = match self.next_port.take() {
            Some(port) => Ok(port),
            None => ctx.ports.pick(self.last_port).map_err(|e| e.to_string()),
        };
        let started = port.and_then(|port| {
            let launcher = self.launch.launcher(port);
            let argv = self.launch.argv(port);
            Running::start(ctx, &launcher, &argv, port, self.log.path()).map(|r| (r, port))
        });
        let (running, port) = started.map_err(|e| {
            tracing::warn!(service = ctx.service, slot = ctx.slot.as_str(), error = %e, "slot process did not start");
            End::Failed(e)
        })?;
        ctx.set_port(port);
        let current = self.current(running, port);
        tracing::info!(
            service = ctx.service,
            slot = ctx.slot.as_str(),
            release = ctx.version(),
            port,
            pid = current.running.pid,
            user = current.launcher.user.name,
            "slot process started"
        );
        Ok(current)
    }

    fn current(&mut self, running: Running, port: u16) -> Current {
        self.last_port = Some(port);
        Current {
            running,
            launcher: self.launch.launcher(port),
            port,
            tally: self.health.tally(),
            started: Instant::now(),
            last_check_error: String::new(),
        }
    }

    /// Step 3: checks the process every interval until it exits, the slot is cancelled,
    /// or the slot did not turn healthy within its start timeout; runs `validate` once
    /// the process is healthy and not validated yet, checking it meanwhile.
    async fn watch(&mut self, current: &mut Current, cancel: &CancellationToken) -> Watched {
        let mut tick = tokio::time::interval(self.health.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = self.first_start + self.health.start_timeout;
        let mut validation: Option<Validation> = None;
        loop {
            if validation.is_none() && !self.validated && current.tally.healthy == Some(true) {
                validation = hooks::validation(self.ctx, &self.launch, current.port);
            }
            let validated = async {
                match validation.as_mut() {
                    Some(v) => v.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return Watched::Cancelled,
                status = current.running.wait() => return Watched::Exited(status),
                _ = tokio::time::sleep_until(deadline), if !self.ever_healthy => {
                    return Watched::NotHealthyInTime(self.not_healthy_in_time(current));
                }
                ran = validated => {
                    validation = None;
                    if let Err(why) = hooks::validated(self.ctx, ran) {
                        return Watched::Invalid(why);
                    }
                    self.passed_validation(current);
                }
                _ = tick.tick() => self.check(current).await,
            }
        }
    }

    /// `healthy` once validated, else `validating` (the hook runs or is about to).
    fn healthy_phase(&self) -> SlotPhase {
        if self.validated {
            SlotPhase::Healthy
        } else {
            SlotPhase::Validating
        }
    }

    /// The `validate` hook passed: the slot is healthy (if its checks still say so), and
    /// its process is recorded as validated, so a restarted agent adopting it does not
    /// validate it again.
    fn passed_validation(&mut self, current: &mut Current) {
        self.validated = true;
        current.running.mark_validated(&self.ctx.store);
        if current.tally.healthy == Some(true) {
            self.ctx.phase(SlotPhase::Healthy, "");
            self.log_healthy();
        }
    }

    fn log_healthy(&self) {
        let ctx = self.ctx;
        tracing::info!(
            service = ctx.service,
            slot = ctx.slot.as_str(),
            release = ctx.version(),
            "slot healthy"
        );
    }

    /// One health check, and the verdict it changes.
    async fn check(&mut self, current: &mut Current) {
        if self.log.rotate_if_full() {
            self.ctx.log_marks.rotated(self.log.path());
        }
        self.ctx
            .log_marks
            .mark(self.log.path(), cutover_shared::clock::now_ms());
        let result = self.checker.run(current.port, &current.launcher).await;
        if let Err(e) = &result {
            // An exec check's output may echo the environment: masked before it is
            // logged or reported.
            current.last_check_error = self.ctx.mask(e);
        }
        let ctx = self.ctx;
        match current.tally.record(result.is_ok()) {
            Some(true) => self.turned_healthy(),
            Some(false) => {
                ctx.phase(SlotPhase::Unhealthy, current.last_check_error.clone());
                tracing::warn!(
                    service = ctx.service,
                    slot = ctx.slot.as_str(),
                    release = ctx.version(),
                    error = current.last_check_error,
                    "slot unhealthy"
                );
            }
            None => {}
        }
    }

    fn turned_healthy(&mut self) {
        let ctx = self.ctx;
        if !self.ever_healthy {
            let ms = self.first_start.elapsed().as_millis() as u64;
            ctx.set(|s| s.start_ms = ms);
        }
        self.ever_healthy = true;
        self.restarts.healthy();
        ctx.phase(self.healthy_phase(), "");
        if self.validated {
            self.log_healthy();
        }
    }

    fn not_healthy_in_time(&self, current: &Current) -> String {
        let why = if current.last_check_error.is_empty() {
            "no check passed".to_string()
        } else {
            format!("last check: {}", current.last_check_error)
        };
        let msg = format!(
            "not healthy within {}s of start ({why})",
            self.health.start_timeout.as_secs()
        );
        tracing::warn!(
            service = self.ctx.service,
            slot = self.ctx.slot.as_str(),
            release = self.ctx.version(),
            "{msg}"
        );
        msg
    }

    /// After the process exited: reports how, and says how long to wait before the next
    /// start, or fails the slot when it gave up.
    fn after_exit(&mut self, current: Current, status: &str) -> Result<Duration, End> {
        let ctx = self.ctx;
        current.running.exited(&ctx.store);
        let tail = self
            .log
            .last_line()
            .map(|l| format!(": {}", ctx.mask(&l)))
            .unwrap_or_default();
        let msg = format!("process exited ({status}){tail}");
        tracing::warn!(
            service = ctx.service,
            slot = ctx.slot.as_str(),
            release = ctx.version(),
            "{msg}"
        );
        ctx.set(|s| s.restarts += 1);
        let healthy_at_exit = current.tally.healthy == Some(true);
        // A process that exits while its release is not validated yet has not proven
        // it can serve: it counts towards giving up.
        match self.restarts.exited(
            self.ever_healthy && self.validated,
            healthy_at_exit,
            current.started.elapsed(),
        ) {
            Next::GiveUp { starts } => {
                Err(End::Failed(format!("{msg}; gave up after {starts} starts")))
            }
            Next::RestartAfter(wait) => {
                ctx.phase(self.starting_phase(), msg);
                Ok(wait)
            }
        }
    }
}
