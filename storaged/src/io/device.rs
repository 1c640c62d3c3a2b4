//! Opening a device: a raw block device or a preallocated regular file.
//!
//! This module owns the checks that happen once, at open: the file type, the
//! `O_DIRECT` (and, for a writer of a block device, `O_EXCL`) open, the
//! device lock ([`super::lock`]: one writer at a time), the usable size, the
//! logical block size, the medium (a tmpfs is RAM), and what the device says
//! about its write cache (which decides what "durable" costs, see
//! docs/architecture.md, "The durability contract"). It does no I/O on the
//! hot path; [`super::uring`] does.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::lock::{DeviceLock, LockHolder, LockMode, TryLock, device_lock_holder, try_lock};
use super::{AlignedBuf, BLOCK_SIZE, Geometry};

/// Smallest file [`create_zero_filled`] makes: below this a device cannot hold
/// a superblock, metadata copies and a useful log.
pub const ZERO_FILL_MIN_BYTES: u64 = 1 << 20;

/// Size of each write while zero-filling: large enough that the fill runs at
/// device bandwidth, small enough to be a modest allocation.
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;

/// Logical block size assumed for a file when the kernel does not report
/// `STATX_DIOALIGN` (before Linux 6.1): every filesystem accepts 512-aligned
/// direct I/O on 512-byte-sector devices, and we only ever issue 4096-aligned I/O.
const FALLBACK_LOGICAL_BLOCK_BYTES: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{path}: no such file or device")]
    NotFound { path: PathBuf },
    #[error("{path}: permission denied (read-write access is needed; run as a user that may open it)")]
    PermissionDenied { path: PathBuf },
    #[error(
        "{path}: device is busy: it is mounted or in use by another process (block devices are opened with O_EXCL); unmount it or stop the other user"
    )]
    Busy { path: PathBuf },
    #[error("device {path} is in use by {holder}: a device has one writer at a time, and no writer while it is read")]
    InUse { path: PathBuf, holder: LockHolder },
    #[error("{path}: not a regular file or block device ({what}); give a file or a /dev/ block device")]
    NotADevice { path: PathBuf, what: String },
    #[error(
        "{path}: the filesystem refuses O_DIRECT (as tmpfs did before Linux 6.6, and some network and FUSE filesystems do); put the file on a disk-backed filesystem such as /var/tmp"
    )]
    DirectIoUnsupported { path: PathBuf },
    #[error("{path}: logical block size {bytes} bytes does not divide {BLOCK_SIZE}; this device cannot be used")]
    UnsupportedBlockSize { path: PathBuf, bytes: u32 },
    #[error("{path}: usable size {size} bytes is smaller than the required {min} bytes")]
    TooSmall { path: PathBuf, size: u64, min: u64 },
    #[error("io_uring is unavailable: {reason}")]
    IoUringUnavailable { reason: String },
    #[error("{path}: {context}: {source}")]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: io::Error,
    },
}

impl DeviceError {
    fn io(path: &Path, context: impl Into<String>, source: io::Error) -> DeviceError {
        DeviceError::Io {
            path: path.to_owned(),
            context: context.into(),
            source,
        }
    }

    /// Maps the errors of `open(2)`/`stat(2)` that have a clear cause to their
    /// variant; everything else keeps the OS error with `context`.
    fn from_open(path: &Path, context: &str, e: io::Error) -> DeviceError {
        let path_buf = path.to_owned();
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => DeviceError::NotFound { path: path_buf },
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                DeviceError::PermissionDenied { path: path_buf }
            }
            Some(libc::EBUSY) => DeviceError::Busy { path: path_buf },
            // open(O_DIRECT) fails with EINVAL where the filesystem has no direct I/O.
            Some(libc::EINVAL) => DeviceError::DirectIoUnsupported { path: path_buf },
            _ => DeviceError::io(path, context, e),
        }
    }
}

/// What to require of a device at open.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Refuse devices whose usable size is below this.
    pub min_size_bytes: u64,
    pub access: Access,
}

/// What the opener will do with the device, which decides its lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Access {
    /// Read-write under an exclusive lock (and `O_EXCL` for a block
    /// device): the open is refused ([`DeviceError::InUse`]) while any other
    /// open holds the device.
    #[default]
    Write,
    /// Read-only, under a shared lock that keeps writers from starting
    /// while it is held. A writer already there does not stop the open:
    /// the device is read as it is, and [`OpenedDevice::in_use_by`] says who
    /// writes it meanwhile.
    Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    BlockDevice,
    RegularFile,
}

/// What the (whole-disk) block device under the data says about its cache,
/// from `/sys/block/<disk>/queue/`. `None` where it could not be found, e.g. a
/// file on a filesystem without a backing block device (overlayfs, NFS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteCacheInfo {
    /// "write back" (volatile cache: durability needs FUA or a flush) or "write through".
    pub write_cache: Option<String>,
    /// Whether the device supports FUA writes (else `RWF_DSYNC` costs a full flush).
    pub fua: Option<bool>,
    /// The sysfs disk the two values were read from, e.g. `vda`.
    pub disk: Option<String>,
}

#[derive(Debug)]
pub struct OpenedDevice {
    pub file: File,
    pub geometry: Geometry,
    pub kind: DeviceKind,
    pub cache: WriteCacheInfo,
    pub path: PathBuf,
    /// With [`Access::Read`]: the writer that held the device at open, if
    /// any (what is read may be changing under the reader).
    pub in_use_by: Option<LockHolder>,
    /// The device's lock (`None` only for a reader that met a writer):
    /// keep it as long as `file` is used.
    pub lock: Option<DeviceLock>,
}

/// Opens `path` for direct I/O, locks it as `opts.access` says, and learns
/// its geometry. The lock lasts as long as the returned file is open.
pub fn open_device(path: &Path, opts: &OpenOptions) -> Result<OpenedDevice, DeviceError> {
    let meta = std::fs::metadata(path).map_err(|e| DeviceError::from_open(path, "stat", e))?;
    let kind = kind_of(path, &meta.file_type())?;
    let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
    if kind == DeviceKind::BlockDevice && opts.access == Access::Write {
        // O_EXCL on a block device fails with EBUSY when it is mounted or
        // opened exclusively elsewhere: two owners of one log would corrupt it.
        flags |= libc::O_EXCL;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(opts.access == Access::Write)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // Busy may be one of ours: then say which process.
            Some(libc::EBUSY) => match device_lock_holder(path) {
                Ok(Some(holder)) => DeviceError::InUse {
                    path: path.to_owned(),
                    holder,
                },
                _ => DeviceError::Busy { path: path.to_owned() },
            },
            _ => DeviceError::from_open(path, "open with O_DIRECT", e),
        })?;
    // Decide from the opened file, not the earlier stat: the path may have changed.
    let meta = file.metadata().map_err(|e| DeviceError::io(path, "fstat", e))?;
    let kind = kind_of(path, &meta.file_type())?;
    let mode = match opts.access {
        Access::Write => LockMode::Exclusive,
        Access::Read => LockMode::Shared,
    };
    let (lock, in_use_by) =
        match DeviceLock::acquire(&file, mode).map_err(|e| DeviceError::io(path, "lock (fcntl F_OFD_SETLK)", e))? {
            Ok(lock) => (Some(lock), None),
            Err(holder) if opts.access == Access::Write => {
                return Err(DeviceError::InUse {
                    path: path.to_owned(),
                    holder,
                });
            }
            Err(holder) => {
                tracing::warn!(path = %path.display(), %holder, "device is in use by a writer; reading it as it is");
                (None, Some(holder))
            }
        };
    if kind == DeviceKind::RegularFile && on_tmpfs(&file) {
        tracing::warn!(
            path = %path.display(),
            "the device is a file on tmpfs: it lives in RAM, and everything on it is lost at reboot or power loss, \
             whatever a write's durability says; use it for tests only"
        );
    }

    let (raw_size, logical_block_bytes, sysfs_dev) = match kind {
        DeviceKind::BlockDevice => (
            block_device_size(&file).map_err(|e| DeviceError::io(path, "ioctl BLKGETSIZE64", e))?,
            block_device_logical_block(&file).map_err(|e| DeviceError::io(path, "ioctl BLKSSZGET", e))?,
            meta.rdev(),
        ),
        DeviceKind::RegularFile => (meta.len(), file_dio_align(&file), meta.dev()),
    };
    check_logical_block_size(path, logical_block_bytes)?;
    let size_bytes = raw_size - raw_size % BLOCK_SIZE as u64;
    if size_bytes < opts.min_size_bytes || size_bytes == 0 {
        return Err(DeviceError::TooSmall {
            path: path.to_owned(),
            size: size_bytes,
            min: opts.min_size_bytes.max(BLOCK_SIZE as u64),
        });
    }
    let cache = write_cache_info(libc::major(sysfs_dev), libc::minor(sysfs_dev));
    tracing::info!(
        path = %path.display(),
        ?kind,
        size_bytes,
        logical_block_bytes,
        disk = cache.disk.as_deref().unwrap_or("unknown"),
        write_cache = cache.write_cache.as_deref().unwrap_or("unknown"),
        fua = ?cache.fua,
        "opened device"
    );
    Ok(OpenedDevice {
        file,
        geometry: Geometry {
            size_bytes,
            logical_block_bytes,
        },
        kind,
        cache,
        path: path.to_owned(),
        in_use_by,
        lock,
    })
}

/// Whether `file` is on a tmpfs (statfs `TMPFS_MAGIC`): RAM, gone at reboot.
fn on_tmpfs(file: &File) -> bool {
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and `st` is a valid out-pointer.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type == libc::TMPFS_MAGIC
}

fn kind_of(path: &Path, ft: &std::fs::FileType) -> Result<DeviceKind, DeviceError> {
    if ft.is_block_device() {
        Ok(DeviceKind::BlockDevice)
    } else if ft.is_file() {
        Ok(DeviceKind::RegularFile)
    } else {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "an unsupported file type"
        };
        Err(DeviceError::NotADevice {
            path: path.to_owned(),
            what: what.to_owned(),
        })
    }
}

// _IOR(0x12, 114, size_t) and _IO(0x12, 104) (which nonetheless writes an int).
nix::ioctl_read!(ioctl_blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(ioctl_blksszget, nix::request_code_none!(0x12, 104), libc::c_int);

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: the fd is open and the ioctl writes one u64 into `size`.
    unsafe { ioctl_blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

fn block_device_logical_block(file: &File) -> io::Result<u32> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: the fd is open and the ioctl writes one int into `bytes`.
    unsafe { ioctl_blksszget(file.as_raw_fd(), &mut bytes) }.map_err(io::Error::from)?;
    u32::try_from(bytes).map_err(|_| io::Error::other(format!("BLKSSZGET returned {bytes}")))
}

/// The offset alignment direct I/O on this file needs (statx `STATX_DIOALIGN`,
/// Linux ≥ 6.1), else [`FALLBACK_LOGICAL_BLOCK_BYTES`].
fn file_dio_align(file: &File) -> u32 {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, the empty path with AT_EMPTY_PATH names it, and
    // `stx` is a valid out-pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        stx.stx_dio_offset_align
    } else {
        FALLBACK_LOGICAL_BLOCK_BYTES
    }
}

/// Finds the whole disk for `major:minor` in sysfs (walking from a partition
/// to its parent) and reads its cache settings. Best effort: missing pieces are `None`.
fn write_cache_info(major: u32, minor: u32) -> WriteCacheInfo {
    let link = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let Ok(mut dir) = std::fs::canonicalize(&link) else {
        return WriteCacheInfo::default();
    };
    // A partition's sysfs directory has a `partition` file and sits inside its disk's.
    if dir.join("partition").exists() {
        if let Some(parent) = dir.parent() {
            dir = parent.to_owned();
        }
    }
    let read = |name: &str| {
        std::fs::read_to_string(dir.join("queue").join(name))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    WriteCacheInfo {
        write_cache: read("write_cache"),
        fua: read("fua").map(|s| s == "1"),
        disk: dir.file_name().map(|n| n.to_string_lossy().into_owned()),
    }
}

/// Every on-disk structure is a whole number of 4 KiB blocks written with
/// O_DIRECT, so the device's logical block must divide 4096.
pub fn check_logical_block_size(path: &Path, bytes: u32) -> Result<(), DeviceError> {
    if bytes == 0 || BLOCK_SIZE as u32 % bytes != 0 {
        return Err(DeviceError::UnsupportedBlockSize {
            path: path.to_owned(),
            bytes,
        });
    }
    Ok(())
}

/// Creates (or overwrites) a regular file of exactly `size_bytes` rounded down
/// to [`BLOCK_SIZE`], filled with zeros by real writes and fsynced, so that the
/// filesystem has allocated and initialised every block: later writes are pure
/// overwrites and a `RWF_DSYNC` write does not also commit extent metadata.
///
/// Takes the device's exclusive lock first: a file some process uses as a
/// device is refused ([`DeviceError::InUse`]), not resized under it. A file
/// this call created is removed again if it fails; one that existed before
/// never is.
pub fn create_zero_filled(path: &Path, size_bytes: u64) -> Result<(), DeviceError> {
    let size_bytes = size_bytes - size_bytes % BLOCK_SIZE as u64;
    if size_bytes < ZERO_FILL_MIN_BYTES {
        return Err(DeviceError::TooSmall {
            path: path.to_owned(),
            size: size_bytes,
            min: ZERO_FILL_MIN_BYTES,
        });
    }
    let existed = match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_file() => {
            kind_of(path, &meta.file_type())?;
            // A block device is a device, but we will not overwrite one here.
            return Err(DeviceError::NotADevice {
                path: path.to_owned(),
                what: "not a regular file; refusing to zero-fill it".to_owned(),
            });
        }
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(DeviceError::from_open(path, "stat", e)),
    };
    // create_new when it did not exist: if it fails, the file is ours to remove.
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create_new(!existed)
        .truncate(false)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path);
    // Some filesystems create the file and only then refuse O_DIRECT
    // (EINVAL); EEXIST means another process created it meanwhile.
    let ours = !existed
        && match &opened {
            Ok(_) => true,
            Err(e) => e.kind() != io::ErrorKind::AlreadyExists,
        };
    let result = match opened {
        Ok(file) => fill_zeros(path, &file, size_bytes),
        Err(e) => Err(DeviceError::from_open(path, "create with O_DIRECT", e)),
    };
    if result.is_err() && ours && std::fs::symlink_metadata(path).is_ok() {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn fill_zeros(path: &Path, file: &File, size_bytes: u64) -> Result<(), DeviceError> {
    match try_lock(file, LockMode::Exclusive).map_err(|e| DeviceError::io(path, "lock (fcntl F_OFD_SETLK)", e))? {
        TryLock::Acquired => {}
        TryLock::Held(holder) => {
            return Err(DeviceError::InUse {
                path: path.to_owned(),
                holder,
            });
        }
    }
    file.set_len(size_bytes)
        .map_err(|e| DeviceError::io(path, "set file length", e))?;
    let chunk = AlignedBuf::zeroed(ZERO_FILL_CHUNK_BYTES);
    let mut offset = 0u64;
    while offset < size_bytes {
        let len = (size_bytes - offset).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..len], offset)
            .map_err(|e| DeviceError::io(path, format!("zero-fill write at offset {offset}"), e))?;
        offset += len as u64;
    }
    file.sync_all()
        .map_err(|e| DeviceError::io(path, "fsync after zero-fill", e))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
