//! Ring setup with the best flags the kernel accepts, and the error that
//! says why io_uring cannot be used. Shared by the device thread and
//! storbench's raw engine.

use std::io;

use io_uring::IoUring;

use crate::io::device::DeviceError;

/// Which optional setup flags the kernel accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingFlags {
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub coop_taskrun: bool,
}

/// An io_uring set up with the best flags the kernel accepts. Shared by
/// [`UringDevice`] and storbench's raw engine so both behave alike.
pub struct Ring {
    pub ring: IoUring,
    pub flags: RingFlags,
}

impl Ring {
    /// Sets up a ring of at least `entries` SQEs. With `single_issuer` the
    /// ring may only be used from the calling thread.
    ///
    /// Tries `SINGLE_ISSUER|DEFER_TASKRUN|COOP_TASKRUN` first (completions run
    /// only when we ask, no IPIs), then fewer flags whenever the kernel says
    /// EINVAL (too old for that flag).
    pub fn new(entries: u32) -> Result<Ring, DeviceError> {
        Ring::with_attempts(entries, &Ring::DEFAULT_ATTEMPTS)
    }

    /// Flag sets [`Ring::new`] tries, best first.
    pub const DEFAULT_ATTEMPTS: [RingFlags; 5] = [
        RingFlags {
            single_issuer: true,
            defer_taskrun: true,
            coop_taskrun: true,
        },
        RingFlags {
            single_issuer: true,
            defer_taskrun: true,
            coop_taskrun: false,
        },
        RingFlags {
            single_issuer: true,
            defer_taskrun: false,
            coop_taskrun: true,
        },
        RingFlags {
            single_issuer: false,
            defer_taskrun: false,
            coop_taskrun: true,
        },
        RingFlags {
            single_issuer: false,
            defer_taskrun: false,
            coop_taskrun: false,
        },
    ];

    /// Like [`Ring::new`] with a chosen list of flag sets, tried in order.
    pub fn with_attempts(entries: u32, attempts: &[RingFlags]) -> Result<Ring, DeviceError> {
        let mut last_einval = None;
        for &flags in attempts {
            let mut builder = IoUring::builder();
            if flags.single_issuer {
                builder.setup_single_issuer();
            }
            if flags.defer_taskrun {
                builder.setup_defer_taskrun();
            }
            if flags.coop_taskrun {
                builder.setup_coop_taskrun();
            }
            builder.setup_cqsize(entries.saturating_mul(2));
            match builder.build(entries) {
                Ok(ring) => {
                    tracing::debug!(?flags, entries, "io_uring set up");
                    return Ok(Ring { ring, flags });
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last_einval = Some(e),
                Err(e) => return Err(ring_setup_error(e)),
            }
        }
        Err(ring_setup_error(last_einval.unwrap_or_else(|| {
            io::Error::other("no io_uring setup flags were accepted")
        })))
    }

    /// Registers `fds` so SQEs can name them as `types::Fixed(index)`.
    pub fn register_files(&self, fds: &[i32]) -> io::Result<()> {
        self.ring.submitter().register_files(fds)
    }
}

fn ring_setup_error(e: io::Error) -> DeviceError {
    let reason = match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring support (ENOSYS)".to_owned(),
        Some(libc::EPERM) | Some(libc::EACCES) => {
            let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".to_owned());
            format!(
                "io_uring_setup was refused ({e}); check the sysctl kernel.io_uring_disabled \
                 (now {sysctl}; 0 allows all users, 1 only the io_uring_group) and any seccomp \
                 filter (container runtimes often block io_uring)"
            )
        }
        _ => format!("io_uring_setup failed: {e}"),
    };
    DeviceError::IoUringUnavailable { reason }
}
