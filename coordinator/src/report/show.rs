//! `show`: one deployment's story — where it failed first (if it did), where it stands
//! (step, hold, hosts, the last analysis interval), the service's typical times with
//! the ETA and stragglers they give, and every event of its timeline. The live view of
//! `cutover watch` and the dashboard read it too.

use std::collections::BTreeMap;

use cutover_shared::plan::Plan;
use serde::{Deserialize, Serialize};

use super::failure::{Failure, failure};
use super::secs;
use super::timing::{Typical, eta_ms, phases, stragglers};
use crate::analysis::{MetricResult, Verdict, figure, threshold, unit};
use crate::model::{DeploymentRecord, HostPhase, IntervalRecord, State};
use crate::timeline::Event;
use crate::views::{self, rfc3339};
use cutover_shared::plan::{Metric, MetricName};

/// One deployment as `show` tells it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Show {
    /// The deployment's id, `d-000123`.
    pub id: String,
    /// The service it deploys.
    pub service: String,
    /// The release it deploys.
    pub release: String,
    /// What was live before; none for a service's first deployment.
    pub previous_release: Option<String>,
    /// Where it stands, or how it ended.
    pub state: State,
    /// Why it rolled back or failed.
    pub reason: Option<String>,
    /// Where it went wrong, when it did; shown first.
    pub failure: Option<Failure>,
    /// The current step, 0-based.
    pub step: u32,
    /// How many steps the plan has.
    pub steps: usize,
    /// Percent of traffic on the new release now.
    pub traffic: u32,
    /// When it was submitted.
    pub created_at: Option<String>,
    /// When it ended; none while it runs.
    pub ended_at: Option<String>,
    /// Submitted to ended, or to now.
    pub elapsed_s: f64,
    /// How long the current phase has lasted (the hold so far, while holding).
    pub phase_elapsed_s: f64,
    /// The step's weights are confirmed everywhere and it waits out its hold.
    pub holding: bool,
    /// The hold being waited out (with the bake at the last step), while holding.
    pub hold_s: Option<f64>,
    /// The bake included in `hold_s`, at the last step.
    pub bake_s: Option<f64>,
    /// Each target host's phase, weight and error.
    pub hosts: Vec<ShowHost>,
    /// The newest analysis interval's verdict and figures.
    pub last_interval: Option<LastInterval>,
    /// How long each host that is ready took to prepare.
    pub host_prepare_s: BTreeMap<String, f64>,
    /// The service's typical times, from its past successful deployments.
    pub typical: Typical,
    /// Time left, from the typical times and the plan's holds; none once ended.
    pub eta_s: Option<f64>,
    /// Hosts far slower than the others to prepare.
    pub stragglers: Vec<Straggler>,
    /// Every event, oldest first.
    pub timeline: Vec<TimelineEntry>,
    /// The plan that was deployed, its secret values masked ([`Plan::masked`]).
    #[serde(default)]
    pub plan: Option<Plan>,
    /// Where the plan came from, as the CLI named it (`(rollback)`, `(restart)`...).
    #[serde(default)]
    pub plan_path: String,
    /// Its part in the database: the schema change's phase and each command's run,
    /// with where its whole output is.
    #[serde(default = "no_database")]
    pub database: views::Database,
}

/// What a report from a coordinator that did not send `database` reads as.
fn no_database() -> views::Database {
    views::Database::from(&Default::default())
}

/// A target host of a deployment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShowHost {
    /// The host's name.
    pub name: String,
    /// Where the host stands in this deployment.
    pub phase: HostPhase,
    /// Percent of its traffic on the new release.
    pub weight: u32,
    /// What went wrong on it, if anything.
    pub error: Option<String>,
}

/// The newest analysis interval: new slot against old, at the step's traffic.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LastInterval {
    /// The step's traffic, in percent, during the interval.
    pub traffic: u32,
    /// `pass`, or `fail: why` / `inconclusive: why`.
    pub verdict: String,
    /// Requests the new slots answered in the interval.
    pub new_requests: u64,
    /// Requests the old slots answered in the interval.
    pub old_requests: u64,
    /// Each judged metric.
    pub metrics: Vec<IntervalMetric>,
}

/// One metric of an analysis interval.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IntervalMetric {
    /// The metric's name, as the plan spells it.
    pub name: String,
    /// Its value on the new slots; none without data.
    pub new: Option<f64>,
    /// Its value on the old slots (the baseline); none without data.
    pub old: Option<f64>,
    /// What the values are in: `ratio`, `ms`, `per_second`, `value`.
    pub unit: String,
    /// The bounds it is judged by, for people (`max 0.02, max_vs_baseline 1.5x`).
    #[serde(default)]
    pub threshold: String,
    /// `pass`, `fail` or `inconclusive`.
    #[serde(default)]
    pub verdict: String,
    /// `name new vs old`, for people.
    pub text: String,
}

/// A host still preparing far longer than the others.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Straggler {
    /// The host's name.
    pub host: String,
    /// How long it has been preparing.
    pub preparing_s: f64,
}

/// One timeline event with its time for people.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TimelineEntry {
    /// The event as the store keeps it (its fields sit beside the ones below).
    #[serde(flatten)]
    pub event: Event,
    /// When it happened.
    pub at: Option<String>,
    /// Seconds since the deployment was submitted.
    pub offset_s: f64,
    /// One line for people.
    pub text: String,
}

/// `d`'s story from its `events`, with the service's `typical` times, at `now`.
pub fn show(d: &DeploymentRecord, events: &[Event], typical: &Typical, now: u64) -> Show {
    let end = d.ended_unix_ms.unwrap_or(now);
    let hold = Hold::of(d);
    Show {
        id: d.id.clone(),
        service: d.service.clone(),
        release: d.release.clone(),
        previous_release: d.previous_release.clone(),
        state: d.state,
        reason: d.reason.clone(),
        failure: failure(d, events),
        step: d.step,
        steps: d.plan.strategy.steps.len(),
        traffic: d.traffic,
        created_at: rfc3339(d.created_unix_ms),
        ended_at: d.ended_unix_ms.and_then(rfc3339),
        elapsed_s: secs(end.saturating_sub(d.created_unix_ms)),
        phase_elapsed_s: secs(
            d.held_ms(end)
                .unwrap_or_else(|| end.saturating_sub(d.phase_started_unix_ms)),
        ),
        holding: hold.holding,
        hold_s: hold.hold_ms.map(secs),
        bake_s: hold.bake_ms.map(secs),
        hosts: hosts(d),
        last_interval: d.analysis.intervals.last().map(|i| last_interval(d, i)),
        host_prepare_s: phases(d, events)
            .host_prepare_ms
            .into_iter()
            .map(|(h, ms)| (h, secs(ms)))
            .collect(),
        typical: typical.clone(),
        eta_s: eta_ms(d, events, typical, now).map(secs),
        stragglers: stragglers(d, events, typical, now)
            .into_iter()
            .map(|(host, preparing_s)| Straggler { host, preparing_s })
            .collect(),
        timeline: events.iter().map(|e| entry(d, e)).collect(),
        plan: Some(d.plan.masked()),
        plan_path: d.plan_path.clone(),
        database: views::Database::from(&crate::grpc::database_to_pb(d)),
    }
}

/// The hold a deployment is waiting out, if it is.
struct Hold {
    /// The step's weights are confirmed everywhere and the deployment waits out its hold
    /// (and, at the last step, the bake) before moving on.
    holding: bool,
    /// The step's hold plus the bake, while holding.
    hold_ms: Option<u64>,
    /// The bake, while holding at the last step of a plan that has one.
    bake_ms: Option<u64>,
}

impl Hold {
    fn of(d: &DeploymentRecord) -> Hold {
        let strategy = &d.plan.strategy;
        let holding = d.state == State::Progressing && d.step_switched_unix_ms.is_some();
        let last = d.step as usize + 1 == strategy.steps.len();
        let bake_ms =
            (holding && last && !strategy.bake.is_zero()).then(|| strategy.bake.as_millis());
        let hold_ms = strategy
            .steps
            .get(d.step as usize)
            .filter(|_| holding)
            .map(|s| s.hold.as_millis() + bake_ms.unwrap_or(0));
        Hold {
            holding,
            hold_ms,
            bake_ms,
        }
    }
}

fn hosts(d: &DeploymentRecord) -> Vec<ShowHost> {
    d.hosts
        .iter()
        .map(|(name, h)| ShowHost {
            name: name.clone(),
            phase: h.phase,
            weight: h.weight,
            error: h.error.clone(),
        })
        .collect()
}

fn last_interval(d: &DeploymentRecord, i: &IntervalRecord) -> LastInterval {
    LastInterval {
        traffic: i.traffic,
        verdict: match &i.verdict {
            Verdict::Pass => "pass".to_string(),
            Verdict::Fail(w) => format!("fail: {w}"),
            Verdict::Inconclusive(w) => format!("inconclusive: {w}"),
        },
        new_requests: i.new_requests,
        old_requests: i.old_requests,
        metrics: i.metrics.iter().map(|m| interval_metric(d, m)).collect(),
    }
}

fn interval_metric(d: &DeploymentRecord, m: &MetricResult) -> IntervalMetric {
    let planned = d
        .plan
        .analysis
        .iter()
        .flat_map(|a| &a.metric)
        .find(|p| p.name == m.name);
    IntervalMetric {
        name: m.name.clone(),
        new: m.new,
        old: m.old,
        unit: match (planned, MetricName::parse(&m.name)) {
            (Some(p), _) => unit(p),
            (None, Some(n)) => unit(&Metric::proxy(n)),
            (None, None) => "value",
        }
        .to_string(),
        threshold: planned.map(threshold).unwrap_or_default(),
        verdict: match m.verdict {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "fail",
            Verdict::Inconclusive(_) => "inconclusive",
        }
        .to_string(),
        text: figure(m),
    }
}

fn entry(d: &DeploymentRecord, e: &Event) -> TimelineEntry {
    TimelineEntry {
        event: e.clone(),
        at: rfc3339(e.at_unix_ms),
        offset_s: secs(e.at_unix_ms.saturating_sub(d.created_unix_ms)),
        text: e.describe(),
    }
}
