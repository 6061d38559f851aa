//! How a slot's processes are launched: as whom (the plan's `[run] user`, else the
//! agent's `--service-user`), with the service's state directory, and with which
//! variables — the plan's `[run] env` with `${PORT}` filled in, then the host's env files
//! (`[run] env_files`, read once per slot start), then `PORT` and `CUTOVER_*`. The
//! process itself is started by [`crate::spawn`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_proto::v1::RunSpec;
use cutover_shared::secrets::Secrets;

use super::SlotCtx;
use crate::spawn::{Launcher, RunAs};

/// How long a process has between SIGTERM and SIGKILL when the plan says nothing.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What every start of the slot's process shares; only the port changes between starts.
pub struct Launch {
    /// The release directory: working directory and where `./bin/x` is found.
    dir: PathBuf,
    /// The user the process and its check commands run as.
    user: RunAs,
    /// `DATA/state/<service>`, owned by `user` (`CUTOVER_STATE_DIR`).
    state_dir: PathBuf,
    /// The plan's `[run]`: command, environment, stop timeout.
    run: RunSpec,
    /// The variables of the host's env files, read when the slot started; they win
    /// over `[run] env`.
    file_env: Vec<(String, String)>,
    /// `CUTOVER_SERVICE`, `CUTOVER_RELEASE`, `CUTOVER_SLOT`.
    service: String,
    version: String,
    slot: &'static str,
}

impl Launch {
    /// Resolves the user, reads the env files and creates the state directory for the
    /// release in `dir`; an error names what is wrong (an unknown user, a missing env
    /// file...).
    pub fn new(ctx: &SlotCtx, dir: PathBuf) -> Result<Launch, String> {
        let run = ctx.spec.run.clone().unwrap_or_default();
        let file_env = crate::env_file::read_all(&run.env_files).map_err(|e| e.to_string())?;
        let user =
            RunAs::resolve(&run.user, ctx.service_user.as_deref()).map_err(|e| e.to_string())?;
        if run.user.is_empty() && user.is_root() && ctx.service_user.is_none() {
            tracing::warn!(
                service = ctx.service,
                slot = ctx.slot.as_str(),
                "running the service as root: set [run] user in the plan, or start the agent with --service-user"
            );
        }
        let state_dir = crate::spawn::state_dir(&ctx.data_dir, &ctx.service, &user)
            .map_err(|e| e.to_string())?;
        Ok(Launch {
            dir,
            user,
            state_dir,
            run,
            file_env,
            service: ctx.service.clone(),
            version: ctx.version().to_string(),
            slot: ctx.slot.as_str(),
        })
    }

    /// How the process (and its check commands) run when it listens on `port`.
    pub fn launcher(&self, port: u16) -> Launcher {
        Launcher {
            dir: self.dir.clone(),
            user: self.user.clone(),
            env: self.env(port),
        }
    }

    /// The command line with `${PORT}` filled in.
    pub fn argv(&self, port: u16) -> Vec<String> {
        self.run
            .command
            .iter()
            .map(|a| substitute(a, port))
            .collect()
    }

    /// Between SIGTERM and SIGKILL when the process is stopped.
    pub fn stop_timeout(&self) -> Duration {
        match self.run.stop_timeout_ms {
            0 => DEFAULT_STOP_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
    }

    /// The secret values the process gets: those of the variables `[run] secret_env`
    /// names, from the plan or an env file. What the slot reports is masked with them.
    pub fn secrets(&self) -> Secrets {
        let env = self.env(0);
        Secrets::of_env(
            &self.run.secret_env,
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// The variables on top of the clean base: the plan's `[run] env` with `${PORT}`
    /// filled in and the env files' variables over it (sorted), then `PORT` and
    /// `CUTOVER_*`.
    fn env(&self, port: u16) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .run
            .env
            .iter()
            .filter(|(k, _)| !self.file_env.iter().any(|(f, _)| f == *k))
            .map(|(k, v)| (k.clone(), substitute(v, port)))
            .chain(self.file_env.iter().cloned())
            .collect();
        env.sort();
        env.extend([
            ("PORT".to_string(), port.to_string()),
            ("CUTOVER_SERVICE".to_string(), self.service.clone()),
            ("CUTOVER_RELEASE".to_string(), self.version.clone()),
            ("CUTOVER_SLOT".to_string(), self.slot.to_string()),
            ("CUTOVER_STATE_DIR".to_string(), path_text(&self.state_dir)),
        ]);
        env
    }
}

fn substitute(s: &str, port: u16) -> String {
    s.replace("${PORT}", &port.to_string())
}

fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(env: &[(&str, &str)]) -> Launch {
        Launch {
            dir: PathBuf::from("/data/releases/web/1.0.0-ab"),
            user: RunAs::resolve("", None).unwrap(),
            state_dir: PathBuf::from("/data/state/web"),
            run: RunSpec {
                command: vec!["./bin/web".into(), "--port=${PORT}".into()],
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
            file_env: Vec::new(),
            service: "web".into(),
            version: "1.0.0".into(),
            slot: "green",
        }
    }

    #[test]
    fn the_port_is_filled_in_everywhere_and_cutover_variables_come_last() {
        let l = launch(&[("B", "http://127.0.0.1:${PORT}/"), ("A", "1")]);
        assert_eq!(l.argv(10_007), ["./bin/web", "--port=10007"]);
        let env = l.launcher(10_007).env;
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("A", "1"),
                ("B", "http://127.0.0.1:10007/"),
                ("PORT", "10007"),
                ("CUTOVER_SERVICE", "web"),
                ("CUTOVER_RELEASE", "1.0.0"),
                ("CUTOVER_SLOT", "green"),
                ("CUTOVER_STATE_DIR", "/data/state/web"),
            ]
        );
        assert_eq!(l.stop_timeout(), Duration::from_secs(30));
    }
}

#[cfg(test)]
mod env_file_tests {
    use super::*;

    #[test]
    fn env_files_win_over_the_plan_and_secrets_come_from_both() {
        let mut l = Launch {
            dir: PathBuf::from("/data/releases/web/1.0.0-ab"),
            user: RunAs::resolve("", None).unwrap(),
            state_dir: PathBuf::from("/data/state/web"),
            run: RunSpec {
                command: vec!["./bin/web".into()],
                env: [("A", "plan"), ("B", "token-from-plan")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                secret_env: vec!["B".into(), "DATABASE_URL".into()],
                ..Default::default()
            },
            file_env: vec![
                ("A".into(), "host".into()),
                ("DATABASE_URL".into(), "postgres://u:pw@db/x".into()),
            ],
            service: "web".into(),
            version: "1.0.0".into(),
            slot: "blue",
        };
        let env = l.launcher(10_001).env;
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("host"), "the host's file wins");
        assert_eq!(get("DATABASE_URL"), Some("postgres://u:pw@db/x"));
        assert_eq!(env.iter().filter(|(n, _)| n == "A").count(), 1);
        let masked = l
            .secrets()
            .mask("dsn postgres://u:pw@db/x token-from-plan host");
        assert_eq!(masked, "dsn ******** ******** host");
        l.run.secret_env.clear();
        assert!(l.secrets().is_empty());
    }
}
