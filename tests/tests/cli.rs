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

#[test]
fn plan_validate_exit_codes_and_located_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("good.toml");
    let sha = "a".repeat(64);
    let text = format!(
        "service = \"web\"\n[release]\nversion = \"1\"\nartifact = \"file:///x.tar.gz\"\nsha256 = \"{sha}\"\n[run]\ncommand = [\"./x\"]\nlisten = 8080\n[health]\nhttp = \"/\"\n"
    );
    std::fs::write(&good, &text).expect("write");
    let out = cutover(&["plan", "validate", good.to_str().expect("path")]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text.replace("[health]", "[heath]")).expect("write");
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
    // Replayed token.
    let out = c.join("h2", &c.dir.join("h2"), &token);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no uses left"));
    // Forged secret.
    let mut forged = token.clone();
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
