//! Restarting the agent in place (SIGHUP, e.g. after its binary was upgraded) without
//! dropping a request: the agent stops accepting on its public ports, lets its clients'
//! connections finish, then re-executes its binary in the same process. The listening
//! sockets cross the `execve` open (their numbers travel in [`ENV`]), so connections that
//! arrive meanwhile wait in the kernel's accept queue; the slot processes stay this
//! process's children and are adopted by the new run (see [`crate::slot::adopt`]).

use std::ffi::{CString, OsString};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

use crate::proxy::Mode;

/// `http@127.0.0.1:8080=5,tcp@127.0.0.1:5432=6`: inherited listening sockets.
pub const ENV: &str = "CUTOVER_AGENT_LISTENERS";

/// A listening socket inherited from the agent run before this one.
pub struct Inherited {
    /// The public address it listens on: the service with this address takes it.
    pub addr: SocketAddr,
    /// The protocol it served, which the service must still want.
    pub mode: Mode,
    /// The listening socket itself, still queueing connections.
    pub fd: OwnedFd,
}

/// Takes ownership of the sockets named in [`ENV`]. Call once, first thing, before any
/// other code opens files (so the numbers still mean what the previous run meant). Each
/// gets close-on-exec back, so slot processes never inherit it.
pub fn take_inherited() -> Vec<Inherited> {
    let Some(list) = std::env::var_os(ENV) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in list.to_string_lossy().split(',').filter(|i| !i.is_empty()) {
        let parsed = (|| {
            let (what, fd) = item.rsplit_once('=')?;
            let (mode, addr) = what.split_once('@')?;
            let mode = match mode {
                "http" => Mode::Http,
                "tcp" => Mode::Tcp,
                _ => return None,
            };
            Some((
                mode,
                addr.parse::<SocketAddr>().ok()?,
                fd.parse::<RawFd>().ok()?,
            ))
        })();
        let Some((mode, addr, fd)) = parsed else {
            eprintln!("warning: {ENV}: ignoring {item:?}");
            continue;
        };
        if fd < 3 || !std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists() {
            eprintln!("warning: {ENV}: descriptor {fd} is not open");
            continue;
        }
        // SAFETY: the descriptor is open (checked above) and the previous run of this
        // agent passed it across execve for exactly this purpose: nothing else in this
        // process knows or owns it.
        #[allow(unsafe_code)]
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Err(e) = set_cloexec(fd.as_fd(), true) {
            eprintln!("warning: {ENV}: descriptor {}: {e}", fd.as_raw_fd());
            continue;
        }
        out.push(Inherited { addr, mode, fd });
    }
    out
}

fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> nix::Result<()> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(|_| ())
}

/// The program to run again and its arguments, recorded at start: after an upgrade the
/// path names the new binary.
pub struct Exe {
    /// The binary, as it was started.
    pub path: PathBuf,
    /// The command line, given again to the new run.
    pub args: Vec<OsString>,
}

impl Exe {
    pub fn current() -> std::io::Result<Exe> {
        Ok(Exe {
            path: std::env::current_exe()?,
            args: std::env::args_os().collect(),
        })
    }

    /// Whether the binary can be executed now (checked before a restart begins).
    pub fn check(&self) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(&self.path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
            Ok(_) => Err(format!("{} is not an executable file", self.path.display())),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }

    /// Replaces this process with a new run of the agent that inherits `listeners`.
    /// Returns only if that failed.
    pub fn exec(&self, listeners: &[(SocketAddr, Mode, BorrowedFd<'_>)]) -> std::io::Error {
        let mut list = Vec::new();
        for (addr, mode, fd) in listeners {
            if let Err(e) = set_cloexec(fd.as_fd(), false) {
                return std::io::Error::other(format!("keep {addr} open: {e}"));
            }
            let m = match mode {
                Mode::Http => "http",
                Mode::Tcp => "tcp",
            };
            list.push(format!("{m}@{addr}={}", fd.as_raw_fd()));
        }
        let c = |s: &[u8]| CString::new(s).map_err(std::io::Error::other);
        let built = (|| {
            let path = c(self.path.as_os_str().as_bytes())?;
            let args = self
                .args
                .iter()
                .map(|a| c(a.as_bytes()))
                .collect::<Result<Vec<_>, _>>()?;
            let mut env = std::env::vars_os()
                .filter(|(k, _)| k != ENV)
                .map(|(k, v)| {
                    let mut kv = k.as_bytes().to_vec();
                    kv.push(b'=');
                    kv.extend_from_slice(v.as_bytes());
                    c(&kv)
                })
                .collect::<Result<Vec<_>, _>>()?;
            env.push(c(format!("{ENV}={}", list.join(",")).as_bytes())?);
            Ok::<_, std::io::Error>((path, args, env))
        })();
        let (path, args, env) = match built {
            Ok(b) => b,
            Err(e) => return e,
        };
        match nix::unistd::execve(&path, &args, &env) {
            Err(e) => {
                for (_, _, fd) in listeners {
                    let _ = set_cloexec(fd.as_fd(), true);
                }
                std::io::Error::other(format!("execute {}: {e}", self.path.display()))
            }
        }
    }
}
