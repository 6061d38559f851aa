//! `cutover-measure`: runs real deployments on this machine and prints the figures that
//! cutover's progressive delivery is judged by. Not a test; run it and read.
//!
//!   cargo build --workspace --bins && target/debug/cutover-measure [runs]
//!   target/debug/cutover-measure database [deployments]
//!
//! It prints: the time a blue/green switch of 3 hosts takes and the requests it costs;
//! time from the first bad analysis interval to the last host back on the old
//! slot, and the client requests that failed, for rollbacks at 1 %, 10 % and 50 %; false
//! rollbacks of a healthy release over `runs` deployments (default 20); and how long a
//! good 3-step deployment spends beyond its configured holds.
//!
//!   target/debug/cutover-measure business
//!
//! prints the cost of judging fifteen metrics (5 proxy, 5 slot, 5 Prometheus) every
//! 2 s on 3 hosts under load — agent CPU per scrape, coordinator CPU per interval, the
//! clients' throughput and slowest request with and without the scrapes — and the time
//! from the first bad business-metric interval to the last host back on the old slot.
//!
//!   target/debug/cutover-measure database [DEPLOYMENTS]
//!
//! prints the figures of database changes instead (see `measure/database.rs`).

use std::time::{Duration, Instant};

use tests::{Cluster, Load, Prometheus, fifteen_metrics, wait_until};

const ANALYSIS: &str = r#"[analysis]
interval = "1s"
failure_limit = 1
min_requests = 10

[[analysis.metric]]
name = "error_rate"
max = 0.05

[[analysis.metric]]
name = "latency_p99"
max_vs_baseline = 3.0
judge = "mann-whitney"
confidence = 0.99
"#;

#[path = "measure/database.rs"]
mod database;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("business") {
        return business();
    }
    if std::env::args().nth(1).as_deref() == Some("database") {
        let deployments = std::env::args()
            .nth(2)
            .and_then(|a| a.parse().ok())
            .unwrap_or(20);
        database::run(deployments);
        return;
    }
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let c = Cluster::start(31, 3);
    let v1 = c.plan("1.0.0").write("v1");
    let (code, _, err) = c.deploy_wait(&v1);
    assert_eq!(code, 0, "{err}");

    switch(&c);
    println!();
    rollbacks(&c);
    println!();
    false_rollbacks(&c, runs);
    println!();
    three_steps(&c);
}

/// A blue/green switch of every host at once, under load.
fn switch(c: &Cluster) {
    println!(
        "blue/green switch of 3 hosts to a new release at 100%, under load (4 keep-alive clients per host):"
    );
    let plan = c.plan("1.0.1").write("switch");
    let load = Load::start(c.addrs(), 4);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 500);
    let t = Instant::now();
    let (code, _, err) = c.deploy_wait(&plan);
    let took = t.elapsed().as_secs_f64();
    let (ok, failed) = (load.report.ok(), load.report.failed());
    load.stop();
    assert_eq!(code, 0, "{err}");
    println!(
        "  `cutover deploy --wait` to every host switched: {took:.2}s (fetch, verify, unpack, start, 2 passing health checks at 200ms, switch)"
    );
    println!(
        "  client requests while it ran: {} served, {failed} failed",
        ok + failed
    );
}

/// A bad release rolled back by analysis at 1 %, 10 % and 50 % of traffic.
fn rollbacks(c: &Cluster) {
    println!(
        "rollback of a release answering 30% of requests with 500, 3 hosts, 4 keep-alive clients per host:"
    );
    println!(
        "{:>8} {:>22} {:>18} {:>16}",
        "traffic", "first bad -> all back", "failed requests", "of requests"
    );
    let bad = c.pack("9.9.9", &["error_rate=0.3"]);
    for traffic in [1, 10, 50] {
        let plan = c
            .plan("9.9.9")
            .artifact(&bad.url, &bad.sha256)
            .steps(&format!(
                "[{{ traffic = {traffic}, hold = \"60s\" }}, {{ traffic = 100 }}]"
            ))
            .analysis(ANALYSIS)
            .write(&format!("bad{traffic}"));
        let load = Load::start(c.addrs(), 4);
        wait_until(Duration::from_secs(10), "load", || load.report.ok() > 500);
        let (base_ok, base_failed) = (load.report.ok(), load.report.failed());
        let (code, id, err) = c.deploy_wait(&plan);
        let report = load.stop();
        assert_eq!(code, 3, "{err}");
        let s = c.status(&id);
        let restore = s["rollback"]["seconds_to_restore"]
            .as_f64()
            .unwrap_or(f64::NAN);
        let failed = report.failed() - base_failed;
        let total = report.ok() - base_ok + failed;
        println!(
            "{:>7}% {:>21.3}s {:>18} {:>16}",
            traffic,
            restore,
            failed,
            format!(
                "{total} ({:.3}%)",
                100.0 * failed as f64 / total.max(1) as f64
            )
        );
    }
}

/// Healthy releases deployed `runs` times under load: how many analysis rolled back.
fn false_rollbacks(c: &Cluster, runs: usize) {
    println!(
        "false rollbacks of a healthy release, {runs} deployments at 10% then 100% under load:"
    );
    let mut false_rollbacks = 0;
    let load = Load::start(c.addrs(), 2);
    for i in 0..runs {
        let plan = c
            .plan(&format!("2.0.{i}"))
            .steps(r#"[{ traffic = 10, hold = "2s" }, { traffic = 100, hold = "1s" }]"#)
            .analysis(ANALYSIS)
            .write(&format!("good{i}"));
        let (code, id, _) = c.deploy_wait(&plan);
        if code != 0 {
            false_rollbacks += 1;
            println!(
                "  run {i}: {} — {}",
                c.status(&id)["state"],
                c.status(&id)["reason"]
            );
        }
    }
    let report = load.stop();
    println!(
        "  {false_rollbacks} of {runs} rolled back; client requests failed: {} of {}",
        report.failed(),
        report.ok() + report.failed()
    );
}

/// How long a good 3-step deployment takes beyond its holds.
fn three_steps(c: &Cluster) {
    println!("a good 3-step deployment (1% 2s, 10% 2s, 100% 2s; analysis every 1s):");
    let load = Load::start(c.addrs(), 2);
    let plan = c
        .plan("3.0.0")
        .steps(r#"[{ traffic = 1, hold = "2s" }, { traffic = 10, hold = "2s" }, { traffic = 100, hold = "2s" }]"#)
        .analysis(ANALYSIS)
        .write("three");
    let t = Instant::now();
    let (code, _, err) = c.deploy_wait(&plan);
    let took = t.elapsed().as_secs_f64();
    load.stop();
    assert_eq!(code, 0, "{err}");
    println!(
        "  took {took:.2}s for 6s of holds: {:.2}s beyond them (preparation, switches, waiting for conclusive intervals, CLI polling)",
        took - 6.0
    );
}

/// CPU time (user + system) a process has used so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// What a window of `secs` under load cost: (agents' CPU, coordinator's CPU, requests
/// served per second, slowest request).
fn window(c: &Cluster, secs: u64) -> (Duration, Duration, f64, Duration) {
    let agents: Vec<u32> = c.agents.iter().map(|a| a.proc.child.id()).collect();
    let coord = c.coordinator.as_ref().map_or(0, |p| p.child.id());
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 200);
    let a0: Duration = agents.iter().map(|p| cpu(*p)).sum();
    let c0 = cpu(coord);
    let ok0 = load.report.ok();
    std::thread::sleep(Duration::from_secs(secs));
    let a1: Duration = agents.iter().map(|p| cpu(*p)).sum();
    let c1 = cpu(coord);
    let rps = (load.report.ok() - ok0) as f64 / secs as f64;
    let report = load.stop();
    report.assert_none_failed();
    (a1 - a0, c1 - c0, rps, report.max_latency())
}

/// Fifteen metrics on three hosts: what judging them costs, and how fast a release bad
/// for the business comes back.
fn business() {
    let c = Cluster::start_scraped(103, 3);
    let prom = Prometheus::start(&c.dir, &c.discovery_urls());
    let v1 = c
        .plan("1.0.0")
        .analysis("[analysis]\ninterval = \"1s\"\nmin_requests = 0\nscrape = \"/metrics\"\n")
        .write("v1");
    assert_eq!(c.deploy_wait(&v1).0, 0);
    wait_until(Duration::from_secs(30), "prometheus to scrape v1", || {
        prom.has_series("payments_total", "1.0.0")
    });
    let secs = 20;
    let (a_idle, c_idle, rps_idle, slow_idle) = window(&c, secs);
    // v2 holds at 50 % behind a gate while its fifteen metrics are judged every 2 s.
    let plan = c
        .plan("2.0.0")
        .steps("[{ traffic = 50, pause = true }, { traffic = 100 }]")
        .analysis(&fifteen_metrics(&prom.url))
        .write("fifteen");
    let id = c.deploy(&plan);
    wait_until(Duration::from_secs(60), "the gate", || {
        c.status(&id)["state"] == "paused"
    });
    let before = c.status(&id)["intervals"].as_array().map_or(0, Vec::len);
    let (a_busy, c_busy, rps_busy, slow_busy) = window(&c, secs);
    let s = c.status(&id);
    let intervals = s["intervals"].as_array().map_or(0, Vec::len) - before;
    let passing = s["intervals"]
        .as_array()
        .map_or(0, |i| i.iter().filter(|i| i["verdict"] == "pass").count());
    // 4 scrapes per 2 s interval, of 2 slots, on each of 3 hosts.
    let scrapes = (secs * 1000 / 500) * 2 * 3;
    let extra = a_busy.saturating_sub(a_idle);
    println!("fifteen metrics (5 proxy, 5 slot, 5 prometheus) every 2 s on 3 hosts, under load:");
    println!(
        "  agents' CPU over {secs} s: {:.0} ms without scrapes, {:.0} ms judging ({scrapes} slot scrapes): {:.2} ms CPU per slot scrape",
        a_idle.as_secs_f64() * 1e3,
        a_busy.as_secs_f64() * 1e3,
        extra.as_secs_f64() * 1e3 / scrapes as f64
    );
    println!(
        "  coordinator CPU over {secs} s: {:.0} ms without a deployment, {:.0} ms judging {intervals} interval(s) ({passing} passing so far): {:.1} ms per interval",
        c_idle.as_secs_f64() * 1e3,
        c_busy.as_secs_f64() * 1e3,
        c_busy.saturating_sub(c_idle).as_secs_f64() * 1e3 / intervals.max(1) as f64
    );
    println!(
        "  clients (2 keep-alive per host): {rps_idle:.0} req/s, slowest {:.1} ms without scrapes; {rps_busy:.0} req/s, slowest {:.1} ms while scraped",
        slow_idle.as_secs_f64() * 1e3,
        slow_busy.as_secs_f64() * 1e3
    );
    c.cli_ok(&["abort", &id]);
    wait_until(Duration::from_secs(30), "the abort", || {
        c.status(&id)["state"] == "aborted"
    });
    println!();
    bad_payments(&c);
}

/// A release failing 30 % of payments behind 200s, judged by the slots' own counters.
fn bad_payments(c: &Cluster) {
    let analysis = r#"[analysis]
interval = "1s"
failure_limit = 1
min_requests = 10
scrape = "/metrics"

[[analysis.metric]]
name = "payment failure rate"
source = "slot"
ratio = ["payments_failed_total", "payments_total"]
max = 0.05
"#;
    println!("a release failing 30% of payments (HTTP 200), slot ratio, 1 s intervals, 10% step:");
    for run in 0..3 {
        let load = Load::start(c.addrs(), 2);
        wait_until(Duration::from_secs(10), "load", || load.report.ok() > 200);
        let plan = c
            .plan(&format!("3.0.{run}"))
            .behaviour(&["payment_failure_rate=0.3"])
            .steps(r#"[{ traffic = 10, hold = "60s" }, { traffic = 100 }]"#)
            .analysis(analysis)
            .write(&format!("bad-{run}"));
        let (code, id, err) = c.deploy_wait(&plan);
        let report = load.stop();
        assert_eq!(code, 3, "{err}");
        let r = c.status(&id)["rollback"].clone();
        println!(
            "  run {}: first bad interval to every host back on the old slot {:.2} s, client requests failed {}",
            run + 1,
            r["seconds_to_restore"].as_f64().unwrap_or(f64::NAN),
            report.failed()
        );
    }
}
