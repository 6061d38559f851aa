//! One slot's lifecycle: fetch and unpack its release, start the process through
//! [`crate::spawn`] (as the slot's user, with a clean environment) on a port picked right
//! before each start, or adopt the one a previous agent run left serving the same spec;
//! send its output to a capped log file, health-check it for as long as it runs, restart
//! it with backoff (on another port) when it crashes, and stop it (drain, SIGTERM, then
//! SIGKILL after `stop_timeout`) when the slot is emptied.
//!
//! Slot processes write their output straight to the log file, not through the agent,
//! so they outlive the agent: a restarted agent (re-executed for an upgrade, or started
//! again after a crash) adopts them instead of starting second copies.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_proto::v1::{RunSpec, SlotPhase, SlotSpec};
use prost::Message;
use sha2::Digest;
use tokio::process::Child;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::artifact::{self, Limits};
use crate::health::HealthPlan;
use crate::os::{alive, start_ticks};
use crate::ports::PortRange;
use crate::proxy::SlotMetrics;
use crate::spawn::{Launcher, RunAs};
use crate::store::ProcessRecord;
use crate::trust::TrustedKeys;

/// What a slot reports.
#[derive(Clone, Debug, Default)]
pub struct SlotState {
    pub release: String,
    pub phase: SlotPhase,
    pub error: String,
    pub restarts: u32,
    /// The private port the slot's process listens on; 0 before its first start. It
    /// changes when a start fails, so routes are taken from here.
    pub port: u16,
    /// Preparation times in ms: download (with sha256), unpack, start to healthy.
    pub fetch_ms: u64,
    pub unpack_ms: u64,
    pub start_ms: u64,
}

/// Everything a slot task needs.
pub struct SlotCtx {
    pub service: String,
    pub slot: &'static str,
    pub spec: SlotSpec,
    /// Where the slot's private port is picked from.
    pub ports: PortRange,
    pub drain: Duration,
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub status: Arc<Mutex<SlotState>>,
    pub metrics: Arc<SlotMetrics>,
    pub changed: Arc<Notify>,
    /// Told the service's name whenever this slot's phase or port changes, so routes
    /// follow health and the process.
    pub phase_changed: tokio::sync::mpsc::UnboundedSender<String>,
    /// Largest size of a slot's log file before it is rotated.
    pub log_cap: u64,
    /// Where started processes are recorded (for cleanup after an agent crash).
    pub store: Arc<crate::store::Store>,
    /// ed25519 public keys; when any are set, only artifacts signed by one of them run.
    pub trusted_keys: Arc<TrustedKeys>,
    /// A live process from an earlier agent run that already runs this spec on `port`.
    pub adopt: Option<ProcessRecord>,
    /// Whom to run the process as when the plan names no user (agent running as root).
    pub service_user: Option<String>,
}

/// A digest of everything in a slot spec, stable across runs (the environment map is
/// sorted first), so a process is adopted only for exactly the spec it was started with.
pub fn spec_digest(spec: &SlotSpec) -> String {
    let mut s = spec.clone();
    let mut env: Vec<(String, String)> = s
        .run
        .as_mut()
        .map(|r| std::mem::take(&mut r.env).into_iter().collect())
        .unwrap_or_default();
    env.sort();
    let mut h = sha2::Sha256::new();
    h.update(s.encode_to_vec());
    for (k, v) in env {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k);
        h.update((v.len() as u64).to_le_bytes());
        h.update(v);
    }
    hex::encode(h.finalize())
}

impl SlotCtx {
    fn set(&self, f: impl FnOnce(&mut SlotState)) {
        {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
        }
        self.changed.notify_one();
    }

    fn phase(&self, phase: SlotPhase, error: impl Into<String>) {
        let error = error.into();
        let mut changed = false;
        self.set(|s| {
            changed = s.phase != phase;
            s.phase = phase;
            s.error = error;
        });
        if changed {
            let _ = self.phase_changed.send(self.service.clone());
        }
    }

    /// Records the port the process gets and has the routes follow it.
    fn set_port(&self, port: u16) {
        let mut changed = false;
        self.set(|s| {
            changed = s.port != port;
            s.port = port;
        });
        if changed {
            let _ = self.phase_changed.send(self.service.clone());
        }
    }
}

/// `releases/<service>/<version>-<sha256 prefix>`.
pub fn release_dir(data_dir: &Path, service: &str, version: &str, sha256: &str) -> PathBuf {
    let safe: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    data_dir
        .join("releases")
        .join(service)
        .join(format!("{safe}-{}", &sha256[..sha256.len().min(12)]))
}

/// Keeps the newest `keep` release directories of a service, never removing `in_use`.
pub fn prune_releases(data_dir: &Path, service: &str, keep: usize, in_use: &[PathBuf]) {
    let root = data_dir.join("releases").join(service);
    let Ok(rd) = std::fs::read_dir(&root) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (_, d) in dirs.into_iter().skip(keep) {
        if !in_use.contains(&d) {
            tracing::info!(dir = %d.display(), "removing old release");
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}

/// A partial download, removed when dropped: after unpacking, after a failure, and when
/// preparation is cancelled midway.
struct Partial(PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %self.0.display(), error = %e, "remove partial download");
        }
    }
}

/// Fetches and unpacks the slot's release unless it is already on disk.
async fn prepare(ctx: &SlotCtx) -> Result<PathBuf, String> {
    let rel = ctx.spec.release.clone().unwrap_or_default();
    ctx.trusted_keys
        .check(&rel.sha256, &rel.signature)
        .map_err(|e| e.to_string())?;
    let dir = release_dir(&ctx.data_dir, &ctx.service, &rel.version, &rel.sha256);
    if dir.is_dir() {
        // Touch it so that pruning keeps recently used releases.
        let _ =
            std::fs::File::open(&dir).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        return Ok(dir);
    }
    ctx.phase(SlotPhase::Fetching, "");
    let fetch_started = Instant::now();
    let cache = ctx.data_dir.join("cache");
    crate::spawn::ensure_dir(&cache, 0o700).map_err(|e| e.to_string())?;
    let download = Partial(cache.join(format!(
        "{}-{}{}",
        rel.sha256,
        rand::random::<u32>(),
        artifact::PARTIAL_SUFFIX
    )));
    artifact::fetch(&rel.artifact, &rel.sha256, &download.0, &ctx.limits)
        .await
        .map_err(|e| e.to_string())?;
    let fetch_ms = fetch_started.elapsed().as_millis() as u64;
    ctx.set(|s| s.fetch_ms = fetch_ms);
    ctx.phase(SlotPhase::Unpacking, "");
    let unpack_started = Instant::now();
    let (d, dest, limits) = (download.0.clone(), dir.clone(), ctx.limits.clone());
    let unpacked = tokio::task::spawn_blocking(move || artifact::unpack(&d, &dest, &limits))
        .await
        .map_err(|e| format!("unpack: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    drop(download);
    let unpack_ms = unpack_started.elapsed().as_millis() as u64;
    ctx.set(|s| s.unpack_ms = unpack_ms);
    unpacked.map(|()| dir)
}

fn substitute(s: &str, port: u16) -> String {
    s.replace("${PORT}", &port.to_string())
}

struct Running {
    /// The process handle when this agent run started it; `None` for an adopted one.
    child: Option<Child>,
    pid: Option<i32>,
    record: Option<ProcessRecord>,
}

impl Running {
    fn adopted(record: ProcessRecord) -> Running {
        Running {
            child: None,
            pid: Some(record.pid),
            record: Some(record),
        }
    }

    /// Waits for the process to exit and describes how it ended.
    async fn wait(&mut self) -> String {
        if let Some(child) = self.child.as_mut() {
            return match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
        }
        let (Some(pid), Some(rec)) = (self.pid, self.record.as_ref()) else {
            return "no process".into();
        };
        // An adopted process: still this process's child after a re-exec (reap it and
        // learn its status), or nobody's after an agent crash (watch /proc).
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        loop {
            match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return format!("exit status: {code}"),
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return format!("signal: {} ({})", sig as i32, sig.as_str());
                }
                Ok(_) => {}
                Err(_) => {
                    if !alive(pid, rec.start_ticks) {
                        return "exited".into();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Stops slot processes that a previous run of the agent left behind and that are not
/// to be adopted (`adopt` says no): each recorded process that still runs with the
/// recorded start time gets SIGTERM, then SIGKILL after `grace`. Returns how many were
/// stopped.
pub async fn reap_orphans(
    store: &crate::store::Store,
    adopt: impl Fn(&ProcessRecord) -> bool,
    grace: Duration,
) -> usize {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let records = match store.processes() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "read recorded slot processes");
            return 0;
        }
    };
    let mut stopped = 0;
    for r in records {
        let live = alive(r.pid, r.start_ticks);
        if live && adopt(&r) {
            continue;
        }
        if live {
            tracing::warn!(
                service = r.service,
                slot = r.slot,
                pid = r.pid,
                release = r.release,
                "stopping a slot process left by an earlier agent run"
            );
            let _ = killpg(Pid::from_raw(r.pid), Signal::SIGTERM);
            let until = Instant::now() + grace;
            while alive(r.pid, r.start_ticks) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = killpg(Pid::from_raw(r.pid), Signal::SIGKILL);
            stopped += 1;
        }
        if let Err(e) = store.remove_process(&r) {
            tracing::error!(error = %e, "forget recorded slot process");
        }
    }
    stopped
}

/// Starts the slot's process on `port` through [`crate::spawn`] and records it.
fn spawn(ctx: &SlotCtx, launcher: &Launcher, port: u16, log: &SlotLog) -> Result<Running, String> {
    let run = ctx.spec.run.clone().unwrap_or_default();
    let argv: Vec<String> = run.command.iter().map(|a| substitute(a, port)).collect();
    let child = launcher
        .start(&argv, &log.path)
        .map_err(|e| e.to_string())?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let record = pid.and_then(|pid| {
        let r = ProcessRecord {
            service: ctx.service.clone(),
            slot: ctx.slot.to_string(),
            pid,
            start_ticks: start_ticks(pid)?,
            release: ctx
                .spec
                .release
                .as_ref()
                .map(|r| r.version.clone())
                .unwrap_or_default(),
            port,
            spec_digest: spec_digest(&ctx.spec),
        };
        if let Err(e) = ctx.store.put_process(&r) {
            tracing::error!(error = %e, "record slot process");
        }
        Some(r)
    });
    Ok(Running {
        child: Some(child),
        pid,
        record,
    })
}

/// Sends SIGTERM to the process group, then SIGKILL after `timeout`.
async fn stop(r: Running, timeout: Duration, store: &crate::store::Store) {
    let record = r.record.clone();
    stop_group(r, timeout).await;
    forget(store, record.as_ref());
}

fn forget(store: &crate::store::Store, record: Option<&ProcessRecord>) {
    if let Some(rec) = record
        && let Err(e) = store.remove_process(rec)
    {
        tracing::error!(error = %e, "forget slot process");
    }
}

async fn stop_group(mut r: Running, timeout: Duration) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let Some(pid) = r.pid {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
        if tokio::time::timeout(timeout, r.wait()).await.is_ok() {
            // The leader is gone; make sure no child of it keeps a port.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            return;
        }
        tracing::warn!(pid, "slot process ignored SIGTERM; sending SIGKILL");
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    if let Some(child) = r.child.as_mut() {
        let _ = child.kill().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), r.wait()).await;
}

/// A slot's log file. The process appends to it directly; the agent rotates it when it
/// passes the cap (copy to `.log.1`, then truncate: the process's appending descriptor
/// carries on at the new end) and reads its last line for error messages.
pub struct SlotLog {
    path: PathBuf,
    cap: u64,
}

impl SlotLog {
    fn new(path: PathBuf, cap: u64) -> SlotLog {
        SlotLog { path, cap }
    }

    fn rotate_if_full(&self) {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return;
        };
        if meta.len() < self.cap {
            return;
        }
        let old = self.path.with_extension("log.1");
        if std::fs::copy(&self.path, &old).is_ok()
            && let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.path)
        {
            let _ = f.set_len(0);
        }
    }

    /// The last non-empty line the process wrote, cut to 300 characters.
    fn last_line(&self) -> Option<String> {
        let mut f = std::fs::File::open(&self.path).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf);
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
        Some(line.chars().take(300).collect())
    }
}

/// Who the slot's processes run as, and the service's state directory (created owned by
/// that user); an error names what is wrong (an unknown user...).
fn user_and_state(ctx: &SlotCtx, run: &RunSpec) -> Result<(RunAs, PathBuf), String> {
    let user = RunAs::resolve(&run.user, ctx.service_user.as_deref()).map_err(|e| e.to_string())?;
    if run.user.is_empty() && user.is_root() && ctx.service_user.is_none() {
        tracing::warn!(
            service = ctx.service,
            slot = ctx.slot,
            "running the service as root: set [run] user in the plan, or start the agent with --service-user"
        );
    }
    let state =
        crate::spawn::state_dir(&ctx.data_dir, &ctx.service, &user).map_err(|e| e.to_string())?;
    Ok((user, state))
}

/// The variables a slot's processes (and its check commands) get on top of the clean
/// base: the plan's `[run] env` with `${PORT}` filled in, then `PORT` and `CUTOVER_*`.
fn slot_env(
    ctx: &SlotCtx,
    run: &RunSpec,
    version: &str,
    port: u16,
    state_dir: &Path,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = run
        .env
        .iter()
        .map(|(k, v)| (k.clone(), substitute(v, port)))
        .collect();
    env.sort();
    env.extend([
        ("PORT".to_string(), port.to_string()),
        ("CUTOVER_SERVICE".to_string(), ctx.service.clone()),
        ("CUTOVER_RELEASE".to_string(), version.to_string()),
        ("CUTOVER_SLOT".to_string(), ctx.slot.to_string()),
        (
            "CUTOVER_STATE_DIR".to_string(),
            state_dir.to_string_lossy().into_owned(),
        ),
    ]);
    env
}

/// Exits before turning healthy that fail the slot outright.
const MAX_EARLY_EXITS: u32 = 3;

/// Runs one slot until `cancel`, then drains and stops it.
pub async fn run_slot(ctx: SlotCtx, cancel: CancellationToken) {
    let version = ctx
        .spec
        .release
        .as_ref()
        .map(|r| r.version.clone())
        .unwrap_or_default();
    ctx.set(|s| {
        s.release = version.clone();
        s.phase = SlotPhase::Fetching;
        s.error.clear();
    });
    let dir = tokio::select! {
        _ = cancel.cancelled() => { ctx.phase(SlotPhase::Stopped, ""); return; }
        r = prepare(&ctx) => r,
    };
    let dir = match dir {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(service = ctx.service, slot = ctx.slot, release = version, error = %e, "slot preparation failed");
            ctx.phase(SlotPhase::Failed, e);
            return;
        }
    };
    let in_use = vec![dir.clone()];
    prune_releases(&ctx.data_dir, &ctx.service, 5, &in_use);

    let run = ctx.spec.run.clone().unwrap_or_default();
    let stop_timeout = Duration::from_millis(if run.stop_timeout_ms == 0 {
        30_000
    } else {
        run.stop_timeout_ms
    });
    let (user, state_dir) = match user_and_state(&ctx, &run) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(service = ctx.service, slot = ctx.slot, release = version, error = %e, "slot process cannot run");
            ctx.phase(SlotPhase::Failed, e);
            return;
        }
    };
    let launcher = |port: u16| Launcher {
        dir: dir.clone(),
        user: user.clone(),
        env: slot_env(&ctx, &run, &version, port, &state_dir),
    };

    let health = HealthPlan::of(&ctx.spec);
    let checker = health.checker();
    let log = SlotLog::new(
        ctx.data_dir
            .join("logs")
            .join(format!("{}-{}.log", ctx.service, ctx.slot)),
        ctx.log_cap,
    );
    let mut adopt = ctx.adopt.clone();
    let first_start = Instant::now();
    let mut ever_healthy = false;
    let mut early_exits = 0u32;
    let mut backoff = Duration::from_millis(500);
    let mut last_port = None;

    loop {
        ctx.set(|s| {
            s.phase = if ever_healthy {
                SlotPhase::Unhealthy
            } else {
                SlotPhase::Starting
            };
        });
        let mut tally = health.tally();
        let adopted = adopt.take().filter(|r| alive(r.pid, r.start_ticks));
        let (mut running, launcher, port) = if let Some(rec) = adopted {
            let launcher = launcher(rec.port);
            ctx.set_port(rec.port);
            tracing::info!(
                service = ctx.service,
                slot = ctx.slot,
                release = version,
                port = rec.port,
                pid = rec.pid,
                "adopted the slot process an earlier agent run started"
            );
            // It served before the agent restarted; one passing check confirms it still
            // does, so traffic is not held back while the usual thresholds fill up.
            if checker.run(rec.port, &launcher).await.is_ok() {
                tally.healthy = Some(true);
                ever_healthy = true;
                ctx.phase(SlotPhase::Healthy, "");
            }
            let port = rec.port;
            (Running::adopted(rec), launcher, port)
        } else {
            // Picked right before the start, and another one after a failed start: a
            // port taken meanwhile by someone else costs one restart, not the slot.
            let started = ctx
                .ports
                .pick(last_port)
                .map_err(|e| e.to_string())
                .and_then(|port| {
                    let launcher = launcher(port);
                    spawn(&ctx, &launcher, port, &log).map(|r| (r, launcher, port))
                });
            match started {
                Ok((r, launcher, port)) => {
                    ctx.set_port(port);
                    tracing::info!(
                        service = ctx.service,
                        slot = ctx.slot,
                        release = version,
                        port,
                        pid = r.pid,
                        user = launcher.user.name,
                        "slot process started"
                    );
                    (r, launcher, port)
                }
                Err(e) => {
                    tracing::warn!(service = ctx.service, slot = ctx.slot, error = %e, "slot process did not start");
                    ctx.phase(SlotPhase::Failed, e);
                    return;
                }
            }
        };
        last_port = Some(port);
        let started = Instant::now();
        let mut tick = tokio::time::interval(health.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_check_error = String::new();
        let exit = loop {
            let deadline = first_start + health.start_timeout;
            tokio::select! {
                _ = cancel.cancelled() => {
                    drain(&ctx).await;
                    stop(running, stop_timeout, &ctx.store).await;
                    ctx.phase(SlotPhase::Stopped, "");
                    tracing::info!(service = ctx.service, slot = ctx.slot, release = version, "slot stopped");
                    return;
                }
                status = running.wait() => {
                    // The leader exited; take its group down with it so nothing keeps the port.
                    if let Some(pid) = running.pid {
                        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                    }
                    forget(&ctx.store, running.record.as_ref());
                    break status;
                }
                _ = tokio::time::sleep_until(deadline), if !ever_healthy => {
                    let why = if last_check_error.is_empty() { "no check passed".to_string() } else { format!("last check: {last_check_error}") };
                    let msg = format!("not healthy within {}s of start ({why})", health.start_timeout.as_secs());
                    tracing::warn!(service = ctx.service, slot = ctx.slot, release = version, "{msg}");
                    stop(running, stop_timeout, &ctx.store).await;
                    ctx.phase(SlotPhase::Failed, msg);
                    return;
                }
                _ = tick.tick() => {
                    log.rotate_if_full();
                    let r = checker.run(port, &launcher).await;
                    if let Err(e) = &r {
                        last_check_error.clone_from(e);
                    }
                    match tally.record(r.is_ok()) {
                        Some(true) => {
                            if !ever_healthy {
                                let ms = first_start.elapsed().as_millis() as u64;
                                ctx.set(|s| s.start_ms = ms);
                            }
                            ever_healthy = true;
                            backoff = Duration::from_millis(500);
                            ctx.phase(SlotPhase::Healthy, "");
                            tracing::info!(service = ctx.service, slot = ctx.slot, release = version, "slot healthy");
                        }
                        Some(false) => {
                            ctx.phase(SlotPhase::Unhealthy, last_check_error.clone());
                            tracing::warn!(service = ctx.service, slot = ctx.slot, release = version, error = last_check_error, "slot unhealthy");
                        }
                        None => {}
                    }
                }
            }
        };
        let status = exit;
        let tail = log
            .last_line()
            .map(|l| format!(": {l}"))
            .unwrap_or_default();
        let msg = format!("process exited ({status}){tail}");
        tracing::warn!(
            service = ctx.service,
            slot = ctx.slot,
            release = version,
            "{msg}"
        );
        ctx.set(|s| s.restarts += 1);
        if !ever_healthy || tally.healthy != Some(true) {
            early_exits += 1;
        }
        if !ever_healthy && early_exits >= MAX_EARLY_EXITS {
            ctx.phase(
                SlotPhase::Failed,
                format!("{msg}; gave up after {early_exits} starts"),
            );
            return;
        }
        ctx.phase(
            if ever_healthy {
                SlotPhase::Unhealthy
            } else {
                SlotPhase::Starting
            },
            msg,
        );
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        tokio::select! {
            _ = cancel.cancelled() => { ctx.phase(SlotPhase::Stopped, ""); return; }
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Waits for the slot's in-flight requests to finish, up to the service's drain time.
async fn drain(ctx: &SlotCtx) {
    let until = Instant::now() + ctx.drain;
    while ctx.metrics.in_flight() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_proto::v1::{Release, RunSpec};

    fn spec(env: &[(&str, &str)]) -> SlotSpec {
        SlotSpec {
            release: Some(Release {
                version: "1.0.0".into(),
                ..Default::default()
            }),
            run: Some(RunSpec {
                command: vec!["./web".into()],
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn spec_digest_ignores_map_order_but_not_content() {
        let pairs: Vec<(String, String)> = (0..30)
            .map(|i| (format!("K{i}"), format!("v{i}")))
            .collect();
        let a: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut b = a.clone();
        b.reverse();
        assert_eq!(spec_digest(&spec(&a)), spec_digest(&spec(&b)));
        let mut c = a.clone();
        c[3].1 = "changed";
        assert_ne!(spec_digest(&spec(&a)), spec_digest(&spec(&c)));
        let mut other = spec(&a);
        other.release.as_mut().unwrap().version = "1.0.1".into();
        assert_ne!(spec_digest(&spec(&a)), spec_digest(&other));
    }

    fn sleeper() -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .expect("start sleep")
    }

    #[tokio::test]
    async fn leftovers_are_stopped_unless_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("a.redb")).unwrap();
        let (mut keep, mut stop) = (sleeper(), sleeper());
        let record = |c: &std::process::Child, slot: &str| {
            let pid = c.id() as i32;
            let r = ProcessRecord {
                service: "web".into(),
                slot: slot.into(),
                pid,
                start_ticks: start_ticks(pid).expect("start time"),
                release: "1.0.0".into(),
                port: 10_001,
                spec_digest: "d".into(),
            };
            store.put_process(&r).unwrap();
            r
        };
        let (k, s) = (record(&keep, "blue"), record(&stop, "green"));
        // A record whose process is gone is just forgotten.
        let gone = ProcessRecord {
            pid: i32::MAX - 1,
            slot: "blue".into(),
            ..k.clone()
        };
        store.put_process(&gone).unwrap();

        let stopped = reap_orphans(&store, |r| r.slot == "blue", Duration::from_secs(5)).await;
        assert_eq!(stopped, 1);
        assert!(!alive(s.pid, s.start_ticks), "the leftover was stopped");
        assert!(alive(k.pid, k.start_ticks), "the adoptable one runs on");
        assert_eq!(store.processes().unwrap(), vec![k]);
        let _ = keep.kill();
        let _ = keep.wait();
        let _ = stop.wait();
    }
}
