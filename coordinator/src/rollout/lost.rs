//! Hosts lost: a host unreachable for `host_lost_after` while it takes part in a step is
//! set aside (never counted healthy; it converges on the fleet's state when it comes
//! back), and the plan's `on_host_lost` says what becomes of the deployment.

use cutover_shared::plan::OnHostLost;

use super::machine::{Flow, Machine};
use super::rollback::Cause;
use crate::model::{HostPhase, PauseCause, State};

impl Machine<'_, '_> {
    /// Sets lost hosts aside and applies `on_host_lost`. Stops the round when the
    /// deployment paused or rolled back because of it.
    pub fn hosts_lost(&mut self) -> Flow {
        if !matches!(self.d.state, State::Preparing | State::Progressing) {
            return Flow::Next;
        }
        let lost = self.newly_lost();
        if lost.is_empty() {
            return Flow::Next;
        }
        let after = self.d.plan.strategy.host_lost_after;
        for name in &lost {
            if let Some(h) = self.d.hosts.get_mut(name) {
                h.phase = HostPhase::Failed;
                h.lost = true;
                h.weight = 0;
                h.error = Some(format!("unreachable for more than {after}"));
            }
        }
        let hosts = lost.join(", ");
        match self.d.plan.strategy.on_host_lost {
            OnHostLost::Rollback => {
                self.roll_back(Cause::HostsLost { hosts, after });
                Flow::Stop
            }
            OnHostLost::Pause => {
                self.pause(PauseCause::HostLost);
                self.d.reason = Some(format!(
                    "paused: host {hosts} unreachable for more than {after} (on_host_lost = \"pause\"); `resume` goes on without it, `abort` rolls back"
                ));
                Flow::Stop
            }
            OnHostLost::Continue => Flow::Next,
        }
    }

    /// Hosts taking part in the deployment that have been unreachable for
    /// `host_lost_after`, by name.
    fn newly_lost(&self) -> Vec<String> {
        let after = self.d.plan.strategy.host_lost_after.as_millis();
        self.d
            .hosts
            .iter()
            .filter(|(name, h)| {
                !h.untouched
                    && matches!(
                        h.phase,
                        HostPhase::Preparing | HostPhase::Ready | HostPhase::Switched
                    )
                    && self.unreachable_for(name).is_some_and(|ms| ms >= after)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }
}
