//! The page store: where coalesced page versions live, out of place.
//!
//! Each segment owns one extent of the device's page store region, given to
//! it when the segment is created and recorded in the segment table. The
//! extent is direct-mapped: the segment's page with local index `i` (its page
//! number minus `pg * pg_pages`) has two version slots side by side, each
//! `slot_blocks` blocks long. A new version is always written into the slot
//! that does not hold the current one, so a torn write never damages the
//! version readers use, and no index has to be loaded or rebuilt at start-up:
//! where a page lives is arithmetic, and which slot is current is read from
//! the slots themselves (the valid one with the higher LSN).
//!
//! Every block of a slot is a self-describing block (`docs/format.md`): kind
//! `PageVersion`, its own offset, `seq` = the version's LSN, `generation` =
//! the block's index in the slot. The first block's payload starts with the
//! version header (volume, PG, page size, page, LSN); the page bytes follow,
//! continuing through the slot's other blocks. Blocks of one slot that carry
//! different LSNs are a torn write.
//!
//! Sans-IO: the node reads and writes the slots; this module says where they
//! are and what their bytes mean.

use crate::log::format::{
    BlockError, BlockHeader, BlockKind, DeviceId, PAYLOAD_MAX_BYTES, decode_block_at, seal_block,
};
use crate::log::format::{HEADER_BYTES, decode_block};
use crate::log::layout::block_offset;
use crate::record::SegmentId;

/// The version header at the start of a slot's first payload.
pub const VERSION_HEADER_BYTES: usize = 32;
/// Two slots per page: the current version and room for the next.
pub const SLOTS_PER_PAGE: u64 = 2;

/// A segment's piece of the page store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start_block: u64,
    pub page_bytes: u32,
    pub pg_pages: u64,
}

impl Extent {
    /// Blocks one version of a `page_bytes` page takes.
    pub fn slot_blocks_for(page_bytes: u32) -> u64 {
        (page_bytes as usize + VERSION_HEADER_BYTES).div_ceil(PAYLOAD_MAX_BYTES) as u64
    }

    /// Blocks an extent of `pg_pages` pages takes, if that is a number.
    pub fn blocks_for(page_bytes: u32, pg_pages: u64) -> Option<u64> {
        pg_pages
            .checked_mul(SLOTS_PER_PAGE)?
            .checked_mul(Self::slot_blocks_for(page_bytes))
    }

    pub fn slot_blocks(&self) -> u64 {
        Self::slot_blocks_for(self.page_bytes)
    }

    pub fn blocks(&self) -> u64 {
        self.pg_pages * SLOTS_PER_PAGE * self.slot_blocks()
    }

    pub fn end_block(&self) -> u64 {
        self.start_block + self.blocks()
    }

    /// The local index of `page` if segment `pg` holds it.
    pub fn local(&self, pg: u32, page: u64) -> Option<u64> {
        let first = (pg as u64).checked_mul(self.pg_pages)?;
        page.checked_sub(first).filter(|&i| i < self.pg_pages)
    }

    /// First block of slot `slot` (0 or 1) of the page with local index `local`.
    pub fn slot_block(&self, local: u64, slot: usize) -> u64 {
        debug_assert!(local < self.pg_pages && (slot as u64) < SLOTS_PER_PAGE);
        self.start_block + (local * SLOTS_PER_PAGE + slot as u64) * self.slot_blocks()
    }
}

/// A coalesced page: its bytes as of `lsn`, the last change applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageVersion {
    pub lsn: u64,
    pub bytes: Vec<u8>,
}

/// Why a slot's bytes are not a version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("block {index} of the slot: {source}")]
    Block { index: usize, source: BlockError },
    #[error("the slot's blocks belong to different versions (a torn write)")]
    Torn,
    #[error("the version header names {0}")]
    Mismatch(String),
}

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Never written by this device's format: zeros, or blocks that are not
    /// ours (another format's, a raw device's old contents).
    Empty,
    Version(PageVersion),
    /// Ours but not whole: torn by a crash while it was being written, or damaged since.
    Damaged(SlotError),
}

/// Fill `slot` (exactly `slot_blocks` blocks) with a version of `page`.
///
/// # Panics
/// If `slot` or `bytes` are not the sizes the extent says: callers size both.
pub fn encode_version(
    slot: &mut [u8],
    device_id: DeviceId,
    extent: &Extent,
    segment: SegmentId,
    page: u64,
    slot_block: u64,
    version: &PageVersion,
) {
    let blocks = extent.slot_blocks() as usize;
    assert_eq!(slot.len(), blocks * crate::io::BLOCK_SIZE);
    assert_eq!(version.bytes.len(), extent.page_bytes as usize);
    let mut header = [0u8; VERSION_HEADER_BYTES];
    header[0..8].copy_from_slice(&segment.volume.to_le_bytes());
    header[8..12].copy_from_slice(&segment.pg.to_le_bytes());
    header[12..16].copy_from_slice(&extent.page_bytes.to_le_bytes());
    header[16..24].copy_from_slice(&page.to_le_bytes());
    header[24..32].copy_from_slice(&version.lsn.to_le_bytes());
    // The slot's payload is the header then the page, cut into blocks.
    let mut rest: &[u8] = &version.bytes;
    for (index, block) in slot.chunks_exact_mut(crate::io::BLOCK_SIZE).enumerate() {
        let payload = &mut block[HEADER_BYTES..];
        let mut used = 0;
        if index == 0 {
            payload[..VERSION_HEADER_BYTES].copy_from_slice(&header);
            used = VERSION_HEADER_BYTES;
        }
        let take = rest.len().min(PAYLOAD_MAX_BYTES - used);
        payload[used..used + take].copy_from_slice(&rest[..take]);
        payload[used + take..].fill(0);
        rest = &rest[take..];
        let h = BlockHeader {
            kind: BlockKind::PageVersion,
            device_id,
            offset: block_offset(slot_block + index as u64),
            seq: version.lsn,
            generation: index as u32,
            payload_len: (used + take) as u32,
            flags: 0,
        };
        seal_block(block, &h);
    }
    debug_assert!(rest.is_empty());
}

/// Read a slot's bytes as a version of `page` of `segment`.
pub fn decode_slot(
    slot: &[u8],
    device_id: &DeviceId,
    extent: &Extent,
    segment: SegmentId,
    page: u64,
    slot_block: u64,
) -> Slot {
    let blocks = extent.slot_blocks() as usize;
    debug_assert_eq!(slot.len(), blocks * crate::io::BLOCK_SIZE);
    let mut ours = 0;
    let mut first_error = None;
    for (index, block) in slot.chunks_exact(crate::io::BLOCK_SIZE).enumerate() {
        match decode_block(block) {
            Ok((h, _)) if h.device_id == *device_id => ours += 1,
            // Our magic and device but a bad CRC: ours, damaged.
            Err(source @ BlockError::BadCrc { .. }) if block[8..24] == device_id[..] => {
                ours += 1;
                first_error.get_or_insert(SlotError::Block { index, source });
            }
            _ => {}
        }
    }
    if ours == 0 {
        return Slot::Empty;
    }
    if let Some(e) = first_error {
        return Slot::Damaged(e);
    }
    let mut bytes = Vec::with_capacity(extent.page_bytes as usize);
    let mut lsn = None;
    for (index, block) in slot.chunks_exact(crate::io::BLOCK_SIZE).enumerate() {
        let offset = block_offset(slot_block + index as u64);
        let (h, payload) = match decode_block_at(block, BlockKind::PageVersion, device_id, offset) {
            Ok(x) => x,
            Err(source) => return Slot::Damaged(SlotError::Block { index, source }),
        };
        if h.generation != index as u32 || *lsn.get_or_insert(h.seq) != h.seq {
            return Slot::Damaged(SlotError::Torn);
        }
        let mut data = payload;
        if index == 0 {
            if data.len() < VERSION_HEADER_BYTES {
                return Slot::Damaged(SlotError::Mismatch("a short header".into()));
            }
            let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
            let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
            let (volume, pg, page_bytes, at_page, at_lsn) = (u64_at(0), u32_at(8), u32_at(12), u64_at(16), u64_at(24));
            if volume != segment.volume || pg != segment.pg || page_bytes != extent.page_bytes || at_page != page {
                return Slot::Damaged(SlotError::Mismatch(format!(
                    "volume {volume} pg {pg} page {at_page} of {page_bytes} bytes, not volume {} pg {} page {page} of {} bytes",
                    segment.volume, segment.pg, extent.page_bytes
                )));
            }
            if Some(at_lsn) != lsn {
                return Slot::Damaged(SlotError::Torn);
            }
            data = &data[VERSION_HEADER_BYTES..];
        }
        bytes.extend_from_slice(data);
    }
    if bytes.len() != extent.page_bytes as usize {
        return Slot::Damaged(SlotError::Mismatch(format!("{} page bytes", bytes.len())));
    }
    Slot::Version(PageVersion {
        lsn: lsn.unwrap_or(0),
        bytes,
    })
}

/// Which slot holds the current version, given both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Current {
    /// Neither slot was ever written: the page is zeros as of LSN 0, and
    /// the next version goes to slot 0.
    Never,
    Version {
        slot: usize,
        version: PageVersion,
    },
}

/// Pick the current version from both slots. A damaged slot is allowed only
/// while a coalescing round that may have torn it is unfinished
/// (`round_open`): the round writes only into slots that are not current,
/// so the other slot is the current one. Outside a round a damaged slot is
/// damage, and the page cannot be trusted from this segment.
pub fn current(slots: [Slot; 2], round_open: bool) -> Result<Current, SlotError> {
    let [a, b] = slots;
    let pick = |slot: usize, v: PageVersion| Current::Version { slot, version: v };
    match (a, b) {
        (Slot::Empty, Slot::Empty) => Ok(Current::Never),
        (Slot::Version(v), Slot::Empty) => Ok(pick(0, v)),
        (Slot::Empty, Slot::Version(v)) => Ok(pick(1, v)),
        (Slot::Version(x), Slot::Version(y)) => Ok(if y.lsn > x.lsn { pick(1, y) } else { pick(0, x) }),
        (Slot::Version(v), Slot::Damaged(_)) if round_open => Ok(pick(0, v)),
        (Slot::Damaged(_), Slot::Version(v)) if round_open => Ok(pick(1, v)),
        (Slot::Empty, Slot::Damaged(_)) | (Slot::Damaged(_), Slot::Empty) if round_open => Ok(Current::Never),
        (Slot::Damaged(e), _) | (_, Slot::Damaged(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::BLOCK_SIZE;

    const DEV: DeviceId = [7; 16];
    const SEG: SegmentId = SegmentId { volume: 3, pg: 2 };

    fn extent(page_bytes: u32) -> Extent {
        Extent {
            start_block: 1000,
            page_bytes,
            pg_pages: 16,
        }
    }

    fn encoded(e: &Extent, page: u64, local: u64, slot: usize, lsn: u64, fill: u8) -> Vec<u8> {
        let mut buf = vec![0u8; e.slot_blocks() as usize * BLOCK_SIZE];
        let v = PageVersion {
            lsn,
            bytes: (0..e.page_bytes).map(|i| fill ^ i as u8).collect(),
        };
        encode_version(&mut buf, DEV, e, SEG, page, e.slot_block(local, slot), &v);
        buf
    }

    #[test]
    fn geometry_is_arithmetic() {
        assert_eq!(Extent::slot_blocks_for(4096), 2);
        assert_eq!(Extent::slot_blocks_for(8192), 3);
        assert_eq!(Extent::slot_blocks_for(512), 1);
        let e = extent(8192);
        assert_eq!(e.blocks(), 16 * 2 * 3);
        assert_eq!(e.local(2, 32), Some(0));
        assert_eq!(e.local(2, 47), Some(15));
        assert_eq!(e.local(2, 48), None);
        assert_eq!(e.local(2, 31), None);
        assert_eq!(e.slot_block(1, 1), 1000 + 3 * 3);
        assert_eq!(Extent::blocks_for(8192, u64::MAX), None);
    }

    #[test]
    fn a_version_round_trips_for_every_page_size() {
        for page_bytes in [512, 4096, 8192, 16384, 65536] {
            let e = extent(page_bytes);
            let buf = encoded(&e, 33, 1, 1, 77, 0x5a);
            match decode_slot(&buf, &DEV, &e, SEG, 33, e.slot_block(1, 1)) {
                Slot::Version(v) => {
                    assert_eq!(v.lsn, 77);
                    assert_eq!(v.bytes.len(), page_bytes as usize);
                    assert!(v.bytes.iter().enumerate().all(|(i, &b)| b == 0x5a ^ i as u8));
                }
                other => panic!("{page_bytes}: {other:?}"),
            }
        }
    }

    #[test]
    fn zeros_and_foreign_blocks_are_empty() {
        let e = extent(8192);
        let zeros = vec![0u8; 3 * BLOCK_SIZE];
        assert_eq!(decode_slot(&zeros, &DEV, &e, SEG, 32, e.slot_block(0, 0)), Slot::Empty);
        let mut other = vec![0u8; 3 * BLOCK_SIZE];
        let v = PageVersion {
            lsn: 5,
            bytes: vec![1; 8192],
        };
        encode_version(&mut other, [9; 16], &e, SEG, 32, e.slot_block(0, 0), &v);
        assert_eq!(decode_slot(&other, &DEV, &e, SEG, 32, e.slot_block(0, 0)), Slot::Empty);
    }

    #[test]
    fn torn_misplaced_and_flipped_slots_are_damaged() {
        let e = extent(8192);
        let new = encoded(&e, 32, 0, 0, 90, 1);
        let old = encoded(&e, 32, 0, 0, 40, 2);
        // A crash wrote the first block of the new version only.
        let mut torn = old.clone();
        torn[..BLOCK_SIZE].copy_from_slice(&new[..BLOCK_SIZE]);
        assert_eq!(
            decode_slot(&torn, &DEV, &e, SEG, 32, e.slot_block(0, 0)),
            Slot::Damaged(SlotError::Torn)
        );
        // Half the first block new (a torn sector), the rest old.
        let mut half = old.clone();
        half[..2048].copy_from_slice(&new[..2048]);
        assert!(matches!(
            decode_slot(&half, &DEV, &e, SEG, 32, e.slot_block(0, 0)),
            Slot::Damaged(SlotError::Block { index: 0, .. })
        ));
        let mut flipped = new.clone();
        flipped[2 * BLOCK_SIZE + 100] ^= 4;
        assert!(matches!(
            decode_slot(&flipped, &DEV, &e, SEG, 32, e.slot_block(0, 0)),
            Slot::Damaged(SlotError::Block { index: 2, .. })
        ));
        // The right bytes read from the other slot's place: misdirected.
        assert!(matches!(
            decode_slot(&new, &DEV, &e, SEG, 32, e.slot_block(0, 1)),
            Slot::Damaged(SlotError::Block { index: 0, .. })
        ));
        // Another page's version at this page's place (same offsets).
        let e2 = extent(8192);
        let wrong_page = encoded(&e2, 33, 0, 0, 90, 1);
        assert!(matches!(
            decode_slot(&wrong_page, &DEV, &e, SEG, 32, e.slot_block(0, 0)),
            Slot::Damaged(SlotError::Mismatch(_))
        ));
    }

    #[test]
    fn the_current_version_is_the_newest_valid_one() {
        let v = |lsn| PageVersion { lsn, bytes: vec![] };
        let ver = |lsn| Slot::Version(v(lsn));
        let torn = || Slot::Damaged(SlotError::Torn);
        assert_eq!(current([Slot::Empty, Slot::Empty], false), Ok(Current::Never));
        assert_eq!(
            current([ver(3), ver(9)], false),
            Ok(Current::Version { slot: 1, version: v(9) })
        );
        assert_eq!(
            current([ver(9), Slot::Empty], false),
            Ok(Current::Version { slot: 0, version: v(9) })
        );
        // A round in progress may have torn the slot it was writing.
        assert_eq!(
            current([ver(9), torn()], true),
            Ok(Current::Version { slot: 0, version: v(9) })
        );
        assert_eq!(current([torn(), Slot::Empty], true), Ok(Current::Never));
        // Outside a round, damage is damage.
        assert_eq!(current([ver(9), torn()], false), Err(SlotError::Torn));
        assert_eq!(current([Slot::Empty, torn()], false), Err(SlotError::Torn));
    }
}
