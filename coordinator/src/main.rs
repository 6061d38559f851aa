//! `cutover`: the coordinator (`cutover serve`) and the release manager's CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use coordinator::cli::{self, Conn, Failure, Output};
use cutover_proto::v1::DeploymentCommand;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "cutover",
    version,
    about = "Progressive, self-healing deployments for fleets of plain hosts"
)]
struct Args {
    /// Coordinator address for CLI commands.
    #[arg(
        long,
        global = true,
        env = "CUTOVER_COORDINATOR",
        default_value = "127.0.0.1:7400"
    )]
    coordinator: String,
    /// Folder with ca.crt, client.crt and client.key [default: ~/.config/cutover]
    #[arg(long, global = true, env = "CUTOVER_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Output format for data on stdout.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:7400")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:7480")]
        http: SocketAddr,
        /// Extra DNS names or IPs for the server certificate (repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Validity of agent certificates; agents renew them when a third is left.
        #[arg(long, default_value = "90d")]
        cert_ttl: cutover_shared::Duration,
        /// POST a JSON event (with a Slack-compatible `text`) to this URL for every
        /// deployment start, step, pause, rollback and end (repeatable).
        #[arg(long = "webhook")]
        webhooks: Vec<String>,
        /// Connections each listener (--listen, --http) keeps open at once; more wait
        /// in the kernel's accept queue.
        #[arg(long, default_value_t = cutover_proto::listen::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// An --http connection that has not sent a complete request head this long
        /// after it was opened, or after its previous response, is closed (header-read
        /// and keep-alive idle timeout); a --listen connection gets this long, 10s at
        /// most, to finish its TLS handshake.
        #[arg(long, default_value = "75s")]
        idle_timeout: cutover_shared::Duration,
    },
    /// Join tokens for new hosts.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// List hosts, or remove one.
    Hosts {
        #[command(subcommand)]
        command: Option<HostsCmd>,
    },
    /// Start a deployment; prints its id on the first stdout line.
    Deploy {
        plan: PathBuf,
        #[arg(long)]
        release: Option<String>,
        #[arg(long)]
        artifact: Option<String>,
        #[arg(long)]
        sha256: Option<String>,
        /// Follow progress on stderr until the deployment ends.
        #[arg(long)]
        wait: bool,
    },
    /// Show one deployment (default: the latest).
    Status { id: Option<String> },
    /// Pause a deployment.
    Pause { id: String },
    /// Resume a paused deployment.
    Resume { id: String },
    /// End a pause or skip the rest of the current hold.
    Promote { id: String },
    /// Stop a deployment and roll it back.
    Abort { id: String },
    /// Go back to the previous release on every host.
    Rollback {
        service: String,
        #[arg(long)]
        wait: bool,
    },
    /// Follow a deployment until it ends: a live view on a terminal, plain lines
    /// otherwise (or with CUTOVER_PLAIN=1).
    Watch { id: String },
    /// Past deployments, newest first.
    History {
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only deployments started within this long, e.g. 7d.
        #[arg(long)]
        since: Option<String>,
    },
    /// One deployment's timeline; where it failed and why, first.
    Show { id: Option<String> },
    /// Deployment frequency, change failure rate, time to restore, durations, lead
    /// time, and where failures happen.
    Stats {
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value = "30d")]
        since: String,
    },
    /// Signing keys and artifact signatures.
    Artifact {
        #[command(subcommand)]
        command: ArtifactCmd,
    },
    /// Plans.
    Plan {
        #[command(subcommand)]
        command: PlanCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a join token; prints it alone on stdout. A join under a name already
    /// enrolled is refused unless the token was made with --replace NAME.
    Create {
        /// The enrolled host's labels, as k=v,k2=v2; a join cannot change them.
        #[arg(long, default_value = "")]
        labels: String,
        #[arg(long, default_value = "1h")]
        ttl: cutover_shared::Duration,
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Enrol only a host of this name.
        #[arg(long)]
        name: Option<String>,
        /// Enrol a new machine as this enrolled host; the old one's certificate is revoked.
        #[arg(long, value_name = "NAME")]
        replace: Option<String>,
        /// Label keys `cutover-agent join --labels` may add, as k1,k2.
        #[arg(long, default_value = "")]
        allow_labels: String,
    },
    /// List join tokens (never their secrets).
    List,
    /// Revoke a join token by id.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum HostsCmd {
    /// Remove a host and revoke its certificate.
    Remove { name: String },
}

#[derive(Subcommand)]
enum ArtifactCmd {
    /// Make a signing key; prints its public key for the agents' --trusted-key.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an artifact; prints the signature for `[release] signature`.
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum PlanCmd {
    /// Check a plan offline.
    Validate { plan: PathBuf },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let serving = matches!(args.command, Cmd::Serve { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if serving { "info" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

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
    match runtime.block_on(run(args)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code as u8)
        }
    }
}

async fn run(args: Args) -> cli::Result<i32> {
    let credentials = args.credentials.clone().unwrap_or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".config/cutover")
    });
    let conn = Conn {
        coordinator: args.coordinator.clone(),
        credentials,
    };
    let out = args.output;
    match args.command {
        Cmd::Serve {
            data_dir,
            listen,
            http,
            server_names,
            cert_ttl,
            webhooks,
            max_connections,
            idle_timeout,
        } => {
            if cert_ttl.is_zero() {
                return Err(Failure::new(2, "--cert-ttl: must be more than 0s"));
            }
            if idle_timeout.is_zero() {
                return Err(Failure::new(2, "--idle-timeout: must be more than 0s"));
            }
            if max_connections == 0 {
                return Err(Failure::new(2, "--max-connections: must be at least 1"));
            }
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("stopping");
                signal.cancel();
            });
            coordinator::serve(
                coordinator::ServeConfig {
                    data_dir,
                    listen,
                    http,
                    server_names,
                    cert_ttl: cert_ttl.std(),
                    webhooks,
                    limits: cutover_proto::listen::Limits {
                        max_connections,
                        idle_timeout: idle_timeout.std(),
                    },
                },
                shutdown,
            )
            .await
            .map_err(|e| Failure::new(1, format!("{e:#}")))?;
            Ok(0)
        }
        Cmd::Token {
            command:
                TokenCmd::Create {
                    labels,
                    ttl,
                    uses,
                    name,
                    replace,
                    allow_labels,
                },
        } => {
            fn usage(flag: &'static str) -> impl Fn(String) -> Failure {
                move |m| Failure::new(2, format!("{flag}: {m}"))
            }
            let names = cutover_shared::names::check_name;
            let request = cli::NewToken {
                labels: cutover_shared::names::parse_labels(&labels).map_err(usage("--labels"))?,
                allow_labels: cutover_shared::names::parse_label_keys(&allow_labels)
                    .map_err(usage("--allow-labels"))?,
                name: name
                    .map(|n| names("host", &n).map(|()| n))
                    .transpose()
                    .map_err(usage("--name"))?,
                replace: replace
                    .map(|n| names("host", &n).map(|()| n))
                    .transpose()
                    .map_err(usage("--replace"))?,
                ttl,
                uses,
            };
            cli::token_create(&conn, request, out).await
        }
        Cmd::Token {
            command: TokenCmd::List,
        } => cli::token_list(&conn, out).await,
        Cmd::Token {
            command: TokenCmd::Revoke { id },
        } => cli::token_revoke(&conn, id, out).await,
        Cmd::Hosts { command: None } => cli::hosts(&conn, out).await,
        Cmd::Hosts {
            command: Some(HostsCmd::Remove { name }),
        } => cli::remove_host(&conn, name, out).await,
        Cmd::Deploy {
            plan,
            release,
            artifact,
            sha256,
            wait,
        } => {
            let p = cli::load_plan(&plan, release, artifact, sha256)?;
            cli::deploy(&conn, p, &plan, wait, out).await
        }
        Cmd::Status { id } => cli::status(&conn, id, out).await,
        Cmd::Pause { id } => cli::command(&conn, id, DeploymentCommand::Pause, out).await,
        Cmd::Resume { id } => cli::command(&conn, id, DeploymentCommand::Resume, out).await,
        Cmd::Promote { id } => cli::command(&conn, id, DeploymentCommand::Promote, out).await,
        Cmd::Abort { id } => cli::command(&conn, id, DeploymentCommand::Abort, out).await,
        Cmd::Rollback { service, wait } => cli::rollback(&conn, service, wait, out).await,
        Cmd::History {
            service,
            limit,
            since,
        } => cli::history(&conn, service, limit, since.as_deref(), out).await,
        Cmd::Show { id } => cli::show(&conn, id, out).await,
        Cmd::Stats { service, since } => cli::stats(&conn, service, &since, out).await,
        Cmd::Watch { id } => {
            let mut client = conn.client().await?;
            let d = cli::watch(&mut client, &id).await?;
            Ok(cli::finish(&mut client, &d, out).await)
        }
        Cmd::Artifact {
            command: ArtifactCmd::Keygen { out: path },
        } => cli::artifact_keygen(&path, out),
        Cmd::Artifact {
            command: ArtifactCmd::Sign { file, key },
        } => cli::artifact_sign(&file, &key, out),
        Cmd::Plan {
            command: PlanCmd::Validate { plan },
        } => cli::plan_validate(&plan, out),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
