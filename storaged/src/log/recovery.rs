//! Finding the log again after a restart or a crash.
//!
//! 1. Read both superblock copies; they must agree (or one be readable).
//! 2. Read both anchor slots; the valid one with the higher counter gives the
//!    log's tail and generation.
//! 3. Scan from the tail, block by block in seq order, and stop at the first
//!    block that is not the exact expected continuation: wrong magic, version,
//!    kind, device, offset or CRC (torn, misdirected, foreign, corrupt), a seq
//!    other than the next one (stale from an earlier lap, or never written),
//!    a generation lower than its predecessor's (left past the end by an
//!    earlier incarnation) or higher than the anchor's, or bad fragments.
//!
//! Memory is one scan chunk plus the entry being reassembled, whatever the
//! log's size: entries are handed to the caller one by one.

use std::sync::Arc;

use crate::io::{AlignedBuf, BLOCK_SIZE, BlockIo, IoError};

use super::core::ENTRY_BYTES_MAX;
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
         a damaged block cut the log and acknowledged records after it would be lost; \
         refusing to open (storctl inspect shows the damage)"
    )]
    LogCut { end: u64, floor: u64, why: String },
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

#[derive(Debug, Clone)]
pub struct ScanReport {
    pub anchor: AnchorRead,
    /// First seq after the valid log.
    pub next_seq: u64,
    pub end: LogEnd,
    pub blocks: u64,
    pub entries: u64,
    /// Bytes of a final entry whose end never became durable (dropped).
    pub incomplete_tail_bytes: usize,
    /// Bytes of entries an earlier incarnation left unfinished before it crashed.
    pub abandoned_bytes: usize,
}

/// Scan the log and hand each entry, with the seq of the block it starts in,
/// to `on_entry` in order.
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
    let anchor_generation = anchor.anchor.generation;
    let mut reassembler = Reassembler::new(ENTRY_BYTES_MAX);
    let mut seq = tail_seq;
    let mut previous_generation = 0u32;
    let mut entries = 0u64;
    let mut abandoned_bytes = 0usize;
    let mut out = Vec::new();
    let mut buf = AlignedBuf::zeroed_blocks(SCAN_CHUNK_BLOCKS);
    let end = 'scan: loop {
        // Read a chunk of consecutive positions, without wrapping inside one read.
        let pos = (seq - 1) % geometry.blocks;
        let chunk = (SCAN_CHUNK_BLOCKS as u64).min(geometry.blocks - pos) as usize;
        buf.set_blocks(chunk);
        let (b, result) = dev.read(geometry.offset_of(seq), buf).await;
        buf = b;
        result?;
        for i in 0..chunk {
            if seq - tail_seq == geometry.blocks {
                break 'scan LogEnd::FullLap;
            }
            let offset = geometry.offset_of(seq);
            let (header, payload) = match decode_block_at(buf.block(i), BlockKind::Log, &sb.device_id, offset) {
                Ok(v) => v,
                Err(BlockError::Zero) => break 'scan LogEnd::Zero,
                Err(e) => break 'scan LogEnd::Invalid(e),
            };
            if header.seq != seq {
                break 'scan LogEnd::Stale { found_seq: header.seq };
            }
            if header.generation < previous_generation {
                break 'scan LogEnd::OlderGeneration {
                    found: header.generation,
                    previous: previous_generation,
                };
            }
            if header.generation > anchor_generation {
                break 'scan LogEnd::FutureGeneration {
                    found: header.generation,
                    anchor: anchor_generation,
                };
            }
            if header.generation > previous_generation {
                abandoned_bytes += reassembler.abandon_partial();
            }
            if let Err(e) = reassembler.push_block(seq, payload, &mut out) {
                break 'scan LogEnd::Fragments(e);
            }
            previous_generation = header.generation;
            for (start, entry) in out.drain(..) {
                entries += 1;
                on_entry(start, entry);
            }
            seq += 1;
        }
    };
    Ok(ScanReport {
        anchor,
        next_seq: seq,
        end,
        blocks: seq - tail_seq,
        entries,
        incomplete_tail_bytes: reassembler.incomplete_bytes(),
        abandoned_bytes,
    })
}

const _: () = assert!(SCAN_CHUNK_BLOCKS * BLOCK_SIZE <= 1024 * 1024);
