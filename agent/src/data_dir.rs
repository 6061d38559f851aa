//! The agent's data directory (`--data-dir`): where each thing lives in it, and who may
//! read what. Service processes run as other users and must reach their release
//! (`releases/`) and state (`state/<service>`) directories, and nothing else: the data
//! dir and `releases/` let them through without listing, while the database, identity,
//! logs and download cache are the agent's alone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::spawn;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dir(#[from] spawn::Error),
    /// The cause is left to the error's source, as the context it replaces did.
    #[error("set permissions of {}", .path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Mode of the data dir and of `releases/`: others may pass through, never list.
const PASS_THROUGH: u32 = 0o711;
/// Mode of what is the agent's alone.
const PRIVATE_DIR: u32 = 0o700;
const PRIVATE_FILE: u32 = 0o600;

/// `agent.json`: the host's name, coordinator, labels and certificate validity.
pub fn agent_file(data: &Path) -> PathBuf {
    data.join("agent.json")
}

/// `agent.redb`: the agent's database ([`crate::store`]).
pub fn store_file(data: &Path) -> PathBuf {
    data.join("agent.redb")
}

/// `identity/`: the host's key, certificate and the coordinator's CA.
pub fn identity(data: &Path) -> PathBuf {
    data.join("identity")
}

/// `releases/`: one directory per service, one per release below it.
pub fn releases(data: &Path) -> PathBuf {
    data.join("releases")
}

/// `cache/`: downloads while they are fetched.
pub fn cache(data: &Path) -> PathBuf {
    data.join("cache")
}

/// `logs/`: each slot's log file.
pub fn logs(data: &Path) -> PathBuf {
    data.join("logs")
}

/// `logs/deployments/<id>/`: the output of a deployment's hooks and database commands
/// on this host, a file each, which `cutover logs --deployment` reads.
pub fn deployment_logs(data: &Path, id: &str) -> PathBuf {
    logs(data).join("deployments").join(id)
}

/// `logs/deployments/<deployment>/<phase>.log`: the whole output of one database task
/// (`<phase>-<attempt>.log` from its second attempt on). Characters of the ids that do
/// not belong in a file name become `_`.
pub fn task_log(data: &Path, deployment: &str, task: &str) -> PathBuf {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let name = task.rsplit('/').next().unwrap_or(task).replace('#', "-");
    let dir = match safe(deployment).as_str() {
        "" | "." | ".." => "unknown".to_string(),
        d => d.to_string(),
    };
    deployment_logs(data, &dir).join(format!("{}.log", safe(&name)))
}

/// `state/`: each service's own writable directory ([`crate::spawn::state_dir`]).
pub fn state(data: &Path) -> PathBuf {
    data.join("state")
}

/// Creates the data dir itself, as `join` first needs it.
pub fn create(data: &Path) -> Result<(), Error> {
    Ok(spawn::ensure_dir(data, PASS_THROUGH)?)
}

/// Creates what `run` needs and gives everything its mode, whatever an earlier version
/// or an operator left.
pub fn secure(data: &Path) -> Result<(), Error> {
    for (dir, mode) in [
        (data.to_path_buf(), PASS_THROUGH),
        (releases(data), PASS_THROUGH),
        (identity(data), PRIVATE_DIR),
        (logs(data), PRIVATE_DIR),
        (cache(data), PRIVATE_DIR),
    ] {
        spawn::ensure_dir(&dir, mode)?;
    }
    for path in [store_file(data), agent_file(data)] {
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(PRIVATE_FILE))
                .map_err(|source| Error::Permissions { path, source })?;
        }
    }
    Ok(())
}
