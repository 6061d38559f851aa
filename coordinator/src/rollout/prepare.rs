//! Preparing a step: the step's hosts get the new release `max_parallel` at a time,
//! each is watched until its new slot is healthy (ready) or failed, and once every host
//! of the step is ready (or failed within tolerance) the step's weights go out.

use std::collections::BTreeMap;

use cutover_proto::v1::SlotPhase;

use super::machine::Machine;
use super::rollback::Cause;
use crate::model::{HostPhase, State};
use crate::timeline::Timings;

impl Machine<'_, '_> {
    /// The `preparing` state: observe, judge failures, start more hosts, then switch the
    /// step's weights or watch the deadline.
    pub fn prepare(&mut self) {
        let step_hosts = self.step_hosts();
        for name in &step_hosts {
            self.observe_preparing(name);
        }
        if let Some(cause) = self.failures() {
            self.roll_back(cause);
            return;
        }
        self.start_more(&step_hosts);
        if self.all_prepared(&step_hosts) && self.shadow_due() {
            self.begin_shadow();
        } else if self.all_prepared(&step_hosts) {
            self.switch_step(&step_hosts);
        } else if self.past_deadline() {
            let cause = Cause::PrepareDeadline {
                deadline: self.d.plan.strategy.progress_deadline,
                slow: self.slow_hosts(&step_hosts),
            };
            self.roll_back(cause);
        }
    }

    /// Reads what a preparing host's agent reports about the desired state this
    /// deployment wants of it: a healthy new slot makes it ready, a failed one (or a
    /// service error) failed.
    fn observe_preparing(&mut self, name: &str) {
        let answered = self.answers(name);
        let view = self.view(name);
        let release = self.d.release.clone();
        let Some(h) = self.d.hosts.get_mut(name) else {
            return;
        };
        if h.phase != HostPhase::Preparing || !answered {
            return;
        }
        if let Some(st) = view.new_status(h)
            && st.release == release
        {
            match SlotPhase::of(st.phase) {
                SlotPhase::Healthy => {
                    h.phase = HostPhase::Ready;
                    h.hook_log = hook_log(&st.hook_log);
                    self.fx.hooks_ran(name, &st.hooks);
                    self.fx.host_ready(name, Timings::of(st));
                }
                SlotPhase::Failed => {
                    let error = if st.error.is_empty() {
                        "slot failed"
                    } else {
                        st.error.as_str()
                    };
                    h.phase = HostPhase::Failed;
                    h.error = Some(error.to_string());
                    h.hook_log = hook_log(&st.hook_log);
                    self.fx.hooks_ran(name, &st.hooks);
                    self.fx.host_failed(name, error);
                }
                _ => {}
            }
        }
        let service_error = view.observed.map(|o| o.error.as_str()).unwrap_or_default();
        if h.phase == HostPhase::Preparing && !service_error.is_empty() {
            h.phase = HostPhase::Failed;
            h.error = Some(service_error.to_string());
            self.fx.host_failed(name, service_error);
        }
    }

    /// Why the failures so far roll the deployment back, if they do: more failed hosts
    /// than `max_failed_hosts` (or every host), or the same error on several hosts — the
    /// release's fault, not the hosts'. Hosts set aside as lost do not count.
    fn failures(&self) -> Option<Cause> {
        let failed: Vec<(&String, Option<&String>)> = self
            .d
            .hosts
            .iter()
            .filter(|(_, h)| h.phase == HostPhase::Failed && !h.lost)
            .map(|(name, h)| (name, h.error.as_ref()))
            .collect();
        let (first, error) = *failed.first()?;
        let candidates = self.d.hosts.values().filter(|h| !h.untouched).count();
        if failed.len() > self.d.plan.strategy.max_failed_hosts as usize
            || failed.len() == candidates
        {
            let host = first.clone();
            let error = error.cloned();
            return Some(Cause::HostFailed { host, error });
        }
        let mut by_error: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (name, error) in failed {
            let error = error.map_or("", String::as_str);
            by_error.entry(error).or_default().push(name.clone());
        }
        let (error, hosts) = by_error.into_iter().find(|(_, hosts)| hosts.len() >= 2)?;
        let error = error.to_string();
        Some(Cause::ReleaseFault { hosts, error })
    }

    /// Starts waiting hosts of the step, so that at most `max_parallel` prepare at once.
    fn start_more(&mut self, step_hosts: &[String]) {
        let limit = self
            .d
            .plan
            .strategy
            .max_parallel
            .of(self.d.hosts.len())
            .max(1);
        let mut in_flight = self
            .d
            .hosts
            .values()
            .filter(|h| h.phase == HostPhase::Preparing)
            .count();
        for name in step_hosts {
            if in_flight >= limit {
                break;
            }
            if let Some(h) = self.d.hosts.get_mut(name)
                && h.phase == HostPhase::Waiting
            {
                h.phase = HostPhase::Preparing;
                in_flight += 1;
                self.fx.host_started(name);
            }
        }
    }

    /// Every host of the step is ready, switched or failed.
    fn all_prepared(&self, step_hosts: &[String]) -> bool {
        step_hosts.iter().all(|n| {
            self.d.hosts.get(n).is_some_and(|h| {
                matches!(
                    h.phase,
                    HostPhase::Ready | HostPhase::Switched | HostPhase::Failed
                )
            })
        })
    }

    /// The step's weights go out: each ready or switched host of the step gets the
    /// step's traffic, to be confirmed by its agent.
    pub(super) fn switch_step(&mut self, step_hosts: &[String]) {
        let traffic = self.d.plan.strategy.steps[self.d.step as usize].traffic;
        self.d.traffic = traffic;
        for name in step_hosts {
            if let Some(h) = self.d.hosts.get_mut(name)
                && !h.untouched
                && matches!(h.phase, HostPhase::Ready | HostPhase::Switched)
            {
                h.phase = HostPhase::Ready;
                h.weight = traffic;
            }
        }
        self.d.state = State::Progressing;
        self.d.phase_started_unix_ms = self.now;
        self.d.step_switched_unix_ms = None;
        self.fx.step_switched();
        debug_assert!(
            self.d
                .hosts
                .values()
                .all(|h| h.untouched || h.weight <= traffic)
        );
    }

    /// The current phase has run longer than `progress_deadline`.
    pub fn past_deadline(&self) -> bool {
        self.now.saturating_sub(self.d.phase_started_unix_ms)
            > self.d.plan.strategy.progress_deadline.as_millis()
    }

    /// The step's hosts still waiting or preparing (the first five, for the reason).
    fn slow_hosts(&self, step_hosts: &[String]) -> Vec<String> {
        step_hosts
            .iter()
            .filter(|n| {
                self.d
                    .hosts
                    .get(*n)
                    .is_some_and(|h| matches!(h.phase, HostPhase::Preparing | HostPhase::Waiting))
            })
            .take(5)
            .cloned()
            .collect()
    }
}

/// Where an agent keeps the hooks' output, if its slot ran any.
fn hook_log(path: &str) -> Option<String> {
    (!path.is_empty()).then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use cutover_proto::v1::SlotPhase;

    use crate::model::{DeploymentRecord, HostPhase, State};
    use crate::rollout::tests::fixture::{Sim, kinds, phase, v2_over_v1};
    use crate::timeline::{Kind, Timings};

    /// v1 live on `hosts`; v2 (one host at a time, 10 % then 100 %) decided once: the
    /// first host is preparing.
    fn preparing(hosts: &[&str]) -> (Sim, DeploymentRecord) {
        let mut sim = Sim::new(hosts);
        let steps = "steps = [{ traffic = 10, hold = \"5s\" }, { traffic = 100 }]";
        let (start, _) = v2_over_v1(&mut sim, steps);
        let (d, _) = sim.step(&start, 10_000);
        assert_eq!(d.hosts[hosts[0]].phase, HostPhase::Preparing);
        (sim, d)
    }

    #[test]
    fn a_host_turns_ready_with_its_agents_timings_and_the_next_one_starts() {
        let (mut sim, d) = preparing(&["a", "b"]);
        sim.report(&d, "a", SlotPhase::Healthy, "");
        let (d, events) = phase(&sim, &d, 11_000, |m| m.prepare());
        assert_eq!(d.hosts["a"].phase, HostPhase::Ready);
        assert_eq!(d.hosts["b"].phase, HostPhase::Preparing, "max_parallel = 1");
        assert_eq!(d.state, State::Preparing);
        let timings = Timings {
            fetch_ms: 1200,
            unpack_ms: 80,
            start_ms: 900,
            ..Timings::default()
        };
        assert_eq!(
            kinds(&events),
            [Kind::HostReady {
                host: "a".into(),
                timings: Some(timings)
            }]
        );
    }

    #[test]
    fn the_steps_weights_go_out_once_every_host_is_ready() {
        let (mut sim, d) = preparing(&["a"]);
        sim.report(&d, "a", SlotPhase::Healthy, "");
        let (d, events) = phase(&sim, &d, 11_000, |m| m.prepare());
        assert_eq!((d.state, d.traffic), (State::Progressing, 10));
        assert_eq!(d.hosts["a"].weight, 10);
        assert_eq!(d.phase_started_unix_ms, 11_000);
        assert!(events.iter().any(|e| e.kind
            == Kind::StepStarted {
                step: 0,
                traffic: 10
            }));
    }

    #[test]
    fn a_failure_that_rolls_the_fleet_back_is_recorded_with_the_rollback() {
        let (mut sim, mut d) = preparing(&["a", "b"]);
        d.plan.strategy.max_parallel = cutover_shared::plan::Count::Percent(100);
        let (d, _) = sim.step(&d, 10_500);
        sim.report(&d, "a", SlotPhase::Healthy, "");
        sim.report(&d, "b", SlotPhase::Failed, "disk full");
        let (d, events) = phase(&sim, &d, 11_000, |m| m.prepare());
        assert_eq!(d.state, State::RollingBack);
        assert_eq!(d.reason.as_deref(), Some("host b: disk full"));
        assert_eq!(d.hosts["b"].error.as_deref(), Some("disk full"));
        // a was ready for no longer than this decision: set back, it is no news.
        assert_eq!(
            kinds(&events),
            [
                Kind::HostFailed {
                    host: "b".into(),
                    error: "disk full".into()
                },
                Kind::RollbackStarted {
                    reason: "host b: disk full".into(),
                    first_bad_unix_ms: 11_000,
                    decided_unix_ms: 11_000
                }
            ]
        );
    }

    #[test]
    fn a_report_from_before_the_desired_state_was_written_vouches_for_nothing() {
        let (mut sim, d) = preparing(&["a"]);
        sim.report(&d, "a", SlotPhase::Failed, "disk full");
        if let Some(o) = sim.observed.get_mut("a") {
            o.generation -= 1;
        }
        let (d, events) = phase(&sim, &d, 11_000, |m| m.prepare());
        assert_eq!(d.hosts["a"].phase, HostPhase::Preparing);
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn the_progress_deadline_names_the_hosts_still_preparing() {
        let (sim, mut d) = preparing(&["a", "b"]);
        d.plan.strategy.progress_deadline = cutover_shared::Duration::from_secs(60);
        // a turns ready at last; b has only just started.
        let (d, _) = phase(&sim, &d, 10_000 + 60_001, |m| m.prepare());
        assert_eq!(d.state, State::RollingBack);
        assert_eq!(
            d.reason.as_deref(),
            Some("progress deadline 1m passed while preparing hosts b")
        );
    }
}
