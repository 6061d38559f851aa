//! Every process the agent starts for a service is started here, and only here: the slot
//! process, `exec` health checks, and the commands that run beside a release (hooks,
//! database commands). So each of them gets the same treatment:
//!
//! - the program: `./bin/web` (a relative path with `/`) is the release's file; a bare
//!   name is looked up on the clean `PATH` below, never on the agent's;
//! - the user: the plan's `[run] user`, else the agent's `--service-user` when the agent
//!   runs as root, else the agent's own user; `user = "root"` runs as root on purpose;
//! - a new process group (so the whole group can be stopped), stdin from `/dev/null`;
//! - a clean environment, like the one systemd gives a unit: `PATH`, `LANG`, `HOME`,
//!   `USER` and `LOGNAME` of the user it runs as, plus the variables the caller passes
//!   (the plan's `[run] env`, `PORT`, `CUTOVER_*`). Nothing of the agent's own
//!   environment (credentials, tokens, root's `PATH`) reaches a service.
//!
//! Two ways to run: [`Launcher::start`] for a long-running process whose output is
//! appended to a log file it keeps open itself (so it outlives the agent), and
//! [`Launcher::run`] for a command run to completion under a timeout that stops its
//! whole process group (SIGTERM, then SIGKILL after a grace period), returning how it
//! ended, the last lines of its output and, on request, appending all of it to a log.
//!
//! [`state_dir`] gives each service a writable directory that survives its releases.

use std::collections::VecDeque;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// The `PATH` every service process starts with (systemd's default for units).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The locale every service process starts with.
pub const LANG: &str = "C.UTF-8";

/// How much of a command's output is kept for its last lines.
const TAIL_BYTES: usize = 16 * 1024;
/// Longest output line kept in an outcome, in characters.
const LINE_CHARS: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no command to run")]
    EmptyCommand,
    #[error("command {0}: not found in the release")]
    NotInRelease(String),
    #[error("command {0}: not found")]
    NotFound(String),
    #[error("command {program}: not found on PATH ({path})")]
    NotOnPath { program: String, path: String },
    #[error("command {0}: is a directory")]
    IsDirectory(String),
    #[error("command {0}: not executable")]
    NotExecutable(String),
    #[error("look up user {name}: {reason}")]
    UserLookup { name: String, reason: String },
    #[error("user {0} does not exist on this host")]
    NoSuchUser(String),
    #[error("running as user {0} needs an agent running as root")]
    NeedsRoot(String),
    #[error("start {program}: {source}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The user a service's processes run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name: `USER`, `LOGNAME`, and logs.
    pub name: String,
    /// The ids the process switches to (and owns its state directory as).
    pub uid: u32,
    pub gid: u32,
    /// `HOME` of the process.
    pub home: PathBuf,
    /// Whether processes switch to `uid`/`gid` (the agent runs as another user, root).
    switch: bool,
}

impl RunAs {
    /// The plan's `[run] user` (`plan_user`, may be empty); else, for an agent running as
    /// root, `service_user`; else the agent's own user. `"root"` runs as root on purpose.
    pub fn resolve(plan_user: &str, service_user: Option<&str>) -> Result<RunAs, Error> {
        let me = nix::unistd::geteuid();
        let name = if !plan_user.is_empty() {
            Some(plan_user)
        } else if me.is_root() {
            service_user
        } else {
            None
        };
        let Some(name) = name else {
            return Ok(RunAs::agent());
        };
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| Error::UserLookup {
                name: name.to_string(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| Error::NoSuchUser(name.to_string()))?;
        if user.uid != me && !me.is_root() {
            return Err(Error::NeedsRoot(name.to_string()));
        }
        Ok(RunAs {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
            switch: user.uid != me,
        })
    }

    /// The user the agent itself runs as.
    fn agent() -> RunAs {
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        match nix::unistd::User::from_uid(uid) {
            Ok(Some(u)) => RunAs {
                name: u.name,
                uid: uid.as_raw(),
                gid: gid.as_raw(),
                home: u.dir,
                switch: false,
            },
            // A uid without a passwd entry (containers): still a user, with no home.
            _ => RunAs {
                name: uid.to_string(),
                uid: uid.as_raw(),
                gid: gid.as_raw(),
                home: PathBuf::from("/"),
                switch: false,
            },
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// `DATA/state/<service>`: the service's own writable directory, kept across releases
/// (the value of `CUTOVER_STATE_DIR`). It is owned by the user the service runs as, mode
/// 0700, and handed over to a new user when the plan's user changes; `DATA/state` lets
/// users through to their own directory but not list the others.
pub fn state_dir(data_dir: &Path, service: &str, user: &RunAs) -> Result<PathBuf, Error> {
    let parent = crate::data_dir::state(data_dir);
    ensure_dir(&parent, 0o711)?;
    let dir = parent.join(service);
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Io {
                action: "use state directory",
                path: dir,
                source: std::io::Error::other("not a directory"),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io("create", &dir))?,
        Err(e) => return Err(io("read", &dir)(e)),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(io("read", &dir))?;
    if (meta.uid(), meta.gid()) != (user.uid, user.gid) {
        // Only the directory itself: what the previous user left inside stays theirs
        // (the new owner may remove it), and root never follows links the service made.
        std::os::unix::fs::lchown(&dir, Some(user.uid), Some(user.gid))
            .map_err(io("hand over", &dir))?;
    }
    if meta.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("set permissions of", &dir))?;
    }
    Ok(dir)
}

/// Creates `dir` (and its parents) if needed and gives it exactly `mode`.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io("create", dir))?;
    let meta = std::fs::metadata(dir).map_err(io("read", dir))?;
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(io("set permissions of", dir))?;
    }
    Ok(())
}

/// Where, as whom and with which variables a service's processes run.
#[derive(Clone, Debug)]
pub struct Launcher {
    /// The release directory: the working directory, and where `./bin/web` is found.
    pub dir: PathBuf,
    /// Who the processes run as.
    pub user: RunAs,
    /// The service's variables (the plan's `[run] env`, `PORT`, `CUTOVER_*`), on top of
    /// the clean base; they may override it (a plan may set its own `PATH`).
    pub env: Vec<(String, String)>,
}

/// How a command runs to completion ([`Launcher::run`]).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Variables added to the launcher's (e.g. `CUTOVER_HOOK`).
    pub env: Vec<(String, String)>,
    /// The working directory; default the launcher's directory.
    pub cwd: Option<PathBuf>,
    /// After this long the process group is stopped and the outcome is a timeout.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL when the group is stopped.
    pub grace: Duration,
    /// The whole output (stdout and stderr, interleaved) is appended to this file.
    pub output_log: Option<PathBuf>,
    /// How many of the last non-empty output lines the outcome keeps.
    pub tail_lines: usize,
    /// Told the command's pid (also its process group's id) once it has started, so a
    /// caller can record it while the command runs.
    pub started: Option<tokio::sync::mpsc::UnboundedSender<u32>>,
}

impl RunOptions {
    pub fn new(timeout: Duration) -> RunOptions {
        RunOptions {
            env: Vec::new(),
            cwd: None,
            timeout,
            grace: Duration::from_secs(5),
            output_log: None,
            tail_lines: 10,
            started: None,
        }
    }
}

/// How a command run to completion ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// It ran past its timeout and its process group was stopped.
    TimedOut(Duration),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status: {c}"),
            Exit::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "signal: {s} ({})", sig.as_str()),
                Err(_) => write!(f, "signal: {s}"),
            },
            Exit::TimedOut(t) => write!(f, "timed out after {}", humanize(*t)),
        }
    }
}

fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// What [`Launcher::run`] observed.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// How it ended: success is `Code(0)`.
    pub exit: Exit,
    /// The last non-empty lines of output, oldest first, each cut to 300 characters.
    pub tail: Vec<String>,
    /// How long it ran.
    pub duration: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }
}

impl Launcher {
    /// The complete environment a process gets: the clean base, the launcher's
    /// variables, then `extra`; a later value of a name replaces an earlier one.
    pub fn environment(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let base = [
            ("PATH", PATH.to_string()),
            ("LANG", LANG.to_string()),
            ("HOME", self.user.home.to_string_lossy().into_owned()),
            ("USER", self.user.name.clone()),
            ("LOGNAME", self.user.name.clone()),
        ];
        let mut env: Vec<(String, String)> = Vec::new();
        let all = base
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain(self.env.iter().cloned())
            .chain(extra.iter().cloned());
        for (k, v) in all {
            match env.iter_mut().find(|(name, _)| *name == k) {
                Some(slot) => slot.1 = v,
                None => env.push((k, v)),
            }
        }
        env
    }

    fn command(
        &self,
        argv: &[String],
        cwd: Option<&Path>,
        extra: &[(String, String)],
    ) -> Result<(tokio::process::Command, String), Error> {
        let (prog, args) = argv.split_first().ok_or(Error::EmptyCommand)?;
        let env = self.environment(extra);
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map_or(PATH, |(_, v)| v.as_str());
        let program = resolve_program(prog, &self.dir, path)?;
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(args)
            .current_dir(cwd.unwrap_or(&self.dir))
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .process_group(0);
        if self.user.switch {
            // std drops root's supplementary groups (setgroups(0)) before setuid.
            cmd.uid(self.user.uid).gid(self.user.gid);
        }
        Ok((cmd, prog.clone()))
    }

    /// Starts a long-running process whose stdout and stderr are appended to `log`. The
    /// process holds the file itself, so it keeps running and logging without the agent.
    pub fn start(&self, argv: &[String], log: &Path) -> Result<tokio::process::Child, Error> {
        let (mut cmd, prog) = self.command(argv, None, &[])?;
        let out = open_log(log)?;
        let err = out.try_clone().map_err(io("open log file", log))?;
        cmd.stdout(out).stderr(err).kill_on_drop(true);
        cmd.spawn().map_err(|source| Error::Start {
            program: prog,
            source,
        })
    }

    /// Runs a command to completion. Past `timeout` its whole process group is stopped
    /// (SIGTERM, then SIGKILL after `grace`); when the command ends by itself, whatever it
    /// left running in its group is stopped the same way, so nothing outlives it.
    pub async fn run(&self, argv: &[String], opts: &RunOptions) -> Result<Outcome, Error> {
        let (mut cmd, prog) = self.command(argv, opts.cwd.as_deref(), &opts.env)?;
        let log = match &opts.output_log {
            Some(p) => Some(tokio::fs::File::from_std(open_log(p)?)),
            None => None,
        };
        let pipe_err = |source| Error::Start {
            program: prog.clone(),
            source,
        };
        let (tx, rx) = tokio::net::unix::pipe::pipe().map_err(pipe_err)?;
        let out = tx.into_blocking_fd().map_err(pipe_err)?;
        let err = out.try_clone().map_err(pipe_err)?;
        cmd.stdout(out).stderr(err).kill_on_drop(true);
        let started = Instant::now();
        let spawned = cmd.spawn();
        // The command keeps copies of the pipe's writing end: close them, so reading
        // ends when the processes of the group are gone.
        drop(cmd);
        let mut child = spawned.map_err(|source| Error::Start {
            program: prog.clone(),
            source,
        })?;
        let mut guard = Group {
            pgid: child
                .id()
                .and_then(|p| i32::try_from(p).ok())
                .map(Pid::from_raw),
            reader: Some(tokio::spawn(collect(rx, log, opts.tail_lines))),
        };
        if let (Some(tell), Some(pid)) = (&opts.started, child.id()) {
            let _ = tell.send(pid);
        }
        let exit = tokio::select! {
            status = child.wait() => match status {
                Ok(s) => exit_of(s),
                Err(e) => return Err(Error::Start { program: prog, source: e }),
            },
            _ = tokio::time::sleep(opts.timeout) => Exit::TimedOut(opts.timeout),
        };
        if let Some(pgid) = guard.pgid {
            stop_group(pgid, &mut child, opts.grace).await;
            // Stopped: the guard must not signal a group id the system may reuse.
            guard.pgid = None;
        }
        let tail = match guard.reader.take() {
            Some(reader) => output_tail(reader, opts.grace).await,
            None => Vec::new(),
        };
        Ok(Outcome {
            exit,
            tail,
            duration: started.elapsed(),
        })
    }
}

/// The last lines the output reader gathered. Bounded: a process that left the group
/// may still hold the output open.
async fn output_tail(
    mut reader: tokio::task::JoinHandle<Vec<String>>,
    grace: Duration,
) -> Vec<String> {
    match tokio::time::timeout(grace.max(Duration::from_secs(1)), &mut reader).await {
        Ok(Ok(tail)) => tail,
        _ => {
            reader.abort();
            Vec::new()
        }
    }
}

/// Stops a command's process group if [`Launcher::run`] is abandoned halfway (its
/// caller was cancelled), so that no process of it survives.
struct Group {
    /// The group to kill on drop; `None` once it was stopped properly.
    pgid: Option<Pid>,
    /// The task reading the output, aborted on drop.
    reader: Option<tokio::task::JoinHandle<Vec<String>>>,
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Code(-1),
    }
}

/// SIGTERM to the group, SIGKILL to whatever of it still runs after `grace`; reaps the
/// leader. Returns at once when nothing of the group runs any more.
async fn stop_group(pgid: Pid, leader: &mut tokio::process::Child, grace: Duration) {
    let _ = leader.try_wait();
    if !group_runs(pgid) {
        return;
    }
    let _ = killpg(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        let _ = leader.try_wait();
        if !group_runs(pgid) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = killpg(pgid, Signal::SIGKILL);
    let _ = tokio::time::timeout(Duration::from_secs(5), leader.wait()).await;
}

/// True while a process of group `pgid` runs. The usual answer (the group is gone) costs
/// one syscall; only a group that still has members is looked up in /proc, where the
/// zombies an init that does not reap would leave are told apart.
fn group_runs(pgid: Pid) -> bool {
    match killpg(pgid, None) {
        Err(nix::errno::Errno::ESRCH) => false,
        _ => !crate::os::group_members(pgid.as_raw()).is_empty(),
    }
}

/// Reads a command's output to its end: appends it to `log` (if any) and returns the
/// last `lines` non-empty lines.
async fn collect(
    mut rx: tokio::net::unix::pipe::Receiver,
    mut log: Option<tokio::fs::File>,
    lines: usize,
) -> Vec<String> {
    use tokio::io::AsyncWriteExt;
    let mut tail: VecDeque<u8> = VecDeque::new();
    let mut cut = false;
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(f) = log.as_mut()
            && let Err(e) = f.write_all(&buf[..n]).await
        {
            tracing::warn!(error = %e, "append command output to its log");
            log = None;
        }
        tail.extend(&buf[..n]);
        if tail.len() > TAIL_BYTES {
            tail.drain(..tail.len() - TAIL_BYTES);
            cut = true;
        }
    }
    if let Some(f) = log.as_mut() {
        let _ = f.flush().await;
    }
    let bytes: Vec<u8> = tail.into();
    last_lines(&bytes, cut, lines)
}

/// The last `n` non-empty lines of `bytes`, each cut to [`LINE_CHARS`]; when the buffer
/// was cut at its start, its first (partial) line is not one of them.
fn last_lines(bytes: &[u8], cut: bool, n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if cut && !all.is_empty() {
        all.remove(0);
    }
    let mut out: Vec<String> = all
        .into_iter()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| l.chars().take(LINE_CHARS).collect())
        .collect();
    out.reverse();
    out
}

/// Opens a log file for appending (0600), creating it and its directory (0700).
fn open_log(path: &Path) -> Result<std::fs::File, Error> {
    if let Some(dir) = path.parent()
        && !dir.is_dir()
    {
        ensure_dir(dir, 0o700)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io("open log file", path))
}

/// The program to execute for `prog`: a relative path with `/` is the release's file;
/// an absolute path is itself; a bare name is looked up on `path`. The file must exist
/// and be executable.
pub fn resolve_program(prog: &str, release: &Path, path: &str) -> Result<PathBuf, Error> {
    let p = Path::new(prog);
    if prog.contains('/') {
        let (full, missing) = if p.is_relative() {
            (release.join(p), Error::NotInRelease(prog.to_string()))
        } else {
            (p.to_path_buf(), Error::NotFound(prog.to_string()))
        };
        return match std::fs::metadata(&full) {
            Err(_) => Err(missing),
            Ok(m) if m.is_dir() => Err(Error::IsDirectory(prog.to_string())),
            Ok(m) if m.permissions().mode() & 0o111 == 0 => {
                Err(Error::NotExecutable(prog.to_string()))
            }
            Ok(_) => Ok(full),
        };
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(prog))
        .find(|c| {
            std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| Error::NotOnPath {
            program: prog.to_string(),
            path: path.to_string(),
        })
}

#[cfg(test)]
mod tests;
