//! `cutover serve`: its flags, and running the coordinator until shutdown — the data
//! dir (private to its owner), the CA and the store, the engine, the HTTP side and the
//! gRPC port — then stopping every task within a grace period.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::{Engine, Handle};
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::pki::Ca;
use crate::store::{FirstAdmin, Store};
use crate::{grpc, http, listener, pki, webhooks};

/// How long stopping waits for the tasks to end.
const GRACE: Duration = Duration::from_secs(10);

/// How log lines are written to stderr (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people; coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `cutover serve`'s flags.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Folder holding all of the coordinator's state: its database, its CA and the
    /// admin credentials (DIR/admin), made on first start.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// gRPC over mutual TLS, for agents and the CLI.
    #[arg(long, default_value = "0.0.0.0:7400", value_name = "ADDR")]
    listen: SocketAddr,
    /// Plain HTTP for /healthz, /metrics, the dashboard and its /api. They have no
    /// login: keep this on loopback, or behind a proxy that authenticates.
    #[arg(long, default_value = "127.0.0.1:7480", value_name = "ADDR")]
    http: SocketAddr,
    /// Extra DNS names or IPs for the server certificate (repeatable).
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    /// Validity of agent certificates; agents renew them when a third is left.
    #[arg(long, default_value = "90d", value_name = "DURATION")]
    cert_ttl: cutover_shared::Duration,
    /// POST a JSON event (with a Slack-compatible `text`) to this URL for every
    /// deployment start, step, pause, rollback and end (repeatable).
    #[arg(long = "webhook", value_name = "URL")]
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
    /// How log lines are written to stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl ServeArgs {
    /// The configuration these flags give, or the flag that is wrong and why.
    pub fn config(self) -> Result<ServeConfig, String> {
        if self.cert_ttl.is_zero() {
            return Err("--cert-ttl: must be more than 0s".into());
        }
        if self.idle_timeout.is_zero() {
            return Err("--idle-timeout: must be more than 0s".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections: must be at least 1".into());
        }
        Ok(ServeConfig {
            data_dir: self.data_dir,
            listen: self.listen,
            http: self.http,
            server_names: self.server_names,
            cert_ttl: self.cert_ttl.std(),
            webhooks: self.webhooks,
            limits: cutover_proto::listen::Limits {
                max_connections: self.max_connections,
                idle_timeout: self.idle_timeout.std(),
            },
        })
    }
}

/// What the coordinator runs with.
pub struct ServeConfig {
    /// Where its database, CA and admin credentials live.
    pub data_dir: PathBuf,
    /// The gRPC port, for agents and the CLI.
    pub listen: SocketAddr,
    /// The plain-HTTP port: health, metrics, the dashboard.
    pub http: SocketAddr,
    /// Extra names for the server certificate.
    pub server_names: Vec<String>,
    /// Validity of agent certificates; agents renew when a third of it is left.
    pub cert_ttl: Duration,
    /// URLs that receive deployment events (JSON, with retries).
    pub webhooks: Vec<String>,
    /// Connection cap and idle timeout of both listeners.
    pub limits: cutover_proto::listen::Limits,
}

/// Runs the coordinator until `shutdown` is cancelled.
pub async fn serve(cfg: ServeConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    cutover_proto::tls::install_default_provider();
    let (ca, store) = open_state(&cfg.data_dir)?;
    let tls = listener::Tls::new(
        ca.clone(),
        cfg.data_dir.clone(),
        cfg.server_names.clone(),
        cfg.listen,
    )
    .context("issue the server certificate")?;
    let clients = listener::ClientCheck::new(&ca).context("set up client certificate checks")?;
    let fleet = Arc::new(Fleet::default());
    let metrics = Arc::new(Metrics::default());
    let (engine, handle) = start_engine(&cfg, &store, &fleet, &metrics, &shutdown)?;
    let (listener, http_listener) = bind(&cfg).await?;

    let tasks = TaskTracker::new();
    // The engine's decisions are CPU work over whole deployments: on a thread of its
    // own, they never hold up the runtime's workers, which carry the sessions.
    let (runtime, cancel) = (tokio::runtime::Handle::current(), shutdown.clone());
    tasks.spawn_blocking(move || runtime.block_on(engine.run(cancel)));
    let sources = http::Sources {
        store: store.clone(),
        fleet: fleet.clone(),
        metrics,
    };
    tasks.spawn(http::serve(
        http_listener,
        cfg.limits,
        sources,
        shutdown.clone(),
    ));
    let api = grpc::Api(Arc::new(grpc::Shared {
        store,
        fleet,
        ca,
        clients,
        engine: handle,
        cancel: shutdown.clone(),
        cert_ttl: cfg.cert_ttl,
    }));
    // A connection costs a place under the cap from accept on: until its TLS handshake
    // ends (or times out), then for as long as the gRPC server keeps it.
    let incoming = tls.serve(listener, cfg.limits, shutdown.clone(), &tasks);
    let result = grpc::serve(api, incoming, shutdown.clone())
        .await
        .context("serve gRPC");
    stop(&shutdown, tasks).await;
    result
}

/// The data dir made private, the CA and the store, with the admin credentials known to
/// the store.
fn open_state(dir: &Path) -> anyhow::Result<(Arc<Ca>, Arc<Store>)> {
    private_dir(dir)?;
    let pki = pki::init_or_load(dir).context("set up the certificate authority")?;
    let store = Arc::new(Store::open(&dir.join("cutover.redb")).context("open the store")?);
    let admin_der = pki::admin_cert_der(dir)?;
    let first = store.first_admin(
        &cutover_proto::tls::fingerprint(&admin_der),
        pki::not_after_ms(&admin_der),
        cutover_shared::clock::now_ms(),
    )?;
    let path = dir.join("admin");
    if let FirstAdmin::Revoked { by, at_unix_ms } = first {
        // Revoking them once personal credentials exist is good practice, not a fault.
        tracing::info!(
            path = %path.display(),
            by,
            at = crate::views::rfc3339(at_unix_ms).unwrap_or_default(),
            "the first-start admin credentials are revoked; deleting client.crt and client.key there and restarting issues new ones"
        );
    } else if pki.admin_created.is_some() {
        tracing::info!(path = %path.display(), "admin credentials created");
    }
    tracing::info!(fingerprint = pki.ca.fingerprint, "CA ready");
    Ok((Arc::new(pki.ca), store))
}

/// Creates the data dir readable by its owner only (it holds the CA key and plans with
/// their secrets), or warns when an existing one is open to others.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
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

/// The engine and its handle, with the webhooks it sends events to.
fn start_engine(
    cfg: &ServeConfig,
    store: &Arc<Store>,
    fleet: &Arc<Fleet>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Engine, Handle)> {
    for url in &cfg.webhooks {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!("--webhook {url}: not an http:// or https:// URL");
        }
    }
    let hooks = webhooks::Webhooks::start(&cfg.webhooks, shutdown);
    Ok(Engine::new(
        store.clone(),
        fleet.clone(),
        hooks,
        metrics.clone(),
    )?)
}

/// The gRPC and HTTP listeners; a warning when the HTTP side (no login) is not on
/// loopback.
async fn bind(cfg: &ServeConfig) -> anyhow::Result<(TcpListener, TcpListener)> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("bind --listen {}", cfg.listen))?;
    let http_listener = TcpListener::bind(cfg.http)
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
    Ok((listener, http_listener))
}

/// Cancels everything and waits up to [`GRACE`] for the tasks to end.
async fn stop(shutdown: &CancellationToken, tasks: TaskTracker) {
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(GRACE, tasks.wait()).await.is_err() {
        tracing::warn!("some tasks did not stop within 10s");
    }
    tracing::info!("coordinator stopped");
}
