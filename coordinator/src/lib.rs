//! The cutover coordinator: plans deployments and streams desired state to the agents
//! over mutual TLS. `cutover serve` runs [`serve`]; the rest of the `cutover` binary is
//! the release manager's CLI in [`cli`].

pub mod analysis;
pub mod cli;
pub mod engine;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod report;
pub mod rollout;
pub mod server;
pub mod store;
pub mod timeline;
pub mod tokens;
pub mod webhooks;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use cutover_proto::v1::{
    SlotPhase, agent_link_server::AgentLinkServer, control_server::ControlServer,
    enroll_server::EnrollServer,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity as TlsIdentity, Server, ServerTlsConfig};

/// Milliseconds since the Unix epoch, the coordinator's one clock for records.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The name a slot phase goes by in output.
pub fn phase_name(phase: i32) -> &'static str {
    match SlotPhase::try_from(phase).unwrap_or(SlotPhase::Empty) {
        SlotPhase::Empty => "empty",
        SlotPhase::Fetching => "fetching",
        SlotPhase::Unpacking => "unpacking",
        SlotPhase::Starting => "starting",
        SlotPhase::Healthy => "healthy",
        SlotPhase::Unhealthy => "unhealthy",
        SlotPhase::Failed => "failed",
        SlotPhase::Stopped => "stopped",
    }
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
}

/// Runs the coordinator until `shutdown` is cancelled.
/// The largest control request the coordinator reads: a deployment carries its whole
/// plan, which parsing caps at [`cutover_shared::plan::MAX_PLAN_BYTES`]; the room above
/// is for its re-encoding and the other fields.
const MAX_CONTROL_REQUEST: usize = 4 * cutover_shared::plan::MAX_PLAN_BYTES;

pub async fn serve(cfg: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    cutover_proto::tls::install_default_provider();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create data dir {}", cfg.data_dir.display()))?;

    let mut names = cfg.server_names.clone();
    names.push("localhost".into());
    names.push("127.0.0.1".into());
    if !cfg.listen.ip().is_unspecified() {
        names.push(cfg.listen.ip().to_string());
    }
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
    {
        names.push(h.to_string());
    }
    names.sort();
    names.dedup();
    let pki =
        pki::init_or_load(&cfg.data_dir, &names).context("set up the certificate authority")?;
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
    let tls = ServerTlsConfig::new()
        .identity(TlsIdentity::from_pem(
            &pki.server_chain_pem,
            &pki.server_key_pem,
        ))
        .client_ca_root(Certificate::from_pem(&pki.ca.cert_pem))
        .client_auth_optional(true)
        .timeout(std::time::Duration::from_secs(10));
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

    let shared = Arc::new(server::Shared {
        store: store.clone(),
        fleet: fleet.clone(),
        ca: pki.ca,
        engine: handle,
        cancel: shutdown.clone(),
        cert_ttl: cfg.cert_ttl,
    });
    let api = server::Api(shared);

    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(engine.run(shutdown.clone()));
    tasks.spawn(http::serve(
        http_listener,
        store.clone(),
        fleet.clone(),
        metrics,
        shutdown.clone(),
    ));

    let grpc = Server::builder()
        .tls_config(tls)
        .context("configure TLS")?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(EnrollServer::new(api.clone()))
        .add_service(AgentLinkServer::new(api.clone()))
        .add_service(ControlServer::new(api).max_decoding_message_size(MAX_CONTROL_REQUEST))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );
    let result = grpc.await.context("serve gRPC");
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
