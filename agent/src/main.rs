//! `cutover-agent`: `join` enrolls this host once; `run` is the host daemon.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "cutover-agent", version, about = "The cutover host agent")]
struct Args {
    /// What to do: join or run.
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enroll this host with a coordinator.
    Join(JoinArgs),
    /// Run the agent.
    Run(RunArgs),
}

// The flags of `join`.
#[derive(clap::Args)]
struct JoinArgs {
    /// The coordinator's gRPC address (its --listen), HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    coordinator: String,
    /// The join token. Every user sees it in `ps`: prefer --token-file or the
    /// environment variable CUTOVER_JOIN_TOKEN (exactly one of the three).
    #[arg(long)]
    token: Option<String>,
    /// A file holding the join token.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Folder for the agent's identity and state (created).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Host name [default: the machine's hostname]
    #[arg(long)]
    name: Option<String>,
    /// Labels added to the token's, as k=v,k2=v2: only keys the token allows
    /// (`cutover token create --allow-labels`), never one the token sets.
    #[arg(long, default_value = "")]
    labels: String,
}

// The flags of `run`.
#[derive(clap::Args)]
struct RunArgs {
    /// The folder `cutover-agent join` filled: identity, state and releases.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// IP on which the services' public ports are bound.
    #[arg(long, default_value = "0.0.0.0")]
    service_address: IpAddr,
    /// ed25519 public key (hex) whose signatures artifacts must carry (repeatable;
    /// DATA/trusted_keys adds more). Without any, signatures are not required.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    /// Serve /metrics (Prometheus text) and /healthz on this address.
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// On SIGHUP the agent re-executes its binary, keeping its ports and slot
    /// processes; this long at most it waits for client connections to end first.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handover_drain: std::time::Duration,
    /// Largest artifact this host downloads.
    #[arg(long, default_value = "4GiB", value_parser = cutover_shared::size::parse)]
    max_artifact_size: u64,
    /// Largest total size an artifact may unpack to.
    #[arg(long, default_value = "16GiB", value_parser = cutover_shared::size::parse)]
    max_unpacked_size: u64,
    /// A download that receives nothing for this long is abandoned (and retried,
    /// a few times, with backoff).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    fetch_stall_timeout: std::time::Duration,
    /// Run slot processes as this user when the plan's `[run] user` is empty (an
    /// agent running as root); a plan says `user = "root"` to run as root.
    #[arg(long)]
    service_user: Option<String>,
    /// Private ports of slot processes on 127.0.0.1 come from this range, e.g.
    /// 20000-29999 [default: 10000 to just below the kernel's ephemeral ports].
    #[arg(long, value_name = "FIRST-LAST")]
    slot_ports: Option<agent::ports::PortRange>,
    /// Connections each listener (every public port, --http) keeps open at once;
    /// more wait in the kernel's accept queue.
    #[arg(long, default_value_t = cutover_proto::listen::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// An HTTP connection that has not sent a complete request head this long after
    /// it was opened, or after its previous response, is closed (header-read and
    /// keep-alive idle timeout).
    #[arg(long, default_value = "75s", value_parser = parse_duration)]
    idle_timeout: std::time::Duration,
    /// A connection to a TCP-mode public port that carries no byte either way for
    /// this long is closed.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    tcp_idle_timeout: std::time::Duration,
    /// A slot's log file is kept as NAME.log.1 and started anew past this size (so a
    /// service's output takes at most twice this on disk).
    #[arg(long, default_value = "10MiB", value_parser = cutover_shared::size::parse)]
    slot_log_size: u64,
    /// How log lines are written to stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Lines for people; coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    cutover_shared::duration::parse(s).map(|d| d.std())
}

fn main() -> ExitCode {
    // First, before anything opens a file: sockets handed over by a previous run.
    let inherited = agent::handover::take_inherited();
    let args = Args::parse();
    let log_format = match &args.command {
        Cmd::Run(run) => run.log_format,
        Cmd::Join(_) => LogFormat::Text,
    };
    init_logging(log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match args.command {
            Cmd::Join(join_args) => join(join_args).await,
            Cmd::Run(run_args) => run(run_args, inherited).await,
        }
    });
    exit_code(result, log_format)
}

async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let token = agent::enroll::join_token(
        args.token,
        args.token_file.as_deref(),
        std::env::var(agent::enroll::JOIN_TOKEN_ENV).ok(),
    )?;
    let labels = cutover_shared::names::parse_labels(&args.labels)
        .map_err(|m| anyhow::anyhow!("--labels: {m}"))?;
    let name = agent::enroll::join(agent::enroll::JoinConfig {
        coordinator: args.coordinator,
        token,
        data_dir: args.data_dir,
        name: args.name,
        labels,
    })
    .await?;
    eprintln!("joined as {name}");
    Ok(())
}

async fn run(args: RunArgs, inherited: Vec<agent::handover::Inherited>) -> anyhow::Result<()> {
    if args.idle_timeout.is_zero() || args.tcp_idle_timeout.is_zero() {
        anyhow::bail!("--idle-timeout and --tcp-idle-timeout: must be more than 0s");
    }
    if args.max_connections == 0 {
        anyhow::bail!("--max-connections: must be at least 1");
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    agent::run(run_config(args, inherited), shutdown).await
}

/// SIGTERM or SIGINT stops the agent (its slots are drained and stopped).
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    if let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("stopping");
        shutdown.cancel();
    }
}

fn run_config(args: RunArgs, inherited: Vec<agent::handover::Inherited>) -> agent::RunConfig {
    agent::RunConfig {
        data_dir: args.data_dir,
        service_address: args.service_address,
        trusted_keys: args.trusted_keys,
        http: args.http,
        inherited,
        handover_drain: args.handover_drain,
        limits: agent::artifact::Limits {
            max_artifact_bytes: args.max_artifact_size,
            max_unpacked_bytes: args.max_unpacked_size,
            read_timeout: args.fetch_stall_timeout,
            ..Default::default()
        },
        service_user: args.service_user,
        slot_ports: args
            .slot_ports
            .unwrap_or_else(agent::ports::PortRange::default_for_host),
        listen_limits: agent::proxy::Limits {
            listen: cutover_proto::listen::Limits {
                max_connections: args.max_connections,
                idle_timeout: args.idle_timeout,
            },
            tcp_idle_timeout: args.tcp_idle_timeout,
        },
        slot_log_size: args.slot_log_size,
    }
}

/// The process's exit status; an error is printed as the one line that says why.
fn exit_code(result: anyhow::Result<()>, log_format: LogFormat) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Already logged, as the one line that says why.
        Err(e) if e.downcast_ref::<agent::HostRevoked>().is_some() => {
            ExitCode::from(agent::EXIT_REVOKED)
        }
        Err(e) => {
            let line = cutover_shared::errors::shorten(&format!("{e:#}"));
            if log_format == LogFormat::Json {
                tracing::error!(error = %line, "agent stopped");
            } else {
                eprintln!("error: {line}");
            }
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_argument_has_a_help_line() {
        fn check(cmd: &clap::Command, path: &str) {
            for a in cmd.get_arguments() {
                assert!(
                    a.get_help()
                        .is_some_and(|h| !h.to_string().trim().is_empty()),
                    "{path} --{} has no help",
                    a.get_id()
                );
            }
            for s in cmd.get_subcommands() {
                check(s, &format!("{path} {}", s.get_name()));
            }
        }
        let mut cmd = Args::command();
        cmd.build();
        check(&cmd, "cutover-agent");
    }
}
