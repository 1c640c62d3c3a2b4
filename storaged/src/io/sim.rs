//! The simulated, fault-injecting implementation of [`BlockIo`]: a seeded,
//! in-memory disk with a volatile write cache, for the log engine's
//! crash-consistency tests and the deterministic cluster simulator.
//!
//! One sans-IO state machine (`machine`) holds everything; two thin shells drive
//! it: the [`BlockIo`] futures (a `tokio::time::sleep` of the I/O's seeded
//! latency, then completion) and a synchronous step API for a simulator
//! without tokio ([`SimDisk::submit_write`], [`SimDisk::next_completion`], ...).
//!
//! # Determinism
//! All randomness comes from one `fastrand::Rng` seeded by [`SimDisk::new`],
//! drawn at submission (latency, EIO, misdirection, bit flips) and at
//! [`SimDisk::crash`] (fates of pending writes). Same seed and same sequence
//! of calls give the same results bit for bit. With the async API the sequence
//! of calls includes the order in which tokio completes sleeps: use a
//! current-thread runtime with paused time (`#[tokio::test(start_paused = true)]`),
//! where that order is deterministic and the latencies cost no wall time.
//!
//! # Fault model
//! The device has two images: *visible*, what reads return (every completed
//! write applied in completion order), and *durable*, what survives power loss.
//! A write is *pending* while it is in flight (issued, not completed) or after
//! it completed with [`Durability::Volatile`] until a flush covers it.
//!
//! - A write completed with [`Durability::Durable`] is in durable when it completes.
//! - A `Volatile` write is in visible when it completes and in durable when a
//!   flush *issued after it completed* completes. A flush does not cover
//!   writes that complete while it is in flight.
//! - **Crash** ([`SimDisk::crash`]): each pending write lands on the medium
//!   block by block; every 4 KiB block independently is lost (probability
//!   `crash_lose`), torn (`crash_tear`: a strict, non-empty prefix of its
//!   512-byte sectors lands, the rest of the block keeps its old bytes) or
//!   lands whole (the rest). A sector is atomic. Completed-volatile writes land
//!   in completion order; writes still in flight land after them in a seeded
//!   order. A pending write never lands over a sector whose durable bytes come
//!   from a write that completed after it (the device cache held the newer
//!   bytes), but a write in flight at the crash may land over anything in its
//!   range. Then visible := durable, and every I/O issued before the crash
//!   completes with [`IoError::Closed`] without touching either image (a
//!   generation counter tells them apart). The device is usable at once ("reboot").
//! - Hence the **guarantee** the log engine's proof relies on: a write that
//!   completed `Ok` with `Durable`, or completed `Ok` before a flush was issued
//!   that then completed `Ok`, survives any number of crashes intact, unless
//!   the caller itself wrote the same sectors again later (a write that is
//!   in flight at the crash or completed after it) or an at-rest fault hit it:
//!   [`SimDisk::flip_bit`], [`SimDisk::write_raw`], or a misdirected write
//!   landing on it. Nothing else is promised: a pending write may be lost,
//!   land whole, or land torn, in any mix across its blocks.
//! - **EIO** (`read_eio`, `write_eio`): the I/O fails with [`IoError::Os`]
//!   (`EIO`). A failed read leaves the buffer as it was; a failed write changes
//!   neither image, not even at a crash.
//! - **Misdirection** (`misdirect`): the write reports success but its bytes go
//!   to another block-aligned offset inside the device, chosen by the seed,
//!   with the durability it asked for. The target does not overlap the
//!   intended range (which keeps its old bytes) unless the device is too small
//!   for that; a write that spans the whole device cannot be misdirected.
//! - **Bit flips**: `bit_flip_read` flips one bit of a read's returned buffer
//!   (transient, the medium is intact); [`SimDisk::flip_bit`] flips one bit of
//!   both images at rest (permanent).
//! - **Latency and reordering**: each I/O takes a seeded latency in
//!   `[latency_min, latency_max]`, so completions arrive out of issue order. A
//!   read returns visible as it is when the read completes.
//! - Requests that are unaligned or outside the device complete with
//!   [`IoError::OutOfRange`] (via [`check_range`](super::check_range)) and draw no randomness.
//!
//! A future of the async API that is dropped before it completes completes its
//! I/O at the drop (as a real device finishes an I/O nobody waits for).

mod machine;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use self::machine::{Core, Owner};
use super::{AlignedBuf, BlockIo, Durability, Geometry, IoError, IoOutcome};

/// Fault probabilities (each in `[0, 1]`, all 0 by default) and latency range.
#[derive(Debug, Clone, PartialEq)]
pub struct SimFaults {
    /// Shortest simulated I/O latency.
    pub latency_min: Duration,
    /// Longest simulated I/O latency. tokio's timer has 1 ms resolution, so a
    /// range spanning several ms gives the async API more reordering.
    pub latency_max: Duration,
    /// A read fails with EIO.
    pub read_eio: f64,
    /// A write fails with EIO and changes nothing.
    pub write_eio: f64,
    /// A write reports success but lands at another block-aligned offset.
    pub misdirect: f64,
    /// A read returns its data with one bit flipped (the medium is intact).
    pub bit_flip_read: f64,
    /// At a crash, a block of a pending write is lost.
    pub crash_lose: f64,
    /// At a crash, a block of a pending write lands torn (a sector prefix).
    /// `crash_lose + crash_tear <= 1`; the remaining blocks land whole.
    pub crash_tear: f64,
}

impl Default for SimFaults {
    fn default() -> SimFaults {
        SimFaults {
            latency_min: Duration::from_micros(20),
            latency_max: Duration::from_millis(3),
            read_eio: 0.0,
            write_eio: 0.0,
            misdirect: 0.0,
            bit_flip_read: 0.0,
            crash_lose: 0.0,
            crash_tear: 0.0,
        }
    }
}

impl SimFaults {
    /// No faults at all; a crash lands every pending write whole.
    pub fn none() -> SimFaults {
        SimFaults::default()
    }

    /// A crash loses a third of pending blocks, tears a third and lands a third
    /// whole; no other faults. The usual setting for crash-consistency tests.
    pub fn crashy() -> SimFaults {
        SimFaults {
            crash_lose: 1.0 / 3.0,
            crash_tear: 1.0 / 3.0,
            ..SimFaults::default()
        }
    }

    /// # Panics
    /// On a probability outside `[0, 1]` or `latency_min > latency_max`: a
    /// test's configuration error.
    fn validate(&self) {
        let probabilities = [
            ("read_eio", self.read_eio),
            ("write_eio", self.write_eio),
            ("misdirect", self.misdirect),
            ("bit_flip_read", self.bit_flip_read),
            ("crash_lose", self.crash_lose),
            ("crash_tear", self.crash_tear),
            ("crash_lose + crash_tear", self.crash_lose + self.crash_tear),
        ];
        for (name, p) in probabilities {
            assert!((0.0..=1.0).contains(&p), "SimFaults::{name} = {p} is not in [0, 1]");
        }
        assert!(
            self.latency_min <= self.latency_max,
            "SimFaults: latency_min {:?} > latency_max {:?}",
            self.latency_min,
            self.latency_max
        );
    }
}

/// Counts of I/Os and of the faults injected. Faults of an I/O are counted
/// when decided, at submission, even if a crash then cuts the I/O short.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub read_eio: u64,
    pub write_eio: u64,
    pub misdirected: u64,
    pub read_bit_flips: u64,
    pub bits_flipped_at_rest: u64,
    pub crashes: u64,
    /// Blocks of pending writes that a crash lost, tore, or landed whole.
    pub crash_blocks_lost: u64,
    pub crash_blocks_torn: u64,
    pub crash_blocks_whole: u64,
}

/// Identifies an I/O of the step API. Unique for the life of a [`SimDisk`],
/// across crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoId(u64);

/// The result of one I/O of the step API.
#[derive(Debug)]
pub enum Completion {
    Read(IoOutcome),
    Write(IoOutcome),
    Flush(Result<(), IoError>),
}

impl Completion {
    /// The error, if the I/O failed.
    pub fn error(&self) -> Option<&IoError> {
        match self {
            Completion::Read((_, result)) | Completion::Write((_, result)) => result.as_ref().err(),
            Completion::Flush(result) => result.as_ref().err(),
        }
    }
}

/// A simulated disk; a cheap handle, clones share the device.
#[derive(Clone)]
pub struct SimDisk {
    core: Arc<Mutex<Core>>,
    geometry: Geometry,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDisk")
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

impl SimDisk {
    /// A zeroed disk of `size_bytes` rounded down to whole blocks, with 512-byte
    /// logical blocks.
    ///
    /// # Panics
    /// If the size is under one block or `faults` is invalid (see [`SimFaults`]).
    pub fn new(size_bytes: u64, seed: u64, faults: SimFaults) -> SimDisk {
        let core = Core::new(size_bytes, seed, faults);
        let geometry = core.geometry();
        SimDisk {
            core: Arc::new(Mutex::new(core)),
            geometry,
        }
    }

    /// The lock is never held across an await; a panic while holding it is a
    /// test failure already, so a poisoned lock is used as is.
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the fault configuration from the next submission on.
    pub fn set_faults(&self, faults: SimFaults) {
        self.core().set_faults(faults);
    }

    // ---- step API: for a simulator that drives time itself ----

    pub fn submit_read(&self, offset: u64, buf: AlignedBuf) -> IoId {
        self.core().submit_read(offset, buf, Owner::Step).0
    }

    pub fn submit_write(&self, offset: u64, buf: AlignedBuf, durability: Durability) -> IoId {
        self.core().submit_write(offset, buf, durability, Owner::Step).0
    }

    pub fn submit_flush(&self) -> IoId {
        self.core().submit_flush(Owner::Step).0
    }

    /// Completes the step I/O due first (I/Os cut short by a crash first, with
    /// `Closed`) and advances the step clock to its due time; `None` when no
    /// step I/O is outstanding. Seeded latencies make the order differ from
    /// the issue order.
    pub fn next_completion(&self) -> Option<(IoId, Completion)> {
        self.core().next_step_completion()
    }

    /// The step I/O [`SimDisk::next_completion`] would complete, and when (on
    /// the step clock), so a simulator can merge disk and network events.
    pub fn peek_next_completion(&self) -> Option<(IoId, Duration)> {
        self.core().peek_step()
    }

    /// Completes step I/O `id` now, whatever its due time: lets a simulator
    /// pick the order itself. `None` if it is unknown or already completed.
    pub fn complete(&self, id: IoId) -> Option<Completion> {
        self.core().complete(id, Owner::Step)
    }

    /// The step API's virtual clock: the due time of the last step completion.
    pub fn now(&self) -> Duration {
        self.core().now()
    }

    // ---- power and inspection ----

    /// Power loss and reboot; see the module documentation.
    pub fn crash(&self) {
        self.core().crash();
    }

    /// The number of crashes so far: the device's generation.
    pub fn epoch(&self) -> u64 {
        self.core().epoch()
    }

    /// `len` bytes of the medium (the durable image) at any offset.
    ///
    /// # Panics
    /// Outside the device (test helpers panic on misuse).
    pub fn read_raw(&self, offset: u64, len: usize) -> Vec<u8> {
        self.core().read_raw(offset, len)
    }

    /// `len` bytes of the visible image: what a read would return now.
    pub fn read_visible(&self, offset: u64, len: usize) -> Vec<u8> {
        self.core().read_visible(offset, len)
    }

    /// Writes both images directly, at any offset, durable and fault-free.
    pub fn write_raw(&self, offset: u64, bytes: &[u8]) {
        self.core().write_raw(offset, bytes);
    }

    /// Flips bit `bit` (0..8) of byte `offset_bytes` in both images: corruption at rest.
    pub fn flip_bit(&self, offset_bytes: u64, bit: u8) {
        self.core().flip_bit(offset_bytes, bit);
    }

    /// Writes in flight plus completed-volatile writes not yet covered by a
    /// completed flush: what a crash may lose or tear.
    pub fn pending_writes(&self) -> usize {
        self.core().pending_writes()
    }

    /// I/Os of either API issued and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.core().in_flight()
    }

    pub fn stats(&self) -> SimStats {
        self.core().stats()
    }
}

/// An I/O of the async API: completes it when awaited to the end, or at drop.
struct AsyncIo {
    disk: SimDisk,
    id: Option<IoId>,
}

impl AsyncIo {
    async fn run(mut self, latency: Duration) -> Completion {
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let id = self.id.take().expect("an async I/O completes once");
        self.disk
            .core()
            .complete(id, Owner::Async)
            .expect("only its future completes an async I/O")
    }
}

impl Drop for AsyncIo {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            // The caller gave up waiting; the device still finishes the I/O.
            drop(self.disk.core().complete(id, Owner::Async));
        }
    }
}

fn into_outcome(completion: Completion) -> IoOutcome {
    match completion {
        Completion::Read(outcome) | Completion::Write(outcome) => outcome,
        Completion::Flush(_) => unreachable!("a read or write completes as a read or write"),
    }
}

impl BlockIo for SimDisk {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Issued at the call, not at the first poll, like a real submission.
    fn read(&self, offset: u64, buf: AlignedBuf) -> impl Future<Output = IoOutcome> + Send {
        let (id, latency) = self.core().submit_read(offset, buf, Owner::Async);
        let io = AsyncIo {
            disk: self.clone(),
            id: Some(id),
        };
        async move { into_outcome(io.run(latency).await) }
    }

    fn write(&self, offset: u64, buf: AlignedBuf, durability: Durability) -> impl Future<Output = IoOutcome> + Send {
        let (id, latency) = self.core().submit_write(offset, buf, durability, Owner::Async);
        let io = AsyncIo {
            disk: self.clone(),
            id: Some(id),
        };
        async move { into_outcome(io.run(latency).await) }
    }

    fn flush(&self) -> impl Future<Output = Result<(), IoError>> + Send {
        let (id, latency) = self.core().submit_flush(Owner::Async);
        let io = AsyncIo {
            disk: self.clone(),
            id: Some(id),
        };
        async move {
            match io.run(latency).await {
                Completion::Flush(result) => result,
                Completion::Read(_) | Completion::Write(_) => {
                    unreachable!("a flush completes as a flush")
                }
            }
        }
    }
}
