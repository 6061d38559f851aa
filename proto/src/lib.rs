//! cutover's wire protocol: generated gRPC types and stubs for the three services —
//! `Enroll` (a host joins), `AgentLink` (one long-lived stream per agent) and `Control`
//! (the CLI) — plus the TLS client set-up that every connection to the coordinator uses,
//! how every listener of both daemons accepts connections ([`listen`]), the codec of
//! every call ([`codec`]: small first buffers) and the words both sides use about the
//! messages ([`vocab`]: slots, phase names, link timing).

#[allow(clippy::all, clippy::unwrap_used, missing_docs, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("cutover.v1");
}
pub mod codec;
pub mod listen;
pub mod tls;
pub mod vocab;

pub use v1::*;
pub use vocab::{Slot, link};

/// Metadata key on the refusal of a revoked agent certificate; its value says why
/// (`removed` or `replaced`). Agents stop for good when they see it.
pub const REVOKED_METADATA: &str = "cutover-revoked";
