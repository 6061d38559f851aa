//! The host's identity on disk: `agent.json` (name, coordinator, certificate validity)
//! and `identity/` (key, certificate, the coordinator's CA), written once by
//! [`crate::enroll`], read before every connection, and replaced by certificate renewal.
//! Every file is written whole (temporary file, fsync, rename) and readable by the agent
//! alone.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::data_dir;

/// What `agent.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct AgentFile {
    /// The host's name as the coordinator enrolled it (may differ from the one asked).
    name: String,
    /// Where the coordinator's gRPC port is, for every connection after the join.
    coordinator: String,
    /// The labels the coordinator gave the host, kept for the operator to read.
    labels: BTreeMap<String, String>,
    /// Validity of the current certificate (unix ms); 0 when unknown.
    #[serde(default)]
    cert_issued_unix_ms: u64,
    #[serde(default)]
    cert_not_after_unix_ms: u64,
}

/// The host's enrolment: who it is and how to reach the coordinator.
pub struct Identity {
    /// The host's name, in logs and on the coordinator.
    pub name: String,
    /// The coordinator's gRPC address.
    pub coordinator: String,
    /// The coordinator's CA, the only one the agent trusts.
    pub ca_pem: Vec<u8>,
    /// The host's certificate and key, presented on every connection.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The certificate's validity (unix ms), which says when to renew it.
    pub cert_issued_unix_ms: u64,
    pub cert_not_after_unix_ms: u64,
}

/// What a join brings back, to be stored.
pub struct Enrolment<'a> {
    /// The name the coordinator enrolled the host under.
    pub name: &'a str,
    /// The address the join reached the coordinator at.
    pub coordinator: &'a str,
    /// The host's labels as the coordinator settled them.
    pub labels: BTreeMap<String, String>,
    /// The key made locally, and the certificate the coordinator signed for it.
    pub key_pem: &'a str,
    pub cert_pem: &'a str,
    /// The coordinator's CA certificate.
    pub ca_pem: &'a str,
    /// When the certificate expires (unix ms).
    pub not_after_unix_ms: u64,
}

impl Identity {
    /// Reads the identity `join` stored in `data_dir`.
    pub fn load(data: &Path) -> anyhow::Result<Identity> {
        let agent = data_dir::agent_file(data);
        let raw = std::fs::read(&agent).with_context(|| {
            format!("read {} (run `cutover-agent join` first)", agent.display())
        })?;
        let file: AgentFile =
            serde_json::from_slice(&raw).with_context(|| format!("parse {}", agent.display()))?;
        let id = data_dir::identity(data);
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

    /// True when less than a third of the certificate's lifetime is left.
    pub fn renewal_due(&self, now_ms: u64) -> bool {
        let (from, to) = (self.cert_issued_unix_ms, self.cert_not_after_unix_ms);
        to > from && now_ms >= to - (to - from) / 3
    }
}

/// Stores a fresh enrolment in `data_dir` (which exists).
pub fn save(data: &Path, e: Enrolment<'_>) -> anyhow::Result<()> {
    let id = data_dir::identity(data);
    std::fs::create_dir_all(&id).with_context(|| format!("create {}", id.display()))?;
    write_private(&id.join("key.pem"), e.key_pem.as_bytes())?;
    write_private(&id.join("cert.pem"), e.cert_pem.as_bytes())?;
    write_private(&id.join("ca.pem"), e.ca_pem.as_bytes())?;
    let file = AgentFile {
        name: e.name.to_string(),
        coordinator: e.coordinator.to_string(),
        labels: e.labels,
        cert_issued_unix_ms: cutover_shared::clock::now_ms(),
        cert_not_after_unix_ms: e.not_after_unix_ms,
    };
    write_private(
        &data_dir::agent_file(data),
        &serde_json::to_vec_pretty(&file)?,
    )
}

/// A fresh key and a certificate request for `name`: (key PEM, CSR PEM).
pub fn key_and_csr(name: &str) -> anyhow::Result<(String, String)> {
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

/// Renews the certificate over an open channel to the coordinator and stores it.
pub async fn renew(
    data: &Path,
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
        data,
        &key_pem,
        &resp.certificate_pem,
        resp.not_after_unix_ms,
    )
}

/// Replaces the stored key and certificate after a renewal.
fn store_renewal(
    data: &Path,
    key_pem: &str,
    cert_pem: &str,
    not_after_unix_ms: u64,
) -> anyhow::Result<()> {
    let agent = data_dir::agent_file(data);
    let mut file: AgentFile = serde_json::from_slice(&std::fs::read(&agent)?)?;
    let id = data_dir::identity(data);
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

/// Writes `data` to `path` whole, mode 0600: a temporary file, fsync, then rename.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn enrolment() -> Enrolment<'static> {
        Enrolment {
            name: "web-1",
            coordinator: "127.0.0.1:7443",
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            key_pem: "KEY 1",
            cert_pem: "CERT 1",
            ca_pem: "CA",
            not_after_unix_ms: u64::MAX,
        }
    }

    #[test]
    fn a_saved_enrolment_loads_back_and_a_renewal_replaces_key_and_certificate() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), enrolment()).unwrap();
        let id = Identity::load(dir.path()).unwrap();
        assert_eq!(
            (id.name.as_str(), id.coordinator.as_str()),
            ("web-1", "127.0.0.1:7443")
        );
        assert_eq!(
            (&id.key_pem[..], &id.cert_pem[..], &id.ca_pem[..]),
            (&b"KEY 1"[..], &b"CERT 1"[..], &b"CA"[..])
        );
        let mode = std::fs::metadata(data_dir::identity(dir.path()).join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        store_renewal(dir.path(), "KEY 2", "CERT 2", 42).unwrap();
        let id = Identity::load(dir.path()).unwrap();
        assert_eq!(
            (&id.key_pem[..], &id.cert_pem[..]),
            (&b"KEY 2"[..], &b"CERT 2"[..])
        );
        assert_eq!(id.cert_not_after_unix_ms, 42);
        assert_eq!(id.name, "web-1", "a renewal keeps who the host is");
    }

    #[test]
    fn a_missing_identity_says_to_join_first() {
        let dir = tempfile::tempdir().unwrap();
        let e = Identity::load(dir.path()).err().expect("no identity yet");
        assert!(
            format!("{e:#}").contains("(run `cutover-agent join` first)"),
            "{e:#}"
        );
    }

    #[test]
    fn renewal_is_due_in_the_last_third_of_the_lifetime() {
        let id = |from, to| Identity {
            name: String::new(),
            coordinator: String::new(),
            ca_pem: Vec::new(),
            cert_pem: Vec::new(),
            key_pem: Vec::new(),
            cert_issued_unix_ms: from,
            cert_not_after_unix_ms: to,
        };
        assert!(!id(0, 300).renewal_due(199));
        assert!(id(0, 300).renewal_due(200));
        assert!(
            !id(0, 0).renewal_due(1_000),
            "unknown validity is never due"
        );
    }
}
