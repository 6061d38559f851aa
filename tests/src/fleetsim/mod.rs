//! `cutover-fleetsim`: thousands of simulated agents in one process against one real
//! coordinator, and the figures that say how the coordinator carries them.
//!
//! Each simulated host is enrolled through the real join (`enrol`), connects from its
//! own source address with its own certificate and runs the real agent stream (`link`),
//! answering desired state with the observed state a real agent would report (`host`).
//! The scenarios run here: `connect` (every host's link opened at once), the
//! coordinator's memory per host, `steady` (its CPU with no deployment), `deploy` (a
//! real deployment — prepare, three steps, a rollback — timed from the coordinator's
//! decisions to the hosts' reports, `deploy`), and `reconnect` (the coordinator killed
//! and restarted). Figures go out as one report (`figures`).

pub mod coord;
pub mod deploy;
pub mod enrol;
pub mod figures;
pub mod fleet;
pub mod host;
pub mod link;
pub mod sampler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use coordinator::report::Show;
use cutover_proto::v1::{ListHostsRequest, ShowRequest};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::coord::{Coordinator, cpu_seconds, listen_overflows, rss_bytes};
use self::deploy::{PlanSpec, RollbackBy, Story};
use self::figures::{Report, mb};
use self::fleet::Fleet;
use self::host::{Behaviour, Faults, unit};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Time until every host is connected, and the coordinator's memory per host.
    Connect,
    /// Coordinator CPU with the fleet connected and no deployment.
    Steady,
    /// A deployment: prepare, three steps, a rollback.
    Deploy,
    /// The coordinator killed and restarted: time until every host is back.
    Reconnect,
    /// All of the above, in that order.
    All,
    /// Keep the fleet connected until interrupted (for profiling, or deploying by hand).
    Run,
}

/// A coordinator started elsewhere.
pub struct External {
    pub addr: SocketAddr,
    /// Its admin credentials (`DATA/admin`).
    pub credentials: PathBuf,
    /// Its process id, for CPU and memory figures.
    pub pid: Option<i32>,
}

/// How to run the simulator.
pub struct Config {
    pub hosts: usize,
    /// Where enrolment (and a coordinator it starts) is kept between runs.
    pub state: PathBuf,
    /// The `cutover` binary.
    pub cutover: PathBuf,
    pub external: Option<External>,
    /// Hosts connect from 127.`source_net`.x.y.
    pub source_net: u8,
    pub behaviour: Behaviour,
    /// Fraction of hosts on which the deployed release fails to start.
    pub fail_hosts: f64,
    /// Fraction of the deployed release's requests answered with a 5xx.
    pub error_rate: f64,
    pub rollback: RollbackBy,
    /// The hold of the first two steps.
    pub hold: Duration,
    /// The window of the steady figure.
    pub steady: Duration,
    /// How long the coordinator stays down in `reconnect`.
    pub down: Duration,
    /// The longest any one wait may take (connecting, each deployment phase).
    pub timeout: Duration,
}

/// A run's figures, and what stopped it early, if anything.
pub struct Outcome {
    pub report: Report,
    pub error: Option<anyhow::Error>,
}

/// Runs `scenario`: starts (or attaches to) the coordinator, enrolls the hosts, starts
/// them and measures, until it is done or `stop` (the figures so far are kept).
pub async fn run(scenario: Scenario, cfg: Config, stop: CancellationToken) -> Outcome {
    let mut report = Report {
        hosts: cfg.hosts,
        machine: figures::Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_at_start: load_average(),
            started_unix_ms: cutover_shared::clock::now_ms(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            ..Default::default()
        },
        ..Default::default()
    };
    // `run` ends on `stop` by itself, with every figure; the others are cut short.
    let error = tokio::select! {
        r = measure(scenario, &cfg, &mut report, &stop) => r.err(),
        _ = stop.cancelled(), if scenario != Scenario::Run => Some(anyhow::anyhow!("interrupted")),
    };
    let me = std::process::id() as i32;
    report.simulator.cpu_s = cpu_seconds(me).unwrap_or(0.0);
    report.simulator.rss_mb = rss_bytes(me).map(mb).unwrap_or(0.0);
    Outcome { report, error }
}

/// Everything the run measures; figures land in `report` as they come.
async fn measure(
    scenario: Scenario,
    cfg: &Config,
    report: &mut Report,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    if cfg.hosts == 0 {
        bail!("--hosts: must be at least 1");
    }
    create_private_dir(&cfg.state)?;
    // Each host holds one connection; the coordinator started here inherits the limit.
    report.machine.file_limit = fleet::raise_file_limit(cfg.hosts as u64 * 2 + 4096)?;
    let mut coord = match &cfg.external {
        Some(e) => Coordinator::attach(&cfg.cutover, e.addr, e.credentials.clone(), e.pid),
        None => Coordinator::start(&cfg.cutover, &cfg.state, cfg.hosts + 1024).await?,
    };
    report.machine.coordinator = coord.addr.to_string();
    report.machine.coordinator_started_here = coord.is_own();
    let names: Vec<String> = (0..cfg.hosts).map(|i| fleet::name(i, cfg.hosts)).collect();
    let enrolled = enrol::enrol(&coord, &cfg.state, &names).await?;
    report.enrolment = Some(figures::Enrolment {
        joined: enrolled.joined,
        seconds: enrolled.seconds,
        per_second: (enrolled.joined > 0).then(|| enrolled.joined as f64 / enrolled.seconds),
    });
    let before = coord.is_own().then(|| coord.rss_bytes().ok()).flatten();
    let overflows = listen_overflows().ok();
    let fleet = Fleet::start(coord.addr, &enrolled, cfg.source_net, cfg.behaviour)?;
    drop(enrolled);
    let sampler = sampler::Sampler::start(fleet.shared.clone(), coord.pid.clone(), fleet.started);
    let mut connect = connect(&coord, &fleet, cfg.timeout).await;
    connect.listen_overflows = since(overflows);
    report.connect = Some(connect);
    let outcome = scenarios(scenario, cfg, &mut coord, &fleet, before, report, stop).await;
    report.samples = sampler.stop().await;
    report.simulator.max_queued = fleet.shared.max_queued.load(Ordering::Relaxed);
    report.session_failures = fleet
        .shared
        .errors()
        .into_iter()
        .map(|(error, count)| figures::Failures { error, count })
        .collect();
    if fleet.revoked() > 0 {
        tracing::warn!(
            hosts = fleet.revoked(),
            "hosts whose certificate was revoked"
        );
    }
    fleet.stop().await;
    outcome
}

async fn scenarios(
    scenario: Scenario,
    cfg: &Config,
    coord: &mut Coordinator,
    fleet: &Fleet,
    rss_before: Option<u64>,
    report: &mut Report,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(c) = &report.connect else {
        bail!("the fleet did not connect");
    };
    if !c.all_connected {
        bail!(
            "only {} of {} hosts connected within {:?}",
            c.connected,
            fleet.len(),
            cfg.timeout
        );
    }
    if c.settled_s.is_none() {
        bail!(
            "the fleet kept losing sessions: never {}s without one within {:?} of being all connected",
            SETTLED.as_secs(),
            cfg.timeout
        );
    }
    report.memory = Some(memory(coord, fleet, rss_before).await?);
    if scenario == Scenario::Connect {
        return Ok(());
    }
    deploy::baseline(coord, &cfg.state.join("plans"), cfg.timeout).await?;
    if matches!(scenario, Scenario::Steady | Scenario::All) {
        report.steady = Some(steady(coord, cfg.steady).await?);
    }
    if matches!(scenario, Scenario::Deploy | Scenario::All) {
        report.deploy = Some(deployment(coord, fleet, cfg).await?);
    }
    if matches!(scenario, Scenario::Reconnect | Scenario::All) {
        let r = reconnect(coord, fleet, cfg).await?;
        let (back, all) = (r.reconnected, r.all_reconnected);
        report.reconnect = Some(r);
        if !all {
            bail!(
                "only {back} of {} hosts reconnected within {:?} of the restart",
                fleet.len(),
                cfg.timeout
            );
        }
    }
    if scenario == Scenario::Run {
        eprintln!(
            "{} hosts connected to {}; CUTOVER_COORDINATOR={} CUTOVER_CREDENTIALS={}; interrupt to stop",
            fleet.connected(),
            coord.addr,
            coord.addr,
            coord.credentials.display()
        );
        stop.cancelled().await;
    }
    Ok(())
}

/// Waits until every host is connected (or the timeout), timing 99 % and 100 % from
/// the start of their links.
async fn connect(coord: &Coordinator, fleet: &Fleet, timeout: Duration) -> figures::Connect {
    let started = fleet.started;
    let n = fleet.len();
    let need_99 = ((n as f64 * 0.99).ceil() as usize).max(1);
    let mut c = figures::Connect::default();
    loop {
        let connected = fleet.connected();
        let t = started.elapsed().as_secs_f64();
        if connected >= need_99 && c.seconds_99.is_none() {
            c.seconds_99 = Some(t);
        }
        if connected == n {
            c.seconds_100 = Some(t);
            break;
        }
        if started.elapsed() > timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.connected = fleet.connected();
    c.all_connected = c.connected == n;
    if c.all_connected {
        c.settled_s = settle(fleet, timeout).await.map(|t| t.as_secs_f64());
    }
    c.coordinator_connected = coordinator_connected(coord).await.ok();
    c
}

/// How long the fleet stays together to count as settled.
const SETTLED: Duration = Duration::from_secs(5);

/// Waits until every host stayed connected, with no session failing, for [`SETTLED`];
/// returns when that began, from the start of the links (none: not within `timeout`).
/// A fleet that connects in a storm can keep losing sessions after it was all up.
async fn settle(fleet: &Fleet, timeout: Duration) -> Option<Duration> {
    let deadline = Instant::now() + timeout;
    let mut calm_since = Instant::now();
    let mut failures = fleet.shared.failures.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        let now_failures = fleet.shared.failures.load(Ordering::Relaxed);
        if now_failures != failures || fleet.connected() != fleet.len() {
            failures = now_failures;
            calm_since = Instant::now();
        } else if calm_since.elapsed() >= SETTLED {
            return Some(calm_since.duration_since(fleet.started));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Hosts the coordinator lists as connected.
async fn coordinator_connected(coord: &Coordinator) -> anyhow::Result<usize> {
    let hosts = coord
        .control()
        .await?
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    Ok(hosts.iter().filter(|h| h.connected).count())
}

/// The coordinator's memory once every host reported a few times.
async fn memory(
    coord: &Coordinator,
    fleet: &Fleet,
    before: Option<u64>,
) -> anyhow::Result<figures::Memory> {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = coord.rss_bytes()?;
    let n = fleet.len() as f64;
    Ok(figures::Memory {
        rss_before_hosts_mb: before.map(mb),
        rss_connected_mb: mb(rss),
        kb_per_host: rss as f64 / 1024.0 / n,
        kb_per_host_added: before.map(|b| rss.saturating_sub(b) as f64 / 1024.0 / n),
    })
}

/// CPU over `window` with the fleet connected and no deployment.
async fn steady(coord: &Coordinator, window: Duration) -> anyhow::Result<figures::Steady> {
    // Let the baseline's end settle (retiring, the last reports).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let me = std::process::id() as i32;
    let (c0, s0, t0) = (coord.cpu_seconds()?, cpu_seconds(me)?, Instant::now());
    tokio::time::sleep(window).await;
    let (c1, s1, t) = (
        coord.cpu_seconds()?,
        cpu_seconds(me)?,
        t0.elapsed().as_secs_f64(),
    );
    Ok(figures::Steady {
        seconds: t,
        coordinator_cores: (c1 - c0) / t,
        simulator_cores: (s1 - s0) / t,
    })
}

/// A deployment of a new release: prepare, three steps, then a rollback — `cutover
/// abort` once the last step holds, or failing analysis at the first step.
async fn deployment(
    coord: &Coordinator,
    fleet: &Fleet,
    cfg: &Config,
) -> anyhow::Result<figures::Deploy> {
    let release = format!("2.0.{}", cutover_shared::clock::now_ms());
    let error_rate = match cfg.rollback {
        RollbackBy::Analysis if cfg.error_rate == 0.0 => 0.5,
        _ => cfg.error_rate,
    };
    fleet.shared.faults.store(Arc::new(Faults {
        release: Some(release.clone()),
        fail_hosts: cfg.fail_hosts,
        error_rate,
    }));
    let failing = fleet
        .hosts
        .iter()
        .filter(|h| unit(&h.name) < cfg.fail_hosts)
        .count();
    let hold = cutover_shared::Duration(cfg.hold);
    let plan = PlanSpec {
        release: &release,
        steps: format!(
            "[{{ traffic = 10, hold = \"{hold}\" }}, {{ traffic = 50, hold = \"{hold}\" }}, {{ traffic = 100, hold = \"1h\" }}]"
        ),
        max_failed_hosts: failing,
        analysis: cfg.rollback == RollbackBy::Analysis,
    }
    .write(&cfg.state.join("plans"))?;
    let me = std::process::id() as i32;
    let (c0, s0, t0) = (coord.cpu_seconds()?, cpu_seconds(me)?, Instant::now());
    let retries = coord.retries();
    let id = deploy::submit(coord, &plan, &release).await?;
    if cfg.rollback == RollbackBy::Abort {
        abort_at_last_step(coord, &id, cfg.timeout).await?;
    }
    let end = deploy::wait(coord, &id, cfg.timeout, "its end", |_| false).await?;
    let (c1, s1, t) = (
        coord.cpu_seconds()?,
        cpu_seconds(me)?,
        t0.elapsed().as_secs_f64(),
    );
    fleet.shared.faults.store(Arc::new(Faults::default()));
    let json = coord
        .control()
        .await?
        .show(ShowRequest { id: id.clone() })
        .await?
        .into_inner()
        .json;
    let show: Show = serde_json::from_str(&json).context("read the deployment's story")?;
    let story = Story::read(&show, &fleet.acks());
    Ok(figures::Deploy {
        id,
        release,
        state: end.state,
        reason: (!end.reason.is_empty()).then_some(end.reason),
        hosts: show.hosts.len(),
        failed_hosts: story.failed.len(),
        prepare_s: story.prepare_s,
        steps: story.steps,
        rollback: story.rollback,
        coordinator_rolled_back: story.rolled_back,
        duration_s: t,
        coordinator_cpu_s: c1 - c0,
        coordinator_cores: (c1 - c0) / t,
        simulator_cores: (s1 - s0) / t,
        coordinator_rss_mb: coord.rss_bytes().map(mb)?,
        show_bytes: json.len(),
        control_retries: coord.retries() - retries,
    })
}

/// Waits until the last step holds (every host that did not fail switched to it), then
/// runs `cutover abort`.
async fn abort_at_last_step(
    coord: &Coordinator,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let d = deploy::wait(coord, id, timeout, "its last step", |d| {
        d.state == "progressing"
            && d.step + 1 == d.steps
            && d.hosts
                .iter()
                .all(|h| matches!(h.phase.as_str(), "switched" | "failed"))
    })
    .await?;
    if deploy::is_final(&d.state) {
        bail!(
            "deployment {id} ended {} before its last step: {}",
            d.state,
            d.reason
        );
    }
    deploy::abort(coord, id).await
}

/// Kills the coordinator (SIGKILL), keeps it down for `cfg.down`, starts it again and
/// times every host's new session.
async fn reconnect(
    coord: &mut Coordinator,
    fleet: &Fleet,
    cfg: &Config,
) -> anyhow::Result<figures::Reconnect> {
    if !coord.is_own() {
        bail!(
            "reconnect: the coordinator was passed in; only one the simulator starts can be killed"
        );
    }
    let before = fleet.sessions();
    let overflows = listen_overflows().ok();
    coord.kill()?;
    tokio::time::sleep(cfg.down).await;
    let restarted = Instant::now();
    coord.restart()?;
    let n = fleet.len();
    let need_99 = ((n as f64 * 0.99).ceil() as usize).max(1);
    let mut r = figures::Reconnect {
        down_s: cfg.down.as_secs_f64(),
        ..Default::default()
    };
    // The control API's first answer is timed on its own task, beside the hosts.
    let answered = {
        let mut probe =
            Coordinator::attach(&cfg.cutover, coord.addr, coord.credentials.clone(), None);
        tokio::spawn(async move { probe.wait_ready().await.map(|()| restarted.elapsed()) })
    };
    loop {
        let back = fleet.reconnected_since(&before);
        let t = restarted.elapsed().as_secs_f64();
        if back >= need_99 && r.seconds_99.is_none() {
            r.seconds_99 = Some(t);
        }
        if back == n {
            r.seconds_100 = Some(t);
            break;
        }
        if restarted.elapsed() > cfg.timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r.reconnected = fleet.reconnected_since(&before);
    r.all_reconnected = r.reconnected == n;
    r.listen_overflows = since(overflows);
    r.answered_s = answered
        .await
        .ok()
        .and_then(Result::ok)
        .map(|d| d.as_secs_f64());
    r.coordinator_rss_mb = coord.rss_bytes().ok().map(mb);
    Ok(r)
}

/// How much the machine's accept-queue drops grew since `before`.
fn since(before: Option<u64>) -> Option<u64> {
    Some(listen_overflows().ok()?.saturating_sub(before?))
}

/// The 1-minute load average.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Creates `dir` (mode 0700: it holds the hosts' keys and the coordinator's data).
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))
}
