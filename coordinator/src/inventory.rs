//! What each service runs and keeps, as typed reports that the coordinator sends as JSON
//! and the CLI reads back as the same types: the services with their live release and
//! where they run (`cutover service list`). Pure: the service records and each host's
//! desired and observed state in, rows out.

use std::collections::BTreeMap;

use cutover_proto::Slot;
use cutover_proto::v1::{DesiredService, ObservedService, SlotPhase, SlotSpec};
use serde::{Deserialize, Serialize};

use crate::model::ServiceRecord;

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
