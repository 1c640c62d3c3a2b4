//! The page store: where coalesced page versions live, out of place.
//!
//! Each segment owns one extent of the device's page store region, given to
//! it when the segment is created and recorded in the segment table. The
//! extent is direct-mapped: the segment's page with local index `i` (its page
//! number minus `pg * pg_pages`) has two version slots, each `slot_blocks`
//! blocks long, one in each half of the extent: slot 0 of every page, in
//! page order, then slot 1 of every page. A run of consecutive pages' slot
//! 0 (or slot 1) is one stretch of blocks, so a rebuild writes the versions
//! of a run of pages, and a peer serving them reads them, with one I/O of
//! only their bytes: a device does only so many I/Os a second. A new
//! version is always written into the slot that does not hold the current
//! one, so a torn write never damages the version readers use, and no
//! index has to be loaded or rebuilt at start-up: where a page lives is
//! arithmetic, and which slot is current is read from the slots themselves
//! (the valid one with the higher LSN).
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

use crate::log::format::HEADER_BYTES;
use crate::log::format::{
    BlockError, BlockHeader, BlockKind, DeviceId, PAYLOAD_MAX_BYTES, decode_block_at, seal_block,
};
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
            .checked_mul(Self::slot_blocks_for(page_bytes))?
            .checked_add(crate::pagemap::blocks_for(pg_pages) * crate::pagemap::COPIES)
    }

    pub fn slot_blocks(&self) -> u64 {
        Self::slot_blocks_for(self.page_bytes)
    }

    /// The version slots, then the page-version index (`pagemap`).
    pub fn blocks(&self) -> u64 {
        self.map_start_block() - self.start_block + self.map_blocks() * crate::pagemap::COPIES
    }

    /// First block of the page-version index, after every version slot.
    pub fn map_start_block(&self) -> u64 {
        self.start_block + self.pg_pages * SLOTS_PER_PAGE * self.slot_blocks()
    }

    /// Blocks of the page-version index (each in `pagemap::COPIES` copies).
    pub fn map_blocks(&self) -> u64 {
        crate::pagemap::blocks_for(self.pg_pages)
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
        self.start_block + (slot as u64 * self.pg_pages + local) * self.slot_blocks()
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
    Damaged(Damage),
}

/// What a slot that is not whole still says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub error: SlotError,
    /// The LSNs its blocks name, each read from the block's first 512-byte
    /// sector, which a torn write replaces whole or not at all: a crash
    /// leaves each block naming the old version or the new one.
    pub lsns: Vec<u64>,
    /// Some block of ours names no LSN that can be believed (a header with
    /// another offset, kind or index, or, in the first block, a header LSN
    /// that is not the version header's): damage, whatever else is known.
    pub unknown: bool,
}

impl Damage {
    fn new(error: SlotError) -> Damage {
        Damage {
            error,
            lsns: Vec::new(),
            unknown: false,
        }
    }
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
    let ours = slot
        .chunks_exact(crate::io::BLOCK_SIZE)
        .filter(|b| names_device(b, device_id))
        .count();
    if ours == 0 {
        return Slot::Empty;
    }
    let damaged = |error: SlotError| Slot::Damaged(damage(slot, device_id, slot_block, error));
    let mut bytes = Vec::with_capacity(extent.page_bytes as usize);
    let mut lsn = None;
    for (index, block) in slot.chunks_exact(crate::io::BLOCK_SIZE).enumerate() {
        let offset = block_offset(slot_block + index as u64);
        let (h, payload) = match decode_block_at(block, BlockKind::PageVersion, device_id, offset) {
            Ok(x) => x,
            Err(source) => return damaged(SlotError::Block { index, source }),
        };
        if h.generation != index as u32 || *lsn.get_or_insert(h.seq) != h.seq {
            return damaged(SlotError::Torn);
        }
        let mut data = payload;
        if index == 0 {
            if data.len() < VERSION_HEADER_BYTES {
                return damaged(SlotError::Mismatch("a short header".into()));
            }
            let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
            let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
            let (volume, pg, page_bytes, at_page, at_lsn) = (u64_at(0), u32_at(8), u32_at(12), u64_at(16), u64_at(24));
            if volume != segment.volume || pg != segment.pg || page_bytes != extent.page_bytes || at_page != page {
                return damaged(SlotError::Mismatch(format!(
                    "volume {volume} pg {pg} page {at_page} of {page_bytes} bytes, not volume {} pg {} page {page} of {} bytes",
                    segment.volume, segment.pg, extent.page_bytes
                )));
            }
            if Some(at_lsn) != lsn {
                return damaged(SlotError::Torn);
            }
            data = &data[VERSION_HEADER_BYTES..];
        }
        bytes.extend_from_slice(data);
    }
    if bytes.len() != extent.page_bytes as usize {
        return damaged(SlotError::Mismatch(format!("{} page bytes", bytes.len())));
    }
    Slot::Version(PageVersion {
        lsn: lsn.unwrap_or(0),
        bytes,
    })
}

/// The block names this device: its device id, or one bit away from it (a
/// bit flipped there must not make our block look like another device's,
/// or like never written; another device's id is tens of bits away).
pub(crate) fn names_device(block: &[u8], device_id: &DeviceId) -> bool {
    let id = &block[OFF_DEVICE_ID..OFF_DEVICE_ID + device_id.len()];
    let differing: u32 = id.iter().zip(device_id).map(|(a, b)| (a ^ b).count_ones()).sum();
    differing <= 1
}

// Where the common block header keeps its fields (docs/format.md).
const OFF_DEVICE_ID: usize = 8;
const OFF_OFFSET: usize = 24;
const OFF_SEQ: usize = 32;
const OFF_GENERATION: usize = 40;
const OFF_KIND: usize = 6;

/// What a damaged slot's blocks still say: see [`Damage`].
fn damage(slot: &[u8], device_id: &DeviceId, slot_block: u64, error: SlotError) -> Damage {
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let mut d = Damage::new(error);
    for (index, block) in slot.chunks_exact(crate::io::BLOCK_SIZE).enumerate() {
        if !names_device(block, device_id) {
            // Zeros or another device's bytes: what was there before this
            // device first wrote the slot.
            continue;
        }
        let kind = u16::from_le_bytes([block[OFF_KIND], block[OFF_KIND + 1]]);
        let generation = u32::from_le_bytes(block[OFF_GENERATION..OFF_GENERATION + 4].try_into().expect("4 bytes"));
        let seq = u64_at(block, OFF_SEQ);
        let believable = block[OFF_DEVICE_ID..OFF_DEVICE_ID + device_id.len()] == device_id[..]
            && kind == BlockKind::PageVersion as u16
            && u64_at(block, OFF_OFFSET) == block_offset(slot_block + index as u64)
            && generation == index as u32
            // The first block names its LSN twice in its first sector.
            && (index != 0 || u64_at(block, HEADER_BYTES + 24) == seq);
        if believable {
            d.lsns.push(seq);
        } else {
            d.unknown = true;
        }
    }
    d
}

/// The slot a page's first version goes to: slot 0, so consecutive
/// pages' first versions are one stretch of blocks: a new segment's
/// hydration writes a run of them with one I/O, and a donor whose pages
/// were written once reads a run with one.
pub const FIRST_SLOT: usize = 0;

/// Which slot holds the current version, given both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Current {
    /// Neither slot was ever written: the page is zeros as of LSN 0, and
    /// the next version goes to [`FIRST_SLOT`].
    Never,
    Version {
        slot: usize,
        version: PageVersion,
    },
}

/// The current version, and what is wrong with the other slot if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub current: Current,
    /// The other slot is damaged, but provably not the current version:
    /// its blocks name only older LSNs, or a crash's round tore it.
    pub other: Option<OtherDamaged>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherDamaged {
    pub slot: usize,
    pub error: SlotError,
    /// A round open at a crash may have torn it (else it is damage, if harmless).
    pub maybe_torn: bool,
}

/// Pick the current version from both slots.
///
/// A version is only ever written into the slot that does not hold the
/// current one, so a torn write can only be in that slot, and only by a
/// round that was open when the power went: `torn_after` is `Some(c)` for a
/// page not written since start-up on a segment whose table said a round
/// was open then (`round_lsn > coalesced_lsn = c`); that round wrote
/// versions above `c` only. So a damaged slot is passed over only when its
/// blocks show it is not the current version: each names an LSN below the
/// other slot's (an older version), or, with `torn_after`, above `c` while
/// the other slot's is at or below it (the round's write, cut short). A
/// damaged slot that may be the current version is damage: the page cannot
/// be served, or built on, from this segment.
pub fn current(slots: [Slot; 2], torn_after: Option<u64>) -> Result<Chosen, SlotError> {
    let [a, b] = slots;
    let chosen = |slot: usize, version: PageVersion, other: Option<OtherDamaged>| Chosen {
        current: Current::Version { slot, version },
        other,
    };
    match (a, b) {
        (Slot::Empty, Slot::Empty) => Ok(Chosen {
            current: Current::Never,
            other: None,
        }),
        (Slot::Version(v), Slot::Empty) => Ok(chosen(0, v, None)),
        (Slot::Empty, Slot::Version(v)) => Ok(chosen(1, v, None)),
        (Slot::Version(x), Slot::Version(y)) => Ok(if y.lsn > x.lsn {
            chosen(1, y, None)
        } else {
            chosen(0, x, None)
        }),
        (Slot::Version(v), Slot::Damaged(d)) => older_or_torn(0, v, d, torn_after),
        (Slot::Damaged(d), Slot::Version(v)) => older_or_torn(1, v, d, torn_after),
        // Beside a slot never written, a torn one was the page's first
        // write (to `FIRST_SLOT`), or slot 1 cleared with it (the node's
        // `write_first_slots`). No other write can leave a slot torn and
        // the other never written.
        (Slot::Damaged(d), Slot::Empty) => torn_first_write(0, d, torn_after),
        (Slot::Empty, Slot::Damaged(d)) => torn_first_write(1, d, torn_after),
        (Slot::Damaged(d), Slot::Damaged(_)) => Err(d.error),
    }
}

/// Slot `slot` is damaged and the other never written: the page was never
/// written if a round open at a crash wrote it (its blocks name LSNs above
/// `torn_after` only), else it is damage.
fn torn_first_write(slot: usize, d: Damage, torn_after: Option<u64>) -> Result<Chosen, SlotError> {
    match torn_after {
        Some(c) if !d.unknown && d.lsns.iter().all(|&lsn| lsn > c) => Ok(Chosen {
            current: Current::Never,
            other: Some(OtherDamaged {
                slot,
                error: d.error,
                maybe_torn: true,
            }),
        }),
        _ => Err(d.error),
    }
}

fn older_or_torn(slot: usize, v: PageVersion, d: Damage, torn_after: Option<u64>) -> Result<Chosen, SlotError> {
    let torn_window = torn_after.filter(|&c| v.lsn <= c);
    let not_current = !d.unknown
        && d.lsns
            .iter()
            .all(|&lsn| lsn < v.lsn || torn_window.is_some_and(|c| lsn > c));
    if !not_current {
        return Err(d.error);
    }
    let other = OtherDamaged {
        slot: 1 - slot,
        error: d.error,
        maybe_torn: torn_window.is_some(),
    };
    Ok(Chosen {
        current: Current::Version { slot, version: v },
        other: Some(other),
    })
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
        assert_eq!(e.blocks(), 16 * 2 * 3 + 2);
        assert_eq!(e.map_start_block(), 1000 + 16 * 2 * 3);
        assert_eq!(e.local(2, 32), Some(0));
        assert_eq!(e.local(2, 47), Some(15));
        assert_eq!(e.local(2, 48), None);
        assert_eq!(e.local(2, 31), None);
        // Slot 0 of every page, then slot 1 of every page.
        assert_eq!(e.slot_block(0, 0), 1000);
        assert_eq!(e.slot_block(1, 0), 1000 + 3);
        assert_eq!(e.slot_block(0, 1), 1000 + 16 * 3);
        assert_eq!(e.slot_block(1, 1), 1000 + 17 * 3);
        assert_eq!(e.slot_block(15, 1) + 3, e.map_start_block());
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
            error(decode_slot(&torn, &DEV, &e, SEG, 32, e.slot_block(0, 0))),
            Some(SlotError::Torn)
        );
        // Half the first block new (a torn sector), the rest old.
        let mut half = old.clone();
        half[..2048].copy_from_slice(&new[..2048]);
        assert!(matches!(
            decode_slot(&half, &DEV, &e, SEG, 32, e.slot_block(0, 0)),
            Slot::Damaged(Damage {
                error: SlotError::Block { index: 0, .. },
                ..
            })
        ));
        let mut flipped = new.clone();
        flipped[2 * BLOCK_SIZE + 100] ^= 4;
        assert!(matches!(
            decode_slot(&flipped, &DEV, &e, SEG, 32, e.slot_block(0, 0)),
            Slot::Damaged(Damage {
                error: SlotError::Block { index: 2, .. },
                ..
            })
        ));
        // The right bytes read from the other slot's place: misdirected.
        assert!(matches!(
            decode_slot(&new, &DEV, &e, SEG, 32, e.slot_block(0, 1)),
            Slot::Damaged(Damage {
                error: SlotError::Block { index: 0, .. },
                ..
            })
        ));
        // Another page's version at this page's place (same offsets).
        let e2 = extent(8192);
        let wrong_page = encoded(&e2, 33, 0, 0, 90, 1);
        assert!(matches!(
            decode_slot(&wrong_page, &DEV, &e, SEG, 32, e.slot_block(0, 0)),
            Slot::Damaged(Damage {
                error: SlotError::Mismatch(_),
                ..
            })
        ));
    }

    fn error(slot: Slot) -> Option<SlotError> {
        match slot {
            Slot::Damaged(d) => Some(d.error),
            _ => None,
        }
    }

    /// A damaged slot whose blocks name `lsns`.
    fn damaged(lsns: &[u64]) -> Slot {
        Slot::Damaged(Damage {
            error: SlotError::Torn,
            lsns: lsns.to_vec(),
            unknown: false,
        })
    }

    fn pick(slots: [Slot; 2], torn_after: Option<u64>) -> Result<(Current, Option<bool>), SlotError> {
        current(slots, torn_after).map(|c| (c.current, c.other.map(|o| o.maybe_torn)))
    }

    #[test]
    fn the_current_version_is_the_newest_valid_one() {
        let v = |lsn| PageVersion { lsn, bytes: vec![] };
        let ver = |lsn| Slot::Version(v(lsn));
        let at = |slot, lsn| Current::Version { slot, version: v(lsn) };
        assert_eq!(pick([Slot::Empty, Slot::Empty], None), Ok((Current::Never, None)));
        assert_eq!(pick([ver(3), ver(9)], None), Ok((at(1, 9), None)));
        assert_eq!(pick([ver(9), Slot::Empty], None), Ok((at(0, 9), None)));
        // A round open at a crash (coalesced to 10) wrote above 10 into the
        // slot that was not current, and was cut short.
        assert_eq!(pick([ver(9), damaged(&[15, 4])], Some(10)), Ok((at(0, 9), Some(true))));
        assert_eq!(
            pick([damaged(&[12]), Slot::Empty], Some(10)),
            Ok((Current::Never, Some(true)))
        );
        // A new segment's hydration writes a page's first version to slot
        // 1 (paired with the next page's slot 0): torn the same way.
        assert_eq!(
            pick([Slot::Empty, damaged(&[12])], Some(10)),
            Ok((Current::Never, Some(true)))
        );
        assert_eq!(pick([Slot::Empty, ver(12)], Some(10)), Ok((at(1, 12), None)));
        // An older version damaged: harmless, but damage, crash or not.
        assert_eq!(pick([damaged(&[4, 4]), ver(9)], None), Ok((at(1, 9), Some(false))));
        // The current version damaged: never an older one, never zeros,
        // with or without a crash's round.
        for torn_after in [None, Some(10)] {
            assert!(pick([ver(4), damaged(&[9, 9])], torn_after).is_err());
            assert!(pick([Slot::Empty, damaged(&[9])], torn_after).is_err());
            assert!(pick([damaged(&[9]), Slot::Empty], torn_after).is_err());
            assert!(pick([damaged(&[9]), damaged(&[3])], torn_after).is_err());
        }
        // Outside a crash's round, a damaged slot naming newer LSNs is the
        // current version damaged.
        assert!(pick([ver(9), damaged(&[15])], None).is_err());
        assert!(pick([damaged(&[12]), Slot::Empty], None).is_err());
        assert!(pick([Slot::Empty, damaged(&[12])], None).is_err());
        // The round wrote this page's version (above 10) whole: the other
        // slot, damaged, cannot be its torn write.
        assert!(pick([ver(12), damaged(&[15])], Some(10)).is_err());
        // A block that names nothing believable.
        let unknown = Slot::Damaged(Damage {
            error: SlotError::Torn,
            lsns: vec![4],
            unknown: true,
        });
        assert!(pick([ver(9), unknown], Some(10)).is_err());
    }

    /// One bit flipped anywhere in a slot holding the current version:
    /// never "never written", never passed over for the older version.
    #[test]
    fn a_flipped_bit_in_the_current_version_is_never_passed_over() {
        let e = extent(8192);
        let older = encoded(&e, 32, 0, 0, 40, 2);
        let newer = encoded(&e, 32, 0, 1, 90, 1);
        let mut flips = 0;
        for byte in (0..newer.len()).step_by(7) {
            let mut bad = newer.clone();
            bad[byte] ^= 1 << (byte % 8);
            let slots = [
                decode_slot(&older, &DEV, &e, SEG, 32, e.slot_block(0, 0)),
                decode_slot(&bad, &DEV, &e, SEG, 32, e.slot_block(0, 1)),
            ];
            assert!(matches!(slots[1], Slot::Damaged(_)), "byte {byte}: {:?}", slots[1]);
            flips += 1;
            for torn_after in [None, Some(90)] {
                assert!(
                    current(slots.clone(), torn_after).is_err(),
                    "byte {byte}, torn_after {torn_after:?}: {:?}",
                    slots[1]
                );
            }
            // Had a round open at a crash (coalesced to 45) written it, the
            // log would still hold every record above 45: the version at 40
            // plus those is the page, torn or not, so passing it over is right.
        }
        assert_eq!(flips, newer.len().div_ceil(7));
    }
}
