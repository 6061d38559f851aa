//! Env files (`[run] env_files`): `KEY=value` files on the host that a slot reads when it
//! starts, so that plans never carry host-specific settings or secrets. The agent reads
//! them as itself (they may be readable by root only); their values go into the slot's
//! environment and nowhere else — errors name the file and the line, never a value.
//!
//! The format is the common one of systemd's `EnvironmentFile` and `.env` files: one
//! `KEY=value` per line, blank lines and `#` comments skipped, an optional `export `
//! before the key, and a value optionally wrapped in one pair of single or double quotes
//! (taken literally, no escapes or `${...}` expansion).

use std::path::{Path, PathBuf};

/// The largest env file read, in bytes: a bigger one is a mistake, not settings.
const MAX_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("env file {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("env file {}: {} bytes is over the {MAX_BYTES}-byte limit", .path.display(), .bytes)]
    TooLarge { path: PathBuf, bytes: u64 },
    /// The line's text is left out on purpose: it may hold a secret.
    #[error("env file {} line {line}: {what}", .path.display())]
    Line {
        path: PathBuf,
        line: usize,
        what: &'static str,
    },
}

/// The variables of every file in `paths`, in order; a later file's value wins.
pub fn read_all(paths: &[String]) -> Result<Vec<(String, String)>, Error> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for p in paths {
        for (k, v) in read(Path::new(p))? {
            vars.retain(|(have, _)| *have != k);
            vars.push((k, v));
        }
    }
    Ok(vars)
}

/// The variables of one file, in the order written (a repeated key: the last wins).
pub fn read(path: &Path) -> Result<Vec<(String, String)>, Error> {
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::metadata(path).map_err(read_err)?.len();
    if bytes > MAX_BYTES {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            bytes,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse(&text).map_err(|(line, what)| Error::Line {
        path: path.to_path_buf(),
        line,
        what,
    })
}

/// Parses env file text; an error is the 1-based line and what is wrong with it.
fn parse(text: &str) -> Result<Vec<(String, String)>, (usize, &'static str)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let Some((key, value)) = line.split_once('=') else {
            return Err((i + 1, "expected KEY=value"));
        };
        let key = key.trim();
        let valid = !key.is_empty()
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !key.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err((i + 1, "the name is not a variable name"));
        }
        let value = unquote(value.trim()).ok_or((i + 1, "a quote is not closed"))?;
        vars.retain(|(k, _)| k != key);
        vars.push((key.to_string(), value.to_string()));
    }
    Ok(vars)
}

/// `value` without one pair of surrounding quotes; `None` when a quote opens and never
/// closes.
fn unquote(value: &str) -> Option<&str> {
    for q in ['"', '\''] {
        if let Some(rest) = value.strip_prefix(q) {
            return rest.strip_suffix(q);
        }
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_comments_exports_and_quotes() {
        let vars = parse(
            "# settings\n\nDATABASE_URL=postgres://a:b@db/app?x=1\nexport MODE = fast\nQUOTED=\"a b # c\"\nSINGLE='x'\nEMPTY=\nMODE=slow\n",
        )
        .unwrap();
        let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("DATABASE_URL", "postgres://a:b@db/app?x=1"),
                ("QUOTED", "a b # c"),
                ("SINGLE", "x"),
                ("EMPTY", ""),
                ("MODE", "slow"),
            ]
        );
    }

    #[test]
    fn a_bad_line_is_named_without_its_text() {
        assert_eq!(parse("A=1\nsecret-value\n"), Err((2, "expected KEY=value")));
        assert_eq!(parse("1A=x"), Err((1, "the name is not a variable name")));
        assert_eq!(parse("A=\"open"), Err((1, "a quote is not closed")));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("web.env");
        std::fs::write(&f, "TOKEN hunter22\n").unwrap();
        let e = read(&f).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("env file {} line 1: expected KEY=value", f.display())
        );
        assert!(!e.contains("hunter22"));
    }

    #[test]
    fn a_missing_file_is_named_and_later_files_win() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.env");
        let e = read_all(&[missing.display().to_string()]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("env file {}: ", missing.display())),
            "{e}"
        );
        let (a, b) = (dir.path().join("a.env"), dir.path().join("b.env"));
        std::fs::write(&a, "X=1\nY=2\n").unwrap();
        std::fs::write(&b, "X=3\n").unwrap();
        let vars = read_all(&[a.display().to_string(), b.display().to_string()]).unwrap();
        assert_eq!(vars, [("Y".into(), "2".into()), ("X".into(), "3".into())]);
    }
}
