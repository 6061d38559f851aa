//! Enrolling a host (`cutover-agent join`): where the join token comes from, and the
//! join itself — the coordinator's CA checked against the token's fingerprint before
//! anything is sent, a key made locally, the signed certificate stored as the host's
//! [`crate::identity`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cutover_proto::v1::{JoinRequest, enroll_client::EnrollClient};
use cutover_shared::token::Token;

use crate::{data_dir, identity};

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

/// What `cutover-agent join` was asked.
pub struct JoinConfig {
    /// The coordinator's gRPC address.
    pub coordinator: String,
    /// The join token's text ([`join_token`]).
    pub token: String,
    /// Where the identity is stored (created).
    pub data_dir: PathBuf,
    /// The host name asked for; the machine's hostname when `None`.
    pub name: Option<String>,
    /// Labels added to the token's (only keys the token allows).
    pub labels: BTreeMap<String, String>,
}

/// Enrolls this host: checks the coordinator's CA against the token's fingerprint before
/// sending anything, makes a key locally, and stores the signed certificate. Returns the
/// name the host was enrolled under.
pub async fn join(cfg: JoinConfig) -> anyhow::Result<String> {
    cutover_proto::tls::install_default_provider();
    let token = Token::parse(&cfg.token)?;
    let name = host_name(cfg.name)?;
    data_dir::create(&cfg.data_dir)?;
    let (key_pem, csr_pem) = identity::key_and_csr(&name)?;

    let tls = cutover_proto::tls::pinned_config(&token.ca_fingerprint)?;
    let channel = cutover_proto::tls::connect(&cfg.coordinator, tls)
        .await
        .map_err(|e| anyhow::anyhow!("{}", cutover_shared::errors::chain(&e)))?;
    let resp = EnrollClient::new(channel)
        .join(JoinRequest {
            token: token.encode(),
            name,
            labels: cfg.labels.into_iter().collect(),
            csr_pem,
        })
        .await
        .map_err(|s| anyhow::anyhow!("coordinator refused to enroll this host: {}", s.message()))?
        .into_inner();

    identity::save(
        &cfg.data_dir,
        identity::Enrolment {
            name: &resp.name,
            coordinator: &cfg.coordinator,
            labels: resp.labels.into_iter().collect(),
            key_pem: &key_pem,
            cert_pem: &resp.certificate_pem,
            ca_pem: &resp.ca_pem,
            not_after_unix_ms: resp.not_after_unix_ms,
        },
    )?;
    Ok(resp.name)
}

/// The name asked for, or the machine's hostname in lower case; checked as a host name.
fn host_name(asked: Option<String>) -> anyhow::Result<String> {
    let name = match asked {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .context("read the machine's hostname (or pass --name)")?
            .to_string_lossy()
            .to_lowercase(),
    };
    cutover_shared::names::check_name("host", &name).map_err(anyhow::Error::msg)?;
    Ok(name)
}
