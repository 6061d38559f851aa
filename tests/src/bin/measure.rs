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
//! good 3-step deployment spends beyond its configured holds. `database` prints the
//! figures of database changes instead (see `measure/database.rs`).

use std::time::{Duration, Instant};

use tests::{Cluster, Load, wait_until};

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
