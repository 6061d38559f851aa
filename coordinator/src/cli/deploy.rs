//! Changing deployments: `deploy` (a plan, with the command line's overrides),
//! `rollback`, `contract`, the manual controls (`pause`, `resume`, `promote`, `abort`),
//! and `status`, which shows one deployment. `--wait` hands over to [`super::follow`].

use std::path::{Path, PathBuf};

use cutover_proto::v1::{self as pb, DeploymentCommand};
use cutover_shared::plan::Plan;
use serde_json::json;

use super::conn::Client;
use super::plan::{Overrides, load_plan};
use super::{Conn, Failure, Output, Result, dry_run, follow};
use crate::cli::out::print_json;
use crate::{errln, outln, views};

/// `cutover deploy`'s arguments.
#[derive(clap::Args)]
pub struct DeployArgs {
    /// The plan file (TOML).
    plan: PathBuf,
    /// Deploy this version instead of the plan's `[release] version`.
    #[arg(long, value_name = "VERSION")]
    release: Option<String>,
    /// Fetch this artifact instead of the plan's `[release] artifact`.
    #[arg(long, value_name = "URL")]
    artifact: Option<String>,
    /// The artifact's SHA-256 instead of the plan's `[release] sha256`.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// Follow progress on stderr until the deployment ends; the exit code says how
    /// it ended.
    #[arg(long, conflicts_with = "dry_run")]
    wait: bool,
    /// Show what the deployment would do (hosts, slots, the diff against the live
    /// release, steps) and change nothing; also `cutover plan diff PLAN`.
    #[arg(long)]
    dry_run: bool,
}

/// `cutover deploy PLAN`: prints the new deployment's id on the first stdout line.
pub async fn deploy(conn: &Conn, args: DeployArgs, output: Output) -> Result<i32> {
    let overrides = Overrides {
        release: args.release,
        artifact: args.artifact,
        sha256: args.sha256,
    };
    let plan = load_plan(&args.plan, overrides)?;
    if args.dry_run {
        return dry_run::run(conn, &plan, &args.plan, output).await;
    }
    let mut client = conn.client().await?;
    let resp = client
        .deploy(deploy_request(&plan, &args.plan)?)
        .await?
        .into_inner();
    follow_up(&mut client, resp, args.wait, output).await
}

/// The plan as the coordinator receives it: re-encoded with the overrides applied.
fn deploy_request(plan: &Plan, path: &Path) -> Result<pb::DeployRequest> {
    let text = toml::to_string(plan).map_err(|e| Failure::other(format!("encode plan: {e}")))?;
    Ok(pb::DeployRequest {
        plan_toml: text,
        plan_path: path.display().to_string(),
        ..Default::default()
    })
}

/// `cutover rollback SERVICE [--to VERSION]`.
pub async fn rollback(
    conn: &Conn,
    service: String,
    to: Option<String>,
    wait: bool,
    output: Output,
) -> Result<i32> {
    let mut client = conn.client().await?;
    let resp = match to {
        Some(version) => client
            .rollback_to(pb::RollbackToRequest { service, version })
            .await?
            .into_inner(),
        None => client
            .rollback(pb::RollbackRequest {
                service,
                ..Default::default()
            })
            .await?
            .into_inner(),
    };
    follow_up(&mut client, resp, wait, output).await
}

/// `cutover contract SERVICE`: prints the id of the deployment whose change is being
/// contracted, and with `--wait` follows the contract to its end.
pub async fn contract(conn: &Conn, service: String, wait: bool, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let d = client
        .contract(pb::ContractRequest { service })
        .await?
        .into_inner();
    let db = views::Database::from(&d.database.clone().unwrap_or_default());
    if !wait {
        match output {
            Output::Json => print_json(&views::Deployment::from(&d)),
            Output::Text => outln!("{} {}", d.id, db.phase),
        }
        return Ok(0);
    }
    errln!("{}: database {}", d.id, db.summary());
    let d = follow_contract(&mut client, &d.id).await?;
    let db = views::Database::from(&d.database.clone().unwrap_or_default());
    match output {
        Output::Json => print_json(&views::Deployment::from(&d)),
        Output::Text => outln!("{} {}", d.id, db.phase),
    }
    errln!("{}: database {}", d.id, db.summary());
    match db.phase.as_str() {
        "contracted" => Ok(0),
        _ => Err(Failure::other(format!(
            "{}: the database contract did not succeed: {}",
            d.id,
            db.error.as_deref().unwrap_or(&db.phase)
        ))),
    }
}

/// Polls deployment `id` until its contract has ended, failed or stands still.
async fn follow_contract(client: &mut Client, id: &str) -> Result<pb::Deployment> {
    loop {
        let d = client
            .get_deployment(pb::GetDeploymentRequest { id: id.to_string() })
            .await?
            .into_inner();
        let db = d.database.clone().unwrap_or_default();
        if db.phase != "contracting" || !db.error.is_empty() {
            return Ok(d);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// After `deploy` or `rollback`: the id (or, with `--output json` and no `--wait`, the
/// id and whether it was a no-op), then with `--wait` the deployment followed to its end.
pub(super) async fn follow_up(
    client: &mut Client,
    resp: pb::DeployResponse,
    wait: bool,
    output: Output,
) -> Result<i32> {
    match (output, wait) {
        (Output::Text, _) => outln!("{}", resp.id),
        (Output::Json, false) => print_json(&json!({"id": resp.id, "noop": resp.noop})),
        (Output::Json, true) => {}
    }
    if resp.noop {
        errln!(
            "{}: release already live on every target host; nothing to do",
            resp.id
        );
    }
    if !wait {
        return Ok(0);
    }
    let d = follow::follow(client, &resp.id).await?;
    Ok(follow::finish(client, &d, output).await)
}

/// `cutover pause|resume|promote|abort ID`.
pub async fn command(
    conn: &Conn,
    id: String,
    cmd: DeploymentCommand,
    output: Output,
) -> Result<i32> {
    let mut client = conn.client().await?;
    let d = client
        .command(pb::CommandRequest {
            id,
            command: cmd as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    match output {
        Output::Json => print_json(&views::Deployment::from(&d)),
        Output::Text => outln!("{} {}", d.id, d.state),
    }
    Ok(0)
}

/// `cutover status [ID]`: one deployment, the latest by default.
pub async fn status(conn: &Conn, id: Option<String>, output: Output) -> Result<i32> {
    let mut client = conn.client().await?;
    let d = client
        .get_deployment(pb::GetDeploymentRequest {
            id: id.unwrap_or_default(),
        })
        .await?
        .into_inner();
    match output {
        Output::Json => print_json(&views::Deployment::from(&d)),
        Output::Text => print_status(&d),
    }
    Ok(0)
}

fn print_status(d: &pb::Deployment) {
    outln!("id:        {}", d.id);
    outln!("service:   {}", d.service);
    let was = if d.previous_release.is_empty() {
        String::new()
    } else {
        format!(" (was {})", d.previous_release)
    };
    outln!("release:   {}{was}", d.release);
    outln!("state:     {}", d.state);
    outln!("step:      {}/{}", d.step + 1, d.steps.max(1));
    outln!("traffic:   {}%", d.traffic);
    if !d.reason.is_empty() {
        outln!("reason:    {}", d.reason);
    }
    if let Some(l) = &d.lock {
        outln!(
            "locked:    by {} since {}: {}",
            l.by,
            views::rfc3339(l.at_unix_ms).unwrap_or_default(),
            l.message
        );
    }
    let db = views::Database::from(&d.database.clone().unwrap_or_default());
    if let Some(schema) = &db.schema {
        outln!("database:  {} (schema {schema})", db.summary());
    } else if db.waits_for.is_some() || db.undoes.is_some() {
        outln!("database:  {}", db.summary());
    }
    if let Some(e) = &db.error {
        outln!("           {e}");
    }
    outln!("hosts:");
    for h in &d.hosts {
        let err = if h.error.is_empty() {
            String::new()
        } else {
            format!("  {}", h.error)
        };
        outln!("  {:<20} {:<12} {:>3}%{}", h.name, h.phase, h.weight, err);
    }
}
