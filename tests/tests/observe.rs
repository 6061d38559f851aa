//! Seeing deployments: timelines, history, DORA figures, the live view.

use std::time::Duration;

use serde_json::Value;
use tests::{ANALYSIS_ERRORS, Cluster, Load, wait_until};

fn json(c: &Cluster, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&c.cli_ok(&a)).expect("json")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The deployments the DORA figures are computed from.
struct History {
    /// 1.0.0, 2.0.0 and 4.0.0: deployments that succeeded.
    succeeded: Vec<String>,
    /// 3.0.0: rolled back by analysis at 50 %.
    rolled_back: String,
}

/// Two good deployments, one that fails a third of its requests and is rolled back at
/// 50 %, and one that succeeds and is then rolled back by hand.
fn history(c: &Cluster) -> History {
    let steps = r#"[{ traffic = 50, hold = "1s" }, { traffic = 100 }]"#;
    let mut succeeded = Vec::new();
    for v in ["1.0.0", "2.0.0"] {
        let plan = c.plan(v).steps(steps).write(v);
        let (code, id, err) = c.deploy_wait(&plan);
        assert_eq!(code, 0, "{err}");
        succeeded.push(id);
    }
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 100);
    let plan = c
        .plan("3.0.0")
        .behaviour(&["error_rate=0.3"])
        .steps(r#"[{ traffic = 50, hold = "30s" }, { traffic = 100 }]"#)
        .analysis(ANALYSIS_ERRORS)
        .write("bad");
    let (code, rolled_back, err) = c.deploy_wait(&plan);
    assert_eq!(code, 3, "{err}");
    drop(load);
    let plan = c.plan("4.0.0").steps(steps).write("v4");
    let (code, v4, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    succeeded.push(v4);
    let out = c.cli(&["rollback", "web", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(c.all_serving("2.0.0"));
    History {
        succeeded,
        rolled_back,
    }
}

/// By hand, from each deployment's own record and timeline: the mean time to restore
/// (first bad signal to the last host back, and the manual rollback's own duration),
/// and the successful deployments' durations, sorted.
fn by_hand(c: &Cluster, h: &History) -> (f64, Vec<f64>) {
    let shows: Vec<Value> = json(c, &["history", "--limit", "100"])
        .as_array()
        .expect("history")
        .iter()
        .map(|h| json(c, &["show", h["id"].as_str().expect("id")]))
        .collect();
    assert_eq!(shows.len(), 5, "four deployments and one rollback");
    let manual = shows
        .iter()
        .find(|s| s["previous_release"] == "4.0.0")
        .expect("manual");
    let bad_show = shows
        .iter()
        .find(|s| s["id"] == h.rolled_back.as_str())
        .expect("bad");
    let event = |s: &Value, name: &str| -> Value {
        s["timeline"]
            .as_array()
            .and_then(|t| t.iter().find(|e| e["event"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let started = event(bad_show, "rollback_started");
    let done = event(bad_show, "rollback_done");
    let first_bad = started["first_bad_unix_ms"].as_u64().expect("first bad");
    let status_bad = c.status(&h.rolled_back);
    let done_ms = status_bad["rollback"]["done_unix_ms"]
        .as_u64()
        .expect("done");
    assert!(!done.is_null(), "the timeline records the rollback's end");
    let auto_restore = (done_ms - first_bad) as f64 / 1000.0;
    let manual_restore = f(&manual["elapsed_s"]);
    let mut durations: Vec<f64> = h
        .succeeded
        .iter()
        .map(|id| f(&shows.iter().find(|s| s["id"] == id.as_str()).expect("show")["elapsed_s"]))
        .collect();
    durations.sort_by(f64::total_cmp);
    ((auto_restore + manual_restore) / 2.0, durations)
}

#[test]
fn stats_match_the_figures_computed_by_hand_from_the_timelines() {
    let c = Cluster::start(61, 2);
    let h = history(&c);
    let (mean, sorted) = by_hand(&c, &h);

    let s = json(&c, &["stats", "--service", "web"]);
    eprintln!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    assert_eq!(s["deployments"], 4);
    assert_eq!(s["succeeded"], 3);
    assert_eq!(s["rolled_back"], 1);
    assert_eq!(s["rolled_back_manually"], 1);
    assert_eq!(s["change_failures"], 2);
    assert_eq!(s["failed_before_traffic"], 0);
    assert_eq!(f(&s["change_failure_rate"]), 0.5);
    assert_eq!(s["time_to_restore"]["count"], 2);
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
    let bad = &h.rolled_back;
    let text = c.cli_ok(&["show", bad]);
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
        stats_text.contains("change failure rate    50.0% (2 of 4 degraded service)"),
        "{stats_text}"
    );
}

#[test]
fn watch_shows_the_steps_live_on_a_terminal_and_as_plain_lines_in_logs() {
    let c = Cluster::start(62, 2);
    let steps =
        r#"[{ traffic = 10, hold = "2s" }, { traffic = 50, hold = "2s" }, { traffic = 100 }]"#;
    // History first, for typical times and an ETA.
    for v in ["1.0.0", "2.0.0"] {
        let plan = c.plan(v).steps(steps).write(v);
        assert_eq!(c.deploy_wait(&plan).0, 0);
    }

    // Plain: not a terminal (CI logs).
    let plan = c.plan("3.0.0").steps(steps).write("v3");
    let id = c.deploy(&plan);
    let (code, err) = c.watch(&id);
    assert_eq!(code, 0);
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
    let plan = c.plan("4.0.0").steps(steps).write("v4");
    let id = c.deploy(&plan);
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

/// An HTTP receiver that keeps every POSTed JSON body it accepts; it answers 500 to the
/// first `refuse` requests (those bodies are not kept).
fn receiver(refuse: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", l.local_addr().expect("addr"));
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        let mut seen = 0;
        for s in l.incoming().flatten() {
            let mut r = BufReader::new(s);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            seen += 1;
            let status = if seen <= refuse {
                "500 Internal Server Error"
            } else {
                if let Ok(v) = serde_json::from_slice::<Value>(&body)
                    && let Ok(mut g) = keep.lock()
                {
                    g.push(v);
                }
                "200 OK"
            };
            let _ = r.get_mut().write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (url, got)
}

#[test]
fn webhooks_receive_every_event_in_order_with_retries() {
    let (url, got) = receiver(2);
    let c = Cluster::start_with(63, 2, &["--webhook", &url]);
    let plan = c
        .plan("1.0.0")
        .steps(r#"[{ traffic = 50, hold = "1s" }, { traffic = 100 }]"#)
        .write("v1");
    let (code, good, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 100);
    let plan = c
        .plan("2.0.0")
        .behaviour(&["error_rate=0.3"])
        .steps(r#"[{ traffic = 50, hold = "30s" }, { traffic = 100 }]"#)
        .analysis(ANALYSIS_ERRORS)
        .write("bad");
    let (code, bad, err) = c.deploy_wait(&plan);
    assert_eq!(code, 3, "{err}");
    drop(load);

    let events_of = |id: &str| -> Vec<String> {
        got.lock()
            .map(|g| {
                g.iter()
                    .filter(|e| e["deployment"] == id)
                    .map(|e| e["event"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let want_good = [
        "deployment_started",
        "step_started",
        "step_holding",
        "step_started",
        "step_holding",
        "deployment_ended",
    ];
    wait_until(Duration::from_secs(20), "every event delivered", || {
        events_of(&good).len() == want_good.len()
            && events_of(&bad).last().map(String::as_str) == Some("deployment_ended")
    });
    assert_eq!(events_of(&good), want_good);
    assert_eq!(
        events_of(&bad),
        [
            "deployment_started",
            "step_started",
            "step_holding",
            "rollback_started",
            "rollback_done",
            "deployment_ended"
        ]
    );
    let all = got.lock().map(|g| g.clone()).unwrap_or_default();
    // Ordered in time, readable in chat, and complete enough to act on.
    let times: Vec<String> = all
        .iter()
        .map(|e| e["at"].as_str().unwrap_or("").to_string())
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted);
    let end = all.last().expect("events");
    assert_eq!(end["state"], "rolled_back");
    let text = end["text"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(&format!("cutover {bad} web 2.0.0: ended rolled_back: "))
            && text.contains("error_rate"),
        "{text}"
    );
}

/// Headless Chromium on `url`, with its DevTools HTTP endpoint on a free port; the
/// whole process group is killed on drop.
struct Browser {
    child: std::process::Child,
    devtools: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn open(url: &str) -> Browser {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir().expect("profile dir");
        let port = tests::free_port();
        let child = std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                &format!("--remote-debugging-port={port}"),
                &format!("--user-data-dir={}", profile.path().display()),
                url,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromium (Debian package chromium; .ci/run installs it)");
        Browser {
            child,
            devtools: format!("127.0.0.1:{port}"),
            _profile: profile,
        }
    }

    /// (target id, title) of the page showing `url_part`.
    fn page(&self, url_part: &str) -> Option<(String, String)> {
        let list: Value =
            serde_json::from_str(&tests::get(&self.devtools, "/json/list").ok()?).ok()?;
        list.as_array()?
            .iter()
            .find(|t| {
                t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.contains(url_part))
            })
            .map(|t| {
                (
                    t["id"].as_str().unwrap_or("").to_string(),
                    t["title"].as_str().unwrap_or("").to_string(),
                )
            })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

#[test]
fn the_dashboard_in_a_real_browser_follows_a_deployment_live() {
    let c = Cluster::start(64, 2);
    let plan = c.plan("1.0.0").write("v1");
    assert_eq!(c.deploy_wait(&plan).0, 0);

    let browser = Browser::open(&format!("http://{}/", c.http_addr));
    wait_until(Duration::from_secs(30), "the dashboard loaded", || {
        browser
            .page(&c.http_addr)
            .is_some_and(|(_, t)| t == "cutover · 2 hosts")
    });
    let (page, _) = browser.page(&c.http_addr).expect("page");

    let plan = c
        .plan("2.0.0")
        .steps(
            r#"[{ traffic = 10, hold = "3s" }, { traffic = 50, hold = "3s" }, { traffic = 100 }]"#,
        )
        .write("v2");
    let id = c.deploy(&plan);
    // The same page, never reloaded, follows the deployment from step to step.
    for want in [
        format!("cutover · {id} step 1/3 at 10%"),
        format!("cutover · {id} step 2/3 at 50%"),
        "cutover · 2 hosts".to_string(),
    ] {
        wait_until(Duration::from_secs(30), &want, || {
            browser
                .page(&c.http_addr)
                .is_some_and(|(p, t)| p == page && t == want)
        });
    }
    assert_eq!(c.status(&id)["state"], "succeeded");

    // What the page shows at the end, as the browser rendered it.
    let dom = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("http://{}/", c.http_addr))
        .output()
        .expect("chromium --dump-dom");
    let dom = String::from_utf8_lossy(&dom.stdout);
    for want in [
        "web-1",
        "web-2",
        "2.0.0",
        "change failure rate",
        "<rect",
        &id,
    ] {
        assert!(dom.contains(want), "{want:?} in the rendered page: {dom}");
    }
}
