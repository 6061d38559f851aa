//! Bad input and hostile peers: one clear error, nothing changed, the old release serving.

use std::io::{Read, Write};
use std::time::Duration;

use tests::{Cluster, Tmpfs, wait_until};

fn v1(c: &Cluster) {
    let plan = c.plan("1.0.0").write("v1");
    assert_eq!(c.deploy_wait(&plan).0, 0);
}

/// Serves `respond` to every connection on a local port; returns the address.
fn tiny_server(respond: &'static [u8]) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(respond);
        }
    });
    addr
}

fn reason_of(c: &Cluster, plan: &std::path::Path) -> (i32, String) {
    let (code, id, err) = c.deploy_wait(plan);
    assert!(!err.contains("panicked"), "{err}");
    (code, c.reason(&id))
}

#[test]
fn broken_commands_ports_and_artifact_servers_fail_preparation_clearly() {
    let c = Cluster::start(51, 2);
    v1(&c);
    let v2 = c.pack("2.0.0", &[]);
    let v2_plan = || c.plan("2.0.0").artifact(&v2.url, &v2.sha256);

    // A command that is not in the release.
    let missing = v2_plan()
        .command(&["./bin/nope", "serve", "--port", "${PORT}"])
        .write("missing-cmd");
    let (code, reason) = reason_of(&c, &missing);
    assert_eq!(code, 3);
    assert!(
        reason.contains("command ./bin/nope: not found in the release"),
        "{reason}"
    );

    // A command that is not executable.
    let not_exec = v2_plan()
        .command(&["./behaviour.env", "serve", "--port", "${PORT}"])
        .write("not-exec");
    let (code, reason) = reason_of(&c, &not_exec);
    assert_eq!(code, 3);
    assert!(reason.contains("not executable"), "{reason}");

    // The public port is taken on one host: that host fails, nothing moves.
    let busy = std::net::TcpListener::bind("127.51.0.3:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let busy_plan = v2_plan().listen(port).write("busy");
    let (code, reason) = reason_of(&c, &busy_plan);
    assert_eq!(code, 3);
    assert!(
        reason.contains("host web-2: bind 127.51.0.3:") && reason.contains("in use"),
        "{reason}"
    );
    drop(busy);

    // An artifact server that answers 500 (retried, then given up) or closes early. (A
    // release already on disk would not be downloaded again: use new ones.)
    let sha = c.pack("2.0.5", &[]).sha256;
    let e500 = tiny_server(
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    let plan = c
        .plan("2.0.5")
        .artifact(&format!("http://{e500}/a.tar.gz"), &sha)
        .write("e500");
    let (code, reason) = reason_of(&c, &plan);
    assert_eq!(code, 3);
    assert!(reason.contains("HTTP 500"), "{reason}");
    let early = tiny_server(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\nconnection: close\r\n\r\npartial",
    );
    let plan = c
        .plan("2.0.5")
        .artifact(&format!("http://{early}/a.tar.gz"), &sha)
        .write("early");
    let (code, reason) = reason_of(&c, &plan);
    assert_eq!(code, 3);
    assert!(reason.contains("download http://"), "{reason}");

    assert!(c.all_serving("1.0.0"), "{:?}", c.versions());
}

#[test]
fn garbage_on_the_grpc_port_changes_nothing() {
    let c = Cluster::start(52, 1);
    v1(&c);
    let junk: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",
        &[0u8; 70_000],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04",
    ];
    for j in junk {
        if let Ok(mut s) = std::net::TcpStream::connect(&c.coord_addr) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.write_all(j);
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
        }
    }
    // A TLS client without a certificate is refused by the control API.
    let hosts = c.cli(&["hosts"]);
    assert!(
        hosts.status.success(),
        "{}",
        String::from_utf8_lossy(&hosts.stderr)
    );
    assert!(c.connected("web-1"));
    assert!(c.all_serving("1.0.0"));
}

#[test]
fn sigterm_stops_both_daemons_cleanly_and_leaves_no_slot_process() {
    let mut c = Cluster::start(53, 1);
    v1(&c);
    let data = c.agents[0].data_dir.clone();
    assert_eq!(tests::processes_under(&data).len(), 1);
    assert!(
        c.agents[0].proc.stop(Duration::from_secs(20)),
        "agent stops on SIGTERM"
    );
    let status = c.agents[0].proc.child.wait().expect("status");
    assert!(status.success(), "agent exit status {status}");
    wait_until(Duration::from_secs(5), "slot processes gone", || {
        tests::processes_under(&data).is_empty()
    });
    let coord = c.coordinator.as_mut().expect("coordinator");
    assert!(
        coord.stop(Duration::from_secs(10)),
        "coordinator stops on SIGTERM"
    );
    let status = coord.child.wait().expect("status");
    assert!(status.success(), "coordinator exit status {status}");
    c.agents.clear();
}

/// Answers every request with headers promising `len` bytes, sends the first 1000 and
/// then nothing, holding the connection open.
fn stalling_server(len: usize) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&[b'x'; 1000]);
            held.push(s);
        }
    });
    addr
}

#[test]
fn a_stalled_download_and_an_artifact_over_the_size_limit_fail_preparation_clearly() {
    let mut c = Cluster::start(54, 0);
    // A limit the sample's own artifact (its size depends on the build) stays under.
    let v1_artifact = c.pack("1.0.0", &[]);
    let sample_mib = std::fs::metadata(v1_artifact.path())
        .expect("sample artifact")
        .len()
        .div_ceil(1 << 20);
    let limit_mib = sample_mib.max(7) + 1;
    c.agent_args = [
        "--fetch-stall-timeout".to_string(),
        "1s".to_string(),
        "--max-artifact-size".to_string(),
        format!("{limit_mib}MiB"),
    ]
    .to_vec();
    c.add_agent("web-1", "127.54.0.2", "env=test");
    let plan = c
        .plan("1.0.0")
        .artifact(&v1_artifact.url, &v1_artifact.sha256)
        .write("v1");
    assert_eq!(c.deploy_wait(&plan).0, 0);

    // A server that sends a little, then nothing: bounded by the stall timeout, retried
    // a few times, then the host fails preparation and v1 keeps serving.
    let addr = stalling_server(50_000);
    let sha = "ab".repeat(32);
    let url = format!("http://{addr}/web.tar.gz");
    let plan = c.plan("2.0.0").artifact(&url, &sha).write("stall");
    let started = std::time::Instant::now();
    let (code, reason) = reason_of(&c, &plan);
    eprintln!(
        "stalled download ended the deployment after {:?}",
        started.elapsed()
    );
    assert_eq!(code, 3, "{reason}");
    assert!(
        reason.contains("host web-1: download")
            && reason.contains("stalled: no data for 1s after 1000 B"),
        "{reason}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(c.all_serving("1.0.0"));

    // An artifact larger than the agent's --max-artifact-size.
    let big = c.dir.join("big.tar.gz");
    let data: Vec<u8> = (0..(limit_mib as u32 + 1) << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&big, &data).expect("write big artifact");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data))
    };
    let url = format!("file://{}", big.display());
    let plan = c.plan("3.0.0").artifact(&url, &sha).write("big");
    let (code, reason) = reason_of(&c, &plan);
    assert_eq!(code, 3, "{reason}");
    assert!(
        reason.contains(
            &format!("host web-1: artifact is larger than this agent's limit of {limit_mib} MiB (--max-artifact-size)")
        ),
        "{reason}"
    );
    assert!(c.all_serving("1.0.0"));
}

#[test]
fn a_host_with_a_full_disk_is_quarantined_and_the_fleet_report_names_it() {
    let mut c = Cluster::start(55, 0);
    c.add_agent("web-1", "127.55.0.2", "env=test");
    // web-2's data directory is a 4 MiB disk: enough to enrol and run, too small for a
    // release.
    let _disk = Tmpfs::mount(&c.dir.join("web-2"), "4m");
    c.add_agent("web-2", "127.55.0.3", "env=test");
    c.add_agent("web-3", "127.55.0.4", "env=test");
    let plan = c.plan("1.0.0").max_failed_hosts(1).write("v1");
    let (code, id, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
    let s = c.status(&id);
    assert_eq!(s["state"], "succeeded");
    let web2 = s["hosts"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["name"] == "web-2"))
        .cloned()
        .expect("web-2");
    assert_eq!(web2["phase"], "failed", "{web2}");
    assert!(
        web2["error"]
            .as_str()
            .unwrap_or_default()
            .contains("No space left on device"),
        "{web2}"
    );
    // The end of --wait says which host serves what, so a mixed fleet is never silent.
    assert!(
        err.contains(
            "warning: the fleet is mixed: web serves 1.0.0 on web-1, web-3; nothing on web-2"
        ),
        "{err}"
    );
    let versions = c.versions();
    assert_eq!(
        versions.get("web-1").map(String::as_str),
        Some("release 1.0.0")
    );
    assert_eq!(
        versions.get("web-3").map(String::as_str),
        Some("release 1.0.0")
    );
    // The agent itself is fine: still connected, and no partial download left behind.
    assert!(c.connected("web-2"));
    let cache = c.dir.join("web-2").join("cache");
    let leftovers = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0, "partial downloads in {}", cache.display());
    let releases = c.dir.join("web-2").join("releases").join("web");
    let leftovers = std::fs::read_dir(&releases).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0, "partial releases in {}", releases.display());
}
