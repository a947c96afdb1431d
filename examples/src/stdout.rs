//! Printing to stdout that reports failure instead of panicking (`println!` panics with
//! "failed printing to stdout" when the reader has gone away or the disk is full).
//!
//! [`outln!`](crate::outln) and [`out!`](crate::out) are `println!` / `print!` returning
//! `Result<(), StdoutError>`; the `bitstack` binary turns [`StdoutError::Closed`] (the reader
//! closed the pipe, as `| head -1` does) into a quiet exit and [`StdoutError::Write`] (e.g.
//! `ENOSPC` on `/dev/full`) into exit status 1 with a message.

use std::io::Write;

/// A failed write to stdout.
#[derive(Debug, thiserror::Error)]
pub enum StdoutError {
    /// The reading end of the pipe was closed (`EPIPE`): nobody reads any more output.
    #[error("stdout was closed by its reader")]
    Closed,
    /// Any other write error (disk full, I/O error).
    #[error("writing to stdout: {0}")]
    Write(#[source] std::io::Error),
}

impl From<std::io::Error> for StdoutError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            StdoutError::Closed
        } else {
            StdoutError::Write(e)
        }
    }
}

/// Writes `args` to stdout and flushes it (so that a full disk is reported here, not lost in
/// a buffer).
pub fn write_fmt(args: std::fmt::Arguments<'_>) -> Result<(), StdoutError> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.flush()?;
    Ok(())
}

/// Flushes stdout, reporting a failure.
pub fn flush() -> Result<(), StdoutError> {
    Ok(std::io::stdout().lock().flush()?)
}

/// `println!` that returns `Result<(), StdoutError>` instead of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::write_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::write_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that returns `Result<(), StdoutError>` instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::write_fmt(format_args!($($arg)*))
    };
}

/// `eprintln!` that ignores a failed write: progress and notes are optional, so a closed or
/// full stderr must not end (or panic) the command whose results go to stdout and files.
#[macro_export]
macro_rules! noteln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprint!` that ignores a failed write (see [`noteln!`](crate::noteln)).
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_pipe_is_closed_other_errors_are_write() {
        let e: StdoutError = std::io::Error::from(std::io::ErrorKind::BrokenPipe).into();
        assert!(matches!(e, StdoutError::Closed));
        let e: StdoutError = std::io::Error::from_raw_os_error(28).into();
        assert!(matches!(e, StdoutError::Write(_)));
        assert!(e.to_string().starts_with("writing to stdout: "));
    }
}
