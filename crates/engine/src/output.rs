//! The commands' output on stdout.
//!
//! `println!` panics when the reader has gone (`engine retention status | head -1`). Lines written
//! here return the error instead; the command stops there and [`reader_gone`] lets `main` end it
//! quietly, as any Unix tool does. (Restoring SIGPIPE's default would do the same for stdout, but
//! would also kill the process on a write to any other closed pipe or socket, a database
//! connection included.)

use std::fmt::Display;
use std::io::{self, Write};

/// Writes `text` and a newline to stdout.
pub fn line(text: impl Display) -> io::Result<()> {
    writeln!(io::stdout().lock(), "{text}")
}

/// Whether `error` is stdout's reader having gone away.
pub fn reader_gone(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_pipe_is_the_reader_gone_and_other_errors_are_not() {
        let gone = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("printing the status");
        assert!(reader_gone(&gone));
        assert!(!reader_gone(&anyhow::Error::from(io::Error::from(
            io::ErrorKind::PermissionDenied
        ))));
        assert!(!reader_gone(&anyhow::anyhow!(
            "no tenant with id or slug \"x\""
        )));
    }
}
