//! Faults: processes killed hard, and what survives them.

use std::time::{Duration, Instant};

use tests::{Cluster, Load, processes_under, wait_until};

#[test]
fn an_agent_killed_hard_comes_back_serving_from_its_own_store_without_orphans() {
    let mut c = Cluster::start(41, 1);
    for v in ["1.0.0", "2.0.0"] {
        let (url, sha) = c.pack(v, &[]);
        let plan = c.plan(v, v, &url, &sha, "steps = [{ traffic = 100 }]", "");
        let (code, _, err) = c.deploy_wait(&plan, &[]);
        assert_eq!(code, 0, "{err}");
    }
    let data = c.agents[0].data_dir.clone();
    let before = processes_under(&data);
    assert_eq!(before.len(), 2, "blue and green slot processes: {before:?}");

    // No coordinator either: the agent must not need one to serve again.
    if let Some(mut coord) = c.coordinator.take() {
        coord.kill();
    }
    let ip = c.agents[0].ip.clone();
    c.agents[0].proc.kill();
    let t = Instant::now();
    c.agents[0].proc = c.spawn_agent("web-1", &ip, &data);
    wait_until(Duration::from_secs(30), "web-1 serving 2.0.0 again", || {
        c.all_serving("2.0.0")
    });
    let back_in = t.elapsed();
    eprintln!("agent killed and restarted: serving again after {back_in:?}");

    // Every process the dead agent left was stopped, and exactly one copy per slot runs.
    wait_until(Duration::from_secs(15), "orphans stopped", || {
        before
            .iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    });
    wait_until(Duration::from_secs(15), "two slot processes", || {
        processes_under(&data).len() == 2
    });
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 200);
    let report = load.stop();
    assert_eq!(report.failed(), 0);
    assert_eq!(
        report.versions().keys().cloned().collect::<Vec<_>>(),
        vec!["release 2.0.0".to_string()]
    );
}

#[test]
fn the_coordinator_killed_during_a_hold_resumes_and_hosts_keep_serving() {
    let mut c = Cluster::start(42, 2);
    let (url, sha) = c.pack("1.0.0", &[]);
    let plan = c.plan("v1", "1.0.0", &url, &sha, "steps = [{ traffic = 100 }]", "");
    assert_eq!(c.deploy_wait(&plan, &[]).0, 0);
    let (url, sha) = c.pack("2.0.0", &[]);
    let plan = c.plan(
        "v2",
        "2.0.0",
        &url,
        &sha,
        r#"steps = [{ traffic = 50, hold = "4s" }, { traffic = 100 }]"#,
        "",
    );
    let id = c.deploy_until_holding(&plan);
    let load = Load::start(c.addrs(), 2);
    if let Some(mut coord) = c.coordinator.take() {
        coord.kill();
    }
    // Fail static: the hosts keep their weights while the coordinator is away.
    let served = load.report.ok();
    wait_until(
        Duration::from_secs(10),
        "requests without a coordinator",
        || load.report.ok() > served + 500,
    );
    let v = load.report.versions();
    assert!(
        v.contains_key("release 1.0.0") && v.contains_key("release 2.0.0"),
        "{v:?}"
    );
    c.start_coordinator();
    let out = c.cli(&["watch", &id]);
    let report = load.stop();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(c.status(&id)["state"], "succeeded");
    assert!(c.all_serving("2.0.0"));
    assert_eq!(
        report.failed(),
        0,
        "{:?}",
        report.errors.lock().map(|e| e.clone())
    );
}

fn signal(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn a_host_lost_mid_deployment_rolls_the_fleet_back_and_follows_when_it_returns() {
    let c = Cluster::start(43, 3);
    let (url, sha) = c.pack("1.0.0", &[]);
    let plan = c.plan("v1", "1.0.0", &url, &sha, "steps = [{ traffic = 100 }]", "");
    assert_eq!(c.deploy_wait(&plan, &[]).0, 0);
    let (url, sha) = c.pack("2.0.0", &[]);
    let strategy = r#"steps = [{ traffic = 50, hold = "60s" }, { traffic = 100 }]
on_host_lost = "rollback"
host_lost_after = "2s""#;
    let plan = c.plan("v2", "2.0.0", &url, &sha, strategy, "");
    let id = c.deploy_until_holding(&plan);
    // web-2 freezes: its stream goes silent, as in a partition.
    let frozen = c.agents[1].proc.pid();
    signal(frozen, "STOP");
    wait_until(Duration::from_secs(30), "the deployment to end", || {
        let st = c.status(&id)["state"].clone();
        st == "rolled_back" || st == "failed" || st == "succeeded"
    });
    let s = c.status(&id);
    assert_eq!(s["state"], "rolled_back");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("host web-2 unreachable"), "{reason}");
    let host = |n: &str| c.versions().get(n).cloned().unwrap_or_default();
    assert_eq!(host("web-1"), "release 1.0.0");
    assert_eq!(host("web-3"), "release 1.0.0");
    // Back again: it converges on the fleet's state, the old release.
    signal(frozen, "CONT");
    wait_until(Duration::from_secs(30), "web-2 back on 1.0.0", || {
        host("web-2") == "release 1.0.0"
    });
    wait_until(Duration::from_secs(30), "web-2 connected", || {
        c.connected("web-2")
    });
}

#[test]
fn with_continue_a_lost_host_is_set_aside_and_follows_the_fleet_when_it_returns() {
    let c = Cluster::start(44, 3);
    let (url, sha) = c.pack("1.0.0", &[]);
    let plan = c.plan("v1", "1.0.0", &url, &sha, "steps = [{ traffic = 100 }]", "");
    assert_eq!(c.deploy_wait(&plan, &[]).0, 0);
    let (url, sha) = c.pack("2.0.0", &[]);
    let strategy = r#"steps = [{ traffic = 50, hold = "10s" }, { traffic = 100 }]
max_failed_hosts = 0
on_host_lost = "continue"
host_lost_after = "2s""#;
    let plan = c.plan("v2", "2.0.0", &url, &sha, strategy, "");
    let id = c.deploy_until_holding(&plan);
    let frozen = c.agents[1].proc.pid();
    signal(frozen, "STOP");
    let out = c.cli(&["watch", &id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = c.status(&id);
    let web2 = s["hosts"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["name"] == "web-2"))
        .cloned()
        .expect("web-2");
    assert!(
        web2["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{web2}"
    );
    let host = |n: &str| c.versions().get(n).cloned().unwrap_or_default();
    assert_eq!(host("web-1"), "release 2.0.0");
    assert_eq!(host("web-3"), "release 2.0.0");
    signal(frozen, "CONT");
    wait_until(
        Duration::from_secs(30),
        "web-2 on 2.0.0 like the fleet",
        || host("web-2") == "release 2.0.0",
    );
}
