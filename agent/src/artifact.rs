//! Release artifacts: fetched from `file://` or `http(s)://` with bounded retries,
//! verified against their SHA-256 while streaming, and unpacked safely into an immutable
//! per-release directory. Nothing from an artifact runs unless its digest matched.

use std::io::Read;
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

#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest artifact accepted, in bytes.
    pub max_artifact_bytes: u64,
    /// Largest total unpacked size, in bytes.
    pub max_unpacked_bytes: u64,
    pub attempts: usize,
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
    let mut out = tokio::fs::File::create(dest)
        .await
        .map_err(io("create", dest))?;
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut add = |chunk: &[u8], hasher: &mut Sha256| -> Result<(), Error> {
        total += chunk.len() as u64;
        if total > limits.max_artifact_bytes {
            return Err(Error::TooLarge {
                limit: limits.max_artifact_bytes,
            });
        }
        hasher.update(chunk);
        Ok(())
    };
    if let Some(path) = url.strip_prefix("file://") {
        let path = Path::new(path);
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
                break;
            }
            add(&buf[..n], &mut hasher)?;
            out.write_all(&buf[..n]).await.map_err(io("write", dest))?;
        }
    } else {
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
            add(&chunk, &mut hasher)?;
            out.write_all(&chunk).await.map_err(io("write", dest))?;
        }
    }
    out.flush().await.map_err(io("write", dest))?;
    out.sync_all().await.map_err(io("sync", dest))?;
    let got = hex::encode(hasher.finalize());
    if !got.eq_ignore_ascii_case(sha256) {
        let _ = tokio::fs::remove_file(dest).await;
        return Err(Error::Checksum {
            expected: sha256.to_ascii_lowercase(),
            got,
        });
    }
    Ok(())
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

/// True when `target`, a link at `link` (both relative to the release root), resolves
/// inside the root.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.parent().map_or(0, |p| p.components().count() as i64);
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Unpacks a `.tar.gz` or `.tar.zst` into `dest`, which must not exist yet. Work happens in a
/// temporary sibling that is renamed into place, so `dest` is either complete or absent.
/// Blocking: call from `spawn_blocking`.
pub fn unpack(archive: &Path, dest: &Path, limits: &Limits) -> Result<(), Error> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    let tmp = parent.join(format!(
        ".unpack-{}-{}",
        dest.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("release"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
    let result = unpack_into(archive, &tmp, limits);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dest).map_err(io("rename", dest))
}

fn unpack_into(archive: &Path, root: &Path, limits: &Limits) -> Result<(), Error> {
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
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    let mut total: u64 = 0;
    let mut count = 0usize;
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
        let kind = entry.header().entry_type();
        total = total.saturating_add(entry.size());
        if total > limits.max_unpacked_bytes {
            return Err(Error::UnpackedTooLarge {
                limit: limits.max_unpacked_bytes,
            });
        }
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| Error::Unpack(e.to_string()))?
                .ok_or_else(|| {
                    Error::Unsafe(format!("{} is a link without a target", rel.display()))
                })?
                .into_owned();
            let inside = if kind.is_symlink() {
                link_stays_inside(&rel, &target)
            } else {
                safe_relative(&target).is_ok()
            };
            if !inside {
                return Err(Error::Unsafe(format!(
                    "link {} points outside the release ({})",
                    rel.display(),
                    target.display()
                )));
            }
        } else if !(kind.is_file()
            || kind.is_dir()
            || kind.is_gnu_sparse()
            || kind == tar::EntryType::Continuous
            || kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink())
        {
            return Err(Error::Unsafe(format!(
                "{} is a special file ({kind:?}); only files, directories and links are allowed",
                rel.display()
            )));
        }
        let out = root.join(&rel);
        // Never write through a link created by an earlier entry that leads outside.
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p).map_err(io("create", p))?;
            let real = p.canonicalize().map_err(io("resolve", p))?;
            let real_root = root.canonicalize().map_err(io("resolve", root))?;
            if !real.starts_with(&real_root) {
                return Err(Error::Unsafe(format!(
                    "{} is reached through a link outside the release",
                    rel.display()
                )));
            }
        }
        let done = entry
            .unpack_in(root)
            .map_err(|e| Error::Unpack(format!("{}: {}", rel.display(), innermost(&e))))?;
        if !done {
            return Err(Error::Unsafe(format!(
                "{} would land outside the release",
                rel.display()
            )));
        }
        count += 1;
    }
    if count == 0 {
        return Err(Error::Unpack("the archive is empty".into()));
    }
    Ok(())
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
