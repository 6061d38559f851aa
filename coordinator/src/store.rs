//! The coordinator's durable state: one redb file, `DATA/cutover.redb`. Only this module
//! touches the database. Values are JSON (records) or protobuf (desired host state);
//! every write is one transaction, so a crash never leaves half a decision on disk.
//! People's credentials and deploy locks are kept by [`trust`].

mod trust;

pub use trust::FirstAdmin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::{
    DeploymentRecord, HostRecord, Identity, Revocation, ServiceRecord, State, TokenRecord,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    #[error("disk full at {}: the coordinator cannot record anything until space is freed", .0.display())]
    DiskFull(PathBuf),
    #[error("another coordinator is running with data dir {} ({} is locked)", .0.parent().unwrap_or(Path::new(".")).display(), .0.display())]
    Locked(PathBuf),
    #[error("{}: {source}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("decode {table}/{key}: {source}")]
    Decode {
        table: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl From<redb::DatabaseError> for Error {
    fn from(e: redb::DatabaseError) -> Self {
        Error::Db(e.into())
    }
}
impl From<redb::TransactionError> for Error {
    fn from(e: redb::TransactionError) -> Self {
        Error::Db(e.into())
    }
}
impl From<redb::TableError> for Error {
    fn from(e: redb::TableError) -> Self {
        Error::Db(e.into())
    }
}
impl From<redb::StorageError> for Error {
    fn from(e: redb::StorageError) -> Self {
        Error::Db(e.into())
    }
}
impl From<redb::CommitError> for Error {
    fn from(e: redb::CommitError) -> Self {
        Error::Db(e.into())
    }
}

/// The open database, and what it takes to keep it usable. After one I/O error (a full
/// disk, say) redb refuses every later write ("Previous I/O error occurred") until the
/// database is opened again; this handle does that itself on the next write, so freeing
/// space is enough and no restart is needed. Nothing half-written survives: the failed
/// transaction never committed.
struct Db {
    path: PathBuf,
    /// `None` after a reopen failed; the next use tries again.
    current: RwLock<Option<Arc<Database>>>,
    /// The last commit failed: `/healthz` says so until one succeeds.
    failing: AtomicBool,
}

/// A write transaction that reports its commit's outcome to the handle.
struct Write<'a> {
    tx: WriteTransaction,
    db: &'a Db,
}

impl std::ops::Deref for Write<'_> {
    type Target = WriteTransaction;
    fn deref(&self) -> &WriteTransaction {
        &self.tx
    }
}

impl Write<'_> {
    fn commit(self) -> Result<(), Error> {
        let r = self.tx.commit().map_err(|e| self.db.explain(e.into()));
        self.db.failing.store(r.is_err(), Ordering::Relaxed);
        r
    }

    fn abort(self) -> Result<(), Error> {
        self.tx.abort().map_err(Error::from)
    }
}

impl Db {
    fn open(path: &Path) -> Result<Db, Error> {
        Ok(Db {
            path: path.to_path_buf(),
            current: RwLock::new(Some(Arc::new(open_file(path)?))),
            failing: AtomicBool::new(false),
        })
    }

    /// The open database; opened again first if an earlier reopen did not succeed.
    fn get(&self) -> Result<Arc<Database>, Error> {
        if let Some(db) = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(db.clone());
        }
        self.reopen()
    }

    fn begin_write(&self) -> Result<Write<'_>, Error> {
        // Bound first: a temporary handle alive in the match would keep the old
        // database open (and its file locked) while it is opened again.
        let first = self.get()?.begin_write();
        match first {
            Ok(tx) => Ok(Write { tx, db: self }),
            Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => {
                let tx = self.reopen()?.begin_write()?;
                Ok(Write { tx, db: self })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn begin_read(&self) -> Result<ReadTransaction, Error> {
        Ok(self.get()?.begin_read()?)
    }

    /// Opens the database again after an I/O error; redb recovers it to its last good
    /// commit.
    fn reopen(&self) -> Result<Arc<Database>, Error> {
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        // The old handle must be gone before the file can be opened again.
        drop(cur.take());
        match open_file(&self.path) {
            Ok(db) => {
                let db = Arc::new(db);
                *cur = Some(db.clone());
                tracing::warn!(path = %self.path.display(), "store opened again after an I/O error");
                Ok(db)
            }
            Err(e) => {
                self.failing.store(true, Ordering::Relaxed);
                Err(self.explain(e))
            }
        }
    }

    /// A full disk is said as such, naming the directory.
    fn explain(&self, e: Error) -> Error {
        let full = match &e {
            Error::Db(redb::Error::Io(io)) => io.kind() == std::io::ErrorKind::StorageFull,
            Error::File { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        };
        if full {
            Error::DiskFull(self.path.parent().unwrap_or(Path::new(".")).to_path_buf())
        } else {
            e
        }
    }
}

/// Opens (or creates) the database file, readable by its owner only from the first byte.
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

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

const META: Table = TableDefinition::new("meta");
const IDENTITIES: Table = TableDefinition::new("identities");
const TOKENS: Table = TableDefinition::new("tokens");
const HOSTS: Table = TableDefinition::new("hosts");
const SERVICES: Table = TableDefinition::new("services");
const DEPLOYMENTS: Table = TableDefinition::new("deployments");
/// Key `host/service`, value: protobuf `DesiredService`.
const DESIRED: Table = TableDefinition::new("desired");

/// Key `deployment id/sequence` (zero-padded), value: JSON timeline event. Kept forever.
const EVENTS: Table = TableDefinition::new("events");
/// Key: a person's name, value: JSON [`crate::admins::AdminRecord`].
const ADMINS: Table = TableDefinition::new("admins");
/// Key: a service's name, value: JSON [`crate::locks::LockRecord`].
const LOCKS: Table = TableDefinition::new("locks");

const ALL: [Table; 10] = [
    META,
    IDENTITIES,
    TOKENS,
    HOSTS,
    SERVICES,
    DEPLOYMENTS,
    DESIRED,
    EVENTS,
    ADMINS,
    LOCKS,
];

pub struct Store {
    db: Db,
    /// Each deployment's state, read from the store once and kept with every commit:
    /// what `/metrics` counts without reading every deployment record.
    states: Mutex<Option<BTreeMap<String, State>>>,
}

/// What [`Store::enroll`] did.
pub struct Enrolled {
    pub host: HostRecord,
    /// The host record it replaced (a `--replace` token); its certificates are revoked.
    pub replaced: Option<HostRecord>,
}

/// A set of writes committed together.
#[derive(Default)]
pub struct Batch {
    ops: Vec<(Table, String, Option<Vec<u8>>)>,
    /// The state of each deployment the batch writes.
    states: Vec<(String, State)>,
}

impl Batch {
    fn put_json<T: Serialize>(&mut self, t: Table, key: &str, v: &T) {
        // Serialising these plain records cannot fail (no maps with non-string keys).
        let bytes = serde_json::to_vec(v).unwrap_or_default();
        self.ops.push((t, key.to_string(), Some(bytes)));
    }
    pub fn deployment(&mut self, d: &DeploymentRecord) -> &mut Self {
        self.put_json(DEPLOYMENTS, &d.id, d);
        self.states.push((d.id.clone(), d.state));
        self
    }
    pub fn service(&mut self, s: &ServiceRecord) -> &mut Self {
        self.put_json(SERVICES, &s.name, s);
        self
    }
    pub fn host(&mut self, h: &HostRecord) -> &mut Self {
        self.put_json(HOSTS, &h.name, h);
        self
    }
    pub fn desired(&mut self, host: &str, service: &str, proto: Vec<u8>) -> &mut Self {
        self.ops
            .push((DESIRED, format!("{host}/{service}"), Some(proto)));
        self
    }
    /// Forgets a host's desired state for a service (the host confirmed its removal).
    pub fn remove_desired(&mut self, host: &str, service: &str) -> &mut Self {
        self.ops.push((DESIRED, format!("{host}/{service}"), None));
        self
    }
    /// Forgets a service's record (`service remove`, a first release that failed).
    pub fn remove_service(&mut self, name: &str) -> &mut Self {
        self.ops.push((SERVICES, name.to_string(), None));
        self
    }
    pub fn event(&mut self, id: &str, seq: u64, e: &crate::timeline::Event) -> &mut Self {
        self.put_json(EVENTS, &format!("{id}/{seq:08}"), e);
        self
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, Error> {
        let db = Db::open(path)?;
        let w = db.begin_write()?;
        for t in ALL {
            w.open_table(t)?;
        }
        w.commit()?;
        Ok(Store {
            db,
            states: Mutex::new(None),
        })
    }

    /// False while writes fail (the last commit failed, e.g. on a full disk).
    pub fn writable(&self) -> bool {
        !self.db.failing.load(Ordering::Relaxed)
    }

    pub fn commit(&self, batch: Batch) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let w = self.db.begin_write()?;
        for (t, key, value) in batch.ops {
            let mut table = w.open_table(t)?;
            match value {
                Some(v) => table.insert(key.as_str(), v.as_slice())?,
                None => table.remove(key.as_str())?,
            };
        }
        w.commit()?;
        if let Some(states) = self.lock_states().as_mut() {
            states.extend(batch.states);
        }
        Ok(())
    }

    fn lock_states(&self) -> std::sync::MutexGuard<'_, Option<BTreeMap<String, State>>> {
        // Only whole inserts happen under this lock: a panic leaves nothing half-done.
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many deployments are in each state, without reading their records (after the
    /// first call, which reads only each record's state).
    pub fn deployment_states(&self) -> Result<BTreeMap<State, usize>, Error> {
        let mut g = self.lock_states();
        if g.is_none() {
            /// The one field read of each record.
            #[derive(serde::Deserialize)]
            struct StateOnly {
                state: State,
            }
            let all: Vec<(String, StateOnly)> = self.list_keyed(DEPLOYMENTS)?;
            *g = Some(all.into_iter().map(|(id, d)| (id, d.state)).collect());
        }
        let mut out = BTreeMap::new();
        for st in g.iter().flat_map(|m| m.values()) {
            *out.entry(*st).or_default() += 1;
        }
        Ok(out)
    }

    /// How many hosts have joined.
    pub fn host_count(&self) -> Result<u64, Error> {
        let r = self.db.begin_read()?;
        Ok(r.open_table(HOSTS)?.len()?)
    }

    /// Every record of table `t` with its key.
    fn list_keyed<T: DeserializeOwned>(&self, t: Table) -> Result<Vec<(String, T)>, Error> {
        let r = self.db.begin_read()?;
        let table = r.open_table(t)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_string(), decode(t, k.value(), v.value())?));
        }
        Ok(out)
    }

    fn get_raw(&self, t: Table, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let r = self.db.begin_read()?;
        let table = r.open_table(t)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    fn get<T: DeserializeOwned>(&self, t: Table, key: &str) -> Result<Option<T>, Error> {
        self.get_raw(t, key)?
            .map(|b| decode(t, key, &b))
            .transpose()
    }

    fn list<T: DeserializeOwned>(&self, t: Table, prefix: &str) -> Result<Vec<T>, Error> {
        let r = self.db.begin_read()?;
        let table = r.open_table(t)?;
        let mut out = Vec::new();
        for item in table.range(prefix..)? {
            let (k, v) = item?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push(decode(t, k.value(), v.value())?);
        }
        Ok(out)
    }

    fn put<T: Serialize>(&self, t: Table, key: &str, v: &T) -> Result<(), Error> {
        let mut b = Batch::default();
        b.put_json(t, key, v);
        self.commit(b)
    }

    // ---- identities: certificate fingerprint -> who

    pub fn identity(&self, fingerprint: &str) -> Result<Option<Identity>, Error> {
        self.get(IDENTITIES, fingerprint)
    }

    pub fn put_identity(&self, fingerprint: &str, id: &Identity) -> Result<(), Error> {
        self.put(IDENTITIES, fingerprint, id)
    }

    // ---- join tokens

    pub fn put_token(&self, t: &TokenRecord) -> Result<(), Error> {
        self.put(TOKENS, &t.id, t)
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, Error> {
        self.list(TOKENS, "")
    }

    /// Marks a token revoked. Returns false if it is unknown.
    pub fn revoke_token(&self, id: &str) -> Result<bool, Error> {
        let Some(mut t) = self.get::<TokenRecord>(TOKENS, id)? else {
            return Ok(false);
        };
        t.revoked = true;
        self.put(TOKENS, id, &t)?;
        Ok(true)
    }

    /// Enrols host `name` in one transaction: `admit` sees the token's record and the host
    /// already enrolled under `name` (if any), and either refuses (nothing is written, the
    /// token is not spent) or spends a use and returns the new host record. A host it
    /// replaces has its certificates revoked.
    pub fn enroll<E>(
        &self,
        token_id: &str,
        name: &str,
        admit: impl FnOnce(&mut TokenRecord, Option<&HostRecord>) -> Result<HostRecord, E>,
    ) -> Result<Result<Enrolled, E>, Error> {
        let w = self.db.begin_write()?;
        let enrolled;
        {
            let mut tokens = w.open_table(TOKENS)?;
            let mut hosts = w.open_table(HOSTS)?;
            let raw = tokens.get(token_id)?.map(|v| v.value().to_vec());
            let mut tok = match raw {
                Some(raw) => decode(TOKENS, token_id, &raw)?,
                None => TokenRecord::unknown(),
            };
            let old = hosts.get(name)?.map(|v| v.value().to_vec());
            let old: Option<HostRecord> = old.map(|b| decode(HOSTS, name, &b)).transpose()?;
            let record = match admit(&mut tok, old.as_ref()) {
                Ok(record) => record,
                Err(e) => {
                    drop((tokens, hosts));
                    w.abort()?;
                    return Ok(Err(e));
                }
            };
            let bytes = serde_json::to_vec(&tok).unwrap_or_default();
            tokens.insert(token_id, bytes.as_slice())?;
            let mut ids = w.open_table(IDENTITIES)?;
            if let Some(old) = &old {
                revoke(&mut ids, old, Revocation::Replaced)?;
            }
            let hb = serde_json::to_vec(&record).unwrap_or_default();
            hosts.insert(record.name.as_str(), hb.as_slice())?;
            let ib = serde_json::to_vec(&Identity::Agent {
                host: record.name.clone(),
            })
            .unwrap_or_default();
            ids.insert(record.cert_fingerprint.as_str(), ib.as_slice())?;
            enrolled = Enrolled {
                host: record,
                replaced: old,
            };
        }
        w.commit()?;
        Ok(Ok(enrolled))
    }

    /// Records a renewed certificate for `host`: the new one becomes current, the current
    /// one stays valid (until it expires) and the one before it is revoked.
    pub fn renew(&self, host: &str, new_fingerprint: &str) -> Result<bool, Error> {
        let w = self.db.begin_write()?;
        {
            let mut hosts = w.open_table(HOSTS)?;
            let Some(raw) = hosts.get(host)?.map(|v| v.value().to_vec()) else {
                drop(hosts);
                w.abort()?;
                return Ok(false);
            };
            let mut rec: HostRecord = decode(HOSTS, host, &raw)?;
            let mut ids = w.open_table(IDENTITIES)?;
            if let Some(prev) = rec.previous_fingerprint.take() {
                ids.remove(prev.as_str())?;
            }
            rec.previous_fingerprint = Some(std::mem::replace(
                &mut rec.cert_fingerprint,
                new_fingerprint.to_string(),
            ));
            let ib = serde_json::to_vec(&Identity::Agent {
                host: host.to_string(),
            })
            .unwrap_or_default();
            ids.insert(new_fingerprint, ib.as_slice())?;
            let hb = serde_json::to_vec(&rec).unwrap_or_default();
            hosts.insert(host, hb.as_slice())?;
        }
        w.commit()?;
        Ok(true)
    }

    // ---- hosts

    pub fn host(&self, name: &str) -> Result<Option<HostRecord>, Error> {
        self.get(HOSTS, name)
    }

    pub fn hosts(&self) -> Result<Vec<HostRecord>, Error> {
        self.list(HOSTS, "")
    }

    /// Forgets a host and revokes its certificates: they are remembered as revoked, so
    /// that its agent is told the host was removed. Returns false if it was unknown.
    pub fn remove_host(&self, name: &str) -> Result<bool, Error> {
        let w = self.db.begin_write()?;
        let found;
        {
            let mut hosts = w.open_table(HOSTS)?;
            let old = hosts.remove(name)?.map(|v| v.value().to_vec());
            found = old.is_some();
            if let Some(old) = old {
                let old: HostRecord = decode(HOSTS, name, &old)?;
                let mut ids = w.open_table(IDENTITIES)?;
                revoke(&mut ids, &old, Revocation::Removed)?;
            }
            let mut desired = w.open_table(DESIRED)?;
            let prefix = format!("{name}/");
            let keys: Vec<String> = desired
                .range(prefix.as_str()..)?
                .filter_map(Result::ok)
                .map(|(k, _)| k.value().to_string())
                .take_while(|k| k.starts_with(&prefix))
                .collect();
            for k in keys {
                desired.remove(k.as_str())?;
            }
        }
        w.commit()?;
        Ok(found)
    }

    // ---- desired state per host and service (protobuf bytes)

    pub fn desired_for_host(&self, host: &str) -> Result<Vec<Vec<u8>>, Error> {
        let r = self.db.begin_read()?;
        let table = r.open_table(DESIRED)?;
        let prefix = format!("{host}/");
        let mut out = Vec::new();
        for item in table.range(prefix.as_str()..)? {
            let (k, v) = item?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            out.push(v.value().to_vec());
        }
        Ok(out)
    }

    pub fn desired(&self, host: &str, service: &str) -> Result<Option<Vec<u8>>, Error> {
        self.get_raw(DESIRED, &format!("{host}/{service}"))
    }

    // ---- services and deployments

    pub fn service(&self, name: &str) -> Result<Option<ServiceRecord>, Error> {
        self.get(SERVICES, name)
    }

    pub fn services(&self) -> Result<Vec<ServiceRecord>, Error> {
        self.list(SERVICES, "")
    }

    pub fn deployment(&self, id: &str) -> Result<Option<DeploymentRecord>, Error> {
        self.get(DEPLOYMENTS, id)
    }

    pub fn deployments(&self) -> Result<Vec<DeploymentRecord>, Error> {
        self.list(DEPLOYMENTS, "")
    }

    /// A deployment's timeline, oldest first.
    pub fn events(&self, id: &str) -> Result<Vec<crate::timeline::Event>, Error> {
        self.list(EVENTS, &format!("{id}/"))
    }

    /// Every timeline event of every deployment, by deployment id.
    pub fn all_events(&self) -> Result<BTreeMap<String, Vec<crate::timeline::Event>>, Error> {
        let r = self.db.begin_read()?;
        let table = r.open_table(EVENTS)?;
        let mut out: BTreeMap<String, Vec<crate::timeline::Event>> = BTreeMap::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let key = k.value();
            let id = key.split_once('/').map_or(key, |(id, _)| id);
            out.entry(id.to_string())
                .or_default()
                .push(decode(EVENTS, key, v.value())?);
        }
        Ok(out)
    }

    /// Next number in a named sequence (deployment ids), persisted.
    pub fn next_seq(&self, name: &str) -> Result<u64, Error> {
        let w = self.db.begin_write()?;
        let n;
        {
            let mut meta = w.open_table(META)?;
            let cur = meta
                .get(name)?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            n = cur + 1;
            meta.insert(name, n.to_be_bytes().as_slice())?;
        }
        w.commit()?;
        Ok(n)
    }
}

/// Marks every certificate of `host` revoked for `reason`.
fn revoke(
    ids: &mut redb::Table<'_, &'static str, &'static [u8]>,
    host: &HostRecord,
    reason: Revocation,
) -> Result<(), Error> {
    let tombstone = serde_json::to_vec(&Identity::Revoked {
        host: host.name.clone(),
        reason,
    })
    .unwrap_or_default();
    for fp in std::iter::once(&host.cert_fingerprint).chain(&host.previous_fingerprint) {
        ids.insert(fp.as_str(), tombstone.as_slice())?;
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(t: Table, key: &str, b: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(b).map_err(|source| Error::Decode {
        table: t.name().to_string(),
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HostRecord;

    #[test]
    fn batch_commits_together_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let s = Store::open(&path).unwrap();
            let h = HostRecord {
                name: "web-1".into(),
                labels: Default::default(),
                cert_fingerprint: "aa".into(),
                joined_unix_ms: 1,
                previous_fingerprint: None,
            };
            let mut b = Batch::default();
            b.host(&h).desired("web-1", "web", vec![1, 2, 3]);
            s.commit(b).unwrap();
            assert_eq!(s.next_seq("d").unwrap(), 1);
            assert_eq!(s.next_seq("d").unwrap(), 2);
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.host("web-1").unwrap().unwrap().cert_fingerprint, "aa");
        assert_eq!(s.desired_for_host("web-1").unwrap(), vec![vec![1, 2, 3]]);
        assert!(s.desired_for_host("web-").unwrap().is_empty());
        assert_eq!(s.next_seq("d").unwrap(), 3);
        assert!(s.remove_host("web-1").unwrap());
        assert!(s.desired_for_host("web-1").unwrap().is_empty());
        assert!(!s.remove_host("web-1").unwrap());
    }

    fn host(name: &str, fp: &str) -> HostRecord {
        HostRecord {
            name: name.into(),
            labels: Default::default(),
            cert_fingerprint: fp.into(),
            joined_unix_ms: 1,
            previous_fingerprint: None,
        }
    }

    #[test]
    fn enroll_refuses_atomically_and_revokes_what_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        let mut tok = TokenRecord::unknown();
        tok.id = "t1".into();
        tok.uses_left = 3;
        s.put_token(&tok).unwrap();
        let spend = |t: &mut TokenRecord| t.uses_left -= 1;

        let first = s
            .enroll("t1", "web-1", |t, old| {
                assert!(old.is_none());
                spend(t);
                Ok::<_, ()>(host("web-1", "aa"))
            })
            .unwrap()
            .unwrap();
        assert!(first.replaced.is_none());

        // A refusal changes nothing, even after the closure touched the token.
        let refused = s
            .enroll("t1", "web-1", |t, old| {
                assert_eq!(old.map(|h| h.cert_fingerprint.as_str()), Some("aa"));
                spend(t);
                Err("taken")
            })
            .unwrap();
        assert!(matches!(refused, Err("taken")));
        assert_eq!(s.tokens().unwrap()[0].uses_left, 2);
        assert_eq!(s.host("web-1").unwrap().unwrap().cert_fingerprint, "aa");

        // Replacing revokes the old certificate and says why.
        let done = s
            .enroll("t1", "web-1", |t, _| {
                spend(t);
                Ok::<_, ()>(host("web-1", "bb"))
            })
            .unwrap()
            .unwrap();
        assert_eq!(done.replaced.map(|h| h.cert_fingerprint), Some("aa".into()));
        let revoked = |reason| {
            Some(Identity::Revoked {
                host: "web-1".into(),
                reason,
            })
        };
        assert_eq!(s.identity("aa").unwrap(), revoked(Revocation::Replaced));
        assert_eq!(
            s.identity("bb").unwrap(),
            Some(Identity::Agent {
                host: "web-1".into()
            })
        );
        assert!(s.remove_host("web-1").unwrap());
        assert_eq!(s.identity("bb").unwrap(), revoked(Revocation::Removed));
    }
}
