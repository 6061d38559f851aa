//! The health watch: while the new release carries traffic, a host whose service reports
//! an error, whose agent had to move traffic back by itself, or whose new slot turns
//! unhealthy or fails, rolls the deployment back.

use cutover_proto::v1::SlotPhase;

use super::machine::Machine;
use super::rollback::Cause;
use crate::model::{DeployHost, HostPhase, State};

impl Machine<'_, '_> {
    /// Rolls back on the first host (by name) that shows a symptom while serving.
    pub fn watch_health(&mut self) {
        if !matches!(self.d.state, State::Progressing | State::Paused) {
            return;
        }
        let cause = self
            .d
            .hosts
            .iter()
            .filter(|(_, h)| serving(h))
            .find_map(|(name, h)| self.symptom(name, h));
        if let Some(cause) = cause {
            self.roll_back(cause);
        }
    }

    /// What is wrong with a serving host, if anything: a service error the agent
    /// reported for the current desired state, a healing report, or the new release's
    /// slot unhealthy or failed.
    fn symptom(&self, name: &str, h: &DeployHost) -> Option<Cause> {
        let v = self.view(name);
        let host = name.to_string();
        if let Some(o) = v.observed
            && !o.error.is_empty()
            && v.is_current()
        {
            let error = o.error.clone();
            return Some(Cause::ServiceError { host, error });
        }
        if let Some(o) = v.observed
            && !o.healing.is_empty()
        {
            let healing = o.healing.clone();
            let weight = h.weight;
            return Some(Cause::Healed {
                host,
                healing,
                weight,
            });
        }
        let st = v.new_status(h)?;
        let phase = SlotPhase::of(st.phase);
        if st.release != self.d.release
            || !matches!(phase, SlotPhase::Unhealthy | SlotPhase::Failed)
        {
            return None;
        }
        let why = if st.error.is_empty() {
            phase.name().to_string()
        } else {
            st.error.clone()
        };
        Some(Cause::SlotFailing {
            host,
            phase: phase.name(),
            weight: h.weight,
            why,
        })
    }
}

/// The host carries some of the new release's traffic.
fn serving(h: &DeployHost) -> bool {
    !h.untouched && matches!(h.phase, HostPhase::Ready | HostPhase::Switched) && h.weight > 0
}

#[cfg(test)]
mod tests {
    use cutover_proto::v1::SlotPhase;

    use crate::model::State;
    use crate::rollout::tests::fixture::{Sim, holding_v2, phase};

    /// The reason a serving host's report gives, if it rolls back.
    fn rolls_back_for(
        report: impl FnOnce(&mut Sim, &crate::model::DeploymentRecord),
    ) -> Option<String> {
        let mut sim = Sim::new(&["a", "b"]);
        let (d, now) = holding_v2(&mut sim);
        report(&mut sim, &d);
        let (d, _) = phase(&sim, &d, now, |m| m.watch_health());
        (d.state == State::RollingBack).then(|| d.reason.unwrap_or_default())
    }

    #[test]
    fn a_serving_host_that_reports_trouble_rolls_back_with_what_it_said() {
        let service_error = rolls_back_for(|sim, _| {
            sim.observed.get_mut("b").unwrap().error = "bind 0.0.0.0:8080: in use".into();
        });
        assert_eq!(
            service_error.as_deref(),
            Some("host b: bind 0.0.0.0:8080: in use")
        );
        let healing = rolls_back_for(|sim, _| {
            sim.observed.get_mut("a").unwrap().healing = "new slot crashed".into();
        });
        assert_eq!(
            healing.as_deref(),
            Some("host a: new slot crashed while serving 10%; the agent moved its traffic back")
        );
        let unhealthy = rolls_back_for(|sim, d| sim.report(d, "a", SlotPhase::Unhealthy, ""));
        assert_eq!(
            unhealthy.as_deref(),
            Some("host a: new release unhealthy while serving 10%: unhealthy")
        );
        let failed = rolls_back_for(|sim, d| sim.report(d, "b", SlotPhase::Failed, "exit 3"));
        assert_eq!(
            failed.as_deref(),
            Some("host b: new release failed while serving 10%: exit 3")
        );
    }

    #[test]
    fn an_old_report_or_a_host_without_traffic_is_no_symptom() {
        let stale = rolls_back_for(|sim, _| {
            let o = sim.observed.get_mut("b").unwrap();
            o.error = "bind 0.0.0.0:8080: in use".into();
            o.generation -= 1;
        });
        assert_eq!(stale, None, "an error from before the weights were sent");
        let mut sim = Sim::new(&["a", "b"]);
        let (mut d, now) = holding_v2(&mut sim);
        d.hosts.get_mut("a").unwrap().weight = 0;
        sim.report(&d, "a", SlotPhase::Unhealthy, "");
        let (d, _) = phase(&sim, &d, now, |m| m.watch_health());
        assert_eq!(d.state, State::Progressing);
    }
}
