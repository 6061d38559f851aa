//! What each service runs and keeps, as typed reports that the coordinator sends as JSON
//! and the CLI reads back as the same types: the services with their live release and
//! where they run (`cutover service list`), and the releases the hosts keep with when and
//! by whom each was deployed (`cutover releases`). Pure: the service records, each
//! host's desired and observed state, and the deployments with their timelines in; rows
//! out.

use std::collections::BTreeMap;

use cutover_proto::Slot;
use cutover_proto::v1::{DesiredService, ObservedService, SlotPhase, SlotSpec};
use cutover_shared::plan::Plan;
use serde::{Deserialize, Serialize};

use crate::model::{DeploymentRecord, ServiceRecord, State};
use crate::timeline::{Event, Kind};
use crate::views::rfc3339;

/// What the coordinator knows of one host, for the inventory.
#[derive(Clone, Debug, Default)]
pub struct HostState {
    /// Its desired state, per service.
    pub desired: Vec<DesiredService>,
    /// Its last report, per service.
    pub observed: Vec<ObservedService>,
}

/// One service as `cutover service list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceRow {
    /// The service's name.
    pub service: String,
    /// `running`, `stopped` (`service stop`) or `deploying` (a deployment runs).
    pub state: String,
    /// The release live after the last successful deployment.
    pub live_release: Option<String>,
    /// The release `cutover rollback` goes back to.
    pub previous_release: Option<String>,
    /// The deployment in progress.
    pub deployment: Option<String>,
    /// The public port of the live release.
    pub listen: Option<u16>,
    /// The hosts that have the service, by name.
    pub hosts: Vec<String>,
    /// How many of them last reported a healthy slot carrying traffic.
    pub serving: usize,
}

/// Every service the coordinator knows, by name, with where it runs.
pub fn services(records: &[ServiceRecord], hosts: &BTreeMap<String, HostState>) -> Vec<ServiceRow> {
    let mut rows: Vec<ServiceRow> = records.iter().map(|svc| row(svc, hosts)).collect();
    rows.sort_by(|a, b| a.service.cmp(&b.service));
    rows
}

fn row(svc: &ServiceRecord, hosts: &BTreeMap<String, HostState>) -> ServiceRow {
    let mut on = Vec::new();
    let mut serving = 0;
    for (name, h) in hosts {
        let has = h
            .desired
            .iter()
            .any(|d| d.service == svc.name && !d.removed);
        if !has {
            continue;
        }
        on.push(name.clone());
        if h.observed
            .iter()
            .find(|o| o.service == svc.name)
            .is_some_and(serves)
        {
            serving += 1;
        }
    }
    let state = if svc.active.is_some() {
        "deploying"
    } else if svc.stopped {
        "stopped"
    } else {
        "running"
    };
    let version =
        |p: &Option<cutover_shared::plan::Plan>| p.as_ref().map(|p| p.release.version.clone());
    ServiceRow {
        service: svc.name.clone(),
        state: state.into(),
        live_release: version(&svc.live),
        previous_release: version(&svc.previous),
        deployment: svc.active.clone(),
        listen: svc.live.as_ref().map(|p| p.run.listen),
        hosts: on,
        serving,
    }
}

/// The host reports a healthy slot that carries traffic.
fn serves(o: &ObservedService) -> bool {
    Slot::BOTH.into_iter().any(|s| {
        o.weight(s) > 0
            && o.slot(s)
                .is_some_and(|st| st.phase == SlotPhase::Healthy as i32)
    })
}

/// The version a desired slot runs, if any.
pub fn slot_release(d: &DesiredService, slot: Slot) -> Option<&str> {
    d.slot(slot).and_then(SlotSpec::release_key).map(|(v, _)| v)
}

/// One release of a service as `cutover releases` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReleaseRow {
    /// The plan's `[release] version`.
    pub version: String,
    /// The artifact's sha256 (its first 12 digits when a host recorded only those).
    pub sha256: String,
    /// The release the service runs now.
    pub live: bool,
    /// The release `cutover rollback` goes back to.
    pub previous: bool,
    /// The hosts that keep it unpacked (no download to start it there), by name.
    pub hosts: Vec<String>,
    /// The last deployment that made it live, if one did.
    pub deployment: Option<String>,
    /// When that deployment ended.
    pub deployed_at: Option<String>,
    /// Who submitted that deployment.
    pub deployed_by: Option<String>,
}

/// The releases of `service` the hosts keep, with the live and previous ones even where
/// no host reports them: the newest deployed first, then the ones never made live.
pub fn releases(
    svc: &ServiceRecord,
    hosts: &BTreeMap<String, HostState>,
    deployments: &[DeploymentRecord],
    events: &BTreeMap<String, Vec<Event>>,
) -> Vec<ReleaseRow> {
    let mut rows: Vec<ReleaseRow> = Vec::new();
    for (name, h) in hosts {
        for o in h.observed.iter().filter(|o| o.service == svc.name) {
            for k in &o.releases {
                add_release(&mut rows, &k.version, &k.sha256, Some(name));
            }
        }
    }
    for p in [&svc.live, &svc.previous].into_iter().flatten() {
        add_release(&mut rows, &p.release.version, &p.release.sha256, None);
    }
    let is = |p: &Option<Plan>, r: &ReleaseRow| {
        p.as_ref().is_some_and(|p| {
            p.release.version == r.version && same_digest(&p.release.sha256, &r.sha256)
        })
    };
    for r in &mut rows {
        r.live = is(&svc.live, r);
        r.previous = is(&svc.previous, r);
        r.hosts.sort();
        if let Some(d) = last_made_live(&svc.name, r, deployments) {
            r.deployment = Some(d.id.clone());
            r.deployed_at = d.ended_unix_ms.and_then(rfc3339);
            r.deployed_by = submitted_by(events.get(&d.id));
        }
    }
    // RFC 3339 times in one format sort as text; releases never deployed come last.
    rows.sort_by(|a, b| {
        (b.deployed_at.is_some(), &b.deployed_at, &a.version).cmp(&(
            a.deployed_at.is_some(),
            &a.deployed_at,
            &b.version,
        ))
    });
    rows
}

/// Counts release `version` with digest `sha256` in `rows`, kept on `host` if named.
fn add_release(rows: &mut Vec<ReleaseRow>, version: &str, sha256: &str, host: Option<&str>) {
    let sha256 = sha256.to_ascii_lowercase();
    let found = rows
        .iter()
        .position(|r| r.version == version && same_digest(&r.sha256, &sha256));
    let i = found.unwrap_or_else(|| {
        rows.push(ReleaseRow {
            version: version.to_string(),
            sha256: sha256.clone(),
            live: false,
            previous: false,
            hosts: Vec::new(),
            deployment: None,
            deployed_at: None,
            deployed_by: None,
        });
        rows.len() - 1
    });
    let row = &mut rows[i];
    if sha256.len() > row.sha256.len() {
        row.sha256 = sha256;
    }
    if let Some(h) = host
        && !row.hosts.iter().any(|x| x == h)
    {
        row.hosts.push(h.to_string());
    }
}

/// Two digests of one artifact: equal, or one the prefix a host recorded of the other.
fn same_digest(a: &str, b: &str) -> bool {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    !a.is_empty() && !b.is_empty() && (a.starts_with(&b) || b.starts_with(&a))
}

/// The last deployment of `r` that succeeded and changed something (a restart deploys
/// no release; a no-op deployed nothing).
fn last_made_live<'a>(
    service: &str,
    r: &ReleaseRow,
    deployments: &'a [DeploymentRecord],
) -> Option<&'a DeploymentRecord> {
    deployments
        .iter()
        .filter(|d| {
            d.service == service
                && d.state == State::Succeeded
                && !d.restart
                && !d.hosts.values().all(|h| h.untouched)
                && d.release == r.version
                && same_digest(&d.plan.release.sha256, &r.sha256)
        })
        .max_by_key(|d| (d.ended_unix_ms, d.created_unix_ms))
}

/// Who submitted a deployment, from its timeline.
fn submitted_by(events: Option<&Vec<Event>>) -> Option<String> {
    events?.iter().find_map(|e| match &e.kind {
        Kind::Submitted { actor, .. } if !actor.is_empty() => Some(actor.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_proto::v1::SlotStatus;

    fn rec(name: &str, stopped: bool, active: Option<&str>) -> ServiceRecord {
        ServiceRecord {
            name: name.into(),
            stopped,
            active: active.map(str::to_string),
            ..Default::default()
        }
    }

    fn host(service: &str, weight: u32, phase: SlotPhase) -> HostState {
        HostState {
            desired: vec![DesiredService {
                service: service.into(),
                ..Default::default()
            }],
            observed: vec![ObservedService {
                service: service.into(),
                blue: Some(SlotStatus {
                    phase: phase as i32,
                    ..Default::default()
                }),
                blue_weight: weight,
                ..Default::default()
            }],
        }
    }

    const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn plan(version: &str, sha: &str) -> Plan {
        let text = format!(
            "service = \"web\"\n[release]\nversion = \"{version}\"\nartifact = \"file:///a.tar.gz\"\nsha256 = \"{sha}\"\n[run]\ncommand = [\"./web\"]\nlisten = 8080\n[health]\nhttp = \"/\"\n"
        );
        Plan::parse(&text, "p.toml").unwrap()
    }

    /// A deployment of `version` by `actor` that ended `state` at `at`, with its events.
    fn deployed(
        id: &str,
        version: &str,
        sha: &str,
        actor: &str,
        state: State,
        at: u64,
    ) -> (DeploymentRecord, Vec<Event>) {
        let s = crate::rollout::Submission {
            id: id.into(),
            plan: plan(version, sha),
            plan_path: "p.toml".into(),
            is_rollback: false,
            restart: false,
            previous_release: None,
            actor,
            database: Default::default(),
        };
        let decision = crate::rollout::submit(s, &[("a".to_string(), None)].into(), at - 5);
        let mut d = decision.deployment;
        d.state = state;
        d.ended_unix_ms = Some(at);
        (d, decision.events)
    }

    fn kept(service: &str, releases: &[(&str, &str)]) -> HostState {
        HostState {
            desired: Vec::new(),
            observed: vec![ObservedService {
                service: service.into(),
                releases: releases
                    .iter()
                    .map(|(v, sha)| cutover_proto::v1::KeptRelease {
                        version: v.to_string(),
                        sha256: sha.to_string(),
                        used_unix_ms: 0,
                    })
                    .collect(),
                ..Default::default()
            }],
        }
    }

    #[test]
    fn releases_join_what_hosts_keep_with_who_deployed_them_when() {
        let (d1, e1) = deployed(
            "d-000001",
            "1.0",
            SHA_A,
            "ana@desk",
            State::Succeeded,
            1_000_000,
        );
        let (d2, e2) = deployed(
            "d-000002",
            "2.0",
            SHA_B,
            "bo@desk",
            State::Succeeded,
            2_000_000,
        );
        let (d3, e3) = deployed(
            "d-000003",
            "3.0",
            SHA_A,
            "cy@desk",
            State::RolledBack,
            3_000_000,
        );
        let svc = ServiceRecord {
            name: "web".into(),
            live: Some(plan("2.0", SHA_B)),
            previous: Some(plan("1.0", SHA_A)),
            ..Default::default()
        };
        let hosts: BTreeMap<String, HostState> = [
            (
                "a".to_string(),
                kept("web", &[("2.0", SHA_B), ("1.0", SHA_A), ("3.0", SHA_A)]),
            ),
            // An older agent recorded only the directory name's digest prefix.
            ("b".to_string(), kept("web", &[("2.0", &SHA_B[..12])])),
            ("c".to_string(), kept("api", &[("9.9", SHA_A)])),
        ]
        .into();
        let events = [
            ("d-000001".to_string(), e1),
            ("d-000002".to_string(), e2),
            ("d-000003".to_string(), e3),
        ]
        .into();
        let rows = releases(&svc, &hosts, &[d1, d2, d3], &events);
        let summary: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{} live={} previous={} on {} by {}",
                    r.version,
                    r.live,
                    r.previous,
                    r.hosts.join(","),
                    r.deployed_by.as_deref().unwrap_or("-")
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                "2.0 live=true previous=false on a,b by bo@desk",
                "1.0 live=false previous=true on a by ana@desk",
                "3.0 live=false previous=false on a by -",
            ]
        );
        assert_eq!(
            rows.iter()
                .map(|r| r.deployment.as_deref())
                .collect::<Vec<_>>(),
            [Some("d-000002"), Some("d-000001"), None]
        );
        assert_eq!(rows[0].sha256, SHA_B, "the whole digest wins over a prefix");
        assert!(
            rows[0]
                .deployed_at
                .as_deref()
                .is_some_and(|t| t.starts_with("1970-01-01T00:33:20"))
        );
    }

    #[test]
    fn each_service_says_its_state_and_where_it_serves() {
        let hosts: BTreeMap<String, HostState> = [
            ("a".to_string(), host("web", 100, SlotPhase::Healthy)),
            ("b".to_string(), host("web", 100, SlotPhase::Unhealthy)),
            ("c".to_string(), host("api", 0, SlotPhase::Healthy)),
        ]
        .into();
        let rows = services(
            &[
                rec("web", false, None),
                rec("api", true, None),
                rec("db", false, Some("d-000009")),
            ],
            &hosts,
        );
        let summary: Vec<(&str, &str, usize, usize)> = rows
            .iter()
            .map(|r| {
                (
                    r.service.as_str(),
                    r.state.as_str(),
                    r.hosts.len(),
                    r.serving,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("api", "stopped", 1, 0),
                ("db", "deploying", 0, 0),
                ("web", "running", 2, 1)
            ]
        );
        assert_eq!(rows[1].deployment.as_deref(), Some("d-000009"));
    }
}
