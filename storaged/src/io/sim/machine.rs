//! The sans-IO state machine behind [`super::SimDisk`]: the two images, the
//! I/Os in flight, the completed-but-volatile writes, and every fault decision.
//!
//! It has no clock, no thread and no runtime. Inputs are submissions,
//! completions (chosen by a shell: the tokio timer or the step driver) and
//! crashes; all randomness comes from one seeded `fastrand::Rng` drawn only at
//! submission and at crash, so a run is a pure function of the seed and the
//! sequence of calls.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Completion, IoId, SimFaults, SimStats};
use crate::io::{AlignedBuf, BLOCK_SIZE, Durability, Geometry, IoError, check_range};

/// The medium's atomic unit: a crash tears a block at a sector boundary.
pub(super) const SECTOR_BYTES: usize = 512;
const SECTORS_PER_BLOCK: usize = BLOCK_SIZE / SECTOR_BYTES;

/// Who completes an I/O: the async shell (its future) or the step driver
/// (`next_completion`). Each only ever completes its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    Async,
    Step,
}

enum ReadFault {
    None,
    Eio,
    /// Transient: bit `bit` of the returned buffer is flipped, the medium is intact.
    FlipBit {
        bit: usize,
    },
}

enum WriteFault {
    None,
    Eio,
    /// Reports success but the bytes go to `target` (block-aligned, != offset).
    Misdirect {
        target: u64,
    },
}

enum Op {
    Read {
        offset: u64,
        buf: AlignedBuf,
        fault: ReadFault,
    },
    Write {
        offset: u64,
        buf: AlignedBuf,
        durability: Durability,
        fault: WriteFault,
    },
    /// Covers every write whose completion sequence number is `<= covers_seq`.
    Flush { covers_seq: u64 },
    /// Refused at submission (out of range); completes with its error.
    Refused {
        is_write: bool,
        buf: AlignedBuf,
        error: IoError,
    },
}

struct InFlight {
    /// The device generation it was issued in; a crash ends the generation.
    epoch: u64,
    owner: Owner,
    /// Due time on the step clock.
    due: Duration,
    op: Op,
}

/// A write completed with `Volatile` and not yet covered by a completed flush:
/// in the device's cache, lost or torn by a crash.
struct VolatileWrite {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
}

pub(super) struct Core {
    size_bytes: u64,
    faults: SimFaults,
    rng: fastrand::Rng,
    /// What reads return: every completed write in completion order.
    visible: Vec<u8>,
    /// What survives power loss.
    durable: Vec<u8>,
    /// Per sector: the completion sequence number of the write whose bytes
    /// `durable` holds (0: never written). An older write never overwrites a
    /// newer one in `durable`, whatever order flushes and crashes apply them in.
    durable_seq: Vec<u64>,
    epoch: u64,
    next_id: u64,
    /// Last completion sequence number handed out (writes and `write_raw`).
    last_seq: u64,
    /// The step driver's virtual clock.
    now: Duration,
    in_flight: BTreeMap<IoId, InFlight>,
    /// In completion order.
    volatile: Vec<VolatileWrite>,
    /// I/Os cut short by a crash, kept (with their buffers) until their owner
    /// collects the `Closed` result.
    closed: BTreeMap<IoId, (Owner, Op)>,
    stats: SimStats,
}

fn eio(op: &'static str, offset: u64, len: usize) -> IoError {
    IoError::Os {
        op,
        offset,
        len,
        source: std::io::Error::from_raw_os_error(libc::EIO),
    }
}

/// `true` with probability `p`; draws nothing when `p` is 0 so a fault-free
/// configuration has the smallest, simplest random stream.
fn chance(rng: &mut fastrand::Rng, p: f64) -> bool {
    p > 0.0 && rng.f64() < p
}

impl Core {
    pub(super) fn new(size_bytes: u64, seed: u64, faults: SimFaults) -> Core {
        faults.validate();
        let size_bytes = size_bytes - size_bytes % BLOCK_SIZE as u64;
        assert!(size_bytes > 0, "a simulated disk holds at least one block");
        let len = usize::try_from(size_bytes).expect("simulated disk fits in memory");
        Core {
            size_bytes,
            faults,
            rng: fastrand::Rng::with_seed(seed),
            visible: vec![0; len],
            durable: vec![0; len],
            durable_seq: vec![0; len / SECTOR_BYTES],
            epoch: 0,
            next_id: 0,
            last_seq: 0,
            now: Duration::ZERO,
            in_flight: BTreeMap::new(),
            volatile: Vec::new(),
            closed: BTreeMap::new(),
            stats: SimStats::default(),
        }
    }

    pub(super) fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: self.size_bytes,
            logical_block_bytes: SECTOR_BYTES as u32,
        }
    }

    pub(super) fn set_faults(&mut self, faults: SimFaults) {
        faults.validate();
        self.faults = faults;
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(super) fn now(&self) -> Duration {
        self.now
    }

    pub(super) fn stats(&self) -> SimStats {
        self.stats.clone()
    }

    /// In-flight writes plus completed-volatile ones not yet covered by a flush.
    pub(super) fn pending_writes(&self) -> usize {
        let in_flight = self
            .in_flight
            .values()
            .filter(|io| matches!(io.op, Op::Write { .. }))
            .count();
        in_flight + self.volatile.len()
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn latency(&mut self) -> Duration {
        let min = self.faults.latency_min.as_nanos();
        let max = self.faults.latency_max.as_nanos();
        let min = u64::try_from(min).unwrap_or(u64::MAX);
        let max = u64::try_from(max).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(min..=max))
    }

    fn issue(&mut self, owner: Owner, latency: Duration, op: Op) -> (IoId, Duration) {
        let id = IoId(self.next_id);
        self.next_id += 1;
        let io = InFlight {
            epoch: self.epoch,
            owner,
            due: self.now + latency,
            op,
        };
        self.in_flight.insert(id, io);
        (id, latency)
    }

    /// Returns the I/O's id and how long the async shell should wait before
    /// completing it.
    pub(super) fn submit_read(&mut self, offset: u64, buf: AlignedBuf, owner: Owner) -> (IoId, Duration) {
        if let Err(error) = check_range("read", offset, buf.len(), self.size_bytes) {
            let op = Op::Refused {
                is_write: false,
                buf,
                error,
            };
            return self.issue(owner, Duration::ZERO, op);
        }
        self.stats.reads += 1;
        let latency = self.latency();
        let fault = if chance(&mut self.rng, self.faults.read_eio) {
            self.stats.read_eio += 1;
            ReadFault::Eio
        } else if chance(&mut self.rng, self.faults.bit_flip_read) {
            self.stats.read_bit_flips += 1;
            ReadFault::FlipBit {
                bit: self.rng.usize(0..buf.len() * 8),
            }
        } else {
            ReadFault::None
        };
        self.issue(owner, latency, Op::Read { offset, buf, fault })
    }

    pub(super) fn submit_write(
        &mut self,
        offset: u64,
        buf: AlignedBuf,
        durability: Durability,
        owner: Owner,
    ) -> (IoId, Duration) {
        if let Err(error) = check_range("write", offset, buf.len(), self.size_bytes) {
            let op = Op::Refused {
                is_write: true,
                buf,
                error,
            };
            return self.issue(owner, Duration::ZERO, op);
        }
        self.stats.writes += 1;
        let latency = self.latency();
        let fault = if chance(&mut self.rng, self.faults.write_eio) {
            self.stats.write_eio += 1;
            WriteFault::Eio
        } else if chance(&mut self.rng, self.faults.misdirect) {
            match self.misdirect_target(offset, buf.len()) {
                Some(target) => {
                    self.stats.misdirected += 1;
                    WriteFault::Misdirect { target }
                }
                // The write spans the whole device: there is nowhere else to go.
                None => WriteFault::None,
            }
        } else {
            WriteFault::None
        };
        let op = Op::Write {
            offset,
            buf,
            durability,
            fault,
        };
        self.issue(owner, latency, op)
    }

    /// A block-aligned offset other than `offset` where `len` bytes fit,
    /// away from the intended range when the device has room for that.
    fn misdirect_target(&mut self, offset: u64, len: usize) -> Option<u64> {
        let block = BLOCK_SIZE as u64;
        let len = len as u64;
        let slots = (self.size_bytes - len) / block + 1;
        let apart: Vec<u64> = (0..slots)
            .map(|slot| slot * block)
            .filter(|&target| target + len <= offset || offset + len <= target)
            .collect();
        if !apart.is_empty() {
            return Some(apart[self.rng.usize(0..apart.len())]);
        }
        let elsewhere: Vec<u64> = (0..slots)
            .map(|slot| slot * block)
            .filter(|&target| target != offset)
            .collect();
        if elsewhere.is_empty() {
            return None;
        }
        Some(elsewhere[self.rng.usize(0..elsewhere.len())])
    }

    pub(super) fn submit_flush(&mut self, owner: Owner) -> (IoId, Duration) {
        self.stats.flushes += 1;
        let latency = self.latency();
        let covers_seq = self.last_seq;
        self.issue(owner, latency, Op::Flush { covers_seq })
    }

    /// Completes `id` now, if `owner` owns it and it has not completed yet.
    /// An I/O of a previous generation completes with [`IoError::Closed`] and
    /// touches nothing.
    pub(super) fn complete(&mut self, id: IoId, owner: Owner) -> Option<Completion> {
        if self.in_flight.get(&id).is_some_and(|io| io.owner == owner) {
            let io = self.in_flight.remove(&id)?;
            // Crash moves every in-flight I/O to `closed`, so this holds; if it
            // ever did not, a stale I/O must still not touch the images.
            if io.epoch != self.epoch {
                return Some(closed(io.op));
            }
            return Some(self.finish(io.op));
        }
        if self.closed.get(&id).is_some_and(|(o, _)| *o == owner) {
            let (_, op) = self.closed.remove(&id)?;
            return Some(closed(op));
        }
        None
    }

    /// The step driver's next I/O and its due time: first the ones a crash cut
    /// short (due now), then the in-flight one due first (ties by issue order).
    pub(super) fn peek_step(&self) -> Option<(IoId, Duration)> {
        let cut_short = self.closed.iter().find(|(_, (owner, _))| *owner == Owner::Step);
        if let Some((id, _)) = cut_short {
            return Some((*id, self.now));
        }
        let mut next: Option<(IoId, Duration)> = None;
        for (id, io) in &self.in_flight {
            if io.owner == Owner::Step && next.is_none_or(|(_, due)| io.due < due) {
                next = Some((*id, io.due));
            }
        }
        next
    }

    pub(super) fn next_step_completion(&mut self) -> Option<(IoId, Completion)> {
        let (id, due) = self.peek_step()?;
        self.now = self.now.max(due);
        let completion = self.complete(id, Owner::Step)?;
        Some((id, completion))
    }

    fn finish(&mut self, op: Op) -> Completion {
        match op {
            Op::Read { offset, mut buf, fault } => {
                if let ReadFault::Eio = fault {
                    let len = buf.len();
                    return Completion::Read((buf, Err(eio("read", offset, len))));
                }
                let start = offset as usize;
                let len = buf.len();
                buf.copy_from_slice(&self.visible[start..start + len]);
                if let ReadFault::FlipBit { bit } = fault {
                    buf[bit / 8] ^= 1 << (bit % 8);
                }
                Completion::Read((buf, Ok(())))
            }
            Op::Write {
                offset,
                buf,
                durability,
                fault,
            } => {
                let target = match fault {
                    WriteFault::Eio => {
                        let len = buf.len();
                        return Completion::Write((buf, Err(eio("write", offset, len))));
                    }
                    WriteFault::None => offset,
                    WriteFault::Misdirect { target } => target,
                };
                self.last_seq += 1;
                let seq = self.last_seq;
                let start = target as usize;
                self.visible[start..start + buf.len()].copy_from_slice(&buf);
                match durability {
                    Durability::Durable => self.apply_durable(target, &buf, seq),
                    Durability::Volatile => self.volatile.push(VolatileWrite {
                        seq,
                        offset: target,
                        data: buf.to_vec(),
                    }),
                }
                Completion::Write((buf, Ok(())))
            }
            Op::Flush { covers_seq } => {
                let pending = std::mem::take(&mut self.volatile);
                for write in pending {
                    if write.seq <= covers_seq {
                        self.apply_durable(write.offset, &write.data, write.seq);
                    } else {
                        self.volatile.push(write);
                    }
                }
                Completion::Flush(Ok(()))
            }
            Op::Refused { is_write, buf, error } => {
                if is_write {
                    Completion::Write((buf, Err(error)))
                } else {
                    Completion::Read((buf, Err(error)))
                }
            }
        }
    }

    /// Puts `data` into `durable` at `offset`, sector by sector, except where
    /// a newer write (higher `seq`) already lies.
    fn apply_durable(&mut self, offset: u64, data: &[u8], seq: u64) {
        debug_assert_eq!(offset as usize % SECTOR_BYTES, 0);
        debug_assert_eq!(data.len() % SECTOR_BYTES, 0);
        let first_sector = offset as usize / SECTOR_BYTES;
        for (i, bytes) in data.chunks_exact(SECTOR_BYTES).enumerate() {
            let sector = first_sector + i;
            if self.durable_seq[sector] < seq {
                let start = sector * SECTOR_BYTES;
                self.durable[start..start + SECTOR_BYTES].copy_from_slice(bytes);
                self.durable_seq[sector] = seq;
            }
        }
    }

    /// Power loss, then reboot. See the module documentation of `sim` for the model.
    pub(super) fn crash(&mut self) {
        self.stats.crashes += 1;
        // Completed-volatile writes first, in completion order; the sequence
        // guard in `apply_durable` keeps an older one from landing over a
        // newer durable one.
        let volatile = std::mem::take(&mut self.volatile);
        for write in &volatile {
            self.land_torn(write.offset, &write.data, write.seq);
        }
        // Then the writes still in flight, in a seeded order: they have no
        // completion order, and overlapping ones may land either way round.
        let mut landing = Vec::new();
        for (id, io) in &self.in_flight {
            if let Op::Write { fault, .. } = &io.op
                && !matches!(fault, WriteFault::Eio)
            {
                landing.push(*id);
            }
        }
        self.rng.shuffle(&mut landing);
        for id in landing {
            let Some(InFlight {
                op: Op::Write { offset, buf, fault, .. },
                ..
            }) = self.in_flight.get(&id)
            else {
                continue;
            };
            let target = match fault {
                WriteFault::Misdirect { target } => *target,
                _ => *offset,
            };
            let data = buf.to_vec();
            self.last_seq += 1;
            let seq = self.last_seq;
            self.land_torn(target, &data, seq);
        }
        // Every I/O issued before now completes with `Closed` and touches nothing.
        let cut_short = std::mem::take(&mut self.in_flight);
        for (id, io) in cut_short {
            self.closed.insert(id, (io.owner, io.op));
        }
        self.visible.copy_from_slice(&self.durable);
        self.epoch += 1;
    }

    /// Each 4 KiB block of the write independently: lost, whole, or a strict
    /// prefix of its sectors.
    fn land_torn(&mut self, offset: u64, data: &[u8], seq: u64) {
        for (i, block) in data.chunks_exact(BLOCK_SIZE).enumerate() {
            let draw = self.rng.f64();
            let sectors = if draw < self.faults.crash_lose {
                self.stats.crash_blocks_lost += 1;
                0
            } else if draw < self.faults.crash_lose + self.faults.crash_tear {
                self.stats.crash_blocks_torn += 1;
                self.rng.usize(1..SECTORS_PER_BLOCK)
            } else {
                self.stats.crash_blocks_whole += 1;
                SECTORS_PER_BLOCK
            };
            let block_offset = offset + (i * BLOCK_SIZE) as u64;
            self.apply_durable(block_offset, &block[..sectors * SECTOR_BYTES], seq);
        }
    }

    fn check_raw(&self, what: &str, offset: u64, len: usize) -> usize {
        let end = offset.checked_add(len as u64);
        assert!(
            end.is_some_and(|end| end <= self.size_bytes),
            "{what} of {len} bytes at {offset} is outside the {} byte device",
            self.size_bytes
        );
        offset as usize
    }

    pub(super) fn read_raw(&self, offset: u64, len: usize) -> Vec<u8> {
        let start = self.check_raw("read_raw", offset, len);
        self.durable[start..start + len].to_vec()
    }

    pub(super) fn read_visible(&self, offset: u64, len: usize) -> Vec<u8> {
        let start = self.check_raw("read_visible", offset, len);
        self.visible[start..start + len].to_vec()
    }

    /// Direct, durable, fault-free; ranks as the newest write to its sectors.
    pub(super) fn write_raw(&mut self, offset: u64, bytes: &[u8]) {
        let start = self.check_raw("write_raw", offset, bytes.len());
        self.visible[start..start + bytes.len()].copy_from_slice(bytes);
        self.durable[start..start + bytes.len()].copy_from_slice(bytes);
        if bytes.is_empty() {
            return;
        }
        self.last_seq += 1;
        let first = start / SECTOR_BYTES;
        let last = (start + bytes.len() - 1) / SECTOR_BYTES;
        for stamp in &mut self.durable_seq[first..=last] {
            *stamp = self.last_seq;
        }
    }

    pub(super) fn flip_bit(&mut self, offset_bytes: u64, bit: u8) {
        assert!(bit < 8, "bit {bit} of a byte");
        let at = self.check_raw("flip_bit", offset_bytes, 1);
        self.durable[at] ^= 1 << bit;
        self.visible[at] ^= 1 << bit;
        self.stats.bits_flipped_at_rest += 1;
    }
}

/// The `Closed` completion of an I/O cut short by a crash, with its buffer.
fn closed(op: Op) -> Completion {
    match op {
        Op::Read { buf, .. } => Completion::Read((buf, Err(IoError::Closed))),
        Op::Write { buf, .. } => Completion::Write((buf, Err(IoError::Closed))),
        Op::Refused {
            is_write: true, buf, ..
        } => Completion::Write((buf, Err(IoError::Closed))),
        Op::Refused {
            is_write: false, buf, ..
        } => Completion::Read((buf, Err(IoError::Closed))),
        Op::Flush { .. } => Completion::Flush(Err(IoError::Closed)),
    }
}
