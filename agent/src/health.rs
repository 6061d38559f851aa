//! Health checks of a slot process: HTTP (2xx or 3xx passes), TCP connect, or a command
//! that exits 0, each bounded by the plan's timeout. The supervisor turns results into
//! healthy/unhealthy only after the plan's consecutive thresholds.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

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

    /// One check; `Err` carries a short reason.
    pub async fn run(&self, port: u16, dir: &Path, env: &[(String, String)]) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.run_inner(port, dir, env)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "health check timed out after {}ms",
                self.timeout.as_millis()
            )),
        }
    }

    async fn run_inner(
        &self,
        port: u16,
        dir: &Path,
        env: &[(String, String)],
    ) -> Result<(), String> {
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
            Check::Tcp => tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
                .map_err(|e| format!("connect 127.0.0.1:{port}: {e}")),
            Check::Exec(cmd) => {
                let Some((prog, args)) = cmd.split_first() else {
                    return Err("empty health command".into());
                };
                let prog = crate::process::resolve_program(prog, dir);
                let out = tokio::process::Command::new(&prog)
                    .args(args)
                    .current_dir(dir)
                    .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .output()
                    .await
                    .map_err(|e| format!("run {}: {e}", prog.display()))?;
                if out.status.success() {
                    Ok(())
                } else {
                    let err = String::from_utf8_lossy(&out.stderr);
                    let last = err.lines().last().unwrap_or("").trim();
                    Err(format!(
                        "{} exited with {}{}",
                        cmd[0],
                        out.status,
                        if last.is_empty() {
                            String::new()
                        } else {
                            format!(": {last}")
                        }
                    ))
                }
            }
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

    #[tokio::test]
    async fn tcp_and_exec_checks() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let c = Checker::new(Check::Tcp, Duration::from_secs(1));
        assert!(c.run(port, dir.path(), &[]).await.is_ok());
        drop(l);
        assert!(c.run(port, dir.path(), &[]).await.is_err());

        let ok = Checker::new(Check::Exec(vec!["true".into()]), Duration::from_secs(2));
        assert!(ok.run(port, dir.path(), &[]).await.is_ok());
        let bad = Checker::new(
            Check::Exec(vec![
                "sh".into(),
                "-c".into(),
                "echo nope >&2; exit 3".into(),
            ]),
            Duration::from_secs(2),
        );
        let e = bad.run(port, dir.path(), &[]).await.unwrap_err();
        assert!(e.contains("nope"), "{e}");
        let slow = Checker::new(
            Check::Exec(vec!["sleep".into(), "5".into()]),
            Duration::from_millis(200),
        );
        assert!(
            slow.run(port, dir.path(), &[])
                .await
                .unwrap_err()
                .contains("timed out")
        );
    }
}
