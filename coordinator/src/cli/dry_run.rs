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
    print_verification(r);
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

/// What verifies the release before the steps: each hook, when it would run, and the
/// shadow phase (none for a first release: there are no live requests to copy).
fn print_verification(r: &DryRun) {
    for line in verification_lines(r) {
        outln!("{line}");
    }
}

fn verification_lines(r: &DryRun) -> Vec<String> {
    let when = |name: &str| match name {
        "before_start" => "after unpack, before the new slot starts; a failure fails the host",
        "validate" => "once the new slot is healthy, at weight 0; a failure fails the host",
        _ => "before a slot is stopped (best effort)",
    };
    let mut out = Vec::new();
    let hooks: Vec<_> = r.plan.hooks.named().collect();
    if !hooks.is_empty() {
        out.push("hooks on each target host:".to_string());
    }
    for (name, h) in hooks {
        out.push(format!(
            "  {name}: {} (timeout {}), {}",
            h.command.join(" "),
            h.timeout,
            when(name)
        ));
    }
    let Some(s) = &r.plan.strategy.shadow else {
        return out;
    };
    if r.live_release.is_none() {
        out.push("shadow: skipped, nothing is live yet whose requests could be copied".into());
        return out;
    }
    let judged = if r.plan.analysis.is_some() {
        "judged by the analysis"
    } else {
        "not judged (no [analysis])"
    };
    out.push(format!(
        "shadow: before step 1, {}% of live {} requests copied to the new slot for {}, {judged}; no client is served by it",
        s.share,
        s.methods.join("/"),
        s.duration
    ));
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dry_run(plan_extra: &str, live: Option<&str>) -> DryRun {
        let text = format!(
            "service = \"web\"\n[release]\nversion = \"2\"\nartifact = \"file:///web-2.tar.gz\"\nsha256 = \"{}\"\n[run]\ncommand = [\"./web\"]\nlisten = 8080\n[health]\nhttp = \"/healthz\"\n{plan_extra}",
            "a".repeat(64)
        );
        DryRun {
            service: "web".into(),
            release: "2".into(),
            live_release: live.map(String::from),
            outcome: "deploy".into(),
            reason: None,
            labels: Vec::new(),
            unmatched_labels: Vec::new(),
            hosts: Vec::new(),
            changes: Vec::new(),
            steps: Vec::new(),
            plan: Plan::parse(&text, "web.toml").expect("a valid plan"),
        }
    }

    #[test]
    fn a_dry_run_says_when_each_hook_and_the_shadow_phase_would_run() {
        let r = dry_run(
            "[hooks]\nvalidate = { command = [\"./smoke.sh\", \"${PORT}\"], timeout = \"20s\" }\nbefore_stop = { command = [\"./bye\"] }\n[strategy]\nshadow = { duration = \"1m\", share = 50 }\n",
            Some("1"),
        );
        assert_eq!(
            verification_lines(&r),
            [
                "hooks on each target host:",
                "  validate: ./smoke.sh ${PORT} (timeout 20s), once the new slot is healthy, at weight 0; a failure fails the host",
                "  before_stop: ./bye (timeout 30s), before a slot is stopped (best effort)",
                "shadow: before step 1, 50% of live GET/HEAD requests copied to the new slot for 1m, not judged (no [analysis]); no client is served by it",
            ]
        );
        let first = dry_run("[strategy]\nshadow = { duration = \"1m\" }\n", None);
        assert_eq!(
            verification_lines(&first),
            ["shadow: skipped, nothing is live yet whose requests could be copied"]
        );
        assert!(verification_lines(&dry_run("", Some("1"))).is_empty());
    }
}
