//! `cutover-observability-bench`: what seeing deployments costs. Not a test; run it and
//! read (a release build gives production figures).
//!
//!   cargo build --workspace --bins && target/debug/cutover-observability-bench [deployments] [hosts]
//!
//! First, the cost the proxy pays per request to count it (requests, 5xx, latency
//! histogram), alone and with two threads counting into the same slot. The timeline is
//! written by the coordinator, never on the request path.
//!
//! It runs real deployments on this machine (a good 2-step one and one rolled back by
//! analysis), then copies their records and timelines into the coordinator's store until
//! it holds `deployments` (default 1000) spread over 30 days, and adds enrolled hosts up
//! to `hosts` (default 100). It prints the store's size, how long each dashboard API
//! takes, and how long headless Chromium takes to show the populated dashboard.

use std::time::{Duration, Instant};

use coordinator::model::{DeploymentRecord, HostRecord};
use coordinator::store::{Batch, Store};
use tests::{Cluster, Load, get, wait_until};

fn size(path: &std::path::Path) -> f64 {
    std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / (1024.0 * 1024.0))
}

/// ns per `SlotMetrics::observe`, with `threads` threads counting into one slot.
fn observe_ns(threads: usize) -> f64 {
    use agent::proxy::SlotMetrics;
    use std::sync::Arc;
    let m = Arc::new(SlotMetrics::default());
    let per = 5_000_000u64;
    let t = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..per {
                    let status = if (i + k as u64).is_multiple_of(50) {
                        hyper::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        hyper::StatusCode::OK
                    };
                    m.observe(Duration::from_micros(100 + i % 5000), Some(status));
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    t.elapsed().as_nanos() as f64 / per as f64
}

fn main() -> anyhow::Result<()> {
    println!("counting a request on the proxy's path (SlotMetrics, atomics):");
    println!("  1 thread: {:.1} ns per request", observe_ns(1));
    println!(
        "  2 threads into one slot: {:.1} ns per request (wall time per request per thread)",
        observe_ns(2)
    );
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let hosts: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let mut c = Cluster::start(33, 2);
    real_deployments(&c)?;
    c.stop_coordinator();
    seed_history(&c, n, hosts)?;
    c.start_coordinator();
    api_times(&c)?;
    dashboard_times(&c, hosts)
}

/// A good 2-step deployment, then one that analysis rolls back under load.
fn real_deployments(c: &Cluster) -> anyhow::Result<()> {
    let steps = r#"[{ traffic = 10, hold = "1s" }, { traffic = 100 }]"#;
    let plan = c.plan("1.0.0").steps(steps).write("v1");
    anyhow::ensure!(c.deploy_wait(&plan).0 == 0, "v1 failed");
    let load = Load::start(c.addrs(), 2);
    wait_until(Duration::from_secs(10), "load", || load.report.ok() > 100);
    let plan = c
        .plan("2.0.0")
        .behaviour(&["error_rate=0.3"])
        .steps(steps)
        .analysis(tests::ANALYSIS_ERRORS)
        .write("bad");
    anyhow::ensure!(c.deploy_wait(&plan).0 == 3, "v2 was not rolled back");
    drop(load);
    Ok(())
}

/// Copies the real deployments, shifted in time, into the stopped coordinator's store
/// until it holds `n` over 30 days, adds hosts up to `hosts`, and prints its size.
fn seed_history(c: &Cluster, n: usize, hosts: usize) -> anyhow::Result<()> {
    let db = c.dir.join("coordinator").join("cutover.redb");
    let before = size(&db);
    let store = Store::open(&db)?;
    let templates = store.deployments()?;
    let events = store.all_events()?;
    let real_events: usize = events.values().map(Vec::len).sum();
    let now = cutover_shared::clock::now_ms();
    let span = 30 * 86_400_000u64;
    let t = Instant::now();
    for i in 0..n.saturating_sub(templates.len()) {
        let tpl = &templates[i % templates.len()];
        // Spread over the last 30 days, oldest first.
        let target = now - span + (i as u64 * span / n as u64);
        let shift = target as i64 - tpl.created_unix_ms as i64;
        let id = format!("d-h{i:06}");
        let mut b = Batch::default();
        b.deployment(&shifted(tpl, &id, shift));
        for (seq, e) in events.get(&tpl.id).into_iter().flatten().enumerate() {
            let mut e = e.clone();
            e.at_unix_ms = (e.at_unix_ms as i64 + shift) as u64;
            b.event(&id, seq as u64, &e);
        }
        store.commit(b)?;
    }
    let mut b = Batch::default();
    for h in 0..hosts.saturating_sub(2) {
        b.host(&HostRecord {
            name: format!("app-{h:03}"),
            labels: [("env".to_string(), "bench".to_string())].into(),
            cert_fingerprint: format!("{h:064x}"),
            joined_unix_ms: now,
            previous_fingerprint: None,
        });
    }
    store.commit(b)?;
    let seeded = t.elapsed();
    drop(store);
    let after = size(&db);
    let per_events = real_events as f64 / templates.len() as f64;
    println!("store with a long history ({n} deployments, {hosts} hosts):");
    println!(
        "  cutover.redb: {before:.2} MiB with {} real deployments, {after:.2} MiB with {n} ({:.1} KiB per deployment, ~{per_events:.0} timeline events each); seeded in {:.1}s",
        templates.len(),
        (after - before) * 1024.0 / (n - templates.len()).max(1) as f64,
        seeded.as_secs_f64()
    );
    Ok(())
}

/// Deployment `tpl` as `id`, every time in it moved by `shift` ms.
fn shifted(tpl: &DeploymentRecord, id: &str, shift: i64) -> DeploymentRecord {
    let at = |t: u64| (t as i64 + shift) as u64;
    let mut d = tpl.clone();
    d.id = id.to_string();
    d.created_unix_ms = at(d.created_unix_ms);
    d.ended_unix_ms = d.ended_unix_ms.map(at);
    d.phase_started_unix_ms = at(d.phase_started_unix_ms);
    if let Some(r) = d.rollback.as_mut() {
        r.first_bad_unix_ms = at(r.first_bad_unix_ms);
        r.decided_unix_ms = at(r.decided_unix_ms);
        r.done_unix_ms = r.done_unix_ms.map(at);
    }
    d
}

/// The dashboard's JSON APIs and page over the long history: best of 5 each.
fn api_times(c: &Cluster) -> anyhow::Result<()> {
    for path in [
        "/api/fleet",
        "/api/live",
        "/api/deployments?limit=200",
        "/api/stats?since=30d",
        "/metrics",
        "/",
    ] {
        let mut best = Duration::MAX;
        let mut bytes = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let body = get(&c.http_addr, path).map_err(anyhow::Error::msg)?;
            best = best.min(t.elapsed());
            bytes = body.len();
        }
        println!(
            "  GET {path:<28} {:>7.1} ms (best of 5), {bytes} bytes",
            best.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

/// Headless Chromium showing the populated dashboard, against starting it blank.
fn dashboard_times(c: &Cluster, hosts: usize) -> anyhow::Result<()> {
    // Chromium: launch, load, run the page's script and render the populated dashboard.
    let url = format!("http://{}/", c.http_addr);
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let out = std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=1",
                "--dump-dom",
                &url,
            ])
            .output()?;
        let dom = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            dom.contains(&format!("cutover · {hosts} hosts")),
            "the dashboard did not populate"
        );
        best = best.min(t.elapsed());
    }
    let mut blank = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--dump-dom",
                "about:blank",
            ])
            .output()?;
        blank = blank.min(t.elapsed());
    }
    println!(
        "  headless Chromium to the populated dashboard: {:.0} ms (best of 3), of which starting Chromium itself (about:blank) {:.0} ms",
        best.as_secs_f64() * 1000.0,
        blank.as_secs_f64() * 1000.0
    );
    Ok(())
}
