//! Preparing a step: the step's hosts get the new release `max_parallel` at a time,
//! each is watched until its new slot is healthy (ready) or failed, and once every host
//! of the step is ready (or failed within tolerance) the step's weights go out.

use std::collections::BTreeMap;

use cutover_proto::v1::SlotPhase;

use super::machine::Machine;
use super::rollback::Cause;
use crate::model::{HostPhase, State};

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
        if self.all_prepared(&step_hosts) {
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
                SlotPhase::Healthy => h.phase = HostPhase::Ready,
                SlotPhase::Failed => {
                    h.phase = HostPhase::Failed;
                    h.error = Some(if st.error.is_empty() {
                        "slot failed".into()
                    } else {
                        st.error.clone()
                    });
                }
                _ => {}
            }
        }
        let service_error = view.observed.map(|o| o.error.as_str()).unwrap_or_default();
        if h.phase == HostPhase::Preparing && !service_error.is_empty() {
            h.phase = HostPhase::Failed;
            h.error = Some(service_error.to_string());
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
    fn switch_step(&mut self, step_hosts: &[String]) {
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
