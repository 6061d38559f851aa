//! Verifying a release before it meets a customer, end to end against real `cutover` and
//! `cutover-agent` processes: lifecycle hooks on every host, and a shadow phase that
//! copies live requests to the new release before any client is served by it.

use std::time::Duration;

use tests::{Cluster, Load, Value, get, process_runs, wait_until};

fn deploy_v1(c: &Cluster) {
    let plan = c.plan("1.0.0").write("v1");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "v1: {err}");
    assert!(c.all_serving("1.0.0"));
}

/// `cutover show ID --output json`.
fn show(c: &Cluster, id: &str) -> Value {
    serde_json::from_str(&c.cli_ok(&["show", id, "--output", "json"])).expect("show json")
}

/// The timeline events of `id` named `event`.
fn events(c: &Cluster, id: &str, event: &str) -> Vec<Value> {
    show(c, id)["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["event"] == event)
        .cloned()
        .collect()
}

/// A smoke test as a `validate` hook: it fails on web-2 only, saying why (and, as a
/// careless script would, printing its secret token); elsewhere it GETs the new slot
/// through `CUTOVER_URL`.
const SMOKE_FAILING_ON_WEB_2: &str = r#"if [ "$CUTOVER_HOST" = web-2 ]; then echo "smoke test on $CUTOVER_HOST with token $SMOKE_TOKEN: checkout answered 500" >&2; exit 1; fi; ./bin/cutover-sample get "$CUTOVER_URL/""#;

/// The smoke test's token: a `[run] secret_env` value.
const SMOKE_TOKEN: &str = "smoke-token-5ecret";

#[test]
fn a_validate_hook_failing_on_one_host_stops_the_deployment_before_any_traffic_moves() {
    let c = Cluster::start(95, 3);
    deploy_v1(&c);
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 100);
    let plan = c
        .plan("2.0.0")
        .hook("validate", &["sh", "-c", SMOKE_FAILING_ON_WEB_2], "20s")
        .env("SMOKE_TOKEN", SMOKE_TOKEN)
        .steps(r#"[{ traffic = 50, hold = "30s" }, { traffic = 100 }]"#)
        .write("v2");
    let text = std::fs::read_to_string(&plan).expect("read plan");
    let text = text.replacen("[run]\n", "[run]\nsecret_env = [\"SMOKE_TOKEN\"]\n", 1);
    std::fs::write(&plan, text).expect("write plan");
    let (code, id, err) = c.deploy_wait(&plan);
    let report = load.stop();
    assert_eq!(code, 3, "{err}");
    let s = c.status(&id);
    assert_eq!(s["state"], "rolled_back");
    let reason = s["reason"].as_str().unwrap_or_default();
    assert_eq!(
        reason,
        "host web-2: hook validate exited 1: smoke test on web-2 with token ********: checkout answered 500"
    );
    // No host moved traffic, so no client ever got the new release.
    report.assert_none_failed();
    assert_eq!(
        report.versions().get("release 2.0.0"),
        None,
        "{:?}",
        report.versions()
    );
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
    // The hook's run is in the timeline with its duration, and all of its output is
    // kept on the host, where `show` says.
    let hooks = events(&c, &id, "hook");
    let failed = hooks
        .iter()
        .find(|e| e["host"] == "web-2")
        .unwrap_or_else(|| panic!("web-2's hook in the timeline: {hooks:?}"));
    assert_eq!(
        (&failed["hook"], &failed["ok"]),
        (&Value::from("validate"), &Value::from(false))
    );
    assert!(failed["duration_ms"].as_u64().is_some(), "{failed}");
    let text = c.cli_ok(&["show", &id]);
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("hook output on web-2: "))
        .unwrap_or_else(|| panic!("show names web-2's hook log:\n{text}"));
    assert!(
        path.starts_with(&c.agents[1].data_dir.display().to_string()),
        "{path}"
    );
    let log = std::fs::read_to_string(path).expect("the hook log");
    assert!(
        log.contains("== validate (green slot, release 2.0.0"),
        "{log}"
    );
    assert!(
        log.contains("smoke test on web-2 with token ********: checkout answered 500")
            && !log.contains(SMOKE_TOKEN),
        "{log}"
    );
    // The same output through `cutover logs --deployment`; nothing the coordinator
    // shows of the deployment holds the secret.
    let streamed = c.cli_ok(&["logs", "--deployment", &id]);
    assert!(
        streamed.lines().any(|l| l
            == "web-2 hooks-web.log | smoke test on web-2 with token ********: checkout answered 500"),
        "{streamed}"
    );
    assert!(
        !streamed.contains(SMOKE_TOKEN) && !show(&c, &id).to_string().contains(SMOKE_TOKEN),
        "{streamed}"
    );
}

#[test]
fn before_start_sees_every_variable_and_a_hook_past_its_timeout_is_killed_with_its_children() {
    let c = Cluster::start(96, 1);
    deploy_v1(&c);
    let dump = r#"env | sort > "$CUTOVER_STATE_DIR/before_start.env""#;
    let plan = c
        .plan("2.0.0")
        .hook("before_start", &["sh", "-c", dump], "10s")
        .write("v2");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    let state = c.agents[0].data_dir.join("state/web");
    let env = std::fs::read_to_string(state.join("before_start.env")).expect("the hook's env");
    // CUTOVER_URL is where the new slot serves: the port its process got.
    let served = get(&c.addrs()[0].to_string(), "/env").expect("the new release's env");
    let port = served
        .lines()
        .find_map(|l| l.strip_prefix("PORT="))
        .expect("PORT");
    for want in [
        "CUTOVER_HOOK=before_start".to_string(),
        format!("CUTOVER_DEPLOYMENT={id}"),
        "CUTOVER_PREVIOUS_RELEASE=1.0.0".into(),
        "CUTOVER_HOST=web-1".into(),
        format!("CUTOVER_URL=http://127.0.0.1:{port}"),
        format!("PORT={port}"),
        "CUTOVER_SERVICE=web".into(),
        "CUTOVER_RELEASE=2.0.0".into(),
        format!("CUTOVER_STATE_DIR={}", state.display()),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} missing:\n{env}");
    }
    // The slot's clean environment, and nothing of the agent's (the shell adds its own
    // few).
    let allowed = [
        "PATH", "LANG", "HOME", "USER", "LOGNAME", "PORT", "PWD", "SHLVL", "_", "OLDPWD",
    ];
    for line in env.lines() {
        let name = line.split('=').next().unwrap_or_default();
        assert!(
            allowed.contains(&name) || name.starts_with("CUTOVER_"),
            "{line} reached the hook"
        );
    }

    // A validate hook that waits past its timeout, with a child of its own.
    let stuck = r#"sleep 300 & echo $! > "$CUTOVER_STATE_DIR/hook-child.pid"; echo "waiting for the smoke test"; sleep 300"#;
    let plan = c
        .plan("3.0.0")
        .hook("validate", &["sh", "-c", stuck], "2s")
        .write("v3");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 3, "{err}");
    assert_eq!(
        c.reason(&id),
        "host web-1: hook validate timed out after 2s; its processes were killed: waiting for the smoke test"
    );
    let child: i32 = std::fs::read_to_string(state.join("hook-child.pid"))
        .expect("the hook's child")
        .trim()
        .parse()
        .expect("a pid");
    assert!(!process_runs(child), "the hook's child {child} survived");
    assert!(c.all_serving("2.0.0"), "{:?}", c.versions());
}

/// `[analysis]` judging one 1 s interval of at least 20 requests: at most 5 % errors and
/// the copies' status classes the live ones'.
const SHADOW_ANALYSIS: &str = r#"[analysis]
interval = "1s"
failure_limit = 2
min_requests = 20

[[analysis.metric]]
name = "error_rate"
max = 0.05

[[analysis.metric]]
name = "status_match"
min = 0.99
"#;

#[test]
fn a_release_failing_half_its_requests_rolls_back_from_shadow_having_served_no_client() {
    let c = Cluster::start(97, 2);
    deploy_v1(&c);
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 200);
    let plan = c
        .plan("2.0.0")
        .behaviour(&["error_rate=0.5"])
        .shadow("60s", 100, &["GET"])
        .steps(r#"[{ traffic = 10, hold = "30s" }, { traffic = 100 }]"#)
        .analysis(SHADOW_ANALYSIS)
        .write("v2");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("shadow"),
        "the follower shows the shadow phase:\n{err}"
    );
    let s = c.status(&id);
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("analysis of shadow traffic failed 2 interval(s) in a row: error_rate"),
        "{reason}"
    );
    let intervals = s["intervals"].as_array().cloned().unwrap_or_default();
    assert!(
        !intervals.is_empty() && intervals.iter().all(|i| i["shadow"] == true),
        "{intervals:?}"
    );
    let restore = s["rollback"]["seconds_to_restore"]
        .as_f64()
        .unwrap_or(f64::NAN);
    eprintln!("first bad shadow interval to rollback done: {restore:.3}s");
    assert!(
        restore < 3.0,
        "first bad interval to rollback done: {restore}s"
    );
    assert_eq!(show(&c, &id)["failure"]["phase"], "shadow");

    // A release that answers 404 where the live one answers 200: only status_match sees it.
    let plan = c
        .plan("3.0.0")
        .behaviour(&["status=404"])
        .shadow("60s", 100, &["GET"])
        .steps(r#"[{ traffic = 10, hold = "30s" }, { traffic = 100 }]"#)
        .analysis(SHADOW_ANALYSIS)
        .write("v3");
    let (code, id, err) = c.deploy_wait(&plan);
    let report = load.stop();
    assert_eq!(code, 3, "{err}");
    let reason = c.reason(&id);
    assert!(
        reason.contains("status_match 0.00% below min 99.00%"),
        "{reason}"
    );
    // Neither bad release served a client: every answer was the live release's.
    report.assert_none_failed();
    let versions = report.versions();
    assert_eq!(
        versions.keys().collect::<Vec<_>>(),
        ["release 1.0.0"],
        "{versions:?}"
    );
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
}

#[test]
fn a_good_release_passes_shadow_then_goes_live_with_zero_failed_requests() {
    let c = Cluster::start(98, 2);
    deploy_v1(&c);
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 200);
    let plan = c
        .plan("2.0.0")
        .shadow("3s", 100, &["GET", "HEAD"])
        .steps(r#"[{ traffic = 50, hold = "1s" }, { traffic = 100 }]"#)
        .analysis(SHADOW_ANALYSIS)
        .write("v2");
    let id = c.deploy(&plan);
    wait_until(Duration::from_secs(30), "the shadow phase", || {
        c.status(&id)["shadow"] == true
    });
    // While the phase lasts the new release answers copies only.
    let during = load.report.versions();
    let s = c.status(&id);
    assert_eq!(
        (&s["shadow"], &s["state"], &s["traffic"]),
        (
            &Value::from(true),
            &Value::from("progressing"),
            &Value::from(0)
        )
    );
    assert_eq!(during.get("release 2.0.0"), None, "{during:?}");
    let (code, watched) = c.watch(&id);
    let report = load.stop();
    assert_eq!(code, 0, "{watched}");
    report.assert_none_failed();
    assert!(c.all_serving("2.0.0"), "{:?}", c.versions());
    let s = c.status(&id);
    let intervals = s["intervals"].as_array().cloned().unwrap_or_default();
    assert!(
        intervals
            .iter()
            .any(|i| i["shadow"] == true && i["verdict"] == "pass"),
        "the shadow phase passed a conclusive interval: {intervals:?}"
    );
    for event in ["shadow_started", "shadow_holding", "shadow_ended"] {
        assert_eq!(events(&c, &id, event).len(), 1, "{event}");
    }
}

#[test]
fn a_new_slot_that_hangs_every_request_does_not_slow_the_live_path() {
    let c = Cluster::start(99, 1);
    deploy_v1(&c);
    const REQUESTS: u64 = 4000;
    let off = Load::start(c.addrs(), 4);
    wait_until(Duration::from_secs(60), "requests without shadow", || {
        off.report.ok() >= REQUESTS
    });
    let off = off.stop();
    let plan = c
        .plan("2.0.0")
        .behaviour(&["hang=1"])
        .shadow("10m", 100, &["GET"])
        .write("v2");
    let id = c.deploy(&plan);
    wait_until(Duration::from_secs(30), "every host copying", || {
        !events(&c, &id, "shadow_holding").is_empty()
    });
    let on = Load::start(c.addrs(), 4);
    wait_until(Duration::from_secs(60), "requests with shadow", || {
        on.report.ok() >= REQUESTS
    });
    let on = on.stop();
    c.cli_ok(&["abort", &id]);
    wait_until(Duration::from_secs(30), "the abort", || {
        c.status(&id)["state"] == "aborted"
    });
    off.assert_none_failed();
    on.assert_none_failed();
    assert_eq!(on.versions().keys().collect::<Vec<_>>(), ["release 1.0.0"]);
    let (p99_off, p99_on) = (off.latency_quantile(0.99), on.latency_quantile(0.99));
    eprintln!(
        "live p99 with shadow off {p99_off:?}, with shadow at 100% to a hanging slot {p99_on:?} ({} and {} requests)",
        off.ok(),
        on.ok()
    );
    // Generous, for a machine shared with builds: the copies must not make the live
    // path wait on the hanging slot (that would be seconds, not milliseconds).
    assert!(
        p99_on <= p99_off * 3 + Duration::from_millis(25),
        "live p99 {p99_off:?} without shadow, {p99_on:?} with a hanging shadow slot"
    );
    assert!(c.all_serving("1.0.0"));
}
