//! The agent's durable state: one redb file, `DATA/agent.redb`, holding the last desired
//! state per service (protobuf), so a restarted agent serves the same releases and
//! weights before it reaches the coordinator. Only this module touches the database.

use std::path::Path;

use cutover_proto::v1::DesiredService;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const DESIRED: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("desired");
/// Slot processes this agent started, keyed `service/slot/pid`, so that a restarted
/// agent can adopt the ones still running its desired specs and stop the others.
const PROCESSES: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("processes");

/// A slot process as recorded when it started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRecord {
    pub service: String,
    pub slot: String,
    pub pid: i32,
    /// The process's start time in clock ticks since boot (/proc/PID/stat field 22), so
    /// a recycled pid is never mistaken for ours.
    pub start_ticks: u64,
    pub release: String,
    /// The port the process was given (`${PORT}`); 0 in records from older agents.
    #[serde(default)]
    pub port: u16,
    /// Digest of the slot spec it runs ([`crate::process::spec_digest`]), so a restarted
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
#[error("agent store: {0}")]
pub struct Error(#[from] redb::Error);

macro_rules! from_redb {
    ($($t:ty),*) => {$(impl From<$t> for Error { fn from(e: $t) -> Self { Error(e.into()) } })*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, Error> {
        let db = Database::create(path)?;
        let w = db.begin_write()?;
        w.open_table(DESIRED)?;
        w.open_table(PROCESSES)?;
        w.commit()?;
        Ok(Store { db })
    }

    pub fn put_desired(&self, d: &DesiredService) -> Result<(), Error> {
        let w = self.db.begin_write()?;
        w.open_table(DESIRED)?
            .insert(d.service.as_str(), d.encode_to_vec().as_slice())?;
        w.commit()?;
        Ok(())
    }

    pub fn put_process(&self, p: &ProcessRecord) -> Result<(), Error> {
        let w = self.db.begin_write()?;
        let v = serde_json::to_vec(p).unwrap_or_default();
        w.open_table(PROCESSES)?
            .insert(p.key().as_str(), v.as_slice())?;
        w.commit()?;
        Ok(())
    }

    pub fn remove_process(&self, p: &ProcessRecord) -> Result<(), Error> {
        let w = self.db.begin_write()?;
        w.open_table(PROCESSES)?.remove(p.key().as_str())?;
        w.commit()?;
        Ok(())
    }

    pub fn processes(&self) -> Result<Vec<ProcessRecord>, Error> {
        let r = self.db.begin_read()?;
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

    pub fn desired(&self) -> Result<Vec<DesiredService>, Error> {
        let r = self.db.begin_read()?;
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
