//! The decision as a whole, on a simulated fleet: preparation, steps, waves, pauses,
//! failures, lost hosts and rollbacks, and properties over random plans and commands.

use cutover_proto::v1::SlotSpec;
use cutover_shared::plan::{OnHostLost, Plan};

use super::*;
use crate::model::{HostPhase, PauseCause, State};

pub(super) mod fixture;

use fixture::{SHA1, SHA2, Sim, holding_v2, order, plan, run_until, v2_over_v1};

#[test]
fn first_deployment_goes_to_100_then_v2_switches_all_hosts_at_once() {
    let mut sim = Sim::new(&["a", "b", "c"]);
    let v1 = plan("1", SHA1, "steps = [{ traffic = 100 }]");
    let (dep, now) = sim.run(sim.start(&v1), 0, 100, 50);
    assert_eq!(dep.state, State::Succeeded);
    for h in ["a", "b", "c"] {
        assert_eq!(sim.live(h).as_deref(), Some("1"));
    }

    let v2 = plan("2", SHA2, "steps = [{ traffic = 100 }]");
    let mut dep = sim.start(&v2);
    // max_parallel = 1: one host prepares at a time, and no weight moves until all are ready.
    let mut now = now;
    loop {
        let d = decide(&dep, &sim.views(), None, now);
        dep = d.deployment;
        let preparing = dep
            .hosts
            .values()
            .filter(|h| h.phase == HostPhase::Preparing)
            .count();
        assert!(preparing <= 1, "max_parallel respected");
        if dep.state == State::Preparing {
            for t in d.targets.values() {
                let live = t.live_slot().unwrap();
                assert_eq!(
                    t.slot(live).and_then(SlotSpec::release_key).unwrap().0,
                    "1",
                    "old release keeps all traffic while preparing"
                );
            }
        }
        sim.apply(d.targets);
        sim.converge();
        if dep.state.is_final() {
            break;
        }
        now += 100;
        assert!(now < 100_000, "deployment did not end");
    }
    assert_eq!(dep.state, State::Succeeded);
    for h in ["a", "b", "c"] {
        assert_eq!(sim.live(h).as_deref(), Some("2"));
        let d = &sim.desired[h];
        let old = d.live_slot().unwrap().other();
        assert_eq!(
            d.slot(old).and_then(SlotSpec::release_key).unwrap().0,
            "1",
            "v1 stays warm"
        );
    }
}

#[test]
fn deciding_again_on_the_same_inputs_changes_nothing() {
    let mut sim = Sim::new(&["a", "b"]);
    let v1 = plan("1", SHA1, "steps = [{ traffic = 100 }]");
    let mut dep = sim.start(&v1);
    for round in 0..20 {
        let d = decide(&dep, &sim.views(), None, round * 100);
        sim.apply(d.targets);
        let again = decide(&d.deployment, &sim.views(), None, round * 100);
        assert!(
            again.targets.is_empty(),
            "round {round}: {:?}",
            again.targets.keys()
        );
        dep = d.deployment;
        sim.converge();
    }
}

#[test]
fn a_host_failing_preparation_rolls_back_with_its_reason() {
    let mut sim = Sim::new(&["a", "b", "c"]);
    let (_, now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    sim.failing.insert(
        ("b".into(), "2".into()),
        "sha256 mismatch: expected 2222…, got 9999…".into(),
    );
    let (dep, _) = sim.run(sim.start(&plan("2", SHA2, "")), now, 100, 100);
    assert_eq!(dep.state, State::RolledBack);
    assert_eq!(
        dep.reason.as_deref(),
        Some("host b: sha256 mismatch: expected 2222…, got 9999…")
    );
    for h in ["a", "b", "c"] {
        assert_eq!(sim.live(h).as_deref(), Some("1"), "{h} back on v1");
        let d = &sim.desired[h];
        let idle = d.live_slot().unwrap().other();
        assert!(d.slot(idle).is_none(), "new slot stopped on {h}");
    }
}

#[test]
fn failures_within_max_failed_hosts_go_on() {
    let mut sim = Sim::new(&["a", "b", "c"]);
    let (_, now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    sim.failing
        .insert(("c".into(), "2".into()), "disk full".into());
    let mut p = plan("2", SHA2, "");
    p.strategy.max_failed_hosts = 1;
    let (dep, _) = sim.run(sim.start(&p), now, 100, 100);
    assert_eq!(dep.state, State::Succeeded);
    assert_eq!(sim.live("a").as_deref(), Some("2"));
    assert_eq!(
        sim.live("c").as_deref(),
        Some("1"),
        "the failed host keeps the old release"
    );
    assert_eq!(dep.hosts["c"].phase, HostPhase::Failed);
}

#[test]
fn first_deployment_failure_ends_failed() {
    let mut sim = Sim::new(&["a"]);
    sim.failing.insert(
        ("a".into(), "1".into()),
        "command ./web: not found in the release".into(),
    );
    let (dep, _) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    assert_eq!(dep.state, State::Failed);
    assert!(dep.reason.unwrap().contains("not found"));
}

#[test]
fn abort_during_hold_rolls_back_and_steps_respect_traffic() {
    let mut sim = Sim::new(&["a", "b"]);
    let steps = "steps = [{ traffic = 10, hold = \"1h\" }, { traffic = 100 }]";
    let (mut dep, mut now) = v2_over_v1(&mut sim, steps);
    for _ in 0..30 {
        let d = decide(&dep, &sim.views(), None, now);
        dep = d.deployment;
        for t in d.targets.values() {
            let new = dep.hosts.values().next().unwrap().new_slot;
            assert!(
                t.weight(new) <= 10,
                "weights never exceed the step's traffic"
            );
        }
        sim.apply(d.targets);
        sim.converge();
        now += 100;
    }
    assert_eq!(dep.state, State::Progressing);
    assert!(dep.step_switched_unix_ms.is_some(), "holding at 10%");
    let d = decide(&dep, &sim.views(), order(Command::Abort), now);
    let (dep, _) = {
        sim.apply(d.targets);
        sim.converge();
        sim.run(d.deployment, now, 100, 20)
    };
    assert_eq!(dep.state, State::Aborted);
    assert_eq!(sim.live("a").as_deref(), Some("1"));
    assert_eq!(
        sim.desired["a"].weight(sim.desired["a"].live_slot().unwrap()),
        100
    );
}

#[test]
fn same_release_live_everywhere_is_untouched() {
    let mut sim = Sim::new(&["a", "b"]);
    let v1 = plan("1", SHA1, "");
    sim.run(sim.start(&v1), 0, 100, 50);
    let dep = sim.start(&v1);
    assert!(dep.hosts.values().all(|h| h.untouched));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn ladder(traffic: &[u32]) -> String {
        let mut t: Vec<u32> = traffic.iter().map(|x| x.clamp(&1, &99)).copied().collect();
        t.sort_unstable();
        t.dedup();
        let mut steps: Vec<String> = t
            .iter()
            .map(|x| format!("{{ traffic = {x}, hold = \"1s\" }}"))
            .collect();
        steps.push("{ traffic = 100 }".into());
        format!("steps = [{}]", steps.join(", "))
    }

    #[derive(Debug, Clone)]
    struct Case {
        hosts: usize,
        traffic: Vec<u32>,
        failing: Vec<bool>,
        /// (round, command)
        commands: Vec<(usize, u8)>,
        tick_ms: u64,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            1usize..5,
            proptest::collection::vec(1u32..100, 0..4),
            proptest::collection::vec(any::<bool>(), 5),
            proptest::collection::vec((0usize..60, 0u8..4), 0..4),
            prop_oneof![Just(100u64), Just(400), Just(1500)],
        )
            .prop_map(|(hosts, traffic, failing, commands, tick_ms)| Case {
                hosts,
                traffic,
                failing,
                commands,
                tick_ms,
            })
    }

    fn command(c: u8) -> Command {
        match c {
            0 => Command::Pause,
            1 => Command::Resume,
            2 => Command::Promote,
            _ => Command::Abort,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn rollouts_are_idempotent_bounded_and_abort_restores_the_old_release(case in case()) {
            let names: Vec<String> = (0..case.hosts).map(|i| format!("h{i}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut sim = Sim::new(&refs);
            let (_, mut now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
            for (i, n) in names.iter().enumerate() {
                if case.failing[i] {
                    sim.failing.insert((n.clone(), "2".into()), "broken".into());
                }
            }
            let mut p = plan("2", SHA2, &ladder(&case.traffic));
            p.strategy.max_failed_hosts = 1;
            let mut dep = sim.start(&p);
            for round in 0..80 {
                let cmd = case.commands.iter().find(|(r, _)| *r == round).map(|(_, c)| command(*c));
                let d = decide(&dep, &sim.views(), cmd.and_then(order), now);
                dep = d.deployment;
                // An end is only reached once every host has what it needs.
                if dep.state.is_final() {
                    let pending = d.targets.keys().filter(|h| dep.hosts[*h].phase != HostPhase::Failed).count();
                    prop_assert_eq!(pending, 0, "ended {:?} with changes still to send", dep.state);
                }
                // Weights never exceed the current step's traffic.
                let cap = if dep.state == State::RollingBack { 0 } else { dep.traffic.max(p.strategy.steps[dep.step as usize].traffic) };
                for (h, t) in &d.targets {
                    let host = &dep.hosts[h];
                    prop_assert!(t.weight(host.new_slot) <= cap, "{h}: weight {} over {cap}", t.weight(host.new_slot));
                }
                sim.apply(d.targets);
                // Deciding again on what was just written changes nothing.
                let again = decide(&dep, &sim.views(), None, now);
                prop_assert!(again.targets.is_empty());
                sim.converge();
                if dep.state.is_final() {
                    break;
                }
                now += case.tick_ms;
            }
            // From wherever it stands, an abort ends with every host on the old release.
            if !dep.state.is_final() {
                let d = decide(&dep, &sim.views(), order(Command::Abort), now);
                sim.apply(d.targets);
                sim.converge();
                let (end, _) = sim.run(d.deployment, now, 100, 20);
                dep = end;
            }
            prop_assert!(dep.state.is_final());
            if dep.state != State::Succeeded {
                for n in &names {
                    let live = sim.live(n);
                    prop_assert_eq!(live.as_deref(), Some("1"), "{} not back on 1 ({:?})", n, dep.state);
                    let d = &sim.desired[n];
                    prop_assert_eq!(d.weight(d.live_slot().unwrap()), 100);
                }
            }
        }
    }
}

#[test]
fn host_waves_touch_only_the_hosts_a_step_needs() {
    let mut sim = Sim::new(&["a", "b", "c", "d"]);
    let steps = "steps = [{ traffic = 100, hosts = 1, pause = true }, { traffic = 100, hosts = \"50%\", pause = true }, { traffic = 100 }]";
    let (dep, now) = v2_over_v1(&mut sim, steps);
    let (dep, now) = sim.run(dep, now, 100, 40);
    assert_eq!(dep.state, State::Paused);
    assert_eq!(sim.live("a").as_deref(), Some("2"));
    for h in ["b", "c", "d"] {
        assert_eq!(sim.live(h).as_deref(), Some("1"));
        assert!(
            sim.desired[h]
                .slot(sim.desired[h].live_slot().unwrap().other())
                .is_none(),
            "{h} untouched until a later step needs it"
        );
    }
    let d = decide(&dep, &sim.views(), order(Command::Promote), now);
    sim.apply(d.targets);
    sim.converge();
    let (dep, _) = sim.run(d.deployment, now, 100, 40);
    assert_eq!(dep.state, State::Paused);
    assert_eq!(sim.live("b").as_deref(), Some("2"));
    assert_eq!(sim.live("c").as_deref(), Some("1"));
}

#[test]
fn a_lost_host_is_handled_as_the_plan_says() {
    for (policy, want) in [
        ("pause", State::Paused),
        ("rollback", State::RolledBack),
        ("continue", State::Succeeded),
    ] {
        let mut sim = Sim::new(&["a", "b", "c"]);
        let (_, mut now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
        let mut p = plan(
            "2",
            SHA2,
            "steps = [{ traffic = 10, hold = \"5s\" }, { traffic = 100 }]",
        );
        p.strategy.on_host_lost = match policy {
            "pause" => OnHostLost::Pause,
            "rollback" => OnHostLost::Rollback,
            _ => OnHostLost::Continue,
        };
        p.strategy.host_lost_after = cutover_shared::Duration::from_secs(30);
        let mut dep = sim.start(&p);
        for round in 0..200 {
            if round == 10 {
                sim.lost.insert("b".into(), 0);
            }
            if let Some(ms) = sim.lost.get_mut("b") {
                *ms += 500;
            }
            let d = decide(&dep, &sim.views(), None, now);
            dep = d.deployment;
            sim.apply(d.targets);
            sim.converge();
            if dep.state.is_final() || dep.state == State::Paused {
                break;
            }
            now += 500;
        }
        assert_eq!(dep.state, want, "{policy}");
        assert!(
            dep.hosts["b"]
                .error
                .as_deref()
                .unwrap_or_default()
                .contains("unreachable")
        );
        if want == State::RolledBack {
            assert!(
                dep.reason
                    .as_deref()
                    .unwrap_or_default()
                    .contains("host b unreachable")
            );
            assert_eq!(sim.live("a").as_deref(), Some("1"));
            assert_eq!(
                sim.live("b").as_deref(),
                Some("1"),
                "b is told to roll back too"
            );
        } else if want == State::Succeeded {
            assert_eq!(sim.live("a").as_deref(), Some("2"));
            // b follows the fleet when it returns: told to run 2 with all its traffic.
            assert_eq!(sim.live("b").as_deref(), Some("2"));
        } else {
            assert_eq!(
                dep.hosts["b"].phase,
                HostPhase::Failed,
                "a lost host is never counted healthy"
            );
        }
    }
}

#[test]
fn the_same_error_on_two_hosts_is_a_release_fault_even_within_tolerance() {
    let mut sim = Sim::new(&["a", "b", "c", "d"]);
    let (_, now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    for h in ["b", "c"] {
        sim.failing.insert(
            (h.into(), "2".into()),
            "process exited (exit status: 1): config missing".into(),
        );
    }
    let mut p = plan("2", SHA2, "");
    p.strategy.max_failed_hosts = 2;
    let (dep, _) = sim.run(sim.start(&p), now, 100, 100);
    assert_eq!(dep.state, State::RolledBack);
    let reason = dep.reason.unwrap();
    assert!(
        reason.starts_with("hosts b, c: process exited") && reason.contains("release fault"),
        "{reason}"
    );
}

#[test]
fn pause_freezes_the_hold_and_resume_continues_the_rest_of_it() {
    let mut sim = Sim::new(&["a", "b"]);
    let (dep, _) = holding_v2(&mut sim);
    let switched = dep.step_switched_unix_ms.unwrap();
    let mut now = switched + 4_000;
    let mut dep = decide(&dep, &sim.views(), order(Command::Pause), now).deployment;
    assert_eq!(dep.state, State::Paused);
    // A minute paused: nothing moves and the hold clock stands still.
    for _ in 0..600 {
        now += 100;
        let d = decide(&dep, &sim.views(), None, now);
        dep = d.deployment;
        sim.apply(d.targets);
        sim.converge();
        assert_eq!((dep.state, dep.step), (State::Paused, 0));
        assert_eq!(dep.held_ms(now), Some(4_000));
    }
    dep = decide(&dep, &sim.views(), order(Command::Resume), now).deployment;
    assert_eq!(dep.state, State::Progressing);
    assert_eq!(
        dep.held_ms(now),
        Some(4_000),
        "the hold goes on where it stood"
    );
    let resumed = now;
    let (dep, now) = run_until(&mut sim, dep, now, |d| d.step == 1 || d.state.is_final());
    let rest = now - resumed;
    assert!(
        (6_000..=6_300).contains(&rest),
        "the rest of the hold (6 s) passed after resume, not {rest} ms"
    );
    let (dep, _) = run_until(&mut sim, dep, now, |d| d.state.is_final());
    assert_eq!(dep.state, State::Succeeded);
}

#[test]
fn promote_during_a_pause_skips_the_rest_of_the_hold() {
    let mut sim = Sim::new(&["a", "b"]);
    let (dep, _) = holding_v2(&mut sim);
    let now = dep.step_switched_unix_ms.unwrap() + 1_000;
    let dep = decide(&dep, &sim.views(), order(Command::Pause), now).deployment;
    let dep = decide(&dep, &sim.views(), order(Command::Promote), now + 5_000).deployment;
    let (_, end) = run_until(&mut sim, dep, now + 5_000, |d| d.step == 1);
    assert!(end - (now + 5_000) < 1_000, "promote went on at once");
}

#[test]
fn a_step_gate_waits_for_resume_and_then_holds() {
    let mut sim = Sim::new(&["a"]);
    let steps = "steps = [{ traffic = 10, pause = true, hold = \"3s\" }, { traffic = 100 }]";
    let (dep, now) = v2_over_v1(&mut sim, steps);
    let (dep, now) = run_until(&mut sim, dep, now, |d| d.state == State::Paused);
    assert_eq!(dep.pause.map(|p| p.cause), Some(PauseCause::StepGate));
    let later = now + 60_000;
    let dep = decide(&dep, &sim.views(), order(Command::Resume), later).deployment;
    assert_eq!(dep.state, State::Progressing);
    let (dep, end) = run_until(&mut sim, dep, later, |d| d.step == 1 || d.state.is_final());
    assert!(
        (3_000..=3_300).contains(&(end - later)),
        "the step holds 3 s after its gate: {}",
        end - later
    );
    assert_ne!(dep.state, State::Paused);
}

fn with_command(p: &Plan, command: &[&str]) -> Plan {
    let mut p = p.clone();
    p.run.command = command.iter().map(|s| s.to_string()).collect();
    p
}

#[test]
fn the_live_release_with_another_spec_is_a_change_not_a_no_op() {
    let mut sim = Sim::new(&["a"]);
    let v1 = plan("1", SHA1, "");
    sim.run(sim.start(&v1), 0, 100, 50);
    assert!(
        sim.start(&v1).hosts["a"].untouched,
        "the same plan is a no-op"
    );
    let changed = with_command(&v1, &["./web", "--workers", "4"]);
    assert!(!sim.start(&changed).hosts["a"].untouched);
}

#[test]
fn a_warm_slot_with_the_same_release_and_another_spec_is_prepared_anew() {
    let mut sim = Sim::new(&["a", "b"]);
    let (_, now) = sim.run(sim.start(&plan("1", SHA1, "")), 0, 100, 50);
    let (_, now) = sim.run(sim.start(&plan("2", SHA2, "")), now, 100, 50);
    // v1 is warm in the idle slot; deploy it again with a broken command.
    let broken = with_command(&plan("1", SHA1, ""), &["./web", "--bogus"]);
    let dep = sim.start(&broken);
    let d = decide(&dep, &sim.views(), None, now);
    assert!(
        d.deployment
            .hosts
            .values()
            .all(|h| matches!(h.phase, HostPhase::Preparing | HostPhase::Waiting)),
        "the warm slot's old report does not make a host ready: {:?}",
        d.deployment.hosts
    );
    assert_eq!(d.deployment.state, State::Preparing);
    // The agents start it with the new spec, and it fails: a preparation failure.
    sim.failing.insert(
        ("a".into(), "1".into()),
        "process exited (exit status: 2)".into(),
    );
    sim.failing.insert(
        ("b".into(), "1".into()),
        "process exited (exit status: 2)".into(),
    );
    let mut dep = d.deployment;
    sim.apply(d.targets);
    sim.converge();
    let (end, _) = sim.run(dep.clone(), now + 100, 100, 50);
    dep = end;
    assert_eq!(dep.state, State::RolledBack);
    let reason = dep.reason.clone().unwrap_or_default();
    assert!(reason.contains("process exited"), "{reason}");
    assert!(!reason.contains("while serving"), "{reason}");
    assert!(
        dep.hosts["a"]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("process exited"))
    );
    assert_eq!(dep.traffic, 0, "no step ever moved traffic");
    for h in ["a", "b"] {
        assert_eq!(sim.live(h).as_deref(), Some("2"), "{h} still serves v2");
    }
}

#[test]
fn a_failed_first_release_keeps_no_port_and_its_error_does_not_fail_the_next() {
    let mut sim = Sim::new(&["a"]);
    let v1 = plan("1", SHA1, "");
    let mut dep = sim.start(&v1);
    let d = decide(&dep, &sim.views(), None, 0);
    dep = d.deployment;
    sim.apply(d.targets);
    // The agent cannot bind the public port.
    sim.converge();
    let o = sim.observed.get_mut("a").unwrap();
    o.error = "bind 0.0.0.0:8080: Address already in use".into();
    let (dep, now) = sim.run(dep, 100, 100, 20);
    assert_eq!(dep.state, State::Failed);
    assert_eq!(
        sim.desired["a"].listen, 0,
        "the failed attempt keeps no port"
    );
    // The agent still reports the old error until it sees the next desired state.
    sim.observed.get_mut("a").unwrap().error = "bind 0.0.0.0:8080: Address already in use".into();
    let mut other = plan("1", SHA1, "");
    other.run.listen = 9090;
    let next = sim.start(&other);
    let d = decide(&next, &sim.views(), None, now);
    assert!(
        d.deployment.hosts["a"].phase != HostPhase::Failed,
        "an error from before this deployment fails nothing: {:?}",
        d.deployment.hosts["a"]
    );
    sim.apply(d.targets);
    sim.converge();
    let (dep, _) = sim.run(d.deployment, now + 100, 100, 50);
    assert_eq!(dep.state, State::Succeeded, "{:?}", dep.reason);
    assert_eq!(sim.desired["a"].listen, 9090);
}
