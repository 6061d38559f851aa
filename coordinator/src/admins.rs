//! The people who hold admin credentials: their roles, their records, and who made a
//! control call. Each person has a certificate of their own (`cutover admin create`),
//! known to the coordinator by its SHA-256, so that what the timeline says someone did
//! rests on the key they hold, never on what their client claims. Pure: the store keeps
//! the records, `grpc::access` decides with them.

use serde::{Deserialize, Serialize};

use crate::model::Identity;

/// What a person's certificate may do.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads only: status, hosts, history, show, stats (and following a deployment).
    Viewer,
    /// Everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }

    /// The role a request names; empty is `admin`, as `admin create` defaults.
    pub fn parse(text: &str) -> Result<Role, String> {
        match text {
            "" | "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            other => Err(format!(
                "--role: unknown role {other:?} (expected admin or viewer)"
            )),
        }
    }

    /// Whether this role may make a call that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

/// A person with credentials, as `admin list` shows them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminRecord {
    /// What the timeline records for everything their certificate does.
    pub name: String,
    pub role: Role,
    /// SHA-256 of their certificate.
    pub fingerprint: String,
    pub created_unix_ms: u64,
    /// Who issued it; empty for the coordinator's first-start credentials.
    #[serde(default)]
    pub created_by: String,
    /// When the certificate expires.
    pub expires_unix_ms: u64,
}

impl AdminRecord {
    /// The identity its certificate stands for.
    pub fn identity(&self) -> Identity {
        let name = self.name.clone();
        match self.role {
            Role::Admin => Identity::Admin { name },
            Role::Viewer => Identity::Viewer { name },
        }
    }
}

/// Who made a control call: the person behind the certificate presented, from the
/// store. Handlers read it from the request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The person an identity stands for, if it is one that may call `Control`.
    pub fn of(identity: &Identity) -> Option<Caller> {
        match identity {
            Identity::Admin { name } => Some(Caller {
                name: name.clone(),
                role: Role::Admin,
            }),
            Identity::Viewer { name } => Some(Caller {
                name: name.clone(),
                role: Role::Viewer,
            }),
            Identity::Agent { .. } | Identity::Revoked { .. } | Identity::RevokedAdmin { .. } => {
                None
            }
        }
    }
}

/// Why `admin revoke` cannot revoke someone.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("unknown admin {0:?} (see `cutover admin list`)")]
    Unknown(String),
    #[error(
        "{0} is the last holder of the admin role; create another admin first (`cutover admin create NAME`), or nobody could change anything any more"
    )]
    LastAdmin(String),
    #[error(
        "admin {0} already exists (see `cutover admin list`); revoke it first to issue new credentials under that name"
    )]
    Exists(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_order_and_parse() {
        assert!(Role::Admin.allows(Role::Viewer));
        assert!(Role::Admin.allows(Role::Admin));
        assert!(Role::Viewer.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Admin));
        assert_eq!(Role::parse(""), Ok(Role::Admin));
        assert_eq!(Role::parse("viewer"), Ok(Role::Viewer));
        assert!(Role::parse("root").unwrap_err().contains("admin or viewer"));
    }

    #[test]
    fn people_are_callers_and_machines_are_not() {
        let rec = AdminRecord {
            name: "ana".into(),
            role: Role::Viewer,
            fingerprint: "aa".into(),
            created_unix_ms: 1,
            created_by: "admin".into(),
            expires_unix_ms: 2,
        };
        assert_eq!(
            Caller::of(&rec.identity()),
            Some(Caller {
                name: "ana".into(),
                role: Role::Viewer
            })
        );
        assert_eq!(
            Caller::of(&Identity::Agent {
                host: "web-1".into()
            }),
            None
        );
        let revoked = Identity::RevokedAdmin {
            name: "ana".into(),
            by: "admin".into(),
            at_unix_ms: 3,
        };
        assert_eq!(Caller::of(&revoked), None);
        // Stored identities read back as written.
        for id in [rec.identity(), revoked] {
            let text = serde_json::to_string(&id).unwrap();
            assert_eq!(serde_json::from_str::<Identity>(&text).unwrap(), id);
        }
    }
}
