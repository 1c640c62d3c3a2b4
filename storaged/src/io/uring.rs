//! The io_uring implementation of [`BlockIo`]: one thread per device owns the
//! ring; async callers talk to it over a bounded channel and get their buffer
//! back over a oneshot.
//!
//! Why a dedicated thread: `SINGLE_ISSUER` + `DEFER_TASKRUN` (the cheapest
//! completion path) require that one task submits and reaps; and keeping the
//! ring off the tokio workers means no runtime thread ever blocks in the kernel.
//!
//! The thread's loop, and the bounds it keeps:
//! 1. drain the request channel into SQEs while fewer than `max_inflight` I/Os
//!    are in flight — at the bound it stops draining, the channel (capacity
//!    `channel_capacity`) fills and senders wait: that is the backpressure;
//! 2. one `io_uring_enter` submits the batch and waits for ≥ 1 completion;
//! 3. reap every available CQE and hand each buffer back.
//!
//! So that the thread never sleeps in step 2 while requests wait in the
//! channel, it keeps a `POLL_ADD` on an eventfd in the ring, and announces
//! sleeping with an atomic flag; a sender writes the eventfd only when the
//! flag is set, so a busy device costs senders no syscall (Dekker-style: both
//! sides publish, fence, then read the other side's state).
//!
//! Short transfers are reported as [`IoError::Short`], not resubmitted: with
//! `O_DIRECT` on a range inside the device they only happen on a device fault.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};

use io_uring::{opcode, squeue, types};
use tokio::sync::{mpsc, oneshot};

use super::device::{DeviceError, DeviceKind, OpenOptions, OpenedDevice, WriteCacheInfo, open_device};
use super::{AlignedBuf, BlockIo, Durability, Geometry, IoError, IoOutcome, check_range};

/// Default bound on requests queued towards the device thread.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 1024;
/// Default bound on I/Os submitted to the kernel and not yet completed.
pub const DEFAULT_MAX_INFLIGHT: usize = 128;

/// `user_data` of the eventfd poll; I/O slots are indexes far below it.
const WAKE_TOKEN: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub struct UringConfig {
    pub open: OpenOptions,
    /// Capacity of the request channel; senders wait when it is full.
    pub channel_capacity: usize,
    /// Most I/Os in flight in the kernel at once.
    pub max_inflight: usize,
}

impl Default for UringConfig {
    fn default() -> Self {
        UringConfig {
            open: OpenOptions::default(),
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            max_inflight: DEFAULT_MAX_INFLIGHT,
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
}

/// A device driven by io_uring. Cheap to clone (an `Arc`); when the last
/// clone is dropped the device thread completes every in-flight I/O, then exits.
#[derive(Clone)]
pub struct UringDevice {
    inner: Arc<Inner>,
}

struct Inner {
    /// `Some` until drop; taken first in `Drop` so the thread sees the channel closed.
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<Wake>,
    geometry: Geometry,
    info: DeviceInfo,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.tx.take());
        // Unconditional: the thread may be asleep and must notice the close.
        self.wake.wake();
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
    Read,
    Write(Durability),
}

impl IoOp {
    fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write(_) => "write",
        }
    }
}

enum Request {
    Io {
        op: IoOp,
        offset: u64,
        buf: AlignedBuf,
        reply: oneshot::Sender<IoOutcome>,
    },
    Flush {
        reply: oneshot::Sender<Result<(), IoError>>,
    },
}

impl UringDevice {
    pub fn open(path: &Path, config: &UringConfig) -> Result<UringDevice, DeviceError> {
        let opened = open_device(path, &config.open)?;
        UringDevice::from_opened(opened, config)
    }

    pub fn from_opened(opened: OpenedDevice, config: &UringConfig) -> Result<UringDevice, DeviceError> {
        let max_inflight = config.max_inflight.max(1);
        let channel_capacity = config.channel_capacity.max(1);
        // SAFETY: plain syscall; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(DeviceError::Io {
                path: opened.path.clone(),
                context: "create eventfd".to_owned(),
                source: io::Error::last_os_error(),
            });
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
        let OpenedDevice {
            file,
            geometry,
            kind,
            cache,
            path,
        } = opened;
        let thread_path = path.clone();
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
                    let _ = ready_tx.send(Err(DeviceError::Io {
                        path: thread_path,
                        context: "register the file with io_uring".to_owned(),
                        source: e,
                    }));
                    return;
                }
                let _ = ready_tx.send(Ok(ring.flags));
                let span = tracing::info_span!("uring_device", path = %thread_path.display());
                let _enter = span.enter();
                DeviceThread {
                    ring,
                    _file: file,
                    rx,
                    wake: thread_wake,
                    size_bytes: geometry.size_bytes,
                    slots: Vec::with_capacity(max_inflight),
                    free_slots: Vec::with_capacity(max_inflight),
                    inflight: 0,
                    max_inflight,
                    poll_armed: false,
                }
                .run();
            })
            .map_err(|e| DeviceError::Io {
                path: path.clone(),
                context: "spawn the device thread".to_owned(),
                source: e,
            })?;
        let ring_flags = match ready_rx.recv() {
            Ok(Ok(flags)) => flags,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(DeviceError::Io {
                    path,
                    context: "device thread exited during setup".to_owned(),
                    source: io::Error::other("device thread gone"),
                });
            }
        };
        tracing::info!(path = %path.display(), ?ring_flags, max_inflight, channel_capacity, "io_uring device ready");
        Ok(UringDevice {
            inner: Arc::new(Inner {
                tx: Some(tx),
                wake,
                geometry,
                info: DeviceInfo {
                    path,
                    kind,
                    cache,
                    ring_flags,
                },
            }),
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// Hands `req` to the device thread; gives it back if the device is closed.
    async fn send(&self, req: Request) -> Result<(), Request> {
        let Some(tx) = self.inner.tx.as_ref() else {
            return Err(req);
        };
        tx.send(req).await.map_err(|e| e.0)?;
        self.inner.wake.wake_if_sleeping();
        Ok(())
    }

    async fn io(&self, op: IoOp, offset: u64, buf: AlignedBuf) -> IoOutcome {
        let len = buf.len();
        if let Err(e) = check_range(op.name(), offset, len, self.inner.geometry.size_bytes) {
            return (buf, Err(e));
        }
        let (reply, result) = oneshot::channel();
        let req = Request::Io { op, offset, buf, reply };
        if let Err(req) = self.send(req).await {
            let Request::Io { buf, .. } = req else {
                unreachable!("send gives back the request it was given")
            };
            return (buf, Err(IoError::Closed));
        }
        match result.await {
            Ok(outcome) => outcome,
            // The thread dropped the request without completing it (it hit a
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
        self.io(IoOp::Read, offset, buf)
    }

    fn write(&self, offset: u64, buf: AlignedBuf, durability: Durability) -> impl Future<Output = IoOutcome> + Send {
        self.io(IoOp::Write(durability), offset, buf)
    }

    async fn flush(&self) -> Result<(), IoError> {
        let (reply, result) = oneshot::channel();
        if self.send(Request::Flush { reply }).await.is_err() {
            return Err(IoError::Closed);
        }
        result.await.unwrap_or(Err(IoError::Closed))
    }
}

struct DeviceThread {
    ring: Ring,
    /// Kept open for as long as the ring may use it.
    _file: File,
    rx: mpsc::Receiver<Request>,
    wake: Arc<Wake>,
    size_bytes: u64,
    /// I/Os the kernel owns, indexed by `user_data`: each buffer stays here
    /// until its CQE arrives. `None` is a free slot (listed in `free_slots`).
    slots: Vec<Option<Request>>,
    free_slots: Vec<usize>,
    inflight: usize,
    max_inflight: usize,
    /// Whether the eventfd `POLL_ADD` is in the ring.
    poll_armed: bool,
}

impl DeviceThread {
    fn run(mut self) {
        let mut closed = false;
        loop {
            while !closed && self.inflight < self.max_inflight {
                match self.rx.try_recv() {
                    Ok(req) => self.start(req),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            if closed && self.inflight == 0 {
                tracing::debug!("device closed; no I/O in flight; thread exits");
                return;
            }
            let mut wait_for = 1;
            if !closed && self.inflight < self.max_inflight {
                if !self.poll_armed {
                    let entry = opcode::PollAdd::new(types::Fd(self.wake.eventfd.as_raw_fd()), libc::POLLIN as u32)
                        .build()
                        .user_data(WAKE_TOKEN);
                    self.push(&entry);
                    self.poll_armed = true;
                }
                self.wake.sleeping.store(true, Ordering::Relaxed);
                fence(Ordering::SeqCst);
                if !self.rx.is_empty() {
                    // Raced with a sender: submit what we have, do not sleep.
                    wait_for = 0;
                }
            }
            let submitted = self.submit_and_wait(wait_for);
            self.wake.sleeping.store(false, Ordering::Relaxed);
            if let Err(e) = submitted {
                self.fail(e);
                return;
            }
            self.reap();
        }
    }

    fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The CQ is full: make room, then submit again.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    self.reap();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Pushes one SQE, submitting first if the SQ is full (cannot happen
    /// with the ring sized above `max_inflight`, but costs nothing to handle).
    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every pointer in the entries we build stays valid until
            // its CQE: buffers live in `slots`, the eventfd in `wake`.
            if unsafe { self.ring.ring.submission().push(entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.ring.submit() {
                tracing::warn!(error = %e, "submit with a full SQ failed; retrying");
            }
        }
    }

    fn start(&mut self, req: Request) {
        let (entry, in_flight) = match req {
            Request::Io {
                op,
                offset,
                mut buf,
                reply,
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
                    IoOp::Read => opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), len_u32)
                        .offset(offset)
                        .build(),
                    IoOp::Write(durability) => {
                        let rw_flags = match durability {
                            Durability::Volatile => 0,
                            Durability::Durable => libc::RWF_DSYNC,
                        };
                        opcode::Write::new(types::Fixed(0), buf.as_ptr(), len_u32)
                            .offset(offset)
                            .rw_flags(rw_flags)
                            .build()
                    }
                };
                (entry, Request::Io { op, offset, buf, reply })
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
        self.slots[slot] = Some(in_flight);
        self.inflight += 1;
        self.push(&entry.user_data(slot as u64));
    }

    fn reap(&mut self) {
        let mut completions = self.ring.ring.completion();
        completions.sync();
        for cqe in &mut completions {
            let token = cqe.user_data();
            if token == WAKE_TOKEN {
                self.poll_armed = false;
                drain_eventfd(&self.wake.eventfd);
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
            match in_flight {
                Request::Io { op, offset, buf, reply } => {
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
    }

    /// The ring itself failed. In-flight buffers may still be written by the
    /// kernel, so they are leaked rather than freed; waiting callers see
    /// `Closed`, queued requests get their buffers back with `Closed`.
    fn fail(mut self, e: io::Error) {
        tracing::error!(error = %e, inflight = self.inflight, "io_uring submit failed; device stops");
        for slot in self.slots.drain(..).flatten() {
            match slot {
                Request::Io { buf, .. } => std::mem::forget(buf),
                Request::Flush { .. } => {}
            }
        }
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
    // SAFETY: reads 8 bytes into a valid u64. The poll said it is readable and
    // this thread is its only reader, so the read does not block.
    unsafe {
        libc::read(
            eventfd.as_raw_fd(),
            (&mut value as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        );
    }
}

mod ring;
pub use ring::{Ring, RingFlags};

#[cfg(test)]
mod tests;
