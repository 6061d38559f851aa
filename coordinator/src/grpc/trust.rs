//! The `Control` methods about trust: people's credentials (`admin create|list|revoke`)
//! and deploy locks (`lock`, `unlock`). [`super::access`] has already checked that the
//! caller holds the admin role; the caller's name is what these record as "by".

use cutover_proto::v1 as pb;
use cutover_shared::clock::now_ms;
use cutover_shared::names::check_name;
use tonic::Status;

use super::Api;
use super::status::internal;
use crate::admins::{AdminRecord, Caller, Refusal, Role};
use crate::locks::{self, LockRecord};
use crate::model::FIRST_ADMIN;
use crate::pki;

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        let message = r.to_string();
        match r {
            Refusal::Unknown(_) => Status::not_found(message),
            Refusal::Exists(_) => Status::already_exists(message),
            Refusal::LastAdmin(_) => Status::failed_precondition(message),
        }
    }
}

impl Api {
    /// `admin create`: signs the person's CSR under their name and records who they are.
    pub(super) fn issue_admin(
        &self,
        by: &Caller,
        r: pb::CreateAdminRequest,
    ) -> Result<pb::CreateAdminResponse, Status> {
        let s = &self.0;
        check_name("admin", &r.name).map_err(Status::invalid_argument)?;
        if r.name == FIRST_ADMIN {
            return Err(Status::invalid_argument(format!(
                "the name {FIRST_ADMIN} belongs to the coordinator's first-start credentials (DATA/admin); choose another"
            )));
        }
        let role = Role::parse(&r.role).map_err(Status::invalid_argument)?;
        let (certificate_pem, der, not_after) =
            s.ca.sign_admin_csr(&r.csr_pem, &r.name)
                .map_err(|e| match e {
                    pki::Error::BadCsr(_) => Status::invalid_argument(e.to_string()),
                    e => internal(e),
                })?;
        let rec = AdminRecord {
            name: r.name,
            role,
            fingerprint: cutover_proto::tls::fingerprint(&der),
            created_unix_ms: now_ms(),
            created_by: by.name.clone(),
            expires_unix_ms: not_after,
        };
        s.store.create_admin(&rec)??;
        tracing::info!(
            name = rec.name,
            role = role.as_str(),
            by = by.name,
            "admin credentials issued"
        );
        Ok(pb::CreateAdminResponse {
            certificate_pem,
            ca_pem: s.ca.cert_pem.clone(),
            fingerprint: rec.fingerprint,
            not_after_unix_ms: not_after,
        })
    }

    /// `admin list`: everyone who holds credentials.
    pub(super) fn admin_list(&self) -> Result<pb::ListAdminsResponse, Status> {
        let admins = self
            .0
            .store
            .admins()?
            .into_iter()
            .map(|a| pb::AdminInfo {
                name: a.name,
                role: a.role.as_str().into(),
                fingerprint: a.fingerprint,
                created_unix_ms: a.created_unix_ms,
                created_by: a.created_by,
                expires_unix_ms: a.expires_unix_ms,
            })
            .collect();
        Ok(pb::ListAdminsResponse { admins })
    }

    /// `admin revoke NAME`: their certificate opens nothing from the next call on.
    pub(super) fn revoke_credentials(&self, by: &Caller, name: &str) -> Result<(), Status> {
        let gone = self.0.store.revoke_admin(name, &by.name, now_ms())??;
        tracing::info!(
            name = gone.name,
            role = gone.role.as_str(),
            by = by.name,
            "admin credentials revoked"
        );
        Ok(())
    }

    /// `lock SERVICE --message TEXT`.
    pub(super) fn lock(
        &self,
        by: &Caller,
        r: pb::LockServiceRequest,
    ) -> Result<pb::ServiceLock, Status> {
        let s = &self.0;
        check_name("service", &r.service).map_err(Status::invalid_argument)?;
        let message = locks::check_message(&r.message).map_err(Status::invalid_argument)?;
        if s.store.service(&r.service)?.is_none() {
            return Err(Status::not_found(format!(
                "unknown service {:?}: nothing was ever deployed under that name",
                r.service
            )));
        }
        let lock = LockRecord {
            service: r.service,
            message,
            by: by.name.clone(),
            at_unix_ms: now_ms(),
        };
        if let Err(held) = s.store.put_lock(&lock)? {
            return Err(Status::failed_precondition(format!(
                "{}; it stays as it is",
                held.refusal()
            )));
        }
        tracing::info!(
            service = lock.service,
            by = by.name,
            message = lock.message,
            "service locked"
        );
        Ok(lock.to_pb())
    }

    /// `unlock SERVICE`: the lock it lifted.
    pub(super) fn unlock(&self, by: &Caller, service: &str) -> Result<pb::ServiceLock, Status> {
        let Some(lifted) = self.0.store.remove_lock(service)? else {
            return Err(Status::failed_precondition(format!(
                "service {service} is not locked"
            )));
        };
        tracing::info!(
            service,
            by = by.name,
            locked_by = lifted.by,
            "service unlocked"
        );
        Ok(lifted.to_pb())
    }
}
