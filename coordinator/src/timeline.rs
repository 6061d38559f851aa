//! Every deployment's timeline: what happened and when, kept forever in the store (the
//! deployment record itself keeps only its current state and the newest intervals).
//!
//! Events are derived, not scattered through the code: [`diff`] compares a deployment
//! record before and after a decision, [`host_progress`] follows each preparing host's
//! new slot through the phases its agent reports, and the engine adds the operator's
//! commands. The engine commits a decision's events in the same transaction as the
//! decision. Pure: no IO, no clock.

use std::collections::{BTreeMap, HashMap};

use cutover_proto::v1::SlotPhase;
use serde::{Deserialize, Serialize};

use crate::analysis::{Verdict, figure};
use crate::model::{DeploymentRecord, HostPhase, State};
use crate::rollout::HostView;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub at_unix_ms: u64,
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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Kind {
    Submitted {
        release: String,
        previous_release: Option<String>,
        hosts: usize,
        steps: usize,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        actor: String,
    },
    /// A preparing host's new slot entered a phase its agent reported: `fetching`
    /// (download and streaming sha256 check), `unpacking`, `starting`, `healthy`.
    HostPhase {
        host: String,
        phase: String,
    },
    /// A host's new slot turned healthy; with the agent's own measure of each part.
    HostReady {
        host: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timings: Option<Timings>,
    },
    HostFailed {
        host: String,
        error: String,
    },
    HostLost {
        host: String,
    },
    /// A step's weights were sent.
    StepStarted {
        step: u32,
        traffic: u32,
    },
    /// Every host of the step confirmed its weights: the hold begins.
    StepHolding {
        step: u32,
        traffic: u32,
    },
    Interval {
        step: u32,
        traffic: u32,
        verdict: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        why: String,
        new_requests: u64,
        old_requests: u64,
        /// `metric: new vs old` for each judged metric.
        figures: Vec<String>,
    },
    Paused {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An operator's command (`pause`, `resume`, `promote`, `abort`).
    Command {
        command: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        actor: String,
    },
    RollbackStarted {
        reason: String,
        first_bad_unix_ms: u64,
        decided_unix_ms: u64,
    },
    /// The last host confirmed it is back on the previous release.
    RollbackDone,
    Ended {
        state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl Event {
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

fn step_traffic(d: &DeploymentRecord, step: u32) -> u32 {
    d.plan
        .strategy
        .steps
        .get(step as usize)
        .map_or(d.traffic, |s| s.traffic)
}

/// The events between two versions of a deployment record (`before` is `None` for a
/// new deployment).
pub fn diff(before: Option<&DeploymentRecord>, after: &DeploymentRecord, now: u64) -> Vec<Event> {
    let mut out = Vec::new();
    let mut ev = |kind: Kind| {
        out.push(Event {
            at_unix_ms: now,
            kind,
        })
    };
    let Some(b) = before else {
        ev(Kind::Submitted {
            release: after.release.clone(),
            previous_release: after.previous_release.clone(),
            hosts: after.hosts.values().filter(|h| !h.untouched).count(),
            steps: after.plan.strategy.steps.len(),
            actor: String::new(),
        });
        return out;
    };
    for (name, h) in &after.hosts {
        let was = b.hosts.get(name);
        if was.map(|w| w.phase) == Some(h.phase) {
            continue;
        }
        match h.phase {
            // Ready again between steps is not news; ready after preparing is.
            HostPhase::Ready if was.is_none_or(|w| w.phase == HostPhase::Preparing) => {
                ev(Kind::HostReady {
                    host: name.clone(),
                    timings: None,
                })
            }
            HostPhase::Failed if h.lost => ev(Kind::HostLost { host: name.clone() }),
            HostPhase::Failed => ev(Kind::HostFailed {
                host: name.clone(),
                error: h.error.clone().unwrap_or_default(),
            }),
            // Failed and, in the same decision, set back by the rollback its failure
            // began: the new error says so.
            HostPhase::RolledBack
                if !h.lost
                    && h.error.is_some()
                    && was.and_then(|w| w.error.as_ref()) != h.error.as_ref() =>
            {
                ev(Kind::HostFailed {
                    host: name.clone(),
                    error: h.error.clone().unwrap_or_default(),
                })
            }
            _ => {}
        }
    }
    // A step starts when its weights go out: on entering `progressing` (from preparing
    // its hosts), or on moving to the next step within one decision.
    let entered =
        after.state == State::Progressing && !matches!(b.state, State::Progressing | State::Paused);
    let moved_on = after.step != b.step
        && matches!(
            after.state,
            State::Progressing | State::Paused | State::Succeeded
        );
    if entered || moved_on {
        ev(Kind::StepStarted {
            step: after.step,
            traffic: step_traffic(after, after.step),
        });
    }
    if after.step_switched_unix_ms.is_some()
        && (b.step_switched_unix_ms.is_none() || after.step != b.step)
    {
        ev(Kind::StepHolding {
            step: after.step,
            traffic: after.traffic,
        });
    }
    let old_n = b.analysis.intervals.len();
    let new_intervals: Vec<_> = if after.analysis.intervals.len() >= old_n {
        after.analysis.intervals[old_n..].to_vec()
    } else {
        // The record keeps the newest intervals only: anything newer than the last one
        // seen is new.
        let last = b.analysis.intervals.last().map_or(0, |i| i.ended_unix_ms);
        after
            .analysis
            .intervals
            .iter()
            .filter(|i| i.ended_unix_ms > last)
            .cloned()
            .collect()
    };
    for i in new_intervals {
        let (verdict, why) = match &i.verdict {
            Verdict::Pass => ("pass".to_string(), String::new()),
            Verdict::Fail(w) => ("fail".to_string(), w.clone()),
            Verdict::Inconclusive(w) => ("inconclusive".to_string(), w.clone()),
        };
        out.push(Event {
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
        });
    }
    let mut ev = |kind: Kind| {
        out.push(Event {
            at_unix_ms: now,
            kind,
        })
    };
    if after.state == State::Paused && b.state != State::Paused {
        ev(Kind::Paused {
            reason: after.reason.clone(),
        });
    }
    if let (Some(r), None) = (&after.rollback, &b.rollback) {
        ev(Kind::RollbackStarted {
            reason: after.reason.clone().unwrap_or_default(),
            first_bad_unix_ms: r.first_bad_unix_ms,
            decided_unix_ms: r.decided_unix_ms,
        });
    }
    if let Some(r) = &after.rollback
        && r.done_unix_ms.is_some()
        && b.rollback.as_ref().and_then(|r| r.done_unix_ms).is_none()
    {
        ev(Kind::RollbackDone);
    }
    if after.state.is_final() && !b.state.is_final() {
        ev(Kind::Ended {
            state: after.state.as_str().to_string(),
            reason: after.reason.clone(),
        });
    }
    out
}

/// The phases of a preparing slot that its timeline records.
fn preparation_phase(p: SlotPhase) -> Option<&'static str> {
    matches!(
        p,
        SlotPhase::Fetching | SlotPhase::Unpacking | SlotPhase::Starting | SlotPhase::Healthy
    )
    .then(|| p.name())
}

/// Phases of the new slot on each preparing host, as its agent reports them; `seen`
/// holds the last phase recorded per host and is updated.
pub fn host_progress(
    d: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
    seen: &mut HashMap<String, String>,
    now: u64,
) -> Vec<Event> {
    let mut out = Vec::new();
    for (name, h) in &d.hosts {
        if h.phase != HostPhase::Preparing {
            continue;
        }
        let Some(status) = views
            .get(name)
            .and_then(|v| v.observed)
            .and_then(|o| o.slot(h.new_slot))
        else {
            continue;
        };
        if status.release != d.release {
            continue;
        }
        let Some(phase) = preparation_phase(SlotPhase::of(status.phase)) else {
            continue;
        };
        if seen.get(name).map(String::as_str) != Some(phase) {
            seen.insert(name.clone(), phase.to_string());
            out.push(Event {
                at_unix_ms: now,
                kind: Kind::HostPhase {
                    host: name.clone(),
                    phase: phase.to_string(),
                },
            });
        }
    }
    out
}

/// Adds each ready host's own timings (from its report) to its `HostReady` event.
pub fn add_timings(
    events: &mut [Event],
    d: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
) {
    for e in events {
        let Kind::HostReady { host, timings } = &mut e.kind else {
            continue;
        };
        let status = d.hosts.get(host.as_str()).and_then(|h| {
            views
                .get(host.as_str())
                .and_then(|v| v.observed)
                .and_then(|o| o.slot(h.new_slot))
        });
        if let Some(st) = status.filter(|st| st.release == d.release) {
            *timings = Some(Timings {
                fetch_ms: st.fetch_ms,
                unpack_ms: st.unpack_ms,
                start_ms: st.start_ms,
            });
        }
    }
}
