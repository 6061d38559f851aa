//! Pausing and resuming: a paused deployment comes back to the state it left, and the
//! time paused counts against neither the step's hold nor the progress deadline; a
//! database command that stood still runs again.

use super::machine::Machine;
use crate::model::{Pause, PauseCause, State};

impl Machine<'_, '_> {
    /// Pauses the deployment: it will come back to the state it is in now.
    pub fn pause(&mut self, cause: PauseCause) {
        let d = &mut self.d;
        d.ending = Some(d.state);
        d.state = State::Paused;
        d.pause = Some(Pause {
            cause,
            since_unix_ms: self.now,
        });
        self.fx.paused();
    }

    /// Ends a pause. Both clocks (the step's hold, the phase's deadline) move forward by
    /// the time paused; what the pause waited for is settled by its cause.
    pub fn resume(&mut self) {
        let now = self.now;
        let mut retry = false;
        let d = &mut self.d;
        d.state = d.ending.take().unwrap_or(State::Progressing);
        match d.pause.take() {
            Some(p) => {
                let paused = now.saturating_sub(p.since_unix_ms);
                if let Some(at) = d.step_switched_unix_ms.as_mut() {
                    *at = at.saturating_add(paused);
                }
                d.phase_started_unix_ms = d.phase_started_unix_ms.saturating_add(paused);
                match p.cause {
                    PauseCause::StepGate => d.gate_passed = true,
                    PauseCause::HostLost => d.reason = None,
                    PauseCause::Inconclusive => {
                        d.reason = None;
                        d.analysis.consecutive_inconclusive = 0;
                    }
                    PauseCause::Database => {
                        d.reason = None;
                        retry = true;
                    }
                    PauseCause::Operator => {}
                }
            }
            // A record written before pauses were timed: take it as the step's gate.
            None => d.gate_passed = d.step_switched_unix_ms.is_some(),
        }
        debug_assert!(d.state != State::Paused && d.pause.is_none());
        if retry {
            self.retry_database();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeploymentRecord;
    use crate::rollout::tests::fixture::{deployment, on_record};

    /// `d` in `state`, paused for `cause` at `at`.
    fn paused(d: DeploymentRecord, state: State, cause: PauseCause, at: u64) -> DeploymentRecord {
        on_record(DeploymentRecord { state, ..d }, at, |m| m.pause(cause))
    }

    #[test]
    fn resuming_moves_the_hold_and_the_deadline_by_the_time_paused() {
        let mut d = deployment();
        d.phase_started_unix_ms = 1_000;
        d.step_switched_unix_ms = Some(2_000);
        let d = paused(d, State::Progressing, PauseCause::StepGate, 3_000);
        assert_eq!(d.ending, Some(State::Progressing));
        let d = on_record(d, 10_000, |m| m.resume());
        assert_eq!(d.state, State::Progressing);
        assert_eq!(d.step_switched_unix_ms, Some(9_000));
        assert_eq!(d.phase_started_unix_ms, 8_000);
        assert!(d.gate_passed, "resuming a gate passes it");
    }

    #[test]
    fn resuming_a_lost_host_pause_forgets_its_reason() {
        let mut d = paused(deployment(), State::Preparing, PauseCause::HostLost, 3_000);
        d.reason = Some("paused: host b unreachable".into());
        let d = on_record(d, 4_000, |m| m.resume());
        assert_eq!(d.state, State::Preparing);
        assert_eq!(d.reason, None);
        assert!(!d.gate_passed);
    }
}
