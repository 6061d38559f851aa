//! `cutover service …`: the services with what they run, and their life without a new
//! release — `restart` (a deployment of the live release through the idle slots, host
//! wave by host wave, health-gated), `stop`, `start` and `remove`.

use cutover_proto::v1::{self as pb, ServiceAction};
use serde_json::json;

use super::conn::{Client, decode};
use super::table::{or_dash, print_table};
use super::{Conn, Failure, Output, Result, deploy};
use crate::cli::out::print_json;
use crate::errln;
use crate::inventory::ServiceRow;

/// `cutover service …`
#[derive(clap::Subcommand)]
pub enum ServiceCmd {
    /// Every service: its state, live and previous release, and where it runs.
    List,
    /// Restart a service's slot processes without a new release: host wave by host
    /// wave (the plan's max_parallel), each started anew in the idle slot, health-checked,
    /// then given the traffic while the old process drains. Prints the deployment's id.
    Restart {
        /// The service to restart.
        service: String,
        /// Only these hosts (comma-separated) [default: every host running it].
        #[arg(long, value_delimiter = ',', value_name = "HOST,...")]
        hosts: Vec<String>,
        /// Follow progress on stderr until the restart ends.
        #[arg(long)]
        wait: bool,
    },
    /// Stop every slot process of a service on every host; its port stays bound (and
    /// answers 503) and no deployment starts until `service start`.
    Stop {
        /// The service to stop.
        service: String,
    },
    /// Start a stopped service's slots again.
    Start {
        /// The service to start.
        service: String,
    },
    /// Stop both slots on every host, let the public port go and forget the service
    /// (its releases and slot logs on the hosts too; its state directory stays).
    Remove {
        /// The service to remove.
        service: String,
        /// Confirm: the service stops serving everywhere.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(cmd: ServiceCmd, conn: &Conn, output: Output) -> Result<i32> {
    match cmd {
        ServiceCmd::List => list(conn, output).await,
        ServiceCmd::Restart {
            service,
            hosts,
            wait,
        } => restart(conn, service, hosts, wait, output).await,
        ServiceCmd::Stop { service } => act(conn, service, ServiceAction::Stop, output).await,
        ServiceCmd::Start { service } => act(conn, service, ServiceAction::Start, output).await,
        ServiceCmd::Remove { service, yes } => {
            if !yes {
                return Err(Failure::usage(format!(
                    "service remove {service} stops it on every host and forgets it; add --yes to confirm"
                )));
            }
            act(conn, service, ServiceAction::Remove, output).await
        }
    }
}

async fn list(conn: &Conn, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let doc = client
        .list_services(pb::ListServicesRequest {})
        .await?
        .into_inner();
    let rows: Vec<ServiceRow> = decode(&doc, "service list")?;
    match output {
        Output::Json => print_json(&rows),
        Output::Text => print_table(&service_rows(&rows), &[]),
    }
    Ok(0)
}

/// The `service list` table, header first.
fn service_rows(rows: &[ServiceRow]) -> Vec<[String; 7]> {
    let header = [
        "SERVICE", "STATE", "LIVE", "PREVIOUS", "LISTEN", "SERVING", "HOSTS",
    ];
    let mut table = vec![header.map(String::from)];
    for r in rows {
        let state = match &r.deployment {
            Some(id) => format!("{} ({id})", r.state),
            None => r.state.clone(),
        };
        table.push([
            r.service.clone(),
            state,
            or_dash(r.live_release.clone().unwrap_or_default()),
            or_dash(r.previous_release.clone().unwrap_or_default()),
            r.listen.map_or("-".into(), |p| p.to_string()),
            format!("{}/{}", r.serving, r.hosts.len()),
            or_dash(r.hosts.join(",")),
        ]);
    }
    table
}

/// Sends one service action; the coordinator's answer.
async fn send(
    client: &mut Client,
    service: String,
    action: ServiceAction,
    hosts: Vec<String>,
) -> Result<pb::ServiceCommandResponse> {
    Ok(client
        .service_command(pb::ServiceCommandRequest {
            service,
            action: action as i32,
            hosts,
        })
        .await?
        .into_inner())
}

/// `service restart`: prints the deployment's id like `deploy`, and with `--wait`
/// follows it to its end.
async fn restart(
    conn: &Conn,
    service: String,
    hosts: Vec<String>,
    wait: bool,
    output: Output,
) -> Result<i32> {
    let mut client = conn.client().await?;
    let done = send(&mut client, service, ServiceAction::Restart, hosts).await?;
    let resp = pb::DeployResponse {
        id: done.deployment,
        noop: false,
    };
    deploy::follow_up(&mut client, resp, wait, output).await
}

/// `service stop|start|remove`.
async fn act(conn: &Conn, service: String, action: ServiceAction, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let done = send(&mut client, service.clone(), action, Vec::new()).await?;
    let what = match action {
        ServiceAction::Stop => "stopped",
        ServiceAction::Start => "started",
        ServiceAction::Remove => "removed",
        ServiceAction::Restart => "restarted",
    };
    match output {
        Output::Json => print_json(
            &json!({"service": service, "action": what, "hosts": done.hosts, "noop": done.noop}),
        ),
        Output::Text if done.noop => errln!("service {service} was already {what}; nothing to do"),
        Output::Text => errln!(
            "service {service} {what} on {} host(s){}",
            done.hosts.len(),
            if done.hosts.is_empty() {
                String::new()
            } else {
                format!(": {}", done.hosts.join(", "))
            }
        ),
    }
    Ok(0)
}
