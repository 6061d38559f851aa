//! The database phases on a simulated fleet whose agents run tasks as `Sim::db` says:
//! the expand before anything prepares, the abort after a rollback, the contract after
//! success and before the next deployment, retries after a stall, and each task id run
//! once.

use cutover_proto::v1::{DatabaseTaskState, SlotSpec};
use cutover_shared::plan::Plan;

use super::*;
use crate::model::{HostPhase, ServiceRecord};
use crate::rollout::tests::fixture::{
    SHA1, SHA2, Sim, TaskEnding, kinds, ops, order, plan, run_until,
};
use crate::rollout::{
    DatabaseContext, Inputs, Submission, changed_service, concluded, decide, decide_with, submit,
};

/// What a decision of a deployment waiting for `previous`'s contract reads.
fn after(previous: &DeploymentRecord) -> Inputs<'_> {
    Inputs {
        previous: Some(previous),
        ..Inputs::default()
    }
}

const SHA3: &str = "3333333333333333333333333333333333333333333333333333333333333333";

/// `plan(version, sha, steps)` with a `[database]` section.
fn db_plan(version: &str, sha: &str, steps: &str) -> Plan {
    let mut p = plan(version, sha, steps);
    let text = format!(
        "{}\n[database]\nschema = \"app_${{RELEASE}}\"\nexpand = [\"./db/expand.sh\"]\ncontract = [\"./db/contract.sh\"]\nabort = [\"./db/abort.sh\"]\ntimeout = \"1m\"\n",
        toml::to_string(&p).unwrap()
    );
    p = Plan::parse(&text, "p.toml").unwrap();
    p.strategy.host_lost_after = cutover_shared::Duration::from_secs(5);
    p
}

/// Deployment `id` of `p` over every host of `sim`, with what the engine knows of the
/// database.
fn start(sim: &Sim, p: &Plan, id: &str, database: DatabaseContext) -> DeploymentRecord {
    let hosts = sim
        .observed
        .keys()
        .map(|h| (h.clone(), sim.desired.get(h).cloned()))
        .collect();
    let s = Submission {
        id: id.into(),
        plan: p.clone(),
        plan_path: "p.toml".into(),
        is_rollback: false,
        restart: false,
        previous_release: sim.live(sim.observed.keys().next().unwrap()),
        actor: "ops@desk",
        database,
    };
    submit(s, &hosts, 0).deployment
}

fn phase_of(d: &DeploymentRecord) -> DbPhase {
    d.database
        .change
        .as_ref()
        .map_or(DbPhase::None, |c| c.phase)
}

fn run_of(d: &DeploymentRecord, phase: TaskPhase) -> TaskRun {
    d.database
        .change
        .as_ref()
        .and_then(|c| c.last(phase))
        .cloned()
        .expect("a run of that phase")
}

/// v1 (without a database change) live on `hosts`, then v2 with one submitted as d-2.
fn v2_with_database(hosts: &[&str], steps: &str) -> (Sim, DeploymentRecord, u64) {
    let mut sim = Sim::new(hosts);
    let (_, now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    let d = start(
        &sim,
        &db_plan("2", SHA2, steps),
        "d-2",
        DatabaseContext::default(),
    );
    (sim, d, now)
}

#[test]
fn the_expand_runs_once_on_the_first_host_before_any_slot_of_the_release_starts() {
    let (mut sim, d, now) = v2_with_database(&["b", "a"], "");
    sim.db.insert("expand".into(), TaskEnding::Hang);
    let mut d = d;
    for i in 0..5 {
        let (next, _) = sim.step(&d, now + i * 100);
        d = next;
    }
    assert_eq!(
        (d.state, phase_of(&d)),
        (State::Preparing, DbPhase::Expanding)
    );
    assert!(d.hosts.values().all(|h| h.phase == HostPhase::Waiting));
    let task = sim.desired["a"].database_task.clone().expect("a runs it");
    assert_eq!(task.id, "d-2/expand");
    assert_eq!(task.command, ["./db/expand.sh"]);
    assert!(sim.desired["b"].database_task.is_none());
    for h in ["a", "b"] {
        let new = d.hosts[h].new_slot;
        assert!(
            sim.desired[h].slot(new).is_none(),
            "nothing of 2 on {h} yet"
        );
    }
    // Its environment, as SPEC says.
    let env = |k: &str| task.env.get(k).cloned().unwrap_or_default();
    assert_eq!(env("CUTOVER_DB_PHASE"), "expand");
    assert_eq!(env("CUTOVER_DB_SCHEMA"), "app_2");
    assert_eq!(env("CUTOVER_DEPLOYMENT"), "d-2");
    assert_eq!(env("CUTOVER_RELEASE"), "2");
    assert_eq!(env("CUTOVER_PREVIOUS_RELEASE"), "1");
    assert_eq!(env("CUTOVER_SERVICE"), "web");
    assert_eq!(task.release.map(|r| r.version).as_deref(), Some("2"));
    assert_eq!(task.timeout_ms, 60_000);

    // It ends: the hosts prepare, the release (with its schema) goes out, the task goes.
    let known = sim.tasks.get_mut("a").unwrap();
    known[0].state = DatabaseTaskState::Succeeded as i32;
    known[0].exit = "exit status: 0".into();
    sim.converge();
    let (d, events) = sim.step(&d, now + 1_000);
    assert_eq!(phase_of(&d), DbPhase::Expanded);
    assert_eq!(
        d.phase_started_unix_ms,
        now + 1_000,
        "preparation gets its deadline"
    );
    assert!(events.iter().any(|e| matches!(&e.kind,
        Kind::DatabaseEnded { phase, ok: true, log, .. } if phase == "expand" && log.ends_with("expand.log"))));
    assert!(d.hosts.values().any(|h| h.phase == HostPhase::Preparing));
    assert!(sim.desired["a"].database_task.is_none());
    let (d, _) = run_until(&mut sim, d, now + 1_100, |d| d.state.is_final());
    assert_eq!(
        (d.state, phase_of(&d)),
        (State::Succeeded, DbPhase::Expanded)
    );
    let env = sim.desired["a"]
        .slot(d.hosts["a"].new_slot)
        .and_then(|s| s.run.clone())
        .unwrap()
        .env;
    assert_eq!(env["CUTOVER_DB_SCHEMA"], "app_2");
    assert_eq!(env["PGOPTIONS"], "-c search_path=app_2,public");
    assert_eq!(sim.runs.values().copied().collect::<Vec<_>>(), [1]);
}

#[test]
fn a_failing_expand_rolls_back_before_anything_starts_and_the_abort_runs() {
    let (mut sim, d, now) = v2_with_database(&["a", "b"], "");
    sim.db.insert("expand".into(), TaskEnding::Fail(3));
    let (d, _) = run_until(&mut sim, d, now, |d| d.state.is_final());
    assert_eq!(
        (d.state, phase_of(&d)),
        (State::RolledBack, DbPhase::Aborted)
    );
    assert_eq!(
        d.reason.as_deref(),
        Some("database expand failed on a (exit status: 3): expand on a")
    );
    assert!(d.hosts.values().all(|h| h.phase == HostPhase::Waiting));
    assert_eq!(d.traffic, 0);
    for h in ["a", "b"] {
        assert_eq!(sim.live(h).as_deref(), Some("1"), "{h} never saw 2");
    }
    assert_eq!(sim.runs["d-2/abort"], 1);
    assert_eq!(
        run_of(&d, TaskPhase::Expand).end.unwrap().exit_code,
        Some(3)
    );
    // A first release whose expand fails ends `failed`, after its abort.
    let mut sim = Sim::new(&["a"]);
    sim.db.insert("expand".into(), TaskEnding::Fail(1));
    let d = start(
        &sim,
        &db_plan("1", SHA1, ""),
        "d-1",
        DatabaseContext::default(),
    );
    let (d, _) = run_until(&mut sim, d, 0, |d| d.state.is_final());
    assert_eq!((d.state, phase_of(&d)), (State::Failed, DbPhase::Aborted));
}

#[test]
fn a_rollback_after_a_good_expand_runs_the_abort_once_the_new_slots_carry_no_traffic() {
    let steps = "steps = [{ traffic = 30, hold = \"1h\" }, { traffic = 100 }]";
    let (mut sim, d, now) = v2_with_database(&["a", "b"], steps);
    let (d, now) = run_until(&mut sim, d, now, |d| d.step_switched_unix_ms.is_some());
    sim.db.insert("abort".into(), TaskEnding::Hang);
    let out = decide(&d, &sim.views(), order(Command::Abort), now);
    assert!(
        out.targets.values().all(|t| t.database_task.is_none()),
        "no abort while the new slots may still carry traffic"
    );
    let mut d = out.deployment;
    sim.apply(out.targets);
    // The hosts have not confirmed the old weights yet: nothing runs.
    let out = decide(&d, &sim.views(), None, now + 100);
    assert_eq!(phase_of(&out.deployment), DbPhase::Expanded);
    sim.converge();
    for i in 1..4 {
        let (next, _) = sim.step(&d, now + 200 * i);
        d = next;
    }
    assert_eq!(
        (d.state, phase_of(&d)),
        (State::RollingBack, DbPhase::Aborting)
    );
    let rollback = d.rollback.clone().unwrap();
    let abort = run_of(&d, TaskPhase::Abort);
    assert!(
        rollback
            .done_unix_ms
            .is_some_and(|t| t <= abort.started_unix_ms)
    );
    for h in ["a", "b"] {
        let dsd = &sim.desired[h];
        assert_eq!(
            dsd.weight(d.hosts[h].new_slot),
            0,
            "{h}: the new slot has no traffic"
        );
    }
    let runner = abort.host.clone();
    sim.tasks.get_mut(&runner).unwrap()[0].state = DatabaseTaskState::Succeeded as i32;
    sim.converge();
    let (d, _) = run_until(&mut sim, d, now + 1_000, |d| d.state.is_final());
    assert_eq!((d.state, phase_of(&d)), (State::Aborted, DbPhase::Aborted));
    assert_eq!(sim.runs["d-2/abort"], 1);
}

#[test]
fn an_interrupted_expand_pauses_and_resume_runs_it_again_as_a_new_task() {
    let (mut sim, d, now) = v2_with_database(&["a", "b"], "");
    sim.db.insert("expand".into(), TaskEnding::Hang);
    let (d, _) = sim.step(&d, now);
    // The agent restarted while it ran.
    sim.tasks.get_mut("a").unwrap()[0].state = DatabaseTaskState::Interrupted as i32;
    sim.converge();
    let (d, events) = sim.step(&d, now + 100);
    assert_eq!(d.state, State::Paused);
    let reason = d.reason.clone().unwrap();
    assert!(
        reason.starts_with("paused: database expand: interrupted: the agent restarted"),
        "{reason}"
    );
    assert!(
        kinds(&events)
            .iter()
            .any(|k| matches!(k, Kind::DatabaseStalled { host, .. } if host == "a"))
    );
    assert!(
        sim.desired["a"].database_task.is_none(),
        "a stalled task is not sent"
    );
    // Paused, nothing runs again by itself.
    let (d, _) = sim.step(&d, now + 60_000);
    assert_eq!(sim.runs.len(), 1);
    sim.db.remove("expand");
    let out = decide(&d, &sim.views(), order(Command::Resume), now + 60_100);
    let d = out.deployment;
    assert_eq!(d.state, State::Preparing);
    assert_eq!(
        out.targets["a"]
            .database_task
            .as_ref()
            .map(|t| t.id.as_str()),
        Some("d-2/expand#2")
    );
    sim.apply(out.targets);
    sim.converge();
    let (d, _) = run_until(&mut sim, d, now + 60_200, |d| d.state.is_final());
    assert_eq!(
        (d.state, phase_of(&d)),
        (State::Succeeded, DbPhase::Expanded)
    );
    assert_eq!(
        sim.runs,
        [
            ("d-2/expand".to_string(), 1),
            ("d-2/expand#2".to_string(), 1)
        ]
        .into()
    );
}

#[test]
fn a_runner_lost_mid_expand_pauses_naming_it_and_resume_runs_on_a_live_host() {
    let (mut sim, d, now) = v2_with_database(&["a", "b"], "");
    sim.db.insert("expand".into(), TaskEnding::Hang);
    let (d, _) = sim.step(&d, now);
    sim.lost.insert("a".into(), 4_999);
    let (d, _) = sim.step(&d, now + 100);
    assert_eq!(d.state, State::Preparing, "not lost yet");
    sim.lost.insert("a".into(), 5_000);
    let (d, _) = sim.step(&d, now + 200);
    assert_eq!(d.state, State::Paused);
    assert!(
        d.reason.as_deref().is_some_and(|r| r.contains(
            "host a unreachable for more than 5s while the command ran (it may still be running there)"
        )),
        "{:?}",
        d.reason
    );
    sim.db.remove("expand");
    let out = decide(&d, &sim.views(), order(Command::Resume), now + 300);
    assert_eq!(
        out.targets["b"]
            .database_task
            .as_ref()
            .map(|t| t.id.as_str()),
        Some("d-2/expand#2"),
        "b runs it: a is not reachable"
    );
}

#[test]
fn run_on_names_the_hosts_that_may_run_the_commands() {
    let mut sim = Sim::new(&["a", "b", "c"]);
    sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    let ctx = DatabaseContext {
        runners: vec!["c".into()],
        ..Default::default()
    };
    let d = start(&sim, &db_plan("2", SHA2, ""), "d-2", ctx);
    let (_, _) = sim.step(&d, 1_000);
    assert!(sim.desired["c"].database_task.is_some());
    assert!(sim.desired["a"].database_task.is_none());
    // None of them reachable: it stands still, and says why.
    let mut sim = Sim::new(&["a", "c"]);
    sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    let ctx = DatabaseContext {
        runners: vec!["c".into()],
        ..Default::default()
    };
    sim.lost.insert("c".into(), 1);
    let d = start(&sim, &db_plan("2", SHA2, ""), "d-2", ctx);
    let (d, _) = sim.step(&d, 1_000);
    assert_eq!(d.state, State::Paused);
    assert!(
        d.reason
            .as_deref()
            .is_some_and(|r| r.contains("no host that may run it is reachable (c)")),
        "{:?}",
        d.reason
    );
}

/// v1 (with a change, contracted) then v2 (with a change) live on a and b: returns
/// the fleet, v2's deployment (expanded, succeeded) and the time.
fn v2_live() -> (Sim, DeploymentRecord, u64) {
    let mut sim = Sim::new(&["a", "b"]);
    let d1 = start(
        &sim,
        &db_plan("1", SHA1, ""),
        "d-1",
        DatabaseContext::default(),
    );
    let (_, now) = run_until(&mut sim, d1, 0, |d| d.state.is_final());
    let ctx = DatabaseContext {
        previous_schema: Some("app_1".into()),
        ..Default::default()
    };
    let d2 = start(&sim, &db_plan("2", SHA2, ""), "d-2", ctx);
    let (d2, now) = run_until(&mut sim, d2, now, |d| d.state.is_final());
    assert_eq!(
        (d2.state, phase_of(&d2)),
        (State::Succeeded, DbPhase::Expanded)
    );
    (sim, d2, now)
}

#[test]
fn the_contract_runs_after_success_once_the_previous_release_is_gone_from_every_host() {
    let (mut sim, d2, now) = v2_live();
    for h in ["a", "b"] {
        let idle = d2.hosts[h].old_slot.unwrap();
        assert!(sim.desired[h].slot(idle).is_some(), "1 warm on {h}");
    }
    // Nothing happens to a succeeded deployment until its contract is ordered.
    let out = decide(&d2, &sim.views(), None, now);
    assert!(out.targets.is_empty() && out.events.is_empty());
    sim.db.insert("contract".into(), TaskEnding::Hang);
    let contract = Some(ops(Command::Contract));
    let out = decide(&d2, &sim.views(), contract, now);
    let d = out.deployment;
    assert_eq!(phase_of(&d), DbPhase::Contracting);
    assert!(
        out.targets.values().all(|t| t.database_task.is_none()),
        "not while 1 is still on a host"
    );
    for (h, t) in &out.targets {
        assert!(
            t.slot(d.hosts[h].old_slot.unwrap()).is_none(),
            "{h} lets 1 go"
        );
        assert_eq!(t.weight(d.hosts[h].new_slot), 100);
    }
    sim.apply(out.targets);
    sim.converge();
    let (d, _) = sim.step(&d, now + 100);
    let task = sim.desired["a"].database_task.clone().unwrap();
    assert_eq!(task.id, "d-2/contract");
    assert_eq!(task.env["CUTOVER_PREVIOUS_DB_SCHEMA"], "app_1");
    assert_eq!(task.env["CUTOVER_DB_PHASE"], "contract");
    sim.tasks.get_mut("a").unwrap()[0].state = DatabaseTaskState::Succeeded as i32;
    sim.converge();
    let (contracted, _) = sim.step(&d, now + 200);
    assert_eq!(phase_of(&contracted), DbPhase::Contracted);
    assert!(sim.desired["a"].database_task.is_none());
    // The service learns that the previous release cannot come back.
    let svc = ServiceRecord {
        name: "web".into(),
        live: Some(d2.plan.clone()),
        db_pending: Some("d-2".into()),
        ..Default::default()
    };
    let svc = changed_service(&svc, &d, &contracted, "2026-01-01T00:00:00.000Z").unwrap();
    assert_eq!(svc.db_pending, None);
    assert_eq!(
        svc.rollback_refused.as_deref(),
        Some(
            "the database was contracted by d-2 at 2026-01-01T00:00:00.000Z: release 1 would read a schema that no longer exists; deploy a fix forward"
        )
    );
    assert_eq!(sim.runs.get("d-2/contract"), Some(&1));
}

#[test]
fn a_failed_contract_is_run_again_on_the_next_order() {
    let (mut sim, d2, now) = v2_live();
    sim.db.insert("contract".into(), TaskEnding::Fail(1));
    let out = decide(&d2, &sim.views(), Some(ops(Command::Contract)), now);
    sim.apply(out.targets);
    sim.converge();
    let (d, _) = run_until(&mut sim, out.deployment, now, |d| {
        phase_of(d) == DbPhase::Failed
    });
    assert_eq!(
        failure(d.database.change.as_ref().unwrap()).as_deref(),
        Some("on a (exit status: 1): contract on a")
    );
    sim.db.remove("contract");
    let out = decide(&d, &sim.views(), Some(ops(Command::Contract)), now + 10_000);
    assert_eq!(phase_of(&out.deployment), DbPhase::Contracting);
    assert_eq!(
        out.targets["a"]
            .database_task
            .as_ref()
            .map(|t| t.id.as_str()),
        Some("d-2/contract#2")
    );
}

#[test]
fn the_next_deployment_waits_for_the_contract_of_the_previous_change_before_preparing() {
    let (mut sim, d2, now) = v2_live();
    sim.db.insert("contract".into(), TaskEnding::Hang);
    let ctx = DatabaseContext {
        pending: Some("d-2".into()),
        previous_schema: Some("app_2".into()),
        ..Default::default()
    };
    let d3 = start(&sim, &db_plan("3", SHA3, ""), "d-3", ctx);
    assert_eq!(d3.database.after.as_deref(), Some("d-2"));
    // The engine orders d-2's contract as it creates d-3.
    let out = decide(&d2, &sim.views(), Some(ops(Command::Contract)), now);
    let mut d2 = out.deployment;
    sim.apply(out.targets);
    sim.converge();
    let mut d3 = d3;
    for i in 1..5 {
        let out = decide(&d2, &sim.views(), None, now + i * 100);
        d2 = out.deployment;
        sim.apply(out.targets);
        let out = decide_with(&d3, &sim.views(), after(&d2), None, now + i * 100);
        d3 = out.deployment;
        assert!(out.targets.is_empty(), "d-3 touches nothing meanwhile");
        sim.apply(out.targets);
        sim.converge();
    }
    assert_eq!(
        (d3.state, phase_of(&d2)),
        (State::Pending, DbPhase::Contracting)
    );
    assert!(
        sim.desired["a"].database_task.is_some(),
        "d-2's contract runs"
    );
    sim.tasks.get_mut("a").unwrap()[0].state = DatabaseTaskState::Succeeded as i32;
    sim.converge();
    let out = decide(&d2, &sim.views(), None, now + 1_000);
    let d2 = out.deployment;
    sim.apply(out.targets);
    assert_eq!(phase_of(&d2), DbPhase::Contracted);
    sim.db.clear();
    let out = decide_with(&d3, &sim.views(), after(&d2), None, now + 1_100);
    assert_eq!(out.deployment.database.after, None);
    assert_eq!(out.deployment.state, State::Preparing);
    assert!(kinds(&out.events).contains(&Kind::DatabaseWaited {
        deployment: "d-2".into()
    }));
    assert_eq!(
        out.targets["a"]
            .database_task
            .as_ref()
            .map(|t| t.id.as_str()),
        Some("d-3/expand"),
        "then its own expand"
    );
}

#[test]
fn the_next_deployment_pauses_when_the_contract_it_waits_for_fails() {
    let (mut sim, d2, now) = v2_live();
    sim.db.insert("contract".into(), TaskEnding::Fail(2));
    let ctx = DatabaseContext {
        pending: Some("d-2".into()),
        ..Default::default()
    };
    let d3 = start(&sim, &plan("3", SHA3, ""), "d-3", ctx);
    let out = decide(&d2, &sim.views(), Some(ops(Command::Contract)), now);
    sim.apply(out.targets);
    sim.converge();
    let (d2, _) = run_until(&mut sim, out.deployment, now, |d| {
        phase_of(d) == DbPhase::Failed
    });
    let out = decide_with(&d3, &sim.views(), after(&d2), None, now + 5_000);
    let d3 = out.deployment;
    assert_eq!(d3.state, State::Paused);
    assert_eq!(
        d3.reason.as_deref(),
        Some(
            "paused: the database contract of d-2, which must run before this deployment prepares, failed: on a (exit status: 2): contract on a; fix the database, then `resume` runs it again, or `abort`"
        )
    );
    // Abort: it ends, having touched nothing.
    let (d3, _) = {
        let out = decide_with(
            &d3,
            &sim.views(),
            after(&d2),
            order(Command::Abort),
            now + 6_000,
        );
        (out.deployment, out.targets)
    };
    assert_eq!(d3.state, State::Aborted);
}

#[test]
fn an_undone_change_is_aborted_once_its_release_is_gone_from_every_host() {
    let (mut sim, d2, now) = v2_live();
    // `cutover rollback`: 1 again, everywhere at once; it succeeds.
    let back = crate::rollout::rollback_plan(db_plan("1", SHA1, ""));
    let hosts = sim
        .observed
        .keys()
        .map(|h| (h.clone(), sim.desired.get(h).cloned()))
        .collect();
    let s = Submission {
        id: "d-3".into(),
        plan: back,
        plan_path: "(rollback)".into(),
        is_rollback: true,
        restart: false,
        previous_release: Some("2".into()),
        actor: "ops@desk",
        database: DatabaseContext {
            pending: Some("d-2".into()),
            ..Default::default()
        },
    };
    let d3 = submit(s, &hosts, now).deployment;
    assert_eq!(d3.database.undoes.as_deref(), Some("d-2"));
    assert!(d3.database.change.is_none(), "a rollback expands nothing");
    let (d3, now) = run_until(&mut sim, d3, now, |d| d.state.is_final());
    assert_eq!(d3.state, State::Succeeded);
    assert!(sim.runs.keys().all(|k| !k.starts_with("d-3")));
    let svc = concluded(ServiceRecord::default(), &d3, now);
    assert!(
        svc.rollback_refused.is_some(),
        "2 cannot come back by rollback"
    );
    // The engine then orders d-2's change undone.
    let out = decide(&d2, &sim.views(), Some(ops(Command::Undo)), now);
    assert_eq!(phase_of(&out.deployment), DbPhase::Aborting);
    sim.apply(out.targets);
    sim.converge();
    let (d2, _) = run_until(&mut sim, out.deployment, now, |d| {
        phase_of(d) == DbPhase::Aborted
    });
    assert_eq!(sim.runs.get("d-2/abort"), Some(&1));
    for h in ["a", "b"] {
        let d = &sim.desired[h];
        let holds_2 = Slot::BOTH
            .iter()
            .any(|s| d.slot(*s).and_then(SlotSpec::release_key).map(|k| k.0) == Some("2"));
        assert!(!holds_2, "{h} no longer keeps 2, whose schema is gone");
    }
    assert_eq!(
        d2.state,
        State::Succeeded,
        "the deployment's own state stays"
    );
}

#[test]
fn the_contract_never_runs_while_a_host_still_serves_the_previous_release() {
    let mut sim = Sim::new(&["a", "b"]);
    let (_, now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    sim.failing
        .insert(("b".into(), "2".into()), "disk full".into());
    let mut p = db_plan("2", SHA2, "");
    p.strategy.max_failed_hosts = 1;
    let d2 = start(&sim, &p, "d-2", DatabaseContext::default());
    let (d2, now) = run_until(&mut sim, d2, now, |d| d.state.is_final());
    assert_eq!(d2.state, State::Succeeded);
    assert_eq!(sim.live("b").as_deref(), Some("1"));
    let out = decide(&d2, &sim.views(), Some(ops(Command::Contract)), now);
    let c = out.deployment.database.change.unwrap();
    assert_eq!(
        c.stalled(),
        Some(
            "host b still serves release 1, whose schema the contract takes away; move it off that release first"
        )
    );
    assert!(out.targets.values().all(|t| t.database_task.is_none()));
}

#[test]
fn deciding_again_on_the_same_inputs_sends_no_task_twice() {
    let (mut sim, mut d, mut now) = v2_with_database(&["a", "b"], "");
    sim.db.insert("expand".into(), TaskEnding::Hang);
    for round in 0..30 {
        if round == 10 {
            sim.tasks.get_mut("a").unwrap()[0].state = DatabaseTaskState::Succeeded as i32;
        }
        let out = decide(&d, &sim.views(), None, now);
        sim.apply(out.targets);
        let again = decide(&out.deployment, &sim.views(), None, now);
        assert!(
            again.targets.is_empty(),
            "round {round}: {:?}",
            again.targets.keys()
        );
        assert!(again.events.is_empty(), "round {round}: {:?}", again.events);
        d = out.deployment;
        sim.converge();
        now += 100;
    }
    assert_eq!(d.state, State::Succeeded);
    assert_eq!(sim.runs.values().sum::<u32>(), 1);
}

#[test]
fn a_slots_search_path_follows_its_release_after_any_pgoptions_of_its_own() {
    let p = db_plan("2.0.1-rc1", SHA2, "");
    let mut env = BTreeMap::from([(
        "PGOPTIONS".to_string(),
        "-c statement_timeout=5s".to_string(),
    )]);
    slot_env(p.database.as_ref().unwrap(), &p.release.version, &mut env);
    assert_eq!(
        env["PGOPTIONS"],
        "-c statement_timeout=5s -c search_path=app_2_0_1_rc1,public"
    );
    assert_eq!(env["CUTOVER_DB_SCHEMA"], "app_2_0_1_rc1");
    // A plan without `[database]` gets nothing of the kind.
    let spec = crate::rollout::desired::slot_spec(&plan("2", SHA2, ""));
    assert!(spec.run.unwrap().env.is_empty());
}

/// `rollback --to` crosses every release since the one it goes back to: a schema change
/// contracted since (or being contracted, or failed) leaves that release without its
/// schema, and so does its own change undone; a change only expanded is undone by the
/// rollback itself.
#[test]
fn rollback_to_is_refused_over_a_contracted_or_undone_change() {
    use crate::rollout::rollback_to_refusal;
    let live = |id: &str, release: &str, at: u64, phase: Option<DbPhase>| {
        let mut d = crate::rollout::tests::fixture::deployment();
        d.id = id.into();
        d.release = release.into();
        d.state = State::Succeeded;
        d.created_unix_ms = at;
        d.database.change = phase.map(|phase| crate::model::SchemaChange {
            schema: format!("app_{release}"),
            previous_schema: None,
            phase,
            runners: vec!["a".into()],
            runs: Vec::new(),
            retry: false,
        });
        d
    };
    let service = live("d-1", "1", 1, None).service;
    let history = |later: Option<DbPhase>, own: Option<DbPhase>| {
        vec![
            live("d-1", "1", 1, own),
            live("d-2", "2", 2, later),
            live("d-3", "3", 3, None),
        ]
    };
    for ok in [None, Some(DbPhase::Expanded), Some(DbPhase::Aborted)] {
        assert_eq!(
            rollback_to_refusal(&history(ok, Some(DbPhase::Contracted)), &service, "1"),
            None,
            "{ok:?}"
        );
    }
    for (bad, why) in [
        (DbPhase::Contracted, "was contracted"),
        (DbPhase::Contracting, "is being contracted now"),
        (DbPhase::Failed, "failed its last command"),
    ] {
        let refused = rollback_to_refusal(&history(Some(bad), None), &service, "1").unwrap();
        assert_eq!(
            refused,
            format!(
                "the database change of d-2 (release 2) {why}: release 1's schema may be gone; deploy a fix forward"
            )
        );
        // Going back to the release that made the change is fine.
        assert_eq!(
            rollback_to_refusal(&history(Some(bad), None), &service, "2"),
            None
        );
    }
    let undone = rollback_to_refusal(&history(None, Some(DbPhase::Aborted)), &service, "1");
    assert_eq!(
        undone.as_deref(),
        Some(
            "the database change of d-1 (release 1) was undone since; deploy release 1 again instead"
        )
    );
}
