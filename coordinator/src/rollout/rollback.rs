//! Rolling back: the one transition that starts a rollback, whatever its cause, and its
//! end once every reachable host confirmed the old release's weights.
//!
//! A rollback is never a walk down the step ladder: in the decision that starts it every
//! touched host is set back to the old slot at full weight.

use cutover_shared::Duration;

use super::machine::{Flow, Machine};
use crate::model::{HostPhase, RollbackTiming, State};

/// Why a deployment rolls back. Each cause reads as the deployment's reason.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Cause {
    /// `cutover abort`.
    Aborted,
    /// A host failed its preparation, and more hosts failed than `max_failed_hosts`
    /// allows (or every host did).
    HostFailed { host: String, error: Option<String> },
    /// The same preparation error on several hosts: the release's fault, which no
    /// tolerance covers.
    ReleaseFault { hosts: Vec<String>, error: String },
    /// The service on a host serving the new release reports an error.
    ServiceError { host: String, error: String },
    /// An agent moved a host's traffic off the new slot by itself.
    Healed {
        host: String,
        healing: String,
        weight: u32,
    },
    /// The new slot turned unhealthy or failed while serving.
    SlotFailing {
        host: String,
        phase: &'static str,
        weight: u32,
        why: String,
    },
    /// Hosts unreachable for `host_lost_after`, with `on_host_lost = "rollback"`.
    HostsLost { hosts: String, after: Duration },
    /// A step's hosts were still preparing at the progress deadline.
    PrepareDeadline {
        deadline: Duration,
        slow: Vec<String>,
    },
    /// A step's weights were not confirmed by every host within the progress deadline.
    SwitchDeadline { deadline: Duration },
    /// No conclusive analysis interval came within the progress deadline after the hold.
    NoConclusiveInterval { deadline: Duration, traffic: u32 },
    /// A database command failed: the reason says which, where and how.
    Database(String),
    /// `failure_limit` analysis intervals failed in a row; the first failed at `since`.
    AnalysisFailed {
        failures: u32,
        traffic: u32,
        why: String,
        since: u64,
    },
}

impl Cause {
    /// The deployment's reason, for people.
    pub fn reason(&self) -> String {
        match self {
            Cause::Aborted => "aborted by operator".into(),
            Cause::HostFailed { host, error } => format!(
                "host {host}: {}",
                error.as_deref().unwrap_or("preparation failed")
            ),
            Cause::ReleaseFault { hosts, error } => format!(
                "hosts {}: {error} (the same failure on {} hosts: a release fault, not a host fault)",
                hosts.join(", "),
                hosts.len()
            ),
            Cause::ServiceError { host, error } => format!("host {host}: {error}"),
            Cause::Healed {
                host,
                healing,
                weight,
            } => format!(
                "host {host}: {healing} while serving {weight}%; the agent moved its traffic back"
            ),
            Cause::SlotFailing {
                host,
                phase,
                weight,
                why,
            } => format!("host {host}: new release {phase} while serving {weight}%: {why}"),
            Cause::HostsLost { hosts, after } => format!(
                "host {hosts} unreachable for more than {after} (on_host_lost = \"rollback\")"
            ),
            Cause::PrepareDeadline { deadline, slow } => format!(
                "progress deadline {deadline} passed while preparing hosts {}",
                slow.join(", ")
            ),
            Cause::SwitchDeadline { deadline } => {
                format!("progress deadline {deadline} passed while switching traffic")
            }
            Cause::NoConclusiveInterval { deadline, traffic } => format!(
                "no conclusive analysis interval within progress deadline {deadline} at {traffic}%"
            ),
            Cause::AnalysisFailed {
                failures,
                traffic,
                why,
                ..
            } => format!("analysis failed {failures} interval(s) in a row at {traffic}%: {why}"),
            Cause::Database(why) => why.clone(),
        }
    }

    /// When the first bad signal came, if before the decision that acts on it.
    fn first_bad(&self) -> Option<u64> {
        match self {
            Cause::AnalysisFailed { since, .. } => Some(*since),
            _ => None,
        }
    }
}

impl Machine<'_, '_> {
    /// Starts the rollback: every touched host goes back to the old slot at full weight
    /// in this decision. The deployment ends `aborted` for an abort, `failed` when no
    /// host had a release before (nothing to go back to), `rolled_back` otherwise.
    pub fn roll_back(&mut self, cause: Cause) {
        let now = self.now;
        let d = &mut self.d;
        let first_release = d
            .hosts
            .values()
            .all(|h| h.old_slot.is_none() && !h.untouched);
        d.ending = Some(match cause {
            Cause::Aborted => State::Aborted,
            _ if first_release => State::Failed,
            _ => State::RolledBack,
        });
        d.reason.get_or_insert_with(|| cause.reason());
        d.rollback.get_or_insert(RollbackTiming {
            first_bad_unix_ms: cause.first_bad().unwrap_or(now).min(now),
            decided_unix_ms: now,
            done_unix_ms: None,
        });
        d.state = State::RollingBack;
        d.pause = None;
        d.phase_started_unix_ms = now;
        d.traffic = 0;
        for (name, h) in d.hosts.iter_mut() {
            if h.untouched || h.phase == HostPhase::Waiting {
                continue;
            }
            h.phase = HostPhase::RolledBack;
            h.weight = 0;
            self.fx.host_set_back(name);
        }
        self.fx.rollback_started();
        debug_assert!(self.d.hosts.values().all(|h| h.weight == 0 || h.untouched));
    }

    /// Ends the rollback once every host it touched confirmed the old weights (a host
    /// that is not reachable converges when it comes back) and, with `[database]`, the
    /// abort has run.
    pub fn finish_rollback(&mut self) {
        let converged = self.d.hosts.iter().all(|(name, h)| {
            h.untouched
                || h.phase == HostPhase::Waiting
                || !self.view(name).connected
                || self.weights_confirmed(name)
        });
        if !converged {
            return;
        }
        let now = self.now;
        if let Some(r) = self.d.rollback.as_mut()
            && r.done_unix_ms.is_none()
        {
            r.done_unix_ms = Some(now);
            self.fx.rollback_done();
        }
        if self.abort_change() == Flow::Stop {
            return;
        }
        let d = &mut self.d;
        d.state = d.ending.take().unwrap_or(State::RolledBack);
        d.ended_unix_ms = Some(now);
        self.fx.ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::desired::changes;
    use crate::rollout::tests::fixture::{SHA1, Sim, holding_v2, kinds, phase, plan};
    use crate::timeline::Kind;

    #[test]
    fn a_rollback_sets_every_touched_host_back_in_one_decision() {
        let mut sim = Sim::new(&["a", "b"]);
        let (d, now) = holding_v2(&mut sim);
        let cause = Cause::SwitchDeadline {
            deadline: Duration::from_secs(60),
        };
        let (d, events) = phase(&sim, &d, now, |m| m.roll_back(cause));
        assert_eq!(
            (d.state, d.ending, d.traffic),
            (State::RollingBack, Some(State::RolledBack), 0)
        );
        assert!(
            d.hosts
                .values()
                .all(|h| h.phase == HostPhase::RolledBack && h.weight == 0)
        );
        for (host, t) in changes(&d, &sim.views()) {
            let old = d.hosts[&host].old_slot.unwrap();
            assert_eq!(t.weight(old), 100, "{host} back on the old release at once");
        }
        assert_eq!(
            kinds(&events),
            [Kind::RollbackStarted {
                reason: "progress deadline 1m passed while switching traffic".into(),
                first_bad_unix_ms: now,
                decided_unix_ms: now
            }]
        );
    }

    #[test]
    fn how_a_rollback_ends_depends_on_its_cause_and_on_what_was_there_before() {
        let sim = Sim::new(&["a"]);
        let first = sim.start(&plan("1", SHA1, ""));
        let (d, _) = phase(&sim, &first, 1, |m| m.roll_back(Cause::Aborted));
        assert_eq!(d.ending, Some(State::Aborted));
        let lost = Cause::HostsLost {
            hosts: "a".into(),
            after: Duration::from_secs(30),
        };
        let (d, _) = phase(&sim, &first, 1, |m| m.roll_back(lost));
        assert_eq!(d.ending, Some(State::Failed), "nothing to go back to");
    }

    #[test]
    fn the_rollback_ends_once_every_reachable_host_confirmed() {
        let mut sim = Sim::new(&["a", "b"]);
        let (d, now) = holding_v2(&mut sim);
        let (d, _) = phase(&sim, &d, now, |m| m.roll_back(Cause::Aborted));
        let (same, events) = phase(&sim, &d, now + 100, |m| m.finish_rollback());
        assert!(
            same == d && events.is_empty(),
            "the old weights are not sent yet"
        );
        sim.apply(changes(&d, &sim.views()));
        sim.converge();
        sim.lost.insert("b".into(), 100);
        sim.observed.get_mut("b").unwrap().generation -= 1;
        let (d, events) = phase(&sim, &d, now + 200, |m| m.finish_rollback());
        assert_eq!(d.state, State::Aborted, "b converges when it comes back");
        assert_eq!(d.rollback.and_then(|r| r.done_unix_ms), Some(now + 200));
        assert_eq!(
            kinds(&events),
            [
                Kind::RollbackDone,
                Kind::Ended {
                    state: "aborted".into(),
                    reason: Some("aborted by operator".into())
                }
            ]
        );
    }
}
