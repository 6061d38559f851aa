//! Hostile clients against the listeners: malformed requests flooding a host while a
//! good release rolls out, and idle connections piling up until a daemon runs out of
//! file descriptors — real processes, real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tests::{ANALYSIS_ERRORS, Cluster, Load, wait_until};

/// Malformed requests against every address, as fast as they are answered, until
/// stopped: chunked bodies that are not chunked, and bodies cut short by a client that
/// goes away.
struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Flood {
    fn start(addrs: Vec<SocketAddr>) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = addrs
            .into_iter()
            .map(|addr| {
                let (stop, sent) = (stop.clone(), sent.clone());
                std::thread::spawn(move || {
                    let mut bad_chunk = false;
                    while !stop.load(Ordering::Relaxed) {
                        bad_chunk = !bad_chunk;
                        if malformed(addr, bad_chunk) {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Flood {
            stop,
            sent,
            threads,
        }
    }

    /// Stops the flood; returns how many malformed requests were sent.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// One malformed request: a broken chunked body, or a body cut short. True if sent.
fn malformed(addr: SocketAddr, bad_chunk: bool) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let request: &[u8] = if bad_chunk {
        b"POST /orders HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nnot-a-size\r\n\r\n"
    } else {
        b"POST /orders HTTP/1.1\r\nHost: shop\r\nContent-Length: 1000\r\n\r\nonly this much"
    };
    if s.write_all(request).is_err() {
        return false;
    }
    if bad_chunk {
        // Read the answer (or the close) before the next one.
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = s.read(&mut [0u8; 1024]);
    }
    // Dropping the socket aborts a body cut short.
    true
}

#[test]
fn malformed_requests_cannot_roll_back_a_good_release() {
    let c = Cluster::start(87, 2);
    c.deploy_versions(&["1.0.0"]);
    let load = Load::start(c.addrs(), 1);
    let flood = Flood::start(c.addrs());
    let plan = c
        .plan("2.0.0")
        .steps(r#"[{ traffic = 50, hold = "4s" }, { traffic = 100, hold = "2s" }]"#)
        .analysis(ANALYSIS_ERRORS)
        .write("good");
    let (code, id, err) = c.deploy_wait(&plan);
    let sent = flood.stop();
    let report = load.stop();
    eprintln!("{sent} malformed requests, {} good ones", report.ok());
    assert_eq!(code, 0, "{err}");
    // The flood outnumbered 5 % of the load many times over.
    assert!(
        sent * 10 > report.ok(),
        "{sent} malformed requests against {} good ones",
        report.ok()
    );
    report.assert_none_failed();
    let intervals = c.status(&id)["intervals"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        intervals.iter().any(|i| i["verdict"] == "pass")
            && intervals.iter().all(|i| i["verdict"] != "fail"),
        "{intervals:?}"
    );
    assert!(c.all_serving("2.0.0"));
}

/// File descriptors a process has open.
fn open_files(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// CPU time a process has used (user and system).
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces): utime and stime are the
    // 12th and 13th, in clock ticks.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().expect("ticks"))
        .collect();
    let ticks_per_second = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf")
            .stdout,
    )
    .expect("utf-8")
    .trim()
    .parse::<u64>()
    .expect("CLK_TCK");
    Duration::from_millis((fields[0] + fields[1]) * 1000 / ticks_per_second)
}

fn log_size(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// Lowers a running process's open-file limit.
fn limit_files(pid: i32, n: usize) {
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:{n}")])
        .output()
        .expect("run prlimit");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const FILE_LIMIT: usize = 64;

/// Opens connections to each target, sending its bytes (maybe none) on every one, then
/// leaves them idle: more than the process `pid` has file descriptors for. Checks that
/// over a few seconds it stays cool — little CPU, a short log — while its accept loops
/// back off, and that it closes every one of them on its own once idle. Returns the
/// log's lines about failing accepts.
fn exhaust_descriptors(pid: i32, log: &Path, targets: &[(&str, &[u8])], idle: Duration) -> usize {
    let mut idle_conns = Vec::new();
    for (addr, bytes) in targets {
        for _ in 0..FILE_LIMIT {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(bytes).expect("send");
            idle_conns.push(s);
        }
    }
    wait_until(Duration::from_secs(10), "descriptors to run out", || {
        open_files(pid) >= FILE_LIMIT
    });
    let (cpu, logged, started) = (cpu_time(pid), log_size(log), Instant::now());
    // The measurement window, within the idle timeout: nothing gets closed meanwhile.
    std::thread::sleep(idle / 2);
    let window = started.elapsed();
    let (cpu, logged) = (cpu_time(pid) - cpu, log_size(log) - logged);
    eprintln!("out of descriptors for {window:?}: {cpu:?} of CPU, {logged} bytes of log");
    assert!(open_files(pid) >= FILE_LIMIT, "still out of descriptors");
    assert!(
        cpu < window / 5,
        "{cpu:?} of CPU in {window:?} while out of descriptors"
    );
    assert!(
        logged < 4096,
        "{logged} bytes of log in {window:?} while out of descriptors"
    );
    // Each is closed after the idle timeout; those still queued are accepted as others
    // go, and closed in turn.
    let deadline = Instant::now() + idle * 10;
    for mut s in idle_conns {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match s.read_to_end(&mut Vec::new()) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("an idle connection was not closed: {e}"),
        }
    }
    std::fs::read_to_string(log)
        .expect("log")
        .lines()
        .filter(|l| l.contains("accept failed; backing off"))
        .count()
}

#[test]
fn the_coordinator_outlasts_running_out_of_descriptors() {
    let idle = Duration::from_secs(4);
    let c = Cluster::start_with(85, 0, &["--idle-timeout", "4s"]);
    let coordinator = c.coordinator.as_ref().expect("coordinator");
    let (pid, log) = (coordinator.pid(), coordinator.log.clone());
    limit_files(pid, FILE_LIMIT);

    // --http: idle keep-alive connections, and ones that never send a request.
    let healthz = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", c.http_addr);
    let targets = [
        (c.http_addr.as_str(), healthz.as_bytes()),
        (c.http_addr.as_str(), b"".as_slice()),
    ];
    let lines = exhaust_descriptors(pid, &log, &targets, idle);
    assert!(
        (1..=5).contains(&lines),
        "{lines} lines about failing accepts"
    );
    assert_eq!(
        tests::get(&c.http_addr, "/healthz").as_deref(),
        Ok("ok"),
        "--http serves again"
    );

    // --listen: connections that never start their TLS handshake.
    exhaust_descriptors(pid, &log, &[(c.coord_addr.as_str(), b"")], idle);
    c.cli_ok(&["hosts"]);
}

#[test]
fn an_agent_outlasts_running_out_of_descriptors() {
    let idle = Duration::from_secs(4);
    let mut c = Cluster::start(86, 0);
    let metrics_addr = format!("127.86.0.2:{}", tests::free_port());
    c.agent_args = vec![
        "--idle-timeout".into(),
        "4s".into(),
        "--http".into(),
        metrics_addr.clone(),
    ];
    c.add_agent("web-1", "127.86.0.2", "env=test");
    c.deploy_versions(&["1.0.0"]);
    let agent = &c.agents[0].proc;
    let (pid, log) = (agent.pid(), agent.log.clone());
    limit_files(pid, FILE_LIMIT);

    // The public port (kept-alive connections, and silent ones) and --http at once.
    let public = c.addrs()[0].to_string();
    let get = format!("GET / HTTP/1.1\r\nHost: {public}\r\n\r\n");
    let targets = [
        (public.as_str(), get.as_bytes()),
        (public.as_str(), b"".as_slice()),
        (metrics_addr.as_str(), b"".as_slice()),
    ];
    let lines = exhaust_descriptors(pid, &log, &targets, idle);
    assert!(lines >= 1, "no line about failing accepts");

    // Serving again, and still following the coordinator.
    wait_until(Duration::from_secs(10), "the release to answer", || {
        tests::get(&public, "/").as_deref() == Ok("release 1.0.0")
    });
    // Running out of descriptors was this host's trouble, never counted against the slot.
    let metrics = tests::get(&metrics_addr, "/metrics").expect("metrics");
    let failures: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("cutover_agent_upstream_failures_total{"))
        .collect();
    assert!(
        !failures.is_empty() && failures.iter().all(|l| l.ends_with(" 0")),
        "{failures:?}"
    );
    let plan = c.plan("2.0.0").write("v2");
    let (code, _, err) = c.deploy_wait(&plan);
    assert_eq!(code, 0, "{err}");
}
