//! The cutover host agent. `join` enrolls the host once; `run` keeps the host's services
//! converged on what the coordinator wants: releases in blue and green slots, health
//! checks, and the proxy that splits traffic between them.

pub mod artifact;
pub mod handover;
pub mod health;
pub mod http;
pub mod link;
pub mod os;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod service;
pub mod spawn;
pub mod store;
pub mod trust;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use cutover_proto::v1::{JoinRequest, enroll_client::EnrollClient};
use cutover_shared::token::Token;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The exit status of an agent whose host was removed from the coordinator (or enrolled
/// again elsewhere): EX_CONFIG. The systemd unit does not restart on it
/// (`RestartPreventExitStatus=78`); only a new join brings the host back.
pub const EXIT_REVOKED: u8 = 78;

/// The coordinator revoked this host's certificate; its words say why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostRevoked(pub String);

/// Where `join` may find the token besides `--token` (which `ps` shows to everyone).
pub const JOIN_TOKEN_ENV: &str = "CUTOVER_JOIN_TOKEN";

/// The join token from exactly one of `--token`, `--token-file` and the environment
/// variable [`JOIN_TOKEN_ENV`] (an empty value counts as unset), checked for form.
pub fn join_token(
    flag: Option<String>,
    file: Option<&Path>,
    env: Option<String>,
) -> anyhow::Result<String> {
    let env = env.filter(|v| !v.trim().is_empty());
    let given: Vec<&str> = [
        flag.is_some().then_some("--token"),
        file.is_some().then_some("--token-file"),
        env.is_some().then_some(JOIN_TOKEN_ENV),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.len() > 1 {
        bail!(
            "the join token is given more than once ({}): give exactly one of --token-file, {JOIN_TOKEN_ENV} and --token",
            given.join(", ")
        );
    }
    let (source, text) = match (flag, file, env) {
        (Some(t), _, _) => ("--token".to_string(), t),
        (_, Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read --token-file {}", path.display()))?;
            (format!("--token-file {}", path.display()), text)
        }
        (_, _, Some(t)) => (JOIN_TOKEN_ENV.to_string(), t),
        _ => bail!(
            "no join token: pass --token-file PATH or set {JOIN_TOKEN_ENV} (or pass --token, which other users see in `ps`)"
        ),
    };
    Token::parse(&text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    Ok(text.trim().to_string())
}

/// What `join` stores in `DATA/agent.json`.
#[derive(Debug, Serialize, Deserialize)]
struct AgentFile {
    name: String,
    coordinator: String,
    labels: BTreeMap<String, String>,
    /// Validity of the current certificate (unix ms); 0 when unknown.
    #[serde(default)]
    cert_issued_unix_ms: u64,
    #[serde(default)]
    cert_not_after_unix_ms: u64,
}

/// The host's enrolment: who it is and how to reach the coordinator.
pub struct Identity {
    pub name: String,
    pub coordinator: String,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub cert_issued_unix_ms: u64,
    pub cert_not_after_unix_ms: u64,
}

impl Identity {
    /// True when less than a third of the certificate's lifetime is left.
    pub fn renewal_due(&self, now_ms: u64) -> bool {
        let (from, to) = (self.cert_issued_unix_ms, self.cert_not_after_unix_ms);
        to > from && now_ms >= to - (to - from) / 3
    }
}

/// A fresh key and a certificate request for `name`: (key PEM, CSR PEM).
fn key_and_csr(name: &str) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate().context("generate key")?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).context("certificate request")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    let csr = params
        .serialize_request(&key)
        .context("certificate request")?;
    Ok((
        key.serialize_pem(),
        csr.pem().context("encode certificate request")?,
    ))
}

/// Replaces the stored key and certificate after a renewal.
pub fn store_renewal(
    data_dir: &Path,
    key_pem: &str,
    cert_pem: &str,
    not_after_unix_ms: u64,
) -> anyhow::Result<()> {
    let agent = data_dir.join("agent.json");
    let mut file: AgentFile = serde_json::from_slice(&std::fs::read(&agent)?)?;
    let id = data_dir.join("identity");
    // Key first: a crash between the two writes leaves a key whose certificate is still
    // the old one, which the next renewal replaces; never a certificate without its key.
    write_private(&id.join("key.pem.next"), key_pem.as_bytes())?;
    write_private(&id.join("cert.pem.next"), cert_pem.as_bytes())?;
    std::fs::rename(id.join("key.pem.next"), id.join("key.pem"))?;
    std::fs::rename(id.join("cert.pem.next"), id.join("cert.pem"))?;
    file.cert_issued_unix_ms = cutover_shared::clock::now_ms();
    file.cert_not_after_unix_ms = not_after_unix_ms;
    write_private(&agent, &serde_json::to_vec_pretty(&file)?)?;
    Ok(())
}

/// Renews the certificate over an open channel.
pub async fn renew(
    data_dir: &Path,
    identity: &Identity,
    channel: tonic::transport::Channel,
) -> anyhow::Result<()> {
    let (key_pem, csr_pem) = key_and_csr(&identity.name)?;
    let resp = cutover_proto::v1::agent_link_client::AgentLinkClient::new(channel)
        .renew(cutover_proto::v1::RenewRequest { csr_pem })
        .await
        .map_err(|s| anyhow::anyhow!("renew certificate: {}", s.message()))?
        .into_inner();
    store_renewal(
        data_dir,
        &key_pem,
        &resp.certificate_pem,
        resp.not_after_unix_ms,
    )
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

pub struct JoinConfig {
    pub coordinator: String,
    pub token: String,
    pub data_dir: PathBuf,
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// Enrolls this host: checks the coordinator's CA against the token's fingerprint before
/// sending anything, makes a key locally, and stores the signed certificate.
pub async fn join(cfg: JoinConfig) -> anyhow::Result<String> {
    cutover_proto::tls::install_default_provider();
    let token = Token::parse(&cfg.token)?;
    let name = match cfg.name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .context("read the machine's hostname (or pass --name)")?
            .to_string_lossy()
            .to_lowercase(),
    };
    cutover_shared::names::check_name("host", &name).map_err(anyhow::Error::msg)?;
    // Other users may pass through the data dir to their release, never list it.
    spawn::ensure_dir(&cfg.data_dir, 0o711)?;

    let (key_pem, csr_pem) = key_and_csr(&name)?;

    let tls = cutover_proto::tls::pinned_config(&token.ca_fingerprint)?;
    let channel = cutover_proto::tls::connect(&cfg.coordinator, tls)
        .await
        .map_err(|e| anyhow::anyhow!("{}", cutover_shared::errors::chain(&e)))?;
    let resp = EnrollClient::new(channel)
        .join(JoinRequest {
            token: token.encode(),
            name: name.clone(),
            labels: cfg.labels.into_iter().collect(),
            csr_pem,
        })
        .await
        .map_err(|s| anyhow::anyhow!("coordinator refused to enroll this host: {}", s.message()))?
        .into_inner();

    let id = cfg.data_dir.join("identity");
    std::fs::create_dir_all(&id).with_context(|| format!("create {}", id.display()))?;
    write_private(&id.join("key.pem"), key_pem.as_bytes())?;
    write_private(&id.join("cert.pem"), resp.certificate_pem.as_bytes())?;
    write_private(&id.join("ca.pem"), resp.ca_pem.as_bytes())?;
    let file = AgentFile {
        name: resp.name.clone(),
        coordinator: cfg.coordinator,
        labels: resp.labels.into_iter().collect(),
        cert_issued_unix_ms: cutover_shared::clock::now_ms(),
        cert_not_after_unix_ms: resp.not_after_unix_ms,
    };
    write_private(
        &cfg.data_dir.join("agent.json"),
        &serde_json::to_vec_pretty(&file)?,
    )?;
    Ok(resp.name)
}

pub fn load_identity(data_dir: &Path) -> anyhow::Result<Identity> {
    let agent = data_dir.join("agent.json");
    let raw = std::fs::read(&agent)
        .with_context(|| format!("read {} (run `cutover-agent join` first)", agent.display()))?;
    let file: AgentFile =
        serde_json::from_slice(&raw).with_context(|| format!("parse {}", agent.display()))?;
    let id = data_dir.join("identity");
    let read = |n: &str| {
        std::fs::read(id.join(n)).with_context(|| format!("read {}", id.join(n).display()))
    };
    Ok(Identity {
        name: file.name,
        coordinator: file.coordinator,
        ca_pem: read("ca.pem")?,
        cert_pem: read("cert.pem")?,
        key_pem: read("key.pem")?,
        cert_issued_unix_ms: file.cert_issued_unix_ms,
        cert_not_after_unix_ms: file.cert_not_after_unix_ms,
    })
}

pub struct RunConfig {
    pub data_dir: PathBuf,
    pub service_address: IpAddr,
    /// ed25519 public keys (hex) from `--trusted-key`; `DATA/trusted_keys` adds more.
    pub trusted_keys: Vec<String>,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub http: Option<std::net::SocketAddr>,
    /// Public ports handed over by the previous run ([`handover::take_inherited`]).
    pub inherited: Vec<handover::Inherited>,
    /// How long a restart (SIGHUP) waits for client connections to end.
    pub handover_drain: std::time::Duration,
    /// Artifact size limits and download timeouts.
    pub limits: artifact::Limits,
    /// The user slot processes run as when the plan names none (agent running as root).
    pub service_user: Option<String>,
    /// Where slot processes' private ports come from (`--slot-ports`).
    pub slot_ports: ports::PortRange,
    /// Connection cap and idle timeouts of every listener: the public ports and `--http`.
    pub listen_limits: proxy::Limits,
}

/// Who may read what in the data dir. Service processes run as other users and must
/// reach their release (`releases/`) and state (`state/<service>`) directories, and
/// nothing else: the data dir and `releases/` let them through without listing, while
/// the database, identity, logs and download cache are the agent's alone.
fn secure_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (dir, mode) in [
        (data_dir.to_path_buf(), 0o711),
        (data_dir.join("releases"), 0o711),
        (data_dir.join("identity"), 0o700),
        (data_dir.join("logs"), 0o700),
        (data_dir.join("cache"), 0o700),
    ] {
        spawn::ensure_dir(&dir, mode)?;
    }
    for file in ["agent.redb", "agent.json"] {
        let path = data_dir.join(file);
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("set permissions of {}", path.display()))?;
        }
    }
    Ok(())
}

/// Runs the agent until `shutdown`: restores the services it ran before (adopting the
/// slot processes and public ports a previous run left), then follows the coordinator.
/// On shutdown the slot processes are stopped; on SIGHUP the agent re-executes itself
/// and keeps them ([`handover`]).
pub async fn run(mut cfg: RunConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    cutover_proto::tls::install_default_provider();
    let exe = handover::Exe::current().context("find the agent's own executable")?;
    let inherited = std::mem::take(&mut cfg.inherited);
    let identity = load_identity(&cfg.data_dir)?;
    if cfg.service_address.is_ipv6() {
        bail!(
            "--service-address {}: only IPv4 addresses are supported",
            cfg.service_address
        );
    }
    let store = Arc::new(
        store::Store::open(&cfg.data_dir.join("agent.redb")).context("open the agent store")?,
    );
    secure_data_dir(&cfg.data_dir)?;
    // Work an earlier run did not finish (killed mid-download or mid-unpack) is not
    // resumed: its leftovers only take space.
    let leftovers =
        artifact::remove_leftovers(&cfg.data_dir.join("cache"), &cfg.data_dir.join("releases"));
    if leftovers > 0 {
        tracing::info!(
            leftovers,
            "removed partial downloads and unpacks left by an earlier run"
        );
    }
    // Slot processes of an earlier run that still run a desired spec are adopted by
    // their slots below; any other leftover is stopped, so no orphan keeps a port.
    let wanted: Vec<(String, String, String)> = store
        .desired()
        .unwrap_or_default()
        .iter()
        .flat_map(|d| {
            [("blue", d.blue.as_ref()), ("green", d.green.as_ref())]
                .into_iter()
                .filter_map(|(slot, spec)| {
                    Some((
                        d.service.clone(),
                        slot.to_string(),
                        process::spec_digest(spec?),
                    ))
                })
        })
        .collect();
    let reaped = process::reap_orphans(
        &store,
        |r| {
            r.port != 0
                && wanted
                    .iter()
                    .any(|(s, sl, dg)| *s == r.service && *sl == r.slot && *dg == r.spec_digest)
        },
        std::time::Duration::from_secs(10),
    )
    .await;
    if reaped > 0 {
        tracing::warn!(
            reaped,
            "stopped slot processes left by an earlier agent run"
        );
    }
    if let Some(name) = &cfg.service_user {
        match nix::unistd::User::from_name(name) {
            Ok(Some(_)) => {}
            Ok(None) => bail!("--service-user {name}: no such user on this host"),
            Err(e) => bail!("--service-user {name}: {e}"),
        }
    }
    let keys = trust::TrustedKeys::load(&cfg.trusted_keys, &cfg.data_dir)?;
    if !keys.is_empty() {
        tracing::info!(
            keys = keys.len(),
            "only artifacts signed by a trusted key will run"
        );
    }
    let tasks = tokio_util::task::TaskTracker::new();
    let services = Arc::new(service::Services::new(
        service::Settings {
            data_dir: cfg.data_dir.clone(),
            service_ip: cfg.service_address,
            trusted_keys: keys,
            limits: cfg.limits.clone(),
            service_user: cfg.service_user.clone(),
            slot_ports: cfg.slot_ports,
            proxy_limits: cfg.listen_limits,
        },
        store,
        shutdown.clone(),
        tasks.clone(),
    ));
    services.inherit(inherited);
    tasks.spawn(services.clone().run_rerouter(shutdown.clone()));
    if let Some(addr) = cfg.http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind --http {addr}"))?;
        tracing::info!(%addr, "serving /metrics");
        let limits = cfg.listen_limits.listen;
        tasks.spawn(http::serve(
            listener,
            limits,
            services.clone(),
            shutdown.clone(),
        ));
    }
    let restored = services.restore().await?;
    {
        let (services, drain) = (services.clone(), cfg.handover_drain);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listen for SIGHUP")?;
        let stop = shutdown.clone();
        tasks.spawn(async move {
            while tokio::select! { _ = stop.cancelled() => None, s = hup.recv() => s }.is_some() {
                tracing::info!("SIGHUP: restarting in place, keeping ports and slots");
                let e = services.hand_over(&exe, drain).await;
                tracing::error!(error = e, "restart failed; this agent keeps running");
            }
        });
    }
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
    if tokio::time::timeout(std::time::Duration::from_secs(60), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some slots did not stop within 60s");
    }
    tracing::info!("agent stopped");
    linked.map_err(anyhow::Error::from)
}
