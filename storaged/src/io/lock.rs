//! Device locks: one writer per device at a time, across processes and
//! within one.
//!
//! A process that writes a device (`storaged run`, `storaged format`,
//! `storbench` when it writes) holds an exclusive lock on the whole file for
//! as long as its descriptor is open; a reader (`storctl inspect`) holds a
//! shared one. The locks are open file description locks (`F_OFD_SETLK`):
//! they belong to the open, not to the process, so two opens in one process
//! conflict as two processes do, closing some other descriptor of the file
//! does not drop them (classic POSIX locks would), and they vanish with the
//! descriptor when the process exits, even by `kill -9`, so there is never a
//! stale lock to clean up. Block devices are also opened `O_EXCL`
//! ([`super::device`]), which the kernel enforces against mounts too.
//!
//! A device's lock lives on a descriptor of its own ([`DeviceLock`]), not on
//! the one its I/O goes through: io_uring keeps a registered file open until
//! the ring is torn down, which the kernel finishes asynchronously after the
//! process closed it or exited, so a lock on that descriptor would outlive
//! its process by a moment and refuse a restart that comes right after.
//!
//! An OFD lock records no pid: `F_OFD_GETLK` and `/proc/locks` give -1. The
//! holder is found where the kernel does list it: `/proc/PID/fdinfo/FD` shows
//! the locks each descriptor holds. That needs read access to the holder's
//! `/proc` entries (the same user, or root) in this pid namespace; when the
//! holder cannot be seen, it is reported without a pid rather than guessed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Attempts [`try_lock`] makes when the lock it was refused is gone by the
/// time it asks who held it.
const LOCK_ATTEMPTS_MAX: usize = 3;
/// A lock whose holder no process shows (see [`try_lock`]) is asked again
/// this many times, this long apart, before it counts as held.
const INVISIBLE_HOLDER_WAITS_MAX: usize = 20;
const INVISIBLE_HOLDER_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Which lock a process holds on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// A writer: no one else may hold any lock.
    Exclusive,
    /// A reader: other readers may, writers may not.
    Shared,
}

/// Who holds a lock that stands in the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// The holder's pid, where `/proc` shows it (see the module comment).
    pub pid: Option<u32>,
    /// The holder's command name (`/proc/PID/comm`), where readable.
    pub command: Option<String>,
    /// The holder's lock.
    pub mode: LockMode,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.pid, &self.command) {
            (Some(pid), Some(command)) => write!(f, "pid {pid} ({command})"),
            (Some(pid), None) => write!(f, "pid {pid}"),
            (None, _) => write!(f, "another process (its pid is not visible to this one)"),
        }
    }
}

/// A device's lock, held until this is dropped.
#[derive(Debug)]
pub struct DeviceLock {
    _file: File,
    pub mode: LockMode,
}

impl DeviceLock {
    /// Takes `mode` on the file `device` is open on (the same inode, even if
    /// its path was replaced meanwhile), through a descriptor of its own.
    /// `Ok(Err(holder))`: someone else holds a conflicting lock.
    pub fn acquire(device: &File, mode: LockMode) -> io::Result<Result<DeviceLock, LockHolder>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(mode == LockMode::Exclusive)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", device.as_raw_fd()))?;
        Ok(match try_lock(&file, mode)? {
            TryLock::Acquired => Ok(DeviceLock { _file: file, mode }),
            TryLock::Held(holder) => Err(holder),
        })
    }
}

/// What [`try_lock`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryLock {
    /// The lock is ours until `file` is closed.
    Acquired,
    /// Someone else holds a conflicting lock; nothing was taken.
    Held(LockHolder),
}

/// Takes `mode` on the whole of `file` without waiting. An exclusive lock
/// needs `file` open for writing, a shared one for reading.
pub fn try_lock(file: &File, mode: LockMode) -> io::Result<TryLock> {
    let l_type = match mode {
        LockMode::Exclusive => libc::F_WRLCK,
        LockMode::Shared => libc::F_RDLCK,
    };
    // A holder can let go between the refusal and the question who it is:
    // then try again, a bounded number of times.
    let mut invisible = 0;
    for _ in 0..LOCK_ATTEMPTS_MAX + INVISIBLE_HOLDER_WAITS_MAX {
        let mut fl = whole_file(l_type);
        // SAFETY: the fd is open and `fl` is a valid struct flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) } == 0 {
            return Ok(TryLock::Acquired);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => {}
            _ => return Err(e),
        }
        // Ask with the same lock type, so only a lock that conflicts with
        // ours is reported.
        if let Some(holder_mode) = get_lock(file, &mut whole_file(l_type))? {
            let holder = find_holder(file, holder_mode)?;
            if holder.pid.is_some() {
                return Ok(TryLock::Held(holder));
            }
            // No process has the file open: most often a child some thread
            // of a process that just let go of the device forked, which
            // holds a copy of its descriptor until it executes (the copy is
            // close-on-exec). Give it a moment before calling it held.
            invisible += 1;
            if invisible > INVISIBLE_HOLDER_WAITS_MAX {
                return Ok(TryLock::Held(holder));
            }
            std::thread::sleep(INVISIBLE_HOLDER_WAIT);
        }
    }
    Ok(TryLock::Held(LockHolder {
        pid: None,
        command: None,
        mode: LockMode::Exclusive,
    }))
}

/// Whether any process (this one included) holds a lock on the device at
/// `path`, and who. `Ok(None)`: nobody does, so no live process is using it
/// through this crate's device layer. Opens `path` read-only for the moment
/// of the question and takes no lock.
pub fn device_lock_holder(path: &Path) -> io::Result<Option<LockHolder>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    // A write lock conflicts with every lock, so any holder is reported.
    let mut query = whole_file(libc::F_WRLCK);
    match get_lock(&file, &mut query)? {
        None => Ok(None),
        Some(mode) => Ok(Some(find_holder(&file, mode)?)),
    }
}

fn whole_file(l_type: libc::c_int) -> libc::flock {
    // SAFETY: struct flock is plain data; all-zero is valid (and l_pid must
    // be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    // Length 0: to the end of the file, however large it grows.
    fl.l_len = 0;
    fl
}

/// `F_OFD_GETLK`: the mode of a lock that conflicts with `query`, if any.
fn get_lock(file: &File, query: &mut libc::flock) -> io::Result<Option<LockMode>> {
    // SAFETY: the fd is open and `query` is a valid struct flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, query as *mut libc::flock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match query.l_type as libc::c_int {
        libc::F_UNLCK => None,
        libc::F_RDLCK => Some(LockMode::Shared),
        _ => Some(LockMode::Exclusive),
    })
}

/// Looks through `/proc/*/fdinfo/*` for a descriptor holding an OFD lock of
/// `mode` on `file`'s inode. Unreadable entries are skipped: they belong to
/// other users or to processes that exited meanwhile.
fn find_holder(file: &File, mode: LockMode) -> io::Result<LockHolder> {
    let meta = file.metadata()?;
    let (major, minor, ino) = (libc::major(meta.dev()), libc::minor(meta.dev()), meta.ino());
    let want = match mode {
        LockMode::Exclusive => "WRITE",
        LockMode::Shared => "READ",
    };
    let mut holder = LockHolder {
        pid: None,
        command: None,
        mode,
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Ok(holder);
    };
    for proc_entry in procs.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd_entry in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd_entry.path()) else {
                continue;
            };
            if info.lines().any(|l| is_our_lock(l, want, major, minor, ino)) {
                holder.pid = Some(pid);
                holder.command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty());
                return Ok(holder);
            }
        }
    }
    Ok(holder)
}

/// Whether an fdinfo line is an OFD lock of type `want` on `major:minor:ino`,
/// e.g. `lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:2162689 0 EOF`. Lines with
/// `->` are waiters, not holders.
fn is_our_lock(line: &str, want: &str, major: u32, minor: u32, ino: u64) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // [index:, OFDLCK, ADVISORY, WRITE, pid, maj:min:ino, start, end]
    if fields.len() < 6 || fields.contains(&"->") || fields[1] != "OFDLCK" || fields[3] != want {
        return false;
    }
    let mut id = fields[5].split(':');
    let (Some(maj), Some(min), Some(i), None) = (id.next(), id.next(), id.next(), id.next()) else {
        return false;
    };
    u32::from_str_radix(maj, 16) == Ok(major) && u32::from_str_radix(min, 16) == Ok(minor) && i.parse() == Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_rw(path: &Path) -> File {
        std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap()
    }

    #[test]
    fn exclusive_locks_conflict_within_one_process_and_name_it() {
        let dir = crate::io::device::tests::scratch_dir();
        let path = dir.path().join("dev");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        assert_eq!(device_lock_holder(&path).unwrap(), None);

        let first = open_rw(&path);
        assert_eq!(try_lock(&first, LockMode::Exclusive).unwrap(), TryLock::Acquired);
        let second = open_rw(&path);
        let TryLock::Held(holder) = try_lock(&second, LockMode::Exclusive).unwrap() else {
            panic!("a second exclusive lock on one file was granted");
        };
        assert_eq!(holder.pid, Some(std::process::id()), "the holder is this process");
        assert_eq!(holder.mode, LockMode::Exclusive);
        assert!(holder.to_string().starts_with(&format!("pid {}", std::process::id())));
        let TryLock::Held(_) = try_lock(&second, LockMode::Shared).unwrap() else {
            panic!("a shared lock was granted beside an exclusive one");
        };
        let found = device_lock_holder(&path).unwrap().expect("a holder");
        assert_eq!(found.pid, Some(std::process::id()));

        drop(first);
        assert_eq!(
            device_lock_holder(&path).unwrap(),
            None,
            "closing the descriptor frees it"
        );
        assert_eq!(try_lock(&second, LockMode::Exclusive).unwrap(), TryLock::Acquired);
    }

    #[test]
    fn shared_locks_share_and_keep_writers_out() {
        let dir = crate::io::device::tests::scratch_dir();
        let path = dir.path().join("dev");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let r1 = File::open(&path).unwrap();
        let r2 = File::open(&path).unwrap();
        assert_eq!(try_lock(&r1, LockMode::Shared).unwrap(), TryLock::Acquired);
        assert_eq!(try_lock(&r2, LockMode::Shared).unwrap(), TryLock::Acquired);
        let w = open_rw(&path);
        let TryLock::Held(holder) = try_lock(&w, LockMode::Exclusive).unwrap() else {
            panic!("a writer got in beside readers");
        };
        assert_eq!(holder.mode, LockMode::Shared);
        assert_eq!(holder.pid, Some(std::process::id()));
    }

    #[test]
    fn fdinfo_lines_are_matched_exactly() {
        let line = "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:2162689 0 EOF";
        assert!(is_our_lock(line, "WRITE", 0xfe, 0, 2162689));
        assert!(!is_our_lock(line, "READ", 0xfe, 0, 2162689));
        assert!(!is_our_lock(line, "WRITE", 0xfe, 0, 2162688));
        assert!(!is_our_lock(line, "WRITE", 0xfe, 1, 2162689));
        let posix = "lock:\t1: POSIX  ADVISORY  WRITE 77 fe:00:2162689 0 EOF";
        assert!(!is_our_lock(posix, "WRITE", 0xfe, 0, 2162689));
        let waiter = "lock:\t1: -> OFDLCK ADVISORY  WRITE -1 fe:00:2162689 0 EOF";
        assert!(!is_our_lock(waiter, "WRITE", 0xfe, 0, 2162689));
        assert!(!is_our_lock("pos:\t0", "WRITE", 0xfe, 0, 2162689));
    }
}
