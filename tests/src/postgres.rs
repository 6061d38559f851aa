//! A real PostgreSQL server for the database tests: Debian's `postgresql` binaries
//! (on `PATH`, or in `/usr/lib/postgresql/<version>/bin` where Debian puts them),
//! `initdb` into a temporary directory (as the `postgres` user when the tests run as
//! root, which PostgreSQL refuses to be), trust authentication on a free 127.0.0.1
//! port, stopped and removed when the test ends. [`Postgres::sql`] runs SQL as the
//! superuser with `psql`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::procs::free_port;

/// A PostgreSQL server of the test's own.
pub struct Postgres {
    /// Where its binaries are.
    bin: PathBuf,
    /// Its data directory (and socket directory), removed on drop.
    dir: tempfile::TempDir,
    /// The TCP port it listens on, on 127.0.0.1.
    pub port: u16,
    /// The user the server runs as, when the tests run as root.
    user: Option<(u32, u32)>,
}

impl Postgres {
    /// Initialises and starts a server; panics with what went wrong.
    pub fn start() -> Postgres {
        let bin = binaries().expect(
            "PostgreSQL is not installed: tests/run.sh installs Debian's postgresql package",
        );
        let dir = tempfile::Builder::new()
            .prefix("cutover-pg-")
            .tempdir()
            .expect("tempdir");
        let user = server_user();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let pg = Postgres {
            bin,
            dir,
            port: free_port(),
            user,
        };
        let data = pg.data();
        pg.run("initdb", |c| {
            c.args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data);
        });
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            pg.port,
            pg.dir.path().display()
        );
        pg.run("pg_ctl", |c| {
            c.args(["start", "-w", "-t", "60", "-D"])
                .arg(&data)
                .args(["-o", &options, "-l"])
                .arg(pg.dir.path().join("server.log"));
        });
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of the server's programs as its user; panics with its output if it fails.
    fn run(&self, program: &str, args: impl FnOnce(&mut Command)) -> Output {
        let mut cmd = Command::new(self.bin.join(program));
        args(&mut cmd);
        cmd.current_dir(self.dir.path()).env_remove("PGOPTIONS");
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The variables a client needs to reach this server as the superuser (what a
    /// plan's `[run] env` gives the service and its database commands).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("PGHOST", "127.0.0.1".to_string()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", "postgres".to_string()),
            ("PGDATABASE", "postgres".to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec()
    }

    /// Runs `sql` with `psql` (stopping at the first error); returns what it printed,
    /// unaligned and without headers, or panics with the error.
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .envs(self.env())
            .env_remove("PGOPTIONS")
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Whether schema `name` exists.
    pub fn has_schema(&self, name: &str) -> bool {
        self.sql(&format!(
            "select count(*) from information_schema.schemata where schema_name = '{name}'"
        )) == "1"
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        cmd.args(["stop", "-m", "immediate", "-D"]).arg(&data);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        let _ = cmd.output();
    }
}

/// The directory holding `initdb`, `pg_ctl` and `psql`: the newest of Debian's
/// `/usr/lib/postgresql/<version>/bin`, else one on `PATH`.
pub fn binaries() -> Option<PathBuf> {
    let all = |d: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|p| d.join(p).is_file())
    };
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| all(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| all(d))
}

/// As whom the server runs: `postgres` when the tests run as root (PostgreSQL refuses
/// root), else the tests' own user.
fn server_user() -> Option<(u32, u32)> {
    if !nix_root() {
        return None;
    }
    let out = Command::new("id").args(["-u", "postgres"]).output().ok()?;
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    let out = Command::new("id").args(["-g", "postgres"]).output().ok()?;
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some((uid, gid))
}

fn nix_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
