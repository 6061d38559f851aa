//! `Control`'s day-two calls, which the trait impl in [`super::control`] hands over to:
//! the service lifecycle (`service list|restart|stop|start|remove`), the releases kept
//! on the hosts and going back to one of them (`rollback --to`), and dry runs. Every call
//! has passed [`super::access`]; the actor recorded is the caller's certificate name.

use cutover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::Api;
use super::access::caller;
use super::control::json_doc;
use cutover_shared::plan::Plan;

use crate::engine::ServiceAction;
use crate::queries;

/// `cutover service list`.
pub async fn list_services(
    api: &Api,
    _req: Request<pb::ListServicesRequest>,
) -> Result<Response<pb::JsonDocument>, Status> {
    let s = &api.0;
    json_doc(&queries::services(&s.store, &s.fleet)?)
}

/// `cutover service restart|stop|start|remove SERVICE`.
pub async fn service_command(
    api: &Api,
    req: Request<pb::ServiceCommandRequest>,
) -> Result<Response<pb::ServiceCommandResponse>, Status> {
    let s = &api.0;
    let who = caller(&req)?;
    let r = req.into_inner();
    let action = match pb::ServiceAction::try_from(r.action) {
        Ok(pb::ServiceAction::Restart) => ServiceAction::Restart { hosts: r.hosts },
        Ok(pb::ServiceAction::Stop) => ServiceAction::Stop,
        Ok(pb::ServiceAction::Start) => ServiceAction::Start,
        Ok(pb::ServiceAction::Remove) => ServiceAction::Remove,
        Err(_) => return Err(Status::invalid_argument("unknown service action")),
    };
    let done = s.engine.service(r.service, action, who.name).await?;
    Ok(Response::new(pb::ServiceCommandResponse {
        deployment: done.deployment.unwrap_or_default(),
        hosts: done.hosts,
        noop: done.noop,
    }))
}

/// `cutover releases SERVICE`.
pub async fn releases(
    api: &Api,
    req: Request<pb::ReleasesRequest>,
) -> Result<Response<pb::JsonDocument>, Status> {
    let s = &api.0;
    let service = req.into_inner().service;
    json_doc(&queries::releases(&s.store, &s.fleet, &service)?)
}

/// `cutover rollback SERVICE --to VERSION`.
pub async fn rollback_to(
    api: &Api,
    req: Request<pb::RollbackToRequest>,
) -> Result<Response<pb::DeployResponse>, Status> {
    let s = &api.0;
    let who = caller(&req)?;
    let r = req.into_inner();
    let created = s.engine.rollback_to(r.service, r.version, who.name).await?;
    Ok(Response::new(pb::DeployResponse {
        id: created.id,
        noop: created.noop,
    }))
}

/// `cutover deploy PLAN --dry-run`, `cutover plan diff PLAN`.
pub async fn dry_run(
    api: &Api,
    req: Request<pb::DeployRequest>,
) -> Result<Response<pb::JsonDocument>, Status> {
    let s = &api.0;
    let r = req.into_inner();
    let path = if r.plan_path.is_empty() {
        "plan".to_string()
    } else {
        r.plan_path
    };
    let plan =
        Plan::parse(&r.plan_toml, &path).map_err(|e| Status::invalid_argument(e.to_string()))?;
    json_doc(&s.engine.dry_run(plan).await?)
}
