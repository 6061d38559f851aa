//! A slot's log file, `logs/<service>-<slot>.log`. The process appends to it directly
//! (so it keeps logging without the agent); the agent rotates it when it passes its cap
//! — copy to `.log.1`, then truncate: the process's appending descriptor carries on at
//! the new end — and reads its last line to say why the process exited.
//!
//! The process writes no timestamps the agent could trust, so [`Marks`] notes how far
//! each file had grown at every health check: `cutover logs --since` starts reading at
//! the size the file had then.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cutover_proto::Slot;

use crate::data_dir;

/// How much of the file's end is read for its last line.
const TAIL_BYTES: u64 = 4096;
/// Longest last line kept, in characters.
const LINE_CHARS: usize = 300;

pub struct SlotLog {
    /// The file the process appends to.
    path: PathBuf,
    /// Size past which the file is rotated.
    cap: u64,
}

impl SlotLog {
    /// The log of `service`'s `slot` in the data dir `data`, rotated past `cap` bytes.
    pub fn of(data: &Path, service: &str, slot: Slot, cap: u64) -> SlotLog {
        SlotLog {
            path: data_dir::logs(data).join(format!("{service}-{slot}.log")),
            cap,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file and its rotated copy (the service was removed).
    pub fn remove(&self) {
        for p in [self.path.clone(), self.path.with_extension("log.1")] {
            if let Err(e) = std::fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %p.display(), error = %e, "remove a slot log");
            }
        }
    }

    /// Rotates the file once it has reached its cap; true when it did.
    pub fn rotate_if_full(&self) -> bool {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return false;
        };
        if meta.len() < self.cap {
            return false;
        }
        let old = rotated(&self.path);
        if std::fs::copy(&self.path, &old).is_ok()
            && let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.path)
        {
            return f.set_len(0).is_ok();
        }
        false
    }

    /// The last non-empty line the process wrote, cut to 300 characters.
    pub fn last_line(&self) -> Option<String> {
        let mut f = std::fs::File::open(&self.path).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))
            .ok()?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf);
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
        Some(line.chars().take(LINE_CHARS).collect())
    }
}

/// Where a full log file's content goes: `NAME.log.1`.
pub fn rotated(path: &Path) -> PathBuf {
    path.with_extension("log.1")
}

/// Marks kept per file: at one a second, about an hour of history.
const MARKS_KEPT: usize = 4096;

/// How far each log file had grown when (unix ms, bytes), per file.
#[derive(Default)]
pub struct Marks {
    files: Mutex<HashMap<PathBuf, VecDeque<(u64, u64)>>>,
}

/// Where reading from a moment on starts in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// At this byte: the file's size at the last mark before the moment.
    From(u64),
    /// The agent has no mark of this file from before the moment (it was not running
    /// then): the file's modification time is all there is.
    Unknown,
}

impl Marks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, VecDeque<(u64, u64)>>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes `path`'s size at `now_ms`, when it changed since the last mark.
    pub fn mark(&self, path: &Path, now_ms: u64) {
        let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else {
            return;
        };
        let mut files = self.lock();
        let marks = files.entry(path.to_path_buf()).or_default();
        if marks.back().is_some_and(|(_, l)| *l == len) {
            return;
        }
        if marks.len() >= MARKS_KEPT {
            marks.pop_front();
        }
        marks.push_back((now_ms, len));
    }

    /// `path` was rotated: its marks now describe `path.log.1`, and it starts anew.
    pub fn rotated(&self, path: &Path) {
        let mut files = self.lock();
        if let Some(marks) = files.remove(path) {
            files.insert(rotated(path), marks);
        }
        files.insert(path.to_path_buf(), VecDeque::from([(0, 0)]));
    }

    /// Where the lines of `path` written since `since_ms` start.
    pub fn since(&self, path: &Path, since_ms: u64) -> Since {
        let files = self.lock();
        let Some(marks) = files.get(path).filter(|m| !m.is_empty()) else {
            return Since::Unknown;
        };
        match marks.iter().rev().find(|(t, _)| *t <= since_ms) {
            Some((_, len)) => Since::From(*len),
            // Every mark is newer: so is everything after the first one. What came
            // before it, the agent cannot date.
            None if marks.front().is_some_and(|(_, len)| *len == 0) => Since::From(0),
            None => Since::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_last_line_is_the_last_non_empty_one_cut_to_size() {
        let data = tempfile::tempdir().unwrap();
        let log = SlotLog::of(data.path(), "web", Slot::Green, 1 << 20);
        assert_eq!(log.path(), data.path().join("logs/web-green.log"));
        assert_eq!(log.last_line(), None, "no file yet");
        std::fs::create_dir_all(log.path().parent().unwrap()).unwrap();
        std::fs::write(log.path(), "starting\npanic: boom\n\n  \n").unwrap();
        assert_eq!(log.last_line().as_deref(), Some("panic: boom"));
        std::fs::write(log.path(), "x".repeat(1000)).unwrap();
        assert_eq!(log.last_line().map(|l| l.len()), Some(300));
    }

    #[test]
    fn a_full_log_is_kept_as_log_1_and_the_writer_carries_on_at_the_start() {
        let data = tempfile::tempdir().unwrap();
        let log = SlotLog::of(data.path(), "web", Slot::Blue, 10);
        std::fs::create_dir_all(log.path().parent().unwrap()).unwrap();
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log.path())
            .unwrap();
        writer.write_all(b"12345\n").unwrap();
        log.rotate_if_full();
        assert!(
            !log.path().with_extension("log.1").exists(),
            "below the cap"
        );
        writer.write_all(b"67890\n").unwrap();
        log.rotate_if_full();
        let old = std::fs::read_to_string(log.path().with_extension("log.1")).unwrap();
        assert_eq!(old, "12345\n67890\n");
        writer.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(log.path()).unwrap(), "after\n");
    }

    #[test]
    fn marks_say_where_the_lines_since_a_moment_start() {
        let data = tempfile::tempdir().unwrap();
        let path = data.path().join("web-blue.log");
        let marks = Marks::default();
        assert_eq!(marks.since(&path, 5), Since::Unknown, "never marked");
        std::fs::write(&path, "one\n").unwrap();
        marks.mark(&path, 1_000);
        marks.mark(&path, 1_500);
        std::fs::write(&path, "one\ntwo\n").unwrap();
        marks.mark(&path, 2_000);
        assert_eq!(marks.since(&path, 1_999), Since::From(4));
        assert_eq!(marks.since(&path, 2_000), Since::From(8));
        assert_eq!(
            marks.since(&path, 999),
            Since::Unknown,
            "written before the first mark"
        );
        marks.rotated(&path);
        assert_eq!(marks.since(&rotated(&path), 1_999), Since::From(4));
        assert_eq!(
            marks.since(&path, 1),
            Since::From(0),
            "the new file is all new"
        );
    }
}
