//! Holding a step and moving on: once every host of the step confirmed its weights the
//! hold begins; the step ends after its hold (and the bake, on the last step), its gate
//! (`pause = true`), and a conclusive passing analysis interval — or at `promote` —
//! then the next step prepares, or the deployment succeeds.

use super::machine::{Flow, Machine};
use super::rollback::Cause;
use crate::model::{HostPhase, PauseCause, State};

/// Where the current step stands against what it must show before it ends.
#[derive(Debug, PartialEq)]
enum Proof {
    /// Its hold, bake and analysis are done, or it was promoted.
    Done,
    /// Still holding, or waiting for a conclusive interval.
    Waiting,
    /// No conclusive interval came in time.
    Failed(Cause),
}

impl Machine<'_, '_> {
    /// The `progressing` state.
    pub fn hold_and_advance(&mut self) {
        self.confirm_switched();
        if self.begin_hold() == Flow::Stop {
            return;
        }
        let Some(held) = self.d.held_ms(self.now) else {
            return;
        };
        if self.run_interval() == Flow::Stop {
            return;
        }
        let step = &self.d.plan.strategy.steps[self.d.step as usize];
        if step.pause && !self.d.promoted && !self.d.gate_passed {
            self.pause(PauseCause::StepGate);
            return;
        }
        match self.proof(held) {
            Proof::Done => {}
            Proof::Waiting => return,
            Proof::Failed(cause) => return self.roll_back(cause),
        }
        // A host that is not reporting cannot vouch for this step: wait for it, or for
        // `host_lost_after` to set it aside, before going further.
        if self.switched_host_silent() {
            return;
        }
        self.d.promoted = false;
        self.d.gate_passed = false;
        if self.d.step as usize + 1 == self.d.plan.strategy.steps.len() {
            self.succeed();
        } else {
            self.next_step();
        }
    }

    /// Ready hosts whose agent confirmed the step's weights are switched.
    fn confirm_switched(&mut self) {
        let confirmed: Vec<String> = self
            .d
            .hosts
            .iter()
            .filter(|(name, h)| h.phase == HostPhase::Ready && self.weights_confirmed(name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in confirmed {
            if let Some(h) = self.d.hosts.get_mut(&name) {
                h.phase = HostPhase::Switched;
                self.fx.host_switched(&name);
            }
        }
    }

    /// Begins the hold once every host of the step is switched (or failed); rolls back
    /// when that takes longer than the progress deadline.
    fn begin_hold(&mut self) -> Flow {
        if self.d.step_switched_unix_ms.is_some() {
            return Flow::Next;
        }
        let all_switched = self.step_hosts().iter().all(|n| {
            self.d
                .hosts
                .get(n)
                .is_some_and(|h| matches!(h.phase, HostPhase::Switched | HostPhase::Failed))
        });
        if all_switched {
            self.start_hold_clock();
            self.fx.hold_began();
        } else if self.past_deadline() {
            let deadline = self.d.plan.strategy.progress_deadline;
            self.roll_back(Cause::SwitchDeadline { deadline });
            return Flow::Stop;
        }
        Flow::Next
    }

    /// Starts the hold of a step (or of the shadow phase) now: its clock, and a fresh
    /// count of analysis intervals.
    pub(super) fn start_hold_clock(&mut self) {
        self.d.step_switched_unix_ms = Some(self.now);
        self.d.analysis.interval_started_unix_ms = None;
        self.d.analysis.passes_in_step = 0;
    }

    /// Whether the step has held long enough, `held` ms so far: its hold (plus the bake
    /// on the last step) and, with `[analysis]`, at least one conclusive passing
    /// interval — unless promoted.
    fn proof(&self, held: u64) -> Proof {
        if self.d.promoted {
            return Proof::Done;
        }
        let strategy = &self.d.plan.strategy;
        let mut wait = strategy.steps[self.d.step as usize].hold.as_millis();
        if self.d.step as usize + 1 == strategy.steps.len() {
            wait += strategy.bake.as_millis();
        }
        if held < wait {
            return Proof::Waiting;
        }
        if self.d.plan.analysis.is_none() || self.d.analysis.passes_in_step > 0 {
            return Proof::Done;
        }
        let deadline = strategy.progress_deadline;
        if held > wait + deadline.as_millis() {
            let traffic = self.d.traffic;
            return Proof::Failed(Cause::NoConclusiveInterval { deadline, traffic });
        }
        Proof::Waiting
    }

    /// A switched host is not reachable now.
    fn switched_host_silent(&self) -> bool {
        self.d
            .hosts
            .iter()
            .any(|(n, h)| !h.untouched && h.phase == HostPhase::Switched && !self.view(n).connected)
    }

    /// The last step held: the deployment succeeded.
    fn succeed(&mut self) {
        let d = &mut self.d;
        d.state = State::Succeeded;
        d.ended_unix_ms = Some(self.now);
        d.reason = None;
        // Hosts set aside while unreachable follow the fleet: they are told to run the
        // new release, and their agent moves traffic to it once it is healthy there.
        for (name, h) in d.hosts.iter_mut() {
            if h.lost && h.old_slot.is_some() {
                h.phase = HostPhase::Switched;
                h.weight = 100;
                h.error = Some("was unreachable; takes the release when it returns".into());
                self.fx.host_switched(name);
            }
        }
        self.fx.ended();
    }

    /// The step held: the next one prepares its hosts.
    fn next_step(&mut self) {
        let d = &mut self.d;
        d.step += 1;
        d.step_switched_unix_ms = None;
        d.phase_started_unix_ms = self.now;
        d.state = State::Preparing;
        self.fx.advanced();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeploymentRecord;
    use crate::rollout::tests::fixture::{Sim, kinds, phase, run_until, v2_over_v1};
    use crate::timeline::Kind;

    /// v1 live on a and b, then v2 with `steps` until its first step's weights went
    /// out and were applied (not yet confirmed by a decision).
    fn switching(steps: &str) -> (Sim, DeploymentRecord, u64) {
        let mut sim = Sim::new(&["a", "b"]);
        let (dep, now) = v2_over_v1(&mut sim, steps);
        let (d, now) = run_until(&mut sim, dep, now, |d| d.state == State::Progressing);
        (sim, d, now)
    }

    #[test]
    fn the_hold_begins_once_every_host_confirmed_its_weights() {
        let (sim, d, now) =
            switching("steps = [{ traffic = 10, hold = \"5s\" }, { traffic = 100 }]");
        let (d, events) = phase(&sim, &d, now, |m| m.hold_and_advance());
        assert!(d.hosts.values().all(|h| h.phase == HostPhase::Switched));
        assert_eq!(d.step_switched_unix_ms, Some(now));
        assert_eq!(
            kinds(&events),
            [Kind::StepHolding {
                step: 0,
                traffic: 10
            }]
        );
        // Held 4.9 s of 5: nothing moves; at 5 s the next step prepares.
        let (same, events) = phase(&sim, &d, now + 4_900, |m| m.hold_and_advance());
        assert!(same == d && events.is_empty());
        let (next, _) = phase(&sim, &d, now + 5_000, |m| m.hold_and_advance());
        assert_eq!((next.state, next.step), (State::Preparing, 1));
        assert_eq!(next.phase_started_unix_ms, now + 5_000);
    }

    #[test]
    fn a_gate_pauses_the_step_and_the_last_step_held_succeeds() {
        let (sim, d, now) = switching("steps = [{ traffic = 100, pause = true }]");
        let (d, events) = phase(&sim, &d, now, |m| m.hold_and_advance());
        assert_eq!(d.state, State::Paused);
        assert_eq!(d.pause.map(|p| p.cause), Some(PauseCause::StepGate));
        assert_eq!(
            kinds(&events),
            [
                Kind::StepHolding {
                    step: 0,
                    traffic: 100
                },
                Kind::Paused { reason: None }
            ]
        );
        let (d, events) = phase(&sim, &d, now + 1_000, |m| {
            m.resume();
            m.hold_and_advance();
        });
        assert_eq!(
            (d.state, d.ended_unix_ms),
            (State::Succeeded, Some(now + 1_000))
        );
        assert_eq!(
            kinds(&events),
            [Kind::Ended {
                state: "succeeded".into(),
                reason: None
            }]
        );
    }

    #[test]
    fn a_silent_switched_host_holds_the_step_back() {
        let (mut sim, d, now) =
            switching("steps = [{ traffic = 10, hold = \"1s\" }, { traffic = 100 }]");
        let (d, _) = phase(&sim, &d, now, |m| m.hold_and_advance());
        sim.lost.insert("b".into(), 1_000);
        let (same, _) = phase(&sim, &d, now + 1_000, |m| m.hold_and_advance());
        assert_eq!((same.state, same.step), (State::Progressing, 0));
        sim.lost.clear();
        let (next, _) = phase(&sim, &d, now + 1_000, |m| m.hold_and_advance());
        assert_eq!(next.step, 1);
    }

    #[test]
    fn a_step_is_proven_by_its_hold_and_a_conclusive_interval_or_by_promote() {
        let (sim, mut d, now) =
            switching("steps = [{ traffic = 10, hold = \"5s\" }, { traffic = 100 }]");
        d.plan.strategy.progress_deadline = cutover_shared::Duration::from_secs(60);
        let proof = |d: &DeploymentRecord, held: u64| {
            let views = sim.views();
            Machine::new(d.clone(), &views, now).proof(held)
        };
        assert_eq!(proof(&d, 4_999), Proof::Waiting);
        assert_eq!(proof(&d, 5_000), Proof::Done);
        d.plan.analysis = Some(cutover_shared::plan::Analysis {
            interval: cutover_shared::Duration::from_secs(1),
            failure_limit: 1,
            min_requests: 0,
            inconclusive_limit: 3,
            scrape: None,
            prometheus: None,
            metric: Vec::new(),
        });
        assert_eq!(proof(&d, 5_000), Proof::Waiting, "no passing interval yet");
        assert!(matches!(
            proof(&d, 65_001),
            Proof::Failed(Cause::NoConclusiveInterval { .. })
        ));
        d.analysis.passes_in_step = 1;
        assert_eq!(proof(&d, 5_000), Proof::Done);
        d.analysis.passes_in_step = 0;
        d.promoted = true;
        assert_eq!(proof(&d, 0), Proof::Done);
    }
}
