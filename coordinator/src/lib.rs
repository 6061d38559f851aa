//! The cutover coordinator: plans deployments and streams desired state to the agents
//! over mutual TLS. `cutover serve` runs [`serve`]; the rest of the `cutover` binary is
//! the release manager's CLI in [`cli`].

pub mod analysis;
pub mod cli;
pub mod engine;
pub mod fleet;
pub mod grpc;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod queries;
pub mod report;
pub mod rollout;
pub mod session;
pub mod store;
pub mod timeline;
pub mod tokens;
pub mod views;
pub mod webhooks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// Creates the data dir readable by its owner only (it holds the CA key and plans with
/// their secrets), or warns when an existing one is open to others.
fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create data dir {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("read data dir {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "the data dir is open to other users; it holds the CA key and secrets: chmod 700 it"
        );
    }
    Ok(())
}

pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub http: SocketAddr,
    pub server_names: Vec<String>,
    /// Validity of agent certificates; agents renew when a third of it is left.
    pub cert_ttl: std::time::Duration,
    /// URLs that receive deployment events (JSON, with retries).
    pub webhooks: Vec<String>,
    /// Connection cap and idle timeout of both listeners.
    pub limits: cutover_proto::listen::Limits,
}

/// Runs the coordinator until `shutdown` is cancelled.
pub async fn serve(cfg: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    cutover_proto::tls::install_default_provider();
    private_dir(&cfg.data_dir)?;

    let pki = pki::init_or_load(&cfg.data_dir).context("set up the certificate authority")?;
    let store =
        Arc::new(store::Store::open(&cfg.data_dir.join("cutover.redb")).context("open the store")?);
    let admin_der = pki::admin_cert_der(&cfg.data_dir)?;
    store.put_identity(
        &cutover_proto::tls::fingerprint(&admin_der),
        &model::Identity::Admin,
    )?;
    if pki.admin_created.is_some() {
        tracing::info!(path = %cfg.data_dir.join("admin").display(), "admin credentials created");
    }
    tracing::info!(fingerprint = pki.ca.fingerprint, "CA ready");
    let ca = Arc::new(pki.ca);
    let tls = listener::Tls::new(
        ca.clone(),
        cfg.data_dir.clone(),
        cfg.server_names.clone(),
        cfg.listen,
    )
    .context("issue the server certificate")?;
    let clients = listener::ClientCheck::new(&ca).context("set up client certificate checks")?;

    let fleet = Arc::new(fleet::Fleet::default());
    for url in &cfg.webhooks {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!("--webhook {url}: not an http:// or https:// URL");
        }
    }
    let hooks = webhooks::Webhooks::start(&cfg.webhooks, &shutdown);
    let metrics = Arc::new(metrics::Metrics::default());
    let (engine, handle) =
        engine::Engine::new(store.clone(), fleet.clone(), hooks, metrics.clone())?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("bind --listen {}", cfg.listen))?;
    let http_listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .with_context(|| format!("bind --http {}", cfg.http))?;
    tracing::info!(listen = %cfg.listen, http = %cfg.http, "coordinator listening");
    if !cfg.http.ip().is_loopback() {
        tracing::warn!(
            http = %cfg.http,
            "the dashboard and /api have no login: anyone who reaches this address reads \
             the fleet and every deployment; keep --http on 127.0.0.1 or put a proxy that \
             authenticates in front"
        );
    }

    let shared = Arc::new(grpc::Shared {
        store: store.clone(),
        fleet: fleet.clone(),
        ca,
        clients,
        engine: handle,
        cancel: shutdown.clone(),
        cert_ttl: cfg.cert_ttl,
    });
    let api = grpc::Api(shared);

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(engine.run(shutdown.clone()));
    tasks.spawn(http::serve(
        http_listener,
        cfg.limits,
        store.clone(),
        fleet.clone(),
        metrics,
        shutdown.clone(),
    ));

    // A connection costs a place under the cap from accept on: until its TLS handshake
    // ends (or times out), then for as long as the gRPC server keeps it.
    let incoming = tls.serve(listener, cfg.limits, shutdown.clone(), &tasks);
    let result = grpc::serve(api, incoming, shutdown.clone())
        .await
        .context("serve gRPC");
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(std::time::Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 10s");
    }
    tracing::info!("coordinator stopped");
    result
}
