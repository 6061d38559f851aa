//! Processes the tests start and watch: where the workspace's binaries are, a child
//! process stopped with SIGTERM then SIGKILL when dropped, polling for a condition with a
//! deadline, free ports, and the processes an agent left running in its data dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A TCP port that nothing uses right now on any local address.
pub fn free_port() -> u16 {
    // On every address, not just 127.0.0.1: a port some connection uses as its source
    // on another loopback address would still fail a later bind on 0.0.0.0.
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Proc {
    /// What the process is (`coordinator`, a host name), for messages.
    pub name: String,
    /// The running process, for its pid, its exit status and signals.
    pub child: Child,
    /// The file its stdout and stderr go to, which a test may read.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with no stdin and both outputs into the new file `log`.
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

    /// SIGKILL, as a crash or a power cut would end it.
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
