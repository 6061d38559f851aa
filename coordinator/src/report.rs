//! What operators read about deployments, computed from the records and their
//! timelines: [`history`], one deployment's story ([`show`], with where it failed,
//! [`failure`]), typical phase durations with the ETA and stragglers they give
//! ([`timing`]), and the DORA figures ([`stats`]).
//!
//! Pure: records and events in, typed reports out; `now` is an argument. Every report
//! is a struct with `Serialize + Deserialize`: the coordinator serialises it into the
//! JSON documents of the control API and the dashboard's `/api`, and the CLI reads the
//! same type back, so a renamed field is a compile error on both ends, not a silent
//! zero.

mod failure;
mod history;
mod show;
mod stats;
mod timing;

pub use failure::{FailedHost, Failure};
pub use history::{HistoryRow, history};
pub use show::{IntervalMetric, LastInterval, Show, ShowHost, Straggler, TimelineEntry, show};
pub use stats::{Stats, stats};
pub use timing::{Phases, Spread, Typical, eta_ms, phases, spread, stragglers, typical};

use crate::model::DeploymentRecord;

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// A deployment made by `cutover deploy` that changed something (not a rollback, not a
/// restart, not a no-op).
fn is_change(d: &DeploymentRecord) -> bool {
    !d.is_rollback && !d.restart && !d.hosts.values().all(|h| h.untouched)
}

#[cfg(test)]
mod tests;
