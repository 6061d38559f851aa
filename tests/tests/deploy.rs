//! End-to-end deployments against real `cutover` and `cutover-agent` processes.

use std::time::Duration;

use tests::{Cluster, Load, wait_until};

fn deploy_v1(c: &Cluster) {
    let plan = c.plan("1.0.0").write("v1");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "v1 deploy failed: {err}");
    assert!(id.starts_with("d-"), "first stdout line is the id: {id:?}");
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
}

#[test]
fn v2_switch_under_load_loses_no_request_and_keeps_v1_warm() {
    let c = Cluster::start(11, 3);
    deploy_v1(&c);

    let load = Load::start(c.addrs(), 4);
    wait_until(Duration::from_secs(10), "load to flow", || {
        load.report.ok() > 300
    });
    let plan = c.plan("2.0.0").write("v2");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "v2 deploy: {err}");
    // Keep the load on past the switch so requests on both sides of it are counted.
    let served_at_switch = load.report.ok();
    wait_until(Duration::from_secs(10), "load after the switch", || {
        load.report.ok() > served_at_switch + 300
    });
    let report = load.stop();
    // Not one request failed during the switch.
    report.assert_none_failed();
    let versions = report.versions();
    assert!(
        versions.get("release 1.0.0").copied().unwrap_or(0) > 0,
        "{versions:?}"
    );
    assert!(
        versions.get("release 2.0.0").copied().unwrap_or(0) > 0,
        "{versions:?}"
    );
    assert!(c.all_serving("2.0.0"), "{:?}", c.versions());

    let status = c.status(&id);
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["traffic"], 100);
    assert_eq!(status["reason"], serde_json::Value::Null);
    assert_eq!(status["hosts"].as_array().map(Vec::len), Some(3));

    // v1 stays warm in the other slot with no weight.
    assert_warm_behind(&c, "1.0.0", "2.0.0");

    // The same release again is a no-op that succeeds.
    let (code, id2, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    assert_ne!(id, id2);
    let s2 = c.status(&id2);
    assert_eq!(s2["state"], "succeeded");
    assert!(err.contains("already live"), "{err}");

    // rollback returns every host to v1, instantly from the warm slot.
    let out = c.cli(&["rollback", "web", "--wait"]);
    assert!(
        out.status.success(),
        "rollback: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
}

/// On every host, `live` takes all the traffic and `warm` runs healthy beside it with none.
fn assert_warm_behind(c: &Cluster, warm: &str, live: &str) {
    let hosts = c.hosts();
    for h in hosts.as_array().expect("array") {
        let svc = &h["services"][0];
        assert_eq!(svc["live_release"], live, "{h}");
        let slots = [&svc["slots"]["blue"], &svc["slots"]["green"]];
        let old = slots
            .iter()
            .find(|s| s["release"] == warm)
            .expect("warm slot");
        let new = slots
            .iter()
            .find(|s| s["release"] == live)
            .expect("live slot");
        assert_eq!(old["state"], "healthy", "{h}");
        assert_eq!(old["weight"], 0, "{h}");
        assert_eq!(new["weight"], 100, "{h}");
    }
}

fn assert_bad_release_rolls_back(c: &Cluster, plan: &std::path::Path, want_reason: &str) {
    let load = Load::start(c.addrs(), 1);
    let (code, id, err) = c.deploy_wait(plan);
    let report = load.stop();
    assert_eq!(code, 3, "a bad release ends rolled_back (exit 3): {err}");
    let s = c.status(&id);
    assert_eq!(s["state"], "rolled_back");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("host web-"),
        "reason names the host: {reason}"
    );
    assert!(
        reason.contains(want_reason),
        "want {want_reason:?} in {reason:?}"
    );
    assert!(
        c.all_serving("1.0.0"),
        "v1 keeps serving: {:?}",
        c.versions()
    );
    report.assert_none_failed();
}

#[test]
fn bad_releases_leave_v1_serving_with_a_clear_reason() {
    let c = Cluster::start(12, 3);
    deploy_v1(&c);
    let v2 = c.pack("2.0.0", &[]);

    // Checksum mismatch: nothing from the artifact runs.
    let wrong = "0".repeat(64);
    let plan = c.plan("2.0.0").artifact(&v2.url, &wrong).write("bad-sha");
    assert_bad_release_rolls_back(&c, &plan, "sha256 mismatch: expected 000000000000…, got ");

    // Missing artifact.
    let plan = c
        .plan("2.0.1")
        .artifact("file:///nonexistent/web.tar.gz", &v2.sha256)
        .write("missing");
    assert_bad_release_rolls_back(&c, &plan, "No such file");

    // An artifact server that answers 404.
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = server.local_addr().expect("addr");
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in server.incoming().flatten() {
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    let sha404 = c.pack("2.0.4", &[]).sha256;
    let plan = c
        .plan("2.0.4")
        .artifact(&format!("http://{addr}/web.tar.gz"), &sha404)
        .write("404");
    assert_bad_release_rolls_back(&c, &plan, "HTTP 404 Not Found");

    // Never turns healthy.
    let plan = c
        .plan("2.0.2")
        .behaviour(&["unhealthy=1"])
        .start_timeout("3s")
        .write("unhealthy");
    assert_bad_release_rolls_back(&c, &plan, "not healthy within 3s");

    // Crashes on start.
    let plan = c
        .plan("2.0.3")
        .behaviour(&["exit_on_start=1"])
        .write("crash");
    assert_bad_release_rolls_back(&c, &plan, "exiting on start");

    // After all that, a good release still goes out.
    let plan = c.plan("2.0.0").artifact(&v2.url, &v2.sha256).write("good");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    assert!(c.all_serving("2.0.0"), "{:?}", c.versions());
}

#[test]
fn http_artifact_404_is_a_clear_failure_and_first_deploy_ends_failed() {
    let c = Cluster::start(13, 2);
    // A tiny HTTP server that answers 404 to everything.
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = server.local_addr().expect("addr");
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in server.incoming().flatten() {
            let mut s = s;
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    let sha = c.pack("1.0.0", &[]).sha256;
    let url = format!("http://{addr}/web-1.0.0.tar.gz");
    let plan = c.plan("1.0.0").artifact(&url, &sha).write("first");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(
        code, 4,
        "a first deployment that fails ends failed (exit 4): {err}"
    );
    let s = c.status(&id);
    assert_eq!(s["state"], "failed");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("404"), "{reason}");
    assert!(reason.contains(&url), "the reason names the URL: {reason}");
}

#[test]
fn one_deployment_at_a_time_per_service() {
    let c = Cluster::start(14, 1);
    deploy_v1(&c);
    let plan = c
        .plan("2.0.0")
        .steps("[{ traffic = 50, pause = true }, { traffic = 100 }]")
        .write("held");
    let id = c.deploy(&plan);
    wait_until(Duration::from_secs(20), "the deployment to pause", || {
        c.status(&id)["state"] == "paused"
    });
    let second = c.cli(&["deploy", plan.to_str().expect("path")]);
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&id),
        "the refusal names the active deployment: {err}"
    );
    assert!(!err.contains("panicked"));
    c.cli_ok(&["promote", &id]);
    wait_until(Duration::from_secs(20), "the deployment to finish", || {
        c.status(&id)["state"] == "succeeded"
    });
    assert!(c.all_serving("2.0.0"));
}

#[test]
fn agent_metrics_count_what_the_proxy_served() {
    let mut c = Cluster::start(16, 0);
    let port = tests::free_port();
    c.agent_args = vec!["--http".into(), format!("127.0.0.1:{port}")];
    c.add_agent("web-1", "127.16.0.2", "env=test");
    deploy_v1(&c);
    let load = Load::start(c.addrs(), 1);
    wait_until(Duration::from_secs(10), "some requests", || {
        load.report.ok() >= 100
    });
    let served = load.stop().ok();
    let metrics = tests::get(&format!("127.0.0.1:{port}"), "/metrics").expect("metrics");
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("cutover_agent_requests_total{service=\"web\"")
                && l.contains("release=\"1.0.0\"")
        })
        .expect("requests line");
    let counted: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!(counted >= served, "{counted} counted, {served} served");
    assert!(metrics.contains("cutover_agent_slot_healthy{service=\"web\""));
    let coord = tests::get(&c.http_addr, "/metrics").expect("coordinator metrics");
    assert!(coord.contains("cutover_hosts_connected 1"), "{coord}");
    assert!(
        coord.contains("cutover_deployments{state=\"succeeded\"} 1"),
        "{coord}"
    );
    assert!(
        coord.contains("cutover_deployment_duration_seconds_count 1"),
        "{coord}"
    );
    assert!(
        coord.contains("cutover_step_duration_seconds_count 1"),
        "{coord}"
    );
    // Both parse, and pass the linter, of Prometheus's own promtool.
    promtool_check("agent", &metrics);
    promtool_check("coordinator", &coord);

    // The counters move with traffic.
    let load = Load::start(c.addrs(), 1);
    wait_until(Duration::from_secs(10), "more requests", || {
        load.report.ok() >= 100
    });
    let more = load.stop().ok();
    let again = tests::get(&format!("127.0.0.1:{port}"), "/metrics").expect("metrics");
    let line = again
        .lines()
        .find(|l| {
            l.starts_with("cutover_agent_requests_total{service=\"web\"")
                && l.contains("release=\"1.0.0\"")
        })
        .expect("requests line");
    let now: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!(now >= counted + more, "{now} after {counted} + {more}");
}

/// `promtool check metrics`: the exposition parses and follows the naming conventions.
fn promtool_check(what: &str, body: &str) {
    use std::io::Write;
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus; .ci/run installs it)");
    p.stdin
        .take()
        .expect("stdin")
        // tests::get trims the body; the endpoints end it with a newline, as the text
        // format requires.
        .write_all(format!("{body}\n").as_bytes())
        .expect("write metrics");
    let out = p.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "{what} metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
