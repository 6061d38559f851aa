//! Where a deployment that did not succeed went wrong: the phase (`database expand`,
//! `preparing`, `at N%` or `baking`), the reason and the hosts whose preparation failed. `show` puts it
//! first; `stats` counts failures by phase and by host.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::model::{DeployHost, DeploymentRecord, HostPhase, State};
use crate::timeline::{Event, Kind};

/// Where a deployment went wrong.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    /// `preparing`, `at N%` (the traffic the new release had) or `baking`.
    pub phase: String,
    /// Why it rolled back or failed, as recorded.
    pub reason: Option<String>,
    /// The hosts that failed, each with its error.
    pub hosts: Vec<FailedHost>,
}

/// A host that failed in a deployment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FailedHost {
    /// The host's name.
    pub name: String,
    /// What its agent reported; none if it said nothing.
    pub error: Option<String>,
}

/// Where `d` went wrong, if it ended without success (or is rolling back).
pub fn failure(d: &DeploymentRecord, events: &[Event]) -> Option<Failure> {
    if matches!(d.state, State::Succeeded) || !d.state.is_final() && d.rollback.is_none() {
        return None;
    }
    Some(Failure {
        phase: failure_phase(d, events),
        reason: d.reason.clone(),
        hosts: d
            .hosts
            .iter()
            .filter(|(_, h)| h.phase == HostPhase::Failed || failed_preparing(h))
            .map(|(n, h)| FailedHost {
                name: n.clone(),
                error: h.error.clone(),
            })
            .collect(),
    })
}

/// A host whose preparation failed and that the fleet-wide rollback then set back: its
/// phase says `rolled_back`, its error why it failed.
fn failed_preparing(h: &DeployHost) -> bool {
    h.phase == HostPhase::RolledBack && h.error.is_some() && !h.lost
}

/// The hosts whose preparation failed in a deployment: from its timeline, and from its
/// record (a failure that triggered the rollback in the same decision left no event in
/// timelines written before that was recorded).
pub fn hosts_failed(d: &DeploymentRecord, events: &[Event]) -> BTreeSet<String> {
    let mut hosts: BTreeSet<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::HostFailed { host, .. } => Some(host.clone()),
            _ => None,
        })
        .collect();
    hosts.extend(
        d.hosts
            .iter()
            .filter(|(_, h)| !h.lost && (h.phase == HostPhase::Failed || failed_preparing(h)))
            .map(|(n, _)| n.clone()),
    );
    hosts
}

/// Whether the new release carried traffic before the deployment ended or rolled back:
/// a step's weights went out.
pub fn carried_traffic(events: &[Event]) -> bool {
    events
        .iter()
        .take_while(|e| !matches!(e.kind, Kind::RollbackStarted { .. } | Kind::Ended { .. }))
        .any(|e| matches!(e.kind, Kind::StepStarted { traffic, .. } if traffic > 0))
}

/// `database expand` (its expand failed), `preparing`, `at N%` (the traffic the new
/// release had), or `baking`.
pub fn failure_phase(d: &DeploymentRecord, events: &[Event]) -> String {
    let end = events
        .iter()
        .position(|e| matches!(e.kind, Kind::RollbackStarted { .. } | Kind::Ended { .. }))
        .unwrap_or(events.len());
    let mut traffic = None;
    let mut held_last = false;
    for e in &events[..end] {
        if let Kind::DatabaseEnded {
            phase, ok: false, ..
        } = &e.kind
        {
            return format!("database {phase}");
        }
        match e.kind {
            Kind::StepStarted { traffic: t, .. } => {
                traffic = Some(t);
                held_last = false;
            }
            Kind::StepHolding { step, .. } => {
                held_last = step as usize + 1 == d.plan.strategy.steps.len();
            }
            _ => {}
        }
    }
    match traffic {
        None => "preparing".into(),
        Some(_) if held_last && !d.plan.strategy.bake.is_zero() => "baking".into(),
        Some(t) => format!("at {t}%"),
    }
}
