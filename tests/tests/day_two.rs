//! Day two end to end: operating services after they are deployed — restarting them
//! under load, stopping, starting and removing them, and what a failed first release
//! leaves behind. NETs 105–109.

use std::time::Duration;

use tests::{Cluster, Load, Value, processes_under, wait_until};

/// `cutover ARGS --output json`, parsed.
fn json(c: &Cluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    serde_json::from_str(&c.cli_ok(&all)).expect("json")
}

/// The services `cutover service list` shows, by name.
fn service_names(c: &Cluster) -> Vec<String> {
    json(c, &["service", "list"])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["service"].as_str().map(str::to_string))
        .collect()
}

/// The services `cutover hosts` shows on any host.
fn hosted(c: &Cluster) -> Vec<String> {
    let mut out: Vec<String> = c
        .hosts()
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|h| h["services"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| s["service"].as_str().map(str::to_string))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Slot processes running on every host of `c`, sorted.
fn slot_processes(c: &Cluster) -> Vec<i32> {
    let mut pids: Vec<i32> = c
        .agents
        .iter()
        .flat_map(|a| processes_under(&a.data_dir))
        .collect();
    pids.sort();
    pids
}

#[test]
fn a_restart_under_load_starts_every_process_anew_and_fails_no_request() {
    let c = Cluster::start(108, 2);
    c.deploy_versions(&["1.0.0"]);
    let before = slot_processes(&c);
    assert_eq!(before.len(), 2, "one slot process per host");

    let load = Load::start(c.addrs(), 3);
    let out = c.cli(&["service", "restart", "web", "--wait"]);
    let report = load.stop();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report.assert_none_failed();
    assert!(report.ok() > 100, "the load ran: {} requests", report.ok());
    assert_eq!(
        report.versions().keys().collect::<Vec<_>>(),
        ["release 1.0.0"]
    );

    // New processes serve, and the old ones are gone once retired.
    wait_until(Duration::from_secs(20), "the old processes to stop", || {
        let now = slot_processes(&c);
        now.len() == 2 && now.iter().all(|p| !before.contains(p))
    });
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let history = json(&c, &["history"]);
    let row = &history[0];
    assert_eq!(
        (row["id"].as_str(), row["restart"].as_bool()),
        (Some(id.as_str()), Some(true))
    );
    let services = json(&c, &["service", "list"]);
    assert_eq!(services[0]["live_release"], "1.0.0", "{services}");
    assert_eq!(services[0]["state"], "running");
    assert_eq!(services[0]["serving"], 2);
}

#[test]
fn stop_start_and_remove_a_service_and_a_failed_first_release_leaves_no_ghost() {
    let c = Cluster::start(109, 1);
    c.deploy_versions(&["1.0.0"]);
    let addr = c.addrs()[0].to_string();

    // Stop: nothing runs, the port answers 503, and no deployment starts.
    let out = json(&c, &["service", "stop", "web"]);
    assert_eq!(out["hosts"], serde_json::json!(["web-1"]), "{out}");
    wait_until(
        Duration::from_secs(20),
        "the slot processes to stop",
        || slot_processes(&c).is_empty(),
    );
    let answer = tests::get(&addr, "/").unwrap_err();
    assert!(answer.contains("503"), "{answer}");
    let plan = c.plan("2.0.0").write("v2");
    let refused = c.cli(&["deploy", plan.to_str().expect("path")]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("service web is stopped"), "{err}");
    assert_eq!(json(&c, &["service", "list"])[0]["state"], "stopped");

    // Start: the same release serves again.
    c.cli_ok(&["service", "start", "web"]);
    wait_until(Duration::from_secs(20), "web to serve again", || {
        c.all_serving("1.0.0")
    });

    // Remove: refused without --yes; then the port is free for a new service.
    let out = c.cli(&["service", "remove", "web"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    c.cli_ok(&["service", "remove", "web", "--yes"]);
    wait_until(Duration::from_secs(20), "the port to be free", || {
        std::net::TcpListener::bind(&addr).is_ok()
    });
    wait_until(Duration::from_secs(20), "web to be forgotten", || {
        slot_processes(&c).is_empty() && hosted(&c).is_empty() && service_names(&c).is_empty()
    });
    let releases = c.agents[0].data_dir.join("releases/web");
    wait_until(Duration::from_secs(20), "web's releases to go", || {
        !releases.exists()
    });
    let api = c.plan("1.0.0").service("api").write("api");
    let (code, _, err) = c.deploy_wait(&api);
    assert_eq!(code, 0, "a new service binds the freed port: {err}");
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());

    // A first release that fails leaves nothing on the hosts nor in the service list.
    let ghost = c
        .plan("1.0.0")
        .service("ghost")
        .listen(tests::free_port())
        .behaviour(&["exit_on_start=1"])
        .write("ghost");
    let (code, _, err) = c.deploy_wait(&ghost);
    assert_eq!(code, 4, "{err}");
    wait_until(Duration::from_secs(20), "the ghost to be forgotten", || {
        hosted(&c) == ["api"] && service_names(&c) == ["api"]
    });
}

#[test]
fn releases_lists_what_the_hosts_keep_and_rollback_to_starts_one_without_a_download() {
    let c = Cluster::start(107, 2);
    c.deploy_versions(&["1.0.0", "2.0.0", "3.0.0"]);
    let releases = json(&c, &["releases", "web"]);
    let row = |v: &str| {
        releases
            .as_array()
            .and_then(|a| a.iter().find(|r| r["version"] == v))
            .cloned()
            .unwrap_or_else(|| panic!("release {v} listed: {releases}"))
    };
    assert_eq!(releases[0]["version"], "3.0.0", "newest first: {releases}");
    assert_eq!(
        (
            row("3.0.0")["live"].as_bool(),
            row("2.0.0")["previous"].as_bool()
        ),
        (Some(true), Some(true))
    );
    let one = row("1.0.0");
    assert_eq!(one["hosts"], serde_json::json!(["web-1", "web-2"]), "{one}");
    assert_eq!(one["sha256"].as_str().map(str::len), Some(64), "{one}");
    let by = one["deployed_by"].as_str().unwrap_or_default();
    assert!(by.contains('@'), "who deployed it: {one}");
    assert!(one["deployed_at"].as_str().is_some(), "{one}");

    // The 1.0.0 artifact is gone: going back to it works only from the hosts' copies.
    std::fs::remove_file(c.dir.join("web-1.0.0-.tar.gz")).expect("remove the 1.0.0 artifact");
    let out = c.cli(&["rollback", "web", "--to", "1.0.0", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let shown = json(&c, &["show", &id]);
    assert_eq!(shown["plan_path"], "(rollback to 1.0.0)", "{shown}");
    assert_eq!(shown["plan"]["release"]["version"], "1.0.0");
    assert_eq!(json(&c, &["history"])[0]["rollback"], true);
    let now = json(&c, &["releases", "web"]);
    assert_eq!(now[0]["version"], "1.0.0", "{now}");
    assert_eq!(
        (now[0]["live"].as_bool(), now[0]["deployment"].as_str()),
        (Some(true), Some(id.as_str()))
    );

    // A release that was never live is refused in one line that says where to look.
    let out = c.cli(&["rollback", "web", "--to", "9.9.9"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cutover releases web"), "{err}");
}
