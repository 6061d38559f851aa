//! The coordinator's gRPC services: `Enroll` (no client certificate needed; the join
//! token is the credential), `AgentLink` (agent certificates only) and `Control` (admin
//! certificates only). Domain errors become `tonic::Status` here and nowhere else.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cutover_proto::v1::{
    self as pb, AgentMessage, CoordinatorMessage, agent_link_server::AgentLink, agent_message,
    control_server::Control, coordinator_message, enroll_server::Enroll,
};
use cutover_proto::{Slot, link};
use cutover_shared::names::{check_label, check_label_key, check_name};
use cutover_shared::plan::Plan;
use futures_util::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{self, Handle};
use crate::fleet::Fleet;
use crate::model::{DeploymentRecord, HostRecord, Identity, Revocation, TokenHost};
use crate::pki::Ca;
use crate::report;
use crate::rollout::Command;
use crate::store::Store;
use crate::tokens;
use cutover_shared::clock::now_ms;

pub struct Shared {
    pub store: Arc<Store>,
    pub fleet: Arc<Fleet>,
    pub ca: Arc<Ca>,
    /// Checks client certificates against the CA (the TLS layer leaves that to us, so
    /// that a refusal can say why).
    pub clients: crate::listener::ClientCheck,
    pub engine: Handle,
    pub cancel: CancellationToken,
    /// How long agent certificates are valid.
    pub cert_ttl: Duration,
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal(e.to_string())
}

impl From<engine::Error> for Status {
    fn from(e: engine::Error) -> Status {
        match e {
            engine::Error::Refused(m) => Status::failed_precondition(m),
            engine::Error::NotFound(m) => Status::not_found(m),
            engine::Error::Store(e) => internal(e),
            engine::Error::Stopped => Status::unavailable("the coordinator is shutting down"),
        }
    }
}

impl From<tokens::Error> for Status {
    fn from(e: tokens::Error) -> Status {
        use tokens::Error as E;
        let message = e.to_string();
        match e {
            E::Unknown | E::Expired | E::UsedUp => Status::unauthenticated(message),
            E::Enrolled(_) => Status::already_exists(message),
            E::WrongName { .. } | E::LabelFixed { .. } | E::LabelNotAllowed { .. } => {
                Status::permission_denied(message)
            }
        }
    }
}

/// The refusal of a revoked agent certificate: it says why, and carries
/// [`cutover_proto::REVOKED_METADATA`] so that the agent stops for good.
fn revoked(host: &str, reason: Revocation) -> Status {
    let message = match reason {
        Revocation::Removed => {
            format!("host {host} was removed from the coordinator; join again with a new token")
        }
        Revocation::Replaced => format!(
            "host {host} was enrolled again by a join with a --replace token, which revoked this certificate; join again with a new token"
        ),
    };
    let mut status = Status::permission_denied(message);
    status.metadata_mut().insert(
        cutover_proto::REVOKED_METADATA,
        tonic::metadata::MetadataValue::from_static(reason.as_str()),
    );
    status
}

impl Shared {
    /// Who presented the client certificate of `req`, from the store.
    fn identity<T>(&self, req: &Request<T>) -> Result<Identity, Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let (leaf, chain) = certs
            .split_first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let fp = cutover_proto::tls::fingerprint(leaf);
        let found = self.store.identity(&fp).map_err(internal)?;
        if let Some(Identity::Revoked { host, reason }) = &found {
            return Err(revoked(host, *reason));
        }
        self.clients
            .check(leaf, chain)
            .map_err(Status::unauthenticated)?;
        found.ok_or_else(|| {
            Status::permission_denied("certificate revoked or unknown to this coordinator")
        })
    }

    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match self.identity(req)? {
            Identity::Admin => Ok(()),
            Identity::Agent { .. } | Identity::Revoked { .. } => Err(Status::permission_denied(
                "the control API requires admin credentials",
            )),
        }
    }

    fn agent<T>(&self, req: &Request<T>) -> Result<String, Status> {
        match self.identity(req)? {
            Identity::Agent { host } => Ok(host),
            Identity::Admin | Identity::Revoked { .. } => Err(Status::permission_denied(
                "the agent stream requires an agent certificate",
            )),
        }
    }
}

#[derive(Clone)]
pub struct Api(pub Arc<Shared>);

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
        let fp = cutover_proto::tls::fingerprint(&der);
        let now = now_ms();
        let join = tokens::Join {
            name: &r.name,
            labels: &asked,
        };
        let done = s
            .store
            .enroll(&token.id, &r.name, |rec, enrolled| {
                let labels = tokens::admit(rec, &token, &join, enrolled.is_some(), now)?;
                Ok::<_, tokens::Error>(HostRecord {
                    name: r.name.clone(),
                    labels,
                    cert_fingerprint: fp.clone(),
                    joined_unix_ms: now,
                    previous_fingerprint: None,
                })
            })
            .map_err(internal)?
            .map_err(|e| {
                tracing::warn!(host = r.name, token = token.id, error = %e, "join refused");
                Status::from(e)
            })?;
        if done.replaced.is_some() {
            // The replaced machine's stream ends; its reconnect is refused as revoked.
            s.fleet.forget(&r.name);
            tracing::warn!(
                host = r.name,
                token = token.id,
                "host replaced by a new join; its old certificate is revoked"
            );
        }
        tracing::info!(host = r.name, token = token.id, "host joined");
        Ok(Response::new(pb::JoinResponse {
            certificate_pem: cert_pem,
            ca_pem: s.ca.cert_pem.clone(),
            name: r.name,
            labels: done.host.labels.into_iter().collect(),
            not_after_unix_ms: now.saturating_add(s.cert_ttl.as_millis() as u64),
        }))
    }
}

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
        if !s.store.renew(&host, &fp).map_err(internal)? {
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
        let s = self.0.clone();
        let host = s.agent(&req)?;
        if s.store.host(&host).map_err(internal)?.is_none() {
            return Err(revoked(&host, Revocation::Removed));
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel::<CoordinatorMessage>(256);

        // The host's whole desired state first.
        let services = s
            .store
            .desired_for_host(&host)
            .map_err(internal)?
            .into_iter()
            .filter_map(|raw| pb::DesiredService::decode(raw.as_slice()).ok())
            .collect();
        let first = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Desired(pb::DesiredState {
                services,
            })),
        };
        tx.try_send(first).map_err(internal)?;
        let (session, end) = s.fleet.attach(&host, tx.clone(), now_ms());
        tracing::info!(host, session, "agent connected");

        tokio::spawn(async move {
            let mut beat = tokio::time::interval(link::HEARTBEAT);
            let mut last_heard = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = s.cancel.cancelled() => break,
                    _ = end.cancelled() => break,
                    _ = tx.closed() => break,
                    _ = beat.tick() => {
                        if last_heard.elapsed() > link::SILENCE_LIMIT {
                            tracing::warn!(host, "agent silent; dropping its session");
                            break;
                        }
                        let hb = CoordinatorMessage { msg: Some(coordinator_message::Msg::Heartbeat(pb::Heartbeat { unix_ms: now_ms() })) };
                        if tx.try_send(hb).is_err() && tx.is_closed() {
                            break;
                        }
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(m)) => {
                            last_heard = tokio::time::Instant::now();
                            match m.msg {
                                Some(agent_message::Msg::Observed(o)) => s.fleet.observe(&host, o.services, now_ms()),
                                Some(agent_message::Msg::Heartbeat(_)) => s.fleet.seen(&host, now_ms()),
                                None => {}
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::info!(host, error = %e, "agent stream ended");
                            break;
                        }
                    },
                }
            }
            s.fleet.detach(&host, session);
            tracing::info!(host, session, "agent disconnected");
        });

        let out = ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(futures_util::StreamExt::map(
            out, Ok,
        ))))
    }
}

pub fn deployment_to_pb(d: &DeploymentRecord) -> pb::Deployment {
    pb::Deployment {
        id: d.id.clone(),
        service: d.service.clone(),
        release: d.release.clone(),
        state: d.state.as_str().into(),
        step: d.step,
        traffic: d.traffic,
        reason: d.reason.clone().unwrap_or_default(),
        hosts: d
            .hosts
            .iter()
            .map(|(name, h)| pb::DeploymentHost {
                name: name.clone(),
                phase: h.phase.as_str().into(),
                weight: h.weight,
                error: h.error.clone().unwrap_or_default(),
            })
            .collect(),
        created_unix_ms: d.created_unix_ms,
        ended_unix_ms: d.ended_unix_ms.unwrap_or(0),
        previous_release: d.previous_release.clone().unwrap_or_default(),
        steps: d.plan.strategy.steps.len() as u32,
        intervals: d
            .analysis
            .intervals
            .iter()
            .map(|i| {
                let (verdict, why) = verdict_parts(&i.verdict);
                pb::AnalysisInterval {
                    step: i.step,
                    traffic: i.traffic,
                    started_unix_ms: i.started_unix_ms,
                    ended_unix_ms: i.ended_unix_ms,
                    new_requests: i.new_requests,
                    old_requests: i.old_requests,
                    verdict: verdict.into(),
                    why,
                    metrics: i
                        .metrics
                        .iter()
                        .map(|m| pb::MetricValue {
                            name: crate::analysis::metric_name(m.name).into(),
                            new: m.new.unwrap_or(f64::NAN),
                            old: m.old.unwrap_or(f64::NAN),
                            verdict: verdict_parts(&m.verdict).0.into(),
                        })
                        .collect(),
                }
            })
            .collect(),
        first_bad_unix_ms: d.rollback.as_ref().map_or(0, |r| r.first_bad_unix_ms),
        rollback_decided_unix_ms: d.rollback.as_ref().map_or(0, |r| r.decided_unix_ms),
        rollback_done_unix_ms: d
            .rollback
            .as_ref()
            .and_then(|r| r.done_unix_ms)
            .unwrap_or(0),
    }
}

fn verdict_parts(v: &crate::analysis::Verdict) -> (&'static str, String) {
    match v {
        crate::analysis::Verdict::Pass => ("pass", String::new()),
        crate::analysis::Verdict::Fail(w) => ("fail", w.clone()),
        crate::analysis::Verdict::Inconclusive(w) => ("inconclusive", w.clone()),
    }
}

fn slot_pb(
    d: Option<&pb::DesiredService>,
    o: Option<&pb::ObservedService>,
    slot: Slot,
) -> pb::HostSlot {
    let observed = o.and_then(|o| o.slot(slot));
    let release = observed
        .map(|s| s.release.clone())
        .filter(|r| !r.is_empty())
        .or_else(|| {
            d.and_then(|d| d.slot(slot))
                .and_then(pb::SlotSpec::release_key)
                .map(|(v, _)| v.to_string())
        })
        .unwrap_or_default();
    let state = observed
        .map(|s| pb::SlotPhase::of(s.phase).name().to_string())
        .unwrap_or_else(|| {
            if release.is_empty() {
                "empty".into()
            } else {
                "unknown".into()
            }
        });
    let weight = match (o, d) {
        (Some(o), _) => o.weight(slot),
        (None, Some(d)) => d.weight(slot),
        _ => 0,
    };
    pb::HostSlot {
        release,
        state,
        weight,
    }
}

#[tonic::async_trait]
impl Control for Api {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let r = req.into_inner();
        let ttl = if r.ttl_ms == 0 { 3_600_000 } else { r.ttl_ms };
        let uses = if r.uses == 0 { 1 } else { r.uses };
        let grant = grant(&s.store, r)?;
        let (tok, rec) = tokens::issue(&s.ca.fingerprint, grant, ttl, uses, now_ms());
        s.store.put_token(&rec).map_err(internal)?;
        tracing::info!(token = rec.id, host = ?rec.host, "join token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: tok.encode(),
            id: rec.id,
            expires_unix_ms: rec.expires_unix_ms,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let tokens = s
            .store
            .tokens()
            .map_err(internal)?
            .into_iter()
            .map(|t| pb::TokenInfo {
                name: t.host.name().unwrap_or_default().to_string(),
                replace: matches!(t.host, TokenHost::Replaces(_)),
                id: t.id,
                labels: t.labels.into_iter().collect(),
                created_unix_ms: t.created_unix_ms,
                expires_unix_ms: t.expires_unix_ms,
                uses_left: t.uses_left,
                revoked: t.revoked,
                allow_labels: t.allow_labels,
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let id = req.into_inner().id.to_ascii_lowercase();
        if !s.store.revoke_token(&id).map_err(internal)? {
            return Err(Status::not_found(format!(
                "unknown token {id:?} (see `cutover token list`)"
            )));
        }
        tracing::info!(token = id, "join token revoked");
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn list_hosts(
        &self,
        req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let hosts = hosts_pb(&s.store, &s.fleet)?;
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn remove_host(
        &self,
        req: Request<pb::RemoveHostRequest>,
    ) -> Result<Response<pb::RemoveHostResponse>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let name = req.into_inner().name;
        if !s.store.remove_host(&name).map_err(internal)? {
            return Err(Status::not_found(format!("unknown host {name:?}")));
        }
        s.fleet.forget(&name);
        tracing::info!(host = name, "host removed; its certificate is revoked");
        Ok(Response::new(pb::RemoveHostResponse {}))
    }

    async fn deploy(
        &self,
        req: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let r = req.into_inner();
        let path = if r.plan_path.is_empty() {
            "plan".to_string()
        } else {
            r.plan_path
        };
        let plan = Plan::parse(&r.plan_toml, &path)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let created = s.engine.deploy(plan, path, actor(&r.actor)).await?;
        Ok(Response::new(pb::DeployResponse {
            id: created.id,
            noop: created.noop,
        }))
    }

    async fn get_deployment(
        &self,
        req: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let id = req.into_inner().id;
        let dep = if id.is_empty() {
            let all = s.store.deployments().map_err(internal)?;
            DeploymentRecord::newest(&all).cloned()
        } else {
            s.store.deployment(&id).map_err(internal)?
        };
        let dep = dep.ok_or_else(|| {
            if id.is_empty() {
                Status::not_found("no deployment yet")
            } else {
                Status::not_found(format!("unknown deployment {id:?}"))
            }
        })?;
        Ok(Response::new(deployment_to_pb(&dep)))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let r = req.into_inner();
        let created = s.engine.rollback(r.service, actor(&r.actor)).await?;
        Ok(Response::new(pb::DeployResponse {
            id: created.id,
            noop: created.noop,
        }))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::JsonDocument>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let r = req.into_inner();
        let records = s.store.deployments().map_err(internal)?;
        let service = (!r.service.is_empty()).then_some(r.service.as_str());
        let limit = if r.limit == 0 { 20 } else { r.limit as usize };
        json_doc(&report::history(&records, service, r.since_unix_ms, limit))
    }

    async fn show(
        &self,
        req: Request<pb::ShowRequest>,
    ) -> Result<Response<pb::JsonDocument>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let id = req.into_inner().id;
        json_doc(&show_json(&s.store, &id)?)
    }

    async fn stats(
        &self,
        req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::JsonDocument>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let r = req.into_inner();
        let records = s.store.deployments().map_err(internal)?;
        let events = s.store.all_events().map_err(internal)?;
        let service = (!r.service.is_empty()).then_some(r.service.as_str());
        let stats = report::stats(
            &records,
            &events,
            service,
            r.since_unix_ms,
            cutover_shared::clock::now_ms(),
        );
        json_doc(&serde_json::to_value(stats).unwrap_or_default())
    }

    async fn command(
        &self,
        req: Request<pb::CommandRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let s = &self.0;
        s.admin(&req)?;
        let r = req.into_inner();
        let command = match pb::DeploymentCommand::try_from(r.command) {
            Ok(pb::DeploymentCommand::Pause) => Command::Pause,
            Ok(pb::DeploymentCommand::Resume) => Command::Resume,
            Ok(pb::DeploymentCommand::Promote) => Command::Promote,
            Ok(pb::DeploymentCommand::Abort) => Command::Abort,
            Err(_) => return Err(Status::invalid_argument("unknown command")),
        };
        let dep = s.engine.command(r.id, command, actor(&r.actor)).await?;
        Ok(Response::new(deployment_to_pb(&dep)))
    }
}

/// What a `token create` request grants, checked: label syntax, the host name it pins
/// or replaces (which must be enrolled), and the label keys a join may add.
fn grant(store: &Store, r: pb::CreateTokenRequest) -> Result<tokens::Grant, Status> {
    let bad = |flag: &str, m: String| Status::invalid_argument(format!("{flag}: {m}"));
    let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
    for (k, v) in &labels {
        check_label(k, v).map_err(|m| bad("--labels", m))?;
    }
    let mut allow_labels = r.allow_labels;
    allow_labels.sort();
    allow_labels.dedup();
    for k in &allow_labels {
        check_label_key(k).map_err(|m| bad("--allow-labels", m))?;
        if labels.contains_key(k) {
            return Err(bad(
                "--allow-labels",
                format!("label {k} is set by the token's --labels, which a join cannot change"),
            ));
        }
    }
    let host = match (r.name.as_str(), r.replace.as_str()) {
        ("", "") => TokenHost::Any,
        (name, "") => {
            check_name("host", name).map_err(|m| bad("--name", m))?;
            TokenHost::Named(name.to_string())
        }
        (name, replace) if name.is_empty() || name == replace => {
            check_name("host", replace).map_err(|m| bad("--replace", m))?;
            if store.host(replace).map_err(internal)?.is_none() {
                return Err(Status::not_found(format!(
                    "--replace {replace}: no host of that name is enrolled (see `cutover hosts`); --name pins the name of a new host"
                )));
            }
            TokenHost::Replaces(replace.to_string())
        }
        (name, replace) => {
            return Err(Status::invalid_argument(format!(
                "--name {name} and --replace {replace} name different hosts"
            )));
        }
    };
    Ok(tokens::Grant {
        labels,
        host,
        allow_labels,
    })
}

/// Who a request says asked for it, as the timeline shows it: printable, at most 100
/// characters. It is what the client claims, next to the admin credentials it used.
fn actor(claimed: &str) -> String {
    claimed
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect::<String>()
        .trim()
        .to_string()
}

fn json_doc(v: &serde_json::Value) -> Result<Response<pb::JsonDocument>, Status> {
    Ok(Response::new(pb::JsonDocument {
        json: serde_json::to_string(v).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

/// `show` for deployment `id` (empty: the newest), with typical times from the service's
/// past successful deployments.
pub fn show_json(store: &Store, id: &str) -> Result<serde_json::Value, Status> {
    let records = store.deployments().map_err(internal)?;
    let d = if id.is_empty() {
        DeploymentRecord::newest(&records)
    } else {
        records.iter().find(|d| d.id == id)
    };
    let d = d.ok_or_else(|| {
        if id.is_empty() {
            Status::not_found("no deployment yet")
        } else {
            Status::not_found(format!("unknown deployment {id:?}"))
        }
    })?;
    let events = store.all_events().map_err(internal)?;
    let past: Vec<_> = records.iter().filter(|r| r.id != d.id).cloned().collect();
    let typical = report::typical(&past, &events, &d.service);
    let mine = events.get(&d.id).map_or(&[][..], Vec::as_slice);
    Ok(report::show(
        d,
        mine,
        &typical,
        cutover_shared::clock::now_ms(),
    ))
}

/// Every enrolled host with what it runs: desired slots and weights next to what its
/// agent last reported.
pub fn hosts_pb(store: &Store, fleet: &Fleet) -> Result<Vec<pb::Host>, Status> {
    let mut hosts = Vec::new();
    for h in store.hosts().map_err(internal)? {
        let observed = fleet.observed_all(&h.name);
        let mut names: Vec<String> = observed.iter().map(|o| o.service.clone()).collect();
        let desired: Vec<pb::DesiredService> = store
            .desired_for_host(&h.name)
            .map_err(internal)?
            .into_iter()
            .filter_map(|raw| pb::DesiredService::decode(raw.as_slice()).ok())
            .collect();
        names.extend(desired.iter().map(|d| d.service.clone()));
        names.sort();
        names.dedup();
        let services = names
            .into_iter()
            .map(|name| {
                let d = desired.iter().find(|d| d.service == name);
                let o = observed.iter().find(|o| o.service == name);
                let blue = slot_pb(d, o, Slot::Blue);
                let green = slot_pb(d, o, Slot::Green);
                let live = d
                    .and_then(|d| d.live_slot())
                    .and_then(|l| {
                        d?.slot(l)
                            .and_then(pb::SlotSpec::release_key)
                            .map(|(v, _)| v.to_string())
                    })
                    .unwrap_or_default();
                pb::HostService {
                    service: name,
                    live_release: live,
                    blue: Some(blue),
                    green: Some(green),
                }
            })
            .collect();
        hosts.push(pb::Host {
            connected: fleet.reachable(&h.name, now_ms()),
            last_seen_unix_ms: fleet.last_seen(&h.name).unwrap_or(0),
            name: h.name,
            labels: h.labels.into_iter().collect(),
            services,
        });
    }
    Ok(hosts)
}
