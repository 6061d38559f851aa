//! The coordinator's gRPC services: `Enroll` (no client certificate needed; the join
//! token is the credential), `AgentLink` (agent certificates only) and `Control`
//! (people's certificates, by role), each in its own module, and who may call them: the
//! exact certificate presented, looked up in the store. Every `Control` call passes
//! [`access`] first. Domain errors become `tonic::Status` in [`status`] and nowhere
//! else. Reads that the HTTP API shares live in [`crate::queries`]; an agent's stream,
//! once open, in [`crate::session`].

mod access;
mod agent_link;
mod control;
mod deployment;
mod enroll;
mod logs;
mod ops;
mod status;
mod trust;

use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1::{
    agent_link_server::AgentLinkServer, control_server::ControlServer, enroll_server::EnrollServer,
};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::admins::Caller;
use crate::engine::Handle;
use crate::fleet::Fleet;
use crate::listener::{ClientCheck, Incoming};
use crate::model::Identity;
use crate::pki::Ca;
use crate::store::Store;

pub use deployment::{database_to_pb, deployment_to_pb};

/// The largest control request the coordinator reads: a deployment carries its whole
/// plan, which parsing caps at [`cutover_shared::plan::MAX_PLAN_BYTES`]; the room above
/// is for its re-encoding and the other fields.
const MAX_CONTROL_REQUEST: usize = 4 * cutover_shared::plan::MAX_PLAN_BYTES;

/// What the handlers share.
pub struct Shared {
    /// Identities, tokens, hosts, desired state and deployments.
    pub store: Arc<Store>,
    /// The connected hosts and what they last reported.
    pub fleet: Arc<Fleet>,
    /// Signs agent certificates at join and renewal.
    pub ca: Arc<Ca>,
    /// Checks client certificates against the CA (the TLS layer leaves that to us, so
    /// that a refusal can say why).
    pub clients: ClientCheck,
    /// Creates deployments and hands them commands.
    pub engine: Handle,
    /// The coordinator's shutdown: agent sessions end with it.
    pub cancel: CancellationToken,
    /// How long agent certificates are valid.
    pub cert_ttl: Duration,
}

/// The three services' handlers over [`Shared`]; cheap to clone.
#[derive(Clone)]
pub struct Api(pub Arc<Shared>);

/// Serves the three services on `incoming` (connections whose TLS handshake is done)
/// until `shutdown`.
pub async fn serve(
    api: Api,
    incoming: Incoming,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // An established connection lives as long as it answers the keep-alive pings, which
    // close a dead peer's within 10 s (so TCP keepalive adds nothing). An agent's stream
    // lives as long as the agent, so there is no idle timeout.
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(EnrollServer::new(api.clone()))
        .add_service(AgentLinkServer::new(api.clone()))
        .add_service(access::Guarded::new(
            ControlServer::new(api.clone()).max_decoding_message_size(MAX_CONTROL_REQUEST),
            api.0,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

impl Shared {
    /// Who presented the client certificates `certs` (leaf first), from the store.
    fn identity(&self, certs: Option<&[CertificateDer<'static>]>) -> Result<Identity, Status> {
        let (leaf, chain) = certs
            .and_then(<[_]>::split_first)
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let fp = cutover_proto::tls::fingerprint(leaf);
        let found = self.store.identity(&fp)?;
        match &found {
            Some(Identity::Revoked { host, reason }) => {
                return Err(status::revoked(host, *reason));
            }
            Some(Identity::RevokedAdmin {
                name,
                by,
                at_unix_ms,
            }) => return Err(status::revoked_admin(name, by, *at_unix_ms)),
            _ => {}
        }
        self.clients
            .check(leaf, chain)
            .map_err(Status::unauthenticated)?;
        found.ok_or_else(|| {
            Status::permission_denied("certificate revoked or unknown to this coordinator")
        })
    }

    /// The person behind a `Control` call's certificates; [`access`] then decides
    /// what they may do.
    fn caller(&self, certs: Option<&[CertificateDer<'static>]>) -> Result<Caller, Status> {
        let identity = self.identity(certs)?;
        Caller::of(&identity).ok_or_else(|| {
            Status::permission_denied("the control API requires admin or viewer credentials")
        })
    }

    /// Passes only agent certificates; the host the certificate was issued to.
    fn agent<T>(&self, req: &Request<T>) -> Result<String, Status> {
        match self.identity(req.peer_certs().as_deref().map(Vec::as_slice))? {
            Identity::Agent { host } => Ok(host),
            _ => Err(Status::permission_denied(
                "the agent stream requires an agent certificate",
            )),
        }
    }
}
