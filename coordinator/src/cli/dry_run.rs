//! `cutover deploy PLAN --dry-run` and `cutover plan diff PLAN`: the coordinator's dry
//! run ([`crate::preview`]) printed for people, or as the JSON it came as. Exit 0 when
//! the deployment would start (or be a no-op), 1 when it would be refused or blocked —
//! the code the real `deploy` would get.

use std::path::Path;

use cutover_proto::v1 as pb;
use cutover_shared::plan::Plan;

use super::conn::decode;
use super::{Conn, Failure, Output, Result};
use crate::cli::out::print_json;
use crate::preview::DryRun;
use crate::{errln, outln};

/// Asks the coordinator what deploying `plan` (read from `path`) would do, and prints it.
pub async fn run(conn: &Conn, plan: &Plan, path: &Path, output: Output) -> Result<i32> {
    let text = toml::to_string(plan).map_err(|e| Failure::other(format!("encode plan: {e}")))?;
    let mut client = conn.client().await?;
    let doc = client
        .dry_run(pb::DeployRequest {
            plan_toml: text,
            plan_path: path.display().to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let report: DryRun = decode(&doc, "dry run")?;
    match output {
        Output::Json => print_json(&report),
        Output::Text => print(&report),
    }
    match report.outcome.as_str() {
        "refused" | "blocked" => {
            errln!(
                "error: the deployment would be {}: {}",
                report.outcome,
                report.reason.as_deref().unwrap_or("no reason given")
            );
            Ok(super::failure::OTHER)
        }
        _ => Ok(0),
    }
}

fn print(r: &DryRun) {
    let live = r.live_release.as_deref().unwrap_or("nothing");
    let verdict = match r.outcome.as_str() {
        "deploy" => {
            let n = r.hosts.iter().filter(|h| h.action == "deploy").count();
            format!("would deploy to {n} host(s)")
        }
        "noop" => "would change nothing: already live on every target host".into(),
        other => format!(
            "would be {other}: {}",
            r.reason.as_deref().unwrap_or("no reason given")
        ),
    };
    outln!(
        "dry run of {} {} (live: {live}): {verdict}; nothing was changed",
        r.service,
        r.release
    );
    print_targets(r);
    print_changes(r);
    outln!("steps:");
    for (i, s) in r.steps.iter().enumerate() {
        let hosts = s
            .hosts
            .as_ref()
            .map_or(String::new(), |h| format!(" on {h} host(s)"));
        let pause = if s.pause { ", then pause" } else { "" };
        outln!(
            "  {}. {}%{hosts}, hold {}s{pause}",
            i + 1,
            s.traffic,
            s.hold_s
        );
    }
    if let Some(a) = &r.plan.analysis {
        outln!("analysis every {}:", a.interval);
        for m in &a.metric {
            let line = toml::to_string(m).unwrap_or_default().replace('\n', " ");
            outln!("  {}", line.trim());
        }
    }
}

fn print_targets(r: &DryRun) {
    let labels = if r.labels.is_empty() {
        "every host".to_string()
    } else {
        r.labels.join(",")
    };
    outln!("targets: {labels}: {} host(s) match", r.hosts.len());
    if !r.unmatched_labels.is_empty() {
        outln!("  labels no host has: {}", r.unmatched_labels.join(", "));
    }
    for h in &r.hosts {
        let now = match (&h.live, &h.live_slot) {
            (Some(v), Some(s)) => format!("live {v} ({s})"),
            _ => "nothing live".into(),
        };
        let part = match (h.action.as_str(), &h.slot) {
            ("deploy", Some(slot)) => format!("-> {slot}"),
            ("unchanged", _) => "unchanged (already runs this plan)".into(),
            _ => "skipped: not connected".into(),
        };
        outln!("  {:<20} {:<24} {part}", h.name, now);
    }
}

fn print_changes(r: &DryRun) {
    let against = r
        .live_release
        .as_deref()
        .map_or("nothing live yet".to_string(), |v| {
            format!("live release {v}")
        });
    if r.changes.is_empty() {
        outln!("changes against the {against}: none");
        return;
    }
    outln!("changes against the {against}:");
    let width = r.changes.iter().map(|c| c.key.len()).max().unwrap_or(0);
    for c in &r.changes {
        outln!(
            "  {:<width$}  {} -> {}",
            c.key,
            c.from.as_deref().unwrap_or("(none)"),
            c.to.as_deref().unwrap_or("(none)")
        );
    }
}
