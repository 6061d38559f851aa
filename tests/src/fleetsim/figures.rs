//! The figures a run measures, as one JSON document (`--output json`) or as lines for
//! people, and how fan-out times are read from what the hosts acknowledged.

use serde::Serialize;

/// Everything one run measured; scenarios fill their part.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Simulated hosts.
    pub hosts: usize,
    pub machine: Machine,
    pub enrolment: Option<Enrolment>,
    pub connect: Option<Connect>,
    pub memory: Option<Memory>,
    pub steady: Option<Steady>,
    pub deploy: Option<Deploy>,
    pub reconnect: Option<Reconnect>,
    pub simulator: Simulator,
    /// Why sessions ended or could not open, most frequent first (numbers masked).
    pub session_failures: Vec<Failures>,
    /// The fleet and the coordinator every second of the run.
    pub samples: Vec<super::sampler::Sample>,
}

/// Where the figures were measured.
#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    /// The 1-minute load average when the run started.
    pub load_at_start: f64,
    /// When the run started (unix ms).
    pub started_unix_ms: u64,
    /// `release` or `debug`: how this simulator was built.
    pub build: &'static str,
    /// The coordinator's gRPC address, and whether the simulator started it.
    pub coordinator: String,
    pub coordinator_started_here: bool,
    /// The open-file limit in force (the coordinator it starts inherits it).
    pub file_limit: u64,
}

/// Joining the hosts through `Enroll.Join`.
#[derive(Debug, Default, Serialize)]
pub struct Enrolment {
    /// Hosts that joined in this run (the others were enrolled before).
    pub joined: usize,
    pub seconds: f64,
    pub per_second: Option<f64>,
}

/// Every host's link opened at once.
#[derive(Debug, Default, Serialize)]
pub struct Connect {
    pub connected: usize,
    pub all_connected: bool,
    /// From the start of the hosts' links to 99 % and to all of them connected.
    pub seconds_99: Option<f64>,
    pub seconds_100: Option<f64>,
    /// From the start of the links to the first 5 s in which every host stayed
    /// connected and no session failed; none when that did not come.
    pub settled_s: Option<f64>,
    /// Hosts the coordinator lists as connected once the fleet counted them all.
    pub coordinator_connected: Option<usize>,
    /// Connections the kernel dropped meanwhile for a full accept queue (machine-wide).
    pub listen_overflows: Option<u64>,
}

/// The coordinator's resident memory.
#[derive(Debug, Default, Serialize)]
pub struct Memory {
    /// Before any simulated host connected (when the simulator started it).
    pub rss_before_hosts_mb: Option<f64>,
    /// With every host connected and reporting.
    pub rss_connected_mb: f64,
    /// `rss_connected / hosts`, and the same over what the hosts added.
    pub kb_per_host: f64,
    pub kb_per_host_added: Option<f64>,
}

/// No deployment: hosts report and beat.
#[derive(Debug, Default, Serialize)]
pub struct Steady {
    pub seconds: f64,
    /// CPU used over the window, in cores (1.0 = one core busy).
    pub coordinator_cores: f64,
    pub simulator_cores: f64,
}

/// A deployment over the fleet: prepare, three steps, then a rollback.
#[derive(Debug, Default, Serialize)]
pub struct Deploy {
    pub id: String,
    pub release: String,
    /// How it ended (`aborted`, `rolled_back`...), and why.
    pub state: String,
    pub reason: Option<String>,
    /// Hosts of the deployment, and those whose preparation failed.
    pub hosts: usize,
    pub failed_hosts: usize,
    /// From submission to the first step's weights going out.
    pub prepare_s: Option<f64>,
    /// Each step's weights, from the coordinator's decision to the hosts' reports.
    pub steps: Vec<FanOut>,
    /// The old weights back on every host, from the decision to roll back.
    pub rollback: Option<FanOut>,
    /// Hosts the coordinator shows rolled back at the end.
    pub coordinator_rolled_back: usize,
    /// Submission to the end.
    pub duration_s: f64,
    /// CPU the coordinator used from submission to the end: seconds, and cores on
    /// average.
    pub coordinator_cpu_s: f64,
    pub coordinator_cores: f64,
    pub simulator_cores: f64,
    /// The coordinator's resident memory at the end.
    pub coordinator_rss_mb: f64,
    /// Size of the deployment's `show` document, which the CLI must be able to read.
    pub show_bytes: usize,
    /// CLI commands and status polls that failed (the coordinator too busy to answer)
    /// and were tried again.
    pub control_retries: u64,
}

/// How one decision reached the hosts.
#[derive(Debug, Default, Serialize)]
pub struct FanOut {
    /// `step 1 (10%)`, `rollback`.
    pub what: String,
    /// When the coordinator decided (unix ms, from the timeline).
    pub decided_unix_ms: u64,
    /// Hosts that should acknowledge, and those that did.
    pub hosts: usize,
    pub acked: usize,
    /// From the decision to half, 99 % and all of the hosts reporting the new weights.
    pub p50_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub p100_s: Option<f64>,
    /// Hosts that took longer than a second (a session lost and opened again on the
    /// way shows here).
    pub slower_than_1s: usize,
    /// From the decision to the coordinator's own record that every host confirmed
    /// (the step holding, the rollback done).
    pub coordinator_confirmed_s: Option<f64>,
}

/// The coordinator killed (SIGKILL) and started again.
#[derive(Debug, Default, Serialize)]
pub struct Reconnect {
    /// How long it stayed down (as systemd's `RestartSec`).
    pub down_s: f64,
    /// From the restart to the control API answering.
    pub answered_s: Option<f64>,
    /// From the restart to 99 % and to all hosts in a new session.
    pub seconds_99: Option<f64>,
    pub seconds_100: Option<f64>,
    pub reconnected: usize,
    pub all_reconnected: bool,
    /// Connections the kernel dropped meanwhile for a full accept queue (machine-wide).
    pub listen_overflows: Option<u64>,
    pub coordinator_rss_mb: Option<f64>,
}

/// The simulator itself: the machine is shared, so its cost matters.
#[derive(Debug, Default, Serialize)]
pub struct Simulator {
    pub cpu_s: f64,
    pub rss_mb: f64,
    /// The most messages any host had waiting to go out (the agent's queue holds 64).
    pub max_queued: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Failures {
    pub error: String,
    pub count: u64,
}

/// The time (s) by which `q` of `total` hosts acknowledged, from sorted delays (ms); none
/// when fewer did.
pub fn quantile(sorted_ms: &[u64], total: usize, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let need = ((q * total as f64).ceil() as usize).clamp(1, total);
    sorted_ms.get(need - 1).map(|ms| *ms as f64 / 1000.0)
}

pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Prints the report as lines for people.
pub fn print_text(r: &Report) {
    let m = &r.machine;
    println!(
        "cutover-fleetsim: {} hosts; coordinator {} ({}); {} build; {} cores, load {:.2} at start; open-file limit {}",
        r.hosts,
        m.coordinator,
        if m.coordinator_started_here {
            "started here"
        } else {
            "passed in"
        },
        m.build,
        m.cores,
        m.load_at_start,
        m.file_limit
    );
    if let Some(e) = &r.enrolment {
        match e.per_second {
            Some(rate) => println!(
                "enrolment: {} hosts joined in {:.1}s ({rate:.0}/s)",
                e.joined, e.seconds
            ),
            None => println!("enrolment: every host was enrolled before (identities reused)"),
        }
    }
    if let Some(c) = &r.connect {
        println!(
            "connect: {} of {} connected; 99% in {}, all in {}, settled (5 s without a lost session) from {}; the coordinator lists {} connected; {} SYNs dropped by a full accept queue",
            c.connected,
            r.hosts,
            secs(c.seconds_99),
            secs(c.seconds_100),
            secs(c.settled_s),
            count(c.coordinator_connected),
            count(c.listen_overflows)
        );
    }
    if let Some(mem) = &r.memory {
        println!(
            "memory: coordinator RSS {:.1} MB with every host connected ({} before): {:.1} KB per host, {} per host added",
            mem.rss_connected_mb,
            mem.rss_before_hosts_mb
                .map_or("?".into(), |b| format!("{b:.1} MB")),
            mem.kb_per_host,
            mem.kb_per_host_added
                .map_or("?".into(), |k| format!("{k:.1} KB"))
        );
    }
    if let Some(s) = &r.steady {
        println!(
            "steady: coordinator {:.3} cores, simulator {:.3} cores, over {:.0}s without a deployment",
            s.coordinator_cores, s.simulator_cores, s.seconds
        );
    }
    if let Some(d) = &r.deploy {
        print_deploy(d);
    }
    if let Some(x) = &r.reconnect {
        println!(
            "reconnect: coordinator killed, down {:.1}s; it answered {} after its restart; {} of {} hosts back, 99% in {}, all in {}; {} SYNs dropped by a full accept queue",
            x.down_s,
            secs(x.answered_s),
            x.reconnected,
            r.hosts,
            secs(x.seconds_99),
            secs(x.seconds_100),
            count(x.listen_overflows)
        );
    }
    println!(
        "simulator: {:.1}s CPU, RSS {:.0} MB; at most {} messages waited to go out on one host",
        r.simulator.cpu_s, r.simulator.rss_mb, r.simulator.max_queued
    );
    for f in r.session_failures.iter().take(8) {
        println!("session failures: {}x {}", f.count, f.error);
    }
}

fn print_deploy(d: &Deploy) {
    println!(
        "deploy {} ({}): {} over {} hosts ({} failed to prepare){}; prepared in {}",
        d.id,
        d.release,
        d.state,
        d.hosts,
        d.failed_hosts,
        d.reason
            .as_ref()
            .map_or(String::new(), |r| format!(": {r}")),
        secs(d.prepare_s)
    );
    for f in d.steps.iter().chain(&d.rollback) {
        println!(
            "  {}: {} of {} hosts acknowledged; 50% in {}, 99% in {}, 100% in {} ({} over 1s); the coordinator saw all in {}",
            f.what,
            f.acked,
            f.hosts,
            secs(f.p50_s),
            secs(f.p99_s),
            secs(f.p100_s),
            f.slower_than_1s,
            secs(f.coordinator_confirmed_s)
        );
    }
    println!(
        "  coordinator: {:.2}s CPU over {:.1}s ({:.3} cores), RSS {:.1} MB; simulator {:.3} cores; show is {} KB; {} hosts rolled back; {} commands or polls tried again",
        d.coordinator_cpu_s,
        d.duration_s,
        d.coordinator_cores,
        d.coordinator_rss_mb,
        d.simulator_cores,
        d.show_bytes / 1024,
        d.coordinator_rolled_back,
        d.control_retries
    );
}

fn count<T: std::fmt::Display>(n: Option<T>) -> String {
    n.map_or("?".into(), |n| n.to_string())
}

fn secs(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{s:.3}s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_count_hosts_that_never_acknowledged() {
        let d = [10, 20, 30, 40];
        assert_eq!(quantile(&d, 4, 0.5), Some(0.02));
        assert_eq!(quantile(&d, 4, 1.0), Some(0.04));
        // Five hosts, four acknowledged: 99 % and 100 % were never reached.
        assert_eq!(quantile(&d, 5, 0.99), None);
        assert_eq!(quantile(&d, 5, 0.8), Some(0.04));
        assert_eq!(quantile(&[], 0, 0.99), None);
    }
}
