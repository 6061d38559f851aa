//! One sample a second while the simulator runs — hosts connected, session failures so
//! far, the coordinator's and the simulator's CPU and the coordinator's memory — so
//! that a run that breaks shows what gave out first. Every fifth sample is also logged
//! (`RUST_LOG=info`).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::coord::{cpu_seconds, machine_cpu_seconds, rss_bytes};
use super::figures::mb;
use super::link::Shared;

/// The fleet and the coordinator at one second of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Seconds since the hosts' links started.
    pub t_s: f64,
    pub connected: usize,
    /// Sessions that ended or could not open so far.
    pub failures: u64,
    /// CPU used over the last second, in cores; none while the coordinator is down.
    pub coordinator_cores: Option<f64>,
    pub simulator_cores: f64,
    /// How late this sample's timer fired: the simulator's own runtime falling behind.
    pub simulator_lag_ms: u64,
    /// CPU the whole machine used over the last second, in cores: what is left after
    /// the coordinator and the simulator is other people's work.
    pub machine_cores: f64,
    pub coordinator_rss_mb: Option<f64>,
}

/// The running sampler.
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Sampler {
    /// Samples every second from now, timed from `started`; `pid` is the coordinator's
    /// (0 while it is down).
    pub fn start(shared: Arc<Shared>, pid: Arc<AtomicI32>, started: Instant) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(shared, pid, started, samples.clone(), cancel.clone()));
        Sampler {
            samples,
            cancel,
            task,
        }
    }

    /// Stops sampling; returns the samples.
    pub async fn stop(self) -> Vec<Sample> {
        self.cancel.cancel();
        let _ = self.task.await;
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

async fn run(
    shared: Arc<Shared>,
    pid: Arc<AtomicI32>,
    started: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    cancel: CancellationToken,
) {
    let me = std::process::id() as i32;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(Instant, i32, Option<f64>, f64, f64)> = None;
    loop {
        let scheduled = tokio::select! {
            _ = cancel.cancelled() => return,
            t = tick.tick() => t,
        };
        let now = Instant::now();
        let pid = pid.load(Ordering::Relaxed);
        let coord_cpu = (pid != 0).then(|| cpu_seconds(pid).ok()).flatten();
        let sim_cpu = cpu_seconds(me).unwrap_or(0.0);
        let machine_cpu = machine_cpu_seconds().unwrap_or(0.0);
        if let Some((at, last_pid, last_coord, last_sim, last_machine)) = last {
            let dt = now.duration_since(at).as_secs_f64().max(1e-3);
            let coordinator_cores = match (coord_cpu, last_coord) {
                (Some(c), Some(l)) if pid == last_pid => Some((c - l) / dt),
                _ => None,
            };
            let s = Sample {
                t_s: now.duration_since(started).as_secs_f64(),
                connected: shared.connected.load(Ordering::Relaxed),
                failures: shared.failures.load(Ordering::Relaxed),
                coordinator_cores,
                simulator_cores: (sim_cpu - last_sim) / dt,
                simulator_lag_ms: now.duration_since(scheduled).as_millis() as u64,
                machine_cores: (machine_cpu - last_machine) / dt,
                coordinator_rss_mb: (pid != 0).then(|| rss_bytes(pid).ok().map(mb)).flatten(),
            };
            let mut g = samples.lock().unwrap_or_else(|p| p.into_inner());
            if g.len().is_multiple_of(5) {
                tracing::info!(
                    t_s = format!("{:.0}", s.t_s),
                    connected = s.connected,
                    failures = s.failures,
                    coordinator_cores = s.coordinator_cores.map(|c| format!("{c:.2}")),
                    simulator_cores = format!("{:.2}", s.simulator_cores),
                    simulator_lag_ms = s.simulator_lag_ms,
                    machine_cores = format!("{:.2}", s.machine_cores),
                    "fleet"
                );
            }
            g.push(s);
        }
        last = Some((now, pid, coord_cpu, sim_cpu, machine_cpu));
    }
}
