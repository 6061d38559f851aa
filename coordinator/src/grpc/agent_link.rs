//! `AgentLink`: an enrolled agent renews its certificate, and opens its session — the
//! stream of desired state down and observed state up, run by [`crate::session`].

use std::pin::Pin;

use cutover_proto::v1::{
    self as pb, AgentMessage, CoordinatorMessage, agent_link_server::AgentLink,
};
use cutover_shared::clock::now_ms;
use futures_util::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::Api;
use super::status::{internal, revoked};
use crate::model::Revocation;
use crate::{queries, session};

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentLink for Api {
    type SessionStream = SessionStream;

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let s = &self.0;
        let host = s.agent(&req)?;
        let r = req.into_inner();
        let (cert_pem, der) =
            s.ca.sign_agent_csr(&r.csr_pem, &host, s.cert_ttl)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let fp = cutover_proto::tls::fingerprint(&der);
        if !s.store.renew(&host, &fp)? {
            return Err(revoked(&host, Revocation::Removed));
        }
        tracing::info!(host, "agent certificate renewed");
        Ok(Response::new(pb::RenewResponse {
            certificate_pem: cert_pem,
            not_after_unix_ms: now_ms().saturating_add(s.cert_ttl.as_millis() as u64),
        }))
    }

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let s = &self.0;
        let host = s.agent(&req)?;
        if s.store.host(&host)?.is_none() {
            return Err(revoked(&host, Revocation::Removed));
        }
        let desired = queries::desired(&s.store, &host)?;
        let out = session::open(
            host,
            req.into_inner(),
            desired,
            s.fleet.clone(),
            s.cancel.clone(),
        )
        .map_err(internal)?;
        Ok(Response::new(Box::pin(futures_util::StreamExt::map(
            out,
            |m| Ok(*m),
        ))))
    }
}
