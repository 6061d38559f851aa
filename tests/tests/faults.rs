//! Faults: processes killed hard, and what survives them.

use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use tests::netns::Fabric;
use tests::{Cluster, Load, processes_under, wait_until};

#[test]
fn an_agent_killed_hard_comes_back_serving_from_its_own_store_adopting_its_slots() {
    let mut c = Cluster::start(41, 1);
    c.deploy_versions(&["1.0.0", "2.0.0"]);
    let data = c.agents[0].data_dir.clone();
    let mut before = processes_under(&data);
    before.sort();
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

    // The slot processes outlived the agent and were adopted: the same two, no copies.
    let mut after = processes_under(&data);
    after.sort();
    assert_eq!(after, before, "slot processes after the restart");
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 200);
    let report = load.stop();
    report.assert_none_failed();
    assert_eq!(
        report.versions().keys().cloned().collect::<Vec<_>>(),
        vec!["release 2.0.0".to_string()]
    );
    // And they are still supervised: one that dies is started again.
    signal(after[0], "KILL");
    wait_until(
        Duration::from_secs(20),
        "the killed slot process replaced",
        || {
            let now = processes_under(&data);
            now.len() == 2 && !now.contains(&after[0])
        },
    );
}

#[test]
fn an_agent_restarted_for_an_upgrade_drops_no_request_and_keeps_its_slots() {
    let mut c = Cluster::start(47, 0);
    // The agent runs from its own copy of the binary, which the upgrade replaces.
    let exe = c.dir.join("bin").join("cutover-agent");
    install(&c.bin.join("cutover-agent"), &exe);
    c.agent_exe = exe.clone();
    c.add_agent("web-1", "127.47.0.2", "env=test");
    c.add_agent("web-2", "127.47.0.3", "env=test");
    c.deploy_versions(&["1.0.0", "2.0.0"]);
    let data = c.agents[0].data_dir.clone();
    let mut slots = processes_under(&data);
    slots.sort();
    assert_eq!(slots.len(), 2, "{slots:?}");
    let pid = c.agents[0].proc.pid();

    let load = Load::start(c.addrs(), 6);
    wait_until(Duration::from_secs(10), "load flowing", || {
        load.report.ok() > 1000
    });

    // Upgrade: a new binary takes the old one's path, then SIGHUP.
    install(&c.bin.join("cutover-agent"), &exe);
    let exe_link = format!("/proc/{pid}/exe");
    assert!(
        std::fs::read_link(&exe_link)
            .expect("exe link")
            .to_string_lossy()
            .ends_with("(deleted)"),
        "the running agent's binary was replaced"
    );
    let served_before = load.report.ok();
    let t = Instant::now();
    signal(pid, "HUP");
    wait_until(Duration::from_secs(30), "the agent re-executed", || {
        std::fs::read_link(&exe_link).is_ok_and(|p| p == exe)
    });
    let exec_after = t.elapsed();
    wait_until(
        Duration::from_secs(30),
        "web-1 back with the coordinator",
        || c.connected("web-1"),
    );
    let linked_after = t.elapsed();
    let served_at_exec = load.report.ok();
    wait_until(
        Duration::from_secs(10),
        "load served by the new run",
        || load.report.ok() > served_at_exec + 2000,
    );
    let report = load.stop();
    eprintln!(
        "upgrade restart: exec after {exec_after:?}, coordinator link after {linked_after:?}; \
         {} requests served ({} during the restart window), {} failed, slowest {:?}",
        report.ok(),
        served_at_exec - served_before,
        report.failed(),
        report.max_latency()
    );
    report.assert_none_failed();
    // Same process, same slot processes: nothing was started twice or left behind.
    assert_eq!(c.agents[0].proc.pid(), pid);
    let mut after = processes_under(&data);
    after.sort();
    assert_eq!(after, slots, "slot processes after the restart");
    assert!(c.all_serving("2.0.0"));
    let log = std::fs::read_to_string(&c.agents[0].proc.log).unwrap_or_default();
    assert_eq!(log.matches("adopted the slot process").count(), 2, "{log}");

    // The restarted agent still deploys: the slots it adopted are stopped and replaced.
    c.deploy_versions(&["3.0.0"]);
    assert!(c.all_serving("3.0.0"));
}

/// Installs `binary` at `exe` as a package manager does: a new file renamed over the
/// old one, so a process running the old one keeps it (as a deleted file).
fn install(binary: &Path, exe: &Path) {
    let dir = exe.parent().expect("a directory");
    std::fs::create_dir_all(dir).expect("bin dir");
    let staged = dir.join("cutover-agent.new");
    std::fs::copy(binary, &staged).expect("stage the agent");
    std::fs::rename(&staged, exe).expect("install the agent");
}

#[test]
fn the_coordinator_killed_during_a_hold_resumes_and_hosts_keep_serving() {
    let mut c = Cluster::start(42, 2);
    c.deploy_versions(&["1.0.0"]);
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 50, hold = "4s" }, { traffic = 100 }]"#)
        .write("v2");
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
    let (code, err) = c.watch(&id);
    let report = load.stop();
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.status(&id)["state"], "succeeded");
    assert!(c.all_serving("2.0.0"));
    report.assert_none_failed();
}

fn signal(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// The fleet's v1, on three hosts in their own network namespaces.
fn partitioned_fleet(fabric: &Fabric) -> Cluster {
    let c = Cluster::start_on(fabric, 3, &[]);
    c.deploy_versions(&["1.0.0"]);
    c
}

#[test]
fn a_host_cut_off_mid_deployment_rolls_the_fleet_back_and_follows_when_it_returns() {
    let fabric = Fabric::new(43, 3);
    let c = partitioned_fleet(&fabric);
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 50, hold = "60s" }, { traffic = 100 }]"#)
        .on_host_lost("rollback")
        .host_lost_after("2s")
        .write("v2");
    let id = c.deploy_until_holding(&plan);
    // web-2's link goes down: no packet in or out, no connection closed.
    fabric.cut(1);
    let cut_at = Instant::now();
    wait_until(Duration::from_secs(30), "the deployment to end", || {
        let st = c.status(&id)["state"].clone();
        st == "rolled_back" || st == "failed" || st == "succeeded"
    });
    eprintln!("partition to fleet rolled back: {:?}", cut_at.elapsed());
    let s = c.status(&id);
    assert_eq!(s["state"], "rolled_back");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("host web-2 unreachable"), "{reason}");
    let host = |n: &str| c.versions().get(n).cloned().unwrap_or_default();
    assert_eq!(host("web-1"), "release 1.0.0");
    assert_eq!(host("web-3"), "release 1.0.0");
    // Cut off, web-2 keeps serving what it had: both releases, half each.
    let url = format!("http://{}:{}/", fabric.addr(1), c.listen);
    let seen: std::collections::BTreeSet<String> = (0..10)
        .map(|_| {
            fabric
                .get_inside(1, &url)
                .expect("web-2 serves while cut off")
        })
        .collect();
    assert_eq!(seen.len(), 2, "web-2 still splits traffic: {seen:?}");
    wait_until(Duration::from_secs(10), "web-2 shown unreachable", || {
        !c.connected("web-2")
    });
    // Back again: it converges on the fleet's state, the old release.
    fabric.heal(1);
    wait_until(Duration::from_secs(30), "web-2 back on 1.0.0", || {
        host("web-2") == "release 1.0.0"
    });
    wait_until(Duration::from_secs(30), "web-2 connected", || {
        c.connected("web-2")
    });
}

#[test]
fn by_default_a_host_cut_off_pauses_the_deployment_until_an_operator_decides() {
    let fabric = Fabric::new(48, 3);
    let c = partitioned_fleet(&fabric);
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 50, hold = "3s" }, { traffic = 100 }]"#)
        .host_lost_after("2s")
        .write("v2");
    let id = c.deploy_until_holding(&plan);
    fabric.cut(2);
    wait_until(Duration::from_secs(30), "the deployment to pause", || {
        c.status(&id)["state"] == "paused"
    });
    // Paused, it stays at its step well past the hold: nothing moves by itself.
    let s = c.status(&id);
    let reason = s["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("web-3"), "{s}");
    let paused = Instant::now();
    while paused.elapsed() < Duration::from_secs(4) {
        let now = c.status(&id);
        assert_eq!(now["state"], "paused", "{now}");
        assert_eq!(now["step"], s["step"], "{now}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The link comes back and the operator resumes: the deployment finishes everywhere.
    fabric.heal(2);
    wait_until(Duration::from_secs(30), "web-3 connected", || {
        c.connected("web-3")
    });
    c.cli_ok(&["resume", &id]);
    let (code, err) = c.watch(&id);
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.status(&id)["state"], "succeeded");
    wait_until(Duration::from_secs(20), "all on 2.0.0", || {
        c.all_serving("2.0.0")
    });
}

#[test]
fn with_continue_a_host_cut_off_is_set_aside_and_follows_the_fleet_when_it_returns() {
    let fabric = Fabric::new(44, 3);
    let c = partitioned_fleet(&fabric);
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 50, hold = "10s" }, { traffic = 100 }]"#)
        .max_failed_hosts(0)
        .on_host_lost("continue")
        .host_lost_after("2s")
        .write("v2");
    let id = c.deploy_until_holding(&plan);
    fabric.cut(1);
    let (code, err) = c.watch(&id);
    assert_eq!(code, 0, "{err}");
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
    fabric.heal(1);
    wait_until(
        Duration::from_secs(30),
        "web-2 on 2.0.0 like the fleet",
        || host("web-2") == "release 2.0.0",
    );
}

/// Serves the file at `path` over HTTP, slowly: about `per_sec` bytes a second.
fn slow_server(path: PathBuf, per_sec: usize) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let body = std::fs::read(path).expect("artifact");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes());
                for chunk in body.chunks(per_sec / 10) {
                    if s.write_all(chunk).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    addr
}

/// Kills the coordinator hard and starts it again on the same store; returns how long
/// it took to answer again.
fn kill_and_restart_coordinator(c: &mut Cluster) -> Duration {
    if let Some(mut coord) = c.coordinator.take() {
        coord.kill();
    }
    let t = Instant::now();
    c.start_coordinator();
    t.elapsed()
}

#[test]
fn the_coordinator_killed_while_hosts_prepare_in_a_pause_and_mid_rollback_resumes_each() {
    let mut c = Cluster::start(49, 2);
    c.deploy_versions(&["1.0.0"]);
    let load = Load::start(c.addrs(), 2);
    killed_while_hosts_prepare(&mut c);
    killed_in_a_pause(&mut c);
    killed_mid_rollback(&mut c);
    // No client request failed because of the coordinator's absences, in any phase.
    let report = load.stop();
    report.assert_none_failed();
}

/// While the hosts prepare 2.0.0: it downloads at ~1 MiB/s, so preparing takes seconds.
fn killed_while_hosts_prepare(c: &mut Cluster) {
    let v2 = c.pack("2.0.0", &[]);
    let slow = format!(
        "http://{}/web-2.0.0.tar.gz",
        slow_server(v2.path(), 1 << 20)
    );
    let plan = c.plan("2.0.0").artifact(&slow, &v2.sha256).write("v2");
    let id = c.deploy(&plan);
    wait_until(Duration::from_secs(10), "hosts downloading", || {
        let s = c.status(&id);
        s["state"] == "preparing" && s["hosts"][0]["phase"] == "preparing"
    });
    let answered = kill_and_restart_coordinator(c);
    let t = Instant::now();
    assert_eq!(c.status(&id)["state"], "preparing", "resumed where it was");
    let (code, err) = c.watch(&id);
    assert_eq!(code, 0, "{err}");
    eprintln!(
        "killed while preparing: answering again after {answered:?}, succeeded {:?} later",
        t.elapsed()
    );
    assert!(c.all_serving("2.0.0"));
}

/// In a pause: 3.0.0 stays paused across the restart, at the same step, until resumed.
fn killed_in_a_pause(c: &mut Cluster) {
    let plan = c
        .plan("3.0.0")
        .steps("[{ traffic = 50, pause = true }, { traffic = 100 }]")
        .write("v3");
    let id = c.deploy(&plan);
    wait_until(Duration::from_secs(20), "paused at 50%", || {
        c.status(&id)["state"] == "paused"
    });
    kill_and_restart_coordinator(c);
    let s = c.status(&id);
    assert_eq!(
        (s["state"].clone(), s["step"].clone()),
        ("paused".into(), 0.into()),
        "{s}"
    );
    let v = c.versions();
    assert!(
        v.values()
            .all(|r| r == "release 2.0.0" || r == "release 3.0.0"),
        "{v:?}"
    );
    c.cli_ok(&["resume", &id]);
    let (code, err) = c.watch(&id);
    assert_eq!(code, 0, "{err}");
    assert!(c.all_serving("3.0.0"));
}

/// Mid-rollback of 4.0.0: web-2 is frozen, so the abort waits for its confirmation; the
/// coordinator dies meanwhile. Started again, it finishes the rollback.
fn killed_mid_rollback(c: &mut Cluster) {
    let plan = c
        .plan("4.0.0")
        .steps(r#"[{ traffic = 50, hold = "60s" }, { traffic = 100 }]"#)
        .write("v4");
    let id = c.deploy_until_holding(&plan);
    let frozen = c.agents[1].proc.pid();
    signal(frozen, "STOP");
    c.cli_ok(&["abort", &id]);
    assert_eq!(c.status(&id)["state"], "rolling_back");
    kill_and_restart_coordinator(c);
    signal(frozen, "CONT");
    let (code, err) = c.watch(&id);
    assert_eq!(code, 4, "{err}");
    let s = c.status(&id);
    assert_eq!(s["state"], "aborted", "{s}");
    wait_until(Duration::from_secs(20), "every host back on 3.0.0", || {
        c.all_serving("3.0.0")
    });
}
