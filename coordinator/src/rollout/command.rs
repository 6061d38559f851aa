//! The operator's commands: `pause`, `resume`, `promote` and `abort`, each taken only
//! in the states it means something in (a command that means nothing there is a no-op;
//! `contract` and `undo` mean something only once the deployment has ended, see
//! `database`).

use super::machine::Machine;
use super::rollback::Cause;
use super::{Command, Order};
use crate::model::{PauseCause, State};

impl Machine<'_, '_> {
    /// Carries out the operator's command, before anything else is decided. The
    /// timeline records every command given, whether or not it changed anything.
    pub fn obey(&mut self, order: Order<'_>) {
        self.fx.command(order.command.as_str(), order.actor);
        let state = self.d.state;
        match order.command {
            Command::Abort if state != State::RollingBack => self.roll_back(Cause::Aborted),
            Command::Pause if matches!(state, State::Preparing | State::Progressing) => {
                self.pause(PauseCause::Operator);
            }
            Command::Resume if state == State::Paused => self.resume(),
            Command::Promote if state == State::Paused => {
                self.resume();
                self.d.promoted = true;
            }
            Command::Promote if state == State::Progressing => self.d.promoted = true,
            // A rollback whose database abort stands still goes on with it again.
            Command::Resume if state == State::RollingBack => self.retry_database(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeploymentRecord;
    use crate::rollout::tests::fixture::{deployment, on_record, ops};

    fn obeyed(state: State, command: Command) -> DeploymentRecord {
        let d = DeploymentRecord {
            state,
            ..deployment()
        };
        on_record(d, 5_000, |m| m.obey(ops(command)))
    }

    #[test]
    fn each_command_acts_only_where_it_means_something() {
        let state = |s, c| obeyed(s, c).state;
        assert_eq!(state(State::Progressing, Command::Pause), State::Paused);
        assert_eq!(state(State::Paused, Command::Pause), State::Paused);
        assert_eq!(
            state(State::RollingBack, Command::Pause),
            State::RollingBack
        );
        assert_eq!(
            state(State::Progressing, Command::Resume),
            State::Progressing
        );
        assert!(obeyed(State::Progressing, Command::Promote).promoted);
        assert!(!obeyed(State::Preparing, Command::Promote).promoted);
        let aborted = obeyed(State::Preparing, Command::Abort);
        assert_eq!(aborted.state, State::RollingBack);
        assert_eq!(aborted.reason.as_deref(), Some("aborted by operator"));
        assert_eq!(aborted.ending, Some(State::Aborted));
    }

    #[test]
    fn promote_resumes_a_paused_deployment_and_skips_its_hold() {
        let d = on_record(obeyed(State::Progressing, Command::Pause), 4_000, |m| {
            m.obey(ops(Command::Promote))
        });
        assert_eq!(d.state, State::Progressing);
        assert!(d.promoted && d.pause.is_none());
    }
}
