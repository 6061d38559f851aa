//! The release manager's CLI: every `cutover` subcommand except `serve`. Data goes to
//! stdout (text or `--output json`), progress and errors to stderr; exit codes follow
//! the product contract ([`failure`]).
//!
//! One module per command family, each with its arguments and what it does:
//! [`deploy`] (deploy, rollback, contract, the manual controls, status), [`follow`] (following a
//! deployment to its end, shown by [`live`] on a terminal and [`plain`] in logs),
//! [`hosts`], [`tokens`], [`reports`] (history, show, stats), [`artifact`] (signing keys
//! and signatures) and [`plan`] (validate). [`conn`] reaches the coordinator, [`out`] is
//! where every line goes and [`table`] lays text out.

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod artifact;
pub mod conn;
pub mod deploy;
pub mod failure;
pub mod follow;
pub mod hosts;
pub mod live;
pub mod out;
pub mod plain;
pub mod plan;
pub mod reports;
pub mod table;
pub mod tokens;

use cutover_proto::v1::DeploymentCommand;

pub use conn::Conn;
pub use failure::{Failure, INTERRUPTED, Result};
pub use out::Output;

/// Every CLI subcommand; `main` adds `serve` in front of them.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Join tokens for new hosts.
    Token {
        #[command(subcommand)]
        command: tokens::TokenCmd,
    },
    /// List hosts, or remove one.
    Hosts {
        #[command(subcommand)]
        command: Option<hosts::HostsCmd>,
    },
    /// Start a deployment; prints its id on the first stdout line.
    Deploy(deploy::DeployArgs),
    /// Show one deployment (default: the latest).
    Status {
        /// Deployment id, e.g. d-000123 [default: the latest]
        id: Option<String>,
    },
    /// Pause a deployment.
    Pause {
        /// Deployment id, e.g. d-000123
        id: String,
    },
    /// Resume a paused deployment.
    Resume {
        /// Deployment id, e.g. d-000123
        id: String,
    },
    /// End a pause or skip the rest of the current hold.
    Promote {
        /// Deployment id, e.g. d-000123
        id: String,
    },
    /// Stop a deployment and roll it back.
    Abort {
        /// Deployment id, e.g. d-000123
        id: String,
    },
    /// Contract the live release's database change now: `contract_after = "manual"`,
    /// or again after a contract failed or stood still.
    Contract {
        /// The service whose change to contract.
        service: String,
        /// Wait until the contract has run; exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Go back to the previous release on every host.
    Rollback {
        /// The service to roll back.
        service: String,
        /// Follow progress on stderr until the rollback ends.
        #[arg(long)]
        wait: bool,
    },
    /// Follow a deployment until it ends: a live view on a terminal, plain lines
    /// otherwise (or with CUTOVER_PLAIN=1).
    Watch {
        /// Deployment id, e.g. d-000123 [default: the latest deployment in progress]
        id: Option<String>,
    },
    /// Past deployments, newest first.
    History(reports::HistoryArgs),
    /// One deployment's timeline; where it failed and why, first.
    Show {
        /// Deployment id, e.g. d-000123 [default: the latest]
        id: Option<String>,
    },
    /// Deployment frequency, change failure rate, time to restore, durations, lead
    /// time, and where failures happen.
    Stats(reports::StatsArgs),
    /// Signing keys and artifact signatures.
    Artifact {
        #[command(subcommand)]
        command: artifact::ArtifactCmd,
    },
    /// Plans.
    Plan {
        #[command(subcommand)]
        command: plan::PlanCmd,
    },
}

impl Command {
    /// Runs the command; its exit code, or how it failed.
    pub async fn run(self, conn: &Conn, out: Output) -> Result<i32> {
        use DeploymentCommand as C;
        match self {
            Command::Token { command } => tokens::run(command, conn, out).await,
            Command::Hosts { command } => hosts::run(command, conn, out).await,
            Command::Deploy(args) => deploy::deploy(conn, args, out).await,
            Command::Status { id } => deploy::status(conn, id, out).await,
            Command::Pause { id } => deploy::command(conn, id, C::Pause, out).await,
            Command::Resume { id } => deploy::command(conn, id, C::Resume, out).await,
            Command::Promote { id } => deploy::command(conn, id, C::Promote, out).await,
            Command::Abort { id } => deploy::command(conn, id, C::Abort, out).await,
            Command::Rollback { service, wait } => deploy::rollback(conn, service, wait, out).await,
            Command::Contract { service, wait } => deploy::contract(conn, service, wait, out).await,
            Command::Watch { id } => follow::watch(conn, id, out).await,
            Command::History(args) => reports::history(conn, args, out).await,
            Command::Show { id } => reports::show(conn, id, out).await,
            Command::Stats(args) => reports::stats(conn, args, out).await,
            Command::Artifact { command } => artifact::run(command, out),
            Command::Plan { command } => plan::run(command, out),
        }
    }
}
