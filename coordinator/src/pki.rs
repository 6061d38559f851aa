//! The coordinator's certificate authority: created on first start in `DATA/pki/`, it
//! signs the server certificate, the admin client credentials and every agent's
//! certificate. Its key never leaves the data directory.
//!
//! Who may do what is decided by the exact certificate presented (its SHA-256), looked up
//! in the store; removing that entry revokes the certificate.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration as TimeDuration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid certificate request: {0}")]
    BadCsr(String),
}

/// Validity of admin certificates.
const ADMIN_DAYS: i64 = 365;

/// The certificate authority, loaded.
pub struct Ca {
    /// Signs certificates with the CA's key.
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, which agents and the CLI trust.
    pub cert_pem: String,
    /// The same, DER, for checking client chains.
    pub cert_der: Vec<u8>,
    /// Its SHA-256, carried by join tokens so an agent knows it joins the right
    /// coordinator.
    pub fingerprint: String,
}

/// What `init_or_load` returns: the CA, and whether this start made the admin
/// credentials.
pub struct Pki {
    /// The certificate authority.
    pub ca: Ca,
    /// Set when the admin credentials were created by this start.
    pub admin_created: Option<Vec<u8>>,
}

/// The server certificate's file, `DATA/pki/server.crt`: public, rewritten whenever the
/// certificate is issued (its key stays in memory), so operators can see its names.
pub fn server_cert_path(dir: &Path) -> PathBuf {
    dir.join("pki").join("server.crt")
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode_private()
            .open(&tmp)
            .map_err(io)?;
        f.write_all(data).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|source| Error::Io {
        action: "create",
        path: path.to_path_buf(),
        source,
    })
}

fn leaf_params(cn: &str, sans: Vec<SanType>, valid: TimeDuration) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "cutover");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - TimeDuration::hours(1);
    p.not_after = now + valid;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    p
}

fn dns(name: &str) -> Option<SanType> {
    match name.parse::<IpAddr>() {
        Ok(ip) => Some(SanType::IpAddress(ip)),
        Err(_) => name.to_string().try_into().ok().map(SanType::DnsName),
    }
}

impl Ca {
    fn create() -> Result<(Ca, String), Error> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "cutover");
        dn.push(DnType::CommonName, "cutover CA");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - TimeDuration::hours(1);
        p.not_after = now + TimeDuration::days(3650);
        let cert = p.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let ca = Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            fingerprint: cutover_proto::tls::fingerprint(cert.der()),
            issuer: Issuer::new(p, key),
        };
        Ok((ca, key_pem))
    }

    fn load(cert_pem: String, key_pem: &str) -> Result<Ca, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let der = cutover_proto::tls::certs_from_pem(cert_pem.as_bytes())
            .map_err(|e| Error::BadCsr(e.to_string()))?
            .remove(0)
            .to_vec();
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Ca {
            fingerprint: cutover_proto::tls::fingerprint(&der),
            cert_der: der,
            cert_pem,
            issuer,
        })
    }

    /// Signs a server certificate for `names` (DNS names or IPs): (certificate PEM, key
    /// PEM).
    pub fn server_cert(&self, names: &[String]) -> Result<(String, String), Error> {
        let key = KeyPair::generate()?;
        let sans = names.iter().filter_map(|n| dns(n)).collect();
        let mut p = leaf_params("cutover coordinator", sans, TimeDuration::days(3650));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a client certificate with a fresh key (admin credentials).
    pub fn client_cert(&self, cn: &str) -> Result<(String, Vec<u8>, String), Error> {
        let key = KeyPair::generate()?;
        let mut p = leaf_params(cn, vec![], TimeDuration::days(ADMIN_DAYS));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), cert.der().to_vec(), key.serialize_pem()))
    }

    /// Signs an agent's CSR for `valid`. Only the CSR's public key is used: the identity
    /// (`host`) and usages come from the coordinator, never from what the agent asked for.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        host: &str,
        valid: std::time::Duration,
    ) -> Result<(String, Vec<u8>), Error> {
        let valid = TimeDuration::try_from(valid).unwrap_or(TimeDuration::days(365));
        let (pem, der, _) = self.sign_client_csr(csr_pem, host, valid)?;
        Ok((pem, der))
    }

    /// Signs a person's CSR (`cutover admin create`): (certificate PEM, DER, not after
    /// as unix ms). As for agents, only the CSR's public key is used; the name is the
    /// coordinator's, and the role lives in the store, not in the certificate.
    pub fn sign_admin_csr(
        &self,
        csr_pem: &str,
        name: &str,
    ) -> Result<(String, Vec<u8>, u64), Error> {
        self.sign_client_csr(csr_pem, name, TimeDuration::days(ADMIN_DAYS))
    }

    /// A client certificate for the CSR's key, named `cn` (a host name also as a SAN).
    fn sign_client_csr(
        &self,
        csr_pem: &str,
        cn: &str,
        valid: TimeDuration,
    ) -> Result<(String, Vec<u8>, u64), Error> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Error::BadCsr(e.to_string()))?;
        let mut p = leaf_params(cn, dns(cn).into_iter().collect(), valid);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after = unix_ms(p.not_after);
        let cert = p.signed_by(&csr.public_key, &self.issuer)?;
        Ok((cert.pem(), cert.der().to_vec(), not_after))
    }
}

/// An instant as unix ms (0 before 1970).
fn unix_ms(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// When a certificate (DER) expires, as unix ms; 0 when it cannot be read.
pub fn not_after_ms(der: &[u8]) -> u64 {
    x509_parser::parse_x509_certificate(der).map_or(0, |(_, cert)| {
        u64::try_from(cert.validity().not_after.timestamp()).map_or(0, |s| s.saturating_mul(1000))
    })
}

/// Creates the PKI in `dir` on first start, or loads it. The server certificate is not
/// kept: `listener` issues it on every start, and again when its names change.
pub fn init_or_load(dir: &Path) -> Result<Pki, Error> {
    let pki = dir.join("pki");
    mkdir(&pki)?;
    let (ca_crt, ca_key) = (pki.join("ca.crt"), pki.join("ca.key"));
    let ca = if ca_crt.exists() && ca_key.exists() {
        Ca::load(read(&ca_crt)?, &read(&ca_key)?)?
    } else {
        let (ca, key_pem) = Ca::create()?;
        write_private(&ca_key, key_pem.as_bytes())?;
        write_private(&ca_crt, ca.cert_pem.as_bytes())?;
        ca
    };

    let admin = dir.join("admin");
    mkdir(&admin)?;
    let admin_created = if admin.join("client.crt").exists() && admin.join("client.key").exists() {
        None
    } else {
        let (cert_pem, cert_der, key_pem) = ca.client_cert("cutover admin")?;
        write_private(&admin.join("client.key"), key_pem.as_bytes())?;
        write_private(&admin.join("client.crt"), cert_pem.as_bytes())?;
        Some(cert_der)
    };
    write_private(&admin.join("ca.crt"), ca.cert_pem.as_bytes())?;
    Ok(Pki { ca, admin_created })
}

/// Writes the server certificate in use to [`server_cert_path`].
pub fn write_server_cert(dir: &Path, cert_pem: &str) -> Result<(), Error> {
    let path = server_cert_path(dir);
    let tmp = path.with_extension("tmp");
    let io = |source| Error::Io {
        action: "write",
        path: path.clone(),
        source,
    };
    fs::write(&tmp, cert_pem).map_err(io)?;
    fs::rename(&tmp, &path).map_err(io)
}

/// The admin certificate's DER as stored in `dir/admin/client.crt`.
pub fn admin_cert_der(dir: &Path) -> Result<Vec<u8>, Error> {
    let pem = read(&dir.join("admin").join("client.crt"))?;
    cutover_proto::tls::certs_from_pem(pem.as_bytes())
        .map(|mut c| c.remove(0).to_vec())
        .map_err(|e| Error::BadCsr(e.to_string()))
}
