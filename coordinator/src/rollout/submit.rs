//! Creating a deployment: each target host's part planned from its current desired
//! state, and the deployment's first events. A plan every host already runs is a no-op
//! that ends at once.

use std::collections::BTreeMap;

use cutover_proto::v1::DesiredService;
use cutover_shared::plan::Plan;

use super::Decision;
use super::desired::plan_host;
use super::lifecycle::plan_restart;
use crate::model::{DeployDatabase, DeployHost, DeploymentRecord, State};
use crate::timeline::{Event, Kind};

/// A deployment to create.
#[derive(Clone, Debug)]
pub struct Submission<'a> {
    /// The new deployment's id.
    pub id: String,
    /// What to deploy, and how.
    pub plan: Plan,
    /// Where the plan came from, as the CLI named it (`(rollback)` for a rollback).
    pub plan_path: String,
    /// Made by `cutover rollback`: the previous release, in one step.
    pub is_rollback: bool,
    /// Made by `cutover service restart`: every host gets the live release anew in its
    /// idle slot (see [`super::lifecycle::plan_restart`]).
    pub restart: bool,
    /// The release live before this one, if any.
    pub previous_release: Option<String>,
    /// Who submitted it (the name of the certificate that called), for the timeline.
    pub actor: &'a str,
    /// What the engine knows of the service's database.
    pub database: DatabaseContext,
}

/// What a new deployment's part in the database depends on, from the engine.
#[derive(Clone, Debug, Default)]
pub struct DatabaseContext {
    /// Target hosts that may run `[database]` commands (matching `run_on`), by name;
    /// empty: every target host.
    pub runners: Vec<String>,
    /// The live release's schema version, when its plan has `[database]`.
    pub previous_schema: Option<String>,
    /// The deployment whose schema change is live and not contracted yet: a deployment
    /// waits for its contract, a `cutover rollback` undoes it.
    pub pending: Option<String>,
}

/// The new deployment over the target hosts, each with its current desired state for
/// the service.
pub fn submit(
    s: Submission<'_>,
    hosts: &BTreeMap<String, Option<DesiredService>>,
    now: u64,
) -> Decision {
    let hosts: BTreeMap<String, DeployHost> = if s.restart {
        hosts
            .iter()
            .map(|(name, current)| (name.clone(), plan_restart(&s.plan, current.as_ref())))
            .collect()
    } else {
        plan_hosts(&s.plan, hosts)
    };
    let noop = hosts.values().all(|h| h.untouched);
    // A restart starts the live release anew: its schema is already in place.
    let database = if noop || s.restart {
        DeployDatabase::default()
    } else {
        deploy_database(&s, &hosts)
    };
    let deployment = DeploymentRecord {
        id: s.id,
        service: s.plan.service.clone(),
        release: s.plan.release.version.clone(),
        plan_path: s.plan_path,
        previous_release: s.previous_release,
        is_rollback: s.is_rollback,
        restart: s.restart,
        state: if noop {
            State::Succeeded
        } else {
            State::Pending
        },
        ending: None,
        step: 0,
        traffic: if noop { 100 } else { 0 },
        reason: None,
        created_unix_ms: now,
        ended_unix_ms: noop.then_some(now),
        phase_started_unix_ms: now,
        step_switched_unix_ms: None,
        promoted: false,
        gate_passed: false,
        pause: None,
        analysis: Default::default(),
        rollback: None,
        hosts,
        plan: s.plan,
        database,
    };
    let events = submitted(&deployment, s.actor, noop, now);
    Decision {
        deployment,
        targets: BTreeMap::new(),
        events,
    }
}

/// Each host's part in a deployment of `plan`, from its current desired state for the
/// service: what a deployment would do to it (also what a dry run reports).
pub fn plan_hosts(
    plan: &Plan,
    hosts: &BTreeMap<String, Option<DesiredService>>,
) -> BTreeMap<String, DeployHost> {
    hosts
        .iter()
        .map(|(name, current)| (name.clone(), plan_host(plan, current.as_ref())))
        .collect()
}

/// A new deployment's part in the database: a `cutover rollback` undoes the pending
/// change; any other deployment waits for its contract, and makes its own change when
/// its plan has `[database]`.
fn deploy_database(s: &Submission<'_>, hosts: &BTreeMap<String, DeployHost>) -> DeployDatabase {
    let ctx = &s.database;
    if s.is_rollback {
        return DeployDatabase {
            undoes: ctx.pending.clone(),
            ..Default::default()
        };
    }
    let runners = if ctx.runners.is_empty() {
        hosts.keys().cloned().collect()
    } else {
        ctx.runners.clone()
    };
    DeployDatabase {
        change: s.plan.database.as_ref().map(|db| {
            super::database::change(
                db,
                &s.plan.release.version,
                ctx.previous_schema.clone(),
                runners,
            )
        }),
        after: ctx.pending.clone(),
        undoes: None,
    }
}

/// A new deployment's first events: submitted, the earlier change it waits for, and for
/// a no-op its end.
fn submitted(d: &DeploymentRecord, actor: &str, noop: bool, now: u64) -> Vec<Event> {
    let mut events = vec![Event {
        at_unix_ms: now,
        kind: Kind::Submitted {
            release: d.release.clone(),
            previous_release: d.previous_release.clone(),
            hosts: d.hosts.values().filter(|h| !h.untouched).count(),
            steps: d.plan.strategy.steps.len(),
            actor: actor.to_string(),
        },
    }];
    if let Some(after) = &d.database.after {
        events.push(Event {
            at_unix_ms: now,
            kind: Kind::DatabaseWaiting {
                deployment: after.clone(),
            },
        });
    }
    if noop {
        events.push(Event {
            at_unix_ms: now,
            kind: Kind::Ended {
                state: State::Succeeded.as_str().to_string(),
                reason: Some("the release was already live on every target host".into()),
            },
        });
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::tests::fixture::{SHA1, SHA2, Sim, kinds, plan};

    fn submission(plan: Plan) -> Submission<'static> {
        Submission {
            id: "d-000002".into(),
            plan,
            plan_path: "web.toml".into(),
            is_rollback: false,
            restart: false,
            previous_release: Some("1".into()),
            actor: "ana@desk",
            database: DatabaseContext::default(),
        }
    }

    fn current(sim: &Sim) -> BTreeMap<String, Option<DesiredService>> {
        sim.observed
            .keys()
            .map(|h| (h.clone(), sim.desired.get(h).cloned()))
            .collect()
    }

    #[test]
    fn a_deployment_starts_pending_and_says_who_submitted_it() {
        let mut sim = Sim::new(&["a", "b"]);
        sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
        let d = submit(submission(plan("2", SHA2, "")), &current(&sim), 7);
        assert_eq!(d.deployment.state, State::Pending);
        assert_eq!(d.deployment.created_unix_ms, 7);
        assert!(
            d.targets.is_empty(),
            "nothing is sent before the first decision"
        );
        assert_eq!(
            kinds(&d.events),
            [Kind::Submitted {
                release: "2".into(),
                previous_release: Some("1".into()),
                hosts: 2,
                steps: 1,
                actor: "ana@desk".into()
            }]
        );
    }

    #[test]
    fn the_live_plan_again_is_a_no_op_that_ends_at_once() {
        let mut sim = Sim::new(&["a"]);
        let v1 = plan("1", SHA1, "");
        sim.run(sim.start(&v1), 0, 100, 50);
        let d = submit(submission(v1), &current(&sim), 7);
        assert_eq!(d.deployment.state, State::Succeeded);
        assert_eq!(
            (d.deployment.traffic, d.deployment.ended_unix_ms),
            (100, Some(7))
        );
        assert!(matches!(d.events[0].kind, Kind::Submitted { hosts: 0, .. }));
        assert_eq!(
            d.events[1].kind,
            Kind::Ended {
                state: "succeeded".into(),
                reason: Some("the release was already live on every target host".into())
            }
        );
    }
}
