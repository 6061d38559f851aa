//! The coordinator under test, as the simulator sees it: one it starts itself (`cutover
//! serve` on a data dir in the state dir, which it can kill and start again) or one
//! passed in; the `cutover` CLI and the control API against it with the admin
//! credentials; and its CPU time and resident memory, read from `/proc/PID`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use cutover_proto::v1::control_client::ControlClient;
use tokio::time::Instant;
use tonic::transport::Channel;

/// How long a started coordinator gets to answer.
const START_WITHIN: Duration = Duration::from_secs(60);

/// The coordinator under test.
pub struct Coordinator {
    /// Its gRPC address, as the hosts and the CLI dial it.
    pub addr: SocketAddr,
    /// The admin credentials (`DATA/admin`).
    pub credentials: PathBuf,
    /// The `cutover` binary, for the CLI.
    cutover: PathBuf,
    /// Its process id, for CPU and memory; 0 when unknown or not running. Shared with
    /// the sampler, which follows a restart.
    pub pid: Arc<AtomicI32>,
    /// How to start it again, when the simulator started it.
    own: Option<Own>,
    /// Control calls and CLI commands that failed and were tried again.
    retries: AtomicU64,
}

/// A control API client.
pub type Control = ControlClient<Channel>;

/// A coordinator the simulator started.
struct Own {
    child: Child,
    /// `cutover serve`'s arguments.
    args: Vec<String>,
    /// Where its output goes (appended on every start).
    log: PathBuf,
}

impl Coordinator {
    /// Starts `cutover serve` with its data dir in `state`, on 127.0.0.1, accepting
    /// `max_connections` connections, and waits until it answers.
    pub async fn start(
        cutover: &Path,
        state: &Path,
        max_connections: usize,
    ) -> anyhow::Result<Self> {
        let data = state.join("coordinator");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let http = format!("127.0.0.1:{}", free_port()?);
        let args = vec![
            "serve".to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--http".into(),
            http,
            "--max-connections".into(),
            max_connections.to_string(),
        ];
        let log = state.join("coordinator.log");
        let child = spawn(cutover, &args, &log)?;
        let mut c = Coordinator {
            addr,
            credentials: data.join("admin"),
            cutover: cutover.to_path_buf(),
            pid: Arc::new(AtomicI32::new(child.id() as i32)),
            own: Some(Own { child, args, log }),
            retries: AtomicU64::new(0),
        };
        c.wait_ready().await?;
        Ok(c)
    }

    /// A coordinator started elsewhere.
    pub fn attach(
        cutover: &Path,
        addr: SocketAddr,
        credentials: PathBuf,
        pid: Option<i32>,
    ) -> Self {
        Coordinator {
            addr,
            credentials,
            cutover: cutover.to_path_buf(),
            pid: Arc::new(AtomicI32::new(pid.unwrap_or(0))),
            own: None,
            retries: AtomicU64::new(0),
        }
    }

    /// True when the simulator started it (and so may kill and restart it).
    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }

    /// Kills it with SIGKILL, as a crash would.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(own) = &mut self.own else {
            bail!("the coordinator was passed in: only one the simulator started can be killed");
        };
        own.child.kill().context("kill the coordinator")?;
        own.child.wait().context("wait for the coordinator")?;
        self.pid.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Starts it again with the same arguments (it must have been killed).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let Some(own) = &mut self.own else {
            bail!("the coordinator was passed in: only one the simulator started can be restarted");
        };
        own.child = spawn(&self.cutover, &own.args, &own.log)?;
        self.pid.store(own.child.id() as i32, Ordering::Relaxed);
        Ok(())
    }

    /// Waits until the control API answers.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if let Some(own) = &mut self.own
                && let Some(status) = own.child.try_wait()?
            {
                bail!(
                    "the coordinator exited ({status}); see {}",
                    own.log.display()
                );
            }
            if let Ok(mut c) = self.control().await
                && c.list_tokens(cutover_proto::v1::ListTokensRequest {})
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the coordinator did not answer within {START_WITHIN:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A control API client with the admin credentials, reading answers of any size
    /// (a deployment over thousands of hosts is many megabytes).
    pub async fn control(&self) -> anyhow::Result<Control> {
        let read = |n: &str| {
            let p = self.credentials.join(n);
            std::fs::read(&p).with_context(|| format!("read {}", p.display()))
        };
        let cfg = cutover_proto::tls::client_config(
            &read("ca.crt")?,
            &read("client.crt")?,
            &read("client.key")?,
        )?;
        let channel = cutover_proto::tls::connect(&self.addr.to_string(), cfg).await?;
        Ok(ControlClient::new(channel).max_decoding_message_size(usize::MAX))
    }

    /// Counts a control call or CLI command that failed and is tried again.
    pub fn retried(&self, e: &anyhow::Error) {
        tracing::warn!(
            error = format!("{e:#}"),
            "the coordinator did not answer; trying again"
        );
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Control calls and CLI commands tried again so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// The coordinator's CA certificate (PEM).
    pub fn ca_pem(&self) -> anyhow::Result<Vec<u8>> {
        let p = self.credentials.join("ca.crt");
        std::fs::read(&p).with_context(|| format!("read {}", p.display()))
    }

    /// Runs `cutover ARGS` against it; returns stdout, or an error with stderr.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new(&self.cutover)
            .args(args)
            .env("CUTOVER_COORDINATOR", self.addr.to_string())
            .env("CUTOVER_CREDENTIALS", &self.credentials)
            .env_remove("RUST_LOG")
            .output()
            .await
            .with_context(|| format!("run {}", self.cutover.display()))?;
        if !out.status.success() {
            bail!(
                "cutover {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// CPU time it has used so far (user + system), in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid()?)
    }

    /// Its resident memory now, in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid()?)
    }

    fn pid(&self) -> anyhow::Result<i32> {
        match self.pid.load(Ordering::Relaxed) {
            0 => bail!(
                "the coordinator's process id is unknown (pass --coordinator-pid) or it is not running"
            ),
            pid => Ok(pid),
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let Some(own) = &mut self.own else { return };
        if let Ok(Some(_)) = own.child.try_wait() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(own.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = own.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = own.child.kill();
        let _ = own.child.wait();
    }
}

fn spawn(cutover: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    Command::new(cutover)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("start {}", cutover.display()))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU time process `pid` has used (user + system), in seconds.
pub fn cpu_seconds(pid: i32) -> anyhow::Result<f64> {
    let p = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&p).with_context(|| format!("read {p}"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("parse {p}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("parse {p}"))
    };
    let total = ticks(11)? + ticks(12)?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Ok(total as f64 / per_second as f64)
}

/// Resident memory of process `pid`, in bytes.
pub fn rss_bytes(pid: i32) -> anyhow::Result<u64> {
    let p = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&p).with_context(|| format!("read {p}"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in {p}"))?;
    Ok(kb * 1024)
}

/// Connections the kernel dropped because a listener's accept queue was full, since
/// boot, on this machine (`TcpExt: ListenOverflows` in `/proc/net/netstat`); each costs
/// its client a SYN retransmission (1 s, then 3 s...).
pub fn listen_overflows() -> anyhow::Result<u64> {
    let p = "/proc/net/netstat";
    let text = std::fs::read_to_string(p).with_context(|| format!("read {p}"))?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no TcpExt counters in {p}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no ListenOverflows in {p}"))
}

/// CPU time every process of the machine used so far (all but idle and iowait), in
/// seconds: with the coordinator's and the simulator's, what others took.
pub fn machine_cpu_seconds() -> anyhow::Result<f64> {
    let p = "/proc/stat";
    let text = std::fs::read_to_string(p).with_context(|| format!("read {p}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .with_context(|| format!("no cpu line in {p}"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...: leave out idle and iowait.
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, t)| *t)
        .sum();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Ok(busy as f64 / per_second as f64)
}
