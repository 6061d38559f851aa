//! People on a [`Cluster`]: personal credentials issued by `cutover admin create`, and
//! the CLI run with them (as someone else than the first-start admin).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::cluster::Cluster;

impl Cluster {
    /// `cutover admin create NAME --role ROLE` into `DIR/people/NAME`, as the first-start
    /// admin; returns the credentials folder.
    pub fn admin_create(&self, name: &str, role: &str) -> PathBuf {
        let dir = self.dir.join("people").join(name);
        let path = dir.to_str().expect("utf-8 path");
        let printed = self.cli_ok(&["admin", "create", name, "--role", role, "--out", path]);
        assert_eq!(printed.trim(), path, "create prints the folder alone");
        dir
    }

    /// `cutover ARGS` with the credentials in `credentials`, to run as the caller needs.
    pub fn cli_command_as(&self, credentials: &Path, args: &[&str]) -> Command {
        let mut cmd = self.cli_command(args);
        cmd.env("CUTOVER_CREDENTIALS", credentials);
        cmd
    }

    /// Runs the CLI with the credentials in `credentials`.
    pub fn cli_as(&self, credentials: &Path, args: &[&str]) -> Output {
        self.cli_command_as(credentials, args)
            .output()
            .expect("run cutover")
    }

    /// Runs the CLI with the credentials in `credentials`; returns stdout, panicking with
    /// stderr on failure.
    pub fn cli_as_ok(&self, credentials: &Path, args: &[&str]) -> String {
        let out = self.cli_as(credentials, args);
        assert!(
            out.status.success(),
            "cutover {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
