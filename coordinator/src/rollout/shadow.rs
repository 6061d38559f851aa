//! The shadow phase, for a plan with `[strategy] shadow`: once every target host is
//! prepared, and before the first traffic step, each host's proxy copies a share of its
//! live requests to the new slot (`verify::mirror`). The new release's answers to the
//! copies are judged against the live answers of the old release every analysis
//! interval, with the plan's metrics and limits; after `duration` and a conclusive
//! passing interval (or `promote`) the first step's weights go out. A failing release
//! rolls back from here having served no client.
//!
//! The deployment is `progressing` meanwhile; its hosts stay `ready` at weight 0. The
//! phase's hold starts once every host answers the desired state that asks it to copy
//! (`step_switched_unix_ms`, as a step's hold does), so pauses stand its clock still.

use std::collections::BTreeMap;

use cutover_proto::v1::SlotPhase;

use super::machine::{Flow, Machine};
use super::rollback::Cause;
use super::verify::mirrors;
use crate::analysis::Counters;
use crate::model::{ShadowPhase, State};

/// Where the shadow phase stands against what it must show before it ends.
#[derive(Debug, PartialEq)]
enum Proof {
    /// Its duration and a conclusive passing interval are done, or it was promoted.
    Done,
    /// Still copying, or waiting for a conclusive interval.
    Waiting,
    /// No conclusive interval came in time.
    Failed(Cause),
}

impl Machine<'_, '_> {
    /// The plan's shadow phase is still ahead: the plan has one, it has not begun, and
    /// some host has a live release whose requests can be copied (a service's first
    /// release has none).
    pub fn shadow_due(&self) -> bool {
        self.d.plan.strategy.shadow.is_some()
            && self.d.shadow == ShadowPhase::None
            && self
                .d
                .hosts
                .values()
                .any(|h| !h.untouched && h.old_slot.is_some())
    }

    /// The hosts copy live requests to the new release now.
    pub fn in_shadow(&self) -> bool {
        self.d.shadow == ShadowPhase::Mirroring
    }

    /// Every target host is prepared: copying begins, before any traffic moves.
    pub fn begin_shadow(&mut self) {
        let d = &mut self.d;
        d.shadow = ShadowPhase::Mirroring;
        d.state = State::Progressing;
        d.phase_started_unix_ms = self.now;
        d.step_switched_unix_ms = None;
        let hosts = d.hosts.values().filter(|h| mirrors(h)).count();
        self.fx.shadow_started(hosts);
    }

    /// The shadow phase while the deployment progresses: the new slots' health, the
    /// copies confirmed, the intervals judged, and the end of the phase.
    pub fn run_shadow(&mut self) {
        if let Some(cause) = self.shadow_symptom() {
            return self.roll_back(cause);
        }
        if self.begin_shadow_hold() == Flow::Stop {
            return;
        }
        let Some(held) = self.d.held_ms(self.now) else {
            return;
        };
        if self.run_interval() == Flow::Stop {
            return;
        }
        match self.shadow_proof(held) {
            Proof::Done if !self.mirroring_host_silent() => self.end_shadow(),
            Proof::Done | Proof::Waiting => {}
            Proof::Failed(cause) => self.roll_back(cause),
        }
    }

    /// A new slot that fails or turns unhealthy while it answers copies, or a service
    /// error on a copying host: the release is not fit to serve anyone.
    fn shadow_symptom(&self) -> Option<Cause> {
        self.d
            .hosts
            .iter()
            .filter(|(_, h)| mirrors(h))
            .find_map(|(name, h)| {
                let view = self.view(name);
                if let Some(o) = view.observed
                    && !o.error.is_empty()
                    && view.is_current()
                {
                    let (host, error) = (name.clone(), o.error.clone());
                    return Some(Cause::ServiceError { host, error });
                }
                let st = view.new_status(h)?;
                let phase = SlotPhase::of(st.phase);
                let failing = matches!(phase, SlotPhase::Unhealthy | SlotPhase::Failed);
                (st.release == self.d.release && failing).then(|| Cause::ShadowSlotFailing {
                    host: name.clone(),
                    phase: phase.name(),
                    why: if st.error.is_empty() {
                        phase.name().to_string()
                    } else {
                        st.error.clone()
                    },
                })
            })
    }

    /// Begins the phase's hold once every copying host answers the desired state that
    /// asks it to copy; rolls back when that takes longer than the progress deadline.
    fn begin_shadow_hold(&mut self) -> Flow {
        if self.d.step_switched_unix_ms.is_some() {
            return Flow::Next;
        }
        let copying: Vec<String> = self
            .d
            .hosts
            .iter()
            .filter(|(_, h)| mirrors(h))
            .map(|(name, _)| name.clone())
            .collect();
        if copying.iter().all(|name| self.answers(name)) {
            self.start_hold_clock();
            self.fx.shadow_holding();
        } else if self.past_deadline() {
            let deadline = self.d.plan.strategy.progress_deadline;
            self.roll_back(Cause::ShadowDeadline { deadline });
            return Flow::Stop;
        }
        Flow::Next
    }

    /// Whether the phase has shown enough after `held` ms: its duration and, with
    /// `[analysis]`, a conclusive passing interval — unless promoted.
    fn shadow_proof(&self, held: u64) -> Proof {
        if self.d.promoted {
            return Proof::Done;
        }
        let Some(shadow) = &self.d.plan.strategy.shadow else {
            return Proof::Done;
        };
        let wait = shadow.duration.as_millis();
        if held < wait {
            return Proof::Waiting;
        }
        if self.d.plan.analysis.is_none() || self.d.analysis.passes_in_step > 0 {
            return Proof::Done;
        }
        let deadline = self.d.plan.strategy.progress_deadline;
        if held > wait + deadline.as_millis() {
            return Proof::Failed(Cause::NoConclusiveShadowInterval { deadline });
        }
        Proof::Waiting
    }

    /// A copying host is not reachable now: it cannot vouch for the release.
    fn mirroring_host_silent(&self) -> bool {
        self.d
            .hosts
            .iter()
            .any(|(name, h)| mirrors(h) && !self.view(name).connected)
    }

    /// The phase passed: copying stops and the first step's weights go out.
    fn end_shadow(&mut self) {
        self.d.shadow = ShadowPhase::Done;
        self.d.promoted = false;
        self.fx.shadow_ended();
        let step_hosts = self.step_hosts();
        self.switch_step(&step_hosts);
    }
}

impl Machine<'_, '_> {
    /// Counters now of each copying host: (the new slot's answers to copies, the old
    /// slot's live answers).
    pub(super) fn shadow_counters(&self) -> BTreeMap<String, (Counters, Counters)> {
        let mut out = BTreeMap::new();
        for (name, h) in self.d.hosts.iter().filter(|(_, h)| mirrors(h)) {
            let Some(o) = self.view(name).observed else {
                continue;
            };
            let copies = o
                .slot(h.new_slot)
                .and_then(|st| st.shadow.as_ref())
                .map(Counters::from_pb)
                .unwrap_or_default();
            let live = h
                .old_slot
                .and_then(|s| o.slot(s))
                .and_then(|st| st.metrics.as_ref())
                .map(Counters::from_pb)
                .unwrap_or_default();
            out.insert(name.clone(), (copies, live));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use cutover_proto::v1::{SlotMetrics, SlotPhase};

    use super::*;
    use crate::model::{DeploymentRecord, HostPhase};
    use crate::rollout::tests::fixture::{SHA1, SHA2, Sim, kinds, order, plan, run_until};
    use crate::rollout::{Command, decide};
    use crate::timeline::Kind;

    /// v1 live on a, b and c; then v2 whose first step is a one-host wave at 10 %, after
    /// a 5 s shadow phase, with `analysis` (a `[analysis]` section or nothing).
    fn v2_with_shadow(sim: &mut Sim, analysis: &str) -> (DeploymentRecord, u64) {
        let (_, now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
        let strategy = format!(
            "shadow = {{ duration = \"5s\", share = 50, methods = [\"GET\"] }}\nsteps = [{{ traffic = 10, hosts = 1, hold = \"1s\" }}, {{ traffic = 100 }}]\n{analysis}"
        );
        (sim.start(&plan("2", SHA2, &strategy)), now)
    }

    /// Every copying host's new slot answered `copies` copies so far, `errors` of them
    /// with a 5xx and `matched` with the live answer's status class; its old slot
    /// answered 10 times as many live requests, all well.
    fn answered(sim: &mut Sim, d: &DeploymentRecord, copies: u64, errors: u64, matched: u64) {
        for (name, h) in &d.hosts {
            let o = sim.observed.get_mut(name).expect("a host");
            let new = match h.new_slot {
                crate::model::Slot::Blue => o.blue.as_mut(),
                crate::model::Slot::Green => o.green.as_mut(),
            };
            if let Some(st) = new {
                st.shadow = Some(SlotMetrics {
                    requests: copies,
                    responses_5xx: errors,
                    status_compared: copies,
                    status_matched: matched,
                    ..Default::default()
                });
            }
            let old = match h.old_slot {
                Some(crate::model::Slot::Blue) => o.blue.as_mut(),
                Some(crate::model::Slot::Green) => o.green.as_mut(),
                None => None,
            };
            if let Some(st) = old {
                st.metrics = Some(SlotMetrics {
                    requests: copies * 10,
                    ..Default::default()
                });
            }
        }
    }

    const JUDGED: &str = "[analysis]\ninterval = \"1s\"\nfailure_limit = 2\nmin_requests = 10\n[[analysis.metric]]\nname = \"error_rate\"\nmax = 0.05\n[[analysis.metric]]\nname = \"status_match\"\nmin = 0.99\n";

    #[test]
    fn every_host_is_prepared_and_copies_before_any_traffic_moves() {
        let mut sim = Sim::new(&["a", "b", "c"]);
        let (dep, now) = v2_with_shadow(&mut sim, "");
        let (d, now) = run_until(&mut sim, dep, now, |d| d.shadow == ShadowPhase::Mirroring);
        assert_eq!(d.state, State::Progressing);
        assert!(
            d.hosts
                .values()
                .all(|h| h.phase == HostPhase::Ready && h.weight == 0),
            "the one-host first step waits: every host prepared, none serving: {:?}",
            d.hosts
        );
        for (name, h) in &d.hosts {
            let want = &sim.desired[name];
            let copy = want.shadow.as_ref().expect("copies asked for");
            assert_eq!(copy.slot, h.new_slot.as_str());
            assert_eq!(
                (copy.share, copy.methods.as_slice()),
                (50, &["GET".into()][..])
            );
            assert_eq!(want.weight(h.new_slot), 0, "{name} serves nobody from v2");
            assert_eq!(
                (want.deployment.as_str(), want.host.as_str()),
                ("d-1", name.as_str())
            );
        }
        // The hold of the phase begins once every host answers, and ends after 5 s.
        let (d, events) = sim.step(&d, now);
        assert_eq!(d.step_switched_unix_ms, Some(now));
        assert_eq!(kinds(&events), [Kind::ShadowHolding]);
        let (same, events) = sim.step(&d, now + 4_999);
        assert!(same == d && events.is_empty(), "{events:?}");
        let (d, events) = sim.step(&d, now + 5_000);
        assert_eq!(
            (d.shadow, d.state, d.traffic),
            (ShadowPhase::Done, State::Progressing, 10)
        );
        assert_eq!(
            kinds(&events),
            [
                Kind::ShadowEnded,
                Kind::StepStarted {
                    step: 0,
                    traffic: 10
                }
            ]
        );
        assert_eq!(d.hosts["a"].weight, 10);
        assert_eq!(
            (d.hosts["b"].weight, d.hosts["b"].phase),
            (0, HostPhase::Ready)
        );
        assert!(
            sim.desired.values().all(|t| t.shadow.is_none()),
            "copying stopped"
        );
        let (d, _) = sim.run(d, now + 5_000, 100, 100);
        assert_eq!(d.state, State::Succeeded);
        assert!(
            ["a", "b", "c"]
                .iter()
                .all(|h| sim.live(h).as_deref() == Some("2"))
        );
    }

    #[test]
    fn a_release_failing_its_shadow_analysis_rolls_back_having_served_no_client() {
        let mut sim = Sim::new(&["a", "b"]);
        let (dep, now) = v2_with_shadow(&mut sim, JUDGED);
        let (mut d, mut now) = run_until(&mut sim, dep, now, |d| d.step_switched_unix_ms.is_some());
        let mut served = 0;
        // Half the copies answered with another status class than the live slot.
        for (i, copies) in [100u64, 200, 300, 400].into_iter().enumerate() {
            answered(&mut sim, &d, copies, 0, copies / 2);
            let out = decide(&d, &sim.views(), None, now + i as u64 * 1_000);
            served += out
                .targets
                .iter()
                .filter(|(h, t)| t.weight(d.hosts[*h].new_slot) > 0)
                .count();
            sim.apply(out.targets);
            d = out.deployment;
            if d.state == State::RollingBack {
                now += i as u64 * 1_000;
                break;
            }
        }
        assert_eq!(served, 0, "no host ever gave v2 a client request");
        assert_eq!(d.state, State::RollingBack);
        assert_eq!(
            d.reason.as_deref(),
            Some(
                "analysis of shadow traffic failed 2 interval(s) in a row: status_match 50.00% below min 99.00% (no client was served by the new release)"
            )
        );
        assert!(
            d.analysis
                .intervals
                .iter()
                .all(|i| i.shadow && i.traffic == 0)
        );
        sim.converge();
        let (d, _) = sim.run(d, now, 100, 20);
        assert_eq!(d.state, State::RolledBack);
        assert!(sim.desired.values().all(|t| t.shadow.is_none()));
        assert_eq!(sim.live("a").as_deref(), Some("1"));
    }

    /// Every copying host's new slot reports scrape `seq`, with `failed` of `total`
    /// payments counted so far.
    fn payments(sim: &mut Sim, d: &DeploymentRecord, seq: u64, failed: f64, total: f64) {
        use cutover_proto::v1::{SeriesValue, SlotScrape};
        for (name, h) in &d.hosts {
            let o = sim.observed.get_mut(name).expect("a host");
            let new = match h.new_slot {
                crate::model::Slot::Blue => o.blue.as_mut(),
                crate::model::Slot::Green => o.green.as_mut(),
            };
            let v = |key: &str, sum| SeriesValue {
                key: key.into(),
                found: true,
                sum,
                ..Default::default()
            };
            new.expect("the new slot").scrape = Some(SlotScrape {
                seq,
                error: String::new(),
                values: vec![v("failed_total{}", failed), v("payments_total{}", total)],
            });
        }
    }

    #[test]
    fn the_slots_own_metrics_judge_the_copies_too() {
        let mut sim = Sim::new(&["a", "b"]);
        let slot_metric = "[analysis]\ninterval = \"1s\"\nfailure_limit = 1\nmin_requests = 0\n[[analysis.metric]]\nname = \"payment failure rate\"\nsource = \"slot\"\nratio = [\"failed_total\", \"payments_total\"]\nmax = 0.05\n";
        let (dep, now) = v2_with_shadow(&mut sim, slot_metric);
        let (d, now) = run_until(&mut sim, dep, now, |d| d.step_switched_unix_ms.is_some());
        assert!(
            sim.desired.values().all(|t| t.scrape.is_some()),
            "the hosts scrape their slots while copies are judged"
        );
        payments(&mut sim, &d, 1, 0.0, 0.0);
        let (d, _) = phase_at(&sim, &d, now + 1_000);
        assert_eq!(d.analysis.scrapes.len(), 2, "both copying hosts' scrapes");
        // A third of the copies' payments failed.
        payments(&mut sim, &d, 2, 30.0, 90.0);
        let (d, _) = phase_at(&sim, &d, now + 2_000);
        assert_eq!(d.state, State::RollingBack);
        let i = d.analysis.intervals.last().expect("an interval");
        assert!(i.shadow && i.traffic == 0, "{i:?}");
        assert_eq!(
            d.reason.as_deref(),
            Some(
                "analysis of shadow traffic failed 1 interval(s) in a row: payment failure rate 0.3333 above max 0.05 (no client was served by the new release)"
            )
        );
    }

    #[test]
    fn the_phase_ends_after_its_duration_and_a_passing_interval_of_copies() {
        let mut sim = Sim::new(&["a", "b"]);
        let (dep, now) = v2_with_shadow(&mut sim, JUDGED);
        let (d, now) = run_until(&mut sim, dep, now, |d| d.step_switched_unix_ms.is_some());
        answered(&mut sim, &d, 0, 0, 0);
        let (d, _) = phase_at(&sim, &d, now);
        answered(&mut sim, &d, 4, 0, 4);
        let (d, _) = phase_at(&sim, &d, now + 5_000);
        assert_eq!(d.shadow, ShadowPhase::Mirroring, "8 copies: inconclusive");
        answered(&mut sim, &d, 200, 1, 199);
        let (d, events) = phase_at(&sim, &d, now + 6_000);
        assert_eq!((d.shadow, d.traffic), (ShadowPhase::Done, 10));
        let k = kinds(&events);
        assert!(
            matches!(&k[..], [Kind::Interval { shadow: true, verdict, .. }, Kind::ShadowEnded, Kind::StepStarted { .. }] if verdict == "pass"),
            "{k:?}"
        );
        // The first step's own hold counts afresh.
        assert_eq!(d.step_switched_unix_ms, None);
        assert_eq!(d.analysis.passes_in_step, 1);
    }

    fn phase_at(
        sim: &Sim,
        d: &DeploymentRecord,
        now: u64,
    ) -> (DeploymentRecord, Vec<crate::timeline::Event>) {
        crate::rollout::tests::fixture::phase(sim, d, now, |m| m.run_shadow())
    }

    #[test]
    fn a_new_slot_failing_during_shadow_rolls_back_and_promote_skips_the_rest() {
        let mut sim = Sim::new(&["a", "b"]);
        let (dep, now) = v2_with_shadow(&mut sim, "");
        let (d, now) = run_until(&mut sim, dep, now, |d| d.step_switched_unix_ms.is_some());
        sim.report(
            &d,
            "b",
            SlotPhase::Failed,
            "process exited (exit status: 3)",
        );
        let (failed, _) = phase_at(&sim, &d, now + 100);
        assert_eq!(
            failed.reason.as_deref(),
            Some(
                "host b: new release failed during shadow traffic: process exited (exit status: 3) (no client was served by it)"
            )
        );
        sim.converge();
        let promoted = decide(&d, &sim.views(), order(Command::Promote), now + 100);
        assert_eq!(promoted.deployment.shadow, ShadowPhase::Done);
        assert_eq!(promoted.deployment.traffic, 10);
        assert!(
            !promoted.deployment.promoted,
            "the first step holds as planned"
        );
    }

    #[test]
    fn a_pause_stands_the_phases_clock_still_and_copies_go_on() {
        let mut sim = Sim::new(&["a", "b"]);
        let (dep, now) = v2_with_shadow(&mut sim, "");
        let (d, _) = run_until(&mut sim, dep, now, |d| d.step_switched_unix_ms.is_some());
        let now = d.step_switched_unix_ms.expect("holding");
        let paused = decide(&d, &sim.views(), order(Command::Pause), now + 1_000);
        assert!(paused.targets.is_empty(), "still copying while paused");
        let d = paused.deployment;
        let resumed = decide(&d, &sim.views(), order(Command::Resume), now + 61_000);
        let d = resumed.deployment;
        assert_eq!(d.shadow, ShadowPhase::Mirroring);
        let (d, _) = sim.step(&d, now + 64_999);
        assert_eq!(d.shadow, ShadowPhase::Mirroring, "4 s copied of 5");
        let (d, _) = sim.step(&d, now + 65_000);
        assert_eq!(d.shadow, ShadowPhase::Done);
    }

    #[test]
    fn a_first_release_has_nothing_to_copy_and_skips_the_phase() {
        let mut sim = Sim::new(&["a"]);
        let p = plan("1", SHA1, "shadow = { duration = \"5s\" }");
        let (d, _) = sim.run(sim.start(&p), 0, 100, 50);
        assert_eq!((d.state, d.shadow), (State::Succeeded, ShadowPhase::None));
    }
}
