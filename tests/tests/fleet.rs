//! The fleet simulator (`cutover-fleetsim`) against a real coordinator at a small
//! scale, asserting correctness, not timing: 200 simulated hosts join through the real
//! join with one multi-use token and connect from their own addresses; every step of a
//! deployment reaches every host and `cutover abort` brings every host back; a release
//! failing analysis is rolled back on every host, with the hosts that failed to prepare
//! set aside. The coordinator's own view is read through the CLI.

use std::path::Path;
use std::process::Command;

use tests::{Cluster, Value};

/// Simulated hosts connect from 127.NET.x.y.
const NET: u8 = 115;
const HOSTS: usize = 200;

/// Runs `cutover-fleetsim ARGS` against the cluster's coordinator; returns its figures.
fn fleetsim(c: &Cluster, state: &Path, args: &[&str]) -> Value {
    let pid = c
        .coordinator
        .as_ref()
        .map(|p| p.pid())
        .expect("coordinator running");
    let out = Command::new(c.bin.join("cutover-fleetsim"))
        .args(args)
        .args([
            "--hosts",
            &HOSTS.to_string(),
            "--source-net",
            &NET.to_string(),
        ])
        .args(["--coordinator", &c.coord_addr, "--credentials"])
        .arg(c.credentials())
        .args(["--coordinator-pid", &pid.to_string(), "--state"])
        .arg(state)
        .args(["--ready-after", "1s", "--hold", "1s", "--timeout", "120s"])
        .args(["--output", "json"])
        .output()
        .expect("run cutover-fleetsim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cutover-fleetsim {args:?} failed: {stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("figures: {e}; {stderr}"))
}

fn count(v: &Value) -> usize {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}")) as usize
}

/// Every host of the fan-out acknowledged it.
fn reached(fan_out: &Value, hosts: usize) {
    assert_eq!(count(&fan_out["hosts"]), hosts, "{fan_out}");
    assert_eq!(count(&fan_out["acked"]), hosts, "{fan_out}");
    assert!(fan_out["p100_s"].is_number(), "{fan_out}");
    assert!(fan_out["coordinator_confirmed_s"].is_number(), "{fan_out}");
}

/// The phases `cutover status` shows for the deployment's hosts, with how many hosts
/// are in each.
fn phases(c: &Cluster, id: &str) -> (String, Vec<(String, usize)>) {
    let s = c.status(id);
    let mut phases: Vec<(String, usize)> = Vec::new();
    for h in s["hosts"].as_array().expect("hosts") {
        let p = h["phase"].as_str().expect("phase").to_string();
        match phases.iter_mut().find(|(q, _)| *q == p) {
            Some((_, n)) => *n += 1,
            None => phases.push((p, 1)),
        }
    }
    (s["state"].as_str().unwrap_or_default().to_string(), phases)
}

#[test]
fn every_simulated_host_acknowledges_each_step_and_the_rollback() {
    let mut c = Cluster::unstarted(&["--max-connections", "1000"]);
    c.start_coordinator();
    let state = c.dir.join("fleetsim");

    // Prepare, three steps, then `cutover abort` once the last step holds.
    let r = fleetsim(&c, &state, &["deploy", "--rollback", "abort"]);
    assert_eq!(count(&r["enrolment"]["joined"]), HOSTS);
    assert_eq!(count(&r["connect"]["coordinator_connected"]), HOSTS);
    let d = &r["deploy"];
    assert_eq!(d["state"], "aborted", "{d}");
    assert_eq!(count(&d["failed_hosts"]), 0);
    let steps = d["steps"].as_array().expect("steps");
    let whats: Vec<&str> = steps.iter().filter_map(|s| s["what"].as_str()).collect();
    assert_eq!(whats, ["step 1 (10%)", "step 2 (50%)", "step 3 (100%)"]);
    for s in steps {
        reached(s, HOSTS);
    }
    reached(&d["rollback"], HOSTS);
    let id = d["id"].as_str().expect("id");
    assert_eq!(
        phases(&c, id),
        (
            "aborted".to_string(),
            vec![("rolled_back".to_string(), HOSTS)]
        )
    );

    // Again with the same identities: a release answering errors, which also fails to
    // start on some hosts, is rolled back by analysis at its first step.
    let r = fleetsim(
        &c,
        &state,
        &["deploy", "--rollback", "analysis", "--fail-hosts", "0.05"],
    );
    assert_eq!(count(&r["enrolment"]["joined"]), 0, "identities are reused");
    let d = &r["deploy"];
    assert_eq!(d["state"], "rolled_back", "{d}");
    let reason = d["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("analysis failed"), "{reason}");
    let failed = count(&d["failed_hosts"]);
    assert!((1..HOSTS / 5).contains(&failed), "{failed} hosts failed");
    let steps = d["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 1, "{d}");
    reached(&steps[0], HOSTS - failed);
    reached(&d["rollback"], HOSTS - failed);
    let id = d["id"].as_str().expect("id");
    assert_eq!(
        phases(&c, id),
        (
            "rolled_back".to_string(),
            vec![("rolled_back".to_string(), HOSTS)]
        )
    );
}
