//! Seeing deployments: timelines, history, DORA figures, the live view.

use std::time::Duration;

use serde_json::Value;
use tests::{Cluster, Load, wait_until};

const ANALYSIS_ERRORS: &str = r#"[analysis]
interval = "1s"
failure_limit = 1
min_requests = 20

[[analysis.metric]]
name = "error_rate"
max = 0.05
"#;

fn json(c: &Cluster, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&c.cli_ok(&a)).expect("json")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[test]
fn stats_match_the_figures_computed_by_hand_from_the_timelines() {
    let c = Cluster::start(61, 2);
    let steps = r#"steps = [{ traffic = 50, hold = "1s" }, { traffic = 100 }]"#;
    let mut ids = Vec::new();
    for v in ["1.0.0", "2.0.0"] {
        let (url, sha) = c.pack(v, &[]);
        let plan = c.plan(v, v, &url, &sha, steps, "");
        let (code, id, err) = c.deploy_wait(&plan, &[]);
        assert_eq!(code, 0, "{err}");
        ids.push(id);
    }
    // 3.0.0 fails a third of its requests: rolled back at 50 %.
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 100);
    let (url, sha) = c.pack("3.0.0", &["error_rate=0.3"]);
    let strategy = r#"steps = [{ traffic = 50, hold = "30s" }, { traffic = 100 }]"#;
    let plan = c.plan_with("bad", "3.0.0", &url, &sha, strategy, "", ANALYSIS_ERRORS);
    let (code, bad, err) = c.deploy_wait(&plan, &[]);
    assert_eq!(code, 3, "{err}");
    drop(load);
    // 4.0.0 succeeds, then an operator rolls it back by hand.
    let (url, sha) = c.pack("4.0.0", &[]);
    let plan = c.plan("v4", "4.0.0", &url, &sha, steps, "");
    let (code, v4, err) = c.deploy_wait(&plan, &[]);
    assert_eq!(code, 0, "{err}");
    let out = c.cli(&["rollback", "web", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.all_serving("2.0.0"));

    // By hand, from each deployment's own record and timeline.
    let shows: Vec<Value> = json(&c, &["history", "--limit", "100"])
        .as_array()
        .expect("history")
        .iter()
        .map(|h| json(&c, &["show", h["id"].as_str().expect("id")]))
        .collect();
    assert_eq!(shows.len(), 5, "four deployments and one rollback");
    let manual = shows
        .iter()
        .find(|s| s["previous_release"] == "4.0.0")
        .expect("manual");
    let bad_show = shows.iter().find(|s| s["id"] == bad.as_str()).expect("bad");
    // Time to restore: first bad signal to the last host back (from the timeline), and
    // the manual rollback's own duration.
    let event = |s: &Value, name: &str| -> Value {
        s["timeline"]
            .as_array()
            .and_then(|t| t.iter().find(|e| e["event"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let started = event(bad_show, "rollback_started");
    let done = event(bad_show, "rollback_done");
    let first_bad = started["first_bad_unix_ms"].as_u64().expect("first bad");
    let status_bad = c.status(&bad);
    let done_ms = status_bad["rollback"]["done_unix_ms"]
        .as_u64()
        .expect("done");
    assert!(!done.is_null(), "the timeline records the rollback's end");
    let auto_restore = (done_ms - first_bad) as f64 / 1000.0;
    let manual_restore = f(&manual["elapsed_s"]);
    let durations: Vec<f64> = ids
        .iter()
        .chain([&v4])
        .map(|id| f(&shows.iter().find(|s| s["id"] == id.as_str()).expect("show")["elapsed_s"]))
        .collect();
    let mut sorted = durations.clone();
    sorted.sort_by(f64::total_cmp);

    let s = json(&c, &["stats", "--service", "web"]);
    eprintln!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    assert_eq!(s["deployments"], 4);
    assert_eq!(s["succeeded"], 3);
    assert_eq!(s["rolled_back"], 1);
    assert_eq!(s["rolled_back_manually"], 1);
    assert_eq!(f(&s["change_failure_rate"]), 0.5);
    assert_eq!(s["time_to_restore"]["count"], 2);
    let mean = (auto_restore + manual_restore) / 2.0;
    assert!(
        (f(&s["time_to_restore"]["mean_s"]) - mean).abs() < 0.0015,
        "{mean}"
    );
    assert!(
        (f(&s["deployment_duration"]["median_s"]) - sorted[1]).abs() < 0.0015,
        "{sorted:?}"
    );
    assert_eq!(s["failures_by_phase"]["at 50%"], 1);
    assert_eq!(s["failures_by_phase"]["after success (manual rollback)"], 1);

    // `show` of the failure puts where and why first.
    let text = c.cli_ok(&["show", &bad]);
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("ROLLED_BACK {bad} at 50%: ")) && first.contains("error_rate"),
        "{text}"
    );
    for want in [
        "submitted 3.0.0",
        "ready (download+verify ",
        "step 1: moving to 50%",
        "analysis at 50%: fail",
        "ROLLBACK:",
        "rollback confirmed by every host",
        "ended rolled_back",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }
    let stats_text = c.cli_ok(&["stats"]);
    assert!(
        stats_text.contains("change failure rate  50.0%"),
        "{stats_text}"
    );
}

#[test]
fn watch_shows_the_steps_live_on_a_terminal_and_as_plain_lines_in_logs() {
    let c = Cluster::start(62, 2);
    let steps = r#"steps = [{ traffic = 10, hold = "2s" }, { traffic = 50, hold = "2s" }, { traffic = 100 }]"#;
    // History first, for typical times and an ETA.
    for v in ["1.0.0", "2.0.0"] {
        let (url, sha) = c.pack(v, &[]);
        let plan = c.plan(v, v, &url, &sha, steps, "");
        assert_eq!(c.deploy_wait(&plan, &[]).0, 0);
    }

    // Plain: not a terminal (CI logs).
    let (url, sha) = c.pack("3.0.0", &[]);
    let plan = c.plan("v3", "3.0.0", &url, &sha, steps, "");
    let id = c
        .cli_ok(&["deploy", plan.to_str().expect("path")])
        .trim()
        .to_string();
    let out = c.cli(&["watch", &id]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains('\x1b'),
        "no terminal codes in plain mode: {err}"
    );
    let at = |s: &str| err.find(s).unwrap_or_else(|| panic!("{s:?} in {err}"));
    assert!(at("step 1: moving to 10%") < at("step 2: moving to 50%"));
    assert!(at("step 2: moving to 50%") < at("step 3: moving to 100%"));
    assert!(err.contains("| ETA "), "{err}");
    assert!(
        err.contains("web: every host serves 3.0.0 on web-1, web-2"),
        "{err}"
    );

    // On a terminal (a pseudo-terminal from script(1)): the view is redrawn in place and
    // shows the step, the phase against typical times, and the ETA.
    let (url, sha) = c.pack("4.0.0", &[]);
    let plan = c.plan("v4", "4.0.0", &url, &sha, steps, "");
    let id = c
        .cli_ok(&["deploy", plan.to_str().expect("path")])
        .trim()
        .to_string();
    let cmd = format!("{} watch {id}", c.bin.join("cutover").display());
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("CUTOVER_COORDINATOR", &c.coord_addr)
        .env("CUTOVER_CREDENTIALS", c.credentials())
        .env("TERM", "xterm")
        .output()
        .expect("script");
    assert_eq!(out.status.code(), Some(0));
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(tty.contains("\x1b[2K"), "redrawn in place: {tty}");
    for want in [
        "step 1/3 at 10%",
        "step 2/3 at 50%",
        "step 3/3 at 100%",
        "holding",
        "ETA ~",
        "over 3 past deployment(s)",
        "typical switch",
    ] {
        assert!(tty.contains(want), "{want:?} in {tty}");
    }
}
