//! `cutover-fleetsim`: N simulated agents in one process against one real coordinator,
//! each enrolled through the real join with its own certificate, its own mTLS
//! connection from its own source address and the real agent stream. Each scenario
//! prints its figures (JSON with `--output json`):
//!
//!   cargo build --release -p coordinator -p tests --bins
//!   target/release/cutover-fleetsim all --hosts 1000
//!
//! Enrolment is kept in `--state`, so the next run reuses the identities (and the
//! coordinator's data dir, when the simulator starts it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use cutover_shared::Duration;
use tests::fleetsim::deploy::RollbackBy;
use tests::fleetsim::host::Behaviour;
use tests::fleetsim::{self, Config, External, Scenario, fleet};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "cutover-fleetsim",
    about = "Thousands of simulated agents against one real coordinator, and the figures they give"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time until every host is connected, and the coordinator's memory per host.
    Connect(Args),
    /// The coordinator's CPU with the fleet connected and no deployment.
    Steady(Args),
    /// A real deployment (prepare, three steps, a rollback), timed from each of the
    /// coordinator's decisions to the hosts' reports.
    Deploy(Args),
    /// The coordinator killed (SIGKILL) and started again: time until every host is
    /// back (only with a coordinator the simulator starts).
    Reconnect(Args),
    /// connect, steady, deploy and reconnect, in that order.
    All(Args),
    /// Keep the fleet connected until interrupted (to profile, or to deploy by hand).
    Run(Args),
}

#[derive(clap::Args)]
struct Args {
    /// Simulated hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Where enrolment is kept between runs, with the data dir of a coordinator the
    /// simulator starts (default: TMPDIR/cutover-fleetsim).
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// The `cutover` binary (default: the one beside this one).
    #[arg(long, value_name = "PATH")]
    cutover: Option<PathBuf>,
    /// Use this running coordinator (gRPC address) instead of starting one.
    #[arg(long, value_name = "ADDR", requires = "credentials")]
    coordinator: Option<SocketAddr>,
    /// The admin credentials of --coordinator (its DATA/admin).
    #[arg(long, value_name = "DIR")]
    credentials: Option<PathBuf>,
    /// The process id of --coordinator, for its CPU and memory figures.
    #[arg(long, value_name = "PID")]
    coordinator_pid: Option<i32>,
    /// Hosts connect from their own address in 127.NET.0.0/16.
    #[arg(long, default_value_t = 200, value_name = "NET")]
    source_net: u8,
    /// How long a new slot takes to turn healthy (each host 75–125 % of it).
    #[arg(long, default_value = "2s")]
    ready_after: Duration,
    /// Requests per second each host serves (its traffic counters).
    #[arg(long, default_value_t = 20.0)]
    rps: f64,
    /// Fraction of hosts on which the deployed release fails to start.
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    fail_hosts: f64,
    /// Fraction of the deployed release's requests answered with a 5xx (0.5 when
    /// rolling back by analysis and not given).
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    error_rate: f64,
    /// What rolls the deployment back.
    #[arg(long, value_enum, default_value = "abort")]
    rollback: RollbackBy,
    /// The hold of the deployment's first two steps.
    #[arg(long, default_value = "2s")]
    hold: Duration,
    /// How long the steady figure is measured.
    #[arg(long, default_value = "30s")]
    window: Duration,
    /// How long the coordinator stays down in `reconnect` (systemd's RestartSec).
    #[arg(long, default_value = "2s")]
    down: Duration,
    /// The longest any one wait may take (connecting, each phase of a deployment).
    #[arg(long, default_value = "300s")]
    timeout: Duration,
    /// Figures as text lines or one JSON document.
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let (scenario, args) = match cli.scenario {
        Cmd::Connect(a) => (Scenario::Connect, a),
        Cmd::Steady(a) => (Scenario::Steady, a),
        Cmd::Deploy(a) => (Scenario::Deploy, a),
        Cmd::Reconnect(a) => (Scenario::Reconnect, a),
        Cmd::All(a) => (Scenario::All, a),
        Cmd::Run(a) => (Scenario::Run, a),
    };
    let output = args.output;
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cutover-fleetsim: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cutover-fleetsim: start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    cutover_proto::tls::install_default_provider();
    let outcome = runtime.block_on(async {
        let stop = CancellationToken::new();
        match stop_on_signal(stop.clone()) {
            Ok(()) => fleetsim::run(scenario, cfg, stop).await,
            Err(e) => fleetsim::Outcome {
                report: Default::default(),
                error: Some(e),
            },
        }
    });
    match output {
        Output::Json => match serde_json::to_string_pretty(&outcome.report) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("cutover-fleetsim: encode the figures: {e}"),
        },
        Output::Text => fleetsim::figures::print_text(&outcome.report),
    }
    match outcome.error {
        Some(e) => {
            eprintln!("cutover-fleetsim: {e:#}");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}

/// Cancels `stop` on SIGINT or SIGTERM, so that the coordinator the simulator started
/// is stopped and the figures so far are printed.
fn stop_on_signal(stop: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        stop.cancel();
    });
    Ok(())
}

/// The run's configuration, each flag checked.
fn config(a: Args) -> anyhow::Result<Config> {
    let fraction = |flag: &str, v: f64| {
        if (0.0..=1.0).contains(&v) {
            Ok(v)
        } else {
            Err(anyhow::anyhow!("{flag}: must be between 0 and 1, not {v}"))
        }
    };
    if a.hosts == 0 || a.hosts > fleet::MAX_HOSTS {
        bail!("--hosts: must be between 1 and {}", fleet::MAX_HOSTS);
    }
    if !(a.rps.is_finite() && a.rps >= 0.0) {
        bail!("--rps: must be 0 or more");
    }
    let cutover = match a.cutover {
        Some(p) => p,
        None => std::env::current_exe()
            .context("find this executable")?
            .with_file_name("cutover"),
    };
    if !cutover.exists() {
        bail!(
            "{} is missing: build it (cargo build -p coordinator) or pass --cutover",
            cutover.display()
        );
    }
    let external = match (a.coordinator, a.credentials) {
        (Some(addr), Some(credentials)) => Some(External {
            addr,
            credentials,
            pid: a.coordinator_pid,
        }),
        (None, Some(_)) => bail!("--credentials: only with --coordinator"),
        _ => None,
    };
    Ok(Config {
        hosts: a.hosts,
        state: a
            .state
            .unwrap_or_else(|| std::env::temp_dir().join("cutover-fleetsim")),
        cutover,
        external,
        source_net: a.source_net,
        behaviour: Behaviour {
            ready_after_ms: a.ready_after.as_millis(),
            rps: a.rps,
        },
        fail_hosts: fraction("--fail-hosts", a.fail_hosts)?,
        error_rate: fraction("--error-rate", a.error_rate)?,
        rollback: a.rollback,
        hold: a.hold.std(),
        steady: a.window.std(),
        down: a.down.std(),
        timeout: a.timeout.std(),
    })
}
