//! The JSON views that both the CLI (`--output json`) and the HTTP API print: the hosts
//! with what they run ([`Host`]), one deployment as `status` shows it ([`Deployment`],
//! with its part in the database, [`Database`]), a service's deploy lock ([`Lock`]),
//! and how every JSON document cutover writes spells times ([`rfc3339`]) and orders its
//! keys ([`to_value`]).

use std::collections::BTreeMap;

use cutover_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A unix time in ms as RFC 3339 with milliseconds; none for 0 (the protocol's "never").
pub fn rfc3339(ms: u64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    Some(humantime::format_rfc3339_millis(t).to_string())
}

/// `v` as a JSON value whose objects have their keys in sorted order, as every JSON
/// document cutover prints or serves has them (scripts and tests compare them as text).
pub fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// `s`, or none when it is empty (the protocol's way of saying "none").
pub fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// A number the protocol sends as NaN when there is none.
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// One deployment as `cutover status --output json` prints it (SPEC: `id`, `service`,
/// `release`, `state`, `step`, `traffic`, `reason`, `hosts` at least).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Deployment {
    /// The deployment's id, `d-000123`.
    pub id: String,
    /// The service it deploys.
    pub service: String,
    /// The release it deploys.
    pub release: String,
    /// What was live before; none for a service's first deployment.
    pub previous_release: Option<String>,
    /// `pending`, `preparing`, `progressing`, `paused`, `rolling_back`, `succeeded`,
    /// `rolled_back`, `failed` or `aborted`.
    pub state: String,
    /// The current step, 0-based.
    pub step: u32,
    /// How many steps the plan has.
    pub steps: u32,
    /// Percent of traffic on the new release now.
    pub traffic: u32,
    /// Why it rolled back or failed.
    pub reason: Option<String>,
    /// When it was submitted.
    pub created_at: Option<String>,
    /// When it ended; none while it runs.
    pub ended_at: Option<String>,
    /// Each target host.
    pub hosts: Vec<DeploymentHost>,
    /// When the rollback's first bad signal came, was decided and was done; none
    /// without a rollback.
    pub rollback: Option<Rollback>,
    /// The analysis intervals kept in the record, oldest first.
    pub intervals: Vec<Interval>,
    /// The newest of them, each metric with its values, bounds and verdict.
    pub last_interval: Option<Interval>,
    /// The service's deploy lock, while it has one: no new deployment until unlocked.
    pub lock: Option<Lock>,
    /// Its schema change (SPEC: `schema`, `phase`, `expand`, `contract`, `abort`).
    pub database: Database,
}

/// A service's deploy lock (`cutover lock`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Lock {
    /// The locked service.
    pub service: String,
    /// Why it is locked.
    pub message: String,
    /// Who locked it: the name of their credentials.
    pub by: String,
    /// When it was locked.
    pub at: Option<String>,
}

impl From<&pb::ServiceLock> for Lock {
    fn from(l: &pb::ServiceLock) -> Lock {
        Lock {
            service: l.service.clone(),
            message: l.message.clone(),
            by: l.by.clone(),
            at: rfc3339(l.at_unix_ms),
        }
    }
}

/// A deployment's part in the database.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Database {
    /// This release's schema version; none when the plan has no `[database]`.
    pub schema: Option<String>,
    /// The previous release's.
    pub previous_schema: Option<String>,
    /// `none`, `expanding`, `expanded`, `contracting`, `contracted`, `aborting`,
    /// `aborted` or `failed`.
    pub phase: String,
    /// The last run of each command; none until it ran.
    pub expand: Option<DatabaseRun>,
    pub contract: Option<DatabaseRun>,
    pub abort: Option<DatabaseRun>,
    /// Why the current command stands still, or how the last one failed.
    pub error: Option<String>,
    /// The deployment whose contract this one waits for before it prepares.
    pub waits_for: Option<String>,
    /// For `cutover rollback`: the deployment whose change it undoes.
    pub undoes: Option<String>,
}

/// One database command, as last run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DatabaseRun {
    /// The task id its host knows it by.
    pub task: String,
    /// The host that ran it.
    pub host: String,
    /// 1, or more after a retry.
    pub attempt: u32,
    pub started_at: Option<String>,
    /// None while it runs.
    pub ended_at: Option<String>,
    /// Its exit code, when it exited by itself.
    pub exit: Option<i32>,
    /// How it ended (`exit status: 0`, `timed out after 600s`), or why it stands still.
    pub status: Option<String>,
    /// Exit 0.
    pub ok: bool,
    /// How long it ran; none while it runs.
    pub duration_s: Option<f64>,
    /// The last lines of its output.
    pub tail: Vec<String>,
    /// Where its whole output is, on its host.
    pub log: Option<String>,
}

impl Database {
    /// The phase, the command under way (or the last) and where, in one line for people:
    /// `expanding on web-1`, `contracted (exit status: 0 in 1.2s on web-1)`.
    pub fn summary(&self) -> String {
        let last = [&self.abort, &self.contract, &self.expand]
            .into_iter()
            .flatten()
            .max_by_key(|r| r.started_at.clone());
        let mut s = self.phase.clone();
        if let Some(r) = last {
            match (&r.status, r.duration_s) {
                (Some(st), Some(took)) => {
                    s.push_str(&format!(" ({st} in {took:.1}s on {})", r.host))
                }
                (Some(st), None) => s.push_str(&format!(" ({st})")),
                (None, _) => s.push_str(&format!(" on {}", r.host)),
            }
        }
        if let Some(after) = &self.waits_for {
            s.push_str(&format!(", waiting for the contract of {after}"));
        }
        s
    }
}

impl From<&pb::DeploymentDatabase> for Database {
    fn from(d: &pb::DeploymentDatabase) -> Database {
        let run = |r: &Option<pb::DatabaseRun>| {
            r.as_ref().map(|r| DatabaseRun {
                task: r.task.clone(),
                host: r.host.clone(),
                attempt: r.attempt,
                started_at: rfc3339(r.started_unix_ms),
                ended_at: rfc3339(r.ended_unix_ms),
                exit: r.exit_code,
                status: opt(&r.exit),
                ok: r.ok,
                duration_s: (r.ended_unix_ms != 0).then(|| r.duration_ms as f64 / 1000.0),
                tail: r.tail.clone(),
                log: opt(&r.log),
            })
        };
        Database {
            schema: opt(&d.schema),
            previous_schema: opt(&d.previous_schema),
            phase: if d.phase.is_empty() {
                "none".into()
            } else {
                d.phase.clone()
            },
            expand: run(&d.expand),
            contract: run(&d.contract),
            abort: run(&d.abort),
            error: opt(&d.error),
            waits_for: opt(&d.waits_for),
            undoes: opt(&d.undoes),
        }
    }
}

/// A target host of a deployment.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DeploymentHost {
    /// The host's name.
    pub name: String,
    /// Where the host stands in this deployment.
    pub phase: String,
    /// Percent of its traffic on the new release.
    pub weight: u32,
    /// What went wrong on it, if anything.
    pub error: Option<String>,
}

/// A deployment's rollback, timed.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Rollback {
    /// The first bad signal (the start of time to restore).
    pub first_bad_at: Option<String>,
    /// When the rollback was decided.
    pub decided_at: Option<String>,
    /// When the last host confirmed it; none until then.
    pub done_at: Option<String>,
    /// `first_bad_at` as unix ms, for arithmetic.
    pub first_bad_unix_ms: u64,
    /// `done_at` as unix ms.
    pub done_unix_ms: Option<u64>,
    /// First bad signal to done: the time to restore.
    pub seconds_to_restore: Option<f64>,
}

/// One analysis interval.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Interval {
    /// The step it judged, 0-based.
    pub step: u32,
    /// The step's traffic, in percent.
    pub traffic: u32,
    /// When it began.
    pub started_at: Option<String>,
    /// When it ended.
    pub ended_at: Option<String>,
    /// Requests the new slots answered.
    pub new_requests: u64,
    /// Requests the old slots answered.
    pub old_requests: u64,
    /// `pass`, `fail` or `inconclusive`.
    pub verdict: String,
    /// Why it failed or was inconclusive.
    pub why: Option<String>,
    /// Each judged metric.
    pub metrics: Vec<Metric>,
}

/// One metric of an interval.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Metric {
    /// The metric's name, as the plan spells it.
    pub name: String,
    /// Its value on the new slots; none without data.
    pub new: Option<f64>,
    /// Its value on the old slots; none without data.
    pub old: Option<f64>,
    /// This metric's own verdict.
    pub verdict: String,
    /// The bounds it is judged by (`max 0.02, max_vs_baseline 1.5x`).
    pub threshold: Option<String>,
    /// Why it failed or was inconclusive.
    pub why: Option<String>,
}

impl From<&pb::Deployment> for Deployment {
    fn from(d: &pb::Deployment) -> Deployment {
        Deployment {
            id: d.id.clone(),
            service: d.service.clone(),
            release: d.release.clone(),
            previous_release: opt(&d.previous_release),
            state: d.state.clone(),
            step: d.step,
            steps: d.steps,
            traffic: d.traffic,
            reason: opt(&d.reason),
            created_at: rfc3339(d.created_unix_ms),
            ended_at: rfc3339(d.ended_unix_ms),
            hosts: d.hosts.iter().map(DeploymentHost::from).collect(),
            rollback: Rollback::of(d),
            intervals: d.intervals.iter().map(Interval::from).collect(),
            lock: d.lock.as_ref().map(Lock::from),
            last_interval: d.intervals.last().map(Interval::from),
            database: Database::from(&d.database.clone().unwrap_or_default()),
        }
    }
}

impl From<&pb::DeploymentHost> for DeploymentHost {
    fn from(h: &pb::DeploymentHost) -> DeploymentHost {
        DeploymentHost {
            name: h.name.clone(),
            phase: h.phase.clone(),
            weight: h.weight,
            error: opt(&h.error),
        }
    }
}

impl Rollback {
    fn of(d: &pb::Deployment) -> Option<Rollback> {
        if d.rollback_decided_unix_ms == 0 {
            return None;
        }
        let done = (d.rollback_done_unix_ms != 0).then_some(d.rollback_done_unix_ms);
        Some(Rollback {
            first_bad_at: rfc3339(d.first_bad_unix_ms),
            decided_at: rfc3339(d.rollback_decided_unix_ms),
            done_at: rfc3339(d.rollback_done_unix_ms),
            first_bad_unix_ms: d.first_bad_unix_ms,
            done_unix_ms: done,
            seconds_to_restore: done
                .map(|done| done.saturating_sub(d.first_bad_unix_ms) as f64 / 1000.0),
        })
    }
}

impl From<&pb::AnalysisInterval> for Interval {
    fn from(i: &pb::AnalysisInterval) -> Interval {
        Interval {
            step: i.step,
            traffic: i.traffic,
            started_at: rfc3339(i.started_unix_ms),
            ended_at: rfc3339(i.ended_unix_ms),
            new_requests: i.new_requests,
            old_requests: i.old_requests,
            verdict: i.verdict.clone(),
            why: opt(&i.why),
            metrics: i
                .metrics
                .iter()
                .map(|m| Metric {
                    name: m.name.clone(),
                    new: finite(m.new),
                    old: finite(m.old),
                    verdict: m.verdict.clone(),
                    threshold: opt(&m.threshold),
                    why: opt(&m.why),
                })
                .collect(),
        }
    }
}

/// A followed deployment at its end (`watch`, `--wait`): the record and which hosts
/// serve which release.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Finished {
    /// The deployment as `status` shows it.
    #[serde(flatten)]
    pub deployment: Deployment,
    /// Release → the hosts serving it (a host splitting traffic under each).
    pub serving: BTreeMap<String, Vec<String>>,
}

/// A host as `cutover hosts --output json` and `/api/fleet` print it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Host {
    /// The host's name.
    pub name: String,
    /// Its labels, which deployments select hosts by.
    pub labels: BTreeMap<String, String>,
    /// Whether it can be counted on now: its stream is open and it was heard lately.
    pub connected: bool,
    /// When its agent was last heard from; none since the coordinator started.
    pub last_seen: Option<String>,
    /// Each service on it.
    pub services: Vec<HostService>,
}

/// One service on a host.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HostService {
    /// The service's name.
    pub service: String,
    /// The release that carries its traffic, as desired.
    pub live_release: Option<String>,
    /// Its two slots.
    pub slots: Slots,
    /// The service's deploy lock, while it has one.
    pub lock: Option<Lock>,
}

/// Both slots of a service on a host.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Slots {
    /// The blue slot.
    pub blue: Slot,
    /// The green slot.
    pub green: Slot,
}

/// One slot of a service on a host.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Slot {
    /// The release in it; none when empty.
    pub release: Option<String>,
    /// Its process's phase as last reported (`empty`, `unknown` when only desired).
    pub state: String,
    /// Percent of the service's traffic it carries.
    pub weight: u32,
}

impl From<&pb::Host> for Host {
    fn from(h: &pb::Host) -> Host {
        Host {
            name: h.name.clone(),
            labels: h.labels.clone().into_iter().collect(),
            connected: h.connected,
            last_seen: rfc3339(h.last_seen_unix_ms),
            services: h
                .services
                .iter()
                .map(|s| HostService {
                    service: s.service.clone(),
                    live_release: opt(&s.live_release),
                    slots: Slots {
                        blue: Slot::from(s.blue.as_ref()),
                        green: Slot::from(s.green.as_ref()),
                    },
                    lock: s.lock.as_ref().map(Lock::from),
                })
                .collect(),
        }
    }
}

impl From<Option<&pb::HostSlot>> for Slot {
    fn from(s: Option<&pb::HostSlot>) -> Slot {
        match s {
            Some(s) => Slot {
                release: opt(&s.release),
                state: s.state.clone(),
                weight: s.weight,
            },
            None => Slot {
                release: None,
                state: "empty".into(),
                weight: 0,
            },
        }
    }
}

/// The hosts as `cutover hosts --output json` and `/api/fleet` print them.
pub fn hosts(hosts: &[pb::Host]) -> Vec<Host> {
    hosts.iter().map(Host::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `cutover status --output json`: the fields SPEC.md names, times in RFC 3339,
    /// absent values as null (a NaN figure too), and the rollback's time to restore.
    #[test]
    fn a_deployment_prints_as_status_has_always_printed_it() {
        let d = pb::Deployment {
            id: "d-000007".into(),
            service: "web".into(),
            release: "2".into(),
            state: "rolled_back".into(),
            step: 0,
            traffic: 0,
            reason: "analysis failed".into(),
            hosts: vec![pb::DeploymentHost {
                name: "web-1".into(),
                phase: "rolled_back".into(),
                weight: 0,
                error: String::new(),
            }],
            created_unix_ms: 1_000,
            ended_unix_ms: 0,
            previous_release: "1".into(),
            steps: 2,
            intervals: vec![pb::AnalysisInterval {
                step: 0,
                traffic: 10,
                started_unix_ms: 2_000,
                ended_unix_ms: 3_000,
                new_requests: 10,
                old_requests: 90,
                verdict: "fail".into(),
                why: "error_rate".into(),
                metrics: vec![pb::MetricValue {
                    name: "error_rate".into(),
                    new: 0.4,
                    old: f64::NAN,
                    verdict: "fail".into(),
                    threshold: "max 5.00%".into(),
                    why: "error_rate 40.00% above max 5.00%".into(),
                }],
            }],
            first_bad_unix_ms: 2_500,
            rollback_decided_unix_ms: 3_000,
            rollback_done_unix_ms: 3_750,
            lock: Some(pb::ServiceLock {
                service: "web".into(),
                message: "freeze".into(),
                by: "ana".into(),
                at_unix_ms: 4_000,
            }),
            database: None,
        };
        let printed = serde_json::to_string(&to_value(&Deployment::from(&d))).unwrap();
        let interval = json!({
            "step": 0, "traffic": 10,
            "started_at": "1970-01-01T00:00:02.000Z", "ended_at": "1970-01-01T00:00:03.000Z",
            "new_requests": 10, "old_requests": 90, "verdict": "fail", "why": "error_rate",
            "metrics": [{
                "name": "error_rate", "new": 0.4, "old": null, "verdict": "fail",
                "threshold": "max 5.00%", "why": "error_rate 40.00% above max 5.00%",
            }],
        });
        let expected = json!({
            "id": "d-000007", "service": "web", "release": "2", "previous_release": "1",
            "state": "rolled_back", "step": 0, "steps": 2, "traffic": 0,
            "reason": "analysis failed",
            "created_at": "1970-01-01T00:00:01.000Z", "ended_at": null,
            "hosts": [{"name": "web-1", "phase": "rolled_back", "weight": 0, "error": null}],
            "rollback": {
                "first_bad_at": "1970-01-01T00:00:02.500Z",
                "decided_at": "1970-01-01T00:00:03.000Z",
                "done_at": "1970-01-01T00:00:03.750Z",
                "first_bad_unix_ms": 2500, "done_unix_ms": 3750, "seconds_to_restore": 1.25,
            },
            "intervals": [interval.clone()],
            "last_interval": interval,
            "lock": {"service": "web", "message": "freeze", "by": "ana", "at": "1970-01-01T00:00:04.000Z"},
            "database": {
                "schema": null, "previous_schema": null, "phase": "none", "expand": null,
                "contract": null, "abort": null, "error": null, "waits_for": null,
                "undoes": null,
            },
        });
        assert_eq!(printed, expected.to_string());
    }

    /// `status --output json`'s `database`: SPEC's `schema`, `phase` and each command's
    /// `exit` and `duration_s`, a command still running with neither.
    #[test]
    fn a_deployments_database_part_prints_each_command() {
        let d = pb::DeploymentDatabase {
            schema: "app_2".into(),
            previous_schema: "app_1".into(),
            phase: "contracting".into(),
            expand: Some(pb::DatabaseRun {
                task: "d-000002/expand".into(),
                host: "web-1".into(),
                attempt: 1,
                started_unix_ms: 1_000,
                ended_unix_ms: 2_500,
                ok: true,
                exit_code: Some(0),
                exit: "exit status: 0".into(),
                duration_ms: 1_250,
                tail: vec!["ALTER TABLE".into()],
                log: "/var/lib/cutover/logs/deployments/d-000002/expand.log".into(),
            }),
            contract: Some(pb::DatabaseRun {
                task: "d-000002/contract".into(),
                host: "web-1".into(),
                attempt: 1,
                started_unix_ms: 9_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let printed = serde_json::to_string(&to_value(&Database::from(&d))).unwrap();
        let expected = json!({
            "schema": "app_2", "previous_schema": "app_1", "phase": "contracting",
            "expand": {
                "task": "d-000002/expand", "host": "web-1", "attempt": 1,
                "started_at": "1970-01-01T00:00:01.000Z", "ended_at": "1970-01-01T00:00:02.500Z",
                "exit": 0, "status": "exit status: 0", "ok": true, "duration_s": 1.25,
                "tail": ["ALTER TABLE"],
                "log": "/var/lib/cutover/logs/deployments/d-000002/expand.log",
            },
            "contract": {
                "task": "d-000002/contract", "host": "web-1", "attempt": 1,
                "started_at": "1970-01-01T00:00:09.000Z", "ended_at": null, "exit": null,
                "status": null, "ok": false, "duration_s": null, "tail": [], "log": null,
            },
            "abort": null, "error": null, "waits_for": null, "undoes": null,
        });
        assert_eq!(printed, expected.to_string());
        assert_eq!(Database::from(&d).summary(), "contracting on web-1");
    }

    /// `cutover hosts --output json` and `/api/fleet`: SPEC.md's fields; a slot never
    /// reported is empty.
    #[test]
    fn hosts_print_their_services_and_both_slots() {
        let h = pb::Host {
            name: "web-1".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            connected: true,
            last_seen_unix_ms: 0,
            services: vec![pb::HostService {
                service: "web".into(),
                live_release: "1".into(),
                blue: Some(pb::HostSlot {
                    release: "1".into(),
                    state: "healthy".into(),
                    weight: 100,
                }),
                green: None,
                lock: None,
            }],
        };
        let printed = serde_json::to_string(&to_value(&hosts(&[h]))).unwrap();
        let expected = json!([{
            "name": "web-1", "labels": {"env": "prod"}, "connected": true, "last_seen": null,
            "services": [{
                "service": "web", "live_release": "1",
                "slots": {
                    "blue": {"release": "1", "state": "healthy", "weight": 100},
                    "green": {"release": null, "state": "empty", "weight": 0},
                },
                "lock": null,
            }],
        }]);
        assert_eq!(printed, expected.to_string());
    }
}
