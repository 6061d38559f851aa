//! The gRPC port: accepting connections, the TLS handshake, the server certificate and
//! the check of client certificates.
//!
//! The server certificate is issued from the CA for every name an agent or the CLI may
//! dial: the `--server-name`s, `localhost`, the listen IP — or, with a wildcard
//! `--listen`, every local interface address — and the hostname. It is issued on every
//! start and again whenever those names change (an address appeared), so clients, which
//! trust the CA, never notice.
//!
//! The handshake asks for a client certificate and checks that the client holds its key,
//! but leaves trust in it to the handlers ([`ClientCheck`]): a certificate from another
//! CA then gets an answer that says so, instead of a failed handshake that the client can
//! only report as a transport error.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cutover_proto::listen::{Acceptor, Cap, Conn, Limits};
use cutover_proto::tls::provider;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::pki::{self, Ca};

/// A client that has not finished its handshake by then (or by `--idle-timeout`, if
/// shorter) is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes (CPU-heavy: signatures and their checks) done at once; more wait
/// their turn, so that a reconnecting fleet's handshakes finish in turn instead of all
/// slowing down together, and sessions keep the CPU they need for heartbeats.
const HANDSHAKES: usize = 16;
/// How often the interface addresses are read again, so that a new one is named soon.
const NAMES_CHECK: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
    #[error("server certificate: {0}")]
    Pem(String),
}

/// Connections whose handshake is done, for `tonic`'s `serve_with_incoming`.
pub type Incoming = ReceiverStream<std::io::Result<TlsStream<Conn>>>;

/// The names the server certificate carries when listening on `listen`.
pub fn server_names(extra: &[String], listen: SocketAddr) -> Vec<String> {
    let mut names: BTreeSet<String> = extra.iter().cloned().collect();
    names.insert("localhost".into());
    names.insert("127.0.0.1".into());
    let ip = listen.ip();
    if ip.is_unspecified() {
        names.extend(
            interface_addresses(ip.is_ipv6())
                .iter()
                .map(IpAddr::to_string),
        );
    } else {
        names.insert(ip.to_string());
    }
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
    {
        names.insert(h.to_string());
    }
    names.into_iter().collect()
}

/// Every address of a local interface: IPv4, and IPv6 too for an IPv6 wildcard (which
/// takes both). IPv6 link-local addresses are left out: they cannot be dialled without
/// a zone.
fn interface_addresses(with_v6: bool) -> Vec<IpAddr> {
    let addrs = match nix::ifaddrs::getifaddrs() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the interface addresses for the server certificate");
            return Vec::new();
        }
    };
    addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            let v6 = sa.as_sockaddr_in6()?.ip();
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            (with_v6 && !link_local).then_some(IpAddr::V6(v6))
        })
        .collect()
}

/// The server certificate in use and the names it was issued for, replaced whole.
#[derive(Debug)]
struct ServerCert {
    /// The names it was issued for (to see when they change) and the certificate.
    current: RwLock<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        Some(current.1.clone())
    }
}

/// Asks every client for a certificate without requiring one (joining agents have
/// none), checks that the client holds the certificate's key, and accepts the chain as
/// it is: [`ClientCheck`] judges it where the answer can say why.
#[derive(Debug)]
struct DeferredClientAuth {
    /// Checks the handshake's signatures with the client's key.
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientCertVerifier for DeferredClientAuth {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
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

/// Judges a client certificate chain against the coordinator's CA (validity period and
/// client-auth usage included), with a reason a person can act on.
#[derive(Clone)]
pub struct ClientCheck(Arc<dyn ClientCertVerifier>);

impl ClientCheck {
    pub fn new(ca: &Ca) -> Result<ClientCheck, Error> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca.cert_der.clone()))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| Error::Tls(rustls::Error::General(e.to_string())))?;
        Ok(ClientCheck(verifier))
    }

    pub fn check(
        &self,
        leaf: &CertificateDer<'_>,
        chain: &[CertificateDer<'_>],
    ) -> Result<(), String> {
        self.0
            .verify_client_cert(leaf, chain, UnixTime::now())
            .map(|_| ())
            .map_err(|e| refusal(&e))
    }
}

/// Why a client certificate is refused, in words. Certificates this coordinator issued
/// fail only on their dates (or on a usage that is not client auth); any other failure
/// (unknown issuer, bad signature, a CA or self-signed certificate) means another CA.
fn refusal(e: &rustls::Error) -> String {
    use CertificateError as C;
    let why = match e {
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => e.to_string(),
        rustls::Error::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "it is not a client certificate".to_string()
        }
        _ => "it is not from this coordinator's CA".to_string(),
    };
    format!(
        "the coordinator refused the client certificate: {why} (check which credentials are used: the CLI's --credentials or CUTOVER_CREDENTIALS, an agent's DATA/identity)"
    )
}

/// The gRPC port's TLS: the server configuration and what it needs to issue the server
/// certificate again.
pub struct Tls {
    /// Runs handshakes with the server configuration.
    acceptor: TlsAcceptor,
    /// The certificate handshakes present; replaced when the names change.
    cert: Arc<ServerCert>,
    /// Issues the server certificate.
    ca: Arc<Ca>,
    /// Where the certificate in use is written for operators to see.
    data_dir: PathBuf,
    /// The `--server-name`s.
    extra_names: Vec<String>,
    /// The `--listen` address, whose IP (or, for a wildcard, every local address) the
    /// certificate names.
    listen: SocketAddr,
}

impl Tls {
    /// Issues the server certificate for `listen` and the `extra_names`.
    pub fn new(
        ca: Arc<Ca>,
        data_dir: PathBuf,
        extra_names: Vec<String>,
        listen: SocketAddr,
    ) -> Result<Tls, Error> {
        let names = server_names(&extra_names, listen);
        let key = issue(&ca, &names, &data_dir)?;
        tracing::info!(names = names.join(","), "server certificate issued");
        let cert = Arc::new(ServerCert {
            current: RwLock::new((names, key)),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(DeferredClientAuth {
                provider: provider(),
            }))
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert,
            ca,
            data_dir,
            extra_names,
            listen,
        })
    }

    /// Issues the server certificate again if its names changed.
    fn refresh(&self) {
        let names = server_names(&self.extra_names, self.listen);
        let same = {
            let current = self.cert.current.read().unwrap_or_else(|p| p.into_inner());
            current.0 == names
        };
        if same {
            return;
        }
        match issue(&self.ca, &names, &self.data_dir) {
            Ok(key) => {
                tracing::info!(names = names.join(","), "server certificate reissued");
                *self.cert.current.write().unwrap_or_else(|p| p.into_inner()) = (names, key);
            }
            Err(e) => tracing::warn!(error = %e, "reissue the server certificate"),
        }
    }

    /// Accepts connections on `listener` until `cancel`, at most `limits.max_connections`
    /// at once and backing off when accepting fails (descriptors run out). Each
    /// handshake runs in its own task, so a slow client holds up no one, and must end
    /// within `limits.idle_timeout` (at most 10 s, waiting for its turn included: at
    /// most [`HANDSHAKES`] run at once); finished ones come out of the returned stream.
    /// A connection keeps its place under the cap until it closes.
    pub fn serve(
        self,
        listener: TcpListener,
        limits: Limits,
        cancel: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Incoming {
        let (tx, rx) = mpsc::channel(64);
        let acceptor = Acceptor::new(listener, Cap::new(limits.max_connections), "--listen");
        let handshake = limits.idle_timeout.min(HANDSHAKE_TIMEOUT);
        tasks.spawn(self.accept_loop(acceptor, handshake, tx, cancel));
        ReceiverStream::new(rx)
    }

    async fn accept_loop(
        self,
        mut acceptor: Acceptor,
        handshake: Duration,
        tx: mpsc::Sender<std::io::Result<TlsStream<Conn>>>,
        cancel: CancellationToken,
    ) {
        let turns = Arc::new(Semaphore::new(HANDSHAKES));
        let mut names_check = tokio::time::interval(NAMES_CHECK);
        names_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = names_check.tick() => self.refresh(),
                conn = acceptor.accept() => {
                    let _ = conn.stream().set_nodelay(true);
                    let peer = conn.peer();
                    let (tls, tx, turns) = (self.acceptor.clone(), tx.clone(), turns.clone());
                    tokio::spawn(async move {
                        let shake = async {
                            let _turn = turns.acquire().await;
                            tls.accept(conn).await
                        };
                        match tokio::time::timeout(handshake, shake).await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(tls)).await;
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    }
}

/// Issues a server certificate for `names` and writes it to `DATA/pki/server.crt`.
fn issue(
    ca: &Ca,
    names: &[String],
    data_dir: &std::path::Path,
) -> Result<Arc<CertifiedKey>, Error> {
    let (cert_pem, key_pem) = ca.server_cert(names)?;
    let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| Error::Pem(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| Error::Pem(e.to_string()))?;
    let chain = vec![leaf, CertificateDer::from(ca.cert_der.clone())];
    let certified = CertifiedKey::from_der(chain, key, &provider())?;
    pki::write_server_cert(data_dir, &cert_pem)?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_names_every_interface_address() {
        let wildcard = server_names(&["deploy.example".into()], "0.0.0.0:7400".parse().unwrap());
        for a in interface_addresses(false) {
            assert!(wildcard.contains(&a.to_string()), "{a} in {wildcard:?}");
        }
        assert!(wildcard.contains(&"deploy.example".to_string()));
        assert!(wildcard.contains(&"localhost".to_string()));
        assert!(!wildcard.contains(&"0.0.0.0".to_string()));
        let one = server_names(&[], "127.0.0.9:7400".parse().unwrap());
        assert!(one.contains(&"127.0.0.9".to_string()), "{one:?}");
    }
}
