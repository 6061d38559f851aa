//! `Enroll`: a new host joins with a join token (its only credential) and a CSR, and
//! gets its certificate. The token's rules are [`crate::tokens`]'; a refused join
//! writes nothing and spends nothing.

use std::collections::BTreeMap;

use cutover_proto::v1::{self as pb, enroll_server::Enroll};
use cutover_shared::clock::now_ms;
use cutover_shared::names::{check_label, check_name};
use tonic::{Request, Response, Status};

use super::Api;
use crate::model::HostRecord;
use crate::tokens;

#[tonic::async_trait]
impl Enroll for Api {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let s = &self.0;
        let r = req.into_inner();
        let token =
            tokens::Token::parse(&r.token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if token.ca_fingerprint != s.ca.fingerprint {
            return Err(Status::unauthenticated(
                "join token was issued by another coordinator",
            ));
        }
        check_name("host", &r.name).map_err(Status::invalid_argument)?;
        let asked: BTreeMap<String, String> = r.labels.into_iter().collect();
        for (k, v) in &asked {
            check_label(k, v).map_err(|m| Status::invalid_argument(format!("--labels: {m}")))?;
        }
        let (cert_pem, der) =
            s.ca.sign_agent_csr(&r.csr_pem, &r.name, s.cert_ttl)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = now_ms();
        let host = HostRecord {
            name: r.name.clone(),
            labels: BTreeMap::new(),
            cert_fingerprint: cutover_proto::tls::fingerprint(&der),
            joined_unix_ms: now,
            previous_fingerprint: None,
        };
        let labels = self.admit(&token, host, &asked, now)?;
        Ok(Response::new(pb::JoinResponse {
            certificate_pem: cert_pem,
            ca_pem: s.ca.cert_pem.clone(),
            name: r.name,
            labels: labels.into_iter().collect(),
            not_after_unix_ms: now.saturating_add(s.cert_ttl.as_millis() as u64),
        }))
    }
}

impl Api {
    /// Enrols `host` if `token` admits it, in one transaction with spending the token;
    /// the labels it gets. A replaced host's session ends (its reconnect is refused as
    /// revoked).
    fn admit(
        &self,
        token: &tokens::Token,
        host: HostRecord,
        asked: &BTreeMap<String, String>,
        now: u64,
    ) -> Result<BTreeMap<String, String>, Status> {
        let s = &self.0;
        let name = host.name.clone();
        let join = tokens::Join {
            name: &name,
            labels: asked,
        };
        let done = s
            .store
            .enroll(&token.id, &name, |rec, enrolled| {
                let labels = tokens::admit(rec, token, &join, enrolled.is_some(), now)?;
                Ok::<_, tokens::Error>(HostRecord { labels, ..host })
            })?
            .map_err(|e| {
                tracing::warn!(host = name, token = token.id, error = %e, "join refused");
                Status::from(e)
            })?;
        if done.replaced.is_some() {
            s.fleet.forget(&name);
            tracing::warn!(
                host = name,
                token = token.id,
                "host replaced by a new join; its old certificate is revoked"
            );
        }
        tracing::info!(host = name, token = token.id, "host joined");
        Ok(done.host.labels)
    }
}
