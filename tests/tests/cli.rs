//! The CLI's contract: exit codes, one-line errors, JSON, and the doors it must not open.

use std::process::Command;
use std::time::Duration;

use tests::{Cluster, bin_dir, wait_until};

fn cutover(args: &[&str]) -> std::process::Output {
    Command::new(bin_dir().join("cutover"))
        .args(args)
        .output()
        .expect("run cutover")
}

/// The smallest plan `plan validate` accepts, a line per entry so that a test can change
/// one line and expect the error on it.
fn minimal_plan() -> Vec<String> {
    [
        "service = \"web\"",
        "[release]",
        "version = \"1\"",
        "artifact = \"file:///x.tar.gz\"",
        &format!("sha256 = \"{}\"", "a".repeat(64)),
        "[run]",
        "command = [\"./x\", \"--port\", \"${PORT}\"]",
        "listen = 8080",
        "[health]",
        "http = \"/\"",
    ]
    .map(String::from)
    .to_vec()
}

/// Writes the plan of `lines` to `dir/name`; returns its path.
fn write_plan(dir: &std::path::Path, name: &str, lines: &[String]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").expect("write plan");
    path
}

#[test]
fn plan_validate_exit_codes_and_located_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = write_plan(dir.path(), "good.toml", &minimal_plan());
    let out = cutover(&["plan", "validate", good.to_str().expect("path")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut heath = minimal_plan();
    heath[8] = "[heath]".into();
    let bad = write_plan(dir.path(), "bad.toml", &heath);
    let out = cutover(&["plan", "validate", bad.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("bad.toml:9:2:"), "{err}");
    assert!(err.contains("did you mean `health`"), "{err}");

    let out = cutover(&["plan", "validate", "/nonexistent/plan.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let out = cutover(&["deploy"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn unreachable_coordinator_is_exit_1_with_one_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(bin_dir().join("cutover"))
        .args(["hosts", "--coordinator", "127.0.0.1:1", "--credentials"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("credentials"), "{err}");
}

/// `token`, already used, is refused again; so are a forged secret, a revoked token and a
/// token pinned to another CA; `token list` shows states but never secrets.
fn a_token_joins_once_and_only_from_this_ca(c: &Cluster, token: &str) {
    // Replayed token.
    let out = c.join("h2", &c.dir.join("h2"), token);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no uses left"));
    // Forged secret.
    let mut forged = token.to_string();
    forged.replace_range(forged.len() - 4.., "0000");
    let out = c.join("h3", &c.dir.join("h3"), &forged);
    assert!(!out.status.success());
    // Revoked tokens are refused; `token list` shows states but never secrets.
    let revoked = c.token("env=test");
    let revoked_id = revoked.split('.').nth(2).expect("id").to_string();
    c.cli_ok(&["token", "revoke", &revoked_id]);
    let out = c.join("h5", &c.dir.join("h5"), &revoked);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
    let list = c.cli_ok(&["token", "list", "--output", "json"]);
    let secret = token.rsplit('.').next().expect("secret");
    assert!(!list.contains(secret), "secrets never listed");
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    let state = |id: &str| {
        list.as_array()
            .and_then(|a| a.iter().find(|t| t["id"] == id))
            .map(|t| t["state"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(state(&revoked_id).as_deref(), Some("revoked"));
    assert_eq!(
        state(token.split('.').nth(2).expect("id")).as_deref(),
        Some("used")
    );

    // A token pinned to another CA is refused before anything is sent.
    let other = format!(
        "cutover1.{}.{}",
        "0".repeat(64),
        token.splitn(3, '.').nth(2).expect("rest")
    );
    let out = c.join("h4", &c.dir.join("h4"), &other);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fingerprint"), "{err}");
}

#[test]
fn tokens_are_single_use_and_removed_hosts_are_locked_out() {
    let mut c = Cluster::start(15, 0);
    let token = c.token("env=test");
    let d1 = c.dir.join("h1");
    let out = c.join("h1", &d1, &token);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a_token_joins_once_and_only_from_this_ca(&c, &token);

    // Host runs, is listed with its labels, then is removed and can't come back.
    let proc = c.spawn_agent("h1", "127.15.0.2", &d1);
    wait_until(Duration::from_secs(20), "h1 connected", || {
        c.connected("h1")
    });
    let hosts = c.hosts();
    assert_eq!(hosts[0]["labels"]["env"], "test");
    c.cli_ok(&["hosts", "remove", "h1"]);
    wait_until(Duration::from_secs(10), "h1 gone", || !c.connected("h1"));
    // Its reconnect is refused as removed.
    wait_until(
        Duration::from_secs(10),
        "h1's reconnect to be refused",
        || {
            std::fs::read_to_string(&proc.log)
                .is_ok_and(|l| l.contains("host h1 was removed from the coordinator"))
        },
    );
    assert!(!c.connected("h1"), "a removed host never reconnects");
    drop(proc);

    // The agent's certificate does not open the control API.
    let creds = c.dir.join("agent-creds");
    std::fs::create_dir_all(&creds).expect("mkdir");
    std::fs::copy(d1.join("identity/ca.pem"), creds.join("ca.crt")).expect("copy");
    std::fs::copy(d1.join("identity/cert.pem"), creds.join("client.crt")).expect("copy");
    std::fs::copy(d1.join("identity/key.pem"), creds.join("client.key")).expect("copy");
    let out = Command::new(c.bin.join("cutover"))
        .args(["hosts", "--coordinator", &c.coord_addr, "--credentials"])
        .arg(&creds)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    c.agents.clear();
}

/// A pipe whose reading end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    writer
}

#[test]
fn a_closed_stdout_ends_commands_quietly_and_cli_flags_go_before_or_after() {
    let c = Cluster::start(80, 1);
    c.deploy_versions(&["1.0.0"]);
    let id = c.cli_ok(&["status", "--output", "json"]);
    let id: serde_json::Value = serde_json::from_str(&id).expect("json");
    let id = id["id"].as_str().expect("id").to_string();
    let dir = tempfile::tempdir().expect("tmp");
    let plan = write_plan(dir.path(), "plan.toml", &minimal_plan());
    let plan = plan.to_str().expect("path");
    // Like `cutover show ID | head -1` once head has gone: no panic, no message, the
    // command's own exit code.
    for args in [
        vec!["show", &id],
        vec!["show"],
        vec!["history"],
        vec!["history", "--output", "json"],
        vec!["status", &id],
        vec!["stats"],
        vec!["hosts"],
        vec!["token", "list"],
        vec!["plan", "validate", plan],
        vec!["--help"],
        vec!["--version"],
    ] {
        let out = c
            .cli_command(&args)
            .stdout(closed_pipe())
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
    }

    // --output before or after the subcommand, at any depth.
    for args in [
        &["--output", "json", "status"][..],
        &["status", "--output", "json"],
        &["--output", "text", "status", "--output", "json"],
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&c.cli_ok(args)).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(v["id"], id.as_str(), "{args:?}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["token", "create", "--output", "json"])).expect("json");
    assert!(v["token"].is_string(), "{v}");

    // The coordinator's HTTP port instead of its gRPC port.
    let out = c.cli(&["hosts", "--coordinator", &c.http_addr]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("{} is not cutover's gRPC port", c.http_addr))
            && err.contains("HTTP port")
            && err.contains("7400"),
        "{err}"
    );
    assert!(!err.contains("InvalidContentType"), "{err}");
}

/// Lines of `--wait` progress for deployment `id` (not timeline events).
fn progress_lines<'a>(stderr: &'a str, id: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.starts_with(id)).collect()
}

/// Polls `log` until it holds `what`.
fn wait_for_text(log: &std::path::Path, what: &str) {
    wait_until(Duration::from_secs(30), what, || {
        std::fs::read_to_string(log).is_ok_and(|t| t.contains(what))
    });
}

/// Sends SIGINT, as Ctrl-C does, and waits for the process to end; returns its exit code.
fn interrupt(child: &mut std::process::Child) -> Option<i32> {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut code = None;
    wait_until(
        Duration::from_secs(10),
        "the CLI to end on Ctrl-C",
        || match child.try_wait() {
            Ok(Some(s)) => {
                code = Some(s.code());
                true
            }
            _ => false,
        },
    );
    code.flatten()
}

#[test]
fn wait_prints_changes_not_polls_and_ctrl_c_leaves_the_deployment_going() {
    let c = Cluster::start(81, 2);
    a_line_per_change(&c);
    let id = ctrl_c_on_deploy_wait(&c);

    // `watch` with no id follows the deployment in progress; Ctrl-C again.
    let log = c.dir.join("watch.err");
    let mut watch = c
        .cli_command(&["watch"])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("watch");
    wait_for_text(&log, &format!("{id} web 3.0.0: progressing"));
    assert_eq!(interrupt(&mut watch), Some(130));
    let err = std::fs::read_to_string(&log).expect("log");
    assert_eq!(err.lines().last(), Some(goes_on(&id).as_str()), "{err}");

    // Nothing in progress: `watch` says so.
    c.cli_ok(&["abort", &id]);
    wait_until(Duration::from_secs(30), "the abort to end", || {
        c.status(&id)["state"] == "aborted"
    });
    let out = c.cli(&["watch"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "error: no deployment in progress: the latest, {id} (web 3.0.0), ended aborted"
        )),
        "{err}"
    );
}

/// What the CLI says when Ctrl-C leaves deployment `id` going.
fn goes_on(id: &str) -> String {
    format!("{id} goes on; follow it with `cutover watch {id}`, stop it with `cutover abort {id}`")
}

/// `deploy --wait` with stderr to a file, as under systemd or CI, prints a line per
/// change, not per poll.
fn a_line_per_change(c: &Cluster) {
    let steps = r#"[{ traffic = 50, hold = "6s" }, { traffic = 100 }]"#;
    // A past success gives typical times, so the progress line carries a moving ETA.
    let plan = c.plan("1.0.0").steps(steps).write("v1");
    assert_eq!(c.deploy_wait(&plan).0, 0);

    let plan = c.plan("2.0.0").steps(steps).write("v2");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    let progress = progress_lines(&err, &id);
    assert!(err.contains("| ETA "), "{err}");
    assert!(
        (2..=12).contains(&progress.len()),
        "{} progress lines over a 6 s hold: {err}",
        progress.len()
    );
    let said = |l: &str| {
        l.split(" | last interval")
            .next()
            .unwrap_or(l)
            .split(" | ETA")
            .next()
            .unwrap_or(l)
            .to_string()
    };
    for pair in progress.windows(2) {
        assert_ne!(
            said(pair[0]),
            said(pair[1]),
            "a line only when something changes: {err}"
        );
    }
}

/// Ctrl-C during `deploy --wait`: the deployment goes on, and the CLI says how to
/// follow or stop it. Returns the deployment's id.
fn ctrl_c_on_deploy_wait(c: &Cluster) -> String {
    let long = r#"[{ traffic = 50, hold = "10m" }, { traffic = 100 }]"#;
    let plan = c.plan("3.0.0").steps(long).write("v3");
    let log = c.dir.join("deploy-wait.err");
    let mut deploy = c
        .cli_command(&["deploy", plan.to_str().expect("path"), "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("deploy");
    wait_for_text(&log, "step 1: 50% confirmed on every host");
    assert_eq!(interrupt(&mut deploy), Some(130));
    let mut out = String::new();
    std::io::Read::read_to_string(deploy.stdout.as_mut().expect("stdout"), &mut out)
        .expect("stdout");
    let id = out.lines().next().unwrap_or_default().to_string();
    assert!(id.starts_with("d-"), "{out}");
    let err = std::fs::read_to_string(&log).expect("log");
    assert_eq!(err.lines().last(), Some(goes_on(&id).as_str()), "{err}");
    assert_eq!(c.status(&id)["state"], "progressing");

    id
}

#[test]
fn daemon_logs_carry_no_colour_codes_and_json_lines_parse() {
    let mut c = Cluster::start(82, 1);
    let no_escape = |name: &str| {
        let log = std::fs::read(c.dir.join(name)).expect("log");
        assert!(!log.is_empty(), "{name} is empty");
        assert!(
            !log.contains(&0x1b),
            "{name} has terminal codes: {}",
            String::from_utf8_lossy(&log)
        );
    };
    no_escape("coordinator.log");
    no_escape("web-1.log");

    // JSON lines, from the coordinator (on every interface: it warns that the
    // dashboard has no login) and from a new agent.
    c.stop_coordinator();
    c.serve_args = vec!["--log-format".into(), "json".into()];
    c.http_addr = format!("0.0.0.0:{}", tests::free_port());
    c.start_coordinator();
    c.agent_args = vec!["--log-format".into(), "json".into()];
    c.add_agent("web-2", "127.82.0.3", "env=test");
    let lines = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(c.dir.join(name))
            .expect("log")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {l:?}: {e}")))
            .collect()
    };
    let coordinator = lines("coordinator.log");
    assert!(
        coordinator.iter().any(|l| l["level"] == "WARN"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no login"))),
        "{coordinator:?}"
    );
    assert!(
        coordinator
            .iter()
            .any(|l| l["fields"]["message"] == "coordinator listening"),
        "{coordinator:?}"
    );
    let agent = lines("web-2.log");
    assert!(!agent.is_empty());
}

#[test]
fn help_shows_each_command_its_own_flags() {
    let out = cutover(&["serve", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for cli_only in ["--coordinator", "--credentials", "--output"] {
        assert!(!help.contains(cli_only), "{cli_only} in {help}");
    }
    for own in ["--data-dir", "--listen", "--http", "--log-format"] {
        let line = help.lines().position(|l| l.trim_start().starts_with(own));
        let described = line
            .and_then(|i| help.lines().nth(i + 1))
            .is_some_and(|next| !next.trim().is_empty());
        assert!(described, "{own} has a help line: {help}");
    }
    let out = cutover(&["history", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--service",
        "--limit",
        "--since",
        "--output",
        "--coordinator",
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("{flag} in {help}"));
        assert!(
            line.split_whitespace().count() > 3,
            "{flag} has help: {line}"
        );
    }
}

#[test]
fn plan_errors_speak_the_plans_language_and_long_lines_are_cut() {
    let dir = tempfile::tempdir().expect("tmp");
    let check = |name: &str, lines: &[String]| {
        let p = write_plan(dir.path(), name, lines);
        let out = cutover(&["plan", "validate", p.to_str().expect("path")]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut typo = minimal_plan();
    typo[6] = r#"command = ["./x", "--port", "${PROT}"]"#.into();
    let (code, err) = check("typo.toml", &typo);
    assert_eq!(code, Some(2));
    assert!(
        err.ends_with(":7:29: run.command[2]: unknown variable ${PROT}: did you mean ${PORT}?\n"),
        "{err}"
    );
    let mut quoted_port = minimal_plan();
    quoted_port[7] = r#"listen = "8080""#.into();
    let (code, err) = check("type.toml", &quoted_port);
    assert_eq!(code, Some(2));
    assert!(
        err.ends_with(":8:10: run.listen must be a port number 1–65535 (found \"8080\")\n"),
        "{err}"
    );

    // One size limit: what `plan validate` refuses, `deploy` refuses the same way,
    // before it reaches any coordinator.
    let good = minimal_plan().join("\n") + "\n";
    let huge = format!("{good}{}", "# padding\n".repeat(1024 * 1024));
    let p = dir.path().join("huge.toml");
    std::fs::write(&p, huge).expect("write");
    let p = p.to_str().expect("path");
    let validate = cutover(&["plan", "validate", p]);
    let deploy = cutover(&["deploy", p, "--coordinator", "127.0.0.1:1"]);
    for out in [&validate, &deploy] {
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err,
            format!("error: {p}:1:1: the plan is 10.0 MiB; a plan may be at most 1 MiB\n")
        );
    }

    // A 5 KB path: its start and end are kept, the middle is cut.
    let long = format!(
        "/nonexistent/{}/plan.toml",
        "very-long-folder-name/".repeat(230)
    );
    let out = cutover(&["plan", "validate", &long]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.len() < 1100, "{} bytes: {err}", err.len());
    assert!(
        err.starts_with("error: /nonexistent/very-long-folder-name/"),
        "{err}"
    );
    assert!(err.contains(" characters cut …] "), "{err}");
    assert!(
        err.trim_end().ends_with("(os error 36)") || err.trim_end().ends_with("(os error 2)"),
        "{err}"
    );
}
