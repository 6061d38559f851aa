//! The release manager's CLI: every `cutover` subcommand except `serve`. Data goes to
//! stdout (text or `--output json`), progress and errors to stderr; exit codes follow
//! the product contract ([`failure`]).
//!
//! One module per command family, each with its arguments and what it does:
//! [`deploy`] (deploy, rollback, contract, the manual controls, status; [`dry_run`] prints what a
//! deployment would do), [`follow`] (following a deployment to its end, shown by
//! [`live`] on a terminal and [`plain`] in logs), [`hosts`], [`tokens`], [`reports`]
//! (history, show, stats), [`artifact`] (signing keys and signatures), [`plan`]
//! (validate, diff), [`service`] (the service lifecycle), [`releases`] (what the hosts
//! keep), [`logs`] (what the slots wrote), [`admin`] (personal credentials) and [`lock`]
//! (deploy locks). [`conn`] reaches the coordinator, [`out`] is where every line goes
//! and [`table`] lays text out.

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod admin;
pub mod artifact;
pub mod conn;
pub mod deploy;
pub mod dry_run;
pub mod failure;
pub mod follow;
pub mod hosts;
pub mod live;
pub mod lock;
pub mod logs;
pub mod out;
pub mod plain;
pub mod plan;
pub mod releases;
pub mod reports;
pub mod service;
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
    /// Go back to the previous release on every host (an instant switch to its warm
    /// slot), or with --to to any release that was live before (a health-gated
    /// deployment of the plan it was deployed with).
    Rollback {
        /// The service to roll back.
        service: String,
        /// Go back to this release instead of the previous one (see `cutover releases`).
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        /// Follow progress on stderr until the rollback ends.
        #[arg(long)]
        wait: bool,
    },
    /// The releases kept on the hosts: version, sha256, deployed when and by whom,
    /// live/previous, and on which hosts.
    Releases {
        /// The service.
        service: String,
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
    /// Personal credentials: who may do what, and who did it.
    Admin {
        #[command(subcommand)]
        command: admin::AdminCmd,
    },
    /// Block new deployments and rollbacks of a service, saying why.
    Lock(lock::LockArgs),
    /// Lift a service's lock.
    Unlock {
        /// The locked service.
        service: String,
    },
    /// What the slots wrote, from every host (or a deployment's hook and database
    /// command output); -f follows until Ctrl-C.
    Logs(logs::LogsArgs),
    /// Services between deployments: list, restart, stop, start, remove.
    Service {
        #[command(subcommand)]
        command: service::ServiceCmd,
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
            Command::Rollback { service, to, wait } => {
                deploy::rollback(conn, service, to, wait, out).await
            }
            Command::Releases { service } => releases::run(conn, service, out).await,
            Command::Contract { service, wait } => deploy::contract(conn, service, wait, out).await,
            Command::Watch { id } => follow::watch(conn, id, out).await,
            Command::History(args) => reports::history(conn, args, out).await,
            Command::Show { id } => reports::show(conn, id, out).await,
            Command::Stats(args) => reports::stats(conn, args, out).await,
            Command::Artifact { command } => artifact::run(command, out),
            Command::Plan { command } => plan::run(command, conn, out).await,
            Command::Service { command } => service::run(command, conn, out).await,
            Command::Logs(args) => logs::run(conn, args, out).await,
            Command::Admin { command } => admin::run(command, conn, out).await,
            Command::Lock(args) => lock::lock(conn, args, out).await,
            Command::Unlock { service } => lock::unlock(conn, service, out).await,
        }
    }
}
