//! Progressive delivery end to end: traffic steps, analysis of real client traffic, and
//! fleet-wide rollback, against real `cutover` and `cutover-agent` processes.

use std::time::Duration;

use tests::{ANALYSIS_ERRORS, Cluster, Load, Value, wait_until};

fn deploy_v1(c: &Cluster, behaviour: &[&str]) {
    let plan = c.plan("1.0.0").behaviour(behaviour).write("v1");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "v1: {err}");
    assert!(c.all_serving("1.0.0"));
}

fn seconds(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[test]
fn a_good_release_walks_1_10_100_with_passing_analysis() {
    let c = Cluster::start(21, 3);
    deploy_v1(&c, &[]);
    let load = Load::start(c.addrs(), 2);
    let steps = r#"[
  { traffic = 1, hold = "1s" },
  { traffic = 10, hold = "1s" },
  { traffic = 100, hold = "1s" },
]"#;
    let analysis = r#"[analysis]
interval = "1s"
failure_limit = 2
min_requests = 5

[[analysis.metric]]
name = "error_rate"
max = 0.01

[[analysis.metric]]
name = "latency_p99"
max = 1000
"#;
    let plan = c
        .plan("2.0.0")
        .steps(steps)
        .analysis(analysis)
        .write("good");
    let (code, id, err) = c.deploy_wait(&plan);
    let report = load.stop();
    assert_eq!(code, 0, "{err}");
    report.assert_none_failed();
    let s = c.status(&id);
    assert_eq!(s["state"], "succeeded");
    let intervals = s["intervals"].as_array().cloned().unwrap_or_default();
    for step in 0..3 {
        assert!(
            intervals
                .iter()
                .any(|i| i["step"] == step && i["verdict"] == "pass"),
            "step {step} was proven by a passing interval: {intervals:?}"
        );
    }
    assert!(
        intervals.iter().all(|i| i["verdict"] != "fail"),
        "{intervals:?}"
    );
    // Progress on stderr named the steps as they came.
    assert!(
        err.contains("step 1/3 traffic 1%") && err.contains("step 2/3 traffic 10%"),
        "{err}"
    );
    assert!(c.all_serving("2.0.0"));
}

#[test]
fn a_paused_10_percent_step_sends_about_10_percent_of_requests_to_the_new_release() {
    let c = Cluster::start(22, 3);
    deploy_v1(&c, &[]);
    let plan = c
        .plan("2.0.0")
        .steps("[{ traffic = 10, pause = true }, { traffic = 100 }]")
        .write("canary");
    let id = c.deploy(&plan);
    wait_until(Duration::from_secs(30), "the 10% step to pause", || {
        let s = c.status(&id);
        s["state"] == "paused" && s["traffic"] == 10
    });
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(30), "3000 requests", || {
        load.report.ok() >= 3000
    });
    let report = load.stop();
    let v = report.versions();
    let new = v.get("release 2.0.0").copied().unwrap_or(0) as f64;
    let total = report.ok() as f64;
    let share = new / total;
    assert!(
        (0.08..=0.12).contains(&share),
        "share on the new release {share:.3} ({v:?})"
    );
    report.assert_none_failed();
    // resume finishes it.
    c.cli_ok(&["resume", &id]);
    wait_until(Duration::from_secs(30), "success", || {
        c.status(&id)["state"] == "succeeded"
    });
    assert!(c.all_serving("2.0.0"));
}

#[test]
fn a_release_failing_30_percent_of_requests_is_rolled_back_at_its_first_step() {
    let c = Cluster::start(23, 3);
    deploy_v1(&c, &[]);
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 200);
    let plan = c
        .plan("2.0.0")
        .behaviour(&["error_rate=0.3"])
        .steps(r#"[{ traffic = 10, hold = "60s" }, { traffic = 100 }]"#)
        .analysis(ANALYSIS_ERRORS)
        .write("errors");
    let (code, id, err) = c.deploy_wait(&plan);
    let failed_at_end = load.report.failed();
    let ok_at_end = load.report.ok();
    let report = load.stop();
    assert_eq!(code, 3, "{err}");
    let s = c.status(&id);
    assert_eq!(s["state"], "rolled_back");
    assert_eq!(s["step"], 0, "rolled back at the first step");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("error_rate") && reason.contains("above max"),
        "{reason}"
    );
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
    let restore = seconds(&s["rollback"]["seconds_to_restore"]);
    assert!(
        restore < 2.0,
        "first bad interval to last host switched: {restore}s"
    );
    // Only the canary's share of requests failed, for about one interval.
    let share = failed_at_end as f64 / (failed_at_end + ok_at_end) as f64;
    assert!(
        failed_at_end > 0 && share < 0.05,
        "failed {failed_at_end} of {} ({share:.4})",
        failed_at_end + ok_at_end
    );
    let after = report.failed() - failed_at_end;
    assert_eq!(after, 0, "no failures once rolled back");
}

#[test]
fn a_release_5x_slower_is_rolled_back_by_p99_against_the_baseline() {
    let c = Cluster::start(24, 2);
    deploy_v1(&c, &["delay_ms=4"]);
    let load = Load::start(c.addrs(), 4);
    let analysis = r#"[analysis]
interval = "1s"
failure_limit = 2
min_requests = 10

[[analysis.metric]]
name = "latency_p99"
max_vs_baseline = 2.0
"#;
    let plan = c
        .plan("2.0.0")
        .behaviour(&["delay_ms=20"])
        .steps(r#"[{ traffic = 20, hold = "60s" }, { traffic = 100 }]"#)
        .analysis(analysis)
        .write("slow");
    let (code, id, err) = c.deploy_wait(&plan);
    let report = load.stop();
    assert_eq!(code, 3, "{err}");
    let s = c.status(&id);
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("latency_p99") && reason.contains("baseline"),
        "{reason}"
    );
    assert!(c.all_serving("1.0.0"));
    // Slow is not failed.
    report.assert_none_failed();
}

#[test]
fn a_release_that_crashes_while_serving_is_routed_around_by_the_agent_and_rolled_back() {
    let c = Cluster::start(25, 3);
    deploy_v1(&c, &[]);
    let load = Load::start(c.addrs(), 2);
    let plan = c
        .plan("2.0.0")
        .behaviour(&["crash_after_ms=2500"])
        .steps(r#"[{ traffic = 50, hold = "60s" }, { traffic = 100 }]"#)
        .write("crash");
    let (code, id, err) = c.deploy_wait(&plan);
    let report = load.stop();
    assert_eq!(code, 3, "{err}");
    let s = c.status(&id);
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the agent moved its traffic back"),
        "{reason}"
    );
    assert!(reason.contains("exited"), "{reason}");
    let restore = seconds(&s["rollback"]["seconds_to_restore"]);
    assert!(
        restore < 1.0,
        "agent-reported crash to fleet rolled back: {restore}s"
    );
    assert!(c.all_serving("1.0.0"));
    // Requests in flight on the crashing process can fail — at most one per client (two
    // per host); nothing else should: a request the gone process refuses goes to the
    // old slot.
    assert!(
        report.failed() <= 6,
        "failed {}: {:?}",
        report.failed(),
        report.errors()
    );
}

#[test]
fn abort_during_a_hold_rolls_back() {
    let c = Cluster::start(26, 2);
    deploy_v1(&c, &[]);
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 10, hold = "1h" }, { traffic = 100 }]"#)
        .write("held");
    let id = c.deploy_until_holding(&plan);
    c.cli_ok(&["abort", &id]);
    assert_eq!(c.watch(&id).0, 4, "aborted ends with exit 4");
    let s = c.status(&id);
    assert_eq!(s["state"], "aborted");
    assert_eq!(s["reason"], "aborted by operator");
    assert!(c.all_serving("1.0.0"));
}

#[test]
fn rollback_after_the_old_slot_was_retired_prepares_it_again_from_disk() {
    let c = Cluster::start(27, 2);
    deploy_v1(&c, &[]);
    let v2 = c.pack("2.0.0", &[]);
    let plan = c
        .plan("2.0.0")
        .artifact(&v2.url, &v2.sha256)
        .keep_previous("1s")
        .write("v2");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    // keep_previous passes: v1's slot is stopped on every host.
    wait_until(Duration::from_secs(20), "v1's slots to be retired", || {
        c.hosts().as_array().is_some_and(|hosts| {
            hosts.iter().all(|h| {
                let s = &h["services"][0]["slots"];
                s["blue"]["release"] != "1.0.0" && s["green"]["release"] != "1.0.0"
            })
        })
    });
    // The artifact is gone too: the rollback must come from the kept release directory.
    std::fs::remove_file(v2.path()).ok();
    let v1 = c.dir.join(
        std::fs::read_dir(&c.dir)
            .expect("dir")
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("web-1.0.0"))
            .expect("v1 artifact")
            .file_name(),
    );
    std::fs::remove_file(v1).expect("remove v1 artifact");
    let load = Load::start(c.addrs(), 2);
    let out = c.cli(&["rollback", "web", "--wait"]);
    let report = load.stop();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
    report.assert_none_failed();
}
