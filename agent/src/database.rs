//! Database tasks: the plan's `[database]` commands (expand, contract, abort) that the
//! coordinator asks this host to run, each exactly once.
//!
//! A task arrives in a service's desired state. It runs in its release's unpacked
//! directory (fetched and verified like a slot's if the host does not have it yet, and
//! never started), through [`crate::spawn`]: as the service's user, with a clean
//! environment, its whole process group stopped at the timeout. Its whole output goes
//! to `DATA/logs/deployments/<deployment>/`.
//!
//! Exactly once: the task is recorded in the agent's store *before* its command starts,
//! and a task id with a record is never started again — not after a reconnect, not after
//! the coordinator sends the same desired state again, not after a restart. A task that
//! was running when the agent stopped is reported `interrupted` (what it left running is
//! stopped first); deciding what happens next is the operator's call, made on the
//! coordinator. Tasks are only started on the coordinator's word, never from the desired
//! state an agent restores at start-up: the coordinator may have moved on meanwhile.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_proto::v1::{DatabaseTask, DatabaseTaskState, DatabaseTaskStatus};
use cutover_shared::clock::now_ms;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::artifact::Limits;
use crate::slot::process::stop_group;
use crate::slot::release::{Source, fetch_and_unpack};
use crate::spawn::{Exit, Launcher, Outcome, RunAs, RunOptions};
use crate::store::{Store, TaskRecord, TaskState};
use crate::trust::TrustedKeys;
use crate::{data_dir, os};

/// How many of a service's tasks a report carries (the newest): the coordinator only
/// waits for the newest one.
const REPORTED: usize = 5;
/// Lines of output a task's outcome keeps.
const TAIL_LINES: usize = 10;
/// Between SIGTERM and SIGKILL when the plan says nothing.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// How this host runs database tasks, from the agent's configuration.
pub struct Settings {
    /// Releases, the download cache and the tasks' logs are there.
    pub data_dir: PathBuf,
    /// Artifact size limits and download timeouts.
    pub limits: Limits,
    /// When any key is trusted, only artifacts signed by one of them are unpacked.
    pub trusted_keys: Arc<TrustedKeys>,
    /// Whom commands run as when the plan names no user (agent running as root).
    pub service_user: Option<String>,
}

/// What this host knows of one task.
#[derive(Clone, Debug)]
struct Known {
    /// The service it belongs to: reports are per service.
    service: String,
    /// As reported.
    status: DatabaseTaskStatus,
}

/// The database tasks of this host: the ones recorded, and the ones this run started.
pub struct Tasks {
    settings: Settings,
    /// Where tasks are recorded before they start.
    store: Arc<Store>,
    /// Every task known, by id: the store's records and the ones being prepared.
    known: Mutex<HashMap<String, Known>>,
    /// Told whenever a task's state changes, so the agent reports it.
    changed: Arc<Notify>,
    /// The agent's shutdown: a running command's process group is stopped with it.
    cancel: CancellationToken,
    /// Running tasks, waited for at shutdown.
    tracker: TaskTracker,
}

impl Tasks {
    /// The tasks recorded in `store` (after [`recover`]), ready to start more.
    pub fn new(
        settings: Settings,
        store: Arc<Store>,
        changed: Arc<Notify>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Tasks {
        let known = store
            .tasks()
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "read recorded database tasks");
                Vec::new()
            })
            .into_iter()
            .map(|r| (r.id.clone(), known(&r)))
            .collect();
        Tasks {
            settings,
            store,
            known: Mutex::new(known),
            changed,
            cancel,
            tracker,
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The coordinator wants `task` run for `service`: it starts, unless this host
    /// knows it already (running, ended, or interrupted by a restart).
    pub fn want(self: &Arc<Self>, service: &str, task: &DatabaseTask) {
        {
            let mut known = self.known();
            if known.contains_key(&task.id) {
                return;
            }
            let status = DatabaseTaskStatus {
                id: task.id.clone(),
                state: DatabaseTaskState::Preparing as i32,
                started_unix_ms: now_ms(),
                log: self.log(task).to_string_lossy().into_owned(),
                ..Default::default()
            };
            let service = service.to_string();
            known.insert(task.id.clone(), Known { service, status });
        }
        tracing::info!(
            service,
            task = task.id,
            command = ?task.command,
            "database task starting"
        );
        self.changed.notify_one();
        let (me, service, task) = (self.clone(), service.to_string(), task.clone());
        self.tracker
            .spawn(async move { me.run(service, task).await });
    }

    /// What this host knows of `service`'s tasks, the newest first.
    pub fn report(&self, service: &str) -> Vec<DatabaseTaskStatus> {
        let mut tasks: Vec<DatabaseTaskStatus> = self
            .known()
            .values()
            .filter(|k| k.service == service)
            .map(|k| k.status.clone())
            .collect();
        tasks.sort_by(|a, b| {
            b.started_unix_ms
                .cmp(&a.started_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        tasks.truncate(REPORTED);
        tasks
    }

    fn log(&self, task: &DatabaseTask) -> PathBuf {
        data_dir::task_log(&self.settings.data_dir, &task.deployment, &task.id)
    }

    /// Prepares the task's release, records the task, runs its command and records how
    /// it ended. A task that cannot start is recorded failed, so it is never tried again
    /// under the same id.
    async fn run(&self, service: String, task: DatabaseTask) {
        let mut rec = TaskRecord {
            id: task.id.clone(),
            service: service.clone(),
            state: TaskState::Running,
            started_unix_ms: now_ms(),
            exit_code: None,
            exit: String::new(),
            tail: Vec::new(),
            duration_ms: 0,
            log: self.log(&task).to_string_lossy().into_owned(),
            pid: 0,
            start_ticks: 0,
        };
        let ready = tokio::select! {
            _ = self.cancel.cancelled() => return,
            r = self.ready(&service, &task) => r,
        };
        let launcher = match ready {
            Ok(l) => l,
            Err(why) => return self.end(rec, Err(why)),
        };
        // Recorded before it starts: from here on, this id never starts again.
        if let Err(e) = self.store.put_task(&rec) {
            let why = format!("not started: the agent store cannot record it ({e})");
            tracing::error!(service, task = task.id, error = why, "database task");
            self.remember(&rec, DatabaseTaskState::Failed, why);
            return;
        }
        self.remember(&rec, DatabaseTaskState::Running, String::new());
        // `None`: the agent is stopping. The command was stopped with it, and the
        // record still says running, so the next run reports it interrupted.
        if let Some(outcome) = self.execute(&mut rec, &launcher, &task).await {
            self.end(rec, outcome);
        }
    }

    /// The release directory and how the command runs, or why it cannot.
    async fn ready(&self, service: &str, task: &DatabaseTask) -> Result<Launcher, String> {
        let release = task.release.clone().unwrap_or_default();
        let src = Source {
            data_dir: &self.settings.data_dir,
            service,
            release: &release,
            limits: &self.settings.limits,
            trusted_keys: &self.settings.trusted_keys,
            store: &self.store,
        };
        let dir = fetch_and_unpack(&src, |_| {}).await?;
        let user = RunAs::resolve(&task.user, self.settings.service_user.as_deref())
            .map_err(|e| e.to_string())?;
        let mut env: Vec<(String, String)> = task.env.clone().into_iter().collect();
        env.sort();
        Ok(Launcher { dir, user, env })
    }

    /// Runs the command, recording its process group once it has started. `None` when
    /// the agent stopped first.
    async fn execute(
        &self,
        rec: &mut TaskRecord,
        launcher: &Launcher,
        task: &DatabaseTask,
    ) -> Option<Result<Outcome, String>> {
        let (tell, mut pids) = tokio::sync::mpsc::unbounded_channel();
        let grace = match task.stop_timeout_ms {
            0 => DEFAULT_GRACE,
            ms => Duration::from_millis(ms),
        };
        let opts = RunOptions {
            grace,
            output_log: Some(PathBuf::from(&rec.log)),
            tail_lines: TAIL_LINES,
            started: Some(tell),
            ..RunOptions::new(Duration::from_millis(task.timeout_ms.max(1)))
        };
        let run = launcher.run(&task.command, &opts);
        tokio::pin!(run);
        loop {
            tokio::select! {
                r = &mut run => return Some(r.map_err(|e| e.to_string())),
                Some(pid) = pids.recv() => self.record_pid(rec, pid),
                // Dropping the run stops the command's whole group.
                _ = self.cancel.cancelled() => return None,
            }
        }
    }

    /// Records the command's process group, so a restarted agent stops what it leaves.
    fn record_pid(&self, rec: &mut TaskRecord, pid: u32) {
        let Ok(pid) = i32::try_from(pid) else { return };
        rec.pid = pid;
        rec.start_ticks = os::start_ticks(pid).unwrap_or(0);
        if let Err(e) = self.store.put_task(rec) {
            tracing::warn!(task = rec.id, error = %e, "record the database task's process");
        }
    }

    /// Records how the task ended: its outcome, or why it could not start.
    fn end(&self, mut rec: TaskRecord, outcome: Result<Outcome, String>) {
        match outcome {
            Ok(o) => {
                rec.state = if o.success() {
                    TaskState::Succeeded
                } else {
                    TaskState::Failed
                };
                rec.exit_code = match o.exit {
                    Exit::Code(c) => Some(c),
                    _ => None,
                };
                rec.exit = o.exit.to_string();
                rec.tail = o.tail;
                rec.duration_ms = o.duration.as_millis() as u64;
            }
            Err(why) => {
                rec.state = TaskState::Failed;
                rec.exit = why;
                rec.duration_ms = now_ms().saturating_sub(rec.started_unix_ms);
            }
        }
        rec.pid = 0;
        if let Err(e) = self.store.put_task(&rec) {
            tracing::error!(task = rec.id, error = %e, "record how the database task ended");
        }
        let ok = rec.state == TaskState::Succeeded;
        let last = rec.tail.last().cloned().unwrap_or_default();
        if ok {
            tracing::info!(
                service = rec.service,
                task = rec.id,
                exit = rec.exit,
                duration_ms = rec.duration_ms,
                "database task succeeded"
            );
        } else {
            tracing::warn!(
                service = rec.service,
                task = rec.id,
                exit = rec.exit,
                last,
                "database task failed"
            );
        }
        let mut known = self.known();
        known.insert(rec.id.clone(), self::known(&rec));
        drop(known);
        self.changed.notify_one();
    }

    /// Keeps `rec` in what is reported, in `state`, with `exit` saying how it ended.
    fn remember(&self, rec: &TaskRecord, state: DatabaseTaskState, exit: String) {
        let mut k = self::known(rec);
        k.status.state = state as i32;
        k.status.exit = exit;
        self.known().insert(rec.id.clone(), k);
        self.changed.notify_one();
    }
}

/// What a record reports.
fn known(r: &TaskRecord) -> Known {
    let state = match r.state {
        TaskState::Running => DatabaseTaskState::Running,
        TaskState::Succeeded => DatabaseTaskState::Succeeded,
        TaskState::Failed => DatabaseTaskState::Failed,
        TaskState::Interrupted => DatabaseTaskState::Interrupted,
    };
    Known {
        service: r.service.clone(),
        status: DatabaseTaskStatus {
            id: r.id.clone(),
            state: state as i32,
            exit_code: r.exit_code,
            exit: r.exit.clone(),
            tail: r.tail.clone(),
            started_unix_ms: r.started_unix_ms,
            duration_ms: r.duration_ms,
            log: r.log.clone(),
        },
    }
}

/// At start-up, before anything else runs: every task an earlier run left running is
/// interrupted — whatever of its command still runs is stopped (SIGTERM, SIGKILL after
/// `grace`), and its record says so. Returns how many there were.
pub async fn recover(store: &Store, grace: Duration) -> usize {
    let records = match store.tasks() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "read recorded database tasks");
            return 0;
        }
    };
    let mut interrupted = 0;
    for mut r in records
        .into_iter()
        .filter(|r| r.state == TaskState::Running)
    {
        if r.pid > 0 && os::alive(r.pid, r.start_ticks) {
            tracing::warn!(
                task = r.id,
                pid = r.pid,
                "stopping a database command left by an earlier agent run"
            );
            stop_group(r.pid, r.start_ticks, grace).await;
        }
        r.state = TaskState::Interrupted;
        r.exit =
            "interrupted: the agent stopped while the command ran; how it ended is unknown".into();
        r.duration_ms = now_ms().saturating_sub(r.started_unix_ms);
        r.pid = 0;
        if let Err(e) = store.put_task(&r) {
            tracing::error!(task = r.id, error = %e, "record an interrupted database task");
        }
        tracing::warn!(
            service = r.service,
            task = r.id,
            "database task interrupted by an agent restart"
        );
        interrupted += 1;
    }
    interrupted
}

#[cfg(test)]
mod tests;
