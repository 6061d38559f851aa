//! `cutover logs` on this host: the coordinator asks for lines on the agent's stream
//! (`LogRequest`), and a task per request reads the log files and answers with bounded
//! chunks (`LogChunk`) — the last lines of each file, then, when following, the lines
//! as they are written — until it has sent what was asked, the coordinator cancels it,
//! or the session ends.
//!
//! Nothing here may hold up the agent: each request is its own task, chunks go out on
//! the session's log queue (bounded, apart from observed state, so a slow reader waits
//! alone), and every read is bounded in lines and bytes. Lines are masked with the
//! slot's secret values before they leave.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cutover_proto::v1::{AgentMessage, LogChunk, LogLine, LogRequest, agent_message};
use cutover_shared::secrets::Secrets;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::data_dir;
use crate::slot::{LogMarks, Since, rotated_log};

/// The most lines a request may ask per file.
const MAX_LINES: u32 = 10_000;
/// Lines and bytes per chunk, at most.
const CHUNK_LINES: usize = 256;
const CHUNK_BYTES: usize = 64 * 1024;
/// A longer line is cut (and a line never ended is sent once it is this long).
const MAX_LINE: usize = 16 * 1024;
/// How far back the last lines of a file are looked for.
const MAX_TAIL_BYTES: u64 = 8 << 20;
/// How much of a followed file is read per look.
const MAX_READ: u64 = 1 << 20;
/// How often a followed file is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// One log file a request reads.
#[derive(Clone, Debug)]
pub struct Source {
    /// The slot it is the output of (`blue`, `green`); empty for a deployment's file.
    pub slot: String,
    /// The release that slot runs.
    pub release: String,
    /// A deployment's file name (`expand.log`); empty for a slot.
    pub file: String,
    /// Where it is.
    pub path: PathBuf,
    /// What its lines are masked with.
    pub secrets: Secrets,
}

/// The log requests of one session: started on `LogRequest`, stopped on `LogCancel`,
/// all stopped when the session (and so this) goes.
pub struct Requests {
    /// Where chunks go: the session's log queue.
    tx: mpsc::Sender<AgentMessage>,
    /// Ends every request of the session.
    cancel: CancellationToken,
    /// Each running request's own stop.
    running: Arc<Mutex<HashMap<u64, CancellationToken>>>,
    /// Where slots note their log files' growth.
    marks: Arc<LogMarks>,
}

impl Requests {
    pub fn new(tx: mpsc::Sender<AgentMessage>, marks: Arc<LogMarks>) -> Requests {
        Requests {
            tx,
            cancel: CancellationToken::new(),
            running: Arc::default(),
            marks,
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<u64, CancellationToken>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers `req` from `sources` (or says why it cannot) in a task of its own.
    pub fn start(&self, req: LogRequest, sources: Result<Vec<Source>, String>) {
        let stop = self.cancel.child_token();
        self.running().insert(req.id, stop.clone());
        let answer = Answer {
            out: Chunks::new(req.id, self.tx.clone(), stop.clone()),
            marks: self.marks.clone(),
        };
        let running = self.running.clone();
        tokio::spawn(async move {
            let id = req.id;
            answer.run(&req, sources, &stop).await;
            running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            tracing::debug!(id, "log request ended");
        });
    }

    /// Stops request `id`, if it still runs.
    pub fn cancel(&self, id: u64) {
        if let Some(stop) = self.running().remove(&id) {
            stop.cancel();
        }
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The files of deployment `id`'s hook and database command output on this host,
/// sorted by name.
pub fn deployment_sources(data: &Path, id: &str) -> Result<Vec<Source>, String> {
    let plain = !id.is_empty()
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !plain {
        return Err(format!("{id:?} is not a deployment id"));
    }
    let dir = data_dir::deployment_logs(data, id);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("read {}: {e}", dir.display())),
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files
        .into_iter()
        .map(|path| Source {
            slot: String::new(),
            release: String::new(),
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path,
            secrets: Secrets::default(),
        })
        .collect())
}

/// One request's answer.
struct Answer {
    /// Where its lines go, a chunk at a time.
    out: Chunks,
    /// Where `since` starts in each file.
    marks: Arc<LogMarks>,
}

impl Answer {
    async fn run(
        mut self,
        req: &LogRequest,
        sources: Result<Vec<Source>, String>,
        stop: &CancellationToken,
    ) {
        let sources = match sources {
            Ok(s) => s,
            Err(e) => {
                self.out.finish(Some(e)).await;
                return;
            }
        };
        let lines = req.lines.min(MAX_LINES) as usize;
        let mut tails = Vec::new();
        for s in sources {
            let (since, marks) = (req.since_unix_ms, self.marks.clone());
            let follow = req.follow;
            let src = s.clone();
            let read =
                tokio::task::spawn_blocking(move || last_lines(&src, lines, since, &marks, follow))
                    .await;
            let (found, tail) = match read {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    self.out
                        .finish(Some(format!("read {}: {e}", s.path.display())))
                        .await;
                    return;
                }
                Err(e) => {
                    self.out.finish(Some(format!("read logs: {e}"))).await;
                    return;
                }
            };
            for l in found {
                if !self.out.push(&s, l).await {
                    return;
                }
            }
            tails.push((s, tail));
        }
        if !req.follow {
            self.out.finish(None).await;
            return;
        }
        if !self.out.flush().await {
            return;
        }
        self.follow(tails, stop).await;
    }

    /// Sends the lines written to `tails` from now on, until stopped.
    async fn follow(&mut self, mut tails: Vec<(Source, Tail)>, stop: &CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            }
            for (s, t) in &mut tails {
                for l in t.poll() {
                    if !self.out.push(s, l).await {
                        return;
                    }
                }
            }
            if !self.out.flush().await {
                return;
            }
        }
    }
}

/// A request's lines on their way, gathered into chunks.
struct Chunks {
    /// The request's id, on every chunk.
    id: u64,
    /// The session's log queue.
    tx: mpsc::Sender<AgentMessage>,
    /// The request's stop: a send waiting on a full queue gives up on it.
    stop: CancellationToken,
    /// Lines not sent yet, and their size.
    lines: Vec<LogLine>,
    bytes: usize,
}

impl Chunks {
    fn new(id: u64, tx: mpsc::Sender<AgentMessage>, stop: CancellationToken) -> Chunks {
        Chunks {
            id,
            tx,
            stop,
            lines: Vec::new(),
            bytes: 0,
        }
    }

    /// Adds a line of `s`; sends a full chunk. False once the answer cannot go on.
    async fn push(&mut self, s: &Source, line: String) -> bool {
        let line = s.secrets.mask(&line);
        self.bytes += line.len();
        self.lines.push(LogLine {
            slot: s.slot.clone(),
            release: s.release.clone(),
            line,
            file: s.file.clone(),
        });
        if self.lines.len() >= CHUNK_LINES || self.bytes >= CHUNK_BYTES {
            return self.flush().await;
        }
        true
    }

    /// Sends the lines gathered so far, if any.
    async fn flush(&mut self) -> bool {
        if self.lines.is_empty() {
            return true;
        }
        self.send(false, String::new()).await
    }

    /// Sends what is left as the last chunk, with `error` if the answer failed.
    async fn finish(&mut self, error: Option<String>) {
        self.send(true, error.unwrap_or_default()).await;
    }

    async fn send(&mut self, end: bool, error: String) -> bool {
        self.bytes = 0;
        let chunk = LogChunk {
            id: self.id,
            lines: std::mem::take(&mut self.lines),
            end,
            error,
        };
        let msg = AgentMessage {
            msg: Some(agent_message::Msg::LogChunk(chunk)),
        };
        tokio::select! {
            sent = self.tx.send(msg) => sent.is_ok(),
            _ = self.stop.cancelled() => false,
        }
    }
}

/// Where following a file goes on from.
#[derive(Debug)]
struct Tail {
    /// The file.
    path: PathBuf,
    /// The byte after the last one read.
    pos: u64,
    /// The start of a line not ended yet.
    partial: Vec<u8>,
}

/// The last `n` lines of `s` written since `since_ms` (0: any), with the lines of its
/// rotated copy before them when the file itself has fewer; and where following it
/// would go on from (after the last whole line when `follow`, which leaves an unended
/// line to be followed).
fn last_lines(
    s: &Source,
    n: usize,
    since_ms: u64,
    marks: &LogMarks,
    follow: bool,
) -> std::io::Result<(Vec<String>, Tail)> {
    let from = start_since(&s.path, since_ms, marks);
    let (mut lines, end, partial) = match from {
        Some(from) => tail(&s.path, n, from)?,
        None => (Vec::new(), file_len(&s.path), Vec::new()),
    };
    if lines.len() < n {
        let old = rotated_log(&s.path);
        if let Some(from) = start_since(&old, since_ms, marks) {
            let (mut earlier, _, rest) = tail(&old, n - lines.len(), from)?;
            if !rest.is_empty() {
                earlier.push(cut(&rest));
            }
            earlier.append(&mut lines);
            lines = earlier;
        }
    }
    let mut tail = Tail {
        path: s.path.clone(),
        pos: end,
        partial: Vec::new(),
    };
    if follow {
        tail.partial = partial;
    } else if !partial.is_empty() {
        // Not following: an unended line is the last line there is.
        lines.push(cut(&partial));
        let keep = lines.len().saturating_sub(n);
        lines.drain(..keep);
    }
    Ok((lines, tail))
}

/// Where the lines of `path` written since `since_ms` start; `None` when none were
/// (or there is no such file).
fn start_since(path: &Path, since_ms: u64, marks: &LogMarks) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    if since_ms == 0 {
        return Some(0);
    }
    match marks.since(path, since_ms) {
        Since::From(at) => Some(at.min(meta.len())),
        Since::Unknown => {
            let modified = meta
                .modified()
                .ok()?
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()?
                .as_millis() as u64;
            (modified >= since_ms).then_some(0)
        }
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The last `n` whole lines of `path` at or after byte `from`, the file's end as read,
/// and the unended line after them.
fn tail(path: &Path, n: usize, from: u64) -> std::io::Result<(Vec<String>, u64, Vec<u8>)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Vec::new(), 0, Vec::new()));
        }
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let capped = len.saturating_sub(MAX_TAIL_BYTES);
    let floor = from.max(capped);
    let start = start_of_last_lines(&mut f, n, floor, len)?;
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    (&mut f).take(len - start).read_to_end(&mut buf)?;
    if start == capped && capped > from {
        // The byte cap fell inside a line: its end is no line.
        let first = buf
            .iter()
            .position(|b| *b == b'\n')
            .map_or(buf.len(), |i| i + 1);
        buf.drain(..first);
    }
    let whole = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let partial = buf.split_off(whole);
    let mut lines: Vec<String> = buf.split(|b| *b == b'\n').map(cut).collect();
    // What follows the last newline is the partial line, split off above.
    lines.pop();
    let keep = lines.len().saturating_sub(n);
    lines.drain(..keep);
    Ok((lines, len - partial.len() as u64, partial))
}

/// Where the last `n` whole lines of the file (of `len` bytes) begin, no earlier than
/// `floor`: after the `n + 1`-th newline from the end, read backwards a block at a time.
fn start_of_last_lines(
    f: &mut std::fs::File,
    n: usize,
    floor: u64,
    len: u64,
) -> std::io::Result<u64> {
    let mut block = vec![0u8; 64 * 1024];
    let mut seen = 0;
    let mut start = len;
    while start > floor {
        let size = (start - floor).min(block.len() as u64) as usize;
        let at = start - size as u64;
        f.seek(SeekFrom::Start(at))?;
        f.read_exact(&mut block[..size])?;
        for i in (0..size).rev() {
            if block[i] == b'\n' {
                seen += 1;
                if seen == n + 1 {
                    return Ok(at + i as u64 + 1);
                }
            }
        }
        start = at;
    }
    Ok(floor)
}

/// A line for people: lossy UTF-8, without a trailing CR, cut to [`MAX_LINE`] bytes.
fn cut(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LINE)]);
    if bytes.len() > MAX_LINE {
        format!("{text}…")
    } else {
        text.into_owned()
    }
}

impl Tail {
    /// The whole lines written since the last look; the rest of the file from where it
    /// was when it was rotated meanwhile.
    fn poll(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let len = file_len(&self.path);
        if len < self.pos {
            // Rotated: what was not read yet went to the copy.
            let old = rotated_log(&self.path);
            self.read(&old, self.pos, file_len(&old), &mut out);
            self.pos = 0;
        }
        let path = self.path.clone();
        let (from, to) = (self.pos, len.min(self.pos + MAX_READ));
        self.pos += self.read(&path, from, to, &mut out);
        out
    }

    /// Reads `path` from `from` to `to` into whole lines; returns the bytes read.
    fn read(&mut self, path: &Path, from: u64, to: u64, out: &mut Vec<String>) -> u64 {
        if to <= from {
            return 0;
        }
        let mut buf = Vec::new();
        let read = std::fs::File::open(path).and_then(|mut f| {
            f.seek(SeekFrom::Start(from))?;
            f.take(to - from).read_to_end(&mut buf)
        });
        let Ok(n) = read else { return 0 };
        for b in buf {
            if b == b'\n' {
                out.push(cut(&std::mem::take(&mut self.partial)));
            } else {
                self.partial.push(b);
                if self.partial.len() >= MAX_LINE {
                    out.push(cut(&std::mem::take(&mut self.partial)));
                }
            }
        }
        n as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn source(path: &Path) -> Source {
        Source {
            slot: "blue".into(),
            release: "1.0".into(),
            file: String::new(),
            path: path.to_path_buf(),
            secrets: Secrets::default(),
        }
    }

    fn numbered(n: usize) -> String {
        (1..=n).map(|i| format!("line {i}\n")).collect()
    }

    #[test]
    fn the_last_lines_of_a_file_and_of_its_rotated_copy_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-blue.log");
        let marks = LogMarks::default();
        std::fs::write(&path, numbered(5) + "unended").unwrap();
        let (lines, tail) = last_lines(&source(&path), 2, 0, &marks, false).unwrap();
        assert_eq!(lines, ["line 5", "unended"]);
        assert_eq!(
            tail.pos,
            numbered(5).len() as u64,
            "after the last whole line"
        );
        let (lines, tail) = last_lines(&source(&path), 2, 0, &marks, true).unwrap();
        assert_eq!(
            lines,
            ["line 4", "line 5"],
            "following: the unended line waits"
        );
        assert_eq!(tail.partial, b"unended");

        std::fs::write(rotated_log(&path), numbered(3)).unwrap();
        std::fs::write(&path, "new 1\n").unwrap();
        let (lines, _) = last_lines(&source(&path), 3, 0, &marks, false).unwrap();
        assert_eq!(lines, ["line 2", "line 3", "new 1"]);
        let (lines, _) = last_lines(&source(&path), 100, 0, &marks, false).unwrap();
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn a_long_file_is_read_from_its_end_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-green.log");
        std::fs::write(&path, numbered(100_000)).unwrap();
        let (lines, _) = last_lines(&source(&path), 3, 0, &LogMarks::default(), false).unwrap();
        assert_eq!(lines, ["line 99998", "line 99999", "line 100000"]);
    }

    #[test]
    fn since_starts_at_the_size_the_file_had_then() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-blue.log");
        let marks = LogMarks::default();
        std::fs::write(&path, "old\n").unwrap();
        marks.mark(&path, 1_000);
        std::fs::write(&path, "old\nnew\n").unwrap();
        marks.mark(&path, 2_000);
        let (lines, _) = last_lines(&source(&path), 100, 1_500, &marks, false).unwrap();
        assert_eq!(lines, ["new"]);
    }

    #[test]
    fn following_reads_new_lines_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-blue.log");
        std::fs::write(&path, "a\n").unwrap();
        let (_, mut tail) = last_lines(&source(&path), 10, 0, &LogMarks::default(), true).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"b\nc").unwrap();
        assert_eq!(tail.poll(), ["b"]);
        f.write_all(b"d\ne\n").unwrap();
        // Rotated before the last lines were read: they are in the copy.
        std::fs::copy(&path, rotated_log(&path)).unwrap();
        f.set_len(0).unwrap();
        f.write_all(b"f\n").unwrap();
        assert_eq!(tail.poll(), ["cd", "e", "f"]);
        assert!(tail.poll().is_empty());
    }

    #[test]
    fn a_deployment_id_is_a_plain_name() {
        let dir = tempfile::tempdir().unwrap();
        assert!(deployment_sources(dir.path(), "../../etc").is_err());
        assert!(deployment_sources(dir.path(), "..").is_err());
        assert!(
            deployment_sources(dir.path(), "d-000001")
                .unwrap()
                .is_empty()
        );
        let d = data_dir::deployment_logs(dir.path(), "d-000001");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("expand.log"), "x\n").unwrap();
        std::fs::write(d.join("before_start.log"), "y\n").unwrap();
        let files: Vec<String> = deployment_sources(dir.path(), "d-000001")
            .unwrap()
            .into_iter()
            .map(|s| s.file)
            .collect();
        assert_eq!(files, ["before_start.log", "expand.log"]);
    }
}
