//! How long deployments take: the phases of one deployment from its timeline, the
//! spread of many durations, the typical times of a service's past successes, the ETA
//! they give an active deployment, and the hosts far slower than the rest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{is_change, secs};
use crate::model::{DeploymentRecord, HostPhase, State};
use crate::timeline::{Event, Kind};

/// Count, mean, median and 90th percentile (nearest rank) of durations, in seconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Spread {
    /// How many durations there were.
    pub count: usize,
    /// Their mean; none without durations.
    pub mean_s: Option<f64>,
    /// Their median (the mean of the middle pair for an even count).
    pub median_s: Option<f64>,
    /// Their 90th percentile, nearest rank.
    pub p90_s: Option<f64>,
}

/// The spread of durations given in ms.
pub fn spread(ms: &[u64]) -> Spread {
    if ms.is_empty() {
        return Spread::default();
    }
    let mut v = ms.to_vec();
    v.sort_unstable();
    let rank = |p: f64| {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        secs(v[i])
    };
    let median = if v.len() % 2 == 1 {
        secs(v[v.len() / 2])
    } else {
        secs((v[v.len() / 2 - 1] + v[v.len() / 2]) / 2)
    };
    Spread {
        count: v.len(),
        mean_s: Some(secs(v.iter().sum::<u64>() / v.len() as u64)),
        median_s: Some(median),
        p90_s: Some(rank(0.9)),
    }
}

/// How long the phases of one deployment took, from its timeline.
#[derive(Debug, Default, PartialEq)]
pub struct Phases {
    /// Submitted to the first step's weights going out (every host prepared).
    pub prepare_ms: Option<u64>,
    /// Per host: its first reported phase to ready.
    pub host_prepare_ms: BTreeMap<String, u64>,
    /// Per step: weights sent to confirmed by every host.
    pub switch_ms: Vec<u64>,
    /// The database expand, as its host measured it (part of `prepare_ms`).
    pub expand_ms: Option<u64>,
    /// Submitted to ended.
    pub total_ms: Option<u64>,
}

/// The phase durations of `d`, from its timeline `events`.
pub fn phases(d: &DeploymentRecord, events: &[Event]) -> Phases {
    let mut p = Phases::default();
    let mut host_start: BTreeMap<&str, u64> = BTreeMap::new();
    let mut step_start: Option<u64> = None;
    for e in events {
        match &e.kind {
            Kind::HostPhase { host, .. } => {
                host_start.entry(host.as_str()).or_insert(e.at_unix_ms);
            }
            Kind::HostReady {
                host,
                timings: Some(t),
            } => {
                // The agent's own measure, exact even for phases too short to be seen.
                p.host_prepare_ms
                    .insert(host.clone(), t.fetch_ms + t.unpack_ms + t.start_ms);
            }
            Kind::HostReady { host, .. } => {
                if let Some(t) = host_start.get(host.as_str()) {
                    p.host_prepare_ms
                        .insert(host.clone(), e.at_unix_ms.saturating_sub(*t));
                }
            }
            Kind::StepStarted { .. } => {
                if p.prepare_ms.is_none() {
                    p.prepare_ms = Some(e.at_unix_ms.saturating_sub(d.created_unix_ms));
                }
                step_start = Some(e.at_unix_ms);
            }
            Kind::StepHolding { .. } => {
                if let Some(t) = step_start.take() {
                    p.switch_ms.push(e.at_unix_ms.saturating_sub(t));
                }
            }
            Kind::DatabaseEnded {
                phase,
                ok: true,
                duration_ms,
                ..
            } if phase == "expand" => p.expand_ms = Some(*duration_ms),
            _ => {}
        }
    }
    p.total_ms = d.ended_unix_ms.map(|e| e.saturating_sub(d.created_unix_ms));
    p
}

/// Typical durations over a service's past successful deployments.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Typical {
    /// How many past successful deployments they come from.
    pub deployments: usize,
    /// Submitted to every host prepared (the first step's weights going out), the
    /// database expand included.
    pub prepare: Spread,
    /// The database expand, for services whose plans have `[database]`.
    #[serde(default)]
    pub expand: Spread,
    /// One host's preparation: fetch, unpack, start to healthy.
    pub host_prepare: Spread,
    /// A step's weights sent to confirmed by every host.
    pub switch: Spread,
    /// Submitted to ended.
    pub total: Spread,
}

/// The typical durations of `service`'s deployments among `records`: those that
/// succeeded and changed something.
pub fn typical(
    records: &[DeploymentRecord],
    events: &BTreeMap<String, Vec<Event>>,
    service: &str,
) -> Typical {
    let mut t = Typical::default();
    let (mut prep, mut host, mut switch, mut total) = (vec![], vec![], vec![], vec![]);
    let mut expand = vec![];
    for d in records
        .iter()
        .filter(|d| d.service == service && d.state == State::Succeeded && is_change(d))
    {
        let p = phases(d, events.get(&d.id).map_or(&[][..], Vec::as_slice));
        t.deployments += 1;
        prep.extend(p.prepare_ms);
        host.extend(p.host_prepare_ms.values());
        switch.extend(p.switch_ms);
        total.extend(p.total_ms);
        expand.extend(p.expand_ms);
    }
    t.prepare = spread(&prep);
    t.host_prepare = spread(&host);
    t.switch = spread(&switch);
    t.total = spread(&total);
    t.expand = spread(&expand);
    t
}

/// Seconds back to ms; none is 0.
fn ms_of(s: Option<f64>) -> u64 {
    s.map_or(0, |v| (v * 1000.0) as u64)
}

/// Time left for an active deployment, in ms: the typical (median) preparation and
/// switch times still ahead, the holds and bake the plan still has to wait, minus what
/// the current phase has used already.
pub fn eta_ms(d: &DeploymentRecord, events: &[Event], t: &Typical, now: u64) -> Option<u64> {
    if d.state.is_final() {
        return None;
    }
    let steps = &d.plan.strategy.steps;
    let switch = ms_of(t.switch.median_s);
    let current = d.step as usize;
    let started_steps = events
        .iter()
        .any(|e| matches!(e.kind, Kind::StepStarted { .. }));
    let mut left: u64 = 0;
    if !started_steps {
        let elapsed = now.saturating_sub(d.created_unix_ms);
        left += ms_of(t.prepare.median_s).saturating_sub(elapsed);
    }
    for (i, s) in steps.iter().enumerate().skip(current) {
        let hold = s.hold.as_millis();
        if i == current {
            match d.held_ms(now) {
                Some(held) => left += hold.saturating_sub(held),
                None => left += switch + hold,
            }
        } else {
            left += switch + hold;
        }
    }
    left += d.plan.strategy.bake.as_millis();
    Some(left)
}

/// Hosts far slower than the others in preparation: still preparing after three times
/// the median of the hosts that finished (or of the typical host preparation), and at
/// least 5 s. Returns (host, seconds so far).
pub fn stragglers(
    d: &DeploymentRecord,
    events: &[Event],
    t: &Typical,
    now: u64,
) -> Vec<(String, f64)> {
    let p = phases(d, events);
    let done: Vec<u64> = p.host_prepare_ms.values().copied().collect();
    let reference = spread(&done).median_s.or(t.host_prepare.median_s);
    let Some(reference) = reference else {
        return Vec::new();
    };
    let limit = ((reference * 3000.0) as u64).max(5_000);
    let mut first: BTreeMap<&str, u64> = BTreeMap::new();
    for e in events {
        if let Kind::HostPhase { host, .. } = &e.kind {
            first.entry(host.as_str()).or_insert(e.at_unix_ms);
        }
    }
    d.hosts
        .iter()
        .filter(|(_, h)| h.phase == HostPhase::Preparing)
        .filter_map(|(name, _)| {
            let since = *first.get(name.as_str())?;
            let elapsed = now.saturating_sub(since);
            (elapsed > limit).then(|| (name.clone(), secs(elapsed)))
        })
        .collect()
}
