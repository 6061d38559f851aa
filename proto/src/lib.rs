//! cutover's wire protocol: generated gRPC types and stubs for the three services —
//! `Enroll` (a host joins), `AgentLink` (one long-lived stream per agent) and `Control`
//! (the CLI) — plus the TLS client set-up that every connection to the coordinator uses,
//! and how every listener of both daemons accepts connections ([`listen`]).

#[allow(clippy::all, clippy::unwrap_used, missing_docs, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("cutover.v1");
}
pub mod listen;
pub mod tls;

pub use v1::*;

/// Metadata key on the refusal of a revoked agent certificate; its value says why
/// (`removed` or `replaced`). Agents stop for good when they see it.
pub const REVOKED_METADATA: &str = "cutover-revoked";
