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
