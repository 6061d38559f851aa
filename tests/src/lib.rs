//! Harness for cutover's end-to-end tests: it runs the real `cutover` and `cutover-agent`
//! binaries as separate processes, each with its own data dir and log file, on
//! 127.0.0.x addresses; waits for conditions by polling with deadlines; stops processes
//! with SIGTERM then SIGKILL; and keeps the logs of a failed test.

pub mod netns;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use serde_json::Value;

/// An `[analysis]` section that fails a release whose error rate is above 5 % in one
/// 1 s interval of at least 20 requests.
pub const ANALYSIS_ERRORS: &str = r#"[analysis]
interval = "1s"
failure_limit = 1
min_requests = 20

[[analysis.metric]]
name = "error_rate"
max = 0.05
"#;

/// Directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps, the binaries one level up; a
    // binary using this harness lives next to them.
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if here.join("cutover").exists() {
        here
    } else {
        here.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    for b in ["cutover", "cutover-agent", "cutover-sample"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: run `cargo build --workspace --bins` before the tests",
            dir.join(b).display()
        );
    }
    dir
}

/// Polls `cond` every 50ms until it holds or `timeout` passes (then panics with `what`).
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns true if it stopped on SIGTERM.
    pub fn stop(&mut self, grace: Duration) -> bool {
        if let Ok(Some(_)) = self.child.try_wait() {
            return true;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

pub struct Agent {
    pub name: String,
    pub ip: String,
    pub data_dir: PathBuf,
    pub proc: Proc,
}

/// A coordinator and its agents, all real processes.
pub struct Cluster {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub bin: PathBuf,
    pub coord_addr: String,
    /// What the coordinator binds (`--listen`) when not `coord_addr`, e.g. `0.0.0.0:PORT`.
    pub coord_listen: Option<String>,
    pub http_addr: String,
    pub coordinator: Option<Proc>,
    pub agents: Vec<Agent>,
    /// The public port the test's services listen on.
    pub listen: u16,
    /// Extra arguments for `cutover serve`.
    pub serve_args: Vec<String>,
    /// Extra arguments for `cutover-agent run`; `{name}` is replaced by the host's name.
    pub agent_args: Vec<String>,
    /// Extra environment variables for `cutover-agent run`.
    pub agent_env: Vec<(String, String)>,
    /// The agent binary that [`Cluster::spawn_agent`] runs.
    pub agent_exe: PathBuf,
    /// Hosts that run in a network namespace: host name → namespace.
    pub netns: BTreeMap<String, String>,
}

impl Cluster {
    /// Starts a coordinator and `n` agents named web-1.. on 127.`net`.0.2, .3, ...
    pub fn start(net: u8, n: usize) -> Cluster {
        Cluster::start_with(net, n, &[])
    }

    /// Like [`Cluster::start`], with more `cutover serve` arguments.
    pub fn start_with(net: u8, n: usize, serve_args: &[&str]) -> Cluster {
        let mut c = Cluster::new("127.0.0.1", serve_args);
        c.start_coordinator();
        for i in 0..n {
            c.add_agent(
                &format!("web-{}", i + 1),
                &format!("127.{net}.0.{}", i + 2),
                "env=test",
            );
        }
        c
    }

    /// A cluster with nothing started yet; the coordinator will listen on `coord_ip`.
    fn new(coord_ip: &str, serve_args: &[&str]) -> Cluster {
        let tmp = tempfile::Builder::new()
            .prefix("cutover-e2e-")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().to_path_buf();
        Cluster {
            dir,
            _tmp: Some(tmp),
            bin: bin_dir(),
            coord_addr: format!("{coord_ip}:{}", free_port()),
            coord_listen: None,
            http_addr: format!("127.0.0.1:{}", free_port()),
            coordinator: None,
            agents: Vec::new(),
            listen: free_port(),
            serve_args: serve_args.iter().map(|a| a.to_string()).collect(),
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            agent_exe: bin_dir().join("cutover-agent"),
            netns: BTreeMap::new(),
        }
    }

    /// A cluster with nothing started: the CLI talks to 127.0.0.1 and `serve_args` go to
    /// `cutover serve`. Set `coord_listen` before `start_coordinator` to bind elsewhere.
    pub fn unstarted(serve_args: &[&str]) -> Cluster {
        Cluster::new("127.0.0.1", serve_args)
    }

    /// A coordinator on `fabric`'s bridge address and one agent per namespace, named
    /// web-1.. and serving on the namespace's address.
    pub fn start_on(fabric: &netns::Fabric, n: usize, serve_args: &[&str]) -> Cluster {
        let gateway = fabric.gateway();
        let mut args = vec!["--server-name", &gateway];
        args.extend(serve_args);
        let mut c = Cluster::new(&gateway, &args);
        c.start_coordinator();
        for i in 0..n {
            let name = format!("web-{}", i + 1);
            c.netns.insert(name.clone(), fabric.namespace(i));
            c.add_agent(&name, &fabric.addr(i), "env=test");
        }
        c
    }

    /// Stops the coordinator (SIGTERM).
    pub fn stop_coordinator(&mut self) {
        if let Some(mut p) = self.coordinator.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    pub fn start_coordinator(&mut self) {
        let mut cmd = Command::new(self.bin.join("cutover"));
        cmd.args(["serve", "--data-dir"])
            .arg(self.dir.join("coordinator"))
            .args([
                "--listen",
                self.coord_listen.as_ref().unwrap_or(&self.coord_addr),
            ])
            .args(["--http", &self.http_addr])
            .args(&self.serve_args);
        self.coordinator = Some(Proc::spawn(
            "coordinator",
            &mut cmd,
            self.dir.join("coordinator.log"),
        ));
        wait_until(Duration::from_secs(20), "the coordinator to answer", || {
            self.cli(&["hosts"]).status.success()
        });
    }

    pub fn credentials(&self) -> PathBuf {
        self.dir.join("coordinator").join("admin")
    }

    /// Runs the CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("cutover"))
            .args(args)
            .env("CUTOVER_COORDINATOR", &self.coord_addr)
            .env("CUTOVER_CREDENTIALS", self.credentials())
            .env_remove("RUST_LOG")
            .output()
            .expect("run cutover")
    }

    /// Runs the CLI and returns stdout, panicking with stderr on failure.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "cutover {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn token(&self, labels: &str) -> String {
        self.cli_ok(&["token", "create", "--labels", labels])
            .trim()
            .to_string()
    }

    pub fn join(&self, name: &str, data_dir: &Path, token: &str) -> Output {
        Command::new(self.bin.join("cutover-agent"))
            .args([
                "join",
                "--coordinator",
                &self.coord_addr,
                "--token",
                token,
                "--name",
                name,
                "--data-dir",
            ])
            .arg(data_dir)
            .output()
            .expect("run cutover-agent join")
    }

    pub fn add_agent(&mut self, name: &str, ip: &str, labels: &str) {
        self.add_agent_with(name, ip, labels, |_| {});
    }

    /// Like [`Cluster::add_agent`]; `before_run` may write into the data dir after the
    /// join and before the agent starts.
    pub fn add_agent_with(
        &mut self,
        name: &str,
        ip: &str,
        labels: &str,
        before_run: impl FnOnce(&Path),
    ) {
        let data_dir = self.dir.join(name);
        let token = self.token(labels);
        let out = self.join(name, &data_dir, &token);
        assert!(
            out.status.success(),
            "join {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        before_run(&data_dir);
        let proc = self.spawn_agent(name, ip, &data_dir);
        self.agents.push(Agent {
            name: name.to_string(),
            ip: ip.to_string(),
            data_dir,
            proc,
        });
        wait_until(
            Duration::from_secs(20),
            &format!("{name} to connect"),
            || self.connected(name),
        );
    }

    pub fn spawn_agent(&self, name: &str, ip: &str, data_dir: &Path) -> Proc {
        let mut cmd = match self.netns.get(name) {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.agent_exe);
                c
            }
            None => Command::new(&self.agent_exe),
        };
        cmd.args(["run", "--data-dir"])
            .arg(data_dir)
            .args(["--service-address", ip])
            .args(self.agent_args.iter().map(|a| a.replace("{name}", name)))
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        Proc::spawn(name, &mut cmd, self.dir.join(format!("{name}.log")))
    }

    pub fn hosts(&self) -> Value {
        serde_json::from_str(&self.cli_ok(&["hosts", "--output", "json"])).expect("hosts json")
    }

    pub fn connected(&self, name: &str) -> bool {
        let out = self.cli(&["hosts", "--output", "json"]);
        let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
            return false;
        };
        v.as_array()
            .into_iter()
            .flatten()
            .any(|h| h["name"] == name && h["connected"] == true)
    }

    pub fn status(&self, id: &str) -> Value {
        serde_json::from_str(&self.cli_ok(&["status", id, "--output", "json"]))
            .expect("status json")
    }

    /// Packs a sample release; returns (file:// URL, sha256).
    pub fn pack(&self, version: &str, behaviour: &[&str]) -> (String, String) {
        let out_file = self.dir.join(format!(
            "web-{version}-{}.tar.gz",
            behaviour.join("_").replace(['=', '.'], "")
        ));
        let out = Command::new(self.bin.join("cutover-sample"))
            .args(["pack", "--out"])
            .arg(&out_file)
            .args(["--version", version])
            .args(behaviour)
            .output()
            .expect("pack");
        assert!(
            out.status.success(),
            "pack: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            format!("file://{}", out_file.display()),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    }

    /// Writes a plan for the sample service; `strategy` is the `[strategy]` body.
    pub fn plan(
        &self,
        name: &str,
        version: &str,
        artifact: &str,
        sha: &str,
        strategy: &str,
        health_extra: &str,
    ) -> PathBuf {
        self.plan_with(name, version, artifact, sha, strategy, health_extra, "")
    }

    /// Like [`Cluster::plan`], with more sections (e.g. `[analysis]`) appended.
    #[allow(clippy::too_many_arguments)]
    pub fn plan_with(
        &self,
        name: &str,
        version: &str,
        artifact: &str,
        sha: &str,
        strategy: &str,
        health_extra: &str,
        more: &str,
    ) -> PathBuf {
        let text = format!(
            r#"service = "web"

[release]
version = "{version}"
artifact = "{artifact}"
sha256 = "{sha}"

[targets]
labels = {{ env = "test" }}

[run]
command = ["./bin/cutover-sample", "serve", "--port", "${{PORT}}"]
listen = {listen}
drain = "2s"
stop_timeout = "5s"

[health]
http = "/healthz"
interval = "200ms"
timeout = "1s"
healthy_after = 2
unhealthy_after = 2
{health_extra}

[strategy]
max_parallel = "100%"
{strategy}

{more}
"#,
            listen = self.listen
        );
        let p = self.dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).expect("write plan");
        p
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.agents
            .iter()
            .map(|a| format!("{}:{}", a.ip, self.listen).parse().expect("addr"))
            .collect()
    }

    /// The body each host's public port answers with (`release X` or an error).
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.agents
            .iter()
            .map(|a| {
                (
                    a.name.clone(),
                    get(&format!("{}:{}", a.ip, self.listen), "/").unwrap_or_else(|e| e),
                )
            })
            .collect()
    }

    /// True when every host's public port answers `release {version}`.
    pub fn all_serving(&self, version: &str) -> bool {
        let want = format!("release {version}");
        self.versions().values().all(|v| *v == want)
    }

    /// Deploys each version in turn straight to 100 % and waits for success.
    pub fn deploy_versions(&self, versions: &[&str]) {
        for v in versions {
            let (url, sha) = self.pack(v, &[]);
            let plan = self.plan(v, v, &url, &sha, "steps = [{ traffic = 100 }]", "");
            let (code, _, err) = self.deploy_wait(&plan, &[]);
            assert_eq!(code, 0, "deploy {v}: {err}");
        }
    }

    /// Starts a deployment without waiting and polls until its first step holds: every
    /// host switched and the deployment progressing. Returns its id.
    pub fn deploy_until_holding(&self, plan: &Path) -> String {
        let id = self
            .cli_ok(&["deploy", plan.to_str().expect("utf-8 path")])
            .trim()
            .to_string();
        wait_until(Duration::from_secs(30), "the first step to hold", || {
            let s = self.status(&id);
            s["state"] == "progressing"
                && s["hosts"]
                    .as_array()
                    .is_some_and(|h| h.iter().all(|h| h["phase"] == "switched"))
        });
        id
    }

    /// Deploys and waits; returns (exit code, id, stderr).
    pub fn deploy_wait(&self, plan: &Path, extra: &[&str]) -> (i32, String, String) {
        let mut args = vec!["deploy", plan.to_str().expect("utf-8 path"), "--wait"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        let id = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        (
            out.status.code().unwrap_or(-1),
            id,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.proc.stop(Duration::from_secs(15));
        }
        if let Some(c) = &mut self.coordinator {
            c.stop(Duration::from_secs(10));
        }
        if std::thread::panicking()
            && let Some(tmp) = self._tmp.take()
        {
            let kept = tmp.keep();
            eprintln!("test failed; logs kept in {}", kept.display());
            for f in ["coordinator.log", "web-1.log", "web-2.log", "web-3.log"] {
                if let Ok(t) = std::fs::read_to_string(kept.join(f)) {
                    let tail: Vec<&str> = t.lines().rev().take(25).collect();
                    eprintln!("--- {f} (last lines) ---");
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// One HTTP/1.1 GET; returns the body trimmed, or an error string.
pub fn get(addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &addr.parse().map_err(|e| format!("{e}"))?,
        Duration::from_secs(2),
    )
    .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    // Read to the end, or to Content-Length (some servers keep the connection open).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if len.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let buf = String::from_utf8_lossy(&buf);
    let (head, body) = buf.split_once("\r\n\r\n").ok_or("no response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    Ok(body.trim().to_string())
}

/// Client load: keep-alive HTTP requests against every address, counting outcomes.
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub report: Arc<LoadReport>,
}

#[derive(Default)]
pub struct LoadReport {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub versions: Mutex<BTreeMap<String, u64>>,
    pub errors: Mutex<Vec<String>>,
    /// The slowest request seen, in microseconds.
    pub max_latency_us: AtomicU64,
}

impl LoadReport {
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.versions.lock().map(|v| v.clone()).unwrap_or_default()
    }
    pub fn max_latency(&self) -> Duration {
        Duration::from_micros(self.max_latency_us.load(Ordering::Relaxed))
    }
}

impl Load {
    /// `per_addr` concurrent keep-alive clients per address.
    pub fn start(addrs: Vec<SocketAddr>, per_addr: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(LoadReport::default());
        let (s, r) = (stop.clone(), report.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for addr in addrs {
                    for _ in 0..per_addr {
                        tasks.push(tokio::spawn(client(addr, s.clone(), r.clone())));
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        Load {
            stop,
            thread: Some(thread),
            report,
        }
    }

    pub fn stop(mut self) -> Arc<LoadReport> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.report.clone()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn client(addr: SocketAddr, stop: Arc<AtomicBool>, report: Arc<LoadReport>) {
    use http_body_util::{BodyExt, Empty};
    let fail = |report: &LoadReport, e: String| {
        report.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut v) = report.errors.lock()
            && v.len() < 20
        {
            v.push(e);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let stream = match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                fail(&report, format!("connect {addr}: {e}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
        else {
            fail(&report, format!("handshake {addr}"));
            continue;
        };
        tokio::spawn(conn);
        // Reuse the connection for many requests (keep-alive), like a real client pool.
        for _ in 0..200 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let req = hyper::Request::get("/")
                .header("host", addr.to_string())
                .body(Empty::<bytes::Bytes>::new())
                .expect("request");
            let started = Instant::now();
            match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    // A server that says `Connection: close` gets no further request on
                    // this connection (RFC 9112, 9.6): reconnect, like any HTTP client.
                    let close = resp
                        .headers()
                        .get(hyper::header::CONNECTION)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                    let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    report.max_latency_us.fetch_max(us, Ordering::Relaxed);
                    match body {
                        Ok(b) if status.is_success() => {
                            report.ok.fetch_add(1, Ordering::Relaxed);
                            let v = String::from_utf8_lossy(&b).trim().to_string();
                            if let Ok(mut m) = report.versions.lock() {
                                *m.entry(v).or_default() += 1;
                            }
                        }
                        Ok(_) => fail(&report, format!("{addr}: HTTP {status}")),
                        Err(e) => fail(&report, format!("{addr}: body: {e}")),
                    }
                    if close {
                        break;
                    }
                }
                Err(e) => {
                    fail(&report, format!("{addr}: {e}"));
                    break;
                }
            }
        }
    }
}

/// A tmpfs of `size` mounted on `dir` until dropped (needs root).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mount a tmpfs on {} (this test needs root)",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Fills the disk with one file; returns its path (remove it to free the space).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let mut small = [0u8; 512];
        while f.write_all(&small).is_ok() {
            small[0] = small[0].wrapping_add(1);
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Processes whose working directory is inside `dir` (slot processes of an agent).
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
        })
        .collect()
}
