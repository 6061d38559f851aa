//! `cutover releases SERVICE`: the releases the hosts keep unpacked (what a rollback
//! starts without a download), with when and by whom each was deployed, and which is
//! live or previous. `cutover rollback SERVICE --to VERSION` goes back to one of them.

use cutover_proto::v1 as pb;

use super::conn::decode;
use super::table::{or_dash, print_table};
use super::{Conn, Output, Result};
use crate::cli::out::print_json;
use crate::inventory::ReleaseRow;

pub async fn run(conn: &Conn, service: String, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let doc = client
        .releases(pb::ReleasesRequest { service })
        .await?
        .into_inner();
    let rows: Vec<ReleaseRow> = decode(&doc, "release list")?;
    match output {
        Output::Json => print_json(&rows),
        Output::Text => print_table(&release_rows(&rows), &[]),
    }
    Ok(0)
}

/// The `releases` table, header first.
fn release_rows(rows: &[ReleaseRow]) -> Vec<[String; 7]> {
    let header = [
        "VERSION",
        "SHA256",
        "",
        "DEPLOYED",
        "BY",
        "KEPT ON",
        "DEPLOYMENT",
    ];
    let mut table = vec![header.map(String::from)];
    for r in rows {
        let status = match (r.live, r.previous) {
            (true, _) => "live",
            (_, true) => "previous",
            _ => "",
        };
        table.push([
            r.version.clone(),
            r.sha256.chars().take(12).collect(),
            status.to_string(),
            or_dash(r.deployed_at.clone().unwrap_or_default()),
            or_dash(r.deployed_by.clone().unwrap_or_default()),
            format!("{} ({})", r.hosts.len(), or_dash(r.hosts.join(","))),
            or_dash(r.deployment.clone().unwrap_or_default()),
        ]);
    }
    table
}
