//! Finding the log again after a restart or a crash.
//!
//! 1. Read both superblock copies; they must agree (or one be readable).
//! 2. Read both anchor slots; the valid one with the higher counter gives the
//!    log's tail and generation. Every anchor is written to both slots in
//!    turn, so one bad slot (torn or damaged) never hides the newest anchor.
//! 3. Scan from the tail, block by block in seq order. A block is the log's
//!    if it checks (magic, version, kind, device, offset, CRC), carries the
//!    expected seq, and a generation no lower than the previous block of the
//!    log's and no higher than the anchor's. The scan reads on past blocks
//!    that are not, and tells a crash's torn write (only past the durable end,
//!    within the in-flight window) from damage inside the log (see
//!    [`scan_log`]).
//!
//! Memory is one scan chunk, the entry being reassembled, and one small tag
//! per block scanned: entries are handed to the caller one by one.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::io::{AlignedBuf, BLOCK_SIZE, BlockIo, IoError};

use super::core::{ENTRY_BYTES_MAX, INFLIGHT_BLOCKS_MAX, durable_mark_of};
use super::format::{Anchor, BlockError, BlockKind, Superblock, SuperblockError, decode_block_at};
use super::frag::{FragError, Reassembler};
use super::layout::{ANCHOR_BLOCKS, SUPERBLOCK_BLOCKS, block_offset};

/// Highest tail seq accepted from disk: far beyond any real log (2^62 blocks
/// is 16 ZiB written), and low enough that seq arithmetic never overflows.
pub const SEQ_MAX: u64 = 1 << 62;

/// Blocks read per I/O while scanning.
pub const SCAN_CHUNK_BLOCKS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("device I/O failed: {0}")]
    Io(#[from] IoError),
    #[error("the device is not formatted (no superblock); run `storaged format` first")]
    NotFormatted,
    #[error("no valid superblock: copy 0: {0}; copy 1: {1}")]
    NoValidSuperblock(SuperblockError, SuperblockError),
    #[error("the two superblock copies disagree: {0:?} vs {1:?}")]
    SuperblockMismatch(Box<Superblock>, Box<Superblock>),
    #[error("the device holds {actual} bytes but was formatted for {formatted}: wrong device, or it was resized")]
    SizeMismatch { formatted: u64, actual: u64 },
    #[error("no valid log anchor: slot 0: {0}; slot 1: {1}")]
    NoValidAnchor(BlockError, BlockError),
    #[error("the log anchor is inconsistent with the layout: {0:?}")]
    BadAnchor(Anchor),
    #[error("the log failed while opening: {0}")]
    Failed(String),
    #[error(
        "the log ends at block seq {end} ({why}), but every block up to seq {floor} was durable: \
         damaged blocks at the end of the log took acknowledged records, and nothing after them \
         tells which; refusing to open (storctl inspect shows the damage; rebuild this node's \
         segments from their peers, then reformat the device)"
    )]
    LogCut { end: u64, floor: u64, why: String },
    #[error(
        "log block seq {seq} was written by generation {found}, but the log anchor is at generation {anchor}: \
         the anchor is older than the log (both anchor slots were lost or rolled back); \
         refusing to open, since the log's tail and end cannot be trusted \
         (storctl inspect shows the device; rebuild this node's segments from their peers)"
    )]
    AnchorBehindLog { seq: u64, found: u32, anchor: u32 },
    #[error("segment table: {0}")]
    Table(String),
}

/// Both superblock copies as read, and the one to use.
#[derive(Debug, Clone)]
pub struct SuperblockRead {
    pub superblock: Superblock,
    pub copies: [Result<Superblock, SuperblockError>; 2],
}

async fn read_block<D: BlockIo>(dev: &D, offset: u64) -> Result<AlignedBuf, IoError> {
    let (buf, result) = dev.read(offset, AlignedBuf::zeroed_blocks(1)).await;
    result.map(|()| buf)
}

pub async fn read_superblock<D: BlockIo>(dev: &D) -> Result<SuperblockRead, OpenError> {
    let mut copies = Vec::with_capacity(2);
    for block in SUPERBLOCK_BLOCKS {
        let offset = block_offset(block);
        let buf = read_block(dev, offset).await?;
        copies.push(Superblock::decode(&buf, offset));
    }
    let copies: [Result<Superblock, SuperblockError>; 2] = [copies.remove(0), copies.remove(0)];
    let superblock = match &copies {
        [Ok(a), Ok(b)] if a != b => {
            return Err(OpenError::SuperblockMismatch(Box::new(*a), Box::new(*b)));
        }
        [Ok(a), _] | [_, Ok(a)] => *a,
        [
            Err(SuperblockError::Block(BlockError::Zero)),
            Err(SuperblockError::Block(BlockError::Zero)),
        ] => {
            return Err(OpenError::NotFormatted);
        }
        [Err(a), Err(b)] => return Err(OpenError::NoValidSuperblock(a.clone(), b.clone())),
    };
    let actual = dev.geometry().size_bytes;
    if superblock.device_bytes != actual {
        return Err(OpenError::SizeMismatch {
            formatted: superblock.device_bytes,
            actual,
        });
    }
    Ok(SuperblockRead { superblock, copies })
}

#[derive(Debug, Clone)]
pub struct AnchorRead {
    pub anchor: Anchor,
    pub slots: [Result<Anchor, BlockError>; 2],
}

pub async fn read_anchor<D: BlockIo>(dev: &D, sb: &Superblock) -> Result<AnchorRead, OpenError> {
    let mut slots = Vec::with_capacity(2);
    for block in ANCHOR_BLOCKS {
        let offset = block_offset(block);
        let buf = read_block(dev, offset).await?;
        slots.push(Anchor::decode(&buf, &sb.device_id, offset));
    }
    let slots: [Result<Anchor, BlockError>; 2] = [slots.remove(0), slots.remove(0)];
    let anchor = match &slots {
        [Ok(a), Ok(b)] => {
            if a.counter >= b.counter {
                *a
            } else {
                *b
            }
        }
        [Ok(a), Err(_)] | [Err(_), Ok(a)] => *a,
        [Err(a), Err(b)] => return Err(OpenError::NoValidAnchor(*a, *b)),
    };
    // A valid CRC does not make the numbers sane: refuse values the log
    // could never have written, before any arithmetic on them.
    let sane = anchor.tail_seq >= 1
        && anchor.tail_seq <= SEQ_MAX
        && anchor.floor_seq >= anchor.tail_seq
        && anchor.floor_seq - anchor.tail_seq <= sb.log_blocks
        && anchor.generation < u32::MAX
        && anchor.counter < u64::MAX;
    if !sane {
        return Err(OpenError::BadAnchor(anchor));
    }
    Ok(AnchorRead { anchor, slots })
}

/// Why the scan stopped: the first block that is not the log's continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEnd {
    /// A block never written.
    Zero,
    /// A valid block from an earlier lap (or, after a crash, from before it).
    Stale { found_seq: u64 },
    /// A block written by an earlier incarnation past where it ended.
    OlderGeneration { found: u32, previous: u32 },
    /// A block claiming a generation the anchor has not reached.
    FutureGeneration { found: u32, anchor: u32 },
    /// Torn, corrupt, misdirected or foreign.
    Invalid(BlockError),
    /// A valid block whose fragments do not continue the log.
    Fragments(FragError),
    /// A whole lap of valid blocks: the log is full.
    FullLap,
}

impl std::fmt::Display for LogEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogEnd::Zero => write!(f, "next block never written"),
            LogEnd::Stale { found_seq } => {
                write!(f, "next block is from an earlier lap (seq {found_seq})")
            }
            LogEnd::OlderGeneration { found, previous } => {
                write!(f, "next block is from generation {found}, older than {previous}")
            }
            LogEnd::FutureGeneration { found, anchor } => {
                write!(f, "next block claims generation {found}, beyond the anchor's {anchor}")
            }
            LogEnd::Invalid(e) => write!(f, "next block is invalid: {e}"),
            LogEnd::Fragments(e) => write!(f, "next block's entries do not continue the log: {e}"),
            LogEnd::FullLap => write!(f, "the log is full"),
        }
    }
}

/// A run of blocks inside the live log that failed their checks although
/// valid blocks of the log follow them further than any write could have
/// been in flight: damage (rot, a lost or misdirected write), not a crash's
/// torn write. Entries in it are lost; the node reports what they held as
/// holes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    pub first_seq: u64,
    pub blocks: u64,
    /// Byte offset of the first block on the device.
    pub offset: u64,
    /// Why the first block was refused.
    pub why: String,
}

impl std::fmt::Display for DamagedRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} block(s) from seq {} at device offset {}: {}",
            self.blocks, self.first_seq, self.offset, self.why
        )
    }
}

#[derive(Debug, Clone)]
pub struct ScanReport {
    pub anchor: AnchorRead,
    /// Every block below this seq was durable at some point: the anchor's
    /// floor, or the highest durable mark a block of the log recorded. A log
    /// that ends below it lost durable blocks.
    pub durable_floor: u64,
    /// First seq after the valid log: where the next write goes.
    pub next_seq: u64,
    pub end: LogEnd,
    pub blocks: u64,
    pub entries: u64,
    /// Bytes of a final entry whose end never became durable (dropped).
    pub incomplete_tail_bytes: usize,
    /// Bytes of entries an earlier incarnation left unfinished before it crashed.
    pub abandoned_bytes: usize,
    /// Damaged runs of blocks inside the live log, lowest first. The scan
    /// went on past each; entries wholly after it were handed out.
    pub damaged: Vec<DamagedRange>,
    /// Bytes of entries cut by a damaged run (their other pieces dropped).
    pub damaged_entry_bytes: usize,
    /// Blocks past a torn write at the end that were dropped: valid blocks
    /// of writes that completed while an earlier one did not, so none of
    /// their entries was ever acknowledged.
    pub dropped_past_torn: u64,
    /// The highest generation any valid log block read carries. A new
    /// incarnation takes a number above it as well as above the anchor's.
    pub highest_generation: u32,
    /// The first block found at its own seq with a generation above the
    /// anchor's, `(seq, generation)`: proof that a newer anchor was durable
    /// and is gone. The log's tail and end cannot be trusted then.
    pub future_generation: Option<(u64, u32)>,
}

/// How far the scan reads past the last valid block looking for more. A run
/// of bad blocks shorter than this inside the log is found to be damage; a
/// longer one reads as the end of the log, and below the anchor's floor the
/// log is refused.
pub const LOOKAHEAD_BLOCKS: u64 = INFLIGHT_BLOCKS_MAX;

/// What the first pass found at one seq.
#[derive(Debug, Clone, Copy)]
enum Seen {
    /// The log's own block at this seq, of this generation.
    Live(u32),
    /// Anything else (why is kept for the first block of each run).
    Other,
}

/// Scan the log and hand each entry, with the seq of the block it starts in,
/// to `on_entry` in order.
///
/// The log's blocks describe themselves (seq, generation), so the scan does
/// not stop at the first bad block: it reads on, up to [`LOOKAHEAD_BLOCKS`]
/// past the last valid one (and at least to the anchor's floor), and then
/// decides for each run of bad blocks followed by valid ones:
/// - a **torn write** if the run starts at or above the durable floor (the
///   anchor's floor, or the highest durable mark a later block recorded:
///   blocks below it were durable) and every valid block
///   after it lies within the in-flight window of it: a crash cut writes
///   that were in flight, and nothing from the run on was ever
///   acknowledged. The log ends at the run; the valid blocks after it are
///   dropped.
/// - **damage** otherwise: reported in [`ScanReport::damaged`], and the
///   entries after it are kept.
///
/// Blocks before the first bad one are handed out as they are read; those
/// after it are read a second time once the end is known.
pub async fn scan_log<D: BlockIo>(
    dev: &Arc<D>,
    sb: &Superblock,
    anchor: AnchorRead,
    mut on_entry: impl FnMut(u64, Vec<u8>),
) -> Result<ScanReport, OpenError> {
    let geometry = super::core::LogGeometry {
        device_id: sb.device_id,
        start_block: sb.log_start_block,
        blocks: sb.log_blocks,
    };
    let tail_seq = anchor.anchor.tail_seq;
    let floor_seq = anchor.anchor.floor_seq;
    let anchor_generation = anchor.anchor.generation;
    let mut reassembler = Reassembler::new(ENTRY_BYTES_MAX);
    let mut seq = tail_seq;
    // Generation of the last block taken as the log's.
    let mut last_generation = 0u32;
    let mut highest_generation = anchor_generation;
    let mut future: Option<(u64, u32)> = None;
    let mut entries = 0u64;
    let mut abandoned_bytes = 0usize;
    let mut out = Vec::new();
    let mut seen: Vec<Seen> = Vec::new();
    let mut run_reasons: BTreeMap<u64, LogEnd> = BTreeMap::new();
    // Seq after the last block taken as the log's.
    let mut live_end = tail_seq;
    // Entries are handed out as read until the first bad block.
    let mut first_bad: Option<u64> = None;
    // Every block below it is known to have been durable: the anchor's
    // floor, raised by the durable marks the log's blocks carry.
    let mut durable_floor = floor_seq;
    let mut generation_at_first_bad = 0u32;
    let mut buf = AlignedBuf::zeroed_blocks(SCAN_CHUNK_BLOCKS);
    'scan: loop {
        let pos = (seq - 1) % geometry.blocks;
        let chunk = (SCAN_CHUNK_BLOCKS as u64).min(geometry.blocks - pos) as usize;
        buf.set_blocks(chunk);
        let (b, result) = dev.read(geometry.offset_of(seq), buf).await;
        buf = b;
        result?;
        for i in 0..chunk {
            if seq - tail_seq == geometry.blocks || (seq >= durable_floor && seq - live_end >= LOOKAHEAD_BLOCKS) {
                break 'scan;
            }
            let offset = geometry.offset_of(seq);
            let verdict = match decode_block_at(buf.block(i), BlockKind::Log, &sb.device_id, offset) {
                Err(BlockError::Zero) => Err(LogEnd::Zero),
                Err(e) => Err(LogEnd::Invalid(e)),
                Ok((header, payload)) => {
                    highest_generation = highest_generation.max(header.generation);
                    if header.seq != seq {
                        Err(LogEnd::Stale { found_seq: header.seq })
                    } else if header.generation > anchor_generation {
                        future.get_or_insert((seq, header.generation));
                        Err(LogEnd::FutureGeneration {
                            found: header.generation,
                            anchor: anchor_generation,
                        })
                    } else if header.generation < last_generation {
                        Err(LogEnd::OlderGeneration {
                            found: header.generation,
                            previous: last_generation,
                        })
                    } else if first_bad.is_none() {
                        if header.generation > last_generation {
                            abandoned_bytes += reassembler.abandon_partial();
                        }
                        match reassembler.push_block(seq, payload, &mut out) {
                            Ok(()) => Ok((header.generation, durable_mark_of(seq, header.flags))),
                            Err(e) => Err(LogEnd::Fragments(e)),
                        }
                    } else {
                        Ok((header.generation, durable_mark_of(seq, header.flags)))
                    }
                }
            };
            match verdict {
                Ok((generation, mark)) => {
                    if let Some(mark) = mark {
                        durable_floor = durable_floor.max(mark);
                    }
                    seen.push(Seen::Live(generation));
                    last_generation = generation;
                    live_end = seq + 1;
                    for (start, entry) in out.drain(..) {
                        entries += 1;
                        on_entry(start, entry);
                    }
                }
                Err(why) => {
                    if !matches!(seen.last(), Some(Seen::Other)) {
                        run_reasons.insert(seq, why);
                    }
                    if first_bad.is_none() {
                        first_bad = Some(seq);
                        generation_at_first_bad = last_generation;
                    }
                    seen.push(Seen::Other);
                }
            }
            seq += 1;
        }
    }
    // Runs of bad blocks with valid blocks after them, lowest first.
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    for s in tail_seq..live_end {
        if matches!(seen[(s - tail_seq) as usize], Seen::Other) {
            match gaps.last_mut() {
                Some((start, n)) if *start + *n == s => *n += 1,
                _ => gaps.push((s, 1)),
            }
        }
    }
    // The window of the incarnation that wrote last: the anchor's if it is
    // the current one, else the largest any configuration allows.
    let window = match seen.get((live_end - tail_seq).wrapping_sub(1) as usize) {
        Some(Seen::Live(g)) if *g == anchor_generation && anchor.anchor.inflight_blocks > 0 => {
            anchor.anchor.inflight_blocks
        }
        _ => INFLIGHT_BLOCKS_MAX,
    };
    let torn_at = gaps
        .iter()
        .map(|&(start, _)| start)
        .find(|&start| start >= durable_floor && live_end - start <= window);
    let next_seq = torn_at.unwrap_or(live_end);
    let dropped_past_torn = torn_at.map_or(0, |start| live_end - start);
    let end = if next_seq - tail_seq == geometry.blocks {
        LogEnd::FullLap
    } else {
        run_reasons.get(&next_seq).cloned().unwrap_or(LogEnd::Zero)
    };
    let mut damaged: Vec<DamagedRange> = gaps
        .iter()
        .filter(|&&(start, _)| start < next_seq)
        .map(|&(start, n)| DamagedRange {
            first_seq: start,
            blocks: n,
            offset: geometry.offset_of(start),
            why: run_reasons.get(&start).map(ToString::to_string).unwrap_or_default(),
        })
        .collect();
    let mut damaged_entry_bytes = 0usize;
    // Second pass: the blocks after the first damaged run, now that it is
    // known which are the log's.
    if let Some(first) = first_bad.filter(|&f| f < next_seq) {
        let mut seq = first;
        let mut last_generation = generation_at_first_bad;
        let mut resync_pending = true;
        let mut extra_damage = Vec::new();
        'again: while seq < next_seq {
            let pos = (seq - 1) % geometry.blocks;
            let chunk = (SCAN_CHUNK_BLOCKS as u64)
                .min(geometry.blocks - pos)
                .min(next_seq - seq) as usize;
            buf.set_blocks(chunk);
            let (b, result) = dev.read(geometry.offset_of(seq), buf).await;
            buf = b;
            result?;
            for i in 0..chunk {
                let Seen::Live(generation) = seen[(seq - tail_seq) as usize] else {
                    resync_pending = true;
                    seq += 1;
                    continue;
                };
                if resync_pending {
                    damaged_entry_bytes += reassembler.resync();
                    resync_pending = false;
                }
                let offset = geometry.offset_of(seq);
                let payload = match decode_block_at(buf.block(i), BlockKind::Log, &sb.device_id, offset) {
                    Ok((header, payload)) if header.seq == seq && header.generation == generation => payload,
                    // It read well a moment ago: the device is failing.
                    other => {
                        return Err(OpenError::Failed(format!(
                            "log block seq {seq} at offset {offset} read differently twice: {:?}",
                            other.map(|(h, _)| h)
                        )));
                    }
                };
                if generation > last_generation {
                    abandoned_bytes += reassembler.abandon_partial();
                }
                last_generation = generation;
                if let Err(e) = reassembler.push_block(seq, payload, &mut out) {
                    // A valid block whose pieces do not fit where it sits:
                    // its entries are lost like a damaged block's.
                    extra_damage.push(DamagedRange {
                        first_seq: seq,
                        blocks: 1,
                        offset,
                        why: LogEnd::Fragments(e).to_string(),
                    });
                    resync_pending = true;
                    seq += 1;
                    continue;
                }
                for (start, entry) in out.drain(..) {
                    entries += 1;
                    on_entry(start, entry);
                }
                seq += 1;
                if seq >= next_seq {
                    break 'again;
                }
            }
        }
        damaged.extend(extra_damage);
        damaged.sort_by_key(|d| d.first_seq);
    }
    Ok(ScanReport {
        anchor,
        durable_floor,
        next_seq,
        end,
        blocks: next_seq - tail_seq,
        entries,
        incomplete_tail_bytes: reassembler.incomplete_bytes(),
        abandoned_bytes,
        damaged,
        damaged_entry_bytes,
        dropped_past_torn,
        highest_generation,
        future_generation: future,
    })
}

const _: () = assert!(SCAN_CHUNK_BLOCKS * BLOCK_SIZE <= 1024 * 1024);
