//! `history`: one row per deployment, newest first.

use serde::{Deserialize, Serialize};

use super::secs;
use crate::model::{DeploymentRecord, State};
use crate::views::rfc3339;

/// One deployment in the history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HistoryRow {
    /// The deployment's id, `d-000123`.
    pub id: String,
    /// The service it deployed.
    pub service: String,
    /// The release it deployed (for a rollback: the release it went back to).
    pub release: String,
    /// What was live before; none for a service's first deployment.
    pub previous_release: Option<String>,
    /// Where it stands, or how it ended.
    pub state: State,
    /// Made by `cutover rollback` rather than `deploy`.
    pub rollback: bool,
    /// Made by `cutover service restart`: the live release started anew.
    #[serde(default)]
    pub restart: bool,
    /// When it was submitted.
    pub created_at: Option<String>,
    /// When it ended; none while it runs.
    pub ended_at: Option<String>,
    /// Submitted to ended; none while it runs.
    pub duration_s: Option<f64>,
    /// Why it rolled back or failed.
    pub reason: Option<String>,
    /// Where its schema change stands (`expanded`, `contracted`...); none without one.
    #[serde(default)]
    pub database: Option<String>,
}

/// The deployments of `service` (every service: `None`) created at or after `since`,
/// newest first, at most `limit`.
pub fn history(
    records: &[DeploymentRecord],
    service: Option<&str>,
    since: u64,
    limit: usize,
) -> Vec<HistoryRow> {
    let mut rows: Vec<&DeploymentRecord> = records
        .iter()
        .filter(|d| service.is_none_or(|s| d.service == s) && d.created_unix_ms >= since)
        .collect();
    rows.sort_by(|a, b| {
        b.created_unix_ms
            .cmp(&a.created_unix_ms)
            .then(b.id.cmp(&a.id))
    });
    rows.into_iter().take(limit).map(row).collect()
}

fn row(d: &DeploymentRecord) -> HistoryRow {
    HistoryRow {
        id: d.id.clone(),
        service: d.service.clone(),
        release: d.release.clone(),
        previous_release: d.previous_release.clone(),
        state: d.state,
        rollback: d.is_rollback,
        restart: d.restart,
        created_at: rfc3339(d.created_unix_ms),
        ended_at: d.ended_unix_ms.and_then(rfc3339),
        duration_s: d
            .ended_unix_ms
            .map(|e| secs(e.saturating_sub(d.created_unix_ms))),
        reason: d.reason.clone(),
        database: d
            .database
            .change
            .as_ref()
            .map(|c| c.phase.as_str().to_string()),
    }
}
