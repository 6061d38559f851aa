//! A release on disk: `releases/<service>/<version>-<sha256 prefix>`, unpacked once from
//! an artifact whose signature (when keys are trusted) and sha256 matched, touched
//! whenever a slot (or a database command) uses it again, and pruned to the newest few
//! per service. The store records each directory's whole version and sha256, so that
//! the releases kept can be reported ([`kept`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use cutover_proto::v1::{KeptRelease, Release, SlotPhase};
use tokio::time::Instant;

use super::SlotCtx;
use crate::artifact::{self, Limits};
use crate::data_dir;
use crate::store::{ReleaseRecord, Store};
use crate::trust::TrustedKeys;

/// Release directories kept per service (the one in use is never removed).
pub const KEEP: usize = 5;

/// `releases/<service>/<version>-<sha256 prefix>`; characters of the version that do
/// not belong in a file name become `_`.
pub fn release_dir(data: &Path, service: &str, version: &str, sha256: &str) -> PathBuf {
    let safe: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    data_dir::releases(data)
        .join(service)
        .join(format!("{safe}-{}", &sha256[..sha256.len().min(12)]))
}

/// Where a release comes from and whose it is: what [`fetch_and_unpack`] needs, for a
/// slot or for a database command run in the release.
pub struct Source<'a> {
    /// The agent's data dir: `releases/` and `cache/` are there.
    pub data_dir: &'a Path,
    /// The service the release belongs to.
    pub service: &'a str,
    /// Version, artifact URL, sha256 and signature.
    pub release: &'a Release,
    /// Artifact size limits and download timeouts.
    pub limits: &'a Limits,
    /// When any key is trusted, only artifacts signed by one of them are unpacked.
    pub trusted_keys: &'a TrustedKeys,
    /// Where the release directory's whole version and sha256 are recorded.
    pub store: &'a Store,
}

/// How far [`fetch_and_unpack`] got, as it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Fetching,
    /// The download is done and its sha256 matched, after this many ms.
    Fetched(u64),
    Unpacking,
    /// Unpacked, after this many ms.
    Unpacked(u64),
}

/// The slot's release directory, fetched and unpacked unless it is already on disk.
/// Reports the fetching and unpacking phases and how long each took.
pub async fn prepare(ctx: &SlotCtx) -> Result<PathBuf, String> {
    let rel = ctx.spec.release.clone().unwrap_or_default();
    let src = Source {
        data_dir: &ctx.data_dir,
        service: &ctx.service,
        release: &rel,
        limits: &ctx.limits,
        trusted_keys: &ctx.trusted_keys,
        store: &ctx.store,
    };
    fetch_and_unpack(&src, |p| match p {
        Progress::Fetching => ctx.phase(SlotPhase::Fetching, ""),
        Progress::Fetched(ms) => ctx.set(|s| s.fetch_ms = ms),
        Progress::Unpacking => ctx.phase(SlotPhase::Unpacking, ""),
        Progress::Unpacked(ms) => ctx.set(|s| s.unpack_ms = ms),
    })
    .await
}

/// The release's directory, fetched (its signature, when keys are trusted, and its
/// sha256 checked) and unpacked unless it is already on disk; `report` hears each step.
pub async fn fetch_and_unpack(
    src: &Source<'_>,
    report: impl Fn(Progress),
) -> Result<PathBuf, String> {
    let rel = src.release;
    src.trusted_keys
        .check(&rel.sha256, &rel.signature)
        .map_err(|e| e.to_string())?;
    let dir = release_dir(src.data_dir, src.service, &rel.version, &rel.sha256);
    if dir.is_dir() {
        // Touch it so that pruning keeps recently used releases.
        let _ = std::fs::File::open(&dir).and_then(|f| f.set_modified(SystemTime::now()));
        record(src, &dir);
        return Ok(dir);
    }
    report(Progress::Fetching);
    let fetch_started = Instant::now();
    let cache = data_dir::cache(src.data_dir);
    crate::spawn::ensure_dir(&cache, 0o700).map_err(|e| e.to_string())?;
    let download = Partial(cache.join(format!(
        "{}-{}{}",
        rel.sha256,
        rand::random::<u32>(),
        artifact::PARTIAL_SUFFIX
    )));
    artifact::fetch(&rel.artifact, &rel.sha256, &download.0, src.limits)
        .await
        .map_err(|e| e.to_string())?;
    report(Progress::Fetched(fetch_started.elapsed().as_millis() as u64));

    report(Progress::Unpacking);
    let unpack_started = Instant::now();
    let (d, dest, limits) = (download.0.clone(), dir.clone(), src.limits.clone());
    // Held by the unpacking thread itself, which goes on when a cancelled preparation
    // stops waiting for it.
    let busy = Unpacking::start(src.data_dir, src.service);
    let unpacked = tokio::task::spawn_blocking(move || {
        let _busy = busy;
        artifact::unpack(&d, &dest, &limits)
    })
    .await
    .map_err(|e| format!("unpack: {e}"))
    .and_then(|r| r.map_err(|e| e.to_string()));
    drop(download);
    report(Progress::Unpacked(
        unpack_started.elapsed().as_millis() as u64
    ));
    unpacked?;
    record(src, &dir);
    Ok(dir)
}

/// Release directories (`releases/<service>`) with an unpack under way, and how many:
/// they are not removed meanwhile ([`unpacking`]), or an unpack racing the removal of
/// a removed service's files could leave a release directory with files missing.
static UNPACKING: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());

/// One unpack under way in a service's release directories, while it lasts.
struct Unpacking(PathBuf);

impl Unpacking {
    fn start(data: &Path, service: &str) -> Unpacking {
        let root = data_dir::releases(data).join(service);
        *UNPACKING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(root.clone())
            .or_default() += 1;
        Unpacking(root)
    }
}

impl Drop for Unpacking {
    fn drop(&mut self) {
        let mut busy = UNPACKING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = busy.get_mut(&self.0) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.0);
            }
        }
    }
}

/// Whether a release of `service` is being unpacked now.
pub fn unpacking(data: &Path, service: &str) -> bool {
    let root = data_dir::releases(data).join(service);
    UNPACKING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(&root)
}

/// Records what release directory `dir` holds, and forgets the records of directories
/// pruned since.
fn record(src: &Source<'_>, dir: &Path) {
    let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let rec = ReleaseRecord {
        version: src.release.version.clone(),
        sha256: src.release.sha256.to_ascii_lowercase(),
    };
    let on_disk: Vec<String> = release_dirs(src.data_dir, src.service)
        .into_iter()
        .filter_map(|(_, d)| Some(d.file_name()?.to_string_lossy().into_owned()))
        .collect();
    let done = src
        .store
        .put_release(src.service, &name, &rec)
        .and_then(|()| src.store.prune_releases(src.service, &on_disk));
    if let Err(e) = done {
        tracing::warn!(service = src.service, error = %e, "record release directory");
    }
}

/// The releases of `service` on disk, most recently used first: version and sha256 as
/// recorded, or as the directory's name says for one unpacked before records were kept.
pub fn kept(data: &Path, service: &str, store: &Store) -> Vec<KeptRelease> {
    let records = store.releases(service).unwrap_or_default();
    let mut dirs = release_dirs(data, service);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    dirs.into_iter()
        .filter_map(|(used, dir)| {
            let name = dir.file_name()?.to_string_lossy().into_owned();
            let (version, sha256) = match records.get(&name) {
                Some(r) => (r.version.clone(), r.sha256.clone()),
                None => {
                    let (v, sha) = name.rsplit_once('-')?;
                    (v.to_string(), sha.to_string())
                }
            };
            let used_unix_ms = used
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            Some(KeptRelease {
                version,
                sha256,
                used_unix_ms,
            })
        })
        .collect()
}

/// The release directories of `service` (hidden work directories left out), with when
/// each was last used.
fn release_dirs(data: &Path, service: &str) -> Vec<(SystemTime, PathBuf)> {
    let root = data_dir::releases(data).join(service);
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect()
}

/// Keeps the newest `keep` release directories of a service, never removing `in_use`.
pub fn prune(data: &Path, service: &str, keep: usize, in_use: &[PathBuf]) {
    let mut dirs = release_dirs(data, service);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (_, d) in dirs.into_iter().skip(keep) {
        if !in_use.contains(&d) {
            tracing::info!(dir = %d.display(), "removing old release");
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}

/// A partial download, removed when dropped: after unpacking, after a failure, and when
/// preparation is cancelled midway.
struct Partial(PathBuf);

impl Drop for Partial {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %self.0.display(), error = %e, "remove partial download");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_dirs_are_named_by_version_and_digest_prefix() {
        let d = release_dir(Path::new("/data"), "web", "1.2.0+b/7 x", &"ab".repeat(32));
        assert_eq!(d, Path::new("/data/releases/web/1.2.0+b_7_x-abababababab"));
    }

    #[test]
    fn a_removed_service_keeps_its_releases_while_one_is_being_unpacked() {
        let data = tempfile::tempdir().unwrap();
        let dir = release_dir(data.path(), "web", "1.0.0", &"ab".repeat(32));
        std::fs::create_dir_all(&dir).unwrap();
        let busy = Unpacking::start(data.path(), "web");
        // Another service's unpack, or the same service's on another data dir, is not
        // this one's.
        let _other = Unpacking::start(data.path(), "api");
        assert!(!super::super::forget_files(data.path(), "web"));
        assert!(dir.is_dir(), "nothing is removed while an unpack runs");
        drop(busy);
        assert!(super::super::forget_files(data.path(), "web"));
        assert!(!dir.exists());
    }

    #[test]
    fn kept_releases_are_named_as_recorded_newest_used_first() {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(&data.path().join("agent.redb")).unwrap();
        let sha = "ab".repeat(32);
        let recorded = release_dir(data.path(), "web", "2.0+b/1", &sha);
        let older = data_dir::releases(data.path()).join("web/1.0-cdcdcdcdcdcd");
        for (i, d) in [&older, &recorded].into_iter().enumerate() {
            std::fs::create_dir_all(d).unwrap();
            let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i as u64);
            std::fs::File::open(d).unwrap().set_modified(at).unwrap();
        }
        std::fs::create_dir_all(data_dir::releases(data.path()).join("web/.unpack-1")).unwrap();
        let name = recorded.file_name().unwrap().to_string_lossy().into_owned();
        let rec = ReleaseRecord {
            version: "2.0+b/1".into(),
            sha256: sha.clone(),
        };
        store.put_release("web", &name, &rec).unwrap();
        let web: Vec<(String, String, u64)> = kept(data.path(), "web", &store)
            .into_iter()
            .map(|k| (k.version, k.sha256, k.used_unix_ms))
            .collect();
        assert_eq!(
            web,
            [
                ("2.0+b/1".to_string(), sha, 1_001_000),
                ("1.0".to_string(), "cdcdcdcdcdcd".to_string(), 1_000_000)
            ]
        );
        assert!(kept(data.path(), "api", &store).is_empty());
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_one_in_use() {
        let data = tempfile::tempdir().unwrap();
        let root = data_dir::releases(data.path()).join("web");
        let dirs: Vec<PathBuf> = (0..4).map(|i| root.join(format!("1.0.{i}-abc"))).collect();
        for (i, d) in dirs.iter().enumerate() {
            std::fs::create_dir_all(d).unwrap();
            let age = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i as u64);
            std::fs::File::open(d).unwrap().set_modified(age).unwrap();
        }
        std::fs::create_dir_all(root.join(".unpacking")).unwrap();
        // Keep two: 1.0.3 and 1.0.2 are the newest, 1.0.0 is in use.
        prune(data.path(), "web", 2, std::slice::from_ref(&dirs[0]));
        let left: Vec<bool> = dirs.iter().map(|d| d.is_dir()).collect();
        assert_eq!(left, [true, false, true, true]);
        assert!(
            root.join(".unpacking").is_dir(),
            "hidden work dirs are not releases"
        );
    }
}
