//! A deployment's part in the database, as the store keeps it: its own schema change
//! (the plan's `[database]`) with every run of its commands, the earlier change it must
//! wait for, or — for `cutover rollback` — the change it undoes.
//!
//! A change moves `none` → `expanding` → `expanded`, then either `contracting` →
//! `contracted` (after success) or `aborting` → `aborted` (the deployment ended without
//! success, or a `cutover rollback` undid it); `failed` when a command failed. Each
//! command run is a [`TaskRun`] whose task id names the deployment, the phase and the
//! attempt, so the agent that runs it never runs it twice.

use serde::{Deserialize, Serialize};

/// A deployment's part in the database; empty for plans without `[database]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DeployDatabase {
    /// This deployment's own schema change: its plan has `[database]` and it is not a
    /// `cutover rollback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<SchemaChange>,
    /// The earlier deployment whose schema change must be contracted before this one
    /// prepares anything (the next deployment needs its previous release's slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// For `cutover rollback`: the deployment whose schema change it undoes once it has
    /// succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undoes: Option<String>,
}

impl DeployDatabase {
    pub fn is_empty(&self) -> bool {
        *self == DeployDatabase::default()
    }
}

/// One release's schema change, and each command run so far.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SchemaChange {
    /// This release's schema version name (`CUTOVER_DB_SCHEMA`).
    pub schema: String,
    /// The previous release's, when its plan had `[database]`.
    pub previous_schema: Option<String>,
    /// Where the change stands.
    pub phase: DbPhase,
    /// Target hosts that may run the commands (those matching `run_on`), by name: the
    /// first reachable one runs each command.
    pub runners: Vec<String>,
    /// Every command run, oldest first; a retry is a new run with the next attempt.
    #[serde(default)]
    pub runs: Vec<TaskRun>,
    /// `resume` (or `cutover contract`) asked for the stalled or failed command again:
    /// the next decision starts a new attempt.
    #[serde(default)]
    pub retry: bool,
}

/// Where a schema change stands (`status --output json` → `database.phase`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DbPhase {
    /// Nothing has run yet.
    None,
    Expanding,
    /// Both schema versions exist; both releases may serve.
    Expanded,
    Contracting,
    /// Only the new version is left: the previous release can no longer run.
    Contracted,
    Aborting,
    /// The expand is undone: the new version is gone.
    Aborted,
    /// A command failed; the database may be half way (see the last run).
    Failed,
}

impl DbPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            DbPhase::None => "none",
            DbPhase::Expanding => "expanding",
            DbPhase::Expanded => "expanded",
            DbPhase::Contracting => "contracting",
            DbPhase::Contracted => "contracted",
            DbPhase::Aborting => "aborting",
            DbPhase::Aborted => "aborted",
            DbPhase::Failed => "failed",
        }
    }
}

/// Which command a run is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TaskPhase {
    Expand,
    Contract,
    Abort,
}

impl TaskPhase {
    /// As the plan's key and `CUTOVER_DB_PHASE` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskPhase::Expand => "expand",
            TaskPhase::Contract => "contract",
            TaskPhase::Abort => "abort",
        }
    }

    /// The change's phase while this command runs.
    pub fn running(self) -> DbPhase {
        match self {
            TaskPhase::Expand => DbPhase::Expanding,
            TaskPhase::Contract => DbPhase::Contracting,
            TaskPhase::Abort => DbPhase::Aborting,
        }
    }
}

/// One run of a command on one host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskRun {
    pub phase: TaskPhase,
    /// 1 for the first run of this phase; a retry after a stall is the next.
    pub attempt: u32,
    /// The host that runs it.
    pub host: String,
    /// When it was decided (and sent).
    pub started_unix_ms: u64,
    /// Where its whole output is on the host, once the host said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// Why it was given up without an end (interrupted, host lost): it is no longer
    /// sent, and `resume` (or `cutover contract`) runs the phase again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<String>,
    /// How it ended, as its host reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<TaskEnd>,
}

impl TaskRun {
    /// The task id the host knows it by: `d-000002/expand`, `d-000002/expand#2`.
    pub fn task_id(&self, deployment: &str) -> String {
        let phase = self.phase.as_str();
        match self.attempt {
            0 | 1 => format!("{deployment}/{phase}"),
            n => format!("{deployment}/{phase}#{n}"),
        }
    }

    /// Sent and neither ended nor given up.
    pub fn in_flight(&self) -> bool {
        self.end.is_none() && self.stalled.is_none()
    }
}

/// How a command ended.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskEnd {
    /// When the coordinator learnt it.
    pub at_unix_ms: u64,
    /// Exit 0.
    pub ok: bool,
    /// Its exit code, when it exited by itself.
    pub exit_code: Option<i32>,
    /// How it ended, for people: `exit status: 3`, `timed out after 600s`...
    pub exit: String,
    /// How long it ran, as its host measured.
    pub duration_ms: u64,
    /// The last lines of its output.
    #[serde(default)]
    pub tail: Vec<String>,
}

impl SchemaChange {
    /// The last run of `phase`, if any.
    pub fn last(&self, phase: TaskPhase) -> Option<&TaskRun> {
        self.runs.iter().rev().find(|r| r.phase == phase)
    }

    /// The run that is sent to its host now: the newest, while in flight.
    pub fn in_flight(&self) -> Option<&TaskRun> {
        self.runs.last().filter(|r| r.in_flight())
    }

    /// Why the newest run stands still, if it does.
    pub fn stalled(&self) -> Option<&str> {
        self.runs
            .last()
            .filter(|r| r.end.is_none())
            .and_then(|r| r.stalled.as_deref())
    }

    /// A contract or an abort is under way after the deployment ended: the engine keeps
    /// deciding it.
    pub fn busy(&self) -> bool {
        matches!(self.phase, DbPhase::Contracting | DbPhase::Aborting)
    }
}
