//! The daemons' own files: private from other local users, a full disk survived without
//! a restart, one coordinator per data dir.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{Cluster, Tmpfs, wait_until};

fn healthz(c: &Cluster) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{}/healthz", c.http_addr))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn a_full_disk_stops_the_coordinator_writing_and_freeing_space_is_enough() {
    let mut c = Cluster::unstarted(&[]);
    let disk = Tmpfs::mount(&c.dir.join("coordinator"), "8m");
    c.start_coordinator();
    c.add_agent("web-1", "127.68.0.2", "env=test");
    c.deploy_versions(&["1.0.0"]);
    assert_eq!(healthz(&c), "200");

    // A deployment holding when the disk fills up.
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 10, hold = "2s" }, { traffic = 100 }]"#)
        .write("v2");
    let id = c.deploy_until_holding(&plan);
    let filler = disk.fill();
    // A deployment whose record needs room (a plan with 1 MB of env) cannot be recorded:
    // it is refused with the reason, in one line, and /healthz says the store is failing.
    let big = "x".repeat(100_000);
    let other = (0..10)
        .fold(c.plan("3.0.0"), |plan, i| {
            plan.env(&format!("BIG{i}"), &big)
        })
        .service("api")
        .listen(tests::free_port())
        .write("other");
    let out = c.cli(&["deploy", other.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("disk full at") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(healthz(&c), "503");

    // Space comes back: the same coordinator, not restarted, records again; the
    // deployment that was holding finished with its whole timeline.
    std::fs::remove_file(&filler).expect("free the disk");
    let (code, _, err) = c.deploy_wait(&other);
    assert_eq!(code, 0, "{err}");
    assert_eq!(healthz(&c), "200");
    wait_until(Duration::from_secs(30), "the deployment to finish", || {
        c.status(&id)["state"] == "succeeded"
    });
    assert!(c.all_serving("2.0.0"), "{:?}", c.versions());
    let timeline = c.cli_ok(&["show", &id]);
    assert!(timeline.contains("step 2: moving to 100%"), "{timeline}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Runs `grep -a NEEDLE FILE` as `nobody`: true when it could read the file and found it.
fn nobody_reads(file: &Path, needle: &str) -> bool {
    Command::new("runuser")
        .args(["-u", "nobody", "--", "grep", "-a", "-q", needle])
        .arg(file)
        .status()
        .expect("run runuser")
        .success()
}

#[test]
fn stores_are_private_and_one_coordinator_owns_its_data_dir() {
    let mut c = Cluster::start(69, 0);
    c.add_agent("web-1", "127.69.0.2", "env=test");
    let plan = c.plan("1.0.0").env("DB_PASSWORD", "pw-7f3a9c").write("v1");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");

    let coord = c.dir.join("coordinator");
    let agent = c.dir.join("web-1");
    assert_eq!(mode(&coord), 0o700);
    assert_eq!(mode(&coord.join("cutover.redb")), 0o600);
    assert_eq!(mode(&agent), 0o711);
    assert_eq!(mode(&agent.join("agent.redb")), 0o600);
    // The secret is in both stores, and no other local user can read it there.
    std::fs::set_permissions(&c.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for store in [coord.join("cutover.redb"), agent.join("agent.redb")] {
        assert!(!nobody_reads(&store, "pw-7f3a9c"), "{}", store.display());
    }

    // A second coordinator on the same data dir says who owns it, in one line.
    let out = Command::new(c.bin.join("cutover"))
        .args(["serve", "--data-dir"])
        .arg(&coord)
        .args(["--listen", &format!("127.0.0.1:{}", tests::free_port())])
        .args(["--http", &format!("127.0.0.1:{}", tests::free_port())])
        .output()
        .expect("run a second coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains(&format!(
                "another coordinator is running with data dir {}",
                coord.display()
            )),
        "{err}"
    );
    assert_eq!(
        err.matches("another coordinator").count(),
        1,
        "said once: {err}"
    );
}
