//! The cutover host agent. [`enroll::join`] enrolls the host once; [`run`] keeps the
//! host's services converged on what the coordinator wants: releases in blue and green
//! slots, health checks, and the proxy that splits traffic between them.
//!
//! This file only wires the modules together: `run` is the agent's start-up as a list
//! of named steps, then the link to the coordinator until shutdown.

pub mod artifact;
pub mod data_dir;
pub mod database;
pub mod enroll;
pub mod env_file;
pub mod handover;
pub mod health;
pub mod http;
pub mod identity;
pub mod link;
pub mod logs;
pub mod os;
pub mod ports;
pub mod proxy;
pub mod scrape;
pub mod service;
pub mod slot;
pub mod spawn;
pub mod store;
pub mod trust;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use link::HostRevoked;

/// The exit status of an agent whose host was removed from the coordinator (or enrolled
/// again elsewhere): EX_CONFIG. The systemd unit does not restart on it
/// (`RestartPreventExitStatus=78`); only a new join brings the host back.
pub const EXIT_REVOKED: u8 = 78;

/// How long slot processes left by an earlier run get between SIGTERM and SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(10);
/// How long shutdown waits for the slots to drain and stop.
const SLOTS_STOP_WITHIN: Duration = Duration::from_secs(60);

/// What `cutover-agent run` was asked.
pub struct RunConfig {
    /// The folder `join` filled: identity, store, releases, logs.
    pub data_dir: PathBuf,
    /// The address services' public ports are bound on (IPv4).
    pub service_address: IpAddr,
    /// ed25519 public keys (hex) from `--trusted-key`; `DATA/trusted_keys` adds more.
    pub trusted_keys: Vec<String>,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub http: Option<std::net::SocketAddr>,
    /// Public ports handed over by the previous run ([`handover::take_inherited`]).
    pub inherited: Vec<handover::Inherited>,
    /// How long a restart (SIGHUP) waits for client connections to end.
    pub handover_drain: Duration,
    /// Artifact size limits and download timeouts.
    pub limits: artifact::Limits,
    /// The user slot processes run as when the plan names none (agent running as root).
    pub service_user: Option<String>,
    /// Where slot processes' private ports come from (`--slot-ports`).
    pub slot_ports: ports::PortRange,
    /// Connection cap and idle timeouts of every listener: the public ports and `--http`.
    pub listen_limits: proxy::Limits,
    /// Size past which a slot's log file is rotated (`--slot-log-size`).
    pub slot_log_size: u64,
}

/// Runs the agent until `shutdown`: restores the services it ran before (adopting the
/// slot processes and public ports a previous run left), then follows the coordinator.
/// On shutdown the slot processes are stopped; on SIGHUP the agent re-executes itself
/// and keeps them ([`handover`]).
pub async fn run(mut cfg: RunConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    cutover_proto::tls::install_default_provider();
    let exe = handover::Exe::current().context("find the agent's own executable")?;
    let inherited = std::mem::take(&mut cfg.inherited);
    let identity = identity::Identity::load(&cfg.data_dir)?;
    check_settings(&cfg)?;
    let store = Arc::new(
        store::Store::open(&data_dir::store_file(&cfg.data_dir)).context("open the agent store")?,
    );
    data_dir::secure(&cfg.data_dir)?;
    clear_earlier_run(&cfg.data_dir, &store).await;
    check_service_user(cfg.service_user.as_deref())?;
    let keys = trust::TrustedKeys::load(&cfg.trusted_keys, &cfg.data_dir)?;
    if !keys.is_empty() {
        tracing::info!(
            keys = keys.len(),
            "only artifacts signed by a trusted key will run"
        );
    }

    let tasks = TaskTracker::new();
    let services = Arc::new(service::Services::new(
        settings(&cfg, keys),
        store,
        shutdown.clone(),
        tasks.clone(),
    ));
    services.inherit(inherited);
    tasks.spawn(services.clone().run_rerouter(shutdown.clone()));
    if let Some(addr) = cfg.http {
        serve_http(addr, &identity.name, &cfg, &services, &shutdown, &tasks).await?;
    }
    let restored = services.restore().await?;
    restart_on_sighup(&services, exe, cfg.handover_drain, &shutdown, &tasks)?;
    tracing::info!(
        host = identity.name,
        coordinator = identity.coordinator,
        restored,
        "agent running"
    );

    let linked = link::run(cfg.data_dir.clone(), services, shutdown.clone()).await;
    if let Err(revoked) = &linked {
        // A host the coordinator no longer knows must not keep serving releases nobody
        // can roll back: stop the slots as on SIGTERM, and exit for good.
        tracing::error!(host = identity.name, "{revoked}");
        shutdown.cancel();
    }
    tasks.close();
    if tokio::time::timeout(SLOTS_STOP_WITHIN, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some slots did not stop within 60s");
    }
    tracing::info!("agent stopped");
    linked.map_err(anyhow::Error::from)
}

/// Refuses settings the agent cannot serve with.
fn check_settings(cfg: &RunConfig) -> anyhow::Result<()> {
    if cfg.service_address.is_ipv6() {
        bail!(
            "--service-address {}: only IPv4 addresses are supported",
            cfg.service_address
        );
    }
    Ok(())
}

/// `--service-user` must name a user of this host.
fn check_service_user(name: Option<&str>) -> anyhow::Result<()> {
    let Some(name) = name else { return Ok(()) };
    match nix::unistd::User::from_name(name) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => bail!("--service-user {name}: no such user on this host"),
        Err(e) => bail!("--service-user {name}: {e}"),
    }
}

/// Work an earlier run did not finish is not resumed: partial downloads and unpacks
/// only take space, and a slot process no desired spec wants is stopped, so no orphan
/// keeps a port. The ones still wanted are adopted by their slots later. A database
/// task that was running is reported interrupted, never started again.
async fn clear_earlier_run(data: &Path, store: &store::Store) {
    let leftovers = artifact::remove_leftovers(&data_dir::cache(data), &data_dir::releases(data));
    if leftovers > 0 {
        tracing::info!(
            leftovers,
            "removed partial downloads and unpacks left by an earlier run"
        );
    }
    let claims = slot::adopt::Claim::all(&store.desired().unwrap_or_default());
    let reaped = slot::adopt::stop_unclaimed(store, &claims, LEFTOVER_GRACE).await;
    if reaped > 0 {
        tracing::warn!(
            reaped,
            "stopped slot processes left by an earlier agent run"
        );
    }
    let interrupted = database::recover(store, LEFTOVER_GRACE).await;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "database tasks were running when the agent stopped; reported interrupted"
        );
    }
}

/// How services run on this host, from the agent's configuration.
fn settings(cfg: &RunConfig, trusted_keys: trust::TrustedKeys) -> service::Settings {
    service::Settings {
        data_dir: cfg.data_dir.clone(),
        service_ip: cfg.service_address,
        trusted_keys: Arc::new(trusted_keys),
        limits: cfg.limits.clone(),
        service_user: cfg.service_user.clone(),
        slot_ports: cfg.slot_ports,
        proxy_limits: cfg.listen_limits,
        slot_log_size: cfg.slot_log_size,
    }
}

/// `--http`: `/metrics`, `/healthz`, `/sd/prometheus` and the slots' relayed metrics,
/// bound before the services are restored.
async fn serve_http(
    addr: std::net::SocketAddr,
    host: &str,
    cfg: &RunConfig,
    services: &Arc<service::Services>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind --http {addr}"))?;
    tracing::info!(%addr, "serving /metrics");
    let site = http::Site {
        host: host.to_string(),
        addr: listener.local_addr().unwrap_or(addr),
    };
    tasks.spawn(http::serve(
        listener,
        cfg.listen_limits.listen,
        services.clone(),
        site,
        shutdown.clone(),
    ));
    Ok(())
}

/// On SIGHUP the agent re-executes itself in place ([`handover`]); if that fails it
/// keeps running as it was.
fn restart_on_sighup(
    services: &Arc<service::Services>,
    exe: handover::Exe,
    drain: Duration,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listen for SIGHUP")?;
    let (services, stop) = (services.clone(), shutdown.clone());
    tasks.spawn(async move {
        while tokio::select! { _ = stop.cancelled() => None, s = hup.recv() => s }.is_some() {
            tracing::info!("SIGHUP: restarting in place, keeping ports and slots");
            let e = services.hand_over(&exe, drain).await;
            tracing::error!(error = e, "restart failed; this agent keeps running");
        }
    });
    Ok(())
}
