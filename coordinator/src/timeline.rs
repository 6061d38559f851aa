//! Every deployment's timeline: what happened and when, kept forever in the store (the
//! deployment record itself keeps only its current state and the newest intervals).
//!
//! This module owns the event model, its stored JSON form, and how an event reads for
//! people. The events themselves are made by the decisions that cause them
//! ([`crate::rollout`]: each transition says what it did), and the engine commits them
//! in the same transaction as the decision. Pure: no IO, no clock.

use cutover_proto::v1::SlotStatus;
use serde::{Deserialize, Serialize};

use crate::analysis::{Verdict, figure};
use crate::model::IntervalRecord;

/// One thing that happened to a deployment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// When it happened (the decision's instant; an interval's end).
    pub at_unix_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: Kind,
}

/// Preparation of one host as its agent measured it, in ms (0: not needed, e.g. the
/// release was already on disk).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// Download, with the sha256 checked as it streams.
    pub fetch_ms: u64,
    pub unpack_ms: u64,
    /// Process start to first healthy check.
    pub start_ms: u64,
}

impl Timings {
    /// The timings an agent reported for a slot it prepared.
    pub fn of(status: &SlotStatus) -> Timings {
        Timings {
            fetch_ms: status.fetch_ms,
            unpack_ms: status.unpack_ms,
            start_ms: status.start_ms,
        }
    }
}

/// What happened. The stored form is the variant's name in snake case under `event`,
/// next to its fields; old timelines must keep loading, so fields are only ever added
/// with a default.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Kind {
    /// The deployment was created.
    Submitted {
        release: String,
        /// The release live before, if any.
        previous_release: Option<String>,
        /// Hosts that need the release (those already running it are left alone).
        hosts: usize,
        steps: usize,
        /// Who submitted it.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        actor: String,
    },
    /// A preparing host's new slot entered a phase its agent reported: `fetching`
    /// (download and streaming sha256 check), `unpacking`, `starting`, `healthy`.
    HostPhase { host: String, phase: String },
    /// A host's new slot turned healthy; with the agent's own measure of each part.
    HostReady {
        host: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timings: Option<Timings>,
    },
    /// A host's preparation failed (what its agent reported).
    HostFailed { host: String, error: String },
    /// A host was unreachable for `host_lost_after` and was set aside.
    HostLost { host: String },
    /// A step's weights were sent.
    StepStarted { step: u32, traffic: u32 },
    /// Every host of the step confirmed its weights: the hold begins.
    StepHolding { step: u32, traffic: u32 },
    /// An analysis interval was judged.
    Interval {
        step: u32,
        traffic: u32,
        /// `pass`, `fail` or `inconclusive`.
        verdict: String,
        /// Why it failed or was inconclusive.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        why: String,
        new_requests: u64,
        old_requests: u64,
        /// `metric: new vs old` for each judged metric.
        figures: Vec<String>,
    },
    /// The deployment paused (by command, at a step's gate, or for a lost host).
    Paused {
        /// The deployment's reason, when the pause has one (a lost host).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An operator's command (`pause`, `resume`, `promote`, `abort`).
    Command {
        command: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        actor: String,
    },
    /// The rollback was decided: every host is sent back to the old release at once.
    RollbackStarted {
        reason: String,
        /// When the first bad signal came (before the decision for failing analysis).
        first_bad_unix_ms: u64,
        decided_unix_ms: u64,
    },
    /// The last host confirmed it is back on the previous release.
    RollbackDone,
    /// The deployment reached its final state.
    Ended {
        state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A database command (`expand`, `contract`, `abort`) was sent to its host.
    DatabaseStarted {
        phase: String,
        host: String,
        task: String,
    },
    /// A database command ended, as its host reported.
    DatabaseEnded {
        phase: String,
        host: String,
        task: String,
        ok: bool,
        /// How it ended: `exit status: 0`, `timed out after 600s`...
        exit: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        duration_ms: u64,
        /// The last lines of its output.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tail: Vec<String>,
        /// Where its whole output is, on its host.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        log: String,
    },
    /// A database command stands still: interrupted by an agent restart, its host lost,
    /// or no host that may run it reachable.
    DatabaseStalled {
        phase: String,
        host: String,
        why: String,
    },
    /// The deployment waits for an earlier deployment's schema change to be contracted
    /// before it prepares anything.
    DatabaseWaiting { deployment: String },
    /// The earlier change it waited for is settled: it goes on.
    DatabaseWaited { deployment: String },
}

impl Event {
    /// A judged analysis interval, at its end.
    pub fn interval(i: &IntervalRecord) -> Event {
        let (verdict, why) = match &i.verdict {
            Verdict::Pass => ("pass".to_string(), String::new()),
            Verdict::Fail(w) => ("fail".to_string(), w.clone()),
            Verdict::Inconclusive(w) => ("inconclusive".to_string(), w.clone()),
        };
        Event {
            at_unix_ms: i.ended_unix_ms,
            kind: Kind::Interval {
                step: i.step,
                traffic: i.traffic,
                verdict,
                why,
                new_requests: i.new_requests,
                old_requests: i.old_requests,
                figures: i.metrics.iter().map(figure).collect(),
            },
        }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Submitted {
                release,
                previous_release,
                hosts,
                steps,
                actor,
            } => format!(
                "submitted {release} (from {}) to {hosts} host(s), {steps} step(s){}",
                previous_release.as_deref().unwrap_or("nothing"),
                by(actor)
            ),
            Kind::HostPhase { host, phase } => format!("{host}: {phase}"),
            Kind::HostReady { host, timings } => match timings {
                Some(t) => format!(
                    "{host}: ready (download+verify {:.2}s, unpack {:.2}s, start to healthy {:.2}s)",
                    t.fetch_ms as f64 / 1000.0,
                    t.unpack_ms as f64 / 1000.0,
                    t.start_ms as f64 / 1000.0
                ),
                None => format!("{host}: ready"),
            },
            Kind::HostFailed { host, error } => format!("{host}: FAILED: {error}"),
            Kind::HostLost { host } => format!("{host}: unreachable, set aside"),
            Kind::StepStarted { step, traffic } => {
                format!("step {}: moving to {traffic}%", step + 1)
            }
            Kind::StepHolding { step, traffic } => {
                format!("step {}: {traffic}% confirmed on every host", step + 1)
            }
            Kind::Interval {
                traffic,
                verdict,
                why,
                new_requests,
                old_requests,
                figures,
                ..
            } => format!(
                "analysis at {traffic}%: {verdict}{} (new {new_requests} req, old {old_requests} req){}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {why}")
                },
                if figures.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", figures.join(", "))
                }
            ),
            Kind::Paused { reason } => match reason {
                Some(r) => format!("paused: {}", r.trim_start_matches("paused: ")),
                None => "paused".into(),
            },
            Kind::Command { command, actor } => format!("{command}{}", by(actor)),
            Kind::RollbackStarted {
                reason,
                first_bad_unix_ms,
                decided_unix_ms,
            } => format!(
                "ROLLBACK: {reason} (first bad signal {} ms before the decision)",
                decided_unix_ms.saturating_sub(*first_bad_unix_ms)
            ),
            Kind::RollbackDone => "rollback confirmed by every host".into(),
            Kind::Ended { state, reason } => match reason {
                Some(r) => format!("ended {state}: {r}"),
                None => format!("ended {state}"),
            },
            Kind::DatabaseStarted { phase, host, task } => {
                format!("database {phase} started on {host} (task {task})")
            }
            Kind::DatabaseEnded {
                phase,
                host,
                ok,
                exit,
                duration_ms,
                tail,
                ..
            } => {
                let took = *duration_ms as f64 / 1000.0;
                if *ok {
                    format!("database {phase} done on {host} in {took:.2}s ({exit})")
                } else {
                    let last = tail.last().map_or(String::new(), |l| format!(": {l}"));
                    format!("database {phase} FAILED on {host} after {took:.2}s ({exit}){last}")
                }
            }
            Kind::DatabaseStalled { phase, host, why } => {
                format!("database {phase} stalled on {host}: {why}")
            }
            Kind::DatabaseWaiting { deployment } => format!(
                "waiting for the database contract of {deployment} before preparing (this deployment needs its previous release's slot)"
            ),
            Kind::DatabaseWaited { deployment } => {
                format!("the database change of {deployment} is settled; preparing")
            }
        }
    }
}

fn by(actor: &str) -> String {
    if actor.is_empty() {
        String::new()
    } else {
        format!(" by {actor}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timelines stored by earlier versions load, read the same, and are written back
    /// byte for byte as they were.
    #[test]
    fn stored_events_load_and_read_as_they_always_have() {
        let stored = [
            (
                r#"{"at_unix_ms":1,"event":"submitted","release":"2","previous_release":"1","hosts":3,"steps":2,"actor":"ana@desk"}"#,
                "submitted 2 (from 1) to 3 host(s), 2 step(s) by ana@desk",
            ),
            (
                r#"{"at_unix_ms":2,"event":"host_phase","host":"web-1","phase":"fetching"}"#,
                "web-1: fetching",
            ),
            (
                r#"{"at_unix_ms":3,"event":"host_ready","host":"web-1","timings":{"fetch_ms":1500,"unpack_ms":250,"start_ms":2000}}"#,
                "web-1: ready (download+verify 1.50s, unpack 0.25s, start to healthy 2.00s)",
            ),
            (
                r#"{"at_unix_ms":3,"event":"host_ready","host":"web-2"}"#,
                "web-2: ready",
            ),
            (
                r#"{"at_unix_ms":4,"event":"host_failed","host":"web-3","error":"disk full"}"#,
                "web-3: FAILED: disk full",
            ),
            (
                r#"{"at_unix_ms":4,"event":"host_lost","host":"web-4"}"#,
                "web-4: unreachable, set aside",
            ),
            (
                r#"{"at_unix_ms":5,"event":"step_started","step":0,"traffic":10}"#,
                "step 1: moving to 10%",
            ),
            (
                r#"{"at_unix_ms":6,"event":"step_holding","step":0,"traffic":10}"#,
                "step 1: 10% confirmed on every host",
            ),
            (
                r#"{"at_unix_ms":7,"event":"interval","step":0,"traffic":10,"verdict":"fail","why":"error_rate 9.00% above max 5.00%","new_requests":100,"old_requests":900,"figures":["error_rate 9.00% vs 0.10%"]}"#,
                "analysis at 10%: fail: error_rate 9.00% above max 5.00% (new 100 req, old 900 req) [error_rate 9.00% vs 0.10%]",
            ),
            (
                r#"{"at_unix_ms":8,"event":"paused","reason":"paused: host web-4 unreachable"}"#,
                "paused: host web-4 unreachable",
            ),
            (
                r#"{"at_unix_ms":8,"event":"command","command":"abort","actor":"ana@desk"}"#,
                "abort by ana@desk",
            ),
            (
                r#"{"at_unix_ms":9,"event":"rollback_started","reason":"aborted by operator","first_bad_unix_ms":8,"decided_unix_ms":9}"#,
                "ROLLBACK: aborted by operator (first bad signal 1 ms before the decision)",
            ),
            (
                r#"{"at_unix_ms":10,"event":"rollback_done"}"#,
                "rollback confirmed by every host",
            ),
            (
                r#"{"at_unix_ms":10,"event":"ended","state":"aborted","reason":"aborted by operator"}"#,
                "ended aborted: aborted by operator",
            ),
            (
                r#"{"at_unix_ms":11,"event":"database_started","phase":"expand","host":"web-1","task":"d-000002/expand"}"#,
                "database expand started on web-1 (task d-000002/expand)",
            ),
            (
                r#"{"at_unix_ms":12,"event":"database_ended","phase":"expand","host":"web-1","task":"d-000002/expand","ok":true,"exit":"exit status: 0","exit_code":0,"duration_ms":1234,"log":"/data/logs/deployments/d-000002/expand.log"}"#,
                "database expand done on web-1 in 1.23s (exit status: 0)",
            ),
            (
                r#"{"at_unix_ms":13,"event":"database_ended","phase":"expand","host":"web-1","task":"d-000003/expand","ok":false,"exit":"exit status: 3","exit_code":3,"duration_ms":310,"tail":["psql:db/expand.sql:4: ERROR:  relation \"users\" does not exist"]}"#,
                "database expand FAILED on web-1 after 0.31s (exit status: 3): psql:db/expand.sql:4: ERROR:  relation \"users\" does not exist",
            ),
            (
                r#"{"at_unix_ms":14,"event":"database_stalled","phase":"expand","host":"web-1","why":"interrupted"}"#,
                "database expand stalled on web-1: interrupted",
            ),
            (
                r#"{"at_unix_ms":15,"event":"database_waiting","deployment":"d-000002"}"#,
                "waiting for the database contract of d-000002 before preparing (this deployment needs its previous release's slot)",
            ),
            (
                r#"{"at_unix_ms":16,"event":"database_waited","deployment":"d-000002"}"#,
                "the database change of d-000002 is settled; preparing",
            ),
        ];
        for (json, reads) in stored {
            let e: Event = serde_json::from_str(json).unwrap();
            assert_eq!(e.describe(), reads);
            assert_eq!(serde_json::to_string(&e).unwrap(), json);
        }
    }
}
