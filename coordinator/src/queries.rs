//! The read queries that both the control API ([`crate::grpc`]) and the HTTP API
//! ([`crate::http`]) answer, from the store and the fleet: the hosts with what they run,
//! one deployment, its `show` report with the service's typical times, the deployments
//! in progress, the history, the stats and the deploy locks. Each is a function of the
//! store (and fleet) and `now`; callers turn [`Error`] into their own answer (a gRPC
//! status, an HTTP code).

use std::collections::BTreeMap;

use cutover_proto::Slot;
use cutover_proto::v1 as pb;
use prost::Message;

use crate::fleet::Fleet;
use crate::inventory::{self, HostState};
use crate::model::DeploymentRecord;
use crate::report;
use crate::store::{self, Store};
use crate::timeline::Event;

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What was asked for does not exist; the message says what.
    #[error("{0}")]
    NotFound(String),
    /// The store could not be read: the coordinator's fault, not the caller's.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// The desired state of every service on `host`, as it is sent to its agent.
pub fn desired(store: &Store, host: &str) -> Result<Vec<pb::DesiredService>, store::Error> {
    Ok(store
        .desired_for_host(host)?
        .into_iter()
        .filter_map(|raw| pb::DesiredService::decode(raw.as_slice()).ok())
        .collect())
}

/// Every enrolled host with what it runs: desired slots and weights next to what its
/// agent last reported.
pub fn hosts(store: &Store, fleet: &Fleet, now: u64) -> Result<Vec<pb::Host>, Error> {
    let locks: BTreeMap<String, pb::ServiceLock> = store
        .locks()?
        .into_iter()
        .map(|l| (l.service.clone(), l.to_pb()))
        .collect();
    let mut hosts = Vec::new();
    for h in store.hosts()? {
        let observed = fleet.observed_all(&h.name);
        let desired = desired(store, &h.name)?;
        let mut names: Vec<&str> = observed.iter().map(|o| o.service.as_str()).collect();
        // A service the host was told to forget shows only while it still runs there.
        names.extend(
            desired
                .iter()
                .filter(|d| !d.removed)
                .map(|d| d.service.as_str()),
        );
        names.sort();
        names.dedup();
        let services = names
            .into_iter()
            .map(|name| {
                let d = desired.iter().find(|d| d.service == name);
                let o = observed.iter().find(|o| o.service == name);
                let mut service = host_service(name, d, o);
                service.lock = locks.get(name).cloned();
                service
            })
            .collect();
        hosts.push(pb::Host {
            connected: fleet.reachable(&h.name, now),
            last_seen_unix_ms: fleet.last_seen(&h.name).unwrap_or(0),
            name: h.name,
            labels: h.labels.into_iter().collect(),
            services,
        });
    }
    Ok(hosts)
}

/// One service on a host: its live release (desired) and both slots.
fn host_service(
    name: &str,
    d: Option<&pb::DesiredService>,
    o: Option<&pb::ObservedService>,
) -> pb::HostService {
    let live = d
        .and_then(|d| d.slot(d.live_slot()?))
        .and_then(pb::SlotSpec::release_key)
        .map(|(v, _)| v.to_string())
        .unwrap_or_default();
    pb::HostService {
        service: name.to_string(),
        live_release: live,
        blue: Some(host_slot(d, o, Slot::Blue)),
        green: Some(host_slot(d, o, Slot::Green)),
        lock: None,
    }
}

/// One slot as the agent last reported it, or as desired when it has not reported it:
/// its release, its phase (`unknown` when only desired) and its weight.
fn host_slot(
    d: Option<&pb::DesiredService>,
    o: Option<&pb::ObservedService>,
    slot: Slot,
) -> pb::HostSlot {
    let observed = o.and_then(|o| o.slot(slot));
    let release = observed
        .map(|s| s.release.clone())
        .filter(|r| !r.is_empty())
        .or_else(|| {
            d.and_then(|d| d.slot(slot))
                .and_then(pb::SlotSpec::release_key)
                .map(|(v, _)| v.to_string())
        })
        .unwrap_or_default();
    let state = match observed {
        Some(s) => pb::SlotPhase::of(s.phase).name().to_string(),
        None if release.is_empty() => "empty".into(),
        None if o.is_some_and(|o| o.stopped) => "stopped".into(),
        None => "unknown".into(),
    };
    let weight = match (o, d) {
        (Some(o), _) => o.weight(slot),
        (None, Some(d)) => d.weight(slot),
        _ => 0,
    };
    pb::HostSlot {
        release,
        state,
        weight,
    }
}

/// Why deployment `id` (empty: the newest) cannot be found.
fn not_found(id: &str) -> Error {
    Error::NotFound(if id.is_empty() {
        "no deployment yet".into()
    } else {
        format!("unknown deployment {id:?}")
    })
}

/// Deployment `id`, or the newest one when `id` is empty.
pub fn deployment(store: &Store, id: &str) -> Result<DeploymentRecord, Error> {
    let found = if id.is_empty() {
        DeploymentRecord::newest(&store.deployments()?).cloned()
    } else {
        store.deployment(id)?
    };
    found.ok_or_else(|| not_found(id))
}

/// `show` for deployment `id` (empty: the newest), with typical times from the service's
/// past successful deployments.
pub fn show(store: &Store, id: &str, now: u64) -> Result<report::Show, Error> {
    let records = store.deployments()?;
    let d = if id.is_empty() {
        DeploymentRecord::newest(&records)
    } else {
        records.iter().find(|d| d.id == id)
    };
    let d = d.ok_or_else(|| not_found(id))?;
    let events = store.all_events()?;
    Ok(show_one(d, &records, &events, now))
}

/// `show` for `d` among `records`.
fn show_one(
    d: &DeploymentRecord,
    records: &[DeploymentRecord],
    events: &BTreeMap<String, Vec<Event>>,
    now: u64,
) -> report::Show {
    let past: Vec<_> = records.iter().filter(|r| r.id != d.id).cloned().collect();
    let typical = report::typical(&past, events, &d.service);
    let mine = events.get(&d.id).map_or(&[][..], Vec::as_slice);
    report::show(d, mine, &typical, now)
}

/// The deployments still running, each as `show` presents it.
pub fn live(store: &Store, now: u64) -> Result<Vec<report::Show>, Error> {
    let records = store.deployments()?;
    let events = store.all_events()?;
    Ok(records
        .iter()
        .filter(|d| !d.state.is_final())
        .map(|d| show_one(d, &records, &events, now))
        .collect())
}

/// One row per deployment of `service` (every service: `None`) created since `since`,
/// newest first, at most `limit`.
pub fn history(
    store: &Store,
    service: Option<&str>,
    since: u64,
    limit: usize,
) -> Result<Vec<report::HistoryRow>, Error> {
    Ok(report::history(
        &store.deployments()?,
        service,
        since,
        limit,
    ))
}

/// Every service's deploy lock, by service.
pub fn locks(store: &Store) -> Result<Vec<crate::views::Lock>, Error> {
    Ok(store
        .locks()?
        .iter()
        .map(|l| crate::views::Lock::from(&l.to_pb()))
        .collect())
}

/// The DORA figures over the deployments of `service` (every service: `None`) created
/// since `since`.
pub fn stats(
    store: &Store,
    service: Option<&str>,
    since: u64,
    now: u64,
) -> Result<report::Stats, Error> {
    let records = store.deployments()?;
    let events = store.all_events()?;
    Ok(report::stats(&records, &events, service, since, now))
}

/// What the coordinator knows of every enrolled host: its desired state and its last
/// report, by host name.
pub fn host_states(store: &Store, fleet: &Fleet) -> Result<BTreeMap<String, HostState>, Error> {
    let mut out = BTreeMap::new();
    for h in store.hosts()? {
        let state = HostState {
            desired: desired(store, &h.name)?,
            observed: fleet.observed_all(&h.name),
        };
        out.insert(h.name, state);
    }
    Ok(out)
}

/// `cutover service list`: every service with its state and where it runs.
pub fn services(store: &Store, fleet: &Fleet) -> Result<Vec<inventory::ServiceRow>, Error> {
    Ok(inventory::services(
        &store.services()?,
        &host_states(store, fleet)?,
    ))
}

/// `cutover releases SERVICE`: the releases the hosts keep, with when and by whom each
/// was deployed.
pub fn releases(
    store: &Store,
    fleet: &Fleet,
    service: &str,
) -> Result<Vec<inventory::ReleaseRow>, Error> {
    let svc = store.service(service)?.ok_or_else(|| {
        Error::NotFound(format!(
            "unknown service {service:?} (see `cutover service list`)"
        ))
    })?;
    Ok(inventory::releases(
        &svc,
        &host_states(store, fleet)?,
        &store.deployments()?,
        &store.all_events()?,
    ))
}

/// The hosts a `cutover logs` request asks, by name: those running `service` (or, for
/// `deployment`, that deployment's hosts), narrowed to `host` and to those with
/// `labels`. An empty answer is an error that says why.
pub fn log_hosts(
    store: &Store,
    service: &str,
    deployment: &str,
    host: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Vec<String>, Error> {
    let mut names: Vec<String> = if deployment.is_empty() {
        let mut on = Vec::new();
        for h in store.hosts()? {
            if desired(store, &h.name)?
                .iter()
                .any(|d| d.service == service && !d.removed)
            {
                on.push(h.name);
            }
        }
        if on.is_empty() {
            return Err(Error::NotFound(match store.service(service)? {
                Some(_) => format!("service {service} runs on no host"),
                None => format!("unknown service {service:?} (see `cutover service list`)"),
            }));
        }
        on
    } else {
        let d = store
            .deployment(deployment)?
            .ok_or_else(|| Error::NotFound(format!("unknown deployment {deployment:?}")))?;
        d.hosts.into_keys().collect()
    };
    let what = if deployment.is_empty() {
        format!("service {service}")
    } else {
        format!("deployment {deployment}")
    };
    if !host.is_empty() {
        if !names.iter().any(|n| n == host) {
            return Err(Error::NotFound(format!(
                "host {host} has no part in {what}"
            )));
        }
        names.retain(|n| n == host);
    }
    if !labels.is_empty() {
        let hosts = store.hosts()?;
        names.retain(|n| {
            hosts
                .iter()
                .any(|h| h.name == *n && cutover_shared::names::labels_match(labels, &h.labels))
        });
        if names.is_empty() {
            return Err(Error::NotFound(format!(
                "no host of {what} has the labels asked for"
            )));
        }
    }
    Ok(names)
}
