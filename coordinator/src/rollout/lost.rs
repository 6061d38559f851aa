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
                self.fx.host_lost(name);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::tests::fixture::{Sim, holding_v2, kinds, phase};
    use crate::timeline::Kind;

    #[test]
    fn a_lost_host_is_set_aside_and_the_plan_says_what_follows() {
        for policy in [
            OnHostLost::Pause,
            OnHostLost::Rollback,
            OnHostLost::Continue,
        ] {
            let mut sim = Sim::new(&["a", "b"]);
            let (mut d, now) = holding_v2(&mut sim);
            d.plan.strategy.on_host_lost = policy;
            d.plan.strategy.host_lost_after = cutover_shared::Duration::from_secs(5);
            sim.lost.insert("b".into(), 4_999);
            let (same, events) = phase(&sim, &d, now, |m| {
                assert_eq!(m.hosts_lost(), Flow::Next);
            });
            assert!(events.is_empty() && same == d, "not lost yet");
            sim.lost.insert("b".into(), 5_000);
            let mut flow = Flow::Next;
            let (d, events) = phase(&sim, &d, now, |m| flow = m.hosts_lost());
            let b = &d.hosts["b"];
            assert!(b.lost && b.weight == 0, "{policy:?}: {b:?}");
            assert_eq!(b.error.as_deref(), Some("unreachable for more than 5s"));
            let lost = Kind::HostLost { host: "b".into() };
            match policy {
                OnHostLost::Pause => {
                    assert_eq!((flow, d.state), (Flow::Stop, State::Paused));
                    let reason = d.reason.clone();
                    assert!(reason.as_deref().is_some_and(|r| {
                        r.starts_with("paused: host b unreachable for more than 5s")
                    }));
                    assert_eq!(kinds(&events), [lost, Kind::Paused { reason }]);
                }
                OnHostLost::Rollback => {
                    assert_eq!((flow, d.state), (Flow::Stop, State::RollingBack));
                    assert_eq!(b.phase, HostPhase::RolledBack);
                    // Set back with the rest, it is no longer news on its own.
                    assert!(matches!(kinds(&events)[..], [Kind::RollbackStarted { .. }]));
                }
                OnHostLost::Continue => {
                    assert_eq!((flow, d.state), (Flow::Next, State::Progressing));
                    assert_eq!(b.phase, HostPhase::Failed);
                    assert_eq!(kinds(&events), [lost]);
                }
            }
        }
    }
}
