//! A cluster of real processes: one coordinator and its agents, each with its own data
//! dir and log file under one temporary directory, on 127.x.0.y addresses (or in network
//! namespaces); the CLI run against it; and the logs kept when a test fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::netns;
use crate::procs::{Proc, bin_dir, free_port, wait_until};

/// One enrolled host and its running agent.
pub struct Agent {
    /// The host's name, as enrolled.
    pub name: String,
    /// The address its services listen on (`--service-address`).
    pub ip: String,
    /// Its `--data-dir`: identity, store, releases.
    pub data_dir: PathBuf,
    /// The agent process, which a test may stop, kill or replace.
    pub proc: Proc,
}

/// A coordinator and its agents, all real processes.
pub struct Cluster {
    /// The test's directory: every data dir, log, artifact and plan is under it.
    pub dir: PathBuf,
    /// Owns `dir`: removed on drop, kept when the test failed.
    _tmp: Option<tempfile::TempDir>,
    /// The workspace's binaries.
    pub bin: PathBuf,
    /// The coordinator's gRPC address, as the CLI and agents dial it.
    pub coord_addr: String,
    /// What the coordinator binds (`--listen`) when not `coord_addr`, e.g. `0.0.0.0:PORT`.
    pub coord_listen: Option<String>,
    /// The coordinator's `--http` address (health, metrics, dashboard).
    pub http_addr: String,
    /// The coordinator process, when started.
    pub coordinator: Option<Proc>,
    /// The hosts, in the order they joined.
    pub agents: Vec<Agent>,
    /// The public port the test's services listen on.
    pub listen: u16,
    /// Extra arguments for `cutover serve`.
    pub serve_args: Vec<String>,
    /// Extra arguments for `cutover-agent run`; `{name}` is replaced by the host's name,
    /// `{ip}` by its address.
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

    /// Starts `cutover serve` and waits until the CLI gets an answer.
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

    /// Stops the coordinator (SIGTERM).
    pub fn stop_coordinator(&mut self) {
        if let Some(mut p) = self.coordinator.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// The admin credentials the coordinator wrote for the CLI.
    pub fn credentials(&self) -> PathBuf {
        self.dir.join("coordinator").join("admin")
    }

    /// `cutover ARGS` against this cluster, to run as the caller needs (its output
    /// elsewhere, in the background).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.join("cutover"));
        cmd.args(args)
            .env("CUTOVER_COORDINATOR", &self.coord_addr)
            .env("CUTOVER_CREDENTIALS", self.credentials())
            .env_remove("RUST_LOG");
        cmd
    }

    /// Runs the CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("run cutover")
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

    /// A new join token for hosts with `labels`.
    pub fn token(&self, labels: &str) -> String {
        self.cli_ok(&["token", "create", "--labels", labels])
            .trim()
            .to_string()
    }

    /// `cutover-agent join` of host `name` into `data_dir` with `token`.
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

    /// Enrols host `name` with `labels`, starts its agent serving on `ip` and waits until
    /// it is connected.
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

    /// Starts `cutover-agent run` for an enrolled host (in its namespace, if it has one).
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
            .args(
                self.agent_args
                    .iter()
                    .map(|a| a.replace("{name}", name).replace("{ip}", ip)),
            )
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)));
        Proc::spawn(name, &mut cmd, self.dir.join(format!("{name}.log")))
    }

    /// `cutover hosts` as JSON.
    pub fn hosts(&self) -> Value {
        serde_json::from_str(&self.cli_ok(&["hosts", "--output", "json"])).expect("hosts json")
    }

    /// True when `cutover hosts` shows host `name` connected.
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

    /// Every host's public port, where clients reach the test's service.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.agents
            .iter()
            .map(|a| format!("{}:{}", a.ip, self.listen).parse().expect("addr"))
            .collect()
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
                print_tail(&kept.join(f));
            }
        }
    }
}

/// The last lines of a log, for a failed test's output.
fn print_tail(log: &Path) {
    let Ok(t) = std::fs::read_to_string(log) else {
        return;
    };
    let tail: Vec<&str> = t.lines().rev().take(25).collect();
    let name = log.file_name().unwrap_or_default().to_string_lossy();
    eprintln!("--- {name} (last lines) ---");
    for l in tail.into_iter().rev() {
        eprintln!("{l}");
    }
}
