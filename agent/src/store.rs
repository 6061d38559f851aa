//! The agent's durable state: one redb file, `DATA/agent.redb`, holding the last desired
//! state per service (protobuf), so a restarted agent serves the same releases and
//! weights before it reaches the coordinator. Only this module touches the database.

use std::path::Path;

use cutover_proto::v1::DesiredService;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const DESIRED: TableDefinition<'static, &'static str, &'static [u8]> =
    TableDefinition::new("desired");

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
