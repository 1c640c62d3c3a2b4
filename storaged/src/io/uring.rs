//! The io_uring implementation of [`BlockIo`], in one of two placements
//! ([`RingPlacement`]):
//!
//! - **`Runtime`** (what `storaged run` uses): the ring lives on the tokio
//!   runtime that opened the device. A caller pushes its SQE and submits it
//!   itself; one task reaps completions when the ring's fd turns readable in
//!   the runtime's epoll. An I/O then costs one `io_uring_enter` and the
//!   kernel's own wake-up of the runtime, where a ring thread costs two more
//!   hand-offs (channel + eventfd to the thread, eventfd back to the
//!   runtime), each a context switch and, on a VM, a VM exit when the other
//!   vCPU sleeps (docs/performance.md, "The node"). No `SINGLE_ISSUER`,
//!   `DEFER_TASKRUN` or `COOP_TASKRUN`: a multi-thread runtime may submit
//!   from any worker, and a waiter in epoll must be woken by the completion
//!   (with `COOP_TASKRUN` the kernel would not wake it).
//! - **`Thread`**: one thread per device owns the ring; async callers talk
//!   to it over a bounded channel and get their buffer back over a oneshot.
//!   It needs no runtime at open and keeps the kernel work of submission off
//!   the caller's thread; with one issuer it can use `SINGLE_ISSUER` +
//!   `DEFER_TASKRUN`. Its loop, and the bounds it keeps:
//!   1. drain the request channel into SQEs while fewer than `max_inflight`
//!      I/Os are in flight — at the bound it stops draining, the channel
//!      (capacity `channel_capacity`) fills and senders wait: that is the
//!      backpressure;
//!   2. one `io_uring_enter` submits the batch and waits for ≥ 1 completion;
//!   3. reap every available CQE and hand each buffer back.
//!
//!   So that the thread never sleeps in step 2 while requests wait in the
//!   channel, it keeps a `POLL_ADD` on an eventfd in the ring, and announces
//!   sleeping with an atomic flag; a sender writes the eventfd only when the
//!   flag is set, so a busy device costs senders no syscall (Dekker-style:
//!   both sides publish, fence, then read the other side's state).
//!
//! In both, a buffer stays with the ring from submission to its CQE, even if
//! the caller stops waiting; at most `max_inflight` I/Os are in the kernel.
//! Short transfers are reported as [`IoError::Short`], not resubmitted: with
//! `O_DIRECT` on a range inside the device they only happen on a device fault.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::Instrument;

use super::device::{DeviceError, DeviceKind, OpenOptions, OpenedDevice, WriteCacheInfo, open_device};
use super::{AlignedBuf, BlockIo, Durability, Geometry, IoClass, IoError, IoOutcome, check_range};

/// Default bound on requests queued towards the device thread.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 1024;
/// Default bound on I/Os submitted to the kernel and not yet completed.
pub const DEFAULT_MAX_INFLIGHT: usize = 128;
/// Default bound on background I/Os ([`IoClass::Background`]) in flight.
/// A foreground write waits behind every I/O queued in the device before
/// it, whatever its priority: on a VM's virtio disk shared with a log,
/// fio's 4 KiB `O_DSYNC` writes took 93 µs at p99 alone, and beside 12 KiB
/// reads and writes 0.6 ms at 4 of each in flight, 1.0 ms at 8, 2.5 ms at
/// 16 and 3.4 ms at 32, while the reads and writes gained nothing past 8
/// (33 000 a second each). Repair issues far more at once than that: past
/// this bound it waits for its own I/Os, not the foreground's.
pub const DEFAULT_BACKGROUND_INFLIGHT: usize = 16;

/// `user_data` of the eventfd poll; I/O slots are indexes far below it.
const WAKE_TOKEN: u64 = u64::MAX;
/// How long dropping a ring waits for I/Os still in the kernel; past it
/// their buffers are leaked rather than freed under the kernel's feet.
const DRAIN_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long a submission is retried after EAGAIN (the kernel short of
/// memory for requests) before the ring is declared failed.
const SUBMIT_AGAIN_MAX: Duration = Duration::from_secs(1);

/// Where the ring is driven from (see the module's documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RingPlacement {
    /// A thread of its own owns the ring. Needs no runtime at open.
    #[default]
    Thread,
    /// On the tokio runtime current at open: callers submit, a task reaps.
    Runtime,
}

impl FromStr for RingPlacement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "thread" => Ok(RingPlacement::Thread),
            "runtime" => Ok(RingPlacement::Runtime),
            other => Err(format!(
                "unknown ring placement {other:?}; expected \"runtime\" or \"thread\""
            )),
        }
    }
}

impl std::fmt::Display for RingPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RingPlacement::Thread => "thread",
            RingPlacement::Runtime => "runtime",
        })
    }
}

#[derive(Debug, Clone)]
pub struct UringConfig {
    pub open: OpenOptions,
    /// Capacity of the device thread's request channel; senders wait when it
    /// is full. (With the ring on the runtime, callers past `max_inflight`
    /// wait for a permit instead.)
    pub channel_capacity: usize,
    /// Most I/Os in flight in the kernel at once.
    pub max_inflight: usize,
    /// Most background I/Os ([`IoClass::Background`]) in flight at once,
    /// counted within `max_inflight`; one of more than 32 KiB counts as one
    /// for each 32 KiB it started.
    pub background_inflight: usize,
    pub placement: RingPlacement,
}

impl Default for UringConfig {
    fn default() -> Self {
        UringConfig {
            open: OpenOptions::default(),
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            background_inflight: DEFAULT_BACKGROUND_INFLIGHT,
            placement: RingPlacement::default(),
        }
    }
}

/// What was opened, for logs and status output.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub path: PathBuf,
    pub kind: DeviceKind,
    pub cache: WriteCacheInfo,
    pub ring_flags: RingFlags,
    pub placement: RingPlacement,
    /// A writer that held the device when a reader opened it (see
    /// [`super::device::Access::Read`]).
    pub in_use_by: Option<super::lock::LockHolder>,
}

/// A device driven by io_uring. Cheap to clone (an `Arc`); when the last
/// clone is dropped every in-flight I/O is completed, then the ring closes.
#[derive(Clone)]
pub struct UringDevice {
    inner: Arc<Inner>,
}

struct Inner {
    driver: Driver,
    /// `background_inflight` permits; a background I/O holds what it costs
    /// ([`background_cost`]) from before it is submitted to its CQE.
    background: Arc<Semaphore>,
    background_max: u32,
    geometry: Geometry,
    info: DeviceInfo,
    /// Held as long as the device (dropped after the driver's handle).
    _lock: Option<super::lock::DeviceLock>,
}

enum Driver {
    Thread(ThreadHandle),
    Runtime(RuntimeHandle),
}

/// The caller's side of a device thread.
struct ThreadHandle {
    /// `Some` until drop; taken first in `Drop` so the thread sees the channel closed.
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<Wake>,
}

impl Drop for ThreadHandle {
    fn drop(&mut self) {
        drop(self.tx.take());
        // Unconditional: the thread may be asleep and must notice the close.
        self.wake.wake();
    }
}

/// The callers' side of a ring on the runtime; dropping it tells the
/// reaper to finish what is in flight and close the ring.
struct RuntimeHandle(Arc<Local>);

impl Drop for RuntimeHandle {
    fn drop(&mut self) {
        self.0.closing.store(true, Ordering::Release);
        self.0.closing_notify.notify_one();
    }
}

/// The device thread's doorbell.
struct Wake {
    sleeping: AtomicBool,
    eventfd: OwnedFd,
}

impl Wake {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own. A
        // failure can only be EAGAIN on counter overflow, when it is already readable.
        unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// Called by a sender after its request is in the channel.
    fn wake_if_sleeping(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            self.wake();
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum IoOp {
    Read(IoClass),
    Write(Durability, IoClass),
}

impl IoOp {
    fn name(self) -> &'static str {
        match self {
            IoOp::Read(_) => "read",
            IoOp::Write(..) => "write",
        }
    }

    /// The SQE's `ioprio`: 0 (the submitter's own, best effort by
    /// default) for the foreground, the idle class for background work.
    fn ioprio(self) -> u16 {
        let (IoOp::Read(class) | IoOp::Write(_, class)) = self;
        match class {
            IoClass::Foreground => 0,
            IoClass::Background => IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        }
    }
}

/// Bytes of a background I/O that count as one more against the bound.
const BACKGROUND_COST_BYTES: usize = 32 << 10;

/// What a background I/O of `len` bytes takes of the bound: one for each
/// [`BACKGROUND_COST_BYTES`] started (at least one, at most the whole
/// bound). A foreground write waits for the bytes queued before it as much
/// as for the I/Os: on a VM's virtio disk a 12 KiB I/O cost about what
/// 30 µs of its 1.5 GB/s does, a 2 MiB one 1.4 ms, and sixteen 2 MiB reads
/// of a donor scanning a segment it knew nothing of (after its restart)
/// put the foreground's p99 at about 7 times its own.
fn background_cost(len: usize, bound: u32) -> u32 {
    u32::try_from(len.div_ceil(BACKGROUND_COST_BYTES))
        .unwrap_or(u32::MAX)
        .clamp(1, bound.max(1))
}

/// `ioprio` classes (linux/ioprio.h); not in `libc`.
const IOPRIO_CLASS_IDLE: u16 = 3;
const IOPRIO_CLASS_SHIFT: u16 = 13;

enum Request {
    Io {
        op: IoOp,
        offset: u64,
        buf: AlignedBuf,
        reply: oneshot::Sender<IoOutcome>,
        /// A background I/O's share of its bound, held until its CQE like
        /// the buffer: a caller that stops waiting does not free it while
        /// the I/O is still in the device.
        background: Option<OwnedSemaphorePermit>,
    },
    Flush {
        reply: oneshot::Sender<Result<(), IoError>>,
    },
}

/// An I/O the kernel owns. With the ring on the runtime it also holds the
/// permit that counts it against `max_inflight`, given back at its CQE.
struct InFlight {
    req: Request,
    _permit: Option<OwnedSemaphorePermit>,
}

fn device_error(path: &Path, context: &str, source: io::Error) -> DeviceError {
    DeviceError::Io {
        path: path.to_owned(),
        context: context.to_owned(),
        source,
    }
}

impl UringDevice {
    pub fn open(path: &Path, config: &UringConfig) -> Result<UringDevice, DeviceError> {
        let opened = open_device(path, &config.open)?;
        UringDevice::from_opened(opened, config)
    }

    /// With [`RingPlacement::Runtime`] this must be called inside the tokio
    /// runtime that will drive the device, built with I/O enabled.
    pub fn from_opened(opened: OpenedDevice, config: &UringConfig) -> Result<UringDevice, DeviceError> {
        let max_inflight = config.max_inflight.max(1);
        let channel_capacity = config.channel_capacity.max(1);
        let OpenedDevice {
            file,
            geometry,
            kind,
            cache,
            path,
            in_use_by,
            lock,
        } = opened;
        let (driver, ring_flags) = match config.placement {
            RingPlacement::Thread => spawn_thread(file, &path, geometry, max_inflight, channel_capacity)?,
            RingPlacement::Runtime => on_runtime(file, &path, geometry, max_inflight)?,
        };
        tracing::info!(
            path = %path.display(),
            placement = %config.placement,
            ?ring_flags,
            max_inflight,
            "io_uring device ready"
        );
        Ok(UringDevice {
            inner: Arc::new(Inner {
                driver,
                background: Arc::new(Semaphore::new(config.background_inflight.clamp(1, max_inflight))),
                background_max: config.background_inflight.clamp(1, max_inflight) as u32,
                geometry,
                info: DeviceInfo {
                    path,
                    kind,
                    cache,
                    ring_flags,
                    placement: config.placement,
                    in_use_by,
                },
                _lock: lock,
            }),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// Hands `req` to the ring, with a permit first if the ring is on the
    /// runtime; gives it back if the device is closed.
    async fn send(&self, req: Request) -> Result<(), Request> {
        match &self.inner.driver {
            Driver::Thread(t) => {
                let Some(tx) = t.tx.as_ref() else {
                    return Err(req);
                };
                tx.send(req).await.map_err(|e| e.0)?;
                t.wake.wake_if_sleeping();
                Ok(())
            }
            Driver::Runtime(RuntimeHandle(local)) => {
                let Ok(permit) = Arc::clone(&local.permits).acquire_owned().await else {
                    return Err(req);
                };
                local.submit(req, permit)
            }
        }
    }

    async fn io(&self, op: IoOp, offset: u64, buf: AlignedBuf) -> IoOutcome {
        let len = buf.len();
        if let Err(e) = check_range(op.name(), offset, len, self.inner.geometry.size_bytes) {
            return (buf, Err(e));
        }
        let background = match op {
            IoOp::Read(IoClass::Background) | IoOp::Write(_, IoClass::Background) => {
                let cost = background_cost(len, self.inner.background_max);
                match Arc::clone(&self.inner.background).acquire_many_owned(cost).await {
                    Ok(permit) => Some(permit),
                    // Never closed; should it be, the device is going.
                    Err(_) => return (buf, Err(IoError::Closed)),
                }
            }
            _ => None,
        };
        let (reply, result) = oneshot::channel();
        let req = Request::Io {
            op,
            offset,
            buf,
            reply,
            background,
        };
        if let Err(req) = self.send(req).await {
            let Request::Io { buf, .. } = req else {
                unreachable!("send gives back the request it was given")
            };
            return (buf, Err(IoError::Closed));
        }
        match result.await {
            Ok(outcome) => outcome,
            // The ring dropped the request without completing it (it hit a
            // fatal ring error and kept the buffer, which the kernel may still
            // own). The trait must hand a buffer back: give a fresh one.
            Err(_) => (AlignedBuf::zeroed(len), Err(IoError::Closed)),
        }
    }
}

impl BlockIo for UringDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    fn read(&self, offset: u64, buf: AlignedBuf) -> impl Future<Output = IoOutcome> + Send {
        self.io(IoOp::Read(IoClass::Foreground), offset, buf)
    }

    fn write(&self, offset: u64, buf: AlignedBuf, durability: Durability) -> impl Future<Output = IoOutcome> + Send {
        self.io(IoOp::Write(durability, IoClass::Foreground), offset, buf)
    }

    async fn flush(&self) -> Result<(), IoError> {
        let (reply, result) = oneshot::channel();
        if self.send(Request::Flush { reply }).await.is_err() {
            return Err(IoError::Closed);
        }
        result.await.unwrap_or(Err(IoError::Closed))
    }

    fn read_background(&self, offset: u64, buf: AlignedBuf) -> impl Future<Output = IoOutcome> + Send {
        self.io(IoOp::Read(IoClass::Background), offset, buf)
    }

    fn write_background(
        &self,
        offset: u64,
        buf: AlignedBuf,
        durability: Durability,
    ) -> impl Future<Output = IoOutcome> + Send {
        self.io(IoOp::Write(durability, IoClass::Background), offset, buf)
    }
}

/// The ring and the I/Os the kernel owns; shared by both placements.
struct RingCore {
    ring: Ring,
    /// Kept open for as long as the ring may use it.
    _file: File,
    size_bytes: u64,
    /// I/Os the kernel owns, indexed by `user_data`: each buffer stays here
    /// until its CQE arrives. `None` is a free slot (listed in `free_slots`).
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    inflight: usize,
    /// The ring failed; nothing more is submitted.
    failed: bool,
    /// Nothing reaps this ring any more (its runtime stopped); nothing more
    /// is submitted.
    orphaned: bool,
    /// The eventfd poll completed in some reap since the thread last asked
    /// ([`RingCore::take_woken`]). Kept here, not returned by one reap: the
    /// EAGAIN/EBUSY retries reap too, and a poll completion they found and
    /// forgot would leave the poll never re-armed and the thread asleep.
    woken: bool,
    /// Test seam: successful `io_uring_enter` calls still to be reported as
    /// EAGAIN, as the kernel does after a partial submit under memory pressure.
    #[cfg(test)]
    again_after_enter: u32,
}

/// Test seam: EAGAINs to inject into the ring of the device opened at a path
/// (see [`RingCore::again_after_enter`]).
#[cfg(test)]
pub(crate) static INJECT_AGAIN: Mutex<Vec<(PathBuf, u32)>> = Mutex::new(Vec::new());

#[cfg(test)]
fn injected_again(path: &Path) -> u32 {
    let mut list = INJECT_AGAIN.lock().unwrap_or_else(|p| p.into_inner());
    match list.iter().position(|(p, _)| p == path) {
        Some(i) => list.swap_remove(i).1,
        None => 0,
    }
}

impl RingCore {
    fn new(ring: Ring, file: File, size_bytes: u64, max_inflight: usize) -> RingCore {
        RingCore {
            ring,
            _file: file,
            size_bytes,
            slots: Vec::with_capacity(max_inflight),
            free_slots: Vec::with_capacity(max_inflight),
            inflight: 0,
            failed: false,
            orphaned: false,
            woken: false,
            #[cfg(test)]
            again_after_enter: 0,
        }
    }

    /// Whether the eventfd poll completed since the last call.
    fn take_woken(&mut self) -> bool {
        std::mem::take(&mut self.woken)
    }

    fn enter(&mut self, want: usize) -> io::Result<usize> {
        let result = self.ring.ring.submit_and_wait(want);
        #[cfg(test)]
        if result.is_ok() && self.again_after_enter > 0 {
            self.again_after_enter -= 1;
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        result
    }

    /// Pushes one SQE, submitting first if the SQ is full (cannot happen
    /// with the ring sized above `max_inflight`, but costs nothing to handle).
    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every pointer in the entries we build stays valid until
            // its CQE: buffers live in `slots`, the eventfd in the thread's `Wake`.
            if unsafe { self.ring.ring.submission().push(entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.ring.submit() {
                tracing::warn!(error = %e, "submit with a full SQ failed; retrying");
            }
        }
    }

    /// Builds `req`'s SQE and pushes it (not yet submitted); a request whose
    /// range is wrong is answered at once.
    fn start(&mut self, req: Request, permit: Option<OwnedSemaphorePermit>) {
        let (entry, req) = match req {
            Request::Io {
                op,
                offset,
                mut buf,
                reply,
                background,
            } => {
                let len = buf.len();
                // Checked again here so no path can submit an out-of-range I/O.
                let len_u32 = u32::try_from(len).ok();
                let checked = check_range(op.name(), offset, len, self.size_bytes);
                let (Ok(()), Some(len_u32)) = (checked, len_u32) else {
                    let err = IoError::OutOfRange {
                        op: op.name(),
                        offset,
                        len,
                        size_bytes: self.size_bytes,
                    };
                    let _ = reply.send((buf, Err(err)));
                    return;
                };
                let entry = match op {
                    IoOp::Read(_) => opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), len_u32)
                        .offset(offset)
                        .ioprio(op.ioprio())
                        .build(),
                    IoOp::Write(durability, _) => {
                        let rw_flags = match durability {
                            Durability::Volatile => 0,
                            Durability::Durable => libc::RWF_DSYNC,
                        };
                        opcode::Write::new(types::Fixed(0), buf.as_ptr(), len_u32)
                            .offset(offset)
                            .rw_flags(rw_flags)
                            .ioprio(op.ioprio())
                            .build()
                    }
                };
                let req = Request::Io {
                    op,
                    offset,
                    buf,
                    reply,
                    background,
                };
                (entry, req)
            }
            Request::Flush { reply } => (
                opcode::Fsync::new(types::Fixed(0))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                Request::Flush { reply },
            ),
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        debug_assert!(self.slots[slot].is_none());
        self.slots[slot] = Some(InFlight { req, _permit: permit });
        self.inflight += 1;
        self.push(&entry.user_data(slot as u64));
    }

    /// Submits what was pushed, waiting for `want` completions. A retry
    /// after EBUSY or EAGAIN reaps first; once that reap found anything the
    /// wait is over (what it found may be all that will ever come, e.g. the
    /// eventfd poll), so the retry only submits.
    fn submit_and_wait(&mut self, mut want: usize) -> io::Result<()> {
        let mut again_since = None;
        loop {
            match self.enter(want) {
                // The kernel stops at an SQE it cannot prepare (that one
                // completes with its error); submit the ones behind it too.
                Ok(_) if self.ring.ring.submission().is_empty() => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The CQ is full: make room, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if self.reap() > 0 {
                        want = 0;
                    }
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::EAGAIN)
                        && again_since.get_or_insert_with(Instant::now).elapsed() < SUBMIT_AGAIN_MAX =>
                {
                    if self.reap() > 0 {
                        want = 0;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(e),
            }
            if want == 0 && self.ring.ring.submission().is_empty() {
                return Ok(());
            }
        }
    }

    /// Waits, at most `max`, for every I/O in flight to complete and hands
    /// each back; what is still in the kernel after that is leaked. For
    /// when nothing else will reap this ring any more.
    fn drain(&mut self, max: Duration) {
        let deadline = Instant::now() + max;
        while self.inflight > 0 && !self.failed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    self.fail(&e);
                    break;
                }
            }
            self.reap();
        }
        if self.inflight > 0 {
            tracing::error!(
                inflight = self.inflight,
                "I/O still in the kernel after {max:?}; its buffers are leaked"
            );
            self.leak_inflight();
        }
    }

    /// Hands back every completed I/O and notes an eventfd poll completion
    /// (for [`RingCore::take_woken`]); returns how many completions it found.
    fn reap(&mut self) -> usize {
        let mut found = 0;
        let mut completions = self.ring.ring.completion();
        completions.sync();
        for cqe in &mut completions {
            found += 1;
            let token = cqe.user_data();
            if token == WAKE_TOKEN {
                self.woken = true;
                continue;
            }
            let Some(in_flight) = usize::try_from(token)
                .ok()
                .and_then(|slot| self.slots.get_mut(slot))
                .and_then(Option::take)
            else {
                tracing::error!(token, "completion for an unknown slot; ignored");
                continue;
            };
            self.free_slots.push(token as usize);
            self.inflight -= 1;
            let res = cqe.result();
            match in_flight.req {
                Request::Io {
                    op,
                    offset,
                    buf,
                    reply,
                    background,
                } => {
                    let len = buf.len();
                    let outcome = if res < 0 {
                        Err(IoError::Os {
                            op: op.name(),
                            offset,
                            len,
                            source: io::Error::from_raw_os_error(-res),
                        })
                    } else if res as usize != len {
                        Err(IoError::Short {
                            op: op.name(),
                            offset,
                            len,
                            done: res as usize,
                        })
                    } else {
                        Ok(())
                    };
                    // The I/O is out of the device: its share of the bound is
                    // free before its caller hears (who may at once ask again).
                    drop(background);
                    // A dropped receiver just means the caller stopped waiting;
                    // the buffer is dropped here, after the kernel is done with it.
                    let _ = reply.send((buf, outcome));
                }
                Request::Flush { reply } => {
                    let outcome = if res < 0 {
                        Err(IoError::Os {
                            op: "flush",
                            offset: 0,
                            len: 0,
                            source: io::Error::from_raw_os_error(-res),
                        })
                    } else {
                        Ok(())
                    };
                    let _ = reply.send(outcome);
                }
            }
        }
        found
    }

    /// The ring itself failed. In-flight buffers may still be written by the
    /// kernel, so they are leaked rather than freed; their callers see `Closed`.
    fn fail(&mut self, e: &io::Error) {
        tracing::error!(error = %e, inflight = self.inflight, "io_uring submit failed; device stops");
        self.failed = true;
        self.leak_inflight();
    }

    fn leak_inflight(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(in_flight) = slot.take() {
                match in_flight.req {
                    Request::Io { buf, .. } => std::mem::forget(buf),
                    Request::Flush { .. } => {}
                }
            }
        }
        self.free_slots.clear();
        self.slots.clear();
        self.inflight = 0;
    }
}

impl Drop for RingCore {
    /// Normally nothing is in flight here (both drivers drain first); if
    /// something is, wait for it so the kernel never writes into freed
    /// memory — or leak it past a bound.
    fn drop(&mut self) {
        self.drain(DRAIN_WAIT_MAX);
    }
}

fn spawn_thread(
    file: File,
    path: &Path,
    geometry: Geometry,
    max_inflight: usize,
    channel_capacity: usize,
) -> Result<(Driver, RingFlags), DeviceError> {
    // Non-blocking: the thread reads it only after its poll completed, but a
    // read must never be able to put the thread to sleep outside the ring.
    // SAFETY: plain syscall; the result is checked below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(device_error(path, "create eventfd", io::Error::last_os_error()));
    }
    // SAFETY: efd is a fresh fd that nothing else owns.
    let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
    let wake = Arc::new(Wake {
        sleeping: AtomicBool::new(false),
        eventfd,
    });
    let (tx, rx) = mpsc::channel(channel_capacity);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread_wake = Arc::clone(&wake);
    let thread_path = path.to_owned();
    let name = format!(
        "uring-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    );
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            // The ring is created here: SINGLE_ISSUER ties it to this thread.
            let entries = (max_inflight + 1).next_power_of_two() as u32;
            let ring = match Ring::new(entries) {
                Ok(ring) => ring,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            if let Err(e) = ring.register_files(&[file.as_raw_fd()]) {
                let _ = ready_tx.send(Err(device_error(&thread_path, "register the file with io_uring", e)));
                return;
            }
            let _ = ready_tx.send(Ok(ring.flags));
            let span = tracing::info_span!("uring_device", path = %thread_path.display());
            let _enter = span.enter();
            #[allow(unused_mut)]
            let mut core = RingCore::new(ring, file, geometry.size_bytes, max_inflight);
            #[cfg(test)]
            {
                core.again_after_enter = injected_again(&thread_path);
            }
            DeviceThread {
                core,
                rx,
                wake: thread_wake,
                max_inflight,
                poll_armed: false,
            }
            .run();
        })
        .map_err(|e| device_error(path, "spawn the device thread", e))?;
    let ring_flags = match ready_rx.recv() {
        Ok(Ok(flags)) => flags,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(device_error(
                path,
                "device thread exited during setup",
                io::Error::other("device thread gone"),
            ));
        }
    };
    Ok((Driver::Thread(ThreadHandle { tx: Some(tx), wake }), ring_flags))
}

struct DeviceThread {
    core: RingCore,
    rx: mpsc::Receiver<Request>,
    wake: Arc<Wake>,
    max_inflight: usize,
    /// Whether the eventfd `POLL_ADD` is in the ring.
    poll_armed: bool,
}

impl DeviceThread {
    fn run(mut self) {
        let mut closed = false;
        loop {
            while !closed && self.core.inflight < self.max_inflight {
                match self.rx.try_recv() {
                    Ok(req) => self.core.start(req, None),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            if closed && self.core.inflight == 0 {
                tracing::debug!("device closed; no I/O in flight; thread exits");
                return;
            }
            let mut wait_for = 1;
            if !closed && self.core.inflight < self.max_inflight {
                if !self.poll_armed {
                    let entry = opcode::PollAdd::new(types::Fd(self.wake.eventfd.as_raw_fd()), libc::POLLIN as u32)
                        .build()
                        .user_data(WAKE_TOKEN);
                    self.core.push(&entry);
                    self.poll_armed = true;
                }
                self.wake.sleeping.store(true, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                if !self.rx.is_empty() {
                    // Raced with a sender: submit what we have, do not sleep.
                    wait_for = 0;
                }
            }
            let submitted = self.core.submit_and_wait(wait_for);
            self.wake.sleeping.store(false, Ordering::Relaxed);
            if let Err(e) = submitted {
                self.fail(e);
                return;
            }
            self.core.reap();
            if self.core.take_woken() {
                self.poll_armed = false;
                drain_eventfd(&self.wake.eventfd);
            }
        }
    }

    /// The ring failed: waiting callers see `Closed`, queued requests get
    /// their buffers back with `Closed`.
    fn fail(mut self, e: io::Error) {
        self.core.fail(&e);
        self.rx.close();
        while let Ok(req) = self.rx.try_recv() {
            match req {
                Request::Io { buf, reply, .. } => {
                    let _ = reply.send((buf, Err(IoError::Closed)));
                }
                Request::Flush { reply } => {
                    let _ = reply.send(Err(IoError::Closed));
                }
            }
        }
    }
}

fn drain_eventfd(eventfd: &OwnedFd) {
    let mut value: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64. The fd is non-blocking: an
    // empty counter (EAGAIN) is fine, the poll is re-armed either way.
    unsafe {
        libc::read(
            eventfd.as_raw_fd(),
            (&mut value as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        );
    }
}

/// The ring's fd as the runtime's reactor sees it (the ring owns the fd).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A ring on the runtime. Field order is drop order: the fd leaves the
/// reactor before the ring closes it.
struct Local {
    fd: AsyncFd<RingFd>,
    /// A std mutex, held only to push, submit and reap, never across an await.
    core: Mutex<RingCore>,
    /// `max_inflight` permits; an I/O holds one from submission to its CQE.
    permits: Arc<Semaphore>,
    closing: AtomicBool,
    closing_notify: Notify,
}

impl Local {
    fn lock(&self) -> MutexGuard<'_, RingCore> {
        // A panic under the lock cannot leave the core half-updated in a way
        // that matters more than stopping would; keep serving.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes and submits `req`, then hands back whatever has completed
    /// meanwhile (often a read served from cache, or an earlier write), so a
    /// waiter need not go through the reactor.
    fn submit(&self, req: Request, permit: OwnedSemaphorePermit) -> Result<(), Request> {
        let mut core = self.lock();
        if core.failed || core.orphaned {
            return Err(req);
        }
        core.start(req, Some(permit));
        if let Err(e) = core.submit_and_wait(0) {
            core.fail(&e);
            self.permits.close();
            self.closing_notify.notify_one();
            return Ok(());
        }
        core.reap();
        Ok(())
    }
}

fn on_runtime(
    file: File,
    path: &Path,
    geometry: Geometry,
    max_inflight: usize,
) -> Result<(Driver, RingFlags), DeviceError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        device_error(
            path,
            "put the ring on the runtime",
            io::Error::other("not inside a tokio runtime (open it from one, or use the thread placement)"),
        )
    })?;
    let entries = (max_inflight + 1).next_power_of_two() as u32;
    // Plain flags only (see the module's documentation).
    let ring = Ring::with_attempts(entries, &[RingFlags::default()])?;
    ring.register_files(&[file.as_raw_fd()])
        .map_err(|e| device_error(path, "register the file with io_uring", e))?;
    let flags = ring.flags;
    let fd = {
        let _guard = handle.enter();
        // SAFETY: the ring owns the fd and is dropped only with `Local`,
        // whose `fd` field (this AsyncFd) is dropped before its `core`.
        unsafe { AsyncFd::register_with_interest(RingFd(ring.ring.as_raw_fd()), Interest::READABLE) }
            .map_err(|e| device_error(path, "register the ring with the runtime's reactor", e.into_parts().1))?
    };
    #[allow(unused_mut)]
    let mut core = RingCore::new(ring, file, geometry.size_bytes, max_inflight);
    #[cfg(test)]
    {
        core.again_after_enter = injected_again(path);
    }
    let local = Arc::new(Local {
        fd,
        core: Mutex::new(core),
        permits: Arc::new(Semaphore::new(max_inflight)),
        closing: AtomicBool::new(false),
        closing_notify: Notify::new(),
    });
    let span = tracing::info_span!("uring_device", path = %path.display());
    handle.spawn(reap(Reaper(Arc::clone(&local))).instrument(span));
    Ok((Driver::Runtime(RuntimeHandle(local)), flags))
}

/// The reaper task's hold on the ring. However the task ends — the device
/// closed, or its runtime stopped or dropped it — nothing reaps the ring
/// after it: what is in flight is waited for here and handed back, and the
/// device refuses new I/O (`Closed`) instead of letting callers wait forever.
struct Reaper(Arc<Local>);

impl Drop for Reaper {
    fn drop(&mut self) {
        let local = &self.0;
        local.permits.close();
        let mut core = local.lock();
        core.orphaned = true;
        core.drain(DRAIN_WAIT_MAX);
    }
}

/// The ring's reaper: hands back completions whenever the ring's fd turns
/// readable; once the device is dropped, exits when nothing is in flight.
async fn reap(reaper: Reaper) {
    let local = &reaper.0;
    loop {
        {
            let core = local.lock();
            if local.closing.load(Ordering::Acquire) && (core.inflight == 0 || core.failed) {
                break;
            }
        }
        tokio::select! {
            ready = local.fd.readable() => match ready {
                Ok(mut guard) => {
                    local.lock().reap();
                    // Cleared after the reap: a CQE posted since raises a new
                    // edge, which the reactor records after this.
                    guard.clear_ready();
                }
                Err(e) => {
                    // Only when the reactor is going away; the guard drains.
                    tracing::warn!(error = %e, "the runtime's reactor failed; the device closes");
                    break;
                }
            },
            () = local.closing_notify.notified() => {}
        }
    }
    tracing::debug!("device closed; no I/O in flight; reaper exits");
}

mod ring;
pub use ring::{Ring, RingFlags};

#[cfg(test)]
mod tests;
