//! The database phases of a deployment (the plan's `[database]`): the expand before any
//! host prepares, the abort once a rollback has every host back on the old release, and
//! after success the contract (or, when `cutover rollback` undid the release, the
//! abort), each run exactly once by one host as a task in its desired state.
//!
//! | change | to | when |
//! |--------|----|------|
//! | `none` | `expanding` | the deployment starts preparing (after the earlier change it waits for is contracted) |
//! | `expanding` | `expanded` | the expand exited 0: hosts start preparing |
//! | `expanding` | `aborting` | the expand failed (rollback), or the deployment rolled back while it ran |
//! | `expanded` | `aborting` | the deployment rolls back: once every host is back on the old release |
//! | `expanded` | `contracting` | after success, ordered: `keep_previous` passed, the next deployment needs the old slot, or `cutover contract` |
//! | `expanded` | `aborting` | after success, ordered: a `cutover rollback` of it succeeded |
//! | `contracting` | `contracted` / `failed` | the contract exited 0 / did not |
//! | `aborting` | `aborted` / `failed` | the abort exited 0 / did not |
//!
//! A command that stands still — interrupted by an agent restart, its host unreachable
//! for `host_lost_after`, no host that may run it reachable — is given up, never sent
//! elsewhere on its own: a preparing deployment pauses with that reason, and `resume`
//! (or `cutover contract`, after success) runs it again as a new attempt with a new task
//! id. The contract and the abort after success first have the release they take the
//! schema of removed from every host's idle slot, and never run while a host still
//! serves it.

use std::collections::BTreeMap;

use cutover_proto::v1::{DatabaseTask, DatabaseTaskState, DesiredService};
use cutover_shared::plan::Database;

use super::machine::{Flow, Machine};
use super::rollback::Cause;
use super::{Command, HostView, Order};
use crate::model::{
    DbPhase, DeploymentRecord, PauseCause, SchemaChange, Slot, State, TaskEnd, TaskPhase, TaskRun,
};
use crate::timeline::Kind;

/// Where a database command stands after a decision looked at it.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Progress {
    /// Sent and not ended (or not sendable yet).
    Running,
    /// Given up without an end; why.
    Stalled(String),
    /// Ended: exit 0 or not.
    Ended(bool),
}

/// Whether a command may start now.
enum Ready {
    Go,
    /// Not yet: the hosts are still being told (the idle slots it needs gone).
    Wait,
    /// Not while this holds.
    Blocked(String),
}

impl Machine<'_, '_> {
    /// `pending` with an earlier change to contract first: waits until it is settled;
    /// pauses when its contract failed or stands still (`resume` tries it again).
    pub fn previous_contract(&mut self) -> Flow {
        let Some(after) = self.d.database.after.clone() else {
            return Flow::Next;
        };
        if self.d.state != State::Pending {
            return Flow::Next;
        }
        let previous = self
            .previous
            .filter(|p| p.id == after)
            .and_then(|p| p.database.change.as_ref());
        let trouble = match previous {
            None => None,
            Some(c) if matches!(c.phase, DbPhase::Contracted | DbPhase::Aborted) => None,
            Some(c) if c.phase == DbPhase::Failed => Some(failure(c).unwrap_or_default()),
            Some(c) => match c.stalled() {
                Some(why) => Some(why.to_string()),
                None => return Flow::Stop,
            },
        };
        match trouble {
            None => {
                self.d.database.after = None;
                self.fx.database(Kind::DatabaseWaited { deployment: after });
                Flow::Next
            }
            Some(why) => {
                self.pause(PauseCause::Database);
                self.d.reason = Some(format!(
                    "paused: the database contract of {after}, which must run before this deployment prepares, failed: {why}; fix the database, then `resume` runs it again, or `abort`"
                ));
                Flow::Stop
            }
        }
    }

    /// `preparing`: the expand runs (once) before any host prepares. A failed expand
    /// rolls back; one that stands still pauses.
    pub fn expand(&mut self) -> Flow {
        let expanding = self
            .d
            .database
            .change
            .as_ref()
            .is_some_and(|c| matches!(c.phase, DbPhase::None | DbPhase::Expanding));
        if self.d.state != State::Preparing || !expanding {
            return Flow::Next;
        }
        match self.run(TaskPhase::Expand) {
            Progress::Running => Flow::Stop,
            Progress::Stalled(why) => {
                self.pause(PauseCause::Database);
                self.d.reason = Some(format!(
                    "paused: database expand: {why}; `resume` runs it again on a reachable host that may run it, `abort` rolls back (and runs the abort)"
                ));
                Flow::Stop
            }
            Progress::Ended(true) => {
                self.set_phase(DbPhase::Expanded);
                // Preparation gets its whole progress deadline, whatever the expand took.
                self.d.phase_started_unix_ms = self.now;
                Flow::Next
            }
            Progress::Ended(false) => {
                let why = self
                    .d
                    .database
                    .change
                    .as_ref()
                    .and_then(failure)
                    .unwrap_or_default();
                self.roll_back(Cause::Database(format!("database expand failed {why}")));
                Flow::Stop
            }
        }
    }

    /// A rollback with every host back on the old release: the abort of a change whose
    /// expand ran (after the expand has ended, if it still runs). `Stop` while it runs
    /// or stands still (`resume` runs it again).
    pub fn abort_change(&mut self) -> Flow {
        let Some(c) = &self.d.database.change else {
            return Flow::Next;
        };
        let Some(expand) = c.last(TaskPhase::Expand) else {
            return Flow::Next;
        };
        if matches!(c.phase, DbPhase::Aborted | DbPhase::Failed) {
            return Flow::Next;
        }
        // Undo only what has ended: an expand still running goes on until its host
        // reports.
        let expanding = c.phase == DbPhase::Expanding && expand.in_flight();
        if expanding && self.run(TaskPhase::Expand) == Progress::Running {
            return Flow::Stop;
        }
        match self.run(TaskPhase::Abort) {
            Progress::Running | Progress::Stalled(_) => Flow::Stop,
            Progress::Ended(ok) => {
                self.set_phase(if ok {
                    DbPhase::Aborted
                } else {
                    DbPhase::Failed
                });
                Flow::Next
            }
        }
    }

    /// A deployment that has ended: the operator's (or the engine's) order about its
    /// change, then the contract or abort under way.
    pub fn settle_database(&mut self, order: Option<Order<'_>>) {
        if let Some(o) = order {
            self.fx.command(o.command.as_str(), o.actor);
            self.order_change(o.command);
        }
        let Some(c) = &self.d.database.change else {
            return;
        };
        let (phase, done) = match c.phase {
            DbPhase::Contracting => (TaskPhase::Contract, DbPhase::Contracted),
            DbPhase::Aborting => (TaskPhase::Abort, DbPhase::Aborted),
            _ => return,
        };
        if let Progress::Ended(ok) = self.run(phase) {
            self.set_phase(if ok { done } else { DbPhase::Failed });
        }
    }

    /// `contract` on an expanded change begins its contract, `undo` its abort; either
    /// on a change whose command of that kind stands still or failed runs it again.
    fn order_change(&mut self, command: Command) {
        let Some(c) = self.d.database.change.as_mut() else {
            return;
        };
        let last = c.runs.last().map(|r| r.phase);
        match (command, c.phase) {
            (Command::Contract, DbPhase::Expanded) => c.phase = DbPhase::Contracting,
            (Command::Undo, DbPhase::Expanded) => c.phase = DbPhase::Aborting,
            (Command::Contract, DbPhase::Contracting | DbPhase::Failed)
                if last == Some(TaskPhase::Contract) =>
            {
                self.retry_database()
            }
            (Command::Undo, DbPhase::Aborting | DbPhase::Failed)
                if last == Some(TaskPhase::Abort) =>
            {
                self.retry_database()
            }
            _ => {}
        }
    }

    /// `resume` after a database command stood still (or `contract` after a contract
    /// failed): the command runs again, as a new attempt, on a reachable host — unless
    /// its host has reported how it ended since, which then stands.
    pub fn retry_database(&mut self) {
        let Some(last) = self
            .d
            .database
            .change
            .as_ref()
            .and_then(|c| c.runs.last())
            .cloned()
        else {
            return;
        };
        if last.end.is_none()
            && let Some(end) = self.reported_end(&last)
        {
            self.record_end(&last, end);
            return;
        }
        let failed_contract =
            last.phase == TaskPhase::Contract && last.end.as_ref().is_some_and(|e| !e.ok);
        if let Some(c) = self.d.database.change.as_mut()
            && (last.stalled.is_some() || failed_contract)
        {
            c.retry = true;
            c.phase = last.phase.running();
        }
    }

    fn set_phase(&mut self, phase: DbPhase) {
        if let Some(c) = self.d.database.change.as_mut() {
            c.phase = phase;
        }
    }

    /// Sends, watches or reads the outcome of `phase`'s command.
    pub(super) fn run(&mut self, phase: TaskPhase) -> Progress {
        let Some(c) = &self.d.database.change else {
            return Progress::Ended(true);
        };
        let retry = c.retry;
        let Some(last) = c.last(phase).cloned() else {
            return self.begin(phase);
        };
        let failed = last.end.as_ref().is_some_and(|e| !e.ok);
        if retry && (last.stalled.is_some() || failed) {
            return self.begin(phase);
        }
        if let Some(end) = &last.end {
            return Progress::Ended(end.ok);
        }
        if let Some(why) = &last.stalled {
            return Progress::Stalled(why.clone());
        }
        self.watch(&last)
    }

    /// Starts `phase`'s command on the first reachable host that may run it, or records
    /// why it cannot start.
    fn begin(&mut self, phase: TaskPhase) -> Progress {
        let blocked = match self.ready(phase) {
            Ready::Wait => return Progress::Running,
            Ready::Blocked(why) => Some(why),
            Ready::Go => None,
        };
        let Some(c) = &self.d.database.change else {
            return Progress::Ended(true);
        };
        let reachable = c.runners.iter().find(|h| self.view(h).connected).cloned();
        let (host, stalled) = match (blocked, reachable) {
            (Some(why), _) => (c.runners.first().cloned().unwrap_or_default(), Some(why)),
            (None, Some(host)) => (host, None),
            (None, None) => (
                c.runners.first().cloned().unwrap_or_default(),
                Some(format!(
                    "no host that may run it is reachable ({})",
                    c.runners.join(", ")
                )),
            ),
        };
        let run = TaskRun {
            phase,
            attempt: c.runs.iter().filter(|r| r.phase == phase).count() as u32 + 1,
            host: host.clone(),
            started_unix_ms: self.now,
            log: None,
            stalled: stalled.clone(),
            end: None,
        };
        let task = run.task_id(&self.d.id);
        let phase_name = phase.as_str().to_string();
        if let Some(c) = self.d.database.change.as_mut() {
            c.phase = phase.running();
            c.retry = false;
            c.runs.push(run);
        }
        match stalled {
            Some(why) => {
                self.fx.database(Kind::DatabaseStalled {
                    phase: phase_name,
                    host,
                    why: why.clone(),
                });
                Progress::Stalled(why)
            }
            None => {
                self.fx.database(Kind::DatabaseStarted {
                    phase: phase_name,
                    host,
                    task,
                });
                Progress::Running
            }
        }
    }

    /// Whether `phase`'s command may start: a contract (or an abort after success) only
    /// once the release whose schema it takes away is gone from every host.
    fn ready(&self, phase: TaskPhase) -> Ready {
        let release = match phase {
            TaskPhase::Expand => return Ready::Go,
            TaskPhase::Abort if !self.d.state.is_final() => return Ready::Go,
            TaskPhase::Abort => self.d.release.clone(),
            TaskPhase::Contract => match &self.d.previous_release {
                Some(r) => r.clone(),
                None => return Ready::Go,
            },
        };
        let mut ready = Ready::Go;
        for name in self.d.hosts.keys() {
            let view = self.view(name);
            let Some(d) = view.desired else { continue };
            if let Some(live) = d.live_slot()
                && slot_release(d, live) == Some(release.as_str())
            {
                return Ready::Blocked(format!(
                    "host {name} still serves release {release}, whose schema the {} takes away; move it off that release first",
                    phase.as_str()
                ));
            }
            let idle = Slot::BOTH
                .into_iter()
                .any(|s| d.weight(s) == 0 && slot_release(d, s) == Some(release.as_str()));
            if view.connected && (idle || !view.is_current()) {
                ready = Ready::Wait;
            }
        }
        ready
    }

    /// Looks at what the running command's host reports: its end, an interruption, or
    /// the host lost.
    fn watch(&mut self, run: &TaskRun) -> Progress {
        let id = run.task_id(&self.d.id);
        let view = self.view(&run.host);
        let reported = view.observed.and_then(|o| o.database_task(&id));
        if let Some(st) = reported {
            if !st.log.is_empty() && run.log.as_deref() != Some(st.log.as_str()) {
                let log = st.log.clone();
                self.update_run(run, |r| r.log = Some(log));
            }
            if let Some(end) = self.reported_end(run) {
                let ok = end.ok;
                self.record_end(run, end);
                return Progress::Ended(ok);
            }
            if DatabaseTaskState::of(st.state) == DatabaseTaskState::Interrupted {
                return self.give_up(
                    run,
                    "interrupted: the agent restarted while the command ran, so how it ended is unknown; check the database"
                        .to_string(),
                );
            }
        }
        let after = self.d.plan.strategy.host_lost_after;
        if self
            .unreachable_for(&run.host)
            .is_some_and(|ms| ms >= after.as_millis())
        {
            return self.give_up(
                run,
                format!(
                    "host {} unreachable for more than {after} while the command ran (it may still be running there)",
                    run.host
                ),
            );
        }
        Progress::Running
    }

    /// How `run`'s host says it ended, if it has.
    fn reported_end(&self, run: &TaskRun) -> Option<TaskEnd> {
        let id = run.task_id(&self.d.id);
        let st = self.view(&run.host).observed?.database_task(&id)?;
        let state = DatabaseTaskState::of(st.state);
        state.is_final().then(|| TaskEnd {
            at_unix_ms: self.now,
            ok: state == DatabaseTaskState::Succeeded,
            exit_code: st.exit_code,
            exit: st.exit.clone(),
            duration_ms: st.duration_ms,
            tail: st.tail.clone(),
        })
    }

    fn record_end(&mut self, run: &TaskRun, end: TaskEnd) {
        let log = run.log.clone().or_else(|| {
            let id = run.task_id(&self.d.id);
            let st = self.view(&run.host).observed?.database_task(&id)?;
            (!st.log.is_empty()).then(|| st.log.clone())
        });
        self.fx.database(Kind::DatabaseEnded {
            phase: run.phase.as_str().into(),
            host: run.host.clone(),
            task: run.task_id(&self.d.id),
            ok: end.ok,
            exit: end.exit.clone(),
            exit_code: end.exit_code,
            duration_ms: end.duration_ms,
            tail: end.tail.clone(),
            log: log.clone().unwrap_or_default(),
        });
        self.update_run(run, |r| {
            r.end = Some(end);
            r.log = log;
            r.stalled = None;
        });
    }

    /// Gives `run` up: it is no longer sent, and the phase waits for a retry.
    fn give_up(&mut self, run: &TaskRun, why: String) -> Progress {
        self.fx.database(Kind::DatabaseStalled {
            phase: run.phase.as_str().into(),
            host: run.host.clone(),
            why: why.clone(),
        });
        let stalled = why.clone();
        self.update_run(run, |r| r.stalled = Some(stalled));
        Progress::Stalled(why)
    }

    fn update_run(&mut self, run: &TaskRun, f: impl FnOnce(&mut TaskRun)) {
        let found = self.d.database.change.as_mut().and_then(|c| {
            c.runs
                .iter_mut()
                .rev()
                .find(|r| r.phase == run.phase && r.attempt == run.attempt)
        });
        if let Some(r) = found {
            f(r);
        }
    }
}

/// Why `c`'s last command failed: on which host, how, and its last line of output.
pub fn failure(c: &SchemaChange) -> Option<String> {
    let last = c.runs.last()?;
    if let Some(why) = &last.stalled {
        return Some(format!("on {}: {why}", last.host));
    }
    let end = last.end.as_ref().filter(|e| !e.ok)?;
    let line = end.tail.last().map_or(String::new(), |l| format!(": {l}"));
    Some(format!("on {} ({}){line}", last.host, end.exit))
}

/// The version the slot `s` of `d` holds.
fn slot_release(d: &DesiredService, s: Slot) -> Option<&str> {
    d.slot(s)
        .and_then(|spec| spec.release_key())
        .map(|(v, _)| v)
}

/// The schema change a new deployment of `plan` makes: its schema name for the plan's
/// release, the previous release's, and the hosts that may run its commands (every
/// target host when the engine names none).
pub fn change(
    db: &Database,
    version: &str,
    previous_schema: Option<String>,
    runners: Vec<String>,
) -> SchemaChange {
    SchemaChange {
        schema: db.schema_name(version),
        previous_schema,
        phase: DbPhase::None,
        runners,
        runs: Vec::new(),
        retry: false,
    }
}

/// The task `dep` wants host `host` to run now, if any: its command in flight there.
pub fn task_for(dep: &DeploymentRecord, host: &str) -> Option<DatabaseTask> {
    let c = dep.database.change.as_ref()?;
    let run = c.in_flight().filter(|r| r.host == host)?;
    let db = dep.plan.database.as_ref()?;
    let command = match run.phase {
        TaskPhase::Expand => &db.expand,
        TaskPhase::Contract => &db.contract,
        TaskPhase::Abort => &db.abort,
    };
    let plan = &dep.plan;
    let spec = super::desired::slot_spec(plan);
    Some(DatabaseTask {
        id: run.task_id(&dep.id),
        phase: run.phase.as_str().into(),
        command: command.clone(),
        env: task_env(dep, c, run.phase).into_iter().collect(),
        release: spec.release,
        user: plan.run.user.clone().unwrap_or_default(),
        timeout_ms: db.timeout.as_millis(),
        stop_timeout_ms: plan.run.stop_timeout.as_millis(),
        deployment: dep.id.clone(),
    })
}

/// A command's environment: the plan's `[run] env` (but variables that name the slot's
/// `${PORT}`: a command has no port), then `CUTOVER_*`.
fn task_env(
    dep: &DeploymentRecord,
    c: &SchemaChange,
    phase: TaskPhase,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = dep
        .plan
        .run
        .env
        .iter()
        .filter(|(_, v)| !v.contains("${PORT}"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let vars = [
        ("CUTOVER_SERVICE", dep.service.clone()),
        ("CUTOVER_DEPLOYMENT", dep.id.clone()),
        ("CUTOVER_RELEASE", dep.release.clone()),
        (
            "CUTOVER_PREVIOUS_RELEASE",
            dep.previous_release.clone().unwrap_or_default(),
        ),
        ("CUTOVER_DB_SCHEMA", c.schema.clone()),
        (
            "CUTOVER_PREVIOUS_DB_SCHEMA",
            c.previous_schema.clone().unwrap_or_default(),
        ),
        ("CUTOVER_DB_PHASE", phase.as_str().to_string()),
    ];
    for (k, v) in vars {
        env.insert(k.to_string(), v);
    }
    env
}

/// A slot's variables for its release's schema version: `CUTOVER_DB_SCHEMA`, and
/// `-c search_path=<schema>,public` after any `PGOPTIONS` of `[run] env`, so libpq
/// clients of each release read their own version.
pub fn slot_env(db: &Database, version: &str, env: &mut BTreeMap<String, String>) {
    let schema = db.schema_name(version);
    let search = format!("-c search_path={schema},public");
    let pgoptions = match env.get("PGOPTIONS").map(|o| o.trim()) {
        Some(o) if !o.is_empty() => format!("{o} {search}"),
        _ => search,
    };
    env.insert("PGOPTIONS".into(), pgoptions);
    env.insert("CUTOVER_DB_SCHEMA".into(), schema);
}

/// `target` (the host's desired state as the deployment stands, if it changes) with
/// the database task `dep` wants of host `host`; or, when `dep` has a task of its own
/// there no more, without it. Another deployment's task is left alone.
pub fn with_task(
    dep: &DeploymentRecord,
    host: &str,
    target: Option<DesiredService>,
    current: Option<&DesiredService>,
) -> Option<DesiredService> {
    let want = task_for(dep, host);
    let ours = |d: &DesiredService| {
        d.database_task
            .as_ref()
            .is_some_and(|t| t.deployment == dep.id)
    };
    let base = match (target, &want) {
        (Some(t), _) => t,
        (None, Some(_)) => current.cloned().unwrap_or_else(|| DesiredService {
            service: dep.service.clone(),
            ..Default::default()
        }),
        (None, None) => current.filter(|c| ours(c))?.clone(),
    };
    let mut t = base;
    t.generation = 0;
    match want {
        Some(w) => t.database_task = Some(w),
        None if ours(&t) => t.database_task = None,
        None => {}
    }
    Some(t)
}

/// The hosts whose desired state changes for a deployment that has ended: the task of a
/// contract or abort after success, and the idle slots of the release it takes the
/// schema of, emptied first.
pub fn settled_changes(
    dep: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
) -> BTreeMap<String, DesiredService> {
    let retire = dep.database.change.as_ref().and_then(|c| match c.phase {
        DbPhase::Contracting => dep.previous_release.clone(),
        DbPhase::Aborting => Some(dep.release.clone()),
        _ => None,
    });
    super::desired::differing(dep, views, |name, current| {
        let emptied = match (&retire, current) {
            (Some(release), Some(d)) => without_idle(d, release),
            _ => None,
        };
        with_task(dep, name, emptied, current)
    })
}

/// `d` without its idle slots that hold `release`, if it has any and another release
/// serves.
fn without_idle(d: &DesiredService, release: &str) -> Option<DesiredService> {
    let live = d.live_slot()?;
    if slot_release(d, live) == Some(release) {
        return None;
    }
    super::service::without_idle_slots(d, |spec| {
        spec.release_key().map(|(v, _)| v) == Some(release)
    })
}

#[cfg(test)]
mod tests;
