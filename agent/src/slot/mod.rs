//! A slot: one release of one service, running as blue or green on this host. This
//! module owns what a slot reports ([`SlotState`]) and what its task is given
//! ([`SlotCtx`]); [`run`] is its whole life. The parts, one job each:
//!
//! - `lifecycle` — [`run`] as named steps: prepare the release → start or adopt the
//!   process → watch its health and restart it when it exits → drain and stop it;
//! - [`release`] — the release directory: signature check, fetch, unpack, prune (also
//!   used by database commands, which run in a release without starting it);
//! - `hooks` — when the release's hooks run (`before_start`, `validate`,
//!   `before_stop`) and what the slot reports of them;
//! - `launch` — as whom, where and with which environment the process runs;
//! - `process` — one process, started or adopted: waiting for its exit, stopping its
//!   group, its record in the store;
//! - `restart` — when an exited process is started again, and when the slot gives up;
//! - `log` — the process's log file and its rotation;
//! - [`adopt`] — which process an earlier agent run left may be adopted by which slot.
//!
//! Slot processes write their output straight to the log file, not through the agent,
//! so they outlive the agent: a restarted agent (re-executed for an upgrade, or started
//! again after a crash) adopts them instead of starting second copies.

pub mod adopt;
mod hooks;
mod launch;
mod lifecycle;
mod log;
pub mod process;
pub mod release;
mod restart;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cutover_proto::Slot;
use cutover_proto::v1::{HookRun, SlotPhase, SlotSpec};
use cutover_shared::secrets::Secrets;
use tokio::sync::Notify;

use crate::artifact::Limits;
use crate::ports::PortRange;
use crate::proxy::SlotMetrics;
use crate::store::{ProcessRecord, Store};
use crate::trust::TrustedKeys;

pub use lifecycle::run;
pub use log::{Marks as LogMarks, Since, rotated as rotated_log};
pub use release::kept as kept_releases;

/// The log file of `service`'s `slot` in the data dir `data`.
pub fn log_path(data: &std::path::Path, service: &str, slot: Slot) -> PathBuf {
    log::SlotLog::of(data, service, slot, 0)
        .path()
        .to_path_buf()
}

/// Removes what a removed service left on disk once its slots have stopped: its
/// release directories and its slots' log files. Its state directory is the service's
/// own data and stays. Returns false, removing nothing, while one of its releases is
/// still being unpacked (a cancelled preparation's unpack runs to its end).
pub fn forget_files(data: &std::path::Path, service: &str) -> bool {
    if release::unpacking(data, service) {
        return false;
    }
    let releases = crate::data_dir::releases(data).join(service);
    if let Err(e) = std::fs::remove_dir_all(&releases)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %releases.display(), error = %e, "remove a removed service's releases");
    }
    for slot in Slot::BOTH {
        log::SlotLog::of(data, service, slot, 0).remove();
    }
    true
}

/// What a slot reports.
#[derive(Clone, Debug, Default)]
pub struct SlotState {
    /// The version of the release the slot runs (or prepares).
    pub release: String,
    /// Where the slot is in its life; routes and reports follow it.
    pub phase: SlotPhase,
    /// Why the slot failed, exited or turned unhealthy; empty otherwise.
    pub error: String,
    /// How often its process exited and was started again.
    pub restarts: u32,
    /// The private port the slot's process listens on; 0 before its first start. It
    /// changes when a start fails, so routes are taken from here.
    pub port: u16,
    /// Preparation times in ms: download (with sha256), unpack, start to healthy.
    pub fetch_ms: u64,
    pub unpack_ms: u64,
    pub start_ms: u64,
    /// The hooks the slot ran (the latest run of each), in the order they ran.
    pub hooks: Vec<HookRun>,
    /// Where the hooks' output is kept; empty before the first hook.
    pub hook_log: String,
}

/// Everything a slot's task is given.
pub struct SlotCtx {
    /// The service the slot belongs to (logs, file names, records).
    pub service: String,
    /// Which of the service's two slots this is.
    pub slot: Slot,
    /// What to run: release, command, environment, health check.
    pub spec: SlotSpec,
    /// Where the slot's private port is picked from.
    pub ports: PortRange,
    /// How long in-flight requests may take to finish before the process is stopped.
    pub drain: Duration,
    /// The agent's data dir: releases, logs and state directories live there.
    pub data_dir: PathBuf,
    /// Artifact size limits and download timeouts.
    pub limits: Limits,
    /// What the slot reports; read by the service for routes and observed state.
    pub status: Arc<Mutex<SlotState>>,
    /// The slot's proxy counters; drain waits for its in-flight requests.
    pub metrics: Arc<SlotMetrics>,
    /// Told whenever the slot's state changes, so the agent reports it.
    pub changed: Arc<Notify>,
    /// Told the service's name whenever this slot's phase or port changes, so routes
    /// follow health and the process.
    pub phase_changed: tokio::sync::mpsc::UnboundedSender<String>,
    /// Largest size of a slot's log file before it is rotated.
    pub log_cap: u64,
    /// Where started processes are recorded (for cleanup after an agent crash).
    pub store: Arc<Store>,
    /// When any key is trusted, only artifacts signed by one of them run.
    pub trusted_keys: Arc<TrustedKeys>,
    /// A live process from an earlier agent run that already runs this spec, found by
    /// the [`adopt`] rule.
    pub adopt: Option<ProcessRecord>,
    /// Whom to run the process as when the plan names no user (agent running as root).
    pub service_user: Option<String>,
    /// What the hooks are told of the deployment, kept current by the service as
    /// desired states arrive.
    pub hook_context: Arc<Mutex<crate::hooks::Context>>,
    /// The secret values the slot's process gets (`[run] secret_env`, from the plan or
    /// an env file), known once its environment is read: every error the slot reports
    /// is masked with them, and so are the log lines streamed from it.
    pub secrets: Arc<OnceLock<Secrets>>,
    /// Where the slot notes how far its log file had grown when (`logs --since`).
    pub log_marks: Arc<LogMarks>,
}

impl SlotCtx {
    /// The version of the slot's release.
    fn version(&self) -> &str {
        self.spec
            .release
            .as_ref()
            .map_or("", |r| r.version.as_str())
    }

    fn set(&self, f: impl FnOnce(&mut SlotState)) {
        {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
        }
        self.changed.notify_one();
    }

    /// `text` with the slot's secret values masked.
    fn mask(&self, text: &str) -> String {
        match self.secrets.get() {
            Some(s) => s.mask(text),
            None => text.to_string(),
        }
    }

    /// Moves the slot to `phase` with `error` (empty when none, masked); routes follow a
    /// change.
    fn phase(&self, phase: SlotPhase, error: impl Into<String>) {
        let error = self.mask(&error.into());
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
