//! Health checks of a slot process: HTTP (2xx or 3xx passes), TCP connect, or a command
//! that exits 0, each bounded by the plan's timeout. A command runs through
//! [`crate::spawn`] like the slot process itself: as the slot's user, with the slot's
//! clean environment, its whole process group stopped when it overruns. The slot turns
//! results into healthy/unhealthy only after the plan's consecutive thresholds
//! ([`Tally`]); [`HealthPlan`] is a slot spec's `[health]` with the defaults filled in.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use cutover_proto::v1::{SlotSpec, health_spec};

use crate::spawn::{Exit, Launcher, RunOptions};

/// Between SIGTERM and SIGKILL for a check command that overruns its timeout.
const EXEC_GRACE: Duration = Duration::from_secs(1);

/// Defaults for what a plan's `[health]` leaves out.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// What one check does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// `GET` this path on the slot's port; 2xx or 3xx passes.
    Http(String),
    /// Connect to the slot's port.
    Tcp,
    /// Run this command (through [`crate::spawn`]); exit status 0 passes.
    Exec(Vec<String>),
}

/// How a slot's health is judged: its spec's `[health]`, defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthPlan {
    /// What one check does (a TCP connect when the plan names none).
    pub check: Check,
    /// Time between two checks.
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    pub timeout: Duration,
    /// Passes in a row that make the slot healthy.
    pub healthy_after: u32,
    /// Failures in a row that make a healthy slot unhealthy.
    pub unhealthy_after: u32,
    /// How long after its first start the slot may take to turn healthy before it fails.
    pub start_timeout: Duration,
}

impl HealthPlan {
    pub fn of(spec: &SlotSpec) -> HealthPlan {
        let h = spec.health.clone().unwrap_or_default();
        let check = match h.check {
            Some(health_spec::Check::HttpPath(p)) => Check::Http(p),
            Some(health_spec::Check::Exec(e)) => Check::Exec(e.command),
            Some(health_spec::Check::Tcp(_)) | None => Check::Tcp,
        };
        let ms = |v: u64, default: Duration| {
            if v == 0 {
                default
            } else {
                Duration::from_millis(v)
            }
        };
        HealthPlan {
            check,
            interval: ms(h.interval_ms, DEFAULT_INTERVAL),
            timeout: ms(h.timeout_ms, DEFAULT_TIMEOUT),
            healthy_after: h.healthy_after,
            unhealthy_after: h.unhealthy_after,
            start_timeout: ms(h.start_timeout_ms, DEFAULT_START_TIMEOUT),
        }
    }

    /// What runs the plan's checks.
    pub fn checker(&self) -> Checker {
        Checker::new(self.check.clone(), self.timeout)
    }

    /// A fresh count of consecutive results, for a process just started or adopted.
    pub fn tally(&self) -> Tally {
        Tally::new(self.healthy_after, self.unhealthy_after)
    }
}

/// Runs checks against one slot.
#[derive(Clone)]
pub struct Checker {
    /// What one check does.
    check: Check,
    /// How long one check may take.
    timeout: Duration,
    /// Kept across checks, so an HTTP check reuses its connection.
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Checker {
    pub fn new(check: Check, timeout: Duration) -> Checker {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(timeout));
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(conn);
        Checker {
            check,
            timeout,
            client,
        }
    }

    /// One check of the slot listening on `port`, whose processes `launcher` starts;
    /// `Err` carries a short reason.
    pub async fn run(&self, port: u16, launcher: &Launcher) -> Result<(), String> {
        if let Check::Exec(cmd) = &self.check {
            // Bounded by the command's own timeout, which stops its whole group.
            return self.exec(cmd, launcher).await;
        }
        match tokio::time::timeout(self.timeout, self.probe(port)).await {
            Ok(r) => r,
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> String {
        format!(
            "health check timed out after {}ms",
            self.timeout.as_millis()
        )
    }

    async fn exec(&self, cmd: &[String], launcher: &Launcher) -> Result<(), String> {
        let opts = RunOptions {
            grace: EXEC_GRACE,
            tail_lines: 1,
            ..RunOptions::new(self.timeout)
        };
        let out = launcher.run(cmd, &opts).await.map_err(|e| e.to_string())?;
        match out.exit {
            Exit::Code(0) => Ok(()),
            Exit::TimedOut(_) => Err(self.timed_out()),
            exit => Err(format!(
                "{} exited with {exit}{}",
                cmd[0],
                out.tail
                    .last()
                    .map(|l| format!(": {}", l.trim()))
                    .unwrap_or_default()
            )),
        }
    }

    async fn probe(&self, port: u16) -> Result<(), String> {
        match &self.check {
            Check::Http(path) => {
                let uri = format!("http://127.0.0.1:{port}{path}")
                    .parse::<hyper::Uri>()
                    .map_err(|e| e.to_string())?;
                let req = hyper::Request::get(uri)
                    .header("user-agent", "cutover-health")
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let resp = self.client.request(req).await.map_err(|e| {
                    use std::error::Error;
                    match e.source() {
                        Some(s) => format!("GET {path}: {s}"),
                        None => format!("GET {path}: {e}"),
                    }
                })?;
                let s = resp.status();
                if s.is_success() || s.is_redirection() {
                    Ok(())
                } else {
                    Err(format!("GET {path}: HTTP {s}"))
                }
            }
            Check::Tcp | Check::Exec(_) => tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
                .map_err(|e| format!("connect 127.0.0.1:{port}: {e}")),
        }
    }
}

/// Consecutive-result thresholds: a slot turns healthy after `healthy_after` passes in a
/// row and unhealthy after `unhealthy_after` failures in a row.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Passes in a row that make the slot healthy.
    healthy_after: u32,
    /// Failures in a row that make a healthy slot unhealthy.
    unhealthy_after: u32,
    /// The current run of passes.
    passes: u32,
    /// The current run of failures.
    failures: u32,
    /// The verdict: `None` until the first one (a slot starting is neither).
    pub healthy: Option<bool>,
}

impl Tally {
    pub fn new(healthy_after: u32, unhealthy_after: u32) -> Tally {
        Tally {
            healthy_after: healthy_after.max(1),
            unhealthy_after: unhealthy_after.max(1),
            passes: 0,
            failures: 0,
            healthy: None,
        }
    }

    /// Records a result; returns the new verdict if it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.passes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.passes = 0;
        }
        let verdict = if self.passes >= self.healthy_after {
            Some(true)
        } else if self.failures >= self.unhealthy_after && self.healthy == Some(true) {
            Some(false)
        } else {
            None
        };
        match verdict {
            Some(v) if self.healthy != Some(v) => {
                self.healthy = Some(v);
                Some(v)
            }
            _ => None,
        }
    }

    pub fn reset(&mut self) {
        *self = Tally::new(self.healthy_after, self.unhealthy_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_fills_in_what_the_spec_leaves_out() {
        use cutover_proto::v1::{ExecCheck, HealthSpec};
        let bare = HealthPlan::of(&SlotSpec::default());
        assert_eq!(
            bare,
            HealthPlan {
                check: Check::Tcp,
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(2),
                healthy_after: 0,
                unhealthy_after: 0,
                start_timeout: Duration::from_secs(60),
            }
        );
        let spec = |check| SlotSpec {
            health: Some(HealthSpec {
                check: Some(check),
                interval_ms: 250,
                timeout_ms: 100,
                healthy_after: 2,
                unhealthy_after: 3,
                start_timeout_ms: 5_000,
            }),
            ..Default::default()
        };
        let http = HealthPlan::of(&spec(health_spec::Check::HttpPath("/ready".into())));
        assert_eq!(http.check, Check::Http("/ready".into()));
        assert_eq!(
            (http.interval, http.timeout, http.start_timeout),
            (
                Duration::from_millis(250),
                Duration::from_millis(100),
                Duration::from_secs(5)
            )
        );
        assert_eq!((http.healthy_after, http.unhealthy_after), (2, 3));
        let exec = HealthPlan::of(&spec(health_spec::Check::Exec(ExecCheck {
            command: vec!["./bin/check".into()],
        })));
        assert_eq!(exec.check, Check::Exec(vec!["./bin/check".into()]));
    }

    #[test]
    fn thresholds() {
        let mut t = Tally::new(2, 3);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a pass resets the failure run");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
    }

    fn launcher(dir: &std::path::Path) -> Launcher {
        Launcher {
            dir: dir.to_path_buf(),
            user: crate::spawn::RunAs::resolve("", None).unwrap(),
            env: Vec::new(),
        }
    }

    #[tokio::test]
    async fn tcp_and_exec_checks() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let run = launcher(dir.path());
        let c = Checker::new(Check::Tcp, Duration::from_secs(1));
        assert!(c.run(port, &run).await.is_ok());
        drop(l);
        assert!(c.run(port, &run).await.is_err());

        let ok = Checker::new(Check::Exec(vec!["true".into()]), Duration::from_secs(2));
        assert!(ok.run(port, &run).await.is_ok());
        let bad = Checker::new(
            Check::Exec(vec![
                "sh".into(),
                "-c".into(),
                "echo nope >&2; exit 3".into(),
            ]),
            Duration::from_secs(2),
        );
        let e = bad.run(port, &run).await.unwrap_err();
        assert_eq!(e, "sh exited with exit status: 3: nope");
        let slow = Checker::new(
            Check::Exec(vec!["sleep".into(), "5".into()]),
            Duration::from_millis(200),
        );
        assert_eq!(
            slow.run(port, &run).await.unwrap_err(),
            "health check timed out after 200ms"
        );
        let missing = Checker::new(
            Check::Exec(vec!["./bin/check".into()]),
            Duration::from_secs(2),
        );
        assert_eq!(
            missing.run(port, &run).await.unwrap_err(),
            "command ./bin/check: not found in the release"
        );
    }
}
