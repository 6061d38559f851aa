//! The state machine's frame: the record being decided with the fleet's reports and the
//! instant, [`Machine::settle`] (every transition due now, phase by phase), and what the
//! phases ask of a host's report.

use std::collections::BTreeMap;

use cutover_proto::v1::SlotStatus;

use super::HostView;
use super::desired::target;
use super::effects::Effects;
use crate::analysis::Queried;
use crate::model::{DeployHost, DeploymentRecord, State};
use crate::timeline::Event;

/// Rounds of phases one decision takes at most. A round that changes nothing ends the
/// decision sooner; more than a few rounds means a step advanced without waiting.
const MAX_ROUNDS: usize = 8;

/// Whether the decision goes on to the next phase of its round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flow {
    /// Go on with the round.
    Next,
    /// The phase stopped, paused or rolled back the deployment: nothing else is due in
    /// this round.
    Stop,
}

/// One decision in the making.
pub(super) struct Machine<'v, 'a> {
    /// The deployment record as decided so far; it becomes the decision's record.
    pub d: DeploymentRecord,
    /// What each host reports; the same for every phase of one decision.
    views: &'v BTreeMap<String, HostView<'a>>,
    /// The decision's instant (unix ms): the only clock the machine reads.
    pub now: u64,
    /// The timeline events the transitions made.
    pub fx: Effects,
    /// The latest result of each Prometheus query the plan's metrics make, gathered by
    /// the engine off the decision loop.
    pub queried: &'v Queried,
    /// The earlier deployment whose schema change this one waits for, when it does.
    pub previous: Option<&'v DeploymentRecord>,
}

/// No query results, for decisions that have none to hand.
pub(super) static NO_QUERIES: Queried = Queried::new();

impl<'v, 'a> Machine<'v, 'a> {
    pub fn new(d: DeploymentRecord, views: &'v BTreeMap<String, HostView<'a>>, now: u64) -> Self {
        let fx = Effects::new(d.state, now);
        Machine {
            d,
            views,
            now,
            fx,
            queried: &NO_QUERIES,
            previous: None,
        }
    }

    /// The record decided and the events that say what happened.
    pub fn finish(self) -> (DeploymentRecord, Vec<Event>) {
        let events = self.fx.finish(&self.d);
        (self.d, events)
    }

    /// Takes every transition due at this instant: one may enable another (the next
    /// step, say), and taking them all now keeps deciding idempotent.
    pub fn settle(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let before = self.mark();
            self.round();
            if self.d.state.is_final() || self.mark() == before {
                break;
            }
        }
    }

    /// What a round that moved the deployment on changes.
    fn mark(&self) -> (State, u32, Option<u64>) {
        (self.d.state, self.d.step, self.d.step_switched_unix_ms)
    }

    /// One pass of the phases, in order: the earlier schema change to wait for, start if
    /// pending, hosts lost, the database expand, the health watch, then the phase of the
    /// state the deployment is in.
    fn round(&mut self) {
        if self.previous_contract() == Flow::Stop {
            return;
        }
        self.start_if_pending();
        if self.hosts_lost() == Flow::Stop || self.expand() == Flow::Stop {
            return;
        }
        self.watch_health();
        match self.d.state {
            State::Preparing => self.prepare(),
            State::Progressing => self.hold_and_advance(),
            // Counters keep being judged while paused in a step: a paused release
            // still serves its share.
            State::Paused if self.d.step_switched_unix_ms.is_some() => {
                self.run_interval();
            }
            State::RollingBack => self.finish_rollback(),
            _ => {}
        }
    }

    fn start_if_pending(&mut self) {
        if self.d.state == State::Pending {
            self.d.state = State::Preparing;
            self.d.phase_started_unix_ms = self.now;
        }
    }

    /// What the coordinator knows of host `name` (nothing, for a host it has no view of).
    pub fn view(&self, name: &str) -> HostView<'a> {
        self.views.get(name).copied().unwrap_or_default()
    }

    /// How long host `name` has been unreachable, if it is (a host the coordinator has
    /// no view of is not counted lost).
    pub fn unreachable_for(&self, name: &str) -> Option<u64> {
        self.views
            .get(name)
            .filter(|v| !v.connected)
            .map(|v| v.lost_ms)
    }

    /// The hosts the current step covers: the first `hosts` of the deployment's hosts,
    /// by name (all of them when the step does not say).
    pub fn step_hosts(&self) -> Vec<String> {
        let steps = &self.d.plan.strategy.steps;
        let step = &steps[(self.d.step as usize).min(steps.len() - 1)];
        let all = self.d.hosts.len();
        let n = step.hosts.map_or(all, |c| c.of(all));
        self.d.hosts.keys().take(n).cloned().collect()
    }

    /// The host's latest report answers what this deployment wants of it now (see
    /// [`answers`]).
    pub fn answers(&self, name: &str) -> bool {
        self.d
            .hosts
            .get(name)
            .is_some_and(|h| answers(&self.d, &self.view(name), h))
    }

    /// The host answers what the deployment wants of it with that state's weights in
    /// effect.
    pub fn weights_confirmed(&self, name: &str) -> bool {
        let view = self.view(name);
        let (Some(h), Some(o), Some(d)) = (self.d.hosts.get(name), view.observed, view.desired)
        else {
            return false;
        };
        answers(&self.d, &view, h)
            && o.weight(h.new_slot) == d.weight(h.new_slot)
            && h.old_slot.is_none_or(|s| o.weight(s) == d.weight(s))
    }
}

impl<'a> HostView<'a> {
    /// The agent has seen the desired state last written for it.
    pub(super) fn is_current(&self) -> bool {
        match (self.observed, self.desired) {
            (Some(o), Some(d)) => o.generation >= d.generation,
            _ => false,
        }
    }

    /// What the agent reports of the slot that receives the new release on this host.
    pub(super) fn new_status(&self, host: &DeployHost) -> Option<&'a SlotStatus> {
        self.observed.and_then(|o| o.slot(host.new_slot))
    }
}

/// True when the host's latest report answers the desired state this deployment wants
/// of it now: that state has been written (it is the host's desired state) and the
/// agent has seen it. An older report may describe the host as it was before — a warm
/// slot holding the same release with another spec, or a port error of an earlier
/// attempt — and vouches for nothing in this deployment.
fn answers(dep: &DeploymentRecord, view: &HostView<'_>, host: &DeployHost) -> bool {
    let Some(d) = view.desired else {
        return false;
    };
    if let Some(want) = target(dep, host, Some(d)) {
        // The slots answer; a database task beside them is another matter.
        let mut have = d.clone();
        have.generation = 0;
        have.database_task = want.database_task.clone();
        if have != want {
            return false;
        }
    }
    view.is_current()
}
