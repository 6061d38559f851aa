//! Metrics beyond the proxy's, in the decision: what each host is told to scrape from
//! its slots (`scrape_spec`), the slots' scrapes snapshotted with each interval like
//! the proxy's counters, the interval's readings of every `source = "slot"` and
//! `source = "prometheus"` metric, and `inconclusive_limit` inconclusive intervals in a
//! row pausing the deployment with the metrics named.

use std::collections::BTreeMap;

use cutover_proto::v1::ScrapeSpec;
use cutover_shared::plan::{Measure, Plan};

use super::machine::{Flow, Machine};
use crate::analysis::scraped::{self, HostSpan, Span};
use crate::analysis::{Reading, Scrape, ScrapeSnapshot};
use crate::model::{HostPhase, PauseCause, Slot, State};

/// Scrapes are never more frequent than this, whatever the interval.
const MIN_SCRAPE_EVERY_MS: u64 = 250;
/// Nor rarer than this: a long interval still sees a restart's reset within it.
const MAX_SCRAPE_EVERY_MS: u64 = 15_000;
/// One scrape's time limit, at most.
const MAX_SCRAPE_TIMEOUT_MS: u64 = 2_000;

/// The path slots serve their metrics on, and what the agent scrapes from them while
/// a deployment of `plan` judges `source = "slot"` metrics: four scrapes per interval,
/// so that an interval's values are at most a quarter of an interval old.
pub fn scrape_spec(plan: &Plan) -> (String, Option<ScrapeSpec>) {
    let Some(a) = &plan.analysis else {
        return (String::new(), None);
    };
    let path = a.scrape_path().unwrap_or_default().to_string();
    let series = scraped::series(a);
    if series.is_empty() {
        return (path, None);
    }
    let every_ms = (a.interval.as_millis() / 4).clamp(MIN_SCRAPE_EVERY_MS, MAX_SCRAPE_EVERY_MS);
    let spec = ScrapeSpec {
        every_ms,
        timeout_ms: every_ms.min(MAX_SCRAPE_TIMEOUT_MS),
        series,
    };
    (path, Some(spec))
}

impl Machine<'_, '_> {
    /// Each host's latest scrapes of the slots that serve the new release next to the
    /// old one: (new slot, old slot).
    pub(super) fn scrapes(&self) -> ScrapeSnapshot {
        let mut out = BTreeMap::new();
        if !self.judges_slots() {
            return out;
        }
        for (name, h) in &self.d.hosts {
            if h.untouched || h.phase != HostPhase::Switched || h.weight == 0 {
                continue;
            }
            let Some(o) = self.view(name).observed else {
                continue;
            };
            let of = |s: Option<Slot>| {
                s.and_then(|s| o.slot(s))
                    .and_then(|st| st.scrape.as_ref())
                    .map(Scrape::from_pb)
            };
            out.insert(name.clone(), (of(Some(h.new_slot)), of(h.old_slot)));
        }
        out
    }

    /// Whether the plan has a `source = "slot"` metric.
    fn judges_slots(&self) -> bool {
        self.d.plan.analysis.as_ref().is_some_and(|a| {
            a.metric
                .iter()
                .any(|m| matches!(m.measure(), Some(Measure::Slot(..))))
        })
    }

    /// The readings of the interval that began at `started`: the slot metrics from the
    /// scrapes then and now, and the Prometheus metrics from query results taken since
    /// it began (an older result does not speak for this interval).
    pub(super) fn readings(
        &self,
        started: u64,
        now: &ScrapeSnapshot,
        seconds: f64,
    ) -> BTreeMap<String, Reading> {
        let Some(a) = &self.d.plan.analysis else {
            return BTreeMap::new();
        };
        let before = &self.d.analysis.scrapes;
        let hosts: Vec<HostSpan<'_>> = now
            .iter()
            .map(|(host, (new, old))| {
                let (bn, bo) = before
                    .get(host)
                    .map_or((None, None), |(n, o)| (n.as_ref(), o.as_ref()));
                let has_old = self.d.hosts.get(host).is_some_and(|h| h.old_slot.is_some());
                HostSpan {
                    host,
                    new: Span {
                        start: bn,
                        end: new.as_ref(),
                    },
                    old: has_old.then_some(Span {
                        start: bo,
                        end: old.as_ref(),
                    }),
                }
            })
            .collect();
        let mut out = scraped::readings(a, &hosts, seconds);
        for (name, q) in self.queried {
            if q.at_unix_ms >= started {
                out.insert(name.clone(), q.reading.clone());
            }
        }
        out
    }

    /// Counts an inconclusive interval; `limit` of them in a row pause the deployment
    /// with `why` (the metrics without data). A deployment already paused stays so.
    pub(super) fn inconclusive(&mut self, why: &str, limit: u32) -> Flow {
        let a = &mut self.d.analysis;
        a.consecutive_inconclusive += 1;
        let n = a.consecutive_inconclusive;
        if n < limit || self.d.state != State::Progressing {
            return Flow::Next;
        }
        self.pause(PauseCause::Inconclusive);
        self.d.reason = Some(format!(
            "paused: analysis inconclusive {n} interval(s) in a row at {}%: {why}; `resume` keeps judging, `promote` goes on, `abort` rolls back",
            self.d.traffic
        ));
        Flow::Stop
    }

    /// A failing analysis ends the pause an inconclusive run began: the rollback's
    /// reason is the failure, not the pause's.
    pub(super) fn forget_inconclusive_pause(&mut self) {
        if self
            .d
            .pause
            .is_some_and(|p| p.cause == PauseCause::Inconclusive)
        {
            self.d.reason = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use cutover_proto::v1::{SeriesValue, SlotScrape};
    use cutover_shared::Duration;
    use cutover_shared::plan::{Analysis, Metric, MetricName, Source};

    use super::*;
    use crate::analysis::{Query, Values, Verdict};
    use crate::model::DeploymentRecord;
    use crate::rollout::tests::fixture::{Sim, holding_v2, phase};

    /// v2 holding at 10 % on a and b, judged every 10 s by a slot ratio and a
    /// Prometheus query, pausing after 2 inconclusive intervals.
    fn judged() -> (Sim, DeploymentRecord, u64) {
        let mut sim = Sim::new(&["a", "b"]);
        let (mut d, now) = holding_v2(&mut sim);
        let mut ratio = Metric::proxy(MetricName::ErrorRate);
        ratio.name = "payment failure rate".into();
        ratio.source = Source::Slot;
        ratio.ratio = Some(vec!["failed_total".into(), "payments_total".into()]);
        ratio.max = Some(0.05);
        let mut query = Metric::proxy(MetricName::ErrorRate);
        query.name = "orders".into();
        query.source = Source::Prometheus;
        query.query = Some("sum(rate(orders_total[30s]))".into());
        query.min = Some(1.0);
        d.plan.analysis = Some(Analysis {
            interval: Duration::from_secs(10),
            failure_limit: 1,
            min_requests: 0,
            inconclusive_limit: 2,
            scrape: None,
            prometheus: Some("http://p:9090".into()),
            metric: vec![ratio, query],
        });
        (sim, d, now)
    }

    /// Every host's new slot reports scrape `seq` with `failed` of `total` payments.
    fn scraped(sim: &mut Sim, d: &DeploymentRecord, seq: u64, failed: f64, total: f64) {
        for (name, h) in &d.hosts {
            let o = sim.observed.get_mut(name).unwrap();
            let st = match h.new_slot {
                Slot::Blue => o.blue.as_mut(),
                Slot::Green => o.green.as_mut(),
            };
            let v = |key: &str, sum| SeriesValue {
                key: key.into(),
                found: true,
                sum,
                ..Default::default()
            };
            st.unwrap().scrape = Some(SlotScrape {
                seq,
                error: String::new(),
                values: vec![v("failed_total{}", failed), v("payments_total{}", total)],
            });
        }
    }

    fn orders(at: u64, value: f64) -> crate::analysis::Queried {
        let reading = Reading::Whole(Values {
            new: Ok(Some(value)),
            old: Ok(Some(value)),
            counts: None,
        });
        [(
            "orders".to_string(),
            Query {
                at_unix_ms: at,
                reading,
            },
        )]
        .into()
    }

    #[test]
    fn the_scrape_spec_asks_for_each_series_four_times_an_interval() {
        let (_, d, _) = judged();
        let (path, spec) = scrape_spec(&d.plan);
        assert_eq!(path, "/metrics");
        let spec = spec.unwrap();
        assert_eq!((spec.every_ms, spec.timeout_ms), (2_500, 2_000));
        assert_eq!(spec.series.len(), 2);
    }

    #[test]
    fn slot_and_query_readings_are_judged_with_the_proxy_metrics() {
        let (mut sim, d, now) = judged();
        scraped(&mut sim, &d, 1, 0.0, 0.0);
        let (d, _) = phase(&sim, &d, now, |m| {
            m.run_interval();
        });
        assert_eq!(d.analysis.scrapes.len(), 2);
        scraped(&mut sim, &d, 2, 30.0, 100.0);
        let q = orders(now + 9_000, 5.0);
        let views = sim.views();
        let mut m = crate::rollout::machine::Machine::new(d.clone(), &views, now + 10_000);
        m.queried = &q;
        assert_eq!(m.run_interval(), Flow::Stop);
        let (d, _) = m.finish();
        assert_eq!(d.state, State::RollingBack);
        let i = d.analysis.intervals.last().unwrap();
        assert_eq!(i.metrics[0].new, Some(0.3));
        assert_eq!(i.metrics[1].verdict, Verdict::Pass);
        assert_eq!(
            d.reason.as_deref(),
            Some(
                "analysis failed 1 interval(s) in a row at 10%: payment failure rate 0.3 above max 0.05"
            )
        );
    }

    #[test]
    fn metrics_without_data_pause_after_the_inconclusive_limit_and_resume_forgets() {
        let (mut sim, d, now) = judged();
        scraped(&mut sim, &d, 1, 0.0, 0.0);
        let (d, _) = phase(&sim, &d, now, |m| {
            m.run_interval();
        });
        // The payments series moves, but the query result is older than the interval.
        scraped(&mut sim, &d, 2, 0.0, 100.0);
        let stale = orders(now - 1, 5.0);
        let views = sim.views();
        let mut m = crate::rollout::machine::Machine::new(d.clone(), &views, now + 10_000);
        m.queried = &stale;
        assert_eq!(m.run_interval(), Flow::Next);
        let (d, _) = m.finish();
        assert_eq!(d.analysis.consecutive_inconclusive, 1);
        assert_eq!(d.state, State::Progressing);
        // No new scrape either: both metrics are named.
        let (d, events) = phase(&sim, &d, now + 20_000, |m| {
            assert_eq!(m.run_interval(), Flow::Stop);
        });
        assert_eq!(d.state, State::Paused);
        assert_eq!(d.pause.map(|p| p.cause), Some(PauseCause::Inconclusive));
        let reason = d.reason.clone().unwrap();
        assert!(
            reason.starts_with("paused: analysis inconclusive 2 interval(s) in a row at 10%: ")
                && reason.contains("payment failure rate: no new scrape of the new slot on host a")
                && reason.contains("orders: no data in this interval"),
            "{reason}"
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e.kind, crate::timeline::Kind::Paused { .. }))
        );
        let (d, _) = phase(&sim, &d, now + 21_000, |m| m.resume());
        assert_eq!((d.state, d.reason.clone()), (State::Progressing, None));
        assert_eq!(d.analysis.consecutive_inconclusive, 0);
    }
}
