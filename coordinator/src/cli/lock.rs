//! `cutover lock SERVICE --message TEXT` and `cutover unlock SERVICE`: deploy locks. A
//! locked service refuses `deploy` and `rollback` with the message, who locked it and
//! when; `status`, `hosts` and the dashboard show the lock.

use cutover_proto::v1 as pb;
use serde_json::json;

use super::{Conn, Failure, Output, Result};
use crate::cli::out::print_json;
use crate::views::{Lock, rfc3339};
use crate::{errln, locks};

/// `cutover lock`'s arguments.
#[derive(clap::Args)]
pub struct LockArgs {
    /// The service to lock.
    service: String,
    /// Why: shown to everyone whose deployment the lock refuses (one line).
    #[arg(long, short = 'm', value_name = "TEXT")]
    message: String,
}

/// `cutover lock SERVICE --message TEXT`.
pub async fn lock(conn: &Conn, args: LockArgs, output: Output) -> Result<i32> {
    let message = locks::check_message(&args.message).map_err(Failure::usage)?;
    let mut client = conn.client().await?;
    let lock = client
        .lock_service(pb::LockServiceRequest {
            service: args.service,
            message,
        })
        .await?
        .into_inner();
    match output {
        Output::Json => print_json(&Lock::from(&lock)),
        Output::Text => errln!(
            "service {} locked by {}: deployments and rollbacks are refused until `cutover unlock {}`",
            lock.service,
            lock.by,
            lock.service
        ),
    }
    Ok(0)
}

/// `cutover unlock SERVICE`.
pub async fn unlock(conn: &Conn, service: String, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let lifted = client
        .unlock_service(pb::UnlockServiceRequest { service })
        .await?
        .into_inner();
    match output {
        Output::Json => print_json(&json!({ "unlocked": Lock::from(&lifted) })),
        Output::Text => errln!(
            "service {} unlocked (locked by {} since {}: {:?})",
            lifted.service,
            lifted.by,
            rfc3339(lifted.at_unix_ms).unwrap_or_default(),
            lifted.message
        ),
    }
    Ok(0)
}
