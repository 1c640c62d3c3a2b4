//! The log's state machine, free of I/O (docs/architecture.md, "State machines free of I/O").
//!
//! Inputs: entries to append (with a caller's token), I/O completions,
//! `release(upto)`. Outputs: I/O requests to start, and tokens whose entries
//! are durable. A tokio shell ([`super::engine`]) and the deterministic
//! simulator both drive it.
//!
//! Invariants it keeps:
//! - blocks are written in seq order into fresh positions; a block that holds
//!   acknowledged data is never rewritten;
//! - the durable mark advances in seq order, whatever order completions come in;
//! - an entry is acknowledged only when every block it touches is at or below
//!   the durable mark;
//! - a block is reused only after a durable anchor says it was released;
//! - nothing is written in a new generation before the anchor carrying that
//!   generation is durable (so recovery can tell this incarnation's blocks
//!   from ones an earlier incarnation left past its end).

use std::collections::VecDeque;

use crate::io::{AlignedBuf, BLOCK_SIZE, Durability, IoError};

use super::format::{Anchor, BlockHeader, BlockKind, DeviceId, HEADER_BYTES, PAYLOAD_MAX_BYTES, seal_block};
use super::frag::{FLAG_CONT, FLAG_MORE, FRAG_HEADER_BYTES, put_fragment};
use super::layout::{ANCHOR_BLOCKS, block_offset};

/// The largest entry the log takes. Bounded so one entry can never need more
/// than a few writes and a corrupt length on recovery stays small.
pub const ENTRY_BYTES_MAX: usize = 1024 * 1024;

/// The most log blocks one append call of entries of `lens` bytes can
/// take. A call's entries are queued together and packed in order: each
/// costs its bytes and a fragment header; a block adds at most one more
/// header (an entry continued from the block before) and leaves at most a
/// header's bytes unused; the first block may be shared with what came
/// before.
pub fn call_blocks_max(lens: impl Iterator<Item = usize>) -> u64 {
    let bytes: usize = lens.map(|len| len + FRAG_HEADER_BYTES).sum();
    bytes.div_ceil(PAYLOAD_MAX_BYTES - 2 * FRAG_HEADER_BYTES) as u64 + 1
}

/// Blocks that may be in flight at once, at most, in any configuration. After
/// a crash, invalid blocks within this distance past the log's end are the
/// expected debris of writes that never completed, not corruption.
pub const INFLIGHT_BLOCKS_MAX: u64 = 4096;

/// Log block header flag: bits 0–30 hold how far the durable mark was
/// below the block's seq when its write was issued. Every block below that
/// mark was durable, so recovery knows a bad block below it is damage,
/// never a torn write, without waiting for the next anchor write.
pub const FLAG_DURABLE_MARK: u32 = 1 << 31;

/// The header flags of log block `seq` written while the durable mark is
/// `durable_seq` (≤ `seq`; the distance is at most the in-flight window).
pub fn durable_mark_flags(seq: u64, durable_seq: u64) -> u32 {
    let lag = seq - durable_seq;
    debug_assert!(lag < u64::from(FLAG_DURABLE_MARK));
    FLAG_DURABLE_MARK | lag.min(u64::from(FLAG_DURABLE_MARK - 1)) as u32
}

/// The durable mark a log block's header flags record, if they record one.
pub fn durable_mark_of(seq: u64, flags: u32) -> Option<u64> {
    (flags & FLAG_DURABLE_MARK != 0).then(|| seq.saturating_sub(u64::from(flags & !FLAG_DURABLE_MARK)))
}

/// How an acknowledged write is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DurabilityMode {
    /// Every log write carries RWF_DSYNC (FUA, or write + flush by the kernel).
    #[default]
    Dsync,
    /// Log writes go to the device cache; a flush after them makes them durable.
    Flush,
}

#[derive(Debug, Clone, Copy)]
pub struct LogConfig {
    /// Blocks in one log write at most.
    pub write_blocks_max: usize,
    /// Log writes in flight at once at most.
    pub writes_inflight_max: usize,
    /// Bytes of entries accepted but not yet packed into a write, at most.
    pub queue_bytes_max: usize,
    pub durability: DurabilityMode,
}

impl LogConfig {
    /// Refuse configurations the core cannot run; for flags and config files.
    pub fn validate(&self) -> Result<(), String> {
        if self.write_blocks_max == 0 || self.writes_inflight_max == 0 || self.queue_bytes_max == 0 {
            return Err("log write size, writes in flight and queue size must all be at least 1".into());
        }
        let inflight = self.write_blocks_max as u64 * self.writes_inflight_max as u64;
        if inflight > INFLIGHT_BLOCKS_MAX {
            return Err(format!(
                "{} blocks per write × {} writes in flight = {inflight} blocks, above the limit of {INFLIGHT_BLOCKS_MAX}",
                self.write_blocks_max, self.writes_inflight_max
            ));
        }
        Ok(())
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            write_blocks_max: 64,
            writes_inflight_max: 8,
            queue_bytes_max: 8 * 1024 * 1024,
            durability: DurabilityMode::Dsync,
        }
    }
}

/// Where the log lives on its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogGeometry {
    pub device_id: DeviceId,
    pub start_block: u64,
    pub blocks: u64,
}

impl LogGeometry {
    /// Byte offset of the block with sequence number `seq` (seq starts at 1).
    pub fn offset_of(&self, seq: u64) -> u64 {
        debug_assert!(seq >= 1);
        block_offset(self.start_block + (seq - 1) % self.blocks)
    }

    /// Blocks from `seq` to the end of the region before it wraps.
    fn blocks_until_wrap(&self, seq: u64) -> u64 {
        self.blocks - (seq - 1) % self.blocks
    }
}

/// What recovery found, the core's starting point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStart {
    pub anchor: Anchor,
    /// First seq after the valid log: where the next write goes.
    pub next_seq: u64,
}

/// An I/O the shell must start and report back with [`LogCore::complete`].
#[derive(Debug)]
pub enum IoRequest {
    Write {
        id: u64,
        offset: u64,
        buf: AlignedBuf,
        durability: Durability,
    },
    Flush {
        id: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("entry of {0} bytes is empty or exceeds the {ENTRY_BYTES_MAX}-byte limit")]
    BadSize(usize),
    #[error("entry of {bytes} bytes needs more blocks than the whole log has ({log_blocks})")]
    LargerThanLog { bytes: usize, log_blocks: u64 },
    #[error("the log has failed and takes no more writes: {0}")]
    Failed(String),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    pub generation: u32,
    pub tail_seq: u64,
    pub durable_seq: u64,
    pub next_seq: u64,
    pub log_blocks: u64,
    pub free_blocks: u64,
    pub queued_entries: u64,
    pub queued_bytes: u64,
    pub writes_inflight: u64,
    pub entries_acked: u64,
    pub writes_done: u64,
    pub blocks_written: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteState {
    Issued,
    /// Completed into the device cache; waits for a flush (Flush mode).
    Written,
    /// Covered by the flush with this id.
    Flushing(u64),
    Durable,
}

#[derive(Debug)]
struct InflightWrite {
    id: u64,
    first_seq: u64,
    blocks: u64,
    state: WriteState,
}

struct Queued<T> {
    entry: Vec<u8>,
    token: T,
}

struct Waiting<T> {
    /// First seq after the entry's last block.
    end_seq: u64,
    start_seq: u64,
    token: T,
}

enum IoKind {
    Log,
    /// One copy of an anchor. Slot 0 is written first, then slot 1; the
    /// anchor takes effect when the second is durable.
    Anchor {
        anchor: Anchor,
        slot: usize,
    },
    Flush,
}

pub struct LogCore<T> {
    geometry: LogGeometry,
    config: LogConfig,
    generation: u32,
    /// Generation persisted in the anchor: writes may start.
    generation_durable: bool,
    anchor_counter: u64,
    tail_seq: u64,
    /// Highest tail a caller asked for; persisted by the next anchor write.
    release_wanted: u64,
    anchor_inflight: bool,
    /// An anchor whose first copy is durable and whose second is to be written.
    anchor_second: Option<Anchor>,
    /// The floor the newest durable anchor records.
    anchored_floor: u64,
    /// The owner is closing the log: record the durable end in an anchor.
    floor_wanted: bool,
    next_seq: u64,
    durable_seq: u64,
    queue: VecDeque<Queued<T>>,
    queue_bytes: usize,
    /// Bytes of the front queued entry already placed in earlier writes.
    front_written: usize,
    /// Seq of the block the front entry started in, once it started.
    front_start_seq: u64,
    inflight: VecDeque<InflightWrite>,
    flush_inflight: Option<u64>,
    waiting: VecDeque<Waiting<T>>,
    acked: VecDeque<(T, u64)>,
    free_bufs: Vec<AlignedBuf>,
    bufs_allocated: usize,
    io_kinds: Vec<(u64, IoKind)>,
    next_io_id: u64,
    failed: Option<String>,
    stats: LogStats,
}

impl<T> LogCore<T> {
    /// Start from what recovery found. The first request [`poll_io`] returns
    /// is the anchor write that makes the new generation durable.
    pub fn new(geometry: LogGeometry, config: LogConfig, start: LogStart) -> LogCore<T> {
        assert!(config.write_blocks_max >= 1 && config.writes_inflight_max >= 1);
        assert!((config.write_blocks_max * config.writes_inflight_max) as u64 <= INFLIGHT_BLOCKS_MAX);
        assert!(start.anchor.tail_seq >= 1 && start.anchor.tail_seq <= start.next_seq);
        assert!(start.next_seq - start.anchor.tail_seq <= geometry.blocks);
        let generation = start.anchor.generation.checked_add(1).expect("log generation overflow");
        let mut core = LogCore {
            geometry,
            config,
            generation,
            generation_durable: false,
            anchor_counter: start.anchor.counter,
            tail_seq: start.anchor.tail_seq,
            release_wanted: start.anchor.tail_seq,
            anchor_inflight: false,
            anchor_second: None,
            anchored_floor: start.anchor.floor_seq,
            floor_wanted: false,
            next_seq: start.next_seq,
            durable_seq: start.next_seq,
            queue: VecDeque::new(),
            queue_bytes: 0,
            front_written: 0,
            front_start_seq: 0,
            inflight: VecDeque::new(),
            flush_inflight: None,
            waiting: VecDeque::new(),
            acked: VecDeque::new(),
            free_bufs: Vec::new(),
            bufs_allocated: 0,
            io_kinds: Vec::new(),
            next_io_id: 1,
            failed: None,
            stats: LogStats::default(),
        };
        core.refresh_stats();
        core
    }

    pub fn geometry(&self) -> &LogGeometry {
        &self.geometry
    }

    /// Whether an entry of `bytes` would be taken into the queue now. The
    /// shell stops reading new appends while this is false: backpressure.
    pub fn has_room(&self, bytes: usize) -> bool {
        self.queue.is_empty() || self.queue_bytes + bytes <= self.config.queue_bytes_max
    }

    /// Whether an entry of `bytes` would be accepted.
    pub fn check(&self, bytes: usize) -> Result<(), AppendError> {
        if let Some(why) = &self.failed {
            return Err(AppendError::Failed(why.clone()));
        }
        if bytes == 0 || bytes > ENTRY_BYTES_MAX {
            return Err(AppendError::BadSize(bytes));
        }
        // An entry may start at the end of a block and so touch one more.
        let blocks_needed = bytes.div_ceil(PAYLOAD_MAX_BYTES - FRAG_HEADER_BYTES) as u64 + 1;
        if blocks_needed > self.geometry.blocks {
            return Err(AppendError::LargerThanLog {
                bytes,
                log_blocks: self.geometry.blocks,
            });
        }
        Ok(())
    }

    /// Queue an entry. It is acknowledged (see [`poll_acked`]) once durable.
    pub fn append(&mut self, entry: Vec<u8>, token: T) -> Result<(), (AppendError, T)> {
        if let Err(e) = self.check(entry.len()) {
            return Err((e, token));
        }
        self.queue_bytes += entry.len();
        self.queue.push_back(Queued { entry, token });
        Ok(())
    }

    /// Free every block below `upto` (the seq of the oldest block the owner
    /// still needs). Takes effect once the anchor recording it is durable.
    pub fn release(&mut self, upto: u64) {
        // Never past what is durable, nor past the start of an entry that is
        // not acknowledged yet: its first blocks may be durable while its
        // last write is still in flight.
        let mut limit = self.durable_seq;
        if let Some(w) = self.waiting.front() {
            limit = limit.min(w.start_seq);
        }
        if self.front_written > 0 {
            limit = limit.min(self.front_start_seq);
        }
        self.release_wanted = self.release_wanted.max(upto.min(limit));
    }

    /// The owner is done appending: once every write is durable, write an
    /// anchor whose floor is the log's durable end, so that after a clean
    /// stop a bad block anywhere in the log is known for damage (a torn
    /// write is then impossible). Returns whether that anchor is still to
    /// come (call [`poll_io`](Self::poll_io) and wait for it).
    pub fn close(&mut self) -> bool {
        self.floor_wanted = true;
        self.failed.is_none() && self.generation_durable && self.durable_seq > self.anchored_floor
    }

    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub fn stats(&self) -> LogStats {
        self.stats
    }

    /// The next I/O to start, if any. Call until it returns `None`.
    pub fn poll_io(&mut self) -> Option<IoRequest> {
        if self.failed.is_some() {
            return None;
        }
        if let Some(anchor) = self.anchor_second.take() {
            return Some(self.anchor_copy(anchor, 1));
        }
        let floor_due = self.floor_wanted && self.durable_seq > self.anchored_floor && self.inflight.is_empty();
        if !self.anchor_inflight && (!self.generation_durable || self.release_wanted > self.tail_seq || floor_due) {
            return Some(self.anchor_write());
        }
        if !self.generation_durable {
            return None;
        }
        if let Some(w) = self.log_write() {
            return Some(w);
        }
        let flush_due = self.config.durability == DurabilityMode::Flush
            && self.flush_inflight.is_none()
            && self.inflight.iter().any(|w| w.state == WriteState::Written);
        if flush_due {
            // One flush covers every write that has completed so far.
            let id = self.new_io(IoKind::Flush);
            for w in self.inflight.iter_mut().filter(|w| w.state == WriteState::Written) {
                w.state = WriteState::Flushing(id);
            }
            self.flush_inflight = Some(id);
            return Some(IoRequest::Flush { id });
        }
        None
    }

    /// Report an I/O's outcome; the buffer comes back to the core's pool.
    pub fn complete(&mut self, id: u64, buf: Option<AlignedBuf>, result: Result<(), IoError>) {
        let Some(idx) = self.io_kinds.iter().position(|(i, _)| *i == id) else {
            debug_assert!(false, "completion for unknown I/O {id}");
            return;
        };
        let (_, kind) = self.io_kinds.swap_remove(idx);
        if let Some(buf) = buf.filter(|b| b.capacity() == self.config.write_blocks_max * BLOCK_SIZE) {
            self.free_bufs.push(buf);
        }
        if let Err(e) = result {
            // A failed log or anchor write leaves a hole the log cannot step
            // over: stop, fail everything not yet acknowledged, and let the
            // node report it (peers still hold the data).
            self.fail(format!("{e}"));
            return;
        }
        match kind {
            IoKind::Anchor { anchor, slot: 0 } => {
                // The first copy is durable: now the second, so that both
                // slots hold the newest anchor and one going bad later (or
                // a torn write of the next one) never hides it.
                self.anchor_second = Some(anchor);
            }
            IoKind::Anchor { anchor, .. } => {
                self.anchor_inflight = false;
                self.anchor_counter = anchor.counter;
                self.anchored_floor = anchor.floor_seq;
                self.tail_seq = anchor.tail_seq;
                self.generation_durable = true;
            }
            IoKind::Log => {
                let durable = self.config.durability == DurabilityMode::Dsync;
                if let Some(w) = self.inflight.iter_mut().find(|w| w.id == id) {
                    w.state = if durable {
                        WriteState::Durable
                    } else {
                        WriteState::Written
                    };
                }
                self.stats.writes_done += 1;
            }
            IoKind::Flush => {
                self.flush_inflight = None;
                for w in self.inflight.iter_mut() {
                    if w.state == WriteState::Flushing(id) {
                        w.state = WriteState::Durable;
                    }
                }
            }
        }
        self.advance_durable();
        self.refresh_stats();
    }

    /// An appended entry that is now durable, with the seq of the block it starts in.
    pub fn poll_acked(&mut self) -> Option<(T, u64)> {
        self.acked.pop_front()
    }

    /// Entries that will never be acknowledged because the log failed.
    pub fn drain_failed(&mut self) -> Vec<T> {
        if self.failed.is_none() {
            return Vec::new();
        }
        let mut out: Vec<T> = self.waiting.drain(..).map(|w| w.token).collect();
        out.extend(self.queue.drain(..).map(|q| q.token));
        self.queue_bytes = 0;
        out
    }

    /// Stop the log: nothing more is written and everything not yet
    /// acknowledged fails (see [`drain_failed`]).
    pub fn abort(&mut self, why: String) {
        self.fail(why);
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::error!(error = %why, "log write failed; the log stops taking writes");
            self.failed = Some(why);
        }
    }

    fn new_io(&mut self, kind: IoKind) -> u64 {
        let id = self.next_io_id;
        self.next_io_id += 1;
        self.io_kinds.push((id, kind));
        id
    }

    fn take_buf(&mut self) -> Option<AlignedBuf> {
        if let Some(b) = self.free_bufs.pop() {
            return Some(b);
        }
        // One buffer per log write in flight plus one for the anchor: the
        // pool's size is the engine's whole I/O memory.
        if self.bufs_allocated < self.config.writes_inflight_max + 1 {
            self.bufs_allocated += 1;
            return Some(AlignedBuf::zeroed_blocks(self.config.write_blocks_max));
        }
        None
    }

    fn anchor_write(&mut self) -> IoRequest {
        let anchor = Anchor {
            counter: self.anchor_counter + 1,
            generation: self.generation,
            tail_seq: self.release_wanted,
            floor_seq: self.durable_seq,
            inflight_blocks: (self.config.write_blocks_max * self.config.writes_inflight_max) as u64,
        };
        self.anchor_inflight = true;
        self.anchor_copy(anchor, 0)
    }

    /// The write of one copy of `anchor` into `slot`.
    fn anchor_copy(&mut self, anchor: Anchor, slot: usize) -> IoRequest {
        let offset = block_offset(ANCHOR_BLOCKS[slot]);
        let mut buf = self.take_buf().unwrap_or_else(|| AlignedBuf::zeroed_blocks(1));
        buf.set_blocks(1);
        anchor.encode(&mut buf, self.geometry.device_id, offset);
        let id = self.new_io(IoKind::Anchor { anchor, slot });
        IoRequest::Write {
            id,
            offset,
            buf,
            durability: Durability::Durable,
        }
    }

    fn log_write(&mut self) -> Option<IoRequest> {
        if self.queue.is_empty() || self.inflight.len() >= self.config.writes_inflight_max {
            return None;
        }
        let used = self.next_seq - self.tail_seq;
        let free = self.geometry.blocks - used;
        let budget = (self.config.write_blocks_max as u64)
            .min(free)
            .min(self.geometry.blocks_until_wrap(self.next_seq));
        if budget == 0 {
            return None; // full: appends wait for a release
        }
        let mut buf = self.take_buf()?;
        buf.set_blocks(self.config.write_blocks_max);
        let first_seq = self.next_seq;
        let mut blocks = 0u64;
        while blocks < budget && !self.queue.is_empty() {
            let seq = first_seq + blocks;
            let block = buf.block_mut(blocks as usize);
            let payload_len = self.fill_block(&mut block[HEADER_BYTES..], seq);
            let header = BlockHeader {
                kind: BlockKind::Log,
                device_id: self.geometry.device_id,
                offset: self.geometry.offset_of(seq),
                seq,
                generation: self.generation,
                payload_len: payload_len as u32,
                flags: durable_mark_flags(seq, self.durable_seq),
            };
            block[HEADER_BYTES + payload_len..].fill(0);
            seal_block(block, &header);
            blocks += 1;
        }
        debug_assert!(blocks > 0);
        buf.set_blocks(blocks as usize);
        self.next_seq += blocks;
        let id = self.new_io(IoKind::Log);
        self.inflight.push_back(InflightWrite {
            id,
            first_seq,
            blocks,
            state: WriteState::Issued,
        });
        self.stats.blocks_written += blocks;
        self.refresh_stats();
        let durability = match self.config.durability {
            DurabilityMode::Dsync => Durability::Durable,
            DurabilityMode::Flush => Durability::Volatile,
        };
        Some(IoRequest::Write {
            id,
            offset: self.geometry.offset_of(first_seq),
            buf,
            durability,
        })
    }

    /// Pack queued entries into one block's payload area; returns bytes used.
    fn fill_block(&mut self, payload: &mut [u8], seq: u64) -> usize {
        let mut used = 0;
        while let Some(front) = self.queue.front() {
            let room = PAYLOAD_MAX_BYTES - used;
            if room <= FRAG_HEADER_BYTES {
                break;
            }
            let left = front.entry.len() - self.front_written;
            let take = left.min(room - FRAG_HEADER_BYTES).min(u16::MAX as usize);
            let mut flags = 0;
            if self.front_written > 0 {
                flags |= FLAG_CONT;
            } else {
                self.front_start_seq = seq;
            }
            if take < left {
                flags |= FLAG_MORE;
            }
            let bytes = &front.entry[self.front_written..self.front_written + take];
            used += put_fragment(&mut payload[used..], bytes, flags);
            if take < left {
                self.front_written += take;
                break; // the block is full; the entry goes on in the next one
            }
            let done = self.queue.pop_front().expect("front exists");
            self.queue_bytes -= done.entry.len();
            self.front_written = 0;
            self.waiting.push_back(Waiting {
                end_seq: seq + 1,
                start_seq: self.front_start_seq,
                token: done.token,
            });
        }
        used
    }

    fn advance_durable(&mut self) {
        while let Some(front) = self.inflight.front() {
            if front.state != WriteState::Durable {
                break;
            }
            debug_assert_eq!(front.first_seq, self.durable_seq);
            self.durable_seq = front.first_seq + front.blocks;
            self.inflight.pop_front();
        }
        while let Some(w) = self.waiting.front() {
            if w.end_seq > self.durable_seq {
                break;
            }
            let w = self.waiting.pop_front().expect("front exists");
            self.acked.push_back((w.token, w.start_seq));
            self.stats.entries_acked += 1;
        }
    }

    fn refresh_stats(&mut self) {
        let s = &mut self.stats;
        s.generation = self.generation;
        s.tail_seq = self.tail_seq;
        s.durable_seq = self.durable_seq;
        s.next_seq = self.next_seq;
        s.log_blocks = self.geometry.blocks;
        s.free_blocks = self.geometry.blocks - (self.next_seq - self.tail_seq);
        s.queued_entries = self.queue.len() as u64;
        s.queued_bytes = self.queue_bytes as u64;
        s.writes_inflight = self.inflight.len() as u64;
    }
}

const _: () = assert!(BLOCK_SIZE == HEADER_BYTES + PAYLOAD_MAX_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::{BlockError, decode_block_at};
    use crate::log::frag::Reassembler;

    const DEV: DeviceId = [3; 16];

    fn core(blocks: u64, config: LogConfig) -> LogCore<u32> {
        let geometry = LogGeometry {
            device_id: DEV,
            start_block: 256,
            blocks,
        };
        let anchor = Anchor {
            counter: 1,
            generation: 0,
            tail_seq: 1,
            inflight_blocks: 0,
            floor_seq: 1,
        };
        let mut c = LogCore::new(geometry, config, LogStart { anchor, next_seq: 1 });
        // The generation's anchor write comes first and gates everything.
        complete_anchor(&mut c);
        c
    }

    /// Completes the anchor's two copies (slot 0, then slot 1), checking
    /// nothing else is written meanwhile; returns the anchor written.
    fn complete_anchor(c: &mut LogCore<u32>) -> Anchor {
        let mut found = Vec::new();
        for block in ANCHOR_BLOCKS {
            let Some(IoRequest::Write { id, offset, buf, .. }) = c.poll_io() else {
                panic!("anchor write expected")
            };
            assert_eq!(offset, block_offset(block), "slot 0 first, then slot 1");
            assert!(c.poll_io().is_none(), "nothing else before the copy is durable");
            found.push(Anchor::decode(buf.block(0), &DEV, offset).expect("anchor"));
            c.complete(id, Some(buf), Ok(()));
        }
        assert_eq!(found[0], found[1], "both slots hold the same anchor");
        found[0]
    }

    #[test]
    fn an_anchor_counts_only_once_both_slots_hold_it() {
        let mut c = core(64, LogConfig::default());
        c.append(vec![1; 10], 1).unwrap();
        for (id, _, buf) in writes(&mut c) {
            c.complete(id, Some(buf), Ok(()));
        }
        assert_eq!(acked(&mut c), vec![1]);
        c.release(c.stats().durable_seq);
        let Some(IoRequest::Write { id, buf, .. }) = c.poll_io() else {
            panic!("anchor write expected")
        };
        c.complete(id, Some(buf), Ok(()));
        assert_eq!(c.stats().tail_seq, 1, "one copy durable is not enough");
        let Some(IoRequest::Write { id, offset, buf, .. }) = c.poll_io() else {
            panic!("second copy expected")
        };
        assert_eq!(offset, block_offset(ANCHOR_BLOCKS[1]));
        c.complete(id, Some(buf), Ok(()));
        assert_eq!(c.stats().tail_seq, 2);
    }

    fn writes(c: &mut LogCore<u32>) -> Vec<(u64, u64, AlignedBuf)> {
        let mut out = Vec::new();
        while let Some(req) = c.poll_io() {
            match req {
                IoRequest::Write { id, offset, buf, .. } => out.push((id, offset, buf)),
                IoRequest::Flush { .. } => panic!("no flush in dsync mode"),
            }
        }
        out
    }

    /// Writes (and completes) whatever the log will write now, until it
    /// writes nothing more: everything queued, or as much as fits.
    fn write_all(c: &mut LogCore<u32>) {
        loop {
            let w = writes(c);
            if w.is_empty() {
                return;
            }
            for (id, _, buf) in w {
                c.complete(id, Some(buf), Ok(()));
            }
        }
    }

    fn acked(c: &mut LogCore<u32>) -> Vec<u32> {
        std::iter::from_fn(|| c.poll_acked().map(|(t, _)| t)).collect()
    }

    #[test]
    fn acks_wait_for_every_earlier_write() {
        let cfg = LogConfig {
            write_blocks_max: 4,
            writes_inflight_max: 4,
            ..LogConfig::default()
        };
        let mut c = core(64, cfg);
        c.append(vec![1; 100], 1).unwrap();
        let w1 = writes(&mut c);
        c.append(vec![2; 100], 2).unwrap();
        let w2 = writes(&mut c);
        assert_eq!((w1.len(), w2.len()), (1, 1));
        // The second write completes first: nothing may be acknowledged.
        let (id2, _, b2) = w2.into_iter().next().unwrap();
        c.complete(id2, Some(b2), Ok(()));
        assert!(acked(&mut c).is_empty());
        let (id1, _, b1) = w1.into_iter().next().unwrap();
        c.complete(id1, Some(b1), Ok(()));
        assert_eq!(acked(&mut c), vec![1, 2]);
        assert_eq!(c.stats().durable_seq, 3);
    }

    #[test]
    fn queued_entries_share_blocks_and_large_ones_split() {
        let cfg = LogConfig {
            write_blocks_max: 8,
            writes_inflight_max: 1,
            ..LogConfig::default()
        };
        let mut c = core(64, cfg);
        for i in 0..40 {
            c.append(vec![i as u8; 125], i).unwrap();
        }
        c.append(vec![0xEE; 10_000], 100).unwrap();
        let w = writes(&mut c);
        assert_eq!(w.len(), 1);
        let (id, offset, buf) = w.into_iter().next().unwrap();
        // 40 × 128 bytes of small entries + a 10 000-byte entry: 4 blocks.
        assert_eq!(buf.blocks(), 4);
        let mut r = Reassembler::new(ENTRY_BYTES_MAX);
        let mut out = Vec::new();
        for i in 0..buf.blocks() {
            let (h, p) = decode_block_at(buf.block(i), BlockKind::Log, &DEV, offset + (i * BLOCK_SIZE) as u64).unwrap();
            assert_eq!(h.seq, 1 + i as u64);
            r.push_block(h.seq, p, &mut out).unwrap();
        }
        assert_eq!(out.len(), 41);
        assert_eq!(out[40].1, vec![0xEE; 10_000]);
        c.complete(id, Some(buf), Ok(()));
        assert_eq!(acked(&mut c).len(), 41);
    }

    /// `call_blocks_max` bounds the blocks one append call's entries take,
    /// wherever the call lands: alone in a write, or packed after another
    /// call's last bytes. The node admits appends into room by it, so a
    /// bound too low could overfill the log again.
    #[test]
    fn a_call_never_takes_more_blocks_than_its_bound() {
        let cfg = LogConfig {
            write_blocks_max: 8,
            writes_inflight_max: 4,
            ..LogConfig::default()
        };
        for seed in 0..50u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut c = core(4096, cfg);
            // (first token, bound, the queue emptied after it) of each
            // call, in order.
            let mut calls = Vec::new();
            let mut token = 0u32;
            for _ in 0..40 {
                let lens: Vec<usize> = (0..rng.usize(1..8))
                    .map(|_| match rng.u8(0..3) {
                        0 => rng.usize(1..64),
                        1 => rng.usize(64..4100),
                        _ => rng.usize(4100..12_000),
                    })
                    .collect();
                let (first, bound) = (token, call_blocks_max(lens.iter().copied()));
                for len in lens {
                    c.append(vec![1; len], token).unwrap();
                    token += 1;
                }
                // Now and then some of what is queued is written; when all
                // of it is, the next call starts a block of its own.
                if rng.bool() {
                    for (id, _, buf) in writes(&mut c) {
                        c.complete(id, Some(buf), Ok(()));
                    }
                }
                calls.push((first, bound, c.stats().queued_entries == 0));
            }
            write_all(&mut c);
            let starts: std::collections::HashMap<u32, u64> = std::iter::from_fn(|| c.poll_acked()).collect();
            assert_eq!(starts.len(), token as usize);
            let end = c.stats().next_seq;
            for (i, &(first, bound, emptied)) in calls.iter().enumerate() {
                // The call's blocks run from its first entry's start to the
                // block the next call starts in, or the one before if the
                // next starts a block of its own.
                let from = starts[&first];
                let taken = match calls.get(i + 1) {
                    Some(&(next, _, _)) => starts[&next] - from + u64::from(!emptied),
                    None => end - from,
                };
                assert!(taken <= bound, "seed {seed}, call {i}: {taken} blocks, bound {bound}");
            }
        }
    }

    #[test]
    fn full_log_waits_for_a_durable_release() {
        let cfg = LogConfig {
            write_blocks_max: 4,
            writes_inflight_max: 8,
            ..LogConfig::default()
        };
        let mut c = core(64, cfg);
        // 64 blocks hold 64 × 4040 payload bytes: 64 entries of 4037 + 3 framing.
        for i in 0..64 {
            c.append(vec![7; 4037], i).unwrap();
        }
        let mut seqs = Vec::new();
        write_all(&mut c);
        seqs.extend(std::iter::from_fn(|| c.poll_acked()));
        assert_eq!(seqs.len(), 64);
        assert_eq!(c.stats().free_blocks, 0);
        c.append(vec![8; 10], 99).unwrap();
        assert!(writes(&mut c).is_empty(), "a full log must not write");
        c.release(seqs[10].1);
        // The release goes through the anchor first; only then is space free.
        let anchor = complete_anchor(&mut c);
        assert_eq!(anchor.tail_seq, seqs[10].1);
        let w = writes(&mut c);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].1, block_offset(256), "the log wraps to its start");
    }

    #[test]
    fn writes_never_cross_the_end_of_the_region() {
        let cfg = LogConfig {
            write_blocks_max: 16,
            writes_inflight_max: 1,
            ..LogConfig::default()
        };
        let mut c = core(10, cfg);
        c.append(vec![1; 4000 * 7], 1).unwrap();
        let w = writes(&mut c);
        let (id, _, buf) = w.into_iter().next().unwrap();
        c.complete(id, Some(buf), Ok(()));
        let (_, start) = c.poll_acked().unwrap();
        c.release(c.stats().durable_seq);
        complete_anchor(&mut c);
        assert_eq!(start, 1);
        c.append(vec![2; 4000 * 5], 2).unwrap();
        let w = writes(&mut c);
        // Seq 8 sits at position 7 of 10: three blocks remain before the wrap.
        assert_eq!(w[0].2.blocks(), 3, "stops at the end of the region");
        assert_eq!(w[0].1, block_offset(256 + 7));
    }

    #[test]
    fn a_failed_write_fails_everything_unacknowledged() {
        let mut c = core(64, LogConfig::default());
        c.append(vec![1; 10], 1).unwrap();
        let w = writes(&mut c);
        c.append(vec![2; 10], 2).unwrap();
        let (id, _, buf) = w.into_iter().next().unwrap();
        c.complete(id, Some(buf), Err(IoError::Closed));
        assert!(c.failed().is_some());
        assert!(acked(&mut c).is_empty());
        let mut failed = c.drain_failed();
        failed.sort();
        assert_eq!(failed, vec![1, 2]);
        assert!(matches!(c.append(vec![3], 3), Err((AppendError::Failed(_), 3))));
    }

    #[test]
    fn flush_mode_acks_only_after_a_flush() {
        let cfg = LogConfig {
            durability: DurabilityMode::Flush,
            ..LogConfig::default()
        };
        let mut c = core(64, cfg);
        c.append(vec![1; 10], 1).unwrap();
        let Some(IoRequest::Write {
            id, buf, durability, ..
        }) = c.poll_io()
        else {
            panic!()
        };
        assert_eq!(durability, Durability::Volatile);
        assert!(c.poll_io().is_none());
        c.complete(id, Some(buf), Ok(()));
        assert!(acked(&mut c).is_empty());
        let Some(IoRequest::Flush { id }) = c.poll_io() else {
            panic!("flush expected")
        };
        c.complete(id, None, Ok(()));
        assert_eq!(acked(&mut c), vec![1]);
    }

    #[test]
    fn release_never_cuts_an_entry_still_being_written() {
        let cfg = LogConfig {
            write_blocks_max: 2,
            writes_inflight_max: 2,
            ..LogConfig::default()
        };
        let mut c = core(64, cfg);
        // Three blocks' worth: write A holds seqs 1-2, write B seq 3.
        c.append(vec![5; 3 * 4000], 1).unwrap();
        let mut w = writes(&mut c).into_iter();
        let (a, _, abuf) = w.next().unwrap();
        let (b, _, bbuf) = w.next().unwrap();
        c.complete(a, Some(abuf), Ok(()));
        assert_eq!(c.stats().durable_seq, 3);
        c.release(u64::MAX);
        assert!(
            c.poll_io().is_none(),
            "nothing may be released below the unfinished entry"
        );
        c.complete(b, Some(bbuf), Ok(()));
        assert_eq!(c.poll_acked(), Some((1, 1)));
        c.release(u64::MAX);
        assert!(
            matches!(c.poll_io(), Some(IoRequest::Write { .. })),
            "now the anchor moves"
        );
    }

    #[test]
    fn bad_entries_are_refused() {
        let mut c = core(64, LogConfig::default());
        assert!(matches!(c.append(Vec::new(), 1), Err((AppendError::BadSize(0), 1))));
        assert!(matches!(
            c.append(vec![0; ENTRY_BYTES_MAX + 1], 2),
            Err((AppendError::BadSize(_), 2))
        ));
        let mut small = core(64, LogConfig::default());
        assert!(matches!(
            small.append(vec![0; 300_000], 3),
            Err((AppendError::LargerThanLog { .. }, 3))
        ));
        let _ = BlockError::Zero;
    }
}
