//! What every binary of the project (storaged, computed, storctl, storbench)
//! does the same way at its edges: logging on stderr, and output on stdout
//! that a closed pipe ends quietly.
//!
//! Colour: log lines carry ANSI colour only when stderr is a terminal and
//! `NO_COLOR` is unset or empty (<https://no-color.org>), so journald and
//! log files never store escape codes.
//!
//! A closed stdout (`storctl status | head -1`, `storbench … | true`): Rust
//! ignores SIGPIPE, so a write returns EPIPE and `println!` would panic.
//! The binaries print through [`outln!`](crate::outln) and
//! [`out!`](crate::out) instead, which return [`OutputError::Closed`]; the
//! error travels up like any other (so guards still run: storbench's local
//! cluster is stopped), and `main` then ends the process with
//! [`die_of_sigpipe`], as `cat` or `grep` end in a pipeline: killed by
//! SIGPIPE, which a shell shows as exit status 141 and does not report.
//! Messages on stderr go through [`errln!`](crate::errln), which never
//! panics (there is nowhere left to report a closed stderr).

use std::io::{IsTerminal as _, Write as _};

/// Why writing on stdout failed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The reader of stdout went away (EPIPE): end quietly, see [`die_of_sigpipe`].
    #[error("stdout is closed")]
    Closed,
    /// Any other failure (a full disk under a redirect, ...): an error to report.
    #[error("writing to stdout: {0}")]
    Io(std::io::Error),
}

/// Writes `args` to stdout and flushes it, so a closed pipe is seen here and
/// not at exit. Used by [`out!`](crate::out) and [`outln!`](crate::outln).
pub fn write_stdout(args: std::fmt::Arguments<'_>) -> Result<(), OutputError> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|()| out.flush()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            OutputError::Closed
        } else {
            OutputError::Io(e)
        }
    })
}

/// `print!` that returns `Result<(), OutputError>` instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(::std::format_args!($($arg)*))
    };
}

/// `println!` that returns `Result<(), OutputError>` instead of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(::std::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(::std::format_args!("{}\n", ::std::format_args!($($arg)*)))
    };
}

/// `eprintln!` that never panics: a failed write on stderr is dropped.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr().lock(), $($arg)*);
    }};
}

/// Whether `e` (or anything in its chain) is a write on a closed stdout.
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<OutputError>(), Some(OutputError::Closed)))
}

/// Ends the process by `signal` with its default action (for SIGPIPE,
/// SIGINT, SIGTERM, SIGHUP: termination), so the parent sees what it would
/// see of any Unix tool stopped by it (a shell: 128 + the signal number).
/// Call it last, once everything that must be cleaned up has been.
pub fn die_of_signal(signal: i32) -> ! {
    // SAFETY: plain libc calls with valid arguments; nothing is shared with
    // Rust code (the handler being replaced is the default action).
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
    }
    // Not reached unless the signal could not end the process.
    std::process::exit(128 + signal)
}

/// Ends the process as a closed stdout ends `cat`: by SIGPIPE.
pub fn die_of_sigpipe() -> ! {
    die_of_signal(libc::SIGPIPE)
}

/// Whether log lines should be coloured: only on a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string.
pub fn colour_wanted(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Logs to stderr, filtered by `RUST_LOG` or else `default_filter`
/// (an `EnvFilter` directive such as `"warn,storaged=info"`), coloured only
/// as [`colour_wanted`] says.
pub fn init_logging(default_filter: &str) {
    let colour = colour_wanted(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
        assert!(!colour_wanted(false, Some(OsStr::new(""))));
    }

    #[test]
    fn a_closed_stdout_is_told_apart_from_other_errors() {
        let closed = anyhow::Error::new(OutputError::Closed).context("printing the report");
        assert!(is_stdout_closed(&closed));
        let other = anyhow::Error::new(OutputError::Io(std::io::Error::other("disk full")));
        assert!(!is_stdout_closed(&other));
        // A broken connection is not a closed stdout.
        let socket = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(!is_stdout_closed(&socket));
    }
}
