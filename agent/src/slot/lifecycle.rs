//! One slot's life as named steps:
//!
//! 1. [`prepare_release`] — the release on disk (fetched and unpacked once);
//! 2. [`Life::start_or_adopt`] — the process an earlier agent run left for this very
//!    spec, or a new one on a port picked right before the start;
//! 3. [`Life::watch`] — health checks for as long as it runs; an exit is followed by a
//!    restart after a backoff ([`super::restart`]), or by giving up;
//! 4. [`drain_and_stop`] — when the slot is emptied or replaced: in-flight requests
//!    finish, then SIGTERM and SIGKILL after the stop timeout.
//!
//! Every step reports through the slot's state; how the life ended ([`End`]) is
//! reported once, by [`run`].

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use cutover_proto::v1::SlotPhase;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    loop {
        let mut current = life.start_or_adopt().await?;
        match life.watch(&mut current, cancel).await {
            Watched::Cancelled => {
                drain_and_stop(ctx, current.running, life.launch.stop_timeout()).await;
                return Err(End::Stopped);
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

/// Step 4: waits for the slot's in-flight requests to finish (up to the service's drain
/// time), then stops the process.
async fn drain_and_stop(ctx: &SlotCtx, running: Running, stop_timeout: Duration) {
    let until = Instant::now() + ctx.drain;
    while ctx.metrics.in_flight() > 0 && Instant::now() < until {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    running.stop(stop_timeout, &ctx.store).await;
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
            launch,
            ctx,
        }
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
        let mut current = self.current(Running::adopted(record), port);
        if self.checker.run(port, &current.launcher).await.is_ok() {
            current.tally.healthy = Some(true);
            self.ever_healthy = true;
            self.ctx.phase(SlotPhase::Healthy, "");
        }
        current
    }

    /// Starts a new process. Its port is picked right before the start, and another one
    /// after a failed start: a port taken meanwhile by someone else costs one restart,
    /// not the slot.
    fn start(&mut self) -> Result<Current, End> {
        let ctx = self.ctx;
        let started = ctx
            .ports
            .pick(self.last_port)
            .map_err(|e| e.to_string())
            .and_then(|port| {
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
    /// or the slot did not turn healthy within its start timeout.
    async fn watch(&mut self, current: &mut Current, cancel: &CancellationToken) -> Watched {
        let mut tick = tokio::time::interval(self.health.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = self.first_start + self.health.start_timeout;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Watched::Cancelled,
                status = current.running.wait() => return Watched::Exited(status),
                _ = tokio::time::sleep_until(deadline), if !self.ever_healthy => {
                    return Watched::NotHealthyInTime(self.not_healthy_in_time(current));
                }
                _ = tick.tick() => self.check(current).await,
            }
        }
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
        ctx.phase(SlotPhase::Healthy, "");
        tracing::info!(
            service = ctx.service,
            slot = ctx.slot.as_str(),
            release = ctx.version(),
            "slot healthy"
        );
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
        match self.restarts.exited(
            self.ever_healthy,
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
