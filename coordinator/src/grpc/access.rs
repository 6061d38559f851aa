//! Who may call which `Control` method, decided in one place for every call: the
//! certificate presented names a person and their role (from the store), and the
//! method needs a role. [`Guarded`] wraps the whole `Control` service, so no handler can
//! forget the check; the handler finds the [`Caller`] in the request's extensions and
//! records that name — never what the client says about itself — as the actor.
//!
//! Methods that only read are open to viewers; every other method, including any added
//! later and not listed here, needs the admin role.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::Shared;
use crate::admins::{Caller, Role};

/// The `Control` methods a viewer may call: they read, and change nothing.
const READ_ONLY: &[&str] = &[
    "ListHosts",
    "GetDeployment",
    "History",
    "Show",
    "Stats",
    "Logs",
    "Releases",
    "ListServices",
    "DryRun",
];

/// The role a `Control` method needs.
pub fn needed(method: &str) -> Role {
    if READ_ONLY.contains(&method) {
        Role::Viewer
    } else {
        Role::Admin
    }
}

/// Passes `caller` to `method`, or says why not: naming the person, their role and
/// the call.
pub fn check(caller: &Caller, method: &str) -> Result<(), Status> {
    if caller.role.allows(needed(method)) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "{} has the {} role, which may only read (status, hosts, history, show, stats, watch, logs, releases, service list, dry runs); {method} needs the admin role",
        caller.name,
        caller.role.as_str()
    )))
}

/// The person who made a call, as [`Guarded`] found them.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("control call without an authorised caller"))
}

/// A service whose every call is first checked by [`Shared::authorise`].
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, shared: Arc<Shared>) -> Self {
        Guarded { inner, shared }
    }
}

impl<S> tower::Service<http::Request<Body>> for Guarded<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        // `/cutover.v1.Control/Deploy` → `Deploy`.
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        let allowed = self
            .shared
            .caller(certs.as_deref().map(Vec::as_slice))
            .and_then(|caller| check(&caller, method).map(|()| caller));
        match allowed {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(role: Role) -> Caller {
        Caller {
            name: "ana".into(),
            role,
        }
    }

    #[test]
    fn viewers_read_and_admins_do_everything() {
        for read in READ_ONLY {
            assert!(check(&person(Role::Viewer), read).is_ok(), "{read}");
        }
        for write in [
            "Deploy",
            "Rollback",
            "Command",
            "CreateToken",
            "ListTokens",
            "RemoveHost",
            "CreateAdmin",
            "ListAdmins",
            "RevokeAdmin",
            "LockService",
            "UnlockService",
            "SomethingAddedLater",
        ] {
            assert!(check(&person(Role::Admin), write).is_ok(), "{write}");
            let refused = check(&person(Role::Viewer), write).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::PermissionDenied);
            assert_eq!(
                refused.message(),
                format!(
                    "ana has the viewer role, which may only read (status, hosts, history, show, stats, watch, logs, releases, service list, dry runs); {write} needs the admin role"
                )
            );
        }
    }
}
