//! A release's hooks on this host — `before_start`, `validate` and `before_stop` — run
//! through [`crate::spawn::Launcher::run`], the one way the agent runs a command to
//! completion: as the slot's user, in the release directory, with the slot's clean
//! environment plus `CUTOVER_HOOK`, `CUTOVER_DEPLOYMENT`, `CUTOVER_PREVIOUS_RELEASE`,
//! `CUTOVER_HOST` and `CUTOVER_URL`; past its timeout the hook's whole process group is
//! killed, and whatever it left running in its group is killed when it ends.
//!
//! The whole output of a deployment's hooks on this host goes to one file,
//! `logs/deployments/<deployment>/hooks-<service>.log` (each run between a header and a
//! footer line), beside the deployment's other command output, so that `cutover logs
//! --deployment ID` streams it; the slot reports its path so that `cutover show` can say
//! where it is, and the failure itself names the hook, how it ended and its last lines
//! of output. The slot's `[run] secret_env` values are masked in the log as it is
//! written. The newest [`KEEP_LOGS`] hook logs of a service are kept.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_proto::v1::{DesiredService, HookRun, HookSpec, Hooks};
use cutover_shared::secrets::Secrets;

use crate::data_dir;
use crate::spawn::{self, Exit, Launcher, RunOptions};

/// How many of a failed hook's last output lines its failure names.
const TAIL_LINES: usize = 5;
/// Hook logs kept per service: those of the newest deployments.
pub const KEEP_LOGS: usize = 20;
/// Between SIGTERM and SIGKILL when a hook's group is stopped (its timeout passed, or
/// it ended and left processes behind).
const GRACE: Duration = Duration::from_secs(2);

/// One of the hooks a plan may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// After unpack, before the slot's process starts.
    BeforeStart,
    /// Once the slot is healthy, before it is reported so (no traffic yet).
    Validate,
    /// Before the slot's process is sent SIGTERM.
    BeforeStop,
}

impl Hook {
    /// Its name, as the plan spells it (`CUTOVER_HOOK`).
    pub fn name(self) -> &'static str {
        match self {
            Hook::BeforeStart => "before_start",
            Hook::Validate => "validate",
            Hook::BeforeStop => "before_stop",
        }
    }

    /// This hook's spec among a slot spec's hooks, if the plan names it.
    pub fn spec(self, hooks: Option<&Hooks>) -> Option<&HookSpec> {
        let hooks = hooks?;
        match self {
            Hook::BeforeStart => hooks.before_start.as_ref(),
            Hook::Validate => hooks.validate.as_ref(),
            Hook::BeforeStop => hooks.before_stop.as_ref(),
        }
    }
}

/// What a host's desired state tells its hooks about the deployment they run in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// `CUTOVER_DEPLOYMENT`, and the name of the hook log.
    pub deployment: String,
    /// `CUTOVER_PREVIOUS_RELEASE`.
    pub previous_release: String,
    /// `CUTOVER_HOST`.
    pub host: String,
}

impl Context {
    pub fn of(d: &DesiredService) -> Context {
        Context {
            deployment: d.deployment.clone(),
            previous_release: d.previous_release.clone(),
            host: d.host.clone(),
        }
    }
}

/// The log holding the output of `service`'s hooks in `deployment`.
pub fn log_path(data: &Path, service: &str, deployment: &str) -> PathBuf {
    let plain = !deployment.is_empty()
        && deployment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let id = if plain { deployment } else { "no-deployment" };
    data_dir::deployment_logs(data, id).join(file_name(service))
}

/// The name of `service`'s hook log in a deployment's directory.
fn file_name(service: &str) -> String {
    format!("hooks-{service}.log")
}

/// One hook to run on a slot.
pub struct Invocation<'a> {
    /// Which hook.
    pub hook: Hook,
    /// Its command and timeout.
    pub spec: &'a HookSpec,
    /// The slot's user, release directory and environment (with its `PORT`).
    pub launcher: &'a Launcher,
    /// The slot's private port: `${PORT}` in the command, and `CUTOVER_URL`.
    pub port: u16,
    /// The deployment it runs in.
    pub context: &'a Context,
    /// Where its whole output goes.
    pub log: &'a Path,
    /// The slot and release, for the log's header.
    pub slot: &'a str,
    pub release: &'a str,
    /// The slot's secret values: masked in the log, which `cutover logs` streams.
    pub secrets: Secrets,
}

/// How a hook ended: its report, and `Err` with the one line that says why it failed.
pub struct Ran {
    /// What the slot reports of the run.
    pub report: HookRun,
    /// `Ok` when it exited 0.
    pub result: Result<(), String>,
}

impl Invocation<'_> {
    /// The variables the hook gets on top of the slot's own.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("CUTOVER_HOOK", self.hook.name().to_string()),
            ("CUTOVER_DEPLOYMENT", self.context.deployment.clone()),
            (
                "CUTOVER_PREVIOUS_RELEASE",
                self.context.previous_release.clone(),
            ),
            ("CUTOVER_HOST", self.context.host.clone()),
            ("CUTOVER_URL", format!("http://127.0.0.1:{}", self.port)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The command with `${PORT}` filled in.
    fn argv(&self) -> Vec<String> {
        self.spec
            .command
            .iter()
            .map(|a| a.replace("${PORT}", &self.port.to_string()))
            .collect()
    }

    /// Runs the hook to its end (or its timeout) and says how it went.
    pub async fn run(&self) -> Ran {
        let name = self.hook.name();
        let timeout = Duration::from_millis(self.spec.timeout_ms.max(1));
        let opts = RunOptions {
            env: self.env(),
            grace: GRACE,
            output_log: Some(self.log.to_path_buf()),
            tail_lines: TAIL_LINES,
            mask: self.secrets.clone(),
            ..RunOptions::new(timeout)
        };
        self.note(&format!(
            "== {name} ({} slot, release {}, {}): {}",
            self.slot,
            self.release,
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            self.argv().join(" ")
        ));
        let started = std::time::Instant::now();
        let (result, outcome) = match self.launcher.run(&self.argv(), &opts).await {
            Ok(out) if out.success() => (Ok(()), out.exit.to_string()),
            Ok(out) => {
                let why = failure(name, &out.exit, &out.tail);
                (Err(why.clone()), why)
            }
            Err(e) => {
                let why = format!("hook {name} did not start: {e}");
                (Err(why.clone()), why)
            }
        };
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.note(&format!(
            "== {name}: {} after {:.2}s",
            if result.is_ok() { "passed" } else { &outcome },
            duration_ms as f64 / 1000.0
        ));
        Ran {
            report: HookRun {
                hook: name.to_string(),
                duration_ms,
                ok: result.is_ok(),
                outcome,
            },
            result,
        }
    }

    /// Appends a line of the agent's own to the hook log (best effort: the hook runs
    /// whether or not its log can be written).
    fn note(&self, line: &str) {
        let line = self.secrets.mask(line);
        if let Some(dir) = self.log.parent()
            && let Err(e) = spawn::ensure_dir(dir, 0o700)
        {
            tracing::warn!(error = %e, "create the hook log's directory");
            return;
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.log)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::warn!(log = %self.log.display(), error = %e, "write the hook log");
        }
    }
}

/// `hook validate exited 1: last | lines`: how a hook failed, in one line, with the
/// last lines of its output.
fn failure(name: &str, exit: &Exit, tail: &[String]) -> String {
    let how = match exit {
        Exit::Code(c) => format!("exited {c}"),
        Exit::Signal(_) => format!("was killed ({exit})"),
        Exit::TimedOut(_) => format!("{exit}; its processes were killed"),
    };
    let lines: Vec<&str> = tail.iter().map(|l| l.trim()).collect();
    let output = if lines.is_empty() {
        " (no output)".to_string()
    } else {
        format!(": {}", lines.join(" | "))
    };
    cutover_shared::errors::shorten(&format!("hook {name} {how}{output}"))
}

/// Removes `service`'s oldest hook logs, keeping the newest `keep` and `current`; a
/// deployment's directory left empty goes too.
pub fn prune(data: &Path, service: &str, keep: usize, current: &Path) {
    let Ok(dirs) = std::fs::read_dir(data_dir::logs(data).join("deployments")) else {
        return;
    };
    let name = file_name(service);
    let mut logs: Vec<(std::time::SystemTime, PathBuf)> = dirs
        .filter_map(Result::ok)
        .map(|d| d.path().join(&name))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    logs.sort();
    let extra = logs.len().saturating_sub(keep);
    for (_, path) in logs.into_iter().take(extra) {
        if path == current {
            continue;
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(log = %path.display(), error = %e, "remove an old hook log");
            continue;
        }
        // Fails, as it should, while the deployment's other output is still there.
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spawn::RunAs;

    fn launcher(dir: &Path) -> Launcher {
        Launcher {
            dir: dir.to_path_buf(),
            user: RunAs::resolve("", None).unwrap(),
            env: vec![
                ("PORT".into(), "10007".into()),
                ("CUTOVER_SERVICE".into(), "web".into()),
            ],
        }
    }

    fn spec(script: &str, timeout_ms: u64) -> HookSpec {
        HookSpec {
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout_ms,
        }
    }

    async fn run(hook: Hook, spec: &HookSpec, dir: &Path, log: &Path) -> Ran {
        let context = Context {
            deployment: "d-000007".into(),
            previous_release: "1.0.0".into(),
            host: "web-1".into(),
        };
        let launcher = launcher(dir);
        Invocation {
            hook,
            spec,
            launcher: &launcher,
            port: 10007,
            context: &context,
            log,
            slot: "green",
            release: "2.0.0",
            secrets: Secrets::default(),
        }
        .run()
        .await
    }

    #[tokio::test]
    async fn a_hook_gets_the_slots_environment_and_what_it_runs_for() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_path(dir.path(), "web", "d-000007");
        let ran = run(
            Hook::Validate,
            &spec("env | sort; echo arg=$0", 5_000),
            dir.path(),
            &log,
        )
        .await;
        assert!(ran.result.is_ok(), "{:?}", ran.result);
        assert!(ran.report.ok && ran.report.hook == "validate");
        let text = std::fs::read_to_string(&log).unwrap();
        for want in [
            "CUTOVER_HOOK=validate",
            "CUTOVER_DEPLOYMENT=d-000007",
            "CUTOVER_PREVIOUS_RELEASE=1.0.0",
            "CUTOVER_HOST=web-1",
            "CUTOVER_URL=http://127.0.0.1:10007",
            "CUTOVER_SERVICE=web",
            "PORT=10007",
            "== validate (green slot, release 2.0.0,",
            "== validate: passed after",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        assert!(
            log.ends_with("logs/deployments/d-000007/hooks-web.log"),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn a_failing_hook_says_how_it_ended_with_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_path(dir.path(), "web", "d-000007");
        let ran = run(
            Hook::Validate,
            &spec("echo checking /; echo 'GET / -> 404' >&2; exit 3", 5_000),
            dir.path(),
            &log,
        )
        .await;
        assert_eq!(
            ran.result,
            Err("hook validate exited 3: checking / | GET / -> 404".to_string())
        );
        assert!(!ran.report.ok);
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("GET / -> 404\n== validate: hook validate exited 3"),
            "{text}"
        );
        let missing = run(
            Hook::BeforeStart,
            &HookSpec {
                command: vec!["./bin/setup".into()],
                timeout_ms: 1_000,
            },
            dir.path(),
            &log,
        )
        .await;
        assert_eq!(
            missing.result,
            Err(
                "hook before_start did not start: command ./bin/setup: not found in the release"
                    .to_string()
            )
        );
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_path(dir.path(), "web", "d-000007");
        let pids = dir.path().join("pids");
        let script = format!(
            "sleep 60 & echo $! > {p}; echo started; sleep 60",
            p = pids.display()
        );
        let started = std::time::Instant::now();
        let ran = run(Hook::Validate, &spec(&script, 300), dir.path(), &log).await;
        assert!(started.elapsed() < Duration::from_secs(10));
        let why = ran.result.unwrap_err();
        assert!(
            why.starts_with(
                "hook validate timed out after 300ms; its processes were killed: started"
            ),
            "{why}"
        );
        let child: i32 = std::fs::read_to_string(&pids)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            !std::path::Path::new(&format!("/proc/{child}")).exists()
                || std::fs::read_to_string(format!("/proc/{child}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "the hook's child {child} survived"
        );
    }

    #[test]
    fn only_the_newest_logs_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = |i: u64| log_path(dir.path(), "web", &format!("d-{i}"));
        for i in 0..5 {
            let p = log(i);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "x").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000 + i);
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        // Another service's log, and another file of a pruned deployment, stay.
        let other = log_path(dir.path(), "api", "d-1");
        std::fs::write(&other, "x").unwrap();
        let expand = data_dir::deployment_logs(dir.path(), "d-2").join("expand.log");
        std::fs::write(&expand, "x").unwrap();
        prune(dir.path(), "web", 2, &log(0));
        let kept: Vec<u64> = (0..5).filter(|&i| log(i).exists()).collect();
        assert_eq!(kept, [0, 3, 4]);
        assert!(other.exists() && expand.exists());
    }
}
