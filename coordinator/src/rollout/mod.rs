//! The rollout decision: a pure function of (deployment, what the hosts report, the
//! operator's order, now) that returns the next deployment record, the desired state
//! each host should get, and the timeline events of what happened. It does no IO and
//! reads no clock; the engine calls it in a loop and carries out what it returns.
//!
//! The decision is level-triggered: the desired state of every host is derived from the
//! deployment record alone (host phase, traffic), so deciding again on the same inputs
//! yields nothing new, and a restarted coordinator simply decides again. The properties
//! the machine keeps are listed in `README.md` beside this file.
//!
//! # A deployment's states
//!
//! | from | to | when | decided in |
//! |------|----|------|------------|
//! | — | `pending` | a plan is deployed to hosts that need it | the engine |
//! | — | `succeeded` | every target host already runs the plan (a no-op) | the engine |
//! | `pending` | `preparing` | the first decision | `machine` |
//! | `preparing` | `progressing` | every host of the step is ready (or failed within `max_failed_hosts`): the step's weights go out | `prepare` |
//! | `progressing` | `preparing` | the step held: weights confirmed, its hold (and the bake on the last step), a conclusive passing interval with `[analysis]`, or `promote` | `hold` |
//! | `progressing` | `succeeded` | the last step held | `hold` |
//! | `preparing`, `progressing` | `paused` | `pause`; a step's `pause = true` gate; a lost host with `on_host_lost = "pause"` | `command`, `hold`, `lost` |
//! | `paused` | where it was | `resume` or `promote` | `command` |
//! | `preparing`, `progressing`, `paused` | `rolling_back` | `abort`; preparation failures beyond tolerance or the same error on two hosts; a serving new slot failing; a deadline; failing analysis; a lost host with `on_host_lost = "rollback"` | `command`, `prepare`, `watch`, `hold`, `interval`, `lost` |
//! | `rolling_back` | `rolled_back`, `failed` (a first release), `aborted` | every reachable host confirmed the old release's weights (and the database abort ran) | `rollback` |
//!
//! With `[database]`, the expand runs (once, on one host) before any host prepares, and
//! a rollback runs the abort once every host is back; the change's own phases, and the
//! contract after success, are charted in `database`.
//!
//! Each host of a deployment goes `waiting` → `preparing` → `ready` → `switched` (and
//! back to `ready` when the next step's weights go out), or ends `failed` (set aside
//! when lost) or `rolled_back`.

use std::collections::BTreeMap;

use cutover_proto::v1::{DesiredService, ObservedService};

use crate::analysis::Queried;
use crate::model::DeploymentRecord;
use crate::timeline::Event;

mod business;
mod command;
mod database;
mod desired;
mod effects;
mod hold;
mod interval;
mod lifecycle;
mod lost;
mod machine;
mod pause;
mod prepare;
mod progress;
mod rollback;
mod service;
mod submit;
mod watch;

pub use business::scrape_spec;
pub use database::{failure as database_failure, slot_env};
pub use lifecycle::{forget_if_empty, removal, restart_plan, stopping, tombstone};
pub use service::{
    Retirement, changed_service, concluded, retire, retiring, rollback_plan, rollback_to_plan,
    rollback_to_refusal,
};
pub use submit::{DatabaseContext, Submission, plan_hosts, submit};

use machine::Machine;

/// What the coordinator knows of one target host.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostView<'a> {
    /// Whether the host is reachable now: its stream is open and it was heard from
    /// lately. Only a reachable host vouches for anything.
    pub connected: bool,
    /// How long the host has been unreachable (0 while connected), in milliseconds.
    pub lost_ms: u64,
    /// The desired state last written for this service on this host.
    pub desired: Option<&'a DesiredService>,
    /// The host's latest report for this service.
    pub observed: Option<&'a ObservedService>,
}

/// An operator's command to a deployment in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Stop where it stands; the hold clock stands still.
    Pause,
    /// Go on from a pause.
    Resume,
    /// Skip the rest of the current hold or gate (and resume if paused).
    Promote,
    /// Roll back now.
    Abort,
    /// Contract the deployment's schema change, once it has succeeded (`cutover
    /// contract`, `keep_previous` passing, or the next deployment needing the old slot);
    /// again after a contract failed or stood still.
    Contract,
    /// Abort the deployment's schema change after its success, because `cutover
    /// rollback` undid the release.
    Undo,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Promote => "promote",
            Command::Abort => "abort",
            Command::Contract => "contract",
            Command::Undo => "undo the database change",
        }
    }
}

/// An operator's command to a deployment, and who gave it.
#[derive(Clone, Copy, Debug)]
pub struct Order<'a> {
    /// What to do.
    pub command: Command,
    /// Who gave it (the name of the certificate that called), for the timeline.
    pub actor: &'a str,
}

/// What one decision comes to: the engine writes all of it in one transaction.
#[derive(Debug)]
pub struct Decision {
    /// The deployment record after every transition due at this instant.
    pub deployment: DeploymentRecord,
    /// Hosts whose desired state must change, with the new state (generation unset).
    pub targets: BTreeMap<String, DesiredService>,
    /// What happened, for the deployment's timeline, in order.
    pub events: Vec<Event>,
}

/// Decides the next state of `dep` at `now`, from what its hosts report and the
/// operator's order, if any.
pub fn decide(
    dep: &DeploymentRecord,
    views: &BTreeMap<String, HostView<'_>>,
    order: Option<Order<'_>>,
    now: u64,
) -> Decision {
    decide_with(dep, views, Inputs::default(), order, now)
}

/// What a decision reads beside the deployment, its hosts and the operator's order.
#[derive(Clone, Copy)]
pub struct Inputs<'v> {
    /// The earlier deployment whose schema change this one waits for to be contracted
    /// before it prepares (its `database.after`), when it does.
    pub previous: Option<&'v DeploymentRecord>,
    /// The latest result of each Prometheus query the plan's metrics make (which the
    /// engine gathers off the decision loop, so that deciding stays pure).
    pub queried: &'v Queried,
}

impl Default for Inputs<'_> {
    fn default() -> Self {
        Inputs {
            previous: None,
            queried: &machine::NO_QUERIES,
        }
    }
}

/// [`decide`], with what else the decision reads. A deployment that has ended is only
/// decided for its schema change: the contract or abort ordered after it.
pub fn decide_with<'v>(
    dep: &DeploymentRecord,
    views: &'v BTreeMap<String, HostView<'_>>,
    inputs: Inputs<'v>,
    order: Option<Order<'_>>,
    now: u64,
) -> Decision {
    let mut m = Machine::new(dep.clone(), views, now);
    m.previous = inputs.previous;
    m.queried = inputs.queried;
    let ended = m.d.state.is_final();
    if ended {
        m.settle_database(order);
    } else {
        m.report_progress();
        if let Some(order) = order {
            m.obey(order);
        }
        m.settle();
    }
    let (deployment, events) = m.finish();
    let targets = if ended {
        database::settled_changes(&deployment, views)
    } else {
        desired::changes(&deployment, views)
    };
    Decision {
        deployment,
        targets,
        events,
    }
}

#[cfg(test)]
mod tests;
