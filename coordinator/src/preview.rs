//! A dry run (`cutover deploy PLAN --dry-run`, `cutover plan diff PLAN`): what deploying
//! a plan would do, from the same planning the engine does (`rollout::plan_hosts`), as a
//! typed report the coordinator sends as JSON and the CLI reads back. Pure, and nothing
//! is written anywhere: the engine gathers the inputs and hands them in.
//!
//! It says which hosts the plan targets (and which of its labels match no host at all),
//! what each target host runs now and which slot the release would go to, how the plan
//! differs from the live release's (every key, secret values masked), the steps with
//! their holds, the analysis, the rest of the plan as it would be deployed — and the
//! outcome: `deploy`, `noop` (every target host already runs it), `refused` (why) or
//! `blocked` (no connected host).

use std::collections::{BTreeMap, BTreeSet};

use cutover_proto::v1::DesiredService;
use cutover_shared::plan::Plan;
use cutover_shared::secrets::{MASK, Secrets};
use serde::{Deserialize, Serialize};

use crate::inventory::slot_release;
use crate::model::{DeployHost, ServiceRecord};

/// What a dry run is told.
#[derive(Clone)]
pub struct Input<'a> {
    /// The plan to deploy.
    pub plan: &'a Plan,
    /// The service's record (a new one for a service never deployed).
    pub service: &'a ServiceRecord,
    /// Every enrolled host with its labels.
    pub hosts: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// The hosts connected now.
    pub connected: &'a BTreeSet<String>,
    /// The desired state for the service of each host the plan targets.
    pub desired: &'a BTreeMap<String, Option<DesiredService>>,
    /// Each connected target host's part, as the engine would plan it.
    pub parts: &'a BTreeMap<String, DeployHost>,
    /// Why the coordinator would refuse the deployment, if it would.
    pub refusal: Option<String>,
}

/// What deploying a plan would do.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DryRun {
    /// The plan's service.
    pub service: String,
    /// The release it deploys.
    pub release: String,
    /// The release live now, if any.
    pub live_release: Option<String>,
    /// `deploy`, `noop` (already live everywhere), `refused` or `blocked` (no
    /// connected target host).
    pub outcome: String,
    /// Why it would be refused or blocked.
    pub reason: Option<String>,
    /// The plan's `[targets] labels`, `key=value`.
    pub labels: Vec<String>,
    /// Labels of the plan that no enrolled host has.
    pub unmatched_labels: Vec<String>,
    /// Every host the labels match, connected or not.
    pub hosts: Vec<DryRunHost>,
    /// How the plan differs from the live release's, key by key.
    pub changes: Vec<Change>,
    /// The traffic steps with their holds.
    pub steps: Vec<DryRunStep>,
    /// The plan as it would be deployed, secret values masked: analysis, database
    /// phases, hooks and every other section.
    pub plan: Plan,
}

/// One target host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DryRunHost {
    /// The host's name.
    pub name: String,
    /// Connected now: only connected hosts take part.
    pub connected: bool,
    /// The release its live slot runs now.
    pub live: Option<String>,
    /// The slot carrying its traffic now.
    pub live_slot: Option<String>,
    /// The slot the release would go to (none when not connected).
    pub slot: Option<String>,
    /// `deploy`, `unchanged` (it runs the plan already) or `skipped` (not connected).
    pub action: String,
}

/// One key of the plan that differs from the live release's plan.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Change {
    /// The key's path, e.g. `run.env.DATABASE_URL`.
    pub key: String,
    /// The live plan's value (none: not set), masked when secret.
    pub from: Option<String>,
    /// The new plan's value (none: removed), masked when secret.
    pub to: Option<String>,
}

/// One traffic step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DryRunStep {
    /// Percent of each host's traffic on the new release.
    pub traffic: u32,
    /// How long it holds, in seconds.
    pub hold_s: f64,
    /// How many target hosts it covers (`2`, `50%`), when not all.
    pub hosts: Option<String>,
    /// Waits for `cutover promote`.
    pub pause: bool,
}

/// What deploying `input.plan` would do.
pub fn dry_run(input: &Input<'_>) -> DryRun {
    let plan = input.plan;
    let live = input.service.live.as_ref();
    let hosts = target_hosts(input);
    let deploying = input.parts.values().filter(|h| !h.untouched).count();
    let (outcome, reason) = match &input.refusal {
        Some(why) => ("refused", Some(why.clone())),
        None if input.parts.is_empty() => ("blocked", Some(no_host(hosts.len()))),
        None if deploying == 0 => (
            "noop",
            Some("the release is already live on every target host".to_string()),
        ),
        None => ("deploy", None),
    };
    DryRun {
        service: plan.service.clone(),
        release: plan.release.version.clone(),
        live_release: live.map(|p| p.release.version.clone()),
        outcome: outcome.into(),
        reason,
        labels: labels(plan),
        unmatched_labels: unmatched(plan, input.hosts),
        hosts,
        changes: changes(live, plan),
        steps: plan
            .strategy
            .steps
            .iter()
            .map(|s| DryRunStep {
                traffic: s.traffic,
                hold_s: s.hold.as_millis() as f64 / 1000.0,
                hosts: s.hosts.map(|c| c.to_string()),
                pause: s.pause,
            })
            .collect(),
        plan: plan.masked(),
    }
}

fn labels(plan: &Plan) -> Vec<String> {
    plan.targets
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// The plan's labels that no enrolled host has.
fn unmatched(plan: &Plan, hosts: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<String> {
    plan.targets
        .labels
        .iter()
        .filter(|(k, v)| !hosts.values().any(|l| l.get(*k) == Some(*v)))
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// Why no host would take part.
fn no_host(matched: usize) -> String {
    if matched == 0 {
        "no host matches the plan's targets".into()
    } else {
        format!("{matched} host(s) match the plan's targets but none is connected")
    }
}

/// Every host the plan's labels match, with what it runs and its part.
fn target_hosts(input: &Input<'_>) -> Vec<DryRunHost> {
    input
        .desired
        .iter()
        .map(|(name, desired)| {
            let live_slot = desired.as_ref().and_then(DesiredService::live_slot);
            let live = desired
                .as_ref()
                .zip(live_slot)
                .and_then(|(d, s)| slot_release(d, s))
                .map(str::to_string);
            let part = input.parts.get(name);
            let action = match part {
                None => "skipped",
                Some(p) if p.untouched => "unchanged",
                Some(_) => "deploy",
            };
            DryRunHost {
                name: name.clone(),
                connected: input.connected.contains(name),
                live,
                live_slot: live_slot.map(|s| s.as_str().to_string()),
                slot: part.map(|p| p.new_slot.as_str().to_string()),
                action: action.into(),
            }
        })
        .collect()
}

/// Every key whose value differs between the live plan and the new one, in key order;
/// secret values (`[run] secret_env` of either plan) masked.
pub fn changes(live: Option<&Plan>, new: &Plan) -> Vec<Change> {
    let before = live.map(flatten).unwrap_or_default();
    let after = flatten(new);
    let names: Vec<String> = new
        .run
        .secret_env
        .iter()
        .chain(live.iter().flat_map(|p| &p.run.secret_env))
        .cloned()
        .collect();
    let secrets = Secrets::new(
        live.iter()
            .map(|p| Secrets::of_plan(p))
            .chain([Secrets::of_plan(new)])
            .flat_map(Secrets::into_values),
    );
    let show = |key: &str, v: Option<&String>| {
        v.map(|v| {
            let secret_var = key
                .strip_prefix("run.env.")
                .is_some_and(|k| names.iter().any(|n| n == k));
            if secret_var {
                MASK.to_string()
            } else {
                secrets.mask(v)
            }
        })
    };
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| Change {
            key: k.clone(),
            from: show(k, before.get(k)),
            to: show(k, after.get(k)),
        })
        .collect()
}

/// The plan's leaves by key path (`run.env.RUST_LOG`); arrays are one leaf, written as
/// TOML (`["./web", "--port"]`).
fn flatten(plan: &Plan) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(v) = toml::Value::try_from(plan) {
        walk("", &v, &mut out);
    }
    out
}

fn walk(path: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(&p, v, out);
            }
        }
        toml::Value::String(s) => {
            out.insert(path.to_string(), s.clone());
        }
        other => {
            out.insert(path.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostPhase, Slot};

    fn plan(version: &str, run_extra: &str) -> Plan {
        let text = format!(
            "service = \"web\"\n[release]\nversion = \"{version}\"\nartifact = \"file:///web-{version}.tar.gz\"\nsha256 = \"{}\"\n[targets]\nlabels = {{ env = \"prod\", role = \"db\" }}\n[run]\ncommand = [\"./web\", \"--port\", \"${{PORT}}\"]\nlisten = 8080\n{run_extra}\n[health]\nhttp = \"/healthz\"\n[strategy]\nsteps = [{{ traffic = 10, hold = \"30s\" }}, {{ traffic = 100 }}]\n",
            "a".repeat(64)
        );
        Plan::parse(&text, "web.toml").unwrap()
    }

    fn part(untouched: bool) -> DeployHost {
        DeployHost {
            phase: if untouched {
                HostPhase::Switched
            } else {
                HostPhase::Waiting
            },
            new_slot: Slot::Green,
            old_slot: Some(Slot::Blue),
            weight: 0,
            error: None,
            untouched,
            lost: false,
            old_front: None,
            reported: None,
        }
    }

    #[test]
    fn the_diff_names_each_changed_key_and_masks_secret_values() {
        let live = plan(
            "1",
            "env = { DATABASE_URL = \"postgres://old-pass@db\", WORKERS = \"2\" }\nsecret_env = [\"DATABASE_URL\"]",
        );
        let mut new = plan(
            "2",
            "env = { DATABASE_URL = \"postgres://new-pass@db\", MODE = \"fast\" }\nsecret_env = [\"DATABASE_URL\"]",
        );
        new.run.listen = 9090;
        let diff: Vec<String> = changes(Some(&live), &new)
            .iter()
            .map(|c| {
                format!(
                    "{}: {} -> {}",
                    c.key,
                    c.from.as_deref().unwrap_or("(none)"),
                    c.to.as_deref().unwrap_or("(none)")
                )
            })
            .collect();
        assert_eq!(
            diff,
            [
                "release.artifact: file:///web-1.tar.gz -> file:///web-2.tar.gz",
                "release.version: 1 -> 2",
                "run.env.DATABASE_URL: ******** -> ********",
                "run.env.MODE: (none) -> fast",
                "run.env.WORKERS: 2 -> (none)",
                "run.listen: 8080 -> 9090",
            ]
        );
        assert!(changes(Some(&live), &live).is_empty(), "no change, no diff");
    }

    #[test]
    fn the_outcome_hosts_and_unmatched_labels() {
        let p = plan("2", "");
        let svc = ServiceRecord {
            name: "web".into(),
            live: Some(plan("1", "")),
            ..Default::default()
        };
        let prod = |role: &str| {
            [("env", "prod"), ("role", role)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let hosts: BTreeMap<String, BTreeMap<String, String>> = [
            ("a".to_string(), prod("web")),
            ("b".to_string(), prod("web")),
        ]
        .into();
        let connected: BTreeSet<String> = ["a".to_string()].into();
        let desired: BTreeMap<String, Option<DesiredService>> =
            [("a".to_string(), None), ("b".to_string(), None)].into();
        let parts: BTreeMap<String, DeployHost> = [("a".to_string(), part(false))].into();
        let input = Input {
            plan: &p,
            service: &svc,
            hosts: &hosts,
            connected: &connected,
            desired: &desired,
            parts: &parts,
            refusal: None,
        };
        let r = dry_run(&input);
        assert_eq!(
            (r.outcome.as_str(), r.live_release.as_deref()),
            ("deploy", Some("1"))
        );
        assert_eq!(r.unmatched_labels, ["role=db"]);
        let h: Vec<(&str, &str, Option<&str>)> = r
            .hosts
            .iter()
            .map(|h| (h.name.as_str(), h.action.as_str(), h.slot.as_deref()))
            .collect();
        assert_eq!(h, [("a", "deploy", Some("green")), ("b", "skipped", None)]);
        assert_eq!(r.steps.len(), 2);
        assert_eq!(r.steps[0].hold_s, 30.0);

        let untouched: BTreeMap<String, DeployHost> = [("a".to_string(), part(true))].into();
        let noop = dry_run(&Input {
            parts: &untouched,
            ..input.clone()
        });
        assert_eq!(noop.outcome, "noop");
        let none = BTreeMap::new();
        let blocked = dry_run(&Input {
            parts: &none,
            ..input.clone()
        });
        assert_eq!(blocked.outcome, "blocked");
        let refused = dry_run(&Input {
            refusal: Some("busy".into()),
            ..input
        });
        assert_eq!(
            (refused.outcome.as_str(), refused.reason.as_deref()),
            ("refused", Some("busy"))
        );
    }
}
