//! Analysis of one interval: the counters of the hosts that serve the new release next
//! to the old one are snapshotted when the interval starts, and once `interval` has
//! passed their deltas are judged (see [`crate::analysis`]). `failure_limit` failing
//! intervals in a row roll the deployment back.

use std::collections::BTreeMap;

use super::machine::{Flow, Machine};
use super::rollback::Cause;
use crate::analysis::{self, Counters, Sample, Verdict};
use crate::model::{HostPhase, IntervalRecord, Slot};

/// Newest intervals kept in a deployment record.
const KEEP_INTERVALS: usize = 500;

impl Machine<'_, '_> {
    /// Judges the interval that is due, if any (starting the first one). Stops the round
    /// when its verdict rolled the deployment back.
    pub fn run_interval(&mut self) -> Flow {
        let Some(plan) = self.d.plan.analysis.clone() else {
            return Flow::Next;
        };
        let current = self.counters();
        let scrapes = self.scrapes();
        let Some(started) = self.d.analysis.interval_started_unix_ms else {
            self.d.analysis.interval_started_unix_ms = Some(self.now);
            self.d.analysis.snapshot = current;
            self.d.analysis.scrapes = scrapes;
            return Flow::Next;
        };
        if self.now.saturating_sub(started) < plan.interval.as_millis() {
            return Flow::Next;
        }
        let mut sample = self.sample(started, &current);
        sample.readings = self.readings(started, &scrapes, sample.seconds);
        let (verdict, metrics) = analysis::judge(&plan, &sample);
        self.record_interval(started, &sample, verdict.clone(), metrics);
        self.d.analysis.snapshot = current;
        self.d.analysis.scrapes = scrapes;
        if let Verdict::Inconclusive(why) = &verdict {
            return self.inconclusive(why, plan.inconclusive_limit);
        }
        let a = &mut self.d.analysis;
        a.consecutive_inconclusive = 0;
        match verdict {
            Verdict::Pass => {
                a.consecutive_failures = 0;
                a.first_failure_unix_ms = None;
                a.passes_in_step += 1;
            }
            Verdict::Inconclusive(_) => {}
            Verdict::Fail(why) => {
                a.consecutive_failures += 1;
                let since = *a.first_failure_unix_ms.get_or_insert(self.now);
                if a.consecutive_failures >= plan.failure_limit {
                    let failures = a.consecutive_failures;
                    let traffic = self.d.traffic;
                    self.forget_inconclusive_pause();
                    self.roll_back(Cause::AnalysisFailed {
                        failures,
                        traffic,
                        why,
                        since,
                    });
                    return Flow::Stop;
                }
            }
        }
        Flow::Next
    }

    /// Counters now of each host that serves the new release next to the old one:
    /// (new slot, old slot).
    fn counters(&self) -> BTreeMap<String, (Counters, Counters)> {
        let mut out = BTreeMap::new();
        for (name, h) in &self.d.hosts {
            if h.untouched || h.phase != HostPhase::Switched || h.weight == 0 {
                continue;
            }
            let Some(o) = self.view(name).observed else {
                continue;
            };
            let of = |s: Option<Slot>| {
                s.and_then(|s| o.slot(s))
                    .and_then(|st| st.metrics.as_ref())
                    .map(Counters::from_pb)
                    .unwrap_or_default()
            };
            out.insert(name.clone(), (of(Some(h.new_slot)), of(h.old_slot)));
        }
        out
    }

    /// What each side served since the interval started, summed over the hosts.
    fn sample(&self, started: u64, current: &BTreeMap<String, (Counters, Counters)>) -> Sample {
        let mut sample = Sample {
            seconds: self.now.saturating_sub(started) as f64 / 1000.0,
            ..Sample::default()
        };
        for (name, (new, old)) in current {
            let (snap_new, snap_old) = self
                .d
                .analysis
                .snapshot
                .get(name)
                .cloned()
                .unwrap_or_default();
            sample.new.add(&new.since(&snap_new));
            sample.old.add(&old.since(&snap_old));
        }
        sample
    }

    /// Keeps the judged interval in the record (the newest [`KEEP_INTERVALS`]) and
    /// starts the next one now.
    fn record_interval(
        &mut self,
        started: u64,
        sample: &Sample,
        verdict: Verdict,
        metrics: Vec<analysis::MetricResult>,
    ) {
        let record = IntervalRecord {
            step: self.d.step,
            traffic: self.d.traffic,
            started_unix_ms: started,
            ended_unix_ms: self.now,
            new_requests: sample.new.requests,
            old_requests: sample.old.requests,
            verdict,
            metrics,
        };
        self.fx.interval(&record);
        let a = &mut self.d.analysis;
        a.interval_started_unix_ms = Some(self.now);
        a.intervals.push(record);
        if a.intervals.len() > KEEP_INTERVALS {
            let extra = a.intervals.len() - KEEP_INTERVALS;
            a.intervals.drain(..extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use cutover_proto::v1::SlotMetrics;
    use cutover_shared::Duration;
    use cutover_shared::plan::{Analysis, Metric, MetricName};

    use super::*;
    use crate::model::{DeploymentRecord, State};
    use crate::rollout::tests::fixture::{Sim, holding_v2, phase};
    use crate::timeline::{Event, Kind};

    /// v2 holding at 10 % on a and b with an error-rate bound judged every 10 s.
    fn judged(failure_limit: u32) -> (Sim, DeploymentRecord, u64) {
        let mut sim = Sim::new(&["a", "b"]);
        let (mut d, now) = holding_v2(&mut sim);
        d.plan.analysis = Some(Analysis {
            interval: Duration::from_secs(10),
            failure_limit,
            min_requests: 10,
            inconclusive_limit: 3,
            scrape: None,
            prometheus: None,
            metric: vec![Metric {
                max: Some(0.05),
                ..Metric::proxy(MetricName::ErrorRate)
            }],
        });
        (sim, d, now)
    }

    /// Every host's new slot has served `requests`, `errors` of them failed.
    fn served(sim: &mut Sim, d: &DeploymentRecord, requests: u64, errors: u64) {
        for (name, h) in &d.hosts {
            let o = sim.observed.get_mut(name).unwrap();
            let st = match h.new_slot {
                Slot::Blue => o.blue.as_mut(),
                Slot::Green => o.green.as_mut(),
            };
            st.unwrap().metrics = Some(SlotMetrics {
                requests,
                responses_5xx: errors,
                ..Default::default()
            });
        }
    }

    #[test]
    fn an_interval_is_judged_once_it_has_run_and_recorded_at_its_end() {
        let (mut sim, d, now) = judged(1);
        served(&mut sim, &d, 100, 0);
        let (d, events) = phase(&sim, &d, now, |m| assert_eq!(m.run_interval(), Flow::Next));
        assert_eq!(d.analysis.interval_started_unix_ms, Some(now));
        assert_eq!(d.analysis.snapshot["a"].0.requests, 100);
        assert!(events.is_empty());
        served(&mut sim, &d, 300, 1);
        let (same, _) = phase(&sim, &d, now + 9_999, |m| m.run_interval());
        assert_eq!(same, d, "not due yet");
        let (d, events) = phase(&sim, &d, now + 10_000, |m| m.run_interval());
        let i = &d.analysis.intervals[0];
        assert_eq!((i.new_requests, i.verdict.clone()), (400, Verdict::Pass));
        assert_eq!(d.analysis.passes_in_step, 1);
        assert_eq!(d.analysis.interval_started_unix_ms, Some(now + 10_000));
        assert_eq!(events, [Event::interval(i)]);
        assert_eq!(events[0].at_unix_ms, now + 10_000);
    }

    #[test]
    fn failing_intervals_in_a_row_roll_back_from_the_first_bad_one() {
        let (mut sim, d, now) = judged(2);
        served(&mut sim, &d, 100, 0);
        let (d, _) = phase(&sim, &d, now, |m| m.run_interval());
        served(&mut sim, &d, 200, 50);
        let (d, _) = phase(&sim, &d, now + 10_000, |m| m.run_interval());
        assert_eq!(d.analysis.consecutive_failures, 1);
        assert_eq!(d.state, State::Progressing, "one failure of two allowed");
        served(&mut sim, &d, 300, 100);
        let mut flow = Flow::Next;
        let (d, events) = phase(&sim, &d, now + 20_000, |m| flow = m.run_interval());
        assert_eq!((flow, d.state), (Flow::Stop, State::RollingBack));
        let r = d.rollback.clone().unwrap();
        assert_eq!(
            r.first_bad_unix_ms,
            now + 10_000,
            "the first failing interval"
        );
        assert_eq!(
            d.reason.as_deref(),
            Some(
                "analysis failed 2 interval(s) in a row at 10%: error_rate 50.00% above max 5.00%"
            )
        );
        assert!(matches!(events[0].kind, Kind::Interval { .. }));
        assert!(matches!(events[1].kind, Kind::RollbackStarted { .. }));
    }
}
