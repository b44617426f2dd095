//! Writing to stderr and stdout without panicking.
//!
//! `eprintln!` and `println!` panic when a write fails: when the reader of a pipe has gone
//! (`flare train ... 2>&1 | head -1`: Rust ignores SIGPIPE, so the write returns EPIPE) or when
//! the file the stream is redirected to is on a full disk (ENOSPC). A panic there would end a
//! training run before its adapter is written, for the sake of a progress line. So the CLI's
//! diagnostics go through [`elog!`], which drops a line it cannot write: stderr is where an
//! error would be reported, so there is nowhere left to report it, and the run's real products
//! (the adapter, checkpoints, metrics.jsonl) are files that do not depend on it. Text that *is*
//! the product on stdout (generated text) is written with `write_all` and its errors handled by
//! the command (see `generate_cmd`). indicatif's progress bar draws only on a terminal and
//! drops its own write errors, and clap's `Error::exit` swallows a broken pipe.

use std::fmt;
use std::io::Write;

/// Writes one line to stderr (in one `write_all`, so lines of concurrent writers do not
/// interleave); a failed write is dropped, never a panic.
pub fn stderr_line(args: fmt::Arguments<'_>) {
    let mut line = args.to_string();
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Writes one line to stdout; a failed write (a closed pipe, a full disk) is dropped, never a
/// panic. For the demo's narration, which must not stop the training it narrates.
pub fn stdout_line(args: fmt::Arguments<'_>) {
    let mut line = args.to_string();
    line.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
}

/// `eprintln!` that never panics: see [`stderr_line`].
macro_rules! elog {
    ($($arg:tt)*) => {
        $crate::output::stderr_line(format_args!($($arg)*))
    };
}

/// `println!` that never panics: see [`stdout_line`].
macro_rules! olog {
    ($($arg:tt)*) => {
        $crate::output::stdout_line(format_args!($($arg)*))
    };
}

pub(crate) use {elog, olog};
