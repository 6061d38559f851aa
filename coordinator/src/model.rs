//! Records the coordinator keeps in its store: who holds which certificate, join tokens,
//! hosts, services and deployments (a deployment's part in the database in
//! [`database`]).

pub mod database;

use std::collections::BTreeMap;

pub use cutover_proto::Slot;
use cutover_proto::v1::SlotPhase;
use cutover_shared::plan::Plan;
use serde::{Deserialize, Serialize};

use crate::analysis::{Counters, MetricResult, ScrapeSnapshot, Verdict};
pub use database::{DbPhase, DeployDatabase, SchemaChange, TaskEnd, TaskPhase, TaskRun};

/// Who a client certificate belongs to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Identity {
    /// A person with the admin role: may call every `Control` method. Certificates
    /// recorded before personal credentials existed are the first-start ones, `admin`.
    Admin {
        #[serde(default = "first_admin_name")]
        name: String,
    },
    /// A person with the viewer role: may call the read-only `Control` methods.
    Viewer { name: String },
    /// The agent of one host: speaks on `AgentLink` for that host only.
    Agent { host: String },
    /// An agent certificate that no longer opens anything. It is kept so that its holder
    /// learns why and stops, rather than retrying for ever.
    Revoked { host: String, reason: Revocation },
    /// A person's certificate revoked by `cutover admin revoke`; kept so that its holder
    /// is told so, and by whom.
    RevokedAdmin {
        name: String,
        #[serde(default)]
        by: String,
        #[serde(default)]
        at_unix_ms: u64,
    },
}

/// The name of the admin credentials the coordinator makes on its first start
/// (`DATA/admin`).
pub const FIRST_ADMIN: &str = "admin";

fn first_admin_name() -> String {
    FIRST_ADMIN.to_string()
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Revocation {
    /// `cutover hosts remove`.
    Removed,
    /// Another machine joined under the host's name with a `--replace` token.
    Replaced,
}

impl Revocation {
    pub fn as_str(self) -> &'static str {
        match self {
            Revocation::Removed => "removed",
            Revocation::Replaced => "replaced",
        }
    }
}

/// Which host names a join token enrols.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenHost {
    /// Any name that is not enrolled yet.
    #[default]
    Any,
    /// Only this name, and only while it is not enrolled (`token create --name`).
    Named(String),
    /// Only this name, replacing the host enrolled under it (`token create --replace`).
    Replaces(String),
}

impl TokenHost {
    /// The name the token is pinned to, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            TokenHost::Any => None,
            TokenHost::Named(n) | TokenHost::Replaces(n) => Some(n),
        }
    }
}

/// A join token: how a new host proves it may enrol.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The public half of the token, shown in listings and its text form.
    pub id: String,
    /// Hex SHA-256 of the token's secret; the secret itself is never stored.
    pub secret_sha256: String,
    /// The enrolled host's labels; a join cannot change them.
    pub labels: BTreeMap<String, String>,
    pub created_unix_ms: u64,
    /// After this instant the token admits nobody.
    pub expires_unix_ms: u64,
    /// Joins it still admits.
    pub uses_left: u32,
    /// `token revoke`: it admits nobody any more.
    #[serde(default)]
    pub revoked: bool,
    /// Which host names it may enrol.
    #[serde(default)]
    pub host: TokenHost,
    /// Label keys a join may add (`join --labels`), sorted.
    #[serde(default)]
    pub allow_labels: Vec<String>,
}

impl TokenRecord {
    /// Stands in for a token id that is not in the store, so that checks run the same way.
    pub fn unknown() -> TokenRecord {
        TokenRecord {
            id: String::new(),
            secret_sha256: String::new(),
            labels: BTreeMap::new(),
            created_unix_ms: 0,
            expires_unix_ms: 0,
            uses_left: 0,
            revoked: true,
            host: TokenHost::Any,
            allow_labels: Vec::new(),
        }
    }
}

/// An enrolled host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    /// What plans target it by (`[targets] labels`); set by its token.
    pub labels: BTreeMap<String, String>,
    /// SHA-256 of its agent certificate: the certificate it must present.
    pub cert_fingerprint: String,
    pub joined_unix_ms: u64,
    /// The certificate replaced by the last renewal, still valid until it expires.
    #[serde(default)]
    pub previous_fingerprint: Option<String>,
}

/// A service across its deployments.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceRecord {
    pub name: String,
    /// The plan of the release that last succeeded.
    pub live: Option<Plan>,
    /// The plan live before that, for `cutover rollback`.
    pub previous: Option<Plan>,
    /// The deployment in progress, if any.
    pub active: Option<String>,
    /// When the previous release's slots may be stopped (`keep_previous`).
    pub retire_previous_at_unix_ms: Option<u64>,
    /// `cutover service stop`: no slot process runs until `service start`, and no
    /// deployment starts meanwhile.
    #[serde(default)]
    pub stopped: bool,
    /// The deployment whose schema change is live and not contracted yet: what the
    /// next contract contracts, and what `cutover rollback` undoes.
    #[serde(default)]
    pub db_pending: Option<String>,
    /// Why `cutover rollback` is refused now: the live release's schema change was
    /// contracted, or the previous release's change was undone.
    #[serde(default)]
    pub rollback_refused: Option<String>,
}

/// Where a deployment stands (the transitions are charted in [`crate::rollout`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Created; no decision yet.
    Pending,
    /// The current step's hosts are getting the new release.
    Preparing,
    /// The current step's weights are out: confirming, holding, judging.
    Progressing,
    /// Stopped where it stood, until `resume` (see `pause`).
    Paused,
    /// Every host is being set back to the old release.
    RollingBack,
    /// Every step held: the new release is live.
    Succeeded,
    /// Rolled back to the old release.
    RolledBack,
    /// Rolled back with nothing to go back to: the service's first release failed.
    Failed,
    /// Rolled back by `abort`.
    Aborted,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            State::Succeeded | State::RolledBack | State::Failed | State::Aborted
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Preparing => "preparing",
            State::Progressing => "progressing",
            State::Paused => "paused",
            State::RollingBack => "rolling_back",
            State::Succeeded => "succeeded",
            State::RolledBack => "rolled_back",
            State::Failed => "failed",
            State::Aborted => "aborted",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HostPhase {
    /// Not needed by any step so far.
    Waiting,
    /// The new release is being fetched, started and health-checked.
    Preparing,
    /// The new slot is healthy and carries no traffic yet.
    Ready,
    /// The host's weights are set for the current step and confirmed by its agent.
    Switched,
    /// Preparation failed on this host; it keeps the old release.
    Failed,
    /// The host is back on the old release.
    RolledBack,
}

impl HostPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            HostPhase::Waiting => "waiting",
            HostPhase::Preparing => "preparing",
            HostPhase::Ready => "ready",
            HostPhase::Switched => "switched",
            HostPhase::Failed => "failed",
            HostPhase::RolledBack => "rolled_back",
        }
    }
}

/// One host's part in a deployment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeployHost {
    /// Where the host stands in the deployment.
    pub phase: HostPhase,
    /// The slot that receives the new release on this host.
    pub new_slot: Slot,
    /// The slot that carried traffic when the deployment started, if any.
    pub old_slot: Option<Slot>,
    /// Percent of this host's traffic on the new release, as last set.
    pub weight: u32,
    /// Why it failed or was set aside, for people.
    pub error: Option<String>,
    /// The host already ran this release when the deployment started: it is left alone.
    #[serde(default)]
    pub untouched: bool,
    /// The host became unreachable during the deployment and was set aside (its phase
    /// is `Failed`); it is not counted against `max_failed_hosts`.
    #[serde(default)]
    pub lost: bool,
    /// The service's public side (listen, protocol, drain) before the deployment, kept
    /// until the new release takes traffic and restored by a rollback.
    #[serde(default)]
    pub old_front: Option<Front>,
    /// How far the new slot's preparation had got when the deployment last recorded it,
    /// so that the timeline gets each phase once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Preparation>,
    /// Where the host keeps the whole output of this deployment's hooks, as its agent
    /// reported it (for `show`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_log: Option<String>,
}

/// The phases of a new slot's preparation that a deployment's timeline records, as the
/// host's agent reports them.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Preparation {
    /// Downloading the release, its sha256 checked as it streams.
    Fetching,
    /// Unpacking into the release directory.
    Unpacking,
    /// The process is started and waits for its first healthy check.
    Starting,
    /// Healthy, and its `validate` hook runs.
    Validating,
    /// Healthy: the host is ready.
    Healthy,
}

impl Preparation {
    /// The preparation phase a slot phase stands for, if it is one.
    pub fn of(phase: SlotPhase) -> Option<Preparation> {
        match phase {
            SlotPhase::Fetching => Some(Preparation::Fetching),
            SlotPhase::Unpacking => Some(Preparation::Unpacking),
            SlotPhase::Starting => Some(Preparation::Starting),
            SlotPhase::Validating => Some(Preparation::Validating),
            SlotPhase::Healthy => Some(Preparation::Healthy),
            _ => None,
        }
    }

    /// The name it goes by (the slot phase's).
    pub fn name(self) -> &'static str {
        match self {
            Preparation::Fetching => SlotPhase::Fetching,
            Preparation::Unpacking => SlotPhase::Unpacking,
            Preparation::Starting => SlotPhase::Starting,
            Preparation::Validating => SlotPhase::Validating,
            Preparation::Healthy => SlotPhase::Healthy,
        }
        .name()
    }
}

/// A service's public side on a host.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Front {
    /// The public port (0: none).
    pub listen: u32,
    /// HTTP or TCP, as the wire's `Protocol` number.
    pub protocol: i32,
    /// How long a slot that loses its weight finishes its requests.
    pub drain_ms: u64,
    /// How long a slot may take to begin answering (0 in records made before it was
    /// kept: the agent's default).
    #[serde(default)]
    pub upstream_timeout_ms: u64,
}

/// A deployment: its plan, where it stands, and each host's part.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeploymentRecord {
    /// `d-` and a sequence number: ids count up.
    pub id: String,
    pub service: String,
    /// The version being deployed.
    pub release: String,
    pub plan: Plan,
    /// Where the plan came from, as the CLI named it (`(rollback)` for a rollback).
    pub plan_path: String,
    /// The release live on the hosts when this started (for `previous_release`).
    pub previous_release: Option<String>,
    /// True for deployments made by `cutover rollback`.
    #[serde(default)]
    pub is_rollback: bool,
    /// True for deployments made by `cutover service restart`: the live release again,
    /// in the idle slot; the service's live and previous plans stay as they were.
    #[serde(default)]
    pub restart: bool,
    pub state: State,
    /// The state to end in once a rollback has converged, or to go back to after a
    /// pause.
    pub ending: Option<State>,
    /// The current step, from 0.
    pub step: u32,
    /// Percent of traffic the current step sends to the new release (0 once rolling
    /// back).
    pub traffic: u32,
    /// Why it rolled back or paused, for people.
    pub reason: Option<String>,
    pub created_unix_ms: u64,
    /// When it reached its final state.
    pub ended_unix_ms: Option<u64>,
    /// When the current phase (preparing a step, holding, baking, rolling back) began.
    pub phase_started_unix_ms: u64,
    /// When the current step's weights were confirmed by every host (hold starts); in
    /// the shadow phase, when every host confirmed it copies requests (shadow's hold
    /// starts).
    pub step_switched_unix_ms: Option<u64>,
    /// `promote` skips the rest of the current hold or pause.
    #[serde(default)]
    pub promoted: bool,
    /// `resume` passed the current step's `pause = true` gate.
    #[serde(default)]
    pub gate_passed: bool,
    /// Set while the deployment is paused: why, and since when. The hold clock stands
    /// still meanwhile; `resume` moves the step's start forward by the time paused.
    #[serde(default)]
    pub pause: Option<Pause>,
    /// Each target host's part, by name.
    pub hosts: BTreeMap<String, DeployHost>,
    /// The analysis of the current step and every interval judged so far.
    #[serde(default)]
    pub analysis: AnalysisState,
    /// When a rollback's first bad signal was seen, decided and confirmed everywhere.
    #[serde(default)]
    pub rollback: Option<RollbackTiming>,
    /// Its part in the database: its own schema change, or the one it waits for or
    /// undoes.
    #[serde(default, skip_serializing_if = "DeployDatabase::is_empty")]
    pub database: DeployDatabase,
    /// Where the shadow phase stands (a plan with `[strategy] shadow`).
    #[serde(default, skip_serializing_if = "ShadowPhase::is_none")]
    pub shadow: ShadowPhase,
}

/// The shadow phase of a deployment: between every target host prepared and the first
/// traffic step, the new release gets copies of live requests and no client.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ShadowPhase {
    /// Not begun (or the plan has none).
    #[default]
    None,
    /// The hosts copy live requests to the new release, and analysis judges its answers.
    Mirroring,
    /// Over: it passed (the steps followed) or the deployment rolled back from it.
    Done,
}

impl ShadowPhase {
    pub fn is_none(&self) -> bool {
        *self == ShadowPhase::None
    }
}

/// Why a deployment is paused.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PauseCause {
    /// `cutover pause`.
    Operator,
    /// The step says `pause = true`: it waits for `resume` or `promote`.
    StepGate,
    /// A host was unreachable for `host_lost_after` and `on_host_lost = "pause"`.
    HostLost,
    /// `inconclusive_limit` analysis intervals in a row had a metric without data.
    Inconclusive,
    /// A database command stands still (interrupted, its host lost) or the contract
    /// this deployment waits for failed: `resume` runs it again.
    Database,
}

/// A pause in progress.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pause {
    /// What resuming settles (a gate passed, a lost host let go).
    pub cause: PauseCause,
    /// When it began: the hold and the deadline move on by the time paused.
    pub since_unix_ms: u64,
}

impl DeploymentRecord {
    /// The newest of `records`: the last created (ids count up, so on a tie the higher
    /// number; `d-1000000` is newer than `d-999999`). What "the latest deployment" means
    /// wherever a command defaults to it.
    pub fn newest<'a>(
        records: impl IntoIterator<Item = &'a DeploymentRecord>,
    ) -> Option<&'a DeploymentRecord> {
        records.into_iter().max_by_key(|d| {
            let seq =
                d.id.strip_prefix("d-")
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            (d.created_unix_ms, seq)
        })
    }

    /// How long the current step has held so far, in ms: from the moment its weights
    /// were confirmed to `now`, not counting the time paused. `None` until confirmed.
    pub fn held_ms(&self, now: u64) -> Option<u64> {
        let until = self.pause.map_or(now, |p| p.since_unix_ms.min(now));
        self.step_switched_unix_ms
            .map(|at| until.saturating_sub(at))
    }
}

/// Analysis of the current step: a baseline snapshot of every host's counters, and the
/// verdicts so far.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct AnalysisState {
    /// Start of the interval being measured (unix ms); `None` until the step's weights
    /// are confirmed.
    pub interval_started_unix_ms: Option<u64>,
    /// Counters per host at the interval's start: (new slot, old slot).
    pub snapshot: BTreeMap<String, (Counters, Counters)>,
    /// Each host's scrapes of its slots' own metrics at the interval's start (new slot,
    /// old slot), for `source = "slot"` metrics.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scrapes: ScrapeSnapshot,
    /// Failing intervals in a row, against `failure_limit`.
    pub consecutive_failures: u32,
    /// Inconclusive intervals in a row, against `inconclusive_limit`.
    #[serde(default)]
    pub consecutive_inconclusive: u32,
    /// When the current run of failing intervals began.
    pub first_failure_unix_ms: Option<u64>,
    /// Conclusive passing intervals in the current step.
    pub passes_in_step: u32,
    /// Every judged interval of the deployment (the newest 500).
    pub intervals: Vec<IntervalRecord>,
}

/// One judged analysis interval.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IntervalRecord {
    /// The step and its traffic the interval was measured at.
    pub step: u32,
    pub traffic: u32,
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
    /// Requests each side served in the interval, summed over the hosts.
    pub new_requests: u64,
    pub old_requests: u64,
    pub verdict: Verdict,
    /// Each judged metric, new against old.
    pub metrics: Vec<MetricResult>,
    /// Judged on shadow traffic: the new release's answers to copies of live requests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// A rollback's timing, for `show` and the time-to-restore figures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RollbackTiming {
    /// When the first bad signal came.
    pub first_bad_unix_ms: u64,
    /// When the rollback was decided.
    pub decided_unix_ms: u64,
    /// When the last host confirmed it was back on the old release.
    pub done_unix_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records written before tokens could pin names and allow labels, before revoked
    /// certificates were remembered, and before admins had names, still load.
    #[test]
    fn records_from_before_an_upgrade_still_load() {
        let token: TokenRecord = serde_json::from_str(
            r#"{"id":"ab12","secret_sha256":"00","labels":{"env":"dev"},
                "created_unix_ms":1,"expires_unix_ms":2,"uses_left":1}"#,
        )
        .unwrap();
        assert_eq!(token.host, TokenHost::Any);
        assert!(token.allow_labels.is_empty() && !token.revoked);
        let host: HostRecord = serde_json::from_str(
            r#"{"name":"web-1","labels":{},"cert_fingerprint":"aa","joined_unix_ms":1}"#,
        )
        .unwrap();
        assert_eq!(host.previous_fingerprint, None);
        let admin: Identity = serde_json::from_str(r#"{"role":"admin"}"#).unwrap();
        assert_eq!(
            admin,
            Identity::Admin {
                name: FIRST_ADMIN.into()
            }
        );
        let id: Identity = serde_json::from_str(r#"{"role":"agent","host":"web-1"}"#).unwrap();
        assert_eq!(
            id,
            Identity::Agent {
                host: "web-1".into()
            }
        );
        let round = |i: &Identity| {
            serde_json::from_str::<Identity>(&serde_json::to_string(i).unwrap()).unwrap()
        };
        let revoked = Identity::Revoked {
            host: "web-1".into(),
            reason: Revocation::Replaced,
        };
        assert_eq!(round(&revoked), revoked);
        let mut t = token.clone();
        t.host = TokenHost::Replaces("web-1".into());
        let back: TokenRecord = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.host, t.host);
    }

    /// A deployment's host written before the record kept the preparation phase last
    /// recorded still loads, and without one it is written as it was.
    #[test]
    fn deploy_hosts_from_before_an_upgrade_still_load() {
        let json = r#"{"phase":"preparing","new_slot":"green","old_slot":"blue","weight":0,"error":null,"untouched":false,"lost":false,"old_front":null}"#;
        let host: DeployHost = serde_json::from_str(json).unwrap();
        assert_eq!(host.reported, None);
        assert_eq!(serde_json::to_string(&host).unwrap(), json);
        let mut started = host.clone();
        started.reported = Preparation::of(SlotPhase::Unpacking);
        let text = serde_json::to_string(&started).unwrap();
        assert!(text.ends_with(r#","reported":"unpacking"}"#), "{text}");
        assert_eq!(serde_json::from_str::<DeployHost>(&text).unwrap(), started);
        assert_eq!(Preparation::Unpacking.name(), "unpacking");
        assert_eq!(Preparation::of(SlotPhase::Failed), None);
    }
}
