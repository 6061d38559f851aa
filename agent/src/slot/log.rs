//! A slot's log file, `logs/<service>-<slot>.log`. The process appends to it directly
//! (so it keeps logging without the agent); the agent rotates it when it passes its cap
//! — copy to `.log.1`, then truncate: the process's appending descriptor carries on at
//! the new end — and reads its last line to say why the process exited.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

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

    /// Rotates the file once it has reached its cap.
    pub fn rotate_if_full(&self) {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return;
        };
        if meta.len() < self.cap {
            return;
        }
        let old = self.path.with_extension("log.1");
        if std::fs::copy(&self.path, &old).is_ok()
            && let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.path)
        {
            let _ = f.set_len(0);
        }
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
}
