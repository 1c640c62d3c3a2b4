//! Block I/O: the one seam between the storage engine and a device.
//!
//! The engine is generic over [`BlockIo`]. Two implementations exist:
//! - [`uring::UringDevice`]: a raw block device or preallocated file opened with
//!   `O_DIRECT`, driven by one thread that owns an io_uring;
//! - [`sim::SimDisk`]: a seeded, in-memory device that injects the faults a real
//!   medium shows (latency, reordering, EIO, torn, lost, misdirected writes, bit flips).
//!
//! Buffers are owned ([`AlignedBuf`]) and move into the device for the whole
//! life of an I/O and come back with its result, so a buffer can never be
//! reused or freed while the kernel may still touch it — even if the caller's
//! future is dropped, the device keeps the buffer until the completion arrives.

pub mod buf;
pub mod device;
pub mod lock;
pub mod sim;
pub mod uring;

pub use buf::AlignedBuf;

use std::future::Future;

/// The unit of I/O, of alignment and of the log: every on-disk structure is a
/// whole number of these.
pub const BLOCK_SIZE: usize = 4096;

/// What a device is: how big, and its smallest addressable unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Usable size in bytes, rounded down to a multiple of [`BLOCK_SIZE`].
    pub size_bytes: u64,
    /// Logical block size the device reports (`BLKSSZGET` / statx `dio_offset_align`).
    /// Always divides [`BLOCK_SIZE`]; devices where it does not are refused at open.
    pub logical_block_bytes: u32,
}

/// When a write may be reported complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Complete when the device has the bytes, possibly only in a volatile
    /// cache. Durable only after a later successful [`BlockIo::flush`].
    Volatile,
    /// Complete only when the bytes are on stable media (`RWF_DSYNC`, which the
    /// kernel turns into FUA or a write followed by a cache flush).
    Durable,
}

/// Whose I/O it is. Background work (a donor's reads of page versions, a
/// hydration's reads and writes) is bounded in flight by the device, and
/// submitted at the idle I/O priority class (`IOPRIO_CLASS_IDLE`). The
/// bound is what keeps the foreground fast: an I/O waits behind whatever
/// the device already has, whatever its class. The class adds that an I/O
/// scheduler which honours it (mq-deadline, BFQ) dispatches background I/O
/// after any foreground I/O waiting beside it; with no scheduler (`none`,
/// usual for NVMe) it changes nothing. mq-deadline still serves an idle
/// request that waited `prio_aging_expire` (10 s by default), so a busy
/// foreground slows repair but cannot stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoClass {
    Foreground,
    Background,
}

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{op} of {len} bytes at offset {offset} failed: {source}")]
    Os {
        op: &'static str,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("short {op} at offset {offset}: {done} of {len} bytes")]
    Short {
        op: &'static str,
        offset: u64,
        len: usize,
        done: usize,
    },
    #[error(
        "{op} at offset {offset} of {len} bytes is outside the device ({size_bytes} bytes) or not {BLOCK_SIZE}-aligned"
    )]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: usize,
        size_bytes: u64,
    },
    #[error("the device is closed")]
    Closed,
}

/// An I/O's buffer handed back with its result.
pub type IoOutcome = (AlignedBuf, Result<(), IoError>);

/// A block device as the engine sees it.
///
/// Offsets and lengths are multiples of [`BLOCK_SIZE`]; a violation is an
/// [`IoError::OutOfRange`], never a panic. Completions of concurrent calls may
/// arrive in any order; callers that need order (the log's durable mark) build
/// it themselves.
pub trait BlockIo: Send + Sync + 'static {
    fn geometry(&self) -> Geometry;

    /// Read `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: u64, buf: AlignedBuf) -> impl Future<Output = IoOutcome> + Send;

    /// Write all of `buf` (its `len()`) at `offset`.
    fn write(&self, offset: u64, buf: AlignedBuf, durability: Durability) -> impl Future<Output = IoOutcome> + Send;

    /// Make every write that completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), IoError>> + Send;

    /// [`BlockIo::read`] as [`IoClass::Background`] work; a device that has
    /// no priorities reads as it always does.
    fn read_background(&self, offset: u64, buf: AlignedBuf) -> impl Future<Output = IoOutcome> + Send {
        self.read(offset, buf)
    }

    /// [`BlockIo::write`] as [`IoClass::Background`] work.
    fn write_background(
        &self,
        offset: u64,
        buf: AlignedBuf,
        durability: Durability,
    ) -> impl Future<Output = IoOutcome> + Send {
        self.write(offset, buf, durability)
    }
}

/// Checks an I/O's shape against a device size; shared by every implementation
/// so all of them refuse the same requests the same way.
pub fn check_range(op: &'static str, offset: u64, len: usize, size_bytes: u64) -> Result<(), IoError> {
    let aligned = offset % BLOCK_SIZE as u64 == 0 && len % BLOCK_SIZE == 0 && len > 0;
    let inside = offset.checked_add(len as u64).is_some_and(|end| end <= size_bytes);
    if aligned && inside {
        Ok(())
    } else {
        Err(IoError::OutOfRange {
            op,
            offset,
            len,
            size_bytes,
        })
    }
}
