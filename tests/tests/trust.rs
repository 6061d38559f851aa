//! Who did what, and who may: personal admin credentials whose name is the actor the
//! timeline records whatever the client claims, read-only viewers, revocation that
//! shuts a person out at once and for good, and deploy locks that refuse deployments
//! and rollbacks with their message until lifted.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tests::{Cluster, Value, wait_until};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts `out` failed with `code` and one line on stderr holding every one of `words`.
fn refused(out: &Output, code: i32, words: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for w in words {
        assert!(err.contains(w), "{w:?} in {err}");
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `show ID` as JSON, read with `credentials`.
fn show(c: &Cluster, credentials: &Path, id: &str) -> (Value, String) {
    let out = c.cli_as(credentials, &["show", id, "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (json(&text), text)
}

/// The actor of each timeline event of `show` that names one, in order.
fn actors(show: &Value) -> Vec<String> {
    show["timeline"]
        .as_array()
        .expect("timeline")
        .iter()
        .filter_map(|e| e["actor"].as_str().map(String::from))
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn the_actor_is_the_certificates_name_and_revoked_credentials_are_refused() {
    let mut c = Cluster::start(110, 1);
    let first = c.credentials();
    let alice = c.admin_create("alice", "admin");
    assert_eq!(mode(&alice), 0o700);
    assert_eq!(mode(&alice.join("client.key")), 0o600);
    assert!(alice.join("ca.crt").exists() && alice.join("client.crt").exists());

    // A name is issued once; a refused create leaves no folder behind.
    let again = c.dir.join("people/alice-again");
    let out = c.cli(&[
        "admin",
        "create",
        "alice",
        "--out",
        again.to_str().expect("path"),
    ]);
    refused(&out, 1, &["admin alice already exists"]);
    assert!(!again.exists(), "no folder left behind");
    // Nor is an occupied folder written to.
    let out = c.cli(&[
        "admin",
        "create",
        "carol",
        "--out",
        alice.to_str().expect("path"),
    ]);
    refused(&out, 2, &["not empty"]);

    // Whatever the client's environment says, the timeline names the certificate.
    let plan = c.plan("1.0.0").write("v1");
    let out = c
        .cli_command_as(&alice, &["deploy", plan.to_str().expect("path"), "--wait"])
        .env("USER", "mallory")
        .env("LOGNAME", "mallory")
        .output()
        .expect("deploy");
    assert!(out.status.success(), "{}", stderr(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (v, text) = show(&c, &first, &id);
    assert_eq!(actors(&v), ["alice"]);
    assert!(!text.contains("mallory"), "{text}");
    let out = c.cli(&["show", &id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("by alice"));

    // An operator's command too: `abort` by the first-start admin is by `admin`.
    let held = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 50, hold = "10m" }, { traffic = 100 }]"#)
        .write("v2");
    let id = c.deploy_until_holding(&held);
    let out = c
        .cli_command(&["abort", &id])
        .env("USER", "mallory")
        .output()
        .expect("abort");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(c.watch(&id).0, 4);
    assert_eq!(actors(&show(&c, &alice, &id).0), ["admin", "admin"]);

    // Who holds credentials.
    let list = json(&c.cli_ok(&["admin", "list", "--output", "json"]));
    let people: Vec<(&str, &str, &str)> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or(""),
                a["role"].as_str().unwrap_or(""),
                a["created_by"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        people,
        [("admin", "admin", "-"), ("alice", "admin", "admin")]
    );

    // Revoked: refused at once, saying by whom, and still after a restart.
    let out = c.cli_as(&alice, &["admin", "revoke", "alice"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let revoked = ["the credentials of alice were revoked by alice at 20"];
    refused(&c.cli_as(&alice, &["hosts"]), 1, &revoked);
    c.stop_coordinator();
    c.start_coordinator();
    refused(&c.cli_as(&alice, &["status"]), 1, &revoked);
    // The last holder of the admin role stays.
    refused(
        &c.cli(&["admin", "revoke", "admin"]),
        1,
        &["last holder of the admin role"],
    );
    refused(
        &c.cli(&["admin", "revoke", "alice"]),
        1,
        &["unknown admin \"alice\""],
    );
}

#[test]
fn viewers_read_everything_and_change_nothing() {
    let c = Cluster::start(111, 1);
    c.deploy_versions(&["1.0.0"]);
    let bob = c.admin_create("bob", "viewer");

    for read in [
        &["hosts"][..],
        &["status"],
        &["history"],
        &["show"],
        &["stats"],
        &["status", "--output", "json"],
    ] {
        let out = c.cli_as(&bob, read);
        assert!(out.status.success(), "{read:?}: {}", stderr(&out));
    }
    let id = json(&c.cli_as_ok(&bob, &["status", "--output", "json"]))["id"]
        .as_str()
        .expect("id")
        .to_string();
    let watched = c.cli_as(&bob, &["watch", &id]);
    assert_eq!(watched.status.code(), Some(0), "{}", stderr(&watched));

    let plan = c.plan("2.0.0").write("v2");
    let plan = plan.to_str().expect("path");
    let no = |call: &str| {
        format!(
            "bob has the viewer role, which may only read (status, hosts, history, show, stats, watch, logs, releases, service list, dry runs); {call} needs the admin role"
        )
    };
    let eve = c.dir.join("people/eve");
    let eve = eve.to_str().expect("path");
    for (args, call) in [
        (&["deploy", plan][..], "Deploy"),
        (&["rollback", "web"], "Rollback"),
        (&["abort", &id], "Command"),
        (&["token", "create"], "CreateToken"),
        (&["token", "list"], "ListTokens"),
        (&["hosts", "remove", "web-1"], "RemoveHost"),
        (&["admin", "create", "eve", "--out", eve], "CreateAdmin"),
        (&["admin", "list"], "ListAdmins"),
        (&["admin", "revoke", "admin"], "RevokeAdmin"),
        (&["lock", "web", "-m", "mine"], "LockService"),
        (&["unlock", "web"], "UnlockService"),
    ] {
        refused(&c.cli_as(&bob, args), 1, &[&no(call)]);
    }
    // Nothing changed: one deployment, the host still enrolled and serving, nobody new.
    let history = json(&c.cli_ok(&["history", "--output", "json"]));
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    assert!(c.connected("web-1"));
    assert!(c.all_serving("1.0.0"));
    assert!(!Path::new(eve).exists(), "no folder left behind");
    let admins = json(&c.cli_ok(&["admin", "list", "--output", "json"]));
    assert_eq!(admins.as_array().map(Vec::len), Some(2), "{admins}");
    assert_eq!(c.cli(&["lock", "web", "-m", "x"]).status.code(), Some(0));
    assert_eq!(
        json(&c.cli_as_ok(&bob, &["status", "--output", "json"]))["lock"]["by"],
        "admin"
    );
}

#[test]
fn a_locked_service_refuses_deploys_and_rollbacks_until_unlocked() {
    let mut c = Cluster::start(112, 1);
    c.deploy_versions(&["1.0.0", "2.0.0"]);
    let ana = c.admin_create("ana", "admin");
    let why = "database migration until 14:00";

    refused(
        &c.cli(&["lock", "nope", "-m", why]),
        1,
        &["unknown service \"nope\""],
    );
    refused(&c.cli(&["lock", "web", "-m", " "]), 2, &["--message"]);
    let out = c
        .cli_command_as(&ana, &["lock", "web", "--message", why, "--output", "json"])
        .env("USER", "mallory")
        .output()
        .expect("lock");
    assert!(out.status.success(), "{}", stderr(&out));
    let lock = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        (&lock["service"], &lock["by"], &lock["message"]),
        (&"web".into(), &"ana".into(), &why.into())
    );
    refused(
        &c.cli(&["lock", "web", "-m", "mine"]),
        1,
        &["locked by ana", "it stays as it is"],
    );

    // Deploy and rollback are refused with the message, who and when; nothing starts.
    let locked = [
        "service web is locked by ana since 20",
        why,
        "`cutover unlock web` lifts the lock",
    ];
    let v3 = c.plan("3.0.0").write("v3");
    let v3 = v3.to_str().expect("path");
    refused(&c.cli(&["deploy", v3, "--wait"]), 1, &locked);
    refused(&c.cli(&["rollback", "web"]), 1, &locked);
    refused(&c.cli(&["rollback", "web", "--to", "1.0.0"]), 1, &locked);
    for action in ["restart", "stop", "start"] {
        refused(&c.cli(&["service", action, "web"]), 1, &locked);
    }
    refused(&c.cli(&["service", "remove", "web", "--yes"]), 1, &locked);
    // A dry run says so, and changes nothing.
    let dry = c.cli(&["deploy", v3, "--dry-run"]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(dry.status.code(), Some(1), "{text}");
    assert!(text.contains("service web is locked by ana"), "{text}");
    let history = json(&c.cli_ok(&["history", "--output", "json"]));
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");
    assert!(c.all_serving("2.0.0"));

    // status, hosts and the dashboard's API show it.
    let status = json(&c.cli_ok(&["status", "--output", "json"]));
    assert_eq!(
        (&status["lock"]["by"], &status["lock"]["message"]),
        (&"ana".into(), &why.into())
    );
    assert!(c.cli_ok(&["status"]).contains("by ana since 20"));
    assert_eq!(c.hosts()[0]["services"][0]["lock"]["by"], "ana");
    assert!(c.cli_ok(&["hosts"]).contains("locked by ana"));
    let api = json(&tests::get(&c.http_addr, "/api/locks").expect("/api/locks"));
    assert_eq!(api[0]["message"], why);
    let fleet = json(&tests::get(&c.http_addr, "/api/fleet").expect("/api/fleet"));
    assert_eq!(fleet[0]["services"][0]["lock"]["by"], "ana");

    // The lock survives a restart of the coordinator.
    c.stop_coordinator();
    c.start_coordinator();
    wait_until(Duration::from_secs(20), "web-1 to reconnect", || {
        c.connected("web-1")
    });
    refused(&c.cli(&["deploy", v3]), 1, &locked);

    // Unlocked, deployments go again.
    let out = c.cli(&["unlock", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(why));
    refused(
        &c.cli(&["unlock", "web"]),
        1,
        &["service web is not locked"],
    );
    let (code, _, err) = c.deploy_wait(Path::new(v3));
    assert_eq!(code, 0, "{err}");
    assert!(c.all_serving("3.0.0"));
    assert_eq!(
        json(&c.cli_ok(&["status", "--output", "json"]))["lock"],
        Value::Null
    );
}
