//! What preparing hosts report: each phase a host's new slot enters while it prepares
//! (`fetching`, `unpacking`, `starting`, `healthy`) is recorded once, as its agent
//! reports it, whatever else the decision does.

use cutover_proto::v1::SlotPhase;

use super::machine::Machine;
use crate::model::{HostPhase, Preparation};

impl Machine<'_, '_> {
    /// Records the preparation phase of every preparing host whose agent reports a new
    /// one for this release; the record keeps the last one seen per host.
    pub fn report_progress(&mut self) {
        let names: Vec<String> = self.d.hosts.keys().cloned().collect();
        for name in names {
            let view = self.view(&name);
            let Some(h) = self.d.hosts.get_mut(&name) else {
                continue;
            };
            if h.phase != HostPhase::Preparing {
                continue;
            }
            let Some(status) = view.new_status(h) else {
                continue;
            };
            if status.release != self.d.release {
                continue;
            }
            let Some(phase) = Preparation::of(SlotPhase::of(status.phase)) else {
                continue;
            };
            if h.reported != Some(phase) {
                h.reported = Some(phase);
                self.fx.host_phase(&name, phase.name());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cutover_proto::v1::SlotPhase;

    use crate::model::Preparation;
    use crate::rollout::tests::fixture::{SHA1, SHA2, Sim, kinds, phase, plan};
    use crate::timeline::Kind;

    #[test]
    fn each_phase_of_a_preparing_host_is_recorded_once() {
        let mut sim = Sim::new(&["a"]);
        sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
        let (mut d, _) = sim.step(&sim.start(&plan("2", SHA2, "")), 1_000);
        let mut seen = Vec::new();
        for (at, p) in [
            SlotPhase::Fetching,
            SlotPhase::Fetching,
            SlotPhase::Unpacking,
            SlotPhase::Starting,
            SlotPhase::Starting,
        ]
        .into_iter()
        .enumerate()
        {
            sim.report(&d, "a", p, "");
            let (next, events) = phase(&sim, &d, 2_000 + at as u64, |m| m.report_progress());
            seen.extend(kinds(&events));
            d = next;
        }
        let phase_of = |phase: &str| Kind::HostPhase {
            host: "a".into(),
            phase: phase.into(),
        };
        assert_eq!(
            seen,
            [
                phase_of("fetching"),
                phase_of("unpacking"),
                phase_of("starting")
            ]
        );
        assert_eq!(d.hosts["a"].reported, Some(Preparation::Starting));
        // Another release's slot, or a phase that is not preparation, is not recorded.
        sim.report(&d, "a", SlotPhase::Failed, "disk full");
        let (_, events) = phase(&sim, &d, 3_000, |m| m.report_progress());
        assert!(events.is_empty());
    }
}
