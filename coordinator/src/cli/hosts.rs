//! `cutover hosts`: the enrolled hosts with what each runs, and `hosts remove`, which
//! revokes a host's certificate.

use cutover_proto::v1 as pb;
use serde_json::json;

use super::table::{or_dash, print_table};
use super::{Conn, Output, Result};
use crate::cli::out::print_json;
use crate::{errln, views};

/// `cutover hosts …`
#[derive(clap::Subcommand)]
pub enum HostsCmd {
    /// Remove a host and revoke its certificate.
    Remove {
        /// The host's name.
        name: String,
    },
}

pub async fn run(cmd: Option<HostsCmd>, conn: &Conn, output: Output) -> Result<i32> {
    match cmd {
        None => list(conn, output).await,
        Some(HostsCmd::Remove { name }) => remove(conn, name, output).await,
    }
}

async fn list(conn: &Conn, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let hosts = client
        .list_hosts(pb::ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    match output {
        Output::Json => print_json(&views::hosts(&hosts)),
        Output::Text => print_table(&host_rows(&hosts), &[]),
    }
    Ok(0)
}

/// The `hosts` table, header first: one row per host, its services in one cell.
fn host_rows(hosts: &[pb::Host]) -> Vec<[String; 4]> {
    let mut rows = vec![["NAME", "CONNECTED", "LABELS", "SERVICES"].map(String::from)];
    for h in hosts {
        let mut labels: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let services: Vec<String> = h.services.iter().map(service_cell).collect();
        rows.push([
            h.name.clone(),
            if h.connected { "yes" } else { "no" }.to_string(),
            or_dash(labels.join(",")),
            services.join("; "),
        ]);
    }
    rows
}

/// `web live=1.2 blue=1.2:healthy@100% green=-`, and `locked by ana` while it is.
fn service_cell(s: &pb::HostService) -> String {
    let slot = |x: &Option<pb::HostSlot>| {
        x.as_ref()
            .filter(|x| !x.release.is_empty())
            .map(|x| format!("{}:{}@{}%", x.release, x.state, x.weight))
            .unwrap_or_else(|| "-".into())
    };
    let lock = s
        .lock
        .as_ref()
        .map(|l| format!(" locked by {}", l.by))
        .unwrap_or_default();
    format!(
        "{} live={} blue={} green={}{lock}",
        s.service,
        if s.live_release.is_empty() {
            "-"
        } else {
            &s.live_release
        },
        slot(&s.blue),
        slot(&s.green)
    )
}

async fn remove(conn: &Conn, name: String, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    client
        .remove_host(pb::RemoveHostRequest { name: name.clone() })
        .await?;
    match output {
        Output::Json => print_json(&json!({"removed": name})),
        Output::Text => errln!("host {name} removed; its certificate is revoked"),
    }
    Ok(0)
}
