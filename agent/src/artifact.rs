//! Release artifacts: fetched from `file://` or `http(s)://` with bounded retries,
//! verified against their SHA-256 while streaming, and unpacked safely into an immutable
//! per-release directory. Nothing from an artifact runs unless its digest matched.
//!
//! Unpacking never writes outside the release directory: every path and link target is
//! resolved against the links unpacked before it, as the kernel will resolve it. Release
//! files belong to the agent's user and keep their packed modes without setuid, setgid,
//! sticky or group/other write bits, so a service can neither change its own release
//! nor gain another user's rights through it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sha256 mismatch: expected {}…, got {}…", short(.expected), short(.got))]
    Checksum { expected: String, got: String },
    #[error("download {url}: {reason}")]
    Download {
        url: String,
        reason: String,
        transient: bool,
    },
    #[error("artifact is larger than this agent's limit of {} (--max-artifact-size)", cutover_shared::size::human(*.limit))]
    TooLarge { limit: u64 },
    #[error("artifact unpacks to more than this agent's limit of {} (--max-unpacked-size)", cutover_shared::size::human(*.limit))]
    UnpackedTooLarge { limit: u64 },
    #[error("unsafe artifact: {0}")]
    Unsafe(String),
    #[error("unpack artifact: {0}")]
    Unpack(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The root cause of an error (e.g. "No space left on device" under tar's "failed to
/// unpack `…`"), which is what an operator needs to read.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Names a download in progress ends with (in the agent's cache directory).
pub const PARTIAL_SUFFIX: &str = ".part";
/// Names a release being unpacked starts with (next to the release directories).
const UNPACK_PREFIX: &str = ".unpack-";
/// Mode bits an unpacked file or directory never keeps: setuid, setgid, sticky, and
/// write for group and others.
const STRIPPED_MODE_BITS: u32 = 0o7022;
/// Links followed while resolving one path, as the kernel's limit.
const MAX_LINK_HOPS: u32 = 40;

#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest artifact accepted, in bytes.
    pub max_artifact_bytes: u64,
    /// Largest total unpacked size, in bytes.
    pub max_unpacked_bytes: u64,
    /// Tries of a download that fails in a way worth retrying (5xx, reset, stall).
    pub attempts: usize,
    /// A download that receives nothing this long is abandoned (`--fetch-stall-timeout`).
    pub read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_artifact_bytes: 4 << 30,
            max_unpacked_bytes: 16 << 30,
            attempts: 4,
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// Downloads `url` to `dest`, checking `sha256`; retries transient failures.
pub async fn fetch(url: &str, sha256: &str, dest: &Path, limits: &Limits) -> Result<(), Error> {
    let attempt = || async { fetch_once(url, sha256, dest, limits).await };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(300))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(limits.attempts.saturating_sub(1))
                .with_jitter(),
        )
        .sleep(tokio::time::sleep)
        .when(|e| matches!(e, Error::Download { transient: true, .. }))
        .notify(|e, after| tracing::warn!(url, error = %e, retry_in = ?after, "artifact download failed"))
        .await
}

async fn fetch_once(url: &str, sha256: &str, dest: &Path, limits: &Limits) -> Result<(), Error> {
    let mut sink = Sink::create(dest, limits.max_artifact_bytes).await?;
    match url.strip_prefix("file://") {
        Some(path) => copy_file(url, Path::new(path), &mut sink).await?,
        None => download(url, limits, &mut sink).await?,
    }
    sink.finish(sha256).await
}

/// Where a download goes: the file, hashed and size-checked as it is written.
struct Sink<'a> {
    /// The partial download.
    out: tokio::fs::File,
    /// Its path, for errors and removal on a checksum mismatch.
    dest: &'a Path,
    /// The sha256 of what was written so far.
    hasher: Sha256,
    /// Bytes written so far, held against `max`.
    total: u64,
    /// The largest artifact this host downloads.
    max: u64,
}

impl<'a> Sink<'a> {
    async fn create(dest: &'a Path, max: u64) -> Result<Sink<'a>, Error> {
        let out = tokio::fs::File::create(dest)
            .await
            .map_err(io("create", dest))?;
        Ok(Sink {
            out,
            dest,
            hasher: Sha256::new(),
            total: 0,
            max,
        })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), Error> {
        self.total += chunk.len() as u64;
        if self.total > self.max {
            return Err(Error::TooLarge { limit: self.max });
        }
        self.hasher.update(chunk);
        self.out
            .write_all(chunk)
            .await
            .map_err(io("write", self.dest))
    }

    /// Flushes the file to disk and checks its digest; a mismatch removes it.
    async fn finish(mut self, sha256: &str) -> Result<(), Error> {
        self.out.flush().await.map_err(io("write", self.dest))?;
        self.out.sync_all().await.map_err(io("sync", self.dest))?;
        let got = hex::encode(self.hasher.finalize());
        if !got.eq_ignore_ascii_case(sha256) {
            let _ = tokio::fs::remove_file(self.dest).await;
            return Err(Error::Checksum {
                expected: sha256.to_ascii_lowercase(),
                got,
            });
        }
        Ok(())
    }
}

/// A `file://` artifact: copied from the local file.
async fn copy_file(url: &str, path: &Path, sink: &mut Sink<'_>) -> Result<(), Error> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::Download {
            url: url.into(),
            reason: e.to_string(),
            transient: false,
        })?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).await.map_err(io("read", path))?;
        if n == 0 {
            return Ok(());
        }
        sink.write(&buf[..n]).await?;
    }
}

/// An `http(s)://` artifact: streamed, abandoned when it stalls for `read_timeout`.
async fn download(url: &str, limits: &Limits, sink: &mut Sink<'_>) -> Result<(), Error> {
    let resp = request(url, limits).await?;
    let mut body = resp.bytes_stream();
    let mut received: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::Download {
            url: url.into(),
            reason: if e.is_timeout() {
                format!(
                    "stalled: no data for {:?} after {} (--fetch-stall-timeout)",
                    limits.read_timeout,
                    cutover_shared::size::human(received)
                )
            } else {
                cutover_shared::errors::chain(&e)
            },
            transient: true,
        })?;
        received += chunk.len() as u64;
        sink.write(&chunk).await?;
    }
    Ok(())
}

/// The response to `GET url`, refused unless it is a success no larger than allowed
/// (5xx and 429 are worth retrying).
async fn request(url: &str, limits: &Limits) -> Result<reqwest::Response, Error> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(limits.read_timeout)
        .build()
        .map_err(|e| Error::Download {
            url: url.into(),
            reason: e.to_string(),
            transient: false,
        })?;
    let resp = client.get(url).send().await.map_err(|e| Error::Download {
        url: url.into(),
        reason: cutover_shared::errors::chain(&e),
        transient: true,
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(Error::Download {
            url: url.into(),
            reason: format!("HTTP {status}"),
            transient: status.is_server_error() || status.as_u16() == 429,
        });
    }
    if let Some(len) = resp.content_length()
        && len > limits.max_artifact_bytes
    {
        return Err(Error::TooLarge {
            limit: limits.max_artifact_bytes,
        });
    }
    Ok(resp)
}

/// Checks that a path inside an archive stays inside the release directory.
fn safe_relative(path: &Path) -> Result<PathBuf, Error> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(Error::Unsafe(format!("{} contains '..'", path.display())));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(Error::Unsafe(format!(
                    "{} is an absolute path",
                    path.display()
                )));
            }
        }
    }
    Ok(out)
}

/// The symbolic links unpacked so far (path → target, both relative to the release
/// root), to resolve paths the way the kernel will once they are on disk.
#[derive(Default)]
struct Links(HashMap<PathBuf, PathBuf>);

/// Why a path does not resolve inside the release.
enum Escape {
    Outside,
    Loop,
}

impl Links {
    /// Resolves `path`, relative to the directory `from` (already resolved), following
    /// every link it passes through; the result is relative to the release root.
    fn resolve(
        &self,
        from: &[OsString],
        path: &Path,
        hops: &mut u32,
    ) -> Result<Vec<OsString>, Escape> {
        let mut at = from.to_vec();
        for c in path.components() {
            match c {
                Component::Normal(name) => {
                    at.push(name.to_os_string());
                    let here: PathBuf = at.iter().collect();
                    if let Some(target) = self.0.get(&here) {
                        *hops += 1;
                        if *hops > MAX_LINK_HOPS {
                            return Err(Escape::Loop);
                        }
                        at.pop();
                        if target.is_absolute() {
                            return Err(Escape::Outside);
                        }
                        at = self.resolve(&at, target, hops)?;
                    }
                }
                Component::CurDir => {}
                Component::ParentDir => {
                    if at.pop().is_none() {
                        return Err(Escape::Outside);
                    }
                }
                Component::RootDir | Component::Prefix(_) => return Err(Escape::Outside),
            }
        }
        Ok(at)
    }

    /// The real location (relative to the root) of the directory holding `entry`.
    fn parent_of(&self, entry: &Path) -> Result<Vec<OsString>, Escape> {
        let parent = entry.parent().unwrap_or(Path::new(""));
        self.resolve(&[], parent, &mut 0)
    }

    /// Checks that the link at `link` with `target` resolves inside the release.
    fn check_target(&self, link: &Path, target: &Path) -> Result<(), Error> {
        let outside = || {
            Error::Unsafe(format!(
                "link {} points outside the release ({})",
                link.display(),
                target.display()
            ))
        };
        let parent = self.parent_of(link).map_err(|_| outside())?;
        match self.resolve(&parent, target, &mut 0) {
            Ok(_) => Ok(()),
            Err(Escape::Outside) => Err(outside()),
            Err(Escape::Loop) => Err(Error::Unsafe(format!(
                "link {} is part of a loop of links",
                link.display()
            ))),
        }
    }

    /// The first link that a path (relative to the root, as hard link targets are)
    /// passes through, itself included.
    fn first_link_in(&self, path: &Path) -> Option<PathBuf> {
        let mut at = PathBuf::new();
        for c in path.components() {
            at.push(c);
            if self.0.contains_key(&at) {
                return Some(at);
            }
        }
        None
    }
}

/// Unpacks a `.tar.gz` or `.tar.zst` into `dest`, which must not exist yet. Work happens in a
/// temporary sibling that is renamed into place, so `dest` is either complete or absent.
/// Blocking: call from `spawn_blocking`.
pub fn unpack(archive: &Path, dest: &Path, limits: &Limits) -> Result<(), Error> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    // Unique per call: two slots may unpack the same release at once (a cancelled
    // preparation still unpacking while the next deployment starts).
    let tmp = parent.join(format!(
        "{UNPACK_PREFIX}{}-{}-{:08x}",
        dest.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("release"),
        std::process::id(),
        rand::random::<u32>()
    ));
    // Closed to everyone else while it fills: no service can open a file in it before
    // its final mode is set.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(io("create", &tmp))?;
    let result = unpack_into(archive, &tmp, limits).and_then(|()| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(io("set permissions of", &tmp))
    });
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match std::fs::rename(&tmp, dest) {
        Ok(()) => Ok(()),
        // Another unpack of the same verified artifact finished first: its directory
        // holds the same files.
        Err(_) if dest.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(io("rename", dest)(e))
        }
    }
}

/// Removes what interrupted work left behind: partial downloads in `cache` and
/// half-unpacked releases under `releases/<service>/`. Called at start, before any
/// slot prepares. Returns how many were removed.
pub fn remove_leftovers(cache: &Path, releases: &Path) -> usize {
    let entries = |dir: &Path| -> Vec<std::fs::DirEntry> {
        std::fs::read_dir(dir)
            .map(|rd| rd.flatten().collect())
            .unwrap_or_default()
    };
    let named =
        |e: &std::fs::DirEntry, f: &dyn Fn(&str) -> bool| e.file_name().to_str().is_some_and(f);
    let mut removed = 0;
    for e in entries(cache) {
        if named(&e, &|n| n.ends_with(PARTIAL_SUFFIX)) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    for service in entries(releases) {
        for e in entries(&service.path()) {
            if named(&e, &|n| n.starts_with(UNPACK_PREFIX))
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

fn unpack_into(archive: &Path, root: &Path, limits: &Limits) -> Result<(), Error> {
    let mut ar = open_archive(archive)?;
    let mut total: u64 = 0;
    let mut count = 0usize;
    let mut links = Links::default();
    let entries = ar.entries().map_err(|e| Error::Unpack(e.to_string()))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| Error::Unpack(format!("truncated or corrupt archive: {e}")))?;
        let raw_path = entry
            .path()
            .map_err(|e| Error::Unpack(e.to_string()))?
            .into_owned();
        let rel = safe_relative(&raw_path)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        total = total.saturating_add(entry.size());
        if total > limits.max_unpacked_bytes {
            return Err(Error::UnpackedTooLarge {
                limit: limits.max_unpacked_bytes,
            });
        }
        unpack_entry(&mut entry, &rel, root, &mut links)?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::Unpack("the archive is empty".into()));
    }
    // A link may point through a link unpacked after it: check them all as they stand.
    for (link, target) in &links.0 {
        links.check_target(link, target)?;
    }
    Ok(())
}

/// The tar stream inside a `.tar.gz` or `.tar.zst` (told by its first bytes), set to
/// keep modes without the stripped bits and to skip extended attributes.
fn open_archive(archive: &Path) -> Result<tar::Archive<Box<dyn Read>>, Error> {
    let mut f = std::fs::File::open(archive).map_err(io("open", archive))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(io("read", archive))?;
    let f = std::fs::File::open(archive).map_err(io("open", archive))?;
    let reader: Box<dyn Read> = if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(f))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        let d = ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::new(f))
            .map_err(|e| Error::Unpack(format!("zstd: {e}")))?;
        Box::new(d)
    } else {
        return Err(Error::Unpack(
            "not a compressed tar archive (.tar.gz or .tar.zst)".into(),
        ));
    };
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_mask(STRIPPED_MODE_BITS);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    Ok(ar)
}

/// Unpacks one entry at `rel` once it is checked: its kind, where it really lands (the
/// links before it followed), and for a link its target.
fn unpack_entry(
    entry: &mut tar::Entry<'_, impl Read>,
    rel: &Path,
    root: &Path,
    links: &mut Links,
) -> Result<(), Error> {
    let kind = entry.header().entry_type();
    check_kind(rel, kind)?;
    let real_parent = landing(links, rel)?;
    if kind.is_symlink() || kind.is_hard_link() {
        let target = entry
            .link_name()
            .map_err(|e| Error::Unpack(e.to_string()))?
            .ok_or_else(|| Error::Unsafe(format!("{} is a link without a target", rel.display())))?
            .into_owned();
        if kind.is_symlink() {
            links.check_target(rel, &target)?;
        } else {
            check_hard_link(root, links, rel, &target)?;
        }
    }
    let dir = root.join(&real_parent);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(io("create", &dir))?;
    let done = entry
        .unpack_in(root)
        .map_err(|e| Error::Unpack(format!("{}: {}", rel.display(), innermost(&e))))?;
    if !done {
        return Err(Error::Unsafe(format!(
            "{} would land outside the release",
            rel.display()
        )));
    }
    // Keep the map of links true to the disk: a link made, or a link replaced.
    if let Some(name) = rel.file_name() {
        let at = real_parent.join(name);
        match std::fs::read_link(root.join(&at)) {
            Ok(target) => links.0.insert(at, target),
            Err(_) => links.0.remove(&at),
        };
    }
    Ok(())
}

/// The directory `rel` really lands in, relative to the root, once the links unpacked
/// before it are followed; an error when that is outside the release.
fn landing(links: &Links, rel: &Path) -> Result<PathBuf, Error> {
    let outside = || {
        Error::Unsafe(format!(
            "{} is reached through a link outside the release",
            rel.display()
        ))
    };
    let parent = links.parent_of(rel).map_err(|_| outside())?;
    if links.resolve(&[], rel, &mut 0).is_err() {
        return Err(outside());
    }
    Ok(parent.iter().collect())
}

/// Refuses devices, FIFOs and other special files.
fn check_kind(rel: &Path, kind: tar::EntryType) -> Result<(), Error> {
    let allowed = kind.is_file()
        || kind.is_dir()
        || kind.is_symlink()
        || kind.is_hard_link()
        || kind.is_gnu_sparse()
        || kind == tar::EntryType::Continuous
        || kind.is_pax_global_extensions()
        || kind.is_pax_local_extensions()
        || kind.is_gnu_longname()
        || kind.is_gnu_longlink();
    if allowed {
        Ok(())
    } else {
        Err(Error::Unsafe(format!(
            "{} is a special file ({kind:?}); only files, directories and links are allowed",
            rel.display()
        )))
    }
}

/// A hard link must name, directly, a regular file unpacked before it: not a path
/// through a symbolic link, not a link itself (which would be re-read from the hard
/// link's own directory), not a directory.
fn check_hard_link(root: &Path, links: &Links, rel: &Path, target: &Path) -> Result<(), Error> {
    let t = safe_relative(target).map_err(|_| {
        Error::Unsafe(format!(
            "hard link {} points outside the release ({})",
            rel.display(),
            target.display()
        ))
    })?;
    if let Some(link) = links.first_link_in(&t) {
        return Err(Error::Unsafe(format!(
            "hard link {} names {} through the symbolic link {}; a hard link must name a file unpacked before it",
            rel.display(),
            target.display(),
            link.display()
        )));
    }
    match std::fs::symlink_metadata(root.join(&t)) {
        Ok(m) if m.is_file() => Ok(()),
        _ => Err(Error::Unpack(format!(
            "hard link {}: its target {} is not a file unpacked before it",
            rel.display(),
            target.display()
        ))),
    }
}

/// Computes the digest of a local file (used by tests and the sign/verify tooling).
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests;
