//! Standard output that ends quietly on a closed pipe, as Unix tools do: `bpfnat stats |
//! head -1` must not panic ("failed printing to stdout: Broken pipe"), and the demo must go
//! on to clean up after itself. Once the reader is gone, later output is dropped.

use std::{
    io::{self, Write as _},
    sync::atomic::{AtomicBool, Ordering},
};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Write `text` and a newline to standard output. A closed pipe is not an error: the text
/// and everything after it are dropped.
pub fn line(text: &str) -> io::Result<()> {
    if CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut out = io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        r => r,
    }
}

/// `println!` that ends quietly on a closed pipe (see [`line`]).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::stdout::line(&format!($($arg)*))
    };
}

/// Whether the reader of standard output is gone (a write found the pipe closed): a command
/// that streams stops then.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}
