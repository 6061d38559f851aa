//! A real Prometheus server for the business-metric tests (Debian's `prometheus`,
//! which `tests/run.sh` installs): started with a generated config that discovers its
//! targets from the agents' `/sd/prometheus` and scrapes every second, its storage in
//! a temporary dir, on a free port; stopped when dropped. Also a cluster whose agents
//! serve `--http`, which discovery needs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::http::get;
use crate::procs::{Proc, free_port, wait_until};

/// The port every agent of [`Cluster::start_scraped`] serves `--http` on, at its own
/// address.
pub const AGENT_HTTP_PORT: u16 = 9109;

impl Cluster {
    /// Like [`Cluster::start`], with each agent serving `--http` on its own address
    /// (`127.net.0.x:9109`).
    pub fn start_scraped(net: u8, n: usize) -> Cluster {
        let mut c = Cluster::unstarted(&[]);
        c.agent_args = vec!["--http".into(), format!("{{ip}}:{AGENT_HTTP_PORT}")];
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

    /// Each agent's `/sd/prometheus` URL.
    pub fn discovery_urls(&self) -> Vec<String> {
        self.agents
            .iter()
            .map(|a| format!("http://{}:{AGENT_HTTP_PORT}/sd/prometheus", a.ip))
            .collect()
    }
}

/// A running Prometheus server.
pub struct Prometheus {
    /// `http://127.0.0.1:PORT`, what a plan's `[analysis] prometheus` names.
    pub url: String,
    /// Its `host:port`.
    pub addr: String,
    /// The server process, stopped on drop.
    _proc: Proc,
}

impl Prometheus {
    /// Starts Prometheus in `dir` (config, storage and log there), discovering targets
    /// from `sd_urls` and scraping them every second; waits until it is ready.
    pub fn start(dir: &Path, sd_urls: &[String]) -> Prometheus {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let sd: String = sd_urls
            .iter()
            .map(|u| format!("      - url: {u}\n        refresh_interval: 1s\n"))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: cutover\n    http_sd_configs:\n{sd}"
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1h")
            .current_dir(&dir);
        let proc = Proc::spawn("prometheus", &mut cmd, dir.join("prometheus.log"));
        wait_until(Duration::from_secs(30), "prometheus to be ready", || {
            get(&addr, "/-/ready").is_ok()
        });
        Prometheus {
            url: format!("http://{addr}"),
            addr,
            _proc: proc,
        }
    }

    /// The answer to an instant query (its `data.result`), or why not.
    pub fn query(&self, query: &str) -> Result<Value, String> {
        let encoded: String = query
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let body = get(&self.addr, &format!("/api/v1/query?query={encoded}"))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        Ok(v["data"]["result"].clone())
    }

    /// True once Prometheus has scraped series `name` of `release`.
    pub fn has_series(&self, name: &str, release: &str) -> bool {
        self.query(&format!("{name}{{release=\"{release}\"}}"))
            .ok()
            .and_then(|r| r.as_array().map(|a| !a.is_empty()))
            .unwrap_or(false)
    }
}
