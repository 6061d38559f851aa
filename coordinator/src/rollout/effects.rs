//! What a decision records: the timeline events the transitions make, collected as they
//! make them, and laid out in one decision's order when it ends.
//!
//! A decision is one instant, and the timeline keeps what it came to: the news of each
//! host is what the host ended the decision as (ready, failed or lost — a host set back
//! by the rollback its own failure began still records that failure), and one step start
//! and one hold at most are recorded, for the step the decision ends on. Database
//! commands are recorded as they start, end or stall.

use std::collections::BTreeMap;

use crate::model::{DeploymentRecord, IntervalRecord, State};
use crate::timeline::{Event, Kind, Timings};

/// What happened to one host in this decision that its timeline records.
#[derive(Clone, Debug, PartialEq)]
enum HostNews {
    /// It was started in this decision: a new slot found healthy at once was already
    /// warm, not prepared, and its readiness is no news.
    Started,
    /// Its new slot turned healthy, with the agent's own timings.
    Ready(Timings),
    /// Its preparation failed.
    Failed(String),
    /// It was unreachable too long and set aside.
    Lost,
}

/// The events of one decision in the making.
#[derive(Debug)]
pub(super) struct Effects {
    /// The decision's instant: every event's time but an interval's.
    now: u64,
    /// The state the deployment was in when the decision began.
    began: State,
    /// Preparation phases the preparing hosts reported, and the operator's command, in
    /// the order they came: they open the decision's events.
    opening: Vec<Event>,
    /// Each host's news, by host name.
    hosts: BTreeMap<String, HostNews>,
    /// The step's weights went out for a step that preparing made ready.
    step_switched: bool,
    /// The deployment moved on to its next step.
    advanced: bool,
    /// The hold of the step the deployment is on began.
    hold_began: bool,
    /// Intervals judged, in order.
    intervals: Vec<Event>,
    /// The deployment paused.
    paused: bool,
    /// The rollback began.
    rollback_started: bool,
    /// The rollback was confirmed by every host.
    rollback_done: bool,
    /// The deployment reached its end.
    ended: bool,
    /// Database commands started, ended or stalled before any rollback began, in order.
    database: Vec<Event>,
    /// The same once the rollback began (an abort): they come after it is confirmed.
    database_late: Vec<Event>,
}

impl Effects {
    pub fn new(began: State, now: u64) -> Effects {
        Effects {
            now,
            began,
            opening: Vec::new(),
            hosts: BTreeMap::new(),
            step_switched: false,
            advanced: false,
            hold_began: false,
            intervals: Vec::new(),
            paused: false,
            rollback_started: false,
            rollback_done: false,
            ended: false,
            database: Vec::new(),
            database_late: Vec::new(),
        }
    }

    fn event(&self, kind: Kind) -> Event {
        Event {
            at_unix_ms: self.now,
            kind,
        }
    }

    /// A preparing host's new slot entered a phase.
    pub fn host_phase(&mut self, host: &str, phase: &str) {
        let host = host.to_string();
        let phase = phase.to_string();
        let e = self.event(Kind::HostPhase { host, phase });
        self.opening.push(e);
    }

    /// The operator's command, and who gave it.
    pub fn command(&mut self, command: &str, actor: &str) {
        let command = command.to_string();
        let actor = actor.to_string();
        let e = self.event(Kind::Command { command, actor });
        self.opening.push(e);
    }

    pub fn host_started(&mut self, host: &str) {
        self.hosts.insert(host.to_string(), HostNews::Started);
    }

    pub fn host_ready(&mut self, host: &str, timings: Timings) {
        if self.hosts.get(host) != Some(&HostNews::Started) {
            self.hosts
                .insert(host.to_string(), HostNews::Ready(timings));
        }
    }

    pub fn host_failed(&mut self, host: &str, error: &str) {
        self.hosts
            .insert(host.to_string(), HostNews::Failed(error.to_string()));
    }

    pub fn host_lost(&mut self, host: &str) {
        self.hosts.insert(host.to_string(), HostNews::Lost);
    }

    /// The host's weights were confirmed, or it was told to follow the fleet: being
    /// ready or lost is no longer what it ended as.
    pub fn host_switched(&mut self, host: &str) {
        self.hosts.remove(host);
    }

    /// The rollback set the host back: only a failure found in this decision stays
    /// news (the rollback it began says why).
    pub fn host_set_back(&mut self, host: &str) {
        if !matches!(self.hosts.get(host), Some(HostNews::Failed(_))) {
            self.hosts.remove(host);
        }
    }

    pub fn step_switched(&mut self) {
        self.step_switched = true;
    }

    pub fn advanced(&mut self) {
        self.advanced = true;
        self.hold_began = false;
    }

    pub fn hold_began(&mut self) {
        self.hold_began = true;
    }

    pub fn interval(&mut self, i: &IntervalRecord) {
        self.intervals.push(Event::interval(i));
    }

    pub fn paused(&mut self) {
        self.paused = true;
    }

    pub fn rollback_started(&mut self) {
        self.rollback_started = true;
    }

    pub fn rollback_done(&mut self) {
        self.rollback_done = true;
    }

    pub fn ended(&mut self) {
        self.ended = true;
    }

    /// A database command started, ended or stalled, or the wait for an earlier
    /// change began or ended.
    pub fn database(&mut self, kind: Kind) {
        let e = self.event(kind);
        if self.rollback_started || self.began == State::RollingBack {
            self.database_late.push(e);
        } else {
            self.database.push(e);
        }
    }

    /// The decision's events, in their order, for the record `d` it came to: what hosts
    /// reported and the command, database commands, host news by host, the step
    /// started, its hold, intervals, the pause, the rollback (with the abort's database
    /// events once it is confirmed) and the end.
    pub fn finish(self, d: &DeploymentRecord) -> Vec<Event> {
        let mut out = self.opening.clone();
        out.extend(self.database.iter().cloned());
        for (host, news) in &self.hosts {
            if let Some(kind) = host_event(host, news) {
                out.push(self.event(kind));
            }
        }
        if self.records_step_start(d.state) {
            let step = d.step;
            let traffic = d
                .plan
                .strategy
                .steps
                .get(step as usize)
                .map_or(d.traffic, |s| s.traffic);
            out.push(self.event(Kind::StepStarted { step, traffic }));
        }
        if self.hold_began {
            let (step, traffic) = (d.step, d.traffic);
            out.push(self.event(Kind::StepHolding { step, traffic }));
        }
        out.extend(self.intervals.iter().cloned());
        out.extend(self.closing(d));
        out
    }

    /// A step start is recorded once, for the step the decision ends on, when its
    /// weights go out with it: the decision moved to a new step that stands at its end
    /// (progressing, paused or succeeded), or it took the deployment from preparing into
    /// progressing. A deployment resumed into its step's switch in the same decision
    /// records none (the timeline has always read so).
    fn records_step_start(&self, end: State) -> bool {
        let stands = matches!(end, State::Progressing | State::Paused | State::Succeeded);
        stands
            && (self.advanced
                || (self.step_switched && end == State::Progressing && self.began != State::Paused))
    }

    /// The pause (only when the decision began unpaused), the rollback and the end.
    fn closing(&self, d: &DeploymentRecord) -> Vec<Event> {
        let mut out = Vec::new();
        if self.paused && d.state == State::Paused && self.began != State::Paused {
            let reason = d.reason.clone();
            out.push(self.event(Kind::Paused { reason }));
        }
        if self.rollback_started
            && let Some(r) = &d.rollback
        {
            out.push(self.event(Kind::RollbackStarted {
                reason: d.reason.clone().unwrap_or_default(),
                first_bad_unix_ms: r.first_bad_unix_ms,
                decided_unix_ms: r.decided_unix_ms,
            }));
        }
        if self.rollback_done {
            out.push(self.event(Kind::RollbackDone));
        }
        out.extend(self.database_late.iter().cloned());
        if self.ended {
            let state = d.state.as_str().to_string();
            let reason = d.reason.clone();
            out.push(self.event(Kind::Ended { state, reason }));
        }
        out
    }
}

/// The timeline event for a host's news, if it is one.
fn host_event(host: &str, news: &HostNews) -> Option<Kind> {
    let host = host.to_string();
    match news {
        HostNews::Started => None,
        HostNews::Ready(t) => Some(Kind::HostReady {
            host,
            timings: Some(*t),
        }),
        HostNews::Failed(error) => Some(Kind::HostFailed {
            host,
            error: error.clone(),
        }),
        HostNews::Lost => Some(Kind::HostLost { host }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::tests::fixture::{deployment, kinds};

    fn timings() -> Timings {
        Timings {
            fetch_ms: 1,
            unpack_ms: 2,
            start_ms: 3,
        }
    }

    #[test]
    fn a_hosts_news_is_what_it_ended_the_decision_as() {
        let mut d = deployment();
        d.state = State::RollingBack;
        let mut fx = Effects::new(State::Preparing, 9);
        fx.host_ready("c", timings());
        fx.host_set_back("c");
        fx.host_failed("b", "disk full");
        fx.host_set_back("b");
        fx.host_lost("d");
        fx.host_switched("d");
        fx.host_started("e");
        fx.host_ready("e", timings());
        fx.host_ready("a", timings());
        fx.command("abort", "ana");
        assert_eq!(
            kinds(&fx.finish(&d)),
            [
                Kind::Command {
                    command: "abort".into(),
                    actor: "ana".into()
                },
                Kind::HostReady {
                    host: "a".into(),
                    timings: Some(timings())
                },
                Kind::HostFailed {
                    host: "b".into(),
                    error: "disk full".into()
                },
            ]
        );
    }

    #[test]
    fn one_step_start_is_recorded_for_the_step_the_decision_ends_on() {
        let mut d = deployment();
        d.state = State::Progressing;
        d.step = 1;
        let mut fx = Effects::new(State::Progressing, 9);
        fx.advanced();
        fx.step_switched();
        fx.advanced();
        assert_eq!(
            kinds(&fx.finish(&d)),
            [Kind::StepStarted {
                step: 1,
                traffic: 100
            }]
        );
        // The weights never went out: rolled back in the same decision.
        let mut fx = Effects::new(State::Preparing, 9);
        fx.step_switched();
        d.state = State::RollingBack;
        assert!(fx.finish(&d).is_empty());
        // Kept as the timeline always had it: resumed into the step's switch.
        let mut fx = Effects::new(State::Paused, 9);
        fx.step_switched();
        d.state = State::Progressing;
        assert!(fx.finish(&d).is_empty());
    }

    #[test]
    fn a_pause_is_news_when_the_decision_began_unpaused() {
        let mut d = deployment();
        d.state = State::Paused;
        d.reason = Some("paused: host b unreachable".into());
        let mut fx = Effects::new(State::Progressing, 9);
        fx.paused();
        let reason = d.reason.clone();
        assert_eq!(kinds(&fx.finish(&d)), [Kind::Paused { reason }]);
        let mut fx = Effects::new(State::Paused, 9);
        fx.paused();
        assert!(fx.finish(&d).is_empty(), "resumed and paused again at once");
    }
}
