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

/// An `[analysis]` section judging fifteen metrics every 2 s — the proxy's five, five
/// from the sample's own metrics (`source = "slot"`) and five queries to `prometheus` —
/// with bounds a healthy sample release passes.
pub fn fifteen_metrics(prometheus: &str) -> String {
    let mut a = format!(
        "[analysis]\ninterval = \"2s\"\nfailure_limit = 2\nmin_requests = 10\ninconclusive_limit = 5\nscrape = \"/metrics\"\nprometheus = \"{prometheus}\"\n"
    );
    let mut add = |body: &str| a.push_str(&format!("\n[[analysis.metric]]\n{body}\n"));
    add("name = \"error_rate\"\nmax = 0.05");
    add("name = \"latency_p50\"\nmax = 1000");
    add("name = \"latency_p90\"\nmax = 2000");
    add("name = \"latency_p99\"\nmax = 5000");
    add("name = \"request_rate\"\nmin = 0.1");
    add(
        "name = \"payment failures\"\nsource = \"slot\"\nratio = [\"payments_failed_total\", \"payments_total\"]\nmax = 0.05",
    );
    add(
        "name = \"card failures\"\nsource = \"slot\"\nratio = [\"payments_failed_total\", \"payments_total\"]\nlabels = { method = \"card\" }\nmax = 0.05",
    );
    add(
        "name = \"payments per second\"\nsource = \"slot\"\ncounter = \"payments_total\"\nmin = 0.1",
    );
    add(
        "name = \"payment p99\"\nsource = \"slot\"\nhistogram = \"payment_duration_seconds\"\nquantile = 0.99\nmax = 0.5",
    );
    add("name = \"queue depth\"\nsource = \"slot\"\ngauge = \"payment_queue_depth\"\nmax = 10");
    let q = |expr: &str| expr.replace("REL", "release=\"${RELEASE}\",service=\"${SERVICE}\"");
    add(&format!(
        "name = \"prom payments per second\"\nsource = \"prometheus\"\nquery = '{}'\nmin = 0",
        q("sum(rate(payments_total{REL}[5s]))")
    ));
    add(&format!(
        "name = \"prom failure share\"\nsource = \"prometheus\"\nquery = '{}'\nmax = 0.05",
        q("sum(increase(payments_failed_total{REL}[5s])) / sum(increase(payments_total{REL}[5s]))")
    ));
    add(&format!(
        "name = \"prom card payments\"\nsource = \"prometheus\"\nquery = '{}'\nmin = 0",
        q("sum(rate(payments_total{REL,method=\"card\"}[5s]))")
    ));
    add(&format!(
        "name = \"prom payment p90\"\nsource = \"prometheus\"\nquery = '{}'\nmax = 0.5",
        q("histogram_quantile(0.9, sum by (le) (rate(payment_duration_seconds_bucket{REL}[5s])))")
    ));
    add(&format!(
        "name = \"prom slots up\"\nsource = \"prometheus\"\nquery = '{}'\nmin = 1",
        q("sum(up{REL})")
    ));
    a
}
