//! The agent's durable state: one redb file, `DATA/agent.redb`, holding the last desired
//! state per service (protobuf), so a restarted agent serves the same releases and
//! weights before it reaches the coordinator; the slot processes it started; and the
//! database tasks it started, so none is ever started twice. Only this module touches
//! the database.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use cutover_proto::v1::DesiredService;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const DESIRED: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("desired");
/// Slot processes this agent started, keyed `service/slot/pid`, so that a restarted
/// agent can adopt the ones still running its desired specs and stop the others.
const PROCESSES: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("processes");

/// Releases unpacked for a service, keyed `service/directory name`, so that the agent
/// can report each kept release's whole version and sha256 (the directory name carries
/// a file-safe version and a digest prefix only).
const RELEASES: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("releases");

/// A release directory as recorded when a slot prepared it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReleaseRecord {
    /// The plan's `[release] version`.
    pub version: String,
    /// The artifact's sha256, lowercase hex.
    pub sha256: String,
}

/// Database tasks this agent started, keyed by task id: recorded before the command
/// starts, so a task id with a record is never started again.
const TASKS: TableDefinition<'static, &'static str, &'static [u8]> = TableDefinition::new("tasks");

/// Task records kept per service (the newest); the coordinator only ever asks for the
/// newest task of a service again.
pub const TASKS_KEPT: usize = 20;

/// Where a database task stands, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Its command was about to start, or runs.
    Running,
    Succeeded,
    /// It exited non-zero, timed out, or could not start.
    Failed,
    /// The agent stopped while it ran: how it ended is unknown.
    Interrupted,
}

/// A database task as recorded: before its command starts, and when it ends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskRecord {
    /// `<deployment>/<phase>[#attempt]`, as the coordinator named it.
    pub id: String,
    pub service: String,
    pub state: TaskState,
    pub started_unix_ms: u64,
    /// The exit code, when the command exited by itself.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// How it ended, for people (empty while it runs).
    #[serde(default)]
    pub exit: String,
    /// The last lines of its output.
    #[serde(default)]
    pub tail: Vec<String>,
    #[serde(default)]
    pub duration_ms: u64,
    /// Where its whole output is.
    pub log: String,
    /// Its process group while it runs (0 until known) and that process's start time,
    /// so a restarted agent stops what an interrupted task left running, and nothing else.
    #[serde(default)]
    pub pid: i32,
    #[serde(default)]
    pub start_ticks: u64,
}

/// A slot process as recorded when it started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRecord {
    /// The service and slot (`blue`/`green`) that started it: only they may adopt it.
    pub service: String,
    pub slot: String,
    /// Its pid, which is also its process group's id (signals go to the group).
    pub pid: i32,
    /// The process's start time in clock ticks since boot (/proc/PID/stat field 22), so
    /// a recycled pid is never mistaken for ours.
    pub start_ticks: u64,
    /// The version it runs, for logs.
    pub release: String,
    /// The port the process was given (`${PORT}`); 0 in records from older agents.
    #[serde(default)]
    pub port: u16,
    /// Digest of the slot spec it runs ([`crate::slot::adopt::spec_digest`]), so a restarted
    /// agent adopts it only for the very same spec.
    #[serde(default)]
    pub spec_digest: String,
}

impl ProcessRecord {
    fn key(&self) -> String {
        format!("{}/{}/{}", self.service, self.slot, self.pid)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("agent store: {0}")]
    Db(#[from] redb::Error),
    #[error("agent store: disk full at {}", .0.display())]
    DiskFull(std::path::PathBuf),
    #[error("another agent is running with data dir {} ({} is locked)", .0.parent().unwrap_or(Path::new(".")).display(), .0.display())]
    Locked(std::path::PathBuf),
    #[error("agent store {}: {source}", .path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(impl From<$t> for Error { fn from(e: $t) -> Self { Error::Db(e.into()) } })*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The agent's database. After one I/O error (a full disk) redb refuses every later
/// write until the file is opened again; [`Store`] does that on the next write, so the
/// agent keeps recording desired state once space is freed, without a restart.
pub struct Store {
    /// The file, opened again after an I/O error.
    path: std::path::PathBuf,
    /// The open database; `None` while it is being opened again.
    db: RwLock<Option<Arc<Database>>>,
    /// The last write failed.
    failing: AtomicBool,
}

/// Opens (or creates) the file, readable by its owner only from the first byte: desired
/// state holds the plans' environment.
fn open_file(path: &Path) -> Result<Database, Error> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file_err = |source| Error::File {
        path: path.to_path_buf(),
        source,
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(file_err)?;
    match Database::create(path) {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(Error::Locked(path.to_path_buf())),
        Err(e) => Err(e.into()),
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, Error> {
        let s = Store {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(open_file(path)?))),
            failing: AtomicBool::new(false),
        };
        s.write(|w| {
            w.open_table(DESIRED)?;
            w.open_table(PROCESSES)?;
            w.open_table(RELEASES)?;
            w.open_table(TASKS)?;
            Ok(())
        })?;
        Ok(s)
    }

    /// False while writes fail (the last one did).
    pub fn writable(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    fn db(&self) -> Result<Arc<Database>, Error> {
        if let Some(db) = self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(db.clone());
        }
        self.reopen()
    }

    fn reopen(&self) -> Result<Arc<Database>, Error> {
        let mut cur = self.db.write().unwrap_or_else(|p| p.into_inner());
        drop(cur.take());
        let db = Arc::new(open_file(&self.path)?);
        *cur = Some(db.clone());
        tracing::warn!(path = %self.path.display(), "agent store opened again after an I/O error");
        Ok(db)
    }

    /// One write transaction: `f` fills it, then it commits. A database poisoned by an
    /// earlier I/O error is opened again first.
    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let r = (|| {
            // Bound first: a temporary handle alive in the match would keep the old
            // database open (and its file locked) while it is opened again.
            let first = self.db()?.begin_write();
            let w = match first {
                Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => {
                    self.reopen()?.begin_write()?
                }
                r => r?,
            };
            f(&w)?;
            w.commit()?;
            Ok(())
        })();
        self.failing.store(r.is_err(), Ordering::Relaxed);
        r.map_err(|e| match &e {
            Error::Db(redb::Error::Io(io)) if io.kind() == std::io::ErrorKind::StorageFull => {
                Error::DiskFull(self.path.parent().unwrap_or(Path::new(".")).to_path_buf())
            }
            _ => e,
        })
    }

    pub fn put_desired(&self, d: &DesiredService) -> Result<(), Error> {
        self.write(|w| {
            w.open_table(DESIRED)?
                .insert(d.service.as_str(), d.encode_to_vec().as_slice())?;
            Ok(())
        })
    }

    /// Forgets a service's desired state (`service remove`).
    pub fn remove_desired(&self, service: &str) -> Result<(), Error> {
        self.write(|w| {
            w.open_table(DESIRED)?.remove(service)?;
            Ok(())
        })
    }

    /// Records what the release directory `dir` of `service` holds.
    pub fn put_release(&self, service: &str, dir: &str, r: &ReleaseRecord) -> Result<(), Error> {
        let v = serde_json::to_vec(r).unwrap_or_default();
        let key = format!("{service}/{dir}");
        self.write(|w| {
            w.open_table(RELEASES)?.insert(key.as_str(), v.as_slice())?;
            Ok(())
        })
    }

    /// The recorded release directories of `service`, by directory name.
    pub fn releases(
        &self,
        service: &str,
    ) -> Result<std::collections::BTreeMap<String, ReleaseRecord>, Error> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(RELEASES)?;
        let prefix = format!("{service}/");
        let mut out = std::collections::BTreeMap::new();
        for item in t.range(prefix.as_str()..)? {
            let (k, v) = item?;
            let Some(dir) = k.value().strip_prefix(&prefix) else {
                break;
            };
            if let Ok(rec) = serde_json::from_slice(v.value()) {
                out.insert(dir.to_string(), rec);
            }
        }
        Ok(out)
    }

    /// Forgets the release records of `service` whose directories are not in `keep`.
    pub fn prune_releases(&self, service: &str, keep: &[String]) -> Result<(), Error> {
        let gone: Vec<String> = self
            .releases(service)?
            .into_keys()
            .filter(|d| !keep.contains(d))
            .map(|d| format!("{service}/{d}"))
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        self.write(|w| {
            let mut t = w.open_table(RELEASES)?;
            for k in &gone {
                t.remove(k.as_str())?;
            }
            Ok(())
        })
    }

    pub fn put_process(&self, p: &ProcessRecord) -> Result<(), Error> {
        let v = serde_json::to_vec(p).unwrap_or_default();
        self.write(|w| {
            w.open_table(PROCESSES)?
                .insert(p.key().as_str(), v.as_slice())?;
            Ok(())
        })
    }

    pub fn remove_process(&self, p: &ProcessRecord) -> Result<(), Error> {
        self.write(|w| {
            w.open_table(PROCESSES)?.remove(p.key().as_str())?;
            Ok(())
        })
    }

    pub fn processes(&self) -> Result<Vec<ProcessRecord>, Error> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(PROCESSES)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (_, v) = item?;
            if let Ok(p) = serde_json::from_slice(v.value()) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Records a database task (replacing its earlier record), and forgets the oldest
    /// records of its service beyond [`TASKS_KEPT`].
    pub fn put_task(&self, t: &TaskRecord) -> Result<(), Error> {
        let v = serde_json::to_vec(t).unwrap_or_default();
        self.write(|w| {
            let mut table = w.open_table(TASKS)?;
            table.insert(t.id.as_str(), v.as_slice())?;
            let mut same: Vec<(u64, String)> = Vec::new();
            for item in table.iter()? {
                let (k, v) = item?;
                if let Ok(r) = serde_json::from_slice::<TaskRecord>(v.value())
                    && r.service == t.service
                {
                    same.push((r.started_unix_ms, k.value().to_string()));
                }
            }
            same.sort();
            let extra = same.len().saturating_sub(TASKS_KEPT);
            for (_, id) in same.into_iter().take(extra) {
                table.remove(id.as_str())?;
            }
            Ok(())
        })
    }

    /// Every database task recorded.
    pub fn tasks(&self) -> Result<Vec<TaskRecord>, Error> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(TASKS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            match serde_json::from_slice(v.value()) {
                Ok(rec) => out.push(rec),
                Err(e) => {
                    tracing::error!(task = k.value(), error = %e, "stored task record unreadable; skipped")
                }
            }
        }
        Ok(out)
    }

    pub fn desired(&self) -> Result<Vec<DesiredService>, Error> {
        let r = self.db()?.begin_read()?;
        let t = r.open_table(DESIRED)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            match DesiredService::decode(v.value()) {
                Ok(d) => out.push(d),
                Err(e) => {
                    tracing::error!(service = k.value(), error = %e, "stored desired state unreadable; skipped")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, service: &str, started: u64) -> TaskRecord {
        TaskRecord {
            id: id.into(),
            service: service.into(),
            state: TaskState::Succeeded,
            started_unix_ms: started,
            exit_code: Some(0),
            exit: "exit status: 0".into(),
            tail: vec![],
            duration_ms: 1,
            log: String::new(),
            pid: 0,
            start_ticks: 0,
        }
    }

    #[test]
    fn task_records_survive_reopen_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.redb");
        {
            let s = Store::open(&p).unwrap();
            for i in 0..(TASKS_KEPT as u64 + 3) {
                s.put_task(&task(&format!("d-{i:06}/expand"), "web", 100 + i))
                    .unwrap();
            }
            s.put_task(&task("d-000001/expand", "api", 1)).unwrap();
            let mut again = task("d-000022/expand", "web", 122);
            again.state = TaskState::Interrupted;
            s.put_task(&again).unwrap();
        }
        let s = Store::open(&p).unwrap();
        let all = s.tasks().unwrap();
        let web: Vec<&TaskRecord> = all.iter().filter(|t| t.service == "web").collect();
        assert_eq!(web.len(), TASKS_KEPT);
        assert!(
            !web.iter().any(|t| t.id == "d-000000/expand"),
            "the oldest are forgotten"
        );
        let last = web.iter().find(|t| t.id == "d-000022/expand").unwrap();
        assert_eq!(last.state, TaskState::Interrupted, "a record is replaced");
        assert!(
            all.iter().any(|t| t.service == "api"),
            "other services keep theirs"
        );
    }

    #[test]
    fn release_records_are_kept_per_service_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("a.redb")).unwrap();
        let rec = |v: &str| ReleaseRecord {
            version: v.into(),
            sha256: "ab".repeat(32),
        };
        s.put_release("web", "1.0-abababababab", &rec("1.0"))
            .unwrap();
        s.put_release("web", "2.0-abababababab", &rec("2.0"))
            .unwrap();
        s.put_release("webx", "9-abababababab", &rec("9")).unwrap();
        let web = s.releases("web").unwrap();
        assert_eq!(
            web.keys().collect::<Vec<_>>(),
            ["1.0-abababababab", "2.0-abababababab"]
        );
        s.prune_releases("web", &["2.0-abababababab".into()])
            .unwrap();
        assert_eq!(s.releases("web").unwrap().len(), 1);
        assert_eq!(s.releases("webx").unwrap()["9-abababababab"], rec("9"));
    }

    #[test]
    fn desired_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.redb");
        {
            let s = Store::open(&p).unwrap();
            s.put_desired(&DesiredService {
                service: "web".into(),
                generation: 3,
                ..Default::default()
            })
            .unwrap();
            s.put_desired(&DesiredService {
                service: "web".into(),
                generation: 4,
                ..Default::default()
            })
            .unwrap();
        }
        let s = Store::open(&p).unwrap();
        let d = s.desired().unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].generation, 4);
    }
}
