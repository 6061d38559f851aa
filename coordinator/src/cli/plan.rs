//! Plan files on the CLI's side: reading one with the command line's overrides (for
//! `deploy`), `cutover plan validate`, which checks one offline, and `cutover plan diff`,
//! the dry run of `deploy --dry-run`.

use std::path::{Path, PathBuf};

use cutover_shared::plan::{Plan, check_artifact_url, check_sha256};
use serde_json::json;

use super::{Failure, Output, Result};
use crate::cli::out::print_json;
use crate::outln;

/// `cutover plan …`
#[derive(clap::Subcommand)]
pub enum PlanCmd {
    /// Check a plan offline.
    Validate {
        /// The plan file (TOML).
        plan: PathBuf,
    },
    /// What deploying a plan would do, changing nothing (as `deploy PLAN --dry-run`).
    Diff {
        /// The plan file (TOML).
        plan: PathBuf,
    },
}

/// What `deploy` may change in the plan it reads: each `Some` replaces the plan's value.
#[derive(Default)]
pub struct Overrides {
    /// `--release`: the version to deploy.
    pub release: Option<String>,
    /// `--artifact`: the URL to fetch.
    pub artifact: Option<String>,
    /// `--sha256`: the artifact's digest.
    pub sha256: Option<String>,
}

/// Reads and validates a plan file, then applies the command line's overrides.
pub fn load_plan(path: &Path, overrides: Overrides) -> Result<Plan> {
    let shown = path.display().to_string();
    let read = |e: std::io::Error| Failure::usage(format!("{shown}: {e}"));
    // A file over the size limit is refused without reading it.
    let size = std::fs::metadata(path).map_err(read)?.len();
    Plan::check_size(size, &shown).map_err(|e| Failure::usage(e.to_string()))?;
    let text = std::fs::read_to_string(path).map_err(read)?;
    let mut plan = Plan::parse(&text, &shown).map_err(|e| Failure::usage(e.to_string()))?;
    apply(&mut plan, overrides)?;
    plan.validate()
        .map_err(|inv| Failure::usage(format!("{shown}: {}", inv.message)))?;
    Ok(plan)
}

/// Checks each override as the plan's own value would be, and applies it.
fn apply(plan: &mut Plan, o: Overrides) -> Result<()> {
    if let Some(v) = o.release {
        if v.trim().is_empty() {
            return Err(Failure::usage("--release: must not be empty"));
        }
        plan.release.version = v;
    }
    if let Some(a) = o.artifact {
        check_artifact_url(&a).map_err(|m| Failure::usage(format!("--artifact: {m}")))?;
        plan.release.artifact = a;
    }
    if let Some(s) = o.sha256 {
        check_sha256(&s).map_err(|m| Failure::usage(format!("--sha256: {m}")))?;
        plan.release.sha256 = s;
    }
    Ok(())
}

/// `cutover plan validate|diff PLAN`.
pub async fn run(cmd: PlanCmd, conn: &super::Conn, output: Output) -> Result<i32> {
    match cmd {
        PlanCmd::Validate { plan } => validate(&plan, output),
        PlanCmd::Diff { plan: path } => {
            let plan = load_plan(&path, Overrides::default())?;
            super::dry_run::run(conn, &plan, &path, output).await
        }
    }
}

/// `cutover plan validate PLAN`.
fn validate(path: &Path, output: Output) -> Result<i32> {
    let plan = load_plan(path, Overrides::default())?;
    match output {
        Output::Json => print_json(
            &json!({"valid": true, "service": plan.service, "release": plan.release.version, "steps": plan.strategy.steps.len()}),
        ),
        Output::Text => outln!(
            "{}: ok (service {}, release {}, {} step(s))",
            path.display(),
            plan.service,
            plan.release.version,
            plan.strategy.steps.len()
        ),
    }
    Ok(0)
}
