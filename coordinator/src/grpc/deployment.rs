//! A deployment as the control API sends it (`status`, the manual controls, following):
//! the record's state, hosts, analysis intervals, rollback times and database part in
//! protocol form.

use cutover_proto::v1 as pb;

use crate::analysis::{Verdict, threshold};
use crate::model::{DeploymentRecord, IntervalRecord, TaskPhase, TaskRun};

/// The deployment record in protocol form.
pub fn deployment_to_pb(d: &DeploymentRecord) -> pb::Deployment {
    pb::Deployment {
        id: d.id.clone(),
        service: d.service.clone(),
        release: d.release.clone(),
        state: d.state.as_str().into(),
        step: d.step,
        traffic: d.traffic,
        reason: d.reason.clone().unwrap_or_default(),
        hosts: d
            .hosts
            .iter()
            .map(|(name, h)| pb::DeploymentHost {
                name: name.clone(),
                phase: h.phase.as_str().into(),
                weight: h.weight,
                error: h.error.clone().unwrap_or_default(),
            })
            .collect(),
        created_unix_ms: d.created_unix_ms,
        ended_unix_ms: d.ended_unix_ms.unwrap_or(0),
        previous_release: d.previous_release.clone().unwrap_or_default(),
        steps: d.plan.strategy.steps.len() as u32,
        intervals: d
            .analysis
            .intervals
            .iter()
            .map(|i| interval_to_pb(d, i))
            .collect(),
        first_bad_unix_ms: d.rollback.as_ref().map_or(0, |r| r.first_bad_unix_ms),
        rollback_decided_unix_ms: d.rollback.as_ref().map_or(0, |r| r.decided_unix_ms),
        rollback_done_unix_ms: d
            .rollback
            .as_ref()
            .and_then(|r| r.done_unix_ms)
            .unwrap_or(0),
        database: Some(database_to_pb(d)),
        // The service's, not the record's: the caller adds it (see `Control`).
        lock: None,
    }
}

/// The deployment's part in the database: its schema change's phase and the last run
/// of each command, or what it waits for or undoes (phase `none` without a change).
pub fn database_to_pb(d: &DeploymentRecord) -> pb::DeploymentDatabase {
    let db = &d.database;
    let c = db.change.as_ref();
    let run = |phase| c.and_then(|c| c.last(phase)).map(|r| run_to_pb(&d.id, r));
    pb::DeploymentDatabase {
        schema: c.map(|c| c.schema.clone()).unwrap_or_default(),
        previous_schema: c
            .and_then(|c| c.previous_schema.clone())
            .unwrap_or_default(),
        phase: c.map_or("none", |c| c.phase.as_str()).into(),
        expand: run(TaskPhase::Expand),
        contract: run(TaskPhase::Contract),
        abort: run(TaskPhase::Abort),
        error: c
            .filter(|c| c.stalled().is_some() || c.phase == crate::model::DbPhase::Failed)
            .and_then(crate::rollout::database_failure)
            .unwrap_or_default(),
        waits_for: db.after.clone().unwrap_or_default(),
        undoes: db.undoes.clone().unwrap_or_default(),
    }
}

fn run_to_pb(deployment: &str, r: &TaskRun) -> pb::DatabaseRun {
    let end = r.end.as_ref();
    pb::DatabaseRun {
        task: r.task_id(deployment),
        host: r.host.clone(),
        attempt: r.attempt,
        started_unix_ms: r.started_unix_ms,
        ended_unix_ms: end.map_or(0, |e| e.at_unix_ms),
        ok: end.is_some_and(|e| e.ok),
        exit_code: end.and_then(|e| e.exit_code),
        exit: match (end, &r.stalled) {
            (Some(e), _) => e.exit.clone(),
            (None, Some(why)) => format!("stalled: {why}"),
            (None, None) => String::new(),
        },
        duration_ms: end.map_or(0, |e| e.duration_ms),
        tail: end.map(|e| e.tail.clone()).unwrap_or_default(),
        log: r.log.clone().unwrap_or_default(),
    }
}

/// One analysis interval: its traffic, requests, verdict and each metric's figures (NaN
/// for no figure: the protocol's doubles have no "none").
fn interval_to_pb(d: &DeploymentRecord, i: &IntervalRecord) -> pb::AnalysisInterval {
    let bounds = |name: &str| {
        d.plan
            .analysis
            .iter()
            .flat_map(|a| &a.metric)
            .find(|m| m.name == name)
            .map(threshold)
            .unwrap_or_default()
    };
    let (verdict, why) = verdict_parts(&i.verdict);
    pb::AnalysisInterval {
        step: i.step,
        traffic: i.traffic,
        started_unix_ms: i.started_unix_ms,
        ended_unix_ms: i.ended_unix_ms,
        new_requests: i.new_requests,
        old_requests: i.old_requests,
        verdict: verdict.into(),
        why,
        metrics: i
            .metrics
            .iter()
            .map(|m| {
                let (verdict, why) = verdict_parts(&m.verdict);
                pb::MetricValue {
                    name: m.name.clone(),
                    new: m.new.unwrap_or(f64::NAN),
                    old: m.old.unwrap_or(f64::NAN),
                    verdict: verdict.into(),
                    threshold: bounds(&m.name),
                    why,
                }
            })
            .collect(),
    }
}

/// A verdict's name and, for a failing or inconclusive one, why.
fn verdict_parts(v: &Verdict) -> (&'static str, String) {
    match v {
        Verdict::Pass => ("pass", String::new()),
        Verdict::Fail(w) => ("fail", w.clone()),
        Verdict::Inconclusive(w) => ("inconclusive", w.clone()),
    }
}
