//! Rollout semantics end to end: what a pause does to a hold, what makes a prepared slot
//! (the release and its run and health spec), and what a failed attempt leaves behind.

use std::time::{Duration, Instant};

use tests::{Cluster, Load, Value, wait_until};

fn show(c: &Cluster, id: &str) -> Value {
    serde_json::from_str(&c.cli_ok(&["show", id, "--output", "json"])).expect("show json")
}

fn held(c: &Cluster, id: &str) -> f64 {
    show(c, id)["phase_elapsed_s"].as_f64().unwrap_or(f64::NAN)
}

#[test]
fn a_pause_freezes_the_hold_and_resume_continues_the_rest_of_it() {
    let c = Cluster::start(65, 2);
    c.deploy_versions(&["1.0.0"]);
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 10, hold = "8s" }, { traffic = 100 }]"#)
        .write("held");
    let id = c.deploy_until_holding(&plan);
    wait_until(Duration::from_secs(10), "2 s of the hold", || {
        held(&c, &id) >= 2.0
    });
    c.cli_ok(&["pause", &id]);
    let at_pause = held(&c, &id);
    // Paused for longer than the whole hold: nothing moves, the hold clock stands still.
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let s = show(&c, &id);
        assert_eq!(s["state"], "paused", "{s}");
        assert_eq!(s["traffic"], 10);
        let h = s["phase_elapsed_s"].as_f64().unwrap_or(f64::NAN);
        assert!(
            (h - at_pause).abs() < 1.0,
            "the hold clock stood still while paused: {at_pause} then {h}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Timed from before the command: however long the CLI takes on a busy machine, the
    // rest of the hold runs after this instant.
    let resumed = Instant::now();
    c.cli_ok(&["resume", &id]);
    wait_until(Duration::from_secs(30), "success", || {
        c.status(&id)["state"] == "succeeded"
    });
    let rest = resumed.elapsed();
    assert!(
        rest >= Duration::from_secs(4),
        "resume went on with the rest of the hold (about {:.1} s), not at once: {rest:?}",
        8.0 - at_pause
    );
    assert!(c.all_serving("2.0.0"), "{:?}", c.versions());
}

#[test]
fn a_warm_slot_is_prepared_anew_when_the_plan_changed_its_spec() {
    let c = Cluster::start(66, 2);
    c.deploy_versions(&["1.0.0", "2.0.0"]);
    // 1.0.0 is still warm in the idle slot. Deploy it again with a command that cannot
    // run: the slot must be prepared with the new spec, and fail as a preparation.
    let plan = c
        .plan("1.0.0")
        .command(&["./bin/cutover-sample", "no-such-mode", "--port", "${PORT}"])
        .steps(r#"[{ traffic = 10, hold = "1s" }, { traffic = 100 }]"#)
        .write("broken");
    let load = Load::start(c.addrs(), 2);
    let (code, id, err) = c.deploy_wait(&plan);
    let report = load.stop();
    assert_eq!(code, 3, "{err}");
    let s = c.status(&id);
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("host web-") && reason.contains("process exited"),
        "{reason}"
    );
    assert!(!reason.contains("while serving"), "{reason}");
    assert_eq!(
        s["intervals"].as_array().map(Vec::len),
        Some(0),
        "no traffic step ever started"
    );
    report.assert_none_failed();
    assert_eq!(
        report.versions().keys().collect::<Vec<_>>(),
        vec!["release 2.0.0"],
        "no client ever reached the broken slot"
    );
    assert!(c.all_serving("2.0.0"), "{:?}", c.versions());

    // The live release with another env is a change to deploy, not a no-op.
    let plan = c.plan("2.0.0").env("WORKERS", "4").write("env");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("nothing to do"), "{err}");
    let timeline = show(&c, &id)["timeline"].to_string();
    assert!(timeline.contains("step_started"), "{timeline}");
}

#[test]
fn a_failed_first_deployment_leaves_no_port_behind_for_the_next_one() {
    let c = Cluster::start(67, 1);
    let busy = std::net::TcpListener::bind("127.67.0.2:0").expect("bind");
    let taken = busy.local_addr().expect("addr").port();
    let v1 = c.pack("1.0.0", &[]);
    let plan = c
        .plan("1.0.0")
        .artifact(&v1.url, &v1.sha256)
        .listen(taken)
        .write("taken");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 4, "{err}");
    let reason = c.reason(&id);
    assert!(reason.contains("in use"), "{reason}");
    // The same release on a free port works at once: the earlier port's error is not
    // this deployment's.
    let plan = c.plan("1.0.0").artifact(&v1.url, &v1.sha256).write("free");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
    drop(busy);
}
