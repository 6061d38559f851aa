//! Health checks of a slot process: HTTP (2xx or 3xx passes), TCP connect, or a command
//! that exits 0, each bounded by the plan's timeout. A command runs through
//! [`crate::spawn`] like the slot process itself: as the slot's user, with the slot's
//! clean environment, its whole process group stopped when it overruns. The supervisor
//! turns results into healthy/unhealthy only after the plan's consecutive thresholds.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

use crate::spawn::{Exit, Launcher, RunOptions};

/// Between SIGTERM and SIGKILL for a check command that overruns its timeout.
const EXEC_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub enum Check {
    Http(String),
    Tcp,
    Exec(Vec<String>),
}

/// Runs checks against one slot.
#[derive(Clone)]
pub struct Checker {
    check: Check,
    timeout: Duration,
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
    healthy_after: u32,
    unhealthy_after: u32,
    passes: u32,
    failures: u32,
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
