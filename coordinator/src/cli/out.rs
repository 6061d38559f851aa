//! Where the CLI's words go: data lines to stdout, progress and errors to stderr.
//!
//! Every line the CLI prints passes through here, so a reader that goes away early
//! (`cutover history | head -1`) ends the output quietly instead of panicking: once
//! stdout is a closed pipe, further data is dropped and the command finishes with its
//! own exit code. Any other write failure (a full disk behind a redirect) is kept and
//! reported once at the end, by [`stdout_error`]. Stderr is written best effort: there
//! is nowhere left to report its failure.
//!
//! Data is text for people or, with `--output json`, JSON for scripts ([`print_json`]).

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The format of the data on stdout (`--output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    // Lines and tables for people. (Plain comments: a doc comment would show in --help.)
    Text,
    // One pretty-printed JSON document, for scripts.
    Json,
}

/// Set once stdout is known to be a closed pipe (or failed otherwise).
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// The first stdout failure that was not a closed pipe.
static STDOUT_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Writes one line to stdout; see the module doc for what happens when it cannot.
pub fn stdout_line(args: fmt::Arguments<'_>) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe
            && let Ok(mut first) = STDOUT_ERROR.lock()
        {
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// Writes one line to stderr, ignoring failure.
pub fn stderr_line(args: fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// Writes raw bytes to stderr and flushes, ignoring failure (the live view).
pub fn stderr_raw(bytes: &[u8]) {
    let mut err = io::stderr().lock();
    let _ = err.write_all(bytes).and_then(|()| err.flush());
}

/// A stdout failure other than a closed pipe, if one happened: the data the command
/// printed is incomplete, which the caller reports as an error.
pub fn stdout_error() -> Option<String> {
    STDOUT_ERROR.lock().ok().and_then(|e| e.clone())
}

/// Prints `v` as one pretty-printed JSON document, its object keys in sorted order like
/// every JSON document cutover writes ([`crate::views::to_value`]).
pub fn print_json<T: serde::Serialize>(v: &T) {
    let text = serde_json::to_string_pretty(&crate::views::to_value(v)).unwrap_or_default();
    stdout_line(format_args!("{text}"));
}

/// `println!` for the CLI: one line of data on stdout.
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::out::stdout_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::cli::out::stdout_line(format_args!($($arg)*)) };
}

/// `eprintln!` for the CLI: one line of progress or diagnostics on stderr.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::cli::out::stderr_line(format_args!($($arg)*)) };
}
