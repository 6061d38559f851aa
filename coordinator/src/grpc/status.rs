//! The one mapping of domain errors to `tonic::Status`: what the caller is told, with
//! which code. Internal errors are logged here, once.

use tonic::Status;

use crate::model::Revocation;
use crate::{engine, queries, store, tokens};

/// An error that is the coordinator's, not the caller's: logged, and sent as `internal`.
pub fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal(e.to_string())
}

impl From<store::Error> for Status {
    fn from(e: store::Error) -> Status {
        internal(e)
    }
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

impl From<queries::Error> for Status {
    fn from(e: queries::Error) -> Status {
        match e {
            queries::Error::NotFound(m) => Status::not_found(m),
            queries::Error::Store(e) => internal(e),
        }
    }
}

/// The refusal of a revoked agent certificate: it says why, and carries
/// [`cutover_proto::REVOKED_METADATA`] so that the agent stops for good.
pub fn revoked(host: &str, reason: Revocation) -> Status {
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

/// The refusal of a person's revoked certificate: whose it was, and who revoked it when.
pub fn revoked_admin(name: &str, by: &str, at_unix_ms: u64) -> Status {
    let when = crate::views::rfc3339(at_unix_ms)
        .map(|t| format!(" at {t}"))
        .unwrap_or_default();
    let by = if by.is_empty() {
        String::new()
    } else {
        format!(" by {by}")
    };
    Status::permission_denied(format!(
        "the credentials of {name} were revoked{by}{when}; ask an admin for new ones (`cutover admin create`)"
    ))
}
