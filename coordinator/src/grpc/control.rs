//! `Control`: the release manager's API. Join tokens, hosts, deployments, the
//! operator's commands (with `contract`), people's credentials and deploy locks; the
//! reads (`history`, `show`, `stats`) answer with the typed reports of [`crate::report`]
//! as JSON documents. Every call has passed [`super::access`] (certificate and role)
//! before it gets here; what a handler records as the actor is that caller's name.

use std::collections::BTreeMap;

use cutover_proto::v1::{self as pb, control_server::Control};
use cutover_shared::clock::now_ms;
use cutover_shared::names::{check_label, check_label_key, check_name};
use cutover_shared::plan::Plan;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::access::caller;
use super::status::internal;
use super::{Api, deployment_to_pb, logs, ops};
use crate::model::{DeploymentRecord, TokenHost};
use crate::rollout::Command;
use crate::store::Store;
use crate::{queries, tokens};

/// A join token lives this long when the request does not say.
const DEFAULT_TOKEN_TTL_MS: u64 = 3_600_000;
/// `history` shows this many deployments when the request does not say.
const DEFAULT_HISTORY: usize = 20;

#[tonic::async_trait]
impl Control for Api {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let s = &self.0;
        let r = req.into_inner();
        let ttl = if r.ttl_ms == 0 {
            DEFAULT_TOKEN_TTL_MS
        } else {
            r.ttl_ms
        };
        let uses = r.uses.max(1);
        let grant = grant(&s.store, r)?;
        let (tok, rec) = tokens::issue(&s.ca.fingerprint, grant, ttl, uses, now_ms());
        s.store.put_token(&rec)?;
        tracing::info!(token = rec.id, host = ?rec.host, "join token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: tok.encode(),
            id: rec.id,
            expires_unix_ms: rec.expires_unix_ms,
        }))
    }

    async fn list_tokens(
        &self,
        _req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let s = &self.0;
        let tokens = s
            .store
            .tokens()?
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
        let id = req.into_inner().id.to_ascii_lowercase();
        if !s.store.revoke_token(&id)? {
            return Err(Status::not_found(format!(
                "unknown token {id:?} (see `cutover token list`)"
            )));
        }
        tracing::info!(token = id, "join token revoked");
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn list_hosts(
        &self,
        _req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        let s = &self.0;
        let hosts = queries::hosts(&s.store, &s.fleet, now_ms())?;
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn remove_host(
        &self,
        req: Request<pb::RemoveHostRequest>,
    ) -> Result<Response<pb::RemoveHostResponse>, Status> {
        let s = &self.0;
        let name = req.into_inner().name;
        if !s.store.remove_host(&name)? {
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
        let who = caller(&req)?;
        let r = req.into_inner();
        let path = if r.plan_path.is_empty() {
            "plan".to_string()
        } else {
            r.plan_path
        };
        let plan = Plan::parse(&r.plan_toml, &path)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let created = s.engine.deploy(plan, path, who.name).await?;
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
        let dep = queries::deployment(&s.store, &req.into_inner().id)?;
        Ok(Response::new(with_lock(&s.store, &dep)?))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        let s = &self.0;
        let who = caller(&req)?;
        let r = req.into_inner();
        let created = s.engine.rollback(r.service, who.name).await?;
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
        let r = req.into_inner();
        let limit = match r.limit {
            0 => DEFAULT_HISTORY,
            n => n as usize,
        };
        let service = (!r.service.is_empty()).then_some(r.service.as_str());
        json_doc(&queries::history(
            &s.store,
            service,
            r.since_unix_ms,
            limit,
        )?)
    }

    async fn show(
        &self,
        req: Request<pb::ShowRequest>,
    ) -> Result<Response<pb::JsonDocument>, Status> {
        let s = &self.0;
        json_doc(&queries::show(&s.store, &req.into_inner().id, now_ms())?)
    }

    async fn stats(
        &self,
        req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::JsonDocument>, Status> {
        let s = &self.0;
        let r = req.into_inner();
        let service = (!r.service.is_empty()).then_some(r.service.as_str());
        json_doc(&queries::stats(
            &s.store,
            service,
            r.since_unix_ms,
            now_ms(),
        )?)
    }

    async fn create_admin(
        &self,
        req: Request<pb::CreateAdminRequest>,
    ) -> Result<Response<pb::CreateAdminResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(self.issue_admin(&who, req.into_inner())?))
    }

    async fn list_admins(
        &self,
        _req: Request<pb::ListAdminsRequest>,
    ) -> Result<Response<pb::ListAdminsResponse>, Status> {
        Ok(Response::new(self.admin_list()?))
    }

    async fn revoke_admin(
        &self,
        req: Request<pb::RevokeAdminRequest>,
    ) -> Result<Response<pb::RevokeAdminResponse>, Status> {
        let who = caller(&req)?;
        self.revoke_credentials(&who, &req.into_inner().name)?;
        Ok(Response::new(pb::RevokeAdminResponse {}))
    }

    async fn lock_service(
        &self,
        req: Request<pb::LockServiceRequest>,
    ) -> Result<Response<pb::ServiceLock>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(self.lock(&who, req.into_inner())?))
    }

    async fn unlock_service(
        &self,
        req: Request<pb::UnlockServiceRequest>,
    ) -> Result<Response<pb::ServiceLock>, Status> {
        let who = caller(&req)?;
        let service = req.into_inner().service;
        Ok(Response::new(self.unlock(&who, &service)?))
    }

    async fn contract(
        &self,
        req: Request<pb::ContractRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let dep = self.0.engine.contract(r.service, who.name).await?;
        Ok(Response::new(deployment_to_pb(&dep)))
    }

    async fn command(
        &self,
        req: Request<pb::CommandRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let s = &self.0;
        let who = caller(&req)?;
        let r = req.into_inner();
        let command = match pb::DeploymentCommand::try_from(r.command) {
            Ok(pb::DeploymentCommand::Pause) => Command::Pause,
            Ok(pb::DeploymentCommand::Resume) => Command::Resume,
            Ok(pb::DeploymentCommand::Promote) => Command::Promote,
            Ok(pb::DeploymentCommand::Abort) => Command::Abort,
            Err(_) => return Err(Status::invalid_argument("unknown command")),
        };
        let dep = s.engine.command(r.id, command, who.name).await?;
        Ok(Response::new(with_lock(&s.store, &dep)?))
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::JsonDocument>, Status> {
        ops::list_services(self, req).await
    }

    async fn service_command(
        &self,
        req: Request<pb::ServiceCommandRequest>,
    ) -> Result<Response<pb::ServiceCommandResponse>, Status> {
        ops::service_command(self, req).await
    }

    async fn releases(
        &self,
        req: Request<pb::ReleasesRequest>,
    ) -> Result<Response<pb::JsonDocument>, Status> {
        ops::releases(self, req).await
    }

    async fn rollback_to(
        &self,
        req: Request<pb::RollbackToRequest>,
    ) -> Result<Response<pb::DeployResponse>, Status> {
        ops::rollback_to(self, req).await
    }

    async fn dry_run(
        &self,
        req: Request<pb::DeployRequest>,
    ) -> Result<Response<pb::JsonDocument>, Status> {
        ops::dry_run(self, req).await
    }

    type LogsStream = logs::LogsStream;

    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        logs::logs(self, req).await
    }
}

/// What a `token create` request grants, checked: label syntax, the host name it pins
/// or replaces (which must be enrolled), and the label keys a join may add.
fn grant(store: &Store, r: pb::CreateTokenRequest) -> Result<tokens::Grant, Status> {
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
    Ok(tokens::Grant {
        labels,
        host: token_host(store, &r.name, &r.replace)?,
        allow_labels,
    })
}

/// A flag of `token create` the coordinator refuses, and why.
fn bad(flag: &str, m: String) -> Status {
    Status::invalid_argument(format!("{flag}: {m}"))
}

/// The host a token may enrol: any, a named new one (`--name`), or an enrolled one it
/// replaces (`--replace`, which must name an enrolled host).
fn token_host(store: &Store, name: &str, replace: &str) -> Result<TokenHost, Status> {
    match (name, replace) {
        ("", "") => Ok(TokenHost::Any),
        (name, "") => {
            check_name("host", name).map_err(|m| bad("--name", m))?;
            Ok(TokenHost::Named(name.to_string()))
        }
        (name, replace) if name.is_empty() || name == replace => {
            check_name("host", replace).map_err(|m| bad("--replace", m))?;
            if store.host(replace)?.is_none() {
                return Err(Status::not_found(format!(
                    "--replace {replace}: no host of that name is enrolled (see `cutover hosts`); --name pins the name of a new host"
                )));
            }
            Ok(TokenHost::Replaces(replace.to_string()))
        }
        (name, replace) => Err(Status::invalid_argument(format!(
            "--name {name} and --replace {replace} name different hosts"
        ))),
    }
}

/// A deployment in protocol form, with its service's lock if it has one.
fn with_lock(store: &Store, d: &DeploymentRecord) -> Result<pb::Deployment, Status> {
    let mut pb = deployment_to_pb(d);
    pb.lock = store.lock(&d.service)?.map(|l| l.to_pb());
    Ok(pb)
}

/// A report as the JSON document the control API answers with; object keys sorted, as
/// in every JSON document cutover writes.
pub(super) fn json_doc<T: Serialize>(report: &T) -> Result<Response<pb::JsonDocument>, Status> {
    let json = serde_json::to_string(&crate::views::to_value(report)).map_err(internal)?;
    Ok(Response::new(pb::JsonDocument { json }))
}
