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
    // Who deployed it: the name of the credentials used (the first-start admin's).
    assert_eq!(one["deployed_by"], "admin", "{one}");
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

/// Adds `lines` to the `[run]` section of the plan at `plan`.
fn with_run_lines(plan: &std::path::Path, lines: &str) {
    let text = std::fs::read_to_string(plan).expect("read plan");
    let text = text.replacen("[run]\n", &format!("[run]\n{lines}\n"), 1);
    std::fs::write(plan, text).expect("write plan");
}

/// The files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if std::fs::read(&p)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(p);
            }
        }
    }
    found
}

/// Every file under `dir` with its bytes: what "changed nothing" compares.
fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

#[test]
fn secrets_stay_on_the_hosts_and_a_dry_run_changes_nothing() {
    let c = Cluster::start(106, 2);
    let secret = format!("S3cr3t-{}", std::process::id());
    let plan_secret = format!("plan-token-{}", std::process::id());
    let env_file = c.dir.join("web.env");
    std::fs::write(
        &env_file,
        format!("# on the host only\nDATABASE_URL=postgres://app:{secret}@db/app\nREGION=test\n"),
    )
    .expect("write env file");
    let run_lines = format!(
        "env_files = [{:?}]\nsecret_env = [\"DATABASE_URL\", \"API_TOKEN\"]",
        env_file.display().to_string()
    );
    let v1 = c.plan("1.0.0").env("API_TOKEN", &plan_secret).write("v1");
    with_run_lines(&v1, &run_lines);
    let (code, id, err) = c.deploy_wait(&v1);
    assert_eq!(code, 0, "{err}");

    // The process has the host's variables.
    let env = tests::get(&c.addrs()[0].to_string(), "/env").expect("GET /env");
    assert!(
        env.contains(&format!("DATABASE_URL=postgres://app:{secret}@db/app")),
        "{env}"
    );
    assert!(env.contains("REGION=test"), "{env}");

    // A dry run of a changed plan says what would change and changes nothing.
    let v2 = c
        .plan("1.0.0")
        .env("API_TOKEN", &plan_secret)
        .env("WORKERS", "4")
        .command(&[
            "./bin/cutover-sample",
            "serve",
            "--port",
            "${PORT}",
            "--verbose",
        ])
        .write("v2");
    with_run_lines(&v2, &run_lines);
    let before: Vec<_> = std::iter::once(c.dir.join("coordinator"))
        .chain(c.agents.iter().map(|a| a.data_dir.join("agent.redb")))
        .map(|p| {
            if p.is_dir() {
                snapshot(&p)
            } else {
                [(p.clone(), std::fs::read(&p).unwrap_or_default())].into()
            }
        })
        .collect();
    let hosts_before = c.hosts();
    let dry = json(&c, &["deploy", v2.to_str().expect("path"), "--dry-run"]);
    let text = c.cli_ok(&["plan", "diff", v2.to_str().expect("path")]);
    assert_eq!(dry["outcome"], "deploy", "{dry}");
    let changed: Vec<&str> = dry["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["key"].as_str())
        .collect();
    assert_eq!(changed, ["run.command", "run.env.WORKERS"], "{dry}");
    assert_eq!(dry["plan"]["run"]["env"]["API_TOKEN"], "********", "{dry}");
    for h in dry["hosts"].as_array().expect("hosts") {
        assert_eq!(h["live"], "1.0.0", "{h}");
        assert_ne!(h["slot"], h["live_slot"], "the idle slot gets it: {h}");
    }
    assert!(
        text.contains("run.env.WORKERS") && text.contains("--verbose"),
        "{text}"
    );
    let after: Vec<_> = std::iter::once(c.dir.join("coordinator"))
        .chain(c.agents.iter().map(|a| a.data_dir.join("agent.redb")))
        .map(|p| {
            if p.is_dir() {
                snapshot(&p)
            } else {
                [(p.clone(), std::fs::read(&p).unwrap_or_default())].into()
            }
        })
        .collect();
    assert!(
        before == after,
        "the coordinator's data dir and the agents' stores are byte-identical"
    );
    assert_eq!(c.hosts(), hosts_before);
    assert_eq!(
        json(&c, &["history"]).as_array().map(Vec::len),
        Some(1),
        "no deployment"
    );

    // The secrets appear in no output, log, store or page of cutover's.
    let shown = c.cli_ok(&["show", &id]) + &c.cli_ok(&["show", &id, "--output", "json"]);
    let status = c.cli_ok(&["status", &id, "--output", "json"]);
    let pages: String = [
        "/api/deployments",
        &format!("/api/deployments/{id}"),
        "/api/fleet",
        "/api/live",
    ]
    .iter()
    .map(|p| tests::get(&c.http_addr, p).expect("dashboard api"))
    .collect();
    assert!(
        shown.contains("API_TOKEN") && shown.contains("********"),
        "{shown}"
    );
    for (what, out) in [
        ("show", &shown),
        ("status", &status),
        ("dry run", &dry.to_string()),
        ("plan diff", &text),
        ("dashboard", &pages),
    ] {
        assert!(
            !out.contains(&secret) && !out.contains(&plan_secret),
            "{what} shows a secret: {out}"
        );
    }
    assert!(
        files_containing(&c.dir.join("coordinator"), &secret).is_empty(),
        "the env file's value reached the coordinator"
    );

    // The dashboard links each history row to its timeline, which shows the plan masked.
    let dom = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("http://{}/#{id}", c.http_addr))
        .output()
        .expect("chromium --dump-dom (Debian package chromium; tests/run.sh installs it)");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains(&format!("href=\"#{id}\"")),
        "history links to the timeline: {dom}"
    );
    assert!(
        dom.contains(&format!("data-id=\"{id}\"")) && dom.contains("submitted 1.0.0"),
        "{dom}"
    );
    assert!(
        dom.contains("API_TOKEN") && dom.contains("********"),
        "the plan, masked: {dom}"
    );
    assert!(
        !dom.contains(&secret) && !dom.contains(&plan_secret),
        "the page shows a secret"
    );
    for log in ["coordinator.log", "web-1.log", "web-2.log"] {
        let text = std::fs::read_to_string(c.dir.join(log)).unwrap_or_default();
        assert!(
            !text.contains(&secret) && !text.contains(&plan_secret),
            "{log} logs a secret"
        );
    }

    // A missing env file fails preparation, naming the file.
    let v3 = c.plan("3.0.0").write("v3");
    with_run_lines(&v3, "env_files = [\"/nonexistent/cutover/web.env\"]");
    let (code, id, err) = c.deploy_wait(&v3);
    assert_eq!(code, 3, "{err}");
    let reason = c.reason(&id);
    assert!(
        reason.contains("env file /nonexistent/cutover/web.env"),
        "{reason}"
    );
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
}

/// The lines a running `cutover logs -f --output json` printed so far, read by a thread.
struct Follower {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Follower {
    fn start(c: &Cluster, args: &[&str]) -> Follower {
        let mut child = c
            .cli_command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start cutover logs -f");
        let out = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    seen.lock().expect("lines").push(v);
                }
            }
        });
        Follower { child, lines }
    }

    /// True once a line from `host` reads `text`.
    fn saw(&self, host: &str, text: &str) -> bool {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .any(|v| v["host"] == host && v["line"] == text)
    }
}

/// The value of `metric` on the coordinator's `/metrics`.
fn metric(c: &Cluster, metric: &str) -> Option<f64> {
    let text = tests::get(&c.http_addr, "/metrics").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{metric} "))?.trim().parse().ok())
}

#[test]
fn logs_show_and_follow_what_the_slots_write_on_every_host() {
    let c = Cluster::start(105, 2);
    let token = format!("tok-{}", std::process::id());
    let plan = c.plan("1.0.0").env("API_TOKEN", &token).write("v1");
    with_run_lines(&plan, "secret_env = [\"API_TOKEN\"]");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");

    // The last lines, from every host, prefixed with host and slot.
    let text = c.cli_ok(&["logs", "web", "-n", "5"]);
    for host in ["web-1", "web-2"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{host} blue | sample 1.0.0 listening"))),
            "{text}"
        );
    }

    // Following: lines written now, on each host, arrive; a secret written is masked.
    let f = Follower::start(&c, &["logs", "web", "-f", "-n", "0", "--output", "json"]);
    wait_until(Duration::from_secs(10), "the hosts to be asked", || {
        metric(&c, "cutover_log_streams") == Some(2.0)
    });
    let addrs = c.addrs();
    for (i, host) in ["web-1", "web-2"].iter().enumerate() {
        let text = format!("hello-from-{host}");
        tests::get(&addrs[i].to_string(), &format!("/log/{text}")).expect("GET /log");
        wait_until(
            Duration::from_secs(10),
            &format!("{text} to be followed"),
            || f.saw(host, &text),
        );
    }
    tests::get(&addrs[0].to_string(), &format!("/log/token={token}")).expect("GET /log");
    wait_until(Duration::from_secs(10), "the secret line, masked", || {
        f.saw("web-1", "token=********")
    });
    let json: Vec<Value> = f.lines.lock().expect("lines").clone();
    assert!(
        json.iter()
            .all(|v| v["slot"] == "blue" && v["release"] == "1.0.0"),
        "{json:?}"
    );
    assert!(!format!("{json:?}").contains(&token));
    assert!(
        json.iter()
            .all(|v| !v["line"].as_str().unwrap_or("").contains("listening")),
        "-n 0 -f: only what was written since: {json:?}"
    );

    // Ctrl-C ends the client at once, and the hosts stop sending.
    let mut f = f;
    let pid = f.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    let mut status = None;
    wait_until(
        Duration::from_secs(5),
        "cutover logs -f to end on Ctrl-C",
        || {
            status = f.child.try_wait().ok().flatten();
            status.is_some()
        },
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    wait_until(
        Duration::from_secs(10),
        "the hosts' log streams to end",
        || metric(&c, "cutover_log_streams") == Some(0.0),
    );

    // Filters: one host, the live slot; a release no slot runs is an error.
    let text = c.cli_ok(&[
        "logs", "web", "--host", "web-2", "--slot", "live", "-n", "50",
    ]);
    assert!(
        text.lines().all(|l| l.starts_with("web-2 blue | ")),
        "{text}"
    );
    assert!(
        text.contains("hello-from-web-2") && !text.contains(&token),
        "{text}"
    );
    let out = c.cli(&["logs", "web", "--release", "9.9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no slot of web runs release 9.9"));
    let out = c.cli(&["logs", "nothing-here"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown service"));

    // A deployment's hook and database command output, from the files on its hosts.
    let dir = c.agents[0].data_dir.join("logs/deployments").join(&id);
    std::fs::create_dir_all(&dir).expect("deployment log dir");
    std::fs::write(dir.join("expand.log"), "expanding schema\ndone\n").expect("write");
    let text = c.cli_ok(&["logs", "--deployment", &id]);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "web-1 expand.log | expanding schema",
            "web-1 expand.log | done"
        ]
    );
}
