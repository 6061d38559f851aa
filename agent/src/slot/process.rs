//! One process of a slot, started by this agent run or adopted from an earlier one:
//! waiting for it to exit, stopping its whole process group (SIGTERM, then SIGKILL),
//! and its record in the store, kept from its start until it is gone, so that a
//! restarted agent can adopt it or stop it.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::time::Instant;

use super::SlotCtx;
use super::adopt::spec_digest;
use crate::os;
use crate::spawn::Launcher;
use crate::store::{ProcessRecord, Store};

/// How often an adopted process that is nobody's child is looked for in /proc.
const ADOPTED_POLL: Duration = Duration::from_millis(100);
/// How often a leftover being stopped is looked for in /proc.
const LEFTOVER_POLL: Duration = Duration::from_millis(50);
/// How long SIGKILL may take to end a process before it is given up on.
const KILL_WAIT: Duration = Duration::from_secs(5);

pub struct Running {
    /// The process handle when this agent run started it; `None` for an adopted one.
    child: Option<Child>,
    /// Its pid, which is also its process group's id.
    pub pid: Option<i32>,
    /// Its record in the store, removed once it is gone.
    record: Option<ProcessRecord>,
}

impl Running {
    /// A process an earlier agent run started, taken over.
    pub fn adopted(record: ProcessRecord) -> Running {
        Running {
            child: None,
            pid: Some(record.pid),
            record: Some(record),
        }
    }

    /// Starts `argv` on `port` through [`crate::spawn`], output to `log`, and records it.
    pub fn start(
        ctx: &SlotCtx,
        launcher: &Launcher,
        argv: &[String],
        port: u16,
        log: &std::path::Path,
    ) -> Result<Running, String> {
        let child = launcher.start(argv, log).map_err(|e| e.to_string())?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok());
        let record = pid.and_then(|pid| {
            let r = ProcessRecord {
                service: ctx.service.clone(),
                slot: ctx.slot.as_str().to_string(),
                pid,
                start_ticks: os::start_ticks(pid)?,
                release: ctx.version().to_string(),
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

    /// Waits for the process to exit and describes how it ended.
    pub async fn wait(&mut self) -> String {
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
                    if !os::alive(pid, rec.start_ticks) {
                        return "exited".into();
                    }
                }
            }
            tokio::time::sleep(ADOPTED_POLL).await;
        }
    }

    /// After the leader exited: takes its group down with it, so nothing keeps the
    /// port, and forgets the record.
    pub fn exited(self, store: &Store) {
        if let Some(pid) = self.pid {
            os::signal_group(pid, Signal::SIGKILL);
        }
        forget(store, self.record.as_ref());
    }

    /// Sends SIGTERM to the process group, then SIGKILL after `timeout`, and forgets
    /// the record.
    pub async fn stop(mut self, timeout: Duration, store: &Store) {
        if let Some(pid) = self.pid {
            os::signal_group(pid, Signal::SIGTERM);
            if tokio::time::timeout(timeout, self.wait()).await.is_ok() {
                // The leader is gone; make sure no child of it keeps a port.
                os::signal_group(pid, Signal::SIGKILL);
                forget(store, self.record.as_ref());
                return;
            }
            tracing::warn!(pid, "slot process ignored SIGTERM; sending SIGKILL");
            os::signal_group(pid, Signal::SIGKILL);
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill().await;
        }
        let _ = tokio::time::timeout(KILL_WAIT, self.wait()).await;
        forget(store, self.record.as_ref());
    }
}

/// Stops a recorded process an earlier agent run left and no slot adopts: SIGTERM to
/// its group, then SIGKILL once it is gone or after `grace`.
pub async fn stop_leftover(r: &ProcessRecord, grace: Duration) {
    tracing::warn!(
        service = r.service,
        slot = r.slot,
        pid = r.pid,
        release = r.release,
        "stopping a slot process left by an earlier agent run"
    );
    stop_group(r.pid, r.start_ticks, grace).await;
}

/// Stops the process group of recorded process `pid` (started at `start_ticks`):
/// SIGTERM, then SIGKILL once it is gone or after `grace`.
pub async fn stop_group(pid: i32, start_ticks: u64, grace: Duration) {
    os::signal_group(pid, Signal::SIGTERM);
    let until = Instant::now() + grace;
    while os::alive(pid, start_ticks) && Instant::now() < until {
        tokio::time::sleep(LEFTOVER_POLL).await;
    }
    os::signal_group(pid, Signal::SIGKILL);
}

/// Removes a process's record from the store.
pub fn forget(store: &Store, record: Option<&ProcessRecord>) {
    if let Some(rec) = record
        && let Err(e) = store.remove_process(rec)
    {
        tracing::error!(error = %e, "forget slot process");
    }
}
