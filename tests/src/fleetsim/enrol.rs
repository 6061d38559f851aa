//! Enrolling the simulated hosts through the real join, once: one multi-use token from
//! `cutover token create --uses N`, then for each host a key made here, a CSR and
//! `Enroll.Join` over TLS pinned by the token's CA fingerprint, as `cutover-agent join`
//! does. Each host's key and certificate are kept in `STATE/hosts/NAME.pem`, so the
//! next run (or a restarted coordinator) reuses them; a state dir enrolled with another
//! coordinator's CA is enrolled again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use cutover_proto::v1::{JoinRequest, enroll_client::EnrollClient};
use cutover_shared::token::Token;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::coord::Coordinator;

/// Joins in flight at once.
const PARALLEL: usize = 16;

/// The label every simulated host carries, which the simulator's plans target.
pub const LABELS: &str = "fleet=sim";

/// The hosts' identities, ready to connect.
pub struct Enrolled {
    /// The coordinator's CA, the only one the hosts trust.
    pub ca_pem: Vec<u8>,
    /// Each host's name and PEM (key and certificate), in name order.
    pub hosts: Vec<(String, Vec<u8>)>,
    /// Hosts that joined in this run, and how long their joins took.
    pub joined: usize,
    pub seconds: f64,
}

/// Where the identities live in the state dir.
fn dir(state: &Path) -> PathBuf {
    state.join("hosts")
}

/// Makes sure every host of `names` is enrolled with `coord`, joining those that are
/// not, and returns their identities.
pub async fn enrol(
    coord: &Coordinator,
    state: &Path,
    names: &[String],
) -> anyhow::Result<Enrolled> {
    let dir = dir(state);
    let ca_pem = coord.ca_pem()?;
    forget_other_ca(&dir, &ca_pem)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join("ca.pem"), &ca_pem)?;
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !dir.join(format!("{n}.pem")).exists())
        .cloned()
        .collect();
    let started = Instant::now();
    if !missing.is_empty() {
        join_all(coord, &dir, missing.clone()).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut hosts = Vec::with_capacity(names.len());
    for n in names {
        let p = dir.join(format!("{n}.pem"));
        let pem = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
        hosts.push((n.clone(), pem));
    }
    Ok(Enrolled {
        ca_pem,
        hosts,
        joined: missing.len(),
        seconds,
    })
}

/// Removes identities issued by another CA (the coordinator's data dir was made anew).
fn forget_other_ca(dir: &Path, ca_pem: &[u8]) -> anyhow::Result<()> {
    match std::fs::read(dir.join("ca.pem")) {
        Ok(kept) if kept != ca_pem => {
            tracing::warn!(dir = %dir.display(), "identities from another coordinator; enrolling again");
            std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Joins `names` with one token, [`PARALLEL`] at a time.
async fn join_all(coord: &Coordinator, dir: &Path, names: Vec<String>) -> anyhow::Result<()> {
    let uses = names.len().to_string();
    let text = coord
        .cli(&[
            "token", "create", "--uses", &uses, "--labels", LABELS, "--ttl", "1h",
        ])
        .await?;
    let token = Token::parse(text.trim()).context("read the join token `token create` printed")?;
    let queue = Arc::new(Mutex::new(names));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..PARALLEL {
        let (queue, token, dir) = (queue.clone(), token.clone(), dir.to_path_buf());
        let addr = coord.addr.to_string();
        workers.spawn(async move { worker(&addr, &token, &dir, &queue).await });
    }
    while let Some(r) = workers.join_next().await {
        r.context("join worker")??;
    }
    Ok(())
}

/// Joins hosts from `queue` over one connection until it is empty.
async fn worker(
    addr: &str,
    token: &Token,
    dir: &Path,
    queue: &Mutex<Vec<String>>,
) -> anyhow::Result<()> {
    let tls = cutover_proto::tls::pinned_config(&token.ca_fingerprint)?;
    let channel = cutover_proto::tls::connect(addr, tls).await?;
    let mut client = EnrollClient::new(channel);
    loop {
        let Some(name) = queue.lock().await.pop() else {
            return Ok(());
        };
        let (key_pem, csr_pem) = agent::identity::key_and_csr(&name)?;
        let resp = client
            .join(JoinRequest {
                token: token.encode(),
                name: name.clone(),
                labels: Default::default(),
                csr_pem,
            })
            .await;
        let resp = match resp {
            Ok(r) => r.into_inner(),
            Err(s) => bail!(
                "join {name}: {} (a host enrolled by an interrupted run has no identity in {}: start from a fresh --state dir)",
                s.message(),
                dir.display()
            ),
        };
        let p = dir.join(format!("{name}.pem"));
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{key_pem}{}", resp.certificate_pem))
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("write {}", p.display()))?;
    }
}
