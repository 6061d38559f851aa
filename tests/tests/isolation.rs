//! What a service process gets on its host, and nothing more: its user (for its checks
//! too), a clean environment, its own state directory, a release it cannot change or use
//! to become root, a private port that is free when it starts, and a data dir with no
//! leftovers of interrupted work.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::{Artifact, Cluster, get, wait_until};

/// A cluster whose agent runs services as `nobody` (the agent itself runs as root).
fn cluster_as_nobody(net: u8, agent_env: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::start(net, 0);
    // The service user must be able to reach the agent's data dir inside the test dir.
    std::fs::set_permissions(&c.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    c.agent_args = vec!["--service-user".into(), "nobody".into()];
    c.agent_env = agent_env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    c.add_agent("web-1", &format!("127.{net}.0.2"), "env=test");
    c
}

fn uid_of(user: &str) -> u32 {
    let out = std::process::Command::new("id")
        .args(["-u", user])
        .output()
        .expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("uid")
}

fn deploy_ok(c: &Cluster, plan: &Path) {
    let (code, _, err) = c.deploy_wait(plan);
    assert_eq!(code, 0, "{err}");
}

fn state_dir(c: &Cluster) -> PathBuf {
    c.agents[0].data_dir.join("state/web")
}

#[test]
fn exec_checks_run_as_the_service_user() {
    let c = cluster_as_nobody(70, &[]);
    let addr = format!("127.70.0.2:{}", c.listen);
    let plan = c
        .plan("1.0.0")
        .health_exec(&["sh", "-c", r#"id -u > "$CUTOVER_STATE_DIR/check-uid""#])
        .write("exec");
    deploy_ok(&c, &plan);
    let nobody = uid_of("nobody");
    assert_eq!(get(&addr, "/uid").expect("uid"), nobody.to_string());
    let written = std::fs::read_to_string(state_dir(&c).join("check-uid")).expect("check-uid");
    assert_eq!(written.trim(), nobody.to_string(), "the check's user");
    let meta = std::fs::metadata(state_dir(&c)).expect("state dir");
    assert_eq!(meta.uid(), nobody);
    assert_eq!(meta.mode() & 0o7777, 0o700);
}

#[test]
fn services_see_a_clean_environment_and_keep_state_across_releases() {
    let c = cluster_as_nobody(
        72,
        &[
            ("CUTOVER_CREDENTIALS", "/root/.config/cutover"),
            ("SECRET_TOKEN", "do-not-leak"),
        ],
    );
    let addr = format!("127.72.0.2:{}", c.listen);
    let with_env = |version: &str| {
        c.plan(version)
            .env("APP_MODE", "test")
            .env("APP_URL", "http://127.0.0.1:${PORT}/")
    };
    let env_of = || -> BTreeMap<String, String> {
        get(&addr, "/env")
            .expect("env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };

    deploy_ok(&c, &with_env("1.0.0").write("v1"));
    let env = env_of();
    let names: Vec<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "APP_MODE",
            "APP_URL",
            "CUTOVER_RELEASE",
            "CUTOVER_SERVICE",
            "CUTOVER_SLOT",
            "CUTOVER_STATE_DIR",
            "HOME",
            "LANG",
            "LOGNAME",
            "PATH",
            "PORT",
            "USER"
        ],
        "{env:?}"
    );
    let port = &env["PORT"];
    assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "{port}");
    let state = state_dir(&c).to_string_lossy().into_owned();
    let want = [
        ("APP_MODE", "test".to_string()),
        ("APP_URL", format!("http://127.0.0.1:{port}/")),
        ("CUTOVER_RELEASE", "1.0.0".into()),
        ("CUTOVER_SERVICE", "web".into()),
        ("CUTOVER_SLOT", "blue".into()),
        ("CUTOVER_STATE_DIR", state.clone()),
        ("HOME", "/nonexistent".into()),
        ("LANG", "C.UTF-8".into()),
        ("LOGNAME", "nobody".into()),
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("USER", "nobody".into()),
    ];
    for (k, v) in want {
        assert_eq!(env[k], v, "{k}");
    }
    assert_eq!(
        get(&addr, "/state/write/greeting").expect("write"),
        "written"
    );

    // The next release, in the other slot, finds what the first one wrote.
    deploy_ok(&c, &with_env("2.0.0").write("v2"));
    let env = env_of();
    assert_eq!(env["CUTOVER_RELEASE"], "2.0.0");
    assert_eq!(env["CUTOVER_SLOT"], "green");
    assert_eq!(env["CUTOVER_STATE_DIR"], state);
    assert_eq!(
        get(&addr, "/state/read/greeting").expect("read"),
        "release 1.0.0"
    );
}

/// The sample release plus what a careless or hostile build may ship: a setuid-root
/// copy of `whoami`, a world-writable file and a sticky world-writable directory.
fn loose_release(c: &Cluster, version: &str) -> Artifact {
    use sha2::Digest;
    use std::io::Write;
    let out = c.dir.join(format!("loose-{version}.tar.gz"));
    let file = std::fs::File::create(&out).expect("create artifact");
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    let mut add = |name: &str, mode: u32, kind: tar::EntryType, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(kind);
        h.set_cksum();
        tar.append_data(&mut h, name, data).expect("append");
    };
    let sample = std::fs::read(c.bin.join("cutover-sample")).expect("sample binary");
    let whoami = std::fs::read("/usr/bin/whoami").expect("whoami");
    let regular = tar::EntryType::Regular;
    add("bin/cutover-sample", 0o755, regular, &sample);
    add("bin/whoami-suid", 0o4755, regular, &whoami);
    add(
        "behaviour.env",
        0o644,
        regular,
        format!("version={version}\n").as_bytes(),
    );
    add("open.txt", 0o666, regular, b"anyone may write here\n");
    add("scratch", 0o1777, tar::EntryType::Directory, b"");
    tar.into_inner()
        .expect("tar")
        .finish()
        .expect("gzip")
        .flush()
        .expect("flush");
    let sha = hex::encode(sha2::Sha256::digest(std::fs::read(&out).expect("read")));
    Artifact {
        url: format!("file://{}", out.display()),
        sha256: sha,
    }
}

#[test]
fn a_release_cannot_be_changed_by_its_service_nor_make_it_root() {
    let c = cluster_as_nobody(71, &[]);
    let addr = format!("127.71.0.2:{}", c.listen);
    let loose = loose_release(&c, "1.0.0");
    let plan = c
        .plan("1.0.0")
        .artifact(&loose.url, &loose.sha256)
        .health_exec(&[
            "sh",
            "-c",
            r#"./bin/whoami-suid > "$CUTOVER_STATE_DIR/euid""#,
        ])
        .write("loose");
    deploy_ok(&c, &plan);
    assert_eq!(
        get(&addr, "/uid").expect("uid"),
        uid_of("nobody").to_string()
    );
    // The setuid bit is gone: run by nobody, it runs as nobody.
    let euid = std::fs::read_to_string(state_dir(&c).join("euid")).expect("euid");
    assert_eq!(euid.trim(), "nobody");
    for path in ["open.txt", "scratch/new.txt", "new.txt", "behaviour.env"] {
        let e = get(&addr, &format!("/write/{path}")).expect_err(path);
        assert!(e.contains("403"), "{path}: {e}");
    }
    let releases = c.agents[0].data_dir.join("releases/web");
    let release = std::fs::read_dir(&releases)
        .expect("releases")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("the release dir");
    for (path, mode) in [
        ("", 0o755),
        ("bin/whoami-suid", 0o755),
        ("open.txt", 0o644),
        ("scratch", 0o755),
    ] {
        let meta = std::fs::metadata(release.join(path)).expect(path);
        assert_eq!(meta.mode() & 0o7777, mode, "{path}");
        assert_eq!(meta.uid(), 0, "{path} belongs to the agent's user");
    }
    assert_eq!(
        std::fs::read_to_string(release.join("open.txt")).expect("open.txt"),
        "anyone may write here\n"
    );
}

/// Three consecutive ports between 20000 and 29999 that are free now.
fn free_port_run() -> u16 {
    let seed = u64::from(std::process::id())
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0),
        );
    for i in 0..500u64 {
        let base = 20_000 + u16::try_from((seed + i * 7_919) % 9_990).expect("below 9990");
        let all_free =
            (base..base + 3).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no three consecutive free ports");
}

#[test]
fn a_held_port_is_skipped_and_a_failed_start_moves_to_another_port() {
    let mut c = Cluster::start(73, 0);
    let base = free_port_run();
    // Another program holds the first port of the range.
    let held = std::net::TcpListener::bind(("127.0.0.1", base)).expect("hold a port");
    c.agent_args = vec!["--slot-ports".into(), format!("{base}-{}", base + 2)];
    c.add_agent("web-1", "127.73.0.2", "env=test");
    // The first start fails the way a lost race for a port does; the next one works.
    let script = r#"echo "$PORT" >> "$CUTOVER_STATE_DIR/ports"; if [ ! -e "$CUTOVER_STATE_DIR/failed" ]; then touch "$CUTOVER_STATE_DIR/failed"; echo "bind 127.0.0.1:$PORT: Address already in use" >&2; exit 1; fi; exec ./bin/cutover-sample serve --port "$PORT""#;
    let plan = c
        .plan("1.0.0")
        .command(&["sh", "-c", script])
        .write("ports");
    deploy_ok(&c, &plan);
    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
    let ports: Vec<u16> = std::fs::read_to_string(state_dir(&c).join("ports"))
        .expect("ports")
        .lines()
        .map(|l| l.trim().parse().expect("port"))
        .collect();
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert_ne!(ports[0], ports[1], "the retry got another port");
    for p in &ports {
        assert!(
            (base + 1..=base + 2).contains(p),
            "{p} outside the free ports"
        );
    }
    drop(held);

    // Bad ranges are one clear error.
    for (value, why) in [
        ("30000-20000", "the first port is above the last"),
        ("20000", "expected FIRST-LAST"),
        ("1-70000", "70000 is not a port"),
    ] {
        let out = std::process::Command::new(c.bin.join("cutover-agent"))
            .args(["run", "--data-dir"])
            .arg(&c.agents[0].data_dir)
            .args(["--slot-ports", value])
            .output()
            .expect("run cutover-agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.contains("--slot-ports") && first.contains(why),
            "{value}: {err}"
        );
    }
}

#[test]
fn leftovers_of_an_interrupted_run_are_removed_and_the_data_dir_is_closed() {
    let mut c = Cluster::start(74, 0);
    let half = "releases/web/.unpack-1.0.0-0123456789ab-4242";
    c.add_agent_with("web-1", "127.74.0.2", "env=test", |data| {
        std::fs::create_dir_all(data.join(half).join("bin")).expect("mkdir");
        std::fs::write(data.join(half).join("bin/web"), "half unpacked").expect("write");
        std::fs::create_dir_all(data.join("cache")).expect("mkdir");
        std::fs::write(data.join("cache/0123-99.part"), "half downloaded").expect("write");
    });
    let data = c.agents[0].data_dir.clone();
    wait_until(Duration::from_secs(10), "leftovers to be removed", || {
        !data.join(half).exists() && !data.join("cache/0123-99.part").exists()
    });
    let mode = |p: &str| {
        std::fs::metadata(data.join(p))
            .map(|m| m.mode() & 0o777)
            .unwrap_or(0)
    };
    for (path, want) in [
        ("", 0o711),
        ("releases", 0o711),
        ("identity", 0o700),
        ("cache", 0o700),
        ("agent.redb", 0o600),
        ("agent.json", 0o600),
    ] {
        assert_eq!(mode(path), want, "{path}");
    }
    // Releases still deploy into the cleaned directory.
    c.deploy_versions(&["1.0.0"]);
    assert!(c.all_serving("1.0.0"));
}
