//! The plan file: its model, its parsing and its validation.
//!
//! Every error names the file, line and column, and an unknown key gets the nearest known
//! key as a suggestion. Parsing happens in two passes: serde builds the typed model
//! (`model`; catching unknown keys and wrong types with toml's own spans, said in the
//! plan's words by `errors`), then [`Plan::validate`] (`validate`, one function per
//! section) checks values; its errors carry a key path that is located in the document
//! afterwards (`path`). Type errors are said in the plan's words, keyed by the value's
//! path (`run.listen must be a port number 1–65535`), whatever key they concern.

mod errors;
mod model;
mod path;
mod validate;

pub use errors::{PlanError, line_col, nearest};
pub use model::{
    Analysis, Check, ContractAfter, Count, Database, Health, Judge, Measure, Metric, MetricName,
    OnHostLost, Plan, Protocol, Release, Run, SlotMeasure, Source, Step, Strategy, Targets,
};
pub use path::PathPart;
pub use validate::{Invalid, check_artifact_url, check_schema_name, check_sha256};

/// The largest plan file, in bytes: parsing refuses anything longer, so `plan
/// validate` and `deploy` agree, and the coordinator's gRPC message limit is set above it.
pub const MAX_PLAN_BYTES: usize = 1024 * 1024;

/// The placeholders `[run] command` and `[run] env` values may hold.
pub const RUN_VARIABLES: &[&str] = &["PORT"];

/// The placeholders a `source = "prometheus"` metric's `query` and `baseline_query` may
/// hold; `${HOST}` makes the query run once per host.
pub const QUERY_VARIABLES: &[&str] = &["SERVICE", "RELEASE", "PREVIOUS_RELEASE", "HOST"];

impl Plan {
    /// Parses and validates plan text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Plan, PlanError> {
        Plan::check_size(text.len() as u64, file)?;
        let plan: Plan = toml::from_str(text).map_err(|e| errors::from_toml(&e, text, file))?;
        if let Err(inv) = plan.validate() {
            let offset = path::locate(text, &inv.path);
            let (line, column) = line_col(text, offset);
            let key = path::key_path(&inv.path);
            let message = if key.is_empty() {
                inv.message
            } else {
                format!("{key}: {}", inv.message)
            };
            return Err(PlanError {
                file: file.to_string(),
                line,
                column,
                message,
            });
        }
        Ok(plan)
    }

    /// Refuses a plan of `bytes` over [`MAX_PLAN_BYTES`] (before reading it, for a file).
    pub fn check_size(bytes: u64, file: &str) -> Result<(), PlanError> {
        if bytes <= MAX_PLAN_BYTES as u64 {
            return Ok(());
        }
        let mib = |b: f64| b / (1024.0 * 1024.0);
        Err(PlanError {
            file: file.to_string(),
            line: 1,
            column: 1,
            message: format!(
                "the plan is {:.1} MiB; a plan may be at most {:.0} MiB",
                mib(bytes as f64),
                mib(MAX_PLAN_BYTES as f64)
            ),
        })
    }
}

#[cfg(test)]
mod tests;
