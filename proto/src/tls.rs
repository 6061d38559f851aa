//! TLS for every cutover connection: the client side used by the agent and the CLI,
//! including the fingerprint-pinned handshake an agent makes before it has joined.
//!
//! The coordinator's CA is private to one cutover installation. Clients trust only that
//! CA; a joining agent, which does not have it yet, accepts a server chain only if it
//! carries a CA whose SHA-256 fingerprint equals the one in its join token, and then
//! verifies the server certificate against that CA as usual.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read PEM: {0}")]
    Pem(String),
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("address {0:?} is not HOST:PORT")]
    Address(String),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "{addr} is not cutover's gRPC port: it answered in plain text, which looks like an \
         HTTP port (such as the coordinator's --http); use the coordinator's --listen \
         address (default port 7400)"
    )]
    NotTls { addr: String },
}

/// The crypto provider cutover uses everywhere: ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default (for libraries that look it up, e.g. reqwest).
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Lowercase hex SHA-256 of a DER certificate: the CA fingerprint in join tokens.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(Error::Pem("no certificate found".into()));
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Pem(e.to_string()))
}

fn roots(ca_pem: &[u8]) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(ca_pem)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// mTLS client configuration: trusts only `ca_pem`, presents `cert_pem`/`key_pem`.
pub fn client_config(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<ClientConfig, Error> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Client configuration for joining: no client certificate, and the server chain must
/// carry the CA whose fingerprint is `ca_fingerprint`.
pub fn pinned_config(ca_fingerprint: &str) -> Result<ClientConfig, Error> {
    let verifier = PinnedCa {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider(),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the coordinator's CA does not match the fingerprint in the join token".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Splits `HOST:PORT` (or `[v6]:PORT`).
pub fn split_host_port(addr: &str) -> Result<(String, u16), Error> {
    let bad = || Error::Address(addr.to_string());
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Adds the cure to a handshake failure that has a known one.
fn explain(e: std::io::Error, host: &str) -> std::io::Error {
    use rustls::CertificateError as C;
    let hint = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => format!(
            "the coordinator's certificate does not name {host}: start it with `cutover serve --server-name {host}` (it then issues itself a new certificate from the same CA), or connect through a name it has"
        ),
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
            "the coordinator's certificate is not from the CA trusted here (check which credentials are used)".to_string()
        }
        _ => return e,
    };
    std::io::Error::new(e.kind(), format!("{e}; {hint}"))
}

/// Opens a gRPC channel to `addr` over TLS with `config`.
pub async fn connect(addr: &str, config: ClientConfig) -> Result<Channel, Error> {
    let (host, port) = split_host_port(addr)?;
    let server_name: ServerName<'static> = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.clone()).map_err(|_| Error::Address(addr.into()))?,
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = (host, port);
    let service = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect((target.0.as_str(), target.1)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector
                .connect(server_name, tcp)
                .await
                .map_err(|e| explain(e, &target.0))?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| Error::Address(addr.into()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector(service)
        .await
        .map_err(|source| {
            if answered_in_plain_text(&source) {
                Error::NotTls {
                    addr: addr.to_string(),
                }
            } else {
                Error::Connect {
                    addr: addr.to_string(),
                    source,
                }
            }
        })
}

/// True when the TLS handshake failed because the server's first bytes were not a TLS
/// record: a plain-text server, typically HTTP answering `400 Bad Request`.
fn answered_in_plain_text(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        // io::Error hides the error it wraps from `source()`; look inside it too.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), inner].into_iter().flatten() {
            if let Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) =
                candidate.downcast_ref::<rustls::Error>()
            {
                return true;
            }
        }
        next = e.source();
    }
    false
}
