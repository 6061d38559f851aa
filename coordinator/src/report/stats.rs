//! `stats`: the DORA figures — deployment frequency, change failure rate, time to
//! restore, deployment duration, lead time — and where failures happen, by phase and by
//! host, over the deployments created since a given time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::failure::{carried_traffic, failure_phase, hosts_failed};
use super::is_change;
use super::timing::{Spread, spread};
use crate::analysis::Verdict;
use crate::model::{DeploymentRecord, State};
use crate::timeline::{Event, Kind};
use crate::views::rfc3339;

/// DORA figures and where failures happen, over deployments created since `since`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// The service they are about; none for every service.
    pub service: Option<String>,
    /// The start of the period.
    pub since: Option<String>,
    /// The period's length in days (three decimals).
    pub days: f64,
    /// Deployments that changed something (`cutover deploy`, not rollbacks or no-ops).
    pub deployments: usize,
    /// Deployments per day over the period (three decimals).
    pub deployments_per_day: f64,
    /// Deployments that ended `succeeded`.
    pub succeeded: usize,
    /// Deployments that ended `rolled_back`.
    pub rolled_back: usize,
    /// Deployments that ended `failed` (a first deployment has nothing to roll back to).
    pub failed: usize,
    /// Deployments an operator aborted.
    pub aborted: usize,
    /// Succeeded, then undone by `cutover rollback` before anything else succeeded.
    pub rolled_back_manually: usize,
    /// Ended without success before the new release carried any traffic (a failed
    /// preparation, say): no user saw it, so not a change failure.
    pub failed_before_traffic: usize,
    /// Deployments that degraded service: rolled back (or failed, or aborted after a
    /// failing analysis interval) once the new release carried traffic, or succeeded and
    /// were then rolled back by hand.
    pub change_failures: usize,
    /// change failures / deployments.
    pub change_failure_rate: Option<f64>,
    /// For each change failure: first bad signal to the last host back on the previous
    /// release, or the manual rollback's own duration.
    pub time_to_restore: Spread,
    /// Submitted to ended, for successful deployments.
    pub deployment_duration: Spread,
    /// `[release] committed_at` to the end of a successful deployment.
    pub lead_time: Spread,
    /// Change failures and failures before traffic, by where they happened (a failed
    /// expand: `database expand`); and database contracts and aborts that failed, as
    /// `database contract` and `database abort`.
    pub failures_by_phase: BTreeMap<String, usize>,
    /// Deployments in which each host failed its preparation.
    pub failures_by_host: BTreeMap<String, usize>,
}

/// The durations the figures are spreads of, gathered deployment by deployment (ms).
#[derive(Default)]
struct Durations {
    /// Time to restore, per change failure.
    restore: Vec<u64>,
    /// Duration of each successful deployment.
    duration: Vec<u64>,
    /// Lead time of each successful deployment whose plan says when it was committed.
    lead: Vec<u64>,
}

/// The figures over `records` of `service` (every service: `None`) created at or after
/// `since`, at `now`. Only finished deployments that changed something count.
pub fn stats(
    records: &[DeploymentRecord],
    events: &BTreeMap<String, Vec<Event>>,
    service: Option<&str>,
    since: u64,
    now: u64,
) -> Stats {
    let mut s = Stats {
        service: service.map(String::from),
        since: rfc3339(since),
        days: round_to(now.saturating_sub(since) as f64 / 86_400_000.0, 1000.0),
        ..Stats::default()
    };
    let mut all: Vec<&DeploymentRecord> = records
        .iter()
        .filter(|d| service.is_none_or(|sv| d.service == sv))
        .collect();
    all.sort_by_key(|d| (d.created_unix_ms, d.id.clone()));
    let mut durations = Durations::default();
    for (i, d) in all.iter().enumerate() {
        if d.created_unix_ms < since || !is_change(d) || !d.state.is_final() {
            continue;
        }
        s.deployments += 1;
        let evs = events.get(&d.id).map_or(&[][..], Vec::as_slice);
        match d.state {
            State::Succeeded => s.count_success(d, &all[i + 1..], &mut durations),
            State::RolledBack | State::Failed | State::Aborted => {
                s.count_miss(d, evs, &mut durations.restore)
            }
            _ => {}
        }
        for host in hosts_failed(d, evs) {
            *s.failures_by_host.entry(host).or_default() += 1;
        }
        for phase in later_database_failures(evs) {
            *s.failures_by_phase
                .entry(format!("database {phase}"))
                .or_default() += 1;
        }
    }
    s.finish(durations);
    s
}

/// `x` rounded to `1 / per` (1000: three decimals).
fn round_to(x: f64, per: f64) -> f64 {
    (x * per).round() / per
}

impl Stats {
    /// A successful deployment `d`; `later` are the service's deployments created after
    /// it, where a manual rollback that undid it would be.
    fn count_success(
        &mut self,
        d: &DeploymentRecord,
        later: &[&DeploymentRecord],
        durations: &mut Durations,
    ) {
        self.succeeded += 1;
        if let Some(e) = d.ended_unix_ms {
            durations.duration.push(e.saturating_sub(d.created_unix_ms));
            durations.lead.extend(lead_time(d, e));
        }
        if let Some(r) = manual_undo(d, later) {
            self.rolled_back_manually += 1;
            self.change_failures += 1;
            if let Some(e) = r.ended_unix_ms {
                durations.restore.push(e.saturating_sub(r.created_unix_ms));
            }
            *self
                .failures_by_phase
                .entry("after success (manual rollback)".into())
                .or_default() += 1;
        }
    }

    /// A deployment `d` that ended without success.
    fn count_miss(&mut self, d: &DeploymentRecord, events: &[Event], restore: &mut Vec<u64>) {
        match d.state {
            State::RolledBack => self.rolled_back += 1,
            State::Failed => self.failed += 1,
            _ => self.aborted += 1,
        }
        let miss = miss(d, events);
        match miss {
            Miss::BeforeTraffic => self.failed_before_traffic += 1,
            Miss::ChangeFailure => {
                self.change_failures += 1;
                if let Some(r) = &d.rollback
                    && let Some(done) = r.done_unix_ms
                {
                    restore.push(done.saturating_sub(r.first_bad_unix_ms));
                }
            }
            Miss::Stopped => {}
        }
        if miss != Miss::Stopped {
            *self
                .failures_by_phase
                .entry(failure_phase(d, events))
                .or_default() += 1;
        }
    }

    /// The rates and spreads, once every deployment is counted.
    fn finish(&mut self, durations: Durations) {
        if self.days > 0.0 {
            self.deployments_per_day = round_to(self.deployments as f64 / self.days, 1000.0);
        }
        if self.deployments > 0 {
            self.change_failure_rate = Some(round_to(
                self.change_failures as f64 / self.deployments as f64,
                10_000.0,
            ));
        }
        self.time_to_restore = spread(&durations.restore);
        self.deployment_duration = spread(&durations.duration);
        self.lead_time = spread(&durations.lead);
    }
}

/// How a deployment that ended without success counts in the figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Miss {
    /// It failed before the new release carried any traffic: no user saw it.
    BeforeTraffic,
    /// It degraded service: the new release carried traffic and was found bad (by
    /// analysis, the health watch, or an operator after a failing interval).
    ChangeFailure,
    /// An operator stopped a release that nothing had found bad.
    Stopped,
}

fn miss(d: &DeploymentRecord, events: &[Event]) -> Miss {
    let failing_interval = || {
        d.analysis
            .intervals
            .iter()
            .any(|i| matches!(i.verdict, Verdict::Fail(_)))
    };
    match (d.state, carried_traffic(events)) {
        (State::Aborted, true) if failing_interval() => Miss::ChangeFailure,
        (State::Aborted, _) => Miss::Stopped,
        (_, false) => Miss::BeforeTraffic,
        (_, true) => Miss::ChangeFailure,
    }
}

/// The database contracts and aborts of a deployment that failed (an expand that
/// failed is the deployment's own failure, counted where it happened).
fn later_database_failures(events: &[Event]) -> impl Iterator<Item = &str> {
    events.iter().filter_map(|e| match &e.kind {
        Kind::DatabaseEnded {
            phase, ok: false, ..
        } if phase != "expand" => Some(phase.as_str()),
        _ => None,
    })
}

/// `[release] committed_at` to `ended`, in ms, when the plan says when.
fn lead_time(d: &DeploymentRecord, ended: u64) -> Option<u64> {
    let committed = d.plan.release.committed_at.as_deref()?;
    let at = humantime::parse_rfc3339_weak(committed).ok()?;
    let at = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(ended.saturating_sub(at.as_millis() as u64))
}

/// The `cutover rollback` that undid successful deployment `d`, if the next finished
/// deployment of its service is one; `later` are the deployments created after `d`.
fn manual_undo<'a>(
    d: &DeploymentRecord,
    later: &[&'a DeploymentRecord],
) -> Option<&'a DeploymentRecord> {
    later
        .iter()
        .filter(|n| n.service == d.service && n.state.is_final())
        .find(|n| n.state == State::Succeeded)
        .filter(|n| n.is_rollback && n.previous_release.as_deref() == Some(&d.release))
        .copied()
}
