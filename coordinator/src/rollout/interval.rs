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
        let Some(started) = self.d.analysis.interval_started_unix_ms else {
            self.d.analysis.interval_started_unix_ms = Some(self.now);
            self.d.analysis.snapshot = current;
            return Flow::Next;
        };
        if self.now.saturating_sub(started) < plan.interval.as_millis() {
            return Flow::Next;
        }
        let sample = self.sample(started, &current);
        let (verdict, metrics) = analysis::judge(&plan, &sample);
        self.record_interval(started, &sample, verdict.clone(), metrics);
        self.d.analysis.snapshot = current;
        let a = &mut self.d.analysis;
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
        let a = &mut self.d.analysis;
        a.interval_started_unix_ms = Some(self.now);
        a.intervals.push(IntervalRecord {
            step: self.d.step,
            traffic: self.d.traffic,
            started_unix_ms: started,
            ended_unix_ms: self.now,
            new_requests: sample.new.requests,
            old_requests: sample.old.requests,
            verdict,
            metrics,
        });
        if a.intervals.len() > KEEP_INTERVALS {
            let extra = a.intervals.len() - KEEP_INTERVALS;
            a.intervals.drain(..extra);
        }
    }
}
