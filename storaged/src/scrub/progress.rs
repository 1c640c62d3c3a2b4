//! The scrubber's progress, kept durably so a pass resumes after a restart
//! where it was (give or take what was read since the last write) and pass
//! numbers are never given twice.
//!
//! One 4 KiB block of kind [`BlockKind::ScrubState`], written alternately
//! to the two slots [`SCRUB_STATE_BLOCKS`], like the anchor: the header's
//! `seq` is a write counter, the reader takes the valid slot with the
//! higher counter. A torn or damaged write spoils only the slot it went to,
//! which held the older state; neither slot valid (or never written) is a
//! fresh start. docs/format.md describes the payload field by field.

use thiserror::Error;

use crate::io::BLOCK_SIZE;
use crate::log::format::{
    BlockError, BlockHeader, BlockKind, DeviceId, PAYLOAD_MAX_BYTES, decode_block_at, encode_block,
};
use crate::log::layout::{SCRUB_STATE_BLOCKS, block_offset};

/// Version of the payload below; another is not read (a fresh start).
pub const PROGRESS_VERSION: u32 = 1;

const FLAG_TOUR: u32 = 1;
const FLAG_WRAPPED: u32 = 1 << 1;
const FLAG_LAST: u32 = 1 << 2;
const FLAG_LAST_PRIORITY: u32 = 1 << 3;
const FLAGS_KNOWN: u32 = FLAG_TOUR | FLAG_WRAPPED | FLAG_LAST | FLAG_LAST_PRIORITY;

/// version, flags, passes, then the tour's 9 fields and the last pass's 7.
const PAYLOAD_BYTES: usize = 4 + 4 + 8 + 9 * 8 + 7 * 8;
const _: () = assert!(PAYLOAD_BYTES <= PAYLOAD_MAX_BYTES);

/// What is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The highest pass number given out (background or priority): the
    /// next pass is numbered one above.
    pub passes: u64,
    /// The background pass under way, if any.
    pub tour: Option<TourProgress>,
    /// The last pass completed.
    pub last: Option<PassSummary>,
}

/// Where the background pass is. Its tour goes up the device from
/// `start_block` to the end of the last area, then from the first area up
/// to `start_block`; everything before `cursor` on that way is done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TourProgress {
    pub pass: u64,
    pub start_block: u64,
    /// The first device block not yet verified.
    pub cursor: u64,
    /// On the second leg (below `start_block`).
    pub wrapped: bool,
    pub bytes_done: u64,
    pub started_unix_secs: u64,
    /// Damage of this pass so far.
    pub found: u64,
    pub repaired: u64,
    pub left: u64,
}

/// The counts of a completed pass (its report without the per-area
/// breakdown, which does not fit a block).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassSummary {
    pub pass: u64,
    pub priority: bool,
    pub started_unix_secs: u64,
    pub ended_unix_secs: u64,
    pub bytes_read: u64,
    pub found: u64,
    pub repaired: u64,
    pub left: u64,
}

/// Why a slot is not used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProgressError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("progress payload of {0} bytes, expected {PAYLOAD_BYTES}")]
    BadLength(usize),
    #[error("progress version {0}, this build reads {PROGRESS_VERSION}")]
    BadVersion(u32),
    #[error("unknown progress flags {0:#x}")]
    BadFlags(u32),
}

/// The progress as read from the slots, and the counter the next write
/// carries on from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    pub progress: Progress,
    /// The write counter of the slot taken; 0 if neither was valid.
    pub counter: u64,
}

/// The slot a write with `counter` goes to: they alternate, so the slot
/// holding the newest valid state is never the one being overwritten.
pub fn slot_block(counter: u64) -> u64 {
    SCRUB_STATE_BLOCKS[(counter % 2) as usize]
}

/// The block to write for `progress` as write number `counter` (the last
/// counter plus one), and the device block it goes to.
pub fn encode(progress: &Progress, device_id: &DeviceId, counter: u64) -> (u64, Vec<u8>) {
    let mut p = Vec::with_capacity(PAYLOAD_BYTES);
    let mut flags = 0;
    if progress.tour.is_some() {
        flags |= FLAG_TOUR;
    }
    if progress.tour.as_ref().is_some_and(|t| t.wrapped) {
        flags |= FLAG_WRAPPED;
    }
    if progress.last.is_some() {
        flags |= FLAG_LAST;
    }
    if progress.last.as_ref().is_some_and(|l| l.priority) {
        flags |= FLAG_LAST_PRIORITY;
    }
    p.extend_from_slice(&PROGRESS_VERSION.to_le_bytes());
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(&progress.passes.to_le_bytes());
    let t = progress.tour.clone().unwrap_or_default();
    for v in [
        t.pass,
        t.start_block,
        t.cursor,
        t.bytes_done,
        t.started_unix_secs,
        t.found,
        t.repaired,
        t.left,
        0, // reserved
    ] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    let l = progress.last.clone().unwrap_or_default();
    for v in [
        l.pass,
        l.started_unix_secs,
        l.ended_unix_secs,
        l.bytes_read,
        l.found,
        l.repaired,
        l.left,
    ] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    debug_assert_eq!(p.len(), PAYLOAD_BYTES);
    let block = slot_block(counter);
    let header = BlockHeader {
        kind: BlockKind::ScrubState,
        device_id: *device_id,
        offset: block_offset(block),
        seq: counter,
        generation: 0,
        payload_len: p.len() as u32,
        flags: 0,
    };
    let mut bytes = vec![0u8; BLOCK_SIZE];
    encode_block(&mut bytes, &header, &p);
    (block, bytes)
}

/// Decode the slot read from device block `block`: its counter and progress.
pub fn decode(bytes: &[u8], device_id: &DeviceId, block: u64) -> Result<(u64, Progress), ProgressError> {
    if bytes.len() != BLOCK_SIZE {
        return Err(ProgressError::BadLength(bytes.len()));
    }
    let (header, p) = decode_block_at(bytes, BlockKind::ScrubState, device_id, block_offset(block))?;
    if p.len() != PAYLOAD_BYTES {
        return Err(ProgressError::BadLength(p.len()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(0);
    if version != PROGRESS_VERSION {
        return Err(ProgressError::BadVersion(version));
    }
    let flags = u32_at(4);
    if flags & !FLAGS_KNOWN != 0 {
        return Err(ProgressError::BadFlags(flags));
    }
    let passes = u64_at(8);
    let t = |i: usize| u64_at(16 + 8 * i);
    let tour = (flags & FLAG_TOUR != 0).then(|| TourProgress {
        pass: t(0),
        start_block: t(1),
        cursor: t(2),
        wrapped: flags & FLAG_WRAPPED != 0,
        bytes_done: t(3),
        started_unix_secs: t(4),
        found: t(5),
        repaired: t(6),
        left: t(7),
    });
    let l = |i: usize| u64_at(16 + 9 * 8 + 8 * i);
    let last = (flags & FLAG_LAST != 0).then(|| PassSummary {
        pass: l(0),
        priority: flags & FLAG_LAST_PRIORITY != 0,
        started_unix_secs: l(1),
        ended_unix_secs: l(2),
        bytes_read: l(3),
        found: l(4),
        repaired: l(5),
        left: l(6),
    });
    Ok((header.seq, Progress { passes, tour, last }))
}

/// Take the newest valid of the two slots (as read from
/// [`SCRUB_STATE_BLOCKS`] in order; a read that failed is `None`).
/// Returns it and why each slot was not taken, if it was not.
pub fn choose(slots: [Option<&[u8]>; 2], device_id: &DeviceId) -> (Loaded, [Option<ProgressError>; 2]) {
    let mut best: Option<(u64, Progress)> = None;
    let mut errors = [None, None];
    for (i, bytes) in slots.into_iter().enumerate() {
        let Some(bytes) = bytes else { continue };
        match decode(bytes, device_id, SCRUB_STATE_BLOCKS[i]) {
            Ok((counter, progress)) => {
                // A counter's parity names its slot: a block that says
                // otherwise was copied there by something else.
                if slot_block(counter) != SCRUB_STATE_BLOCKS[i] {
                    errors[i] = Some(ProgressError::Block(BlockError::Misplaced {
                        expected: block_offset(SCRUB_STATE_BLOCKS[i]),
                        found: block_offset(slot_block(counter)),
                    }));
                    continue;
                }
                if best.as_ref().is_none_or(|(c, _)| counter > *c) {
                    best = Some((counter, progress));
                }
            }
            Err(e) => errors[i] = Some(e),
        }
    }
    let loaded = match best {
        Some((counter, progress)) => Loaded { progress, counter },
        None => Loaded::default(),
    };
    (loaded, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: DeviceId = [7; 16];

    fn sample(n: u64) -> Progress {
        Progress {
            passes: 40 + n,
            tour: Some(TourProgress {
                pass: 40 + n,
                start_block: 1000,
                cursor: 123_456 + n,
                wrapped: n % 2 == 1,
                bytes_done: 5 << 30,
                started_unix_secs: 1_700_000_000,
                found: 3,
                repaired: 2,
                left: 1,
            }),
            last: Some(PassSummary {
                pass: 39,
                priority: true,
                started_unix_secs: 1_690_000_000,
                ended_unix_secs: 1_690_086_400,
                bytes_read: 3 << 40,
                found: 9,
                repaired: 7,
                left: 2,
            }),
        }
    }

    /// The two slots after `writes` writes of `sample(1..=writes)`.
    fn written(writes: u64) -> [Vec<u8>; 2] {
        let mut slots = [vec![0u8; BLOCK_SIZE], vec![0u8; BLOCK_SIZE]];
        for counter in 1..=writes {
            let (block, bytes) = encode(&sample(counter), &DEV, counter);
            let i = SCRUB_STATE_BLOCKS.iter().position(|&b| b == block).expect("a slot");
            slots[i] = bytes;
        }
        slots
    }

    fn load(slots: &[Vec<u8>; 2]) -> Loaded {
        choose([Some(&slots[0][..]), Some(&slots[1][..])], &DEV).0
    }

    #[test]
    fn encodes_and_decodes_every_field() {
        for p in [Progress::default(), sample(1), sample(2)] {
            let (block, bytes) = encode(&p, &DEV, 9);
            let (counter, back) = decode(&bytes, &DEV, block).expect("valid");
            assert_eq!((counter, back), (9, p));
        }
        let partial = Progress {
            passes: 1,
            tour: None,
            last: sample(1).last,
        };
        let (block, bytes) = encode(&partial, &DEV, 2);
        assert_eq!(decode(&bytes, &DEV, block).expect("valid").1, partial);
    }

    #[test]
    fn never_written_is_a_fresh_start() {
        let loaded = load(&[vec![0u8; BLOCK_SIZE], vec![0u8; BLOCK_SIZE]]);
        assert_eq!(loaded, Loaded::default());
        let (loaded, errors) = choose([None, None], &DEV);
        assert_eq!(loaded, Loaded::default());
        assert_eq!(errors, [None, None]);
    }

    #[test]
    fn takes_the_newer_slot() {
        for writes in 1..6 {
            let loaded = load(&written(writes));
            assert_eq!(loaded.counter, writes);
            assert_eq!(loaded.progress, sample(writes));
        }
    }

    #[test]
    fn a_damaged_slot_falls_back_to_the_other() {
        for damaged in 0..2 {
            let mut slots = written(5);
            let newest = SCRUB_STATE_BLOCKS
                .iter()
                .position(|&b| b == slot_block(5))
                .expect("slot");
            slots[damaged][100] ^= 0x10;
            let loaded = load(&slots);
            if damaged == newest {
                assert_eq!((loaded.counter, loaded.progress), (4, sample(4)));
            } else {
                assert_eq!((loaded.counter, loaded.progress), (5, sample(5)));
            }
            // A slot that cannot be read at all is the same.
            let mut reads = [Some(&slots[0][..]), Some(&slots[1][..])];
            reads[1 - damaged] = None;
            let (loaded, errors) = choose(reads, &DEV);
            assert_eq!(loaded, Loaded::default());
            assert!(errors[damaged].is_some());
        }
    }

    #[test]
    fn a_torn_write_keeps_the_state_before_it() {
        // Write 7 goes to the slot holding write 5; only part of it lands
        // (the header and the first payload bytes, or all but the header).
        let (block, bytes) = encode(&sample(7), &DEV, 7);
        let i = SCRUB_STATE_BLOCKS.iter().position(|&b| b == block).expect("slot");
        for torn in [0..64, 512..BLOCK_SIZE, 64..BLOCK_SIZE] {
            let mut slots = written(6);
            slots[i][torn.clone()].copy_from_slice(&bytes[torn]);
            let loaded = load(&slots);
            assert_eq!((loaded.counter, loaded.progress), (6, sample(6)));
        }
    }

    #[test]
    fn foreign_misplaced_or_swapped_blocks_are_not_taken() {
        let slots = written(2);
        // Another device's progress.
        let (loaded, errors) = choose([Some(&slots[0][..]), Some(&slots[1][..])], &[8; 16]);
        assert_eq!(loaded, Loaded::default());
        assert!(matches!(
            errors[0],
            Some(ProgressError::Block(BlockError::ForeignDevice))
        ));
        // The slots swapped (a misdirected write of each).
        let swapped = [slots[1].clone(), slots[0].clone()];
        assert_eq!(load(&swapped), Loaded::default());
        // Both slots holding the same block (one write landed on both).
        let same = [slots[0].clone(), slots[0].clone()];
        let loaded = load(&same);
        assert_eq!(loaded.counter, 2);
    }

    #[test]
    fn another_version_or_unknown_flags_are_refused() {
        let (block, mut bytes) = encode(&sample(1), &DEV, 1);
        let header = crate::log::format::decode_block(&bytes).expect("valid").0;
        let mut payload = bytes[crate::log::format::HEADER_BYTES..][..PAYLOAD_BYTES].to_vec();
        payload[0] = 2;
        encode_block(&mut bytes, &header, &payload);
        assert_eq!(decode(&bytes, &DEV, block), Err(ProgressError::BadVersion(2)));
        payload[0] = 1;
        payload[4] = 0x80;
        encode_block(&mut bytes, &header, &payload);
        assert_eq!(decode(&bytes, &DEV, block), Err(ProgressError::BadFlags(0x80)));
    }
}
