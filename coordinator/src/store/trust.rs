//! Who holds credentials and which services are locked: the `admins` and `locks`
//! tables. Issuing and revoking a person's credentials change their record and the
//! identity of their certificate in one transaction, so a certificate is never known
//! under a name that is not listed, nor listed without opening anything.

use redb::{ReadableTable, Table as RedbTable};

use super::{ADMINS, Error, IDENTITIES, LOCKS, Store, Table, decode};
use crate::admins::{AdminRecord, Refusal, Role};
use crate::locks::LockRecord;
use crate::model::{FIRST_ADMIN, Identity};

/// What [`Store::first_admin`] found of the first-start credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum FirstAdmin {
    /// They open the coordinator as `admin`.
    Ready,
    /// `admin revoke admin` revoked them, by `by` at `at_unix_ms`; they stay revoked.
    Revoked { by: String, at_unix_ms: u64 },
}

type Open<'t> = RedbTable<'t, &'static str, &'static [u8]>;

/// The record under `key` in an open table.
fn read<T: serde::de::DeserializeOwned>(
    t: &Open<'_>,
    def: Table,
    key: &str,
) -> Result<Option<T>, Error> {
    let raw = t.get(key)?.map(|v| v.value().to_vec());
    raw.map(|b| decode(def, key, &b)).transpose()
}

fn write<T: serde::Serialize>(t: &mut Open<'_>, key: &str, v: &T) -> Result<(), Error> {
    // Serialising these plain records cannot fail (no maps with non-string keys).
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    t.insert(key, bytes.as_slice())?;
    Ok(())
}

impl Store {
    // ---- people

    /// Everyone who holds credentials, by name.
    pub fn admins(&self) -> Result<Vec<AdminRecord>, Error> {
        self.list(ADMINS, "")
    }

    /// Records `rec` and makes its certificate open the coordinator as its name and
    /// role, in one transaction; refused when the name is taken.
    pub fn create_admin(&self, rec: &AdminRecord) -> Result<Result<(), Refusal>, Error> {
        let w = self.db.begin_write()?;
        {
            let mut admins = w.open_table(ADMINS)?;
            if admins.get(rec.name.as_str())?.is_some() {
                drop(admins);
                w.abort()?;
                return Ok(Err(Refusal::Exists(rec.name.clone())));
            }
            write(&mut admins, &rec.name, rec)?;
            let mut ids = w.open_table(IDENTITIES)?;
            write(&mut ids, &rec.fingerprint, &rec.identity())?;
        }
        w.commit()?;
        Ok(Ok(()))
    }

    /// Forgets `name` and revokes their certificate (it is remembered as revoked, by
    /// `by` at `now`, so that its holder is told so), in one transaction. The last
    /// holder of the admin role cannot be revoked: nobody could change anything after.
    pub fn revoke_admin(
        &self,
        name: &str,
        by: &str,
        now: u64,
    ) -> Result<Result<AdminRecord, Refusal>, Error> {
        let w = self.db.begin_write()?;
        let rec;
        {
            let mut admins = w.open_table(ADMINS)?;
            let outcome = match read::<AdminRecord>(&admins, ADMINS, name)? {
                None => Err(Refusal::Unknown(name.to_string())),
                Some(r) if r.role == Role::Admin && admin_role_holders(&admins)? <= 1 => {
                    Err(Refusal::LastAdmin(name.to_string()))
                }
                Some(r) => Ok(r),
            };
            let found = match outcome {
                Ok(found) => found,
                Err(refusal) => {
                    drop(admins);
                    w.abort()?;
                    return Ok(Err(refusal));
                }
            };
            admins.remove(name)?;
            let mut ids = w.open_table(IDENTITIES)?;
            let tombstone = Identity::RevokedAdmin {
                name: name.to_string(),
                by: by.to_string(),
                at_unix_ms: now,
            };
            write(&mut ids, &found.fingerprint, &tombstone)?;
            rec = found;
        }
        w.commit()?;
        Ok(Ok(rec))
    }

    /// Makes the first-start credentials (certificate `fingerprint`, expiring at
    /// `expires_unix_ms`) open the coordinator as `admin`, unless they were revoked. New
    /// first-start credentials (the old ones deleted from `DATA/admin`) replace the old
    /// ones, which are revoked.
    pub fn first_admin(
        &self,
        fingerprint: &str,
        expires_unix_ms: u64,
        now: u64,
    ) -> Result<FirstAdmin, Error> {
        let w = self.db.begin_write()?;
        {
            let mut ids = w.open_table(IDENTITIES)?;
            if let Some(Identity::RevokedAdmin { by, at_unix_ms, .. }) =
                read(&ids, IDENTITIES, fingerprint)?
            {
                drop(ids);
                w.abort()?;
                return Ok(FirstAdmin::Revoked { by, at_unix_ms });
            }
            let mut admins = w.open_table(ADMINS)?;
            let old: Option<AdminRecord> = read(&admins, ADMINS, FIRST_ADMIN)?;
            let created_unix_ms = match &old {
                Some(old) if old.fingerprint == fingerprint => old.created_unix_ms,
                Some(old) => {
                    let tombstone = Identity::RevokedAdmin {
                        name: FIRST_ADMIN.to_string(),
                        by: String::new(),
                        at_unix_ms: now,
                    };
                    write(&mut ids, &old.fingerprint, &tombstone)?;
                    now
                }
                None => now,
            };
            let rec = AdminRecord {
                name: FIRST_ADMIN.to_string(),
                role: Role::Admin,
                fingerprint: fingerprint.to_string(),
                created_unix_ms,
                created_by: String::new(),
                expires_unix_ms,
            };
            write(&mut admins, FIRST_ADMIN, &rec)?;
            write(&mut ids, fingerprint, &rec.identity())?;
        }
        w.commit()?;
        Ok(FirstAdmin::Ready)
    }

    // ---- deploy locks

    /// The lock of `service`, if it is locked.
    pub fn lock(&self, service: &str) -> Result<Option<LockRecord>, Error> {
        self.get(LOCKS, service)
    }

    /// Every lock, by service.
    pub fn locks(&self) -> Result<Vec<LockRecord>, Error> {
        self.list(LOCKS, "")
    }

    /// Locks `lock.service` unless it is locked already; then the lock in place.
    pub fn put_lock(&self, lock: &LockRecord) -> Result<Result<(), LockRecord>, Error> {
        let w = self.db.begin_write()?;
        {
            let mut locks = w.open_table(LOCKS)?;
            if let Some(held) = read(&locks, LOCKS, &lock.service)? {
                drop(locks);
                w.abort()?;
                return Ok(Err(held));
            }
            write(&mut locks, &lock.service, lock)?;
        }
        w.commit()?;
        Ok(Ok(()))
    }

    /// Lifts the lock of `service`; the lock it lifted, none if it was not locked.
    pub fn remove_lock(&self, service: &str) -> Result<Option<LockRecord>, Error> {
        let w = self.db.begin_write()?;
        let lifted;
        {
            let mut locks = w.open_table(LOCKS)?;
            let raw = locks.remove(service)?.map(|v| v.value().to_vec());
            lifted = raw.map(|b| decode(LOCKS, service, &b)).transpose()?;
        }
        w.commit()?;
        Ok(lifted)
    }
}

/// How many people hold the admin role.
fn admin_role_holders(admins: &Open<'_>) -> Result<usize, Error> {
    let mut n = 0;
    for item in admins.iter()? {
        let (k, v) = item?;
        let rec: AdminRecord = decode(ADMINS, k.value(), v.value())?;
        n += usize::from(rec.role == Role::Admin);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(name: &str, role: Role, fp: &str) -> AdminRecord {
        AdminRecord {
            name: name.into(),
            role,
            fingerprint: fp.into(),
            created_unix_ms: 1,
            created_by: "admin".into(),
            expires_unix_ms: 2,
        }
    }

    #[test]
    fn people_are_issued_revoked_and_the_last_admin_stays() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        assert_eq!(s.first_admin("f0", 9, 5).unwrap(), FirstAdmin::Ready);
        assert_eq!(
            s.identity("f0").unwrap(),
            Some(Identity::Admin {
                name: FIRST_ADMIN.into()
            })
        );
        // The last admin cannot go; a viewer does not count.
        s.create_admin(&person("vic", Role::Viewer, "f1"))
            .unwrap()
            .unwrap();
        assert_eq!(
            s.revoke_admin(FIRST_ADMIN, "admin", 6).unwrap(),
            Err(Refusal::LastAdmin(FIRST_ADMIN.into()))
        );
        s.create_admin(&person("ana", Role::Admin, "f2"))
            .unwrap()
            .unwrap();
        assert_eq!(
            s.create_admin(&person("ana", Role::Viewer, "f3")).unwrap(),
            Err(Refusal::Exists("ana".into()))
        );
        assert_eq!(s.identity("f3").unwrap(), None, "a refusal writes nothing");
        assert_eq!(
            s.identity("f2").unwrap(),
            Some(Identity::Admin { name: "ana".into() })
        );
        let names: Vec<String> = s.admins().unwrap().into_iter().map(|a| a.name).collect();
        assert_eq!(names, ["admin", "ana", "vic"]);

        // Revoking the first-start credentials sticks across restarts.
        let gone = s.revoke_admin(FIRST_ADMIN, "ana", 7).unwrap().unwrap();
        assert_eq!(gone.fingerprint, "f0");
        let tombstone = Identity::RevokedAdmin {
            name: FIRST_ADMIN.into(),
            by: "ana".into(),
            at_unix_ms: 7,
        };
        assert_eq!(s.identity("f0").unwrap(), Some(tombstone));
        assert_eq!(
            s.first_admin("f0", 9, 8).unwrap(),
            FirstAdmin::Revoked {
                by: "ana".into(),
                at_unix_ms: 7
            }
        );
        assert_eq!(
            s.revoke_admin("nobody", "ana", 8).unwrap(),
            Err(Refusal::Unknown("nobody".into()))
        );
        // New first-start credentials are `admin` again.
        assert_eq!(s.first_admin("f9", 10, 11).unwrap(), FirstAdmin::Ready);
        assert!(s.admins().unwrap().iter().any(|a| a.fingerprint == "f9"));
    }

    #[test]
    fn replaced_first_start_credentials_are_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("c.redb")).unwrap();
        s.first_admin("old", 9, 1).unwrap();
        s.first_admin("old", 9, 2).unwrap();
        let rec = &s.admins().unwrap()[0];
        assert_eq!(rec.created_unix_ms, 1, "a restart changes nothing");
        s.first_admin("new", 9, 3).unwrap();
        assert!(matches!(
            s.identity("old").unwrap(),
            Some(Identity::RevokedAdmin { .. })
        ));
        assert_eq!(s.admins().unwrap().len(), 1);
    }

    #[test]
    fn locks_are_taken_once_and_lifted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let lock = |by: &str| LockRecord {
            service: "web".into(),
            message: "freeze".into(),
            by: by.into(),
            at_unix_ms: 1,
        };
        {
            let s = Store::open(&path).unwrap();
            s.put_lock(&lock("ana")).unwrap().unwrap();
            assert_eq!(s.put_lock(&lock("bob")).unwrap(), Err(lock("ana")));
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.lock("web").unwrap(), Some(lock("ana")));
        assert_eq!(s.locks().unwrap(), [lock("ana")]);
        assert_eq!(s.remove_lock("web").unwrap(), Some(lock("ana")));
        assert_eq!(s.remove_lock("web").unwrap(), None);
        assert_eq!(s.lock("web").unwrap(), None);
    }
}
