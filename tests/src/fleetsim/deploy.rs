//! Deployments over the simulated fleet, through the real CLI and control API: the plans
//! the simulator writes (service `sim` on every host labelled `fleet=sim`), the
//! baseline release every run starts from, waiting on a deployment, and reading from a
//! deployment's timeline how each decision reached the hosts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use coordinator::model::HostPhase;
use coordinator::report::Show;
use coordinator::timeline::Kind;
use cutover_proto::v1::{self as pb, GetDeploymentRequest};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::coord::{Control, Coordinator};
use super::figures::{FanOut, quantile};
use super::host::Ack;

/// The service the simulator deploys.
pub const SERVICE: &str = "sim";
/// The release every run starts from.
pub const BASELINE: &str = "1.0.0";

/// What ends a deployment under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackBy {
    /// `cutover abort` once the last step holds: the deployment ends `aborted`.
    Abort,
    /// Failing analysis: the release answers errors, the deployment ends `rolled_back`.
    Analysis,
}

/// A plan for the simulated fleet.
pub struct PlanSpec<'a> {
    pub release: &'a str,
    /// `[strategy] steps`, as TOML.
    pub steps: String,
    pub max_failed_hosts: usize,
    /// An `[analysis]` section that fails a release answering more than 5 % errors.
    pub analysis: bool,
}

impl PlanSpec<'_> {
    /// The baseline: one step to 100 %.
    pub fn baseline() -> PlanSpec<'static> {
        PlanSpec {
            release: BASELINE,
            steps: "[{ traffic = 100 }]".into(),
            max_failed_hosts: 0,
            analysis: false,
        }
    }

    /// Writes the plan into `dir`; returns its path.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let sha = hex::encode(Sha256::digest(self.release.as_bytes()));
        let analysis = if self.analysis {
            "\n[analysis]\ninterval = \"1s\"\nfailure_limit = 1\nmin_requests = 20\n\n[[analysis.metric]]\nname = \"error_rate\"\nmax = 0.05\n"
        } else {
            ""
        };
        let text = format!(
            r#"service = "{SERVICE}"

[release]
version = "{release}"
artifact = "https://artifacts.invalid/sim-{release}.tar.gz"
sha256 = "{sha}"

[targets]
labels = {{ fleet = "sim" }}

[run]
command = ["./bin/sim", "serve", "--port", "${{PORT}}"]
listen = 8080

[health]
http = "/healthz"
interval = "1s"

[strategy]
max_parallel = "100%"
max_failed_hosts = {failed}
steps = {steps}
{analysis}"#,
            release = self.release,
            failed = self.max_failed_hosts,
            steps = self.steps,
        );
        let p = dir.join(format!("{}.toml", self.release));
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    }
}

/// How often a CLI command is tried when the coordinator is too busy to answer it.
const CLI_ATTEMPTS: u32 = 3;

/// `cutover deploy PLAN` of `release`: the new deployment's id. A command that failed
/// is tried again unless the deployment was created after all (its answer was lost).
pub async fn submit(coord: &Coordinator, plan: &Path, release: &str) -> anyhow::Result<String> {
    let plan = plan.display().to_string();
    let mut attempt = 1;
    loop {
        let e = match coord.cli(&["deploy", &plan]).await {
            Ok(out) => {
                let id = out.lines().next().unwrap_or_default().trim().to_string();
                if id.is_empty() {
                    bail!("`cutover deploy` printed no deployment id");
                }
                return Ok(id);
            }
            Err(e) => e,
        };
        if let Ok(Some(d)) = get(coord, "").await
            && d.release == release
        {
            return Ok(d.id);
        }
        if attempt == CLI_ATTEMPTS {
            return Err(e);
        }
        coord.retried(&e);
        attempt += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `cutover abort ID`, tried again while the coordinator is too busy to answer, unless
/// the deployment is rolling back (or over) already.
pub async fn abort(coord: &Coordinator, id: &str) -> anyhow::Result<()> {
    let mut attempt = 1;
    loop {
        let e = match coord.cli(&["abort", id]).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if let Ok(Some(d)) = get(coord, id).await
            && (d.state == "rolling_back" || is_final(&d.state))
        {
            return Ok(());
        }
        if attempt == CLI_ATTEMPTS {
            return Err(e);
        }
        coord.retried(&e);
        attempt += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The deployment `id` (empty: the newest), or none when there is none.
pub async fn get(coord: &Coordinator, id: &str) -> anyhow::Result<Option<pb::Deployment>> {
    let mut c = coord.control().await?;
    get_with(&mut c, id).await
}

async fn get_with(c: &mut Control, id: &str) -> anyhow::Result<Option<pb::Deployment>> {
    match c
        .get_deployment(GetDeploymentRequest { id: id.into() })
        .await
    {
        Ok(d) => Ok(Some(d.into_inner())),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => bail!("get deployment {id}: {}", s.message()),
    }
}

/// Polls deployment `id` every 250 ms until `done` holds for it or it ended; returns it.
/// A poll that fails (the coordinator too busy to answer) is counted and tried again
/// on a new connection until `timeout`.
pub async fn wait(
    coord: &Coordinator,
    id: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&pb::Deployment) -> bool,
) -> anyhow::Result<pb::Deployment> {
    let deadline = Instant::now() + timeout;
    let mut client: Option<Control> = None;
    let mut seen = String::from("never read");
    loop {
        let polled = match &mut client {
            Some(c) => get_with(c, id).await,
            None => match coord.control().await {
                Ok(c) => get_with(client.insert(c), id).await,
                Err(e) => Err(e),
            },
        };
        match polled {
            Ok(Some(d)) if done(&d) || is_final(&d.state) => return Ok(d),
            Ok(Some(d)) => seen = format!("it is {}, step {}", d.state, d.step + 1),
            Ok(None) => bail!("deployment {id} is gone"),
            Err(e) => {
                coord.retried(&e);
                client = None;
            }
        }
        if Instant::now() > deadline {
            bail!("deployment {id} did not reach {what} within {timeout:?} ({seen})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "rolled_back" | "failed" | "aborted")
}

/// Aborts a deployment an interrupted run left going, so that a new one may start.
pub async fn abort_leftover(coord: &Coordinator, timeout: Duration) -> anyhow::Result<()> {
    let Some(d) = get(coord, "").await? else {
        return Ok(());
    };
    if is_final(&d.state) {
        return Ok(());
    }
    tracing::warn!(
        id = d.id,
        state = d.state,
        "aborting a deployment left going"
    );
    abort(coord, &d.id).await?;
    wait(coord, &d.id, timeout, "its end", |_| false).await?;
    Ok(())
}

/// Makes the baseline live on every host (nothing to do when it already is).
pub async fn baseline(coord: &Coordinator, plans: &Path, timeout: Duration) -> anyhow::Result<()> {
    abort_leftover(coord, timeout).await?;
    let plan = PlanSpec::baseline().write(plans)?;
    let id = submit(coord, &plan, BASELINE).await?;
    let d = wait(coord, &id, timeout, "its end", |_| false).await?;
    if d.state != "succeeded" {
        bail!(
            "the baseline deployment {id} ended {}: {}",
            d.state,
            d.reason
        );
    }
    Ok(())
}

/// How each decision of a deployment reached its hosts, read from its story (`show`)
/// and what each host acknowledged.
pub struct Story {
    pub failed: BTreeSet<String>,
    pub prepare_s: Option<f64>,
    pub steps: Vec<FanOut>,
    pub rollback: Option<FanOut>,
    pub rolled_back: usize,
}

impl Story {
    pub fn read(show: &Show, acks: &[(String, Vec<Ack>)]) -> Story {
        let mut failed: BTreeSet<String> = show
            .hosts
            .iter()
            .filter(|h| h.phase == HostPhase::Failed)
            .map(|h| h.name.clone())
            .collect();
        let at = |k: &Kind| {
            show.timeline
                .iter()
                .find(|e| e.event.kind == *k)
                .map(|e| e.event.at_unix_ms)
        };
        let mut submitted = None;
        let mut started = Vec::new();
        let mut rollback = None;
        for e in &show.timeline {
            match &e.event.kind {
                Kind::Submitted { .. } => submitted = Some(e.event.at_unix_ms),
                Kind::HostFailed { host, .. } => {
                    failed.insert(host.clone());
                }
                Kind::StepStarted { step, traffic } => {
                    started.push((*step, *traffic, e.event.at_unix_ms))
                }
                Kind::RollbackStarted {
                    decided_unix_ms, ..
                } => rollback = Some(*decided_unix_ms),
                _ => {}
            }
        }
        let targets: Vec<&str> = show
            .hosts
            .iter()
            .map(|h| h.name.as_str())
            .filter(|h| !failed.contains(*h))
            .collect();
        let acks: BTreeMap<&str, &[Ack]> = acks
            .iter()
            .map(|(n, a)| (n.as_str(), a.as_slice()))
            .collect();
        let release = show.release.as_str();
        let steps = started
            .iter()
            .map(|&(step, traffic, decided)| {
                let holding = at(&Kind::StepHolding { step, traffic });
                let wants = |w: &BTreeMap<String, u32>| {
                    w.get(release) == Some(&traffic) && w.values().sum::<u32>() == 100
                };
                fan_out(
                    format!("step {} ({traffic}%)", step + 1),
                    decided,
                    holding,
                    &targets,
                    &acks,
                    wants,
                )
            })
            .collect();
        let rollback = rollback.map(|decided| {
            let done = at(&Kind::RollbackDone);
            let wants = |w: &BTreeMap<String, u32>| {
                w.get(release).copied().unwrap_or(0) == 0 && w.values().sum::<u32>() == 100
            };
            fan_out("rollback".into(), decided, done, &targets, &acks, wants)
        });
        Story {
            prepare_s: submitted
                .zip(started.first())
                .map(|(s, (_, _, t))| t.saturating_sub(s) as f64 / 1000.0),
            failed,
            steps,
            rollback,
            rolled_back: show
                .hosts
                .iter()
                .filter(|h| h.phase == HostPhase::RolledBack)
                .count(),
        }
    }
}

/// The delays from `decided` to each target host's first report of the weights
/// `wants` accepts.
fn fan_out(
    what: String,
    decided: u64,
    confirmed: Option<u64>,
    targets: &[&str],
    acks: &BTreeMap<&str, &[Ack]>,
    wants: impl Fn(&BTreeMap<String, u32>) -> bool,
) -> FanOut {
    let mut delays: Vec<u64> = targets
        .iter()
        .filter_map(|h| {
            acks.get(h)?
                .iter()
                .find(|a| a.service == SERVICE && a.at_ms >= decided && wants(&a.weights))
                .map(|a| a.at_ms - decided)
        })
        .collect();
    delays.sort_unstable();
    let n = targets.len();
    FanOut {
        what,
        decided_unix_ms: decided,
        hosts: n,
        acked: delays.len(),
        p50_s: quantile(&delays, n, 0.5),
        p99_s: quantile(&delays, n, 0.99),
        p100_s: quantile(&delays, n, 1.0),
        slower_than_1s: delays.iter().filter(|d| **d > 1_000).count(),
        coordinator_confirmed_s: confirmed.map(|c| c.saturating_sub(decided) as f64 / 1000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plan_the_simulator_writes_is_valid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let specs = [
            PlanSpec::baseline(),
            PlanSpec {
                release: "2.0.1",
                steps: r#"[{ traffic = 10, hold = "2s" }, { traffic = 100, hold = "1h" }]"#.into(),
                max_failed_hosts: 3,
                analysis: true,
            },
        ];
        for spec in specs {
            let p = spec.write(dir.path()).expect("write plan");
            let text = std::fs::read_to_string(&p).expect("read plan");
            let plan = cutover_shared::plan::Plan::parse(&text, "plan.toml")
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            plan.validate()
                .unwrap_or_else(|e| panic!("{}\n{text}", e.message));
            assert_eq!(plan.service, SERVICE);
            assert_eq!(plan.release.version, spec.release);
            assert_eq!(
                plan.strategy.max_failed_hosts as usize,
                spec.max_failed_hosts
            );
            assert_eq!(plan.analysis.is_some(), spec.analysis);
        }
    }
}
