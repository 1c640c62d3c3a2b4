//! The page-version index: for every page of a segment, the LSN of its
//! current version and the CRC32C of that version's page bytes, kept
//! durably beside the page store's slots.
//!
//! The slots describe themselves (`pagestore`), but a slot holding zeros or
//! another device's bytes reads as "never written". Without an index a
//! current version whose write never reached the medium (a lost write), or
//! that was overwritten by junk, would be taken for the older version in
//! the other slot, or for a page never written, and served. With it, the
//! version a read finds must be the one the index names: older, or none,
//! is damage, found by reads and by scrub, and repaired from a peer whose
//! copy has the indexed CRC.
//!
//! Layout: after a segment's version slots, its extent holds the index in
//! `blocks_for(pg_pages)` blocks of [`ENTRIES_PER_BLOCK`] entries, each
//! block in two copies side by side. A block is rewritten into the copy
//! that does not hold its current contents, with `seq` one higher, so a
//! torn write leaves the other copy whole. A copy is: kind `PageMap`, its
//! own offset, `seq`, `generation` = the block's index; payload = volume
//! (u64), PG (u32), block index (u32), then per page: LSN (u64), CRC32C of
//! the page bytes (u32). LSN 0 is a page never written.
//!
//! When the index is written: after the versions it names are durable and
//! before the segment table says they are coalesced. So a crash can leave
//! the index behind a version (a round open at the crash), never ahead of
//! one; start-up's torn-write window covers that case (see
//! `Node::read_current`), and a version the index is behind on outside that
//! window is a lost index write: the version is valid and self-describing,
//! so the index takes it and is rewritten.
//!
//! Sans-IO: the node reads and writes the blocks; this module says where
//! they are and what their bytes mean.

use crate::io::BLOCK_SIZE;
use crate::log::format::{
    BlockHeader, BlockKind, DeviceId, HEADER_BYTES, PAYLOAD_MAX_BYTES, decode_block_at, seal_block,
};
use crate::log::layout::block_offset;
use crate::record::SegmentId;

const BLOCK_HEAD_BYTES: usize = 16;
const ENTRY_BYTES: usize = 12;
/// Pages one index block covers.
pub const ENTRIES_PER_BLOCK: usize = (PAYLOAD_MAX_BYTES - BLOCK_HEAD_BYTES) / ENTRY_BYTES;
/// Copies of each index block.
pub const COPIES: u64 = 2;

/// What the index says of one page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    /// LSN of the current version; 0: never written.
    pub lsn: u64,
    /// CRC32C of the current version's page bytes (0 when never written).
    pub crc: u32,
}

impl Entry {
    pub fn of(lsn: u64, bytes: &[u8]) -> Entry {
        Entry {
            lsn,
            crc: crc32c::crc32c(bytes),
        }
    }
}

/// An entry whose block was lost with both its copies, rebuilt from a slot
/// that was damaged: nothing is known of the page's version.
pub const UNKNOWN: Entry = Entry { lsn: u64::MAX, crc: 0 };

/// What a version found in a page's slots is, by the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The version the index names (or none, as it says).
    Agrees,
    /// A version newer than the index names: a round open at the last
    /// crash wrote it, or the index block's write was lost. A version is
    /// self-describing and only written with every change below its LSN,
    /// so the index takes it.
    Behind(Entry),
    /// Older than the index names, or none where it names one (a lost or
    /// overwritten write), or other bytes at the same LSN.
    Damaged(String),
}

/// Check `found` (the current version's LSN and page bytes, None for a page
/// never written) against the index's `entry`.
pub fn verify(entry: Entry, found: Option<(u64, &[u8])>) -> Verdict {
    if entry == UNKNOWN {
        return Verdict::Behind(found.map_or(Entry::default(), |(lsn, bytes)| Entry::of(lsn, bytes)));
    }
    match found {
        None if entry.lsn == 0 => Verdict::Agrees,
        None => Verdict::Damaged(format!(
            "the page-version index names a version at LSN {}, and neither slot holds one (a lost or overwritten write)",
            entry.lsn
        )),
        Some((lsn, bytes)) if lsn == entry.lsn => {
            let crc = crc32c::crc32c(bytes);
            if crc == entry.crc {
                Verdict::Agrees
            } else {
                Verdict::Damaged(format!(
                    "the version at LSN {lsn} has page CRC {crc:#010x}, the index says {:#010x}",
                    entry.crc
                ))
            }
        }
        Some((lsn, _)) if lsn < entry.lsn => Verdict::Damaged(format!(
            "the current slot holds LSN {lsn}, the page-version index names LSN {} (a lost or overwritten write)",
            entry.lsn
        )),
        Some((lsn, bytes)) => Verdict::Behind(Entry::of(lsn, bytes)),
    }
}

/// Index blocks a segment of `pg_pages` pages has (each in [`COPIES`] copies).
pub fn blocks_for(pg_pages: u64) -> u64 {
    pg_pages.div_ceil(ENTRIES_PER_BLOCK as u64)
}

/// Device block of copy `copy` of index block `index`, the index starting at `start`.
pub fn copy_block(start: u64, index: u64, copy: usize) -> u64 {
    start + index * COPIES + copy as u64
}

/// What one copy of an index block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copy {
    /// Never written for this segment: zeros, another device's or another
    /// segment's bytes.
    Empty,
    Valid {
        seq: u64,
        entries: Vec<Entry>,
    },
    Damaged(String),
}

/// Encode index block `index` of `segment` (its entries: at most
/// [`ENTRIES_PER_BLOCK`]) as copy at device block `at`, write number `seq`.
pub fn encode_block(
    block: &mut [u8],
    device_id: DeviceId,
    segment: SegmentId,
    index: u64,
    at: u64,
    seq: u64,
    entries: &[Entry],
) {
    assert_eq!(block.len(), BLOCK_SIZE);
    assert!(entries.len() <= ENTRIES_PER_BLOCK);
    let payload = &mut block[HEADER_BYTES..];
    payload.fill(0);
    payload[0..8].copy_from_slice(&segment.volume.to_le_bytes());
    payload[8..12].copy_from_slice(&segment.pg.to_le_bytes());
    payload[12..16].copy_from_slice(&(index as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let o = BLOCK_HEAD_BYTES + i * ENTRY_BYTES;
        payload[o..o + 8].copy_from_slice(&e.lsn.to_le_bytes());
        payload[o + 8..o + 12].copy_from_slice(&e.crc.to_le_bytes());
    }
    let header = BlockHeader {
        kind: BlockKind::PageMap,
        device_id,
        offset: block_offset(at),
        seq,
        generation: index as u32,
        payload_len: (BLOCK_HEAD_BYTES + entries.len() * ENTRY_BYTES) as u32,
        flags: 0,
    };
    seal_block(block, &header);
}

/// Read the copy at device block `at` as index block `index` of `segment`,
/// expected to hold `count` entries.
pub fn decode_block(block: &[u8], device_id: &DeviceId, segment: SegmentId, index: u64, at: u64, count: usize) -> Copy {
    if !crate::pagestore::names_device(block, device_id) {
        // Zeros, or blocks from before this device was formatted.
        return Copy::Empty;
    }
    match decode_block_at(block, BlockKind::PageMap, device_id, block_offset(at)) {
        Ok((h, payload)) => {
            let u64_at = |o: usize| u64::from_le_bytes(payload[o..o + 8].try_into().expect("8 bytes"));
            let u32_at = |o: usize| u32::from_le_bytes(payload[o..o + 4].try_into().expect("4 bytes"));
            if payload.len() < BLOCK_HEAD_BYTES {
                return Copy::Damaged("a short index block".into());
            }
            let (volume, pg, at_index) = (u64_at(0), u32_at(8), u32_at(12));
            if volume != segment.volume || pg != segment.pg {
                // A block of a segment that had this extent before.
                return Copy::Empty;
            }
            if at_index as u64 != index || h.generation as u64 != index {
                return Copy::Damaged(format!(
                    "index block {at_index} (generation {}) where block {index} belongs",
                    h.generation
                ));
            }
            if payload.len() != BLOCK_HEAD_BYTES + count * ENTRY_BYTES {
                return Copy::Damaged(format!("{} payload bytes for {count} entries", payload.len()));
            }
            let entries = (0..count)
                .map(|i| {
                    let o = BLOCK_HEAD_BYTES + i * ENTRY_BYTES;
                    Entry {
                        lsn: u64_at(o),
                        crc: u32_at(o + 8),
                    }
                })
                .collect();
            Copy::Valid { seq: h.seq, entries }
        }
        Err(e) => Copy::Damaged(e.to_string()),
    }
}

/// Which copy of an index block is current, given both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chosen {
    /// Neither copy was ever written: every entry is "never written".
    Never,
    Copy {
        copy: usize,
        seq: u64,
        entries: Vec<Entry>,
    },
    /// Both copies are damaged: the entries are unknown.
    Lost(String),
}

/// The current copy (the valid one with the higher `seq`), and what is
/// wrong with the other, if it is damaged.
pub fn choose(copies: [Copy; 2]) -> (Chosen, Option<String>) {
    let [a, b] = copies;
    match (a, b) {
        (Copy::Empty, Copy::Empty) => (Chosen::Never, None),
        (Copy::Valid { seq: x, entries: ex }, Copy::Valid { seq: y, entries: ey }) => {
            if y > x {
                (
                    Chosen::Copy {
                        copy: 1,
                        seq: y,
                        entries: ey,
                    },
                    None,
                )
            } else {
                (
                    Chosen::Copy {
                        copy: 0,
                        seq: x,
                        entries: ex,
                    },
                    None,
                )
            }
        }
        (Copy::Valid { seq, entries }, other) => (Chosen::Copy { copy: 0, seq, entries }, damage(other)),
        (other, Copy::Valid { seq, entries }) => (Chosen::Copy { copy: 1, seq, entries }, damage(other)),
        (Copy::Damaged(e), _) | (_, Copy::Damaged(e)) => (Chosen::Lost(e), None),
    }
}

fn damage(c: Copy) -> Option<String> {
    match c {
        Copy::Damaged(e) => Some(e),
        _ => None,
    }
}

/// A segment's index as the node holds it in memory.
#[derive(Debug, Clone, Default)]
pub struct PageMap {
    pub entries: Vec<Entry>,
    /// Per index block: the copy holding its current contents and its `seq`
    /// (`None`: never written).
    pub blocks: Vec<Option<(usize, u64)>>,
}

impl PageMap {
    /// A fresh index: every page never written.
    pub fn new(pg_pages: u64) -> PageMap {
        PageMap {
            entries: vec![Entry::default(); pg_pages as usize],
            blocks: vec![None; blocks_for(pg_pages) as usize],
        }
    }

    /// The pages (local indices) index block `index` covers.
    pub fn pages_of(&self, index: u64) -> std::ops::Range<usize> {
        let lo = (index as usize * ENTRIES_PER_BLOCK).min(self.entries.len());
        lo..(lo + ENTRIES_PER_BLOCK).min(self.entries.len())
    }

    /// The index block of local page `local`.
    pub fn block_of(local: u64) -> u64 {
        local / ENTRIES_PER_BLOCK as u64
    }

    /// Where and as what the next write of block `index` goes: (copy, seq).
    pub fn next_write(&self, index: u64) -> (usize, u64) {
        match self.blocks[index as usize] {
            Some((copy, seq)) => (1 - copy, seq + 1),
            None => (0, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: DeviceId = [9; 16];
    const SEG: SegmentId = SegmentId { volume: 5, pg: 3 };

    fn entries(n: usize, salt: u64) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                lsn: i as u64 * 7 + salt,
                crc: (i as u32).wrapping_mul(2654435761),
            })
            .collect()
    }

    fn encoded(index: u64, at: u64, seq: u64, e: &[Entry]) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        encode_block(&mut b, DEV, SEG, index, at, seq, e);
        b
    }

    #[test]
    fn a_block_round_trips_and_names_its_place() {
        let e = entries(ENTRIES_PER_BLOCK, 1);
        let b = encoded(2, 100, 9, &e);
        assert_eq!(
            decode_block(&b, &DEV, SEG, 2, 100, e.len()),
            Copy::Valid {
                seq: 9,
                entries: e.clone()
            }
        );
        // Read at another offset (a misdirected write), or as another block.
        assert!(matches!(decode_block(&b, &DEV, SEG, 2, 101, e.len()), Copy::Damaged(_)));
        assert!(matches!(decode_block(&b, &DEV, SEG, 3, 100, e.len()), Copy::Damaged(_)));
        // Another segment's block: never written for this one.
        let other = SegmentId { volume: 5, pg: 4 };
        assert_eq!(decode_block(&b, &DEV, other, 2, 100, e.len()), Copy::Empty);
        assert_eq!(
            decode_block(&vec![0u8; BLOCK_SIZE], &DEV, SEG, 2, 100, e.len()),
            Copy::Empty
        );
    }

    #[test]
    fn every_flipped_bit_of_a_copy_is_damage_or_unchanged() {
        let e = entries(40, 3);
        let b = encoded(0, 7, 2, &e);
        for bit in (0..BLOCK_SIZE * 8).step_by(7) {
            let mut d = b.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            match decode_block(&d, &DEV, SEG, 0, 7, e.len()) {
                Copy::Valid { seq, entries } => assert!(seq == 2 && entries == e, "bit {bit} changed the contents"),
                Copy::Damaged(_) => {}
                Copy::Empty => panic!("bit {bit} made the copy read as never written"),
            }
        }
    }

    #[test]
    fn the_higher_valid_copy_is_current_and_a_damaged_one_is_reported() {
        let (a, b) = (entries(10, 1), entries(10, 2));
        let va = Copy::Valid {
            seq: 4,
            entries: a.clone(),
        };
        let vb = Copy::Valid {
            seq: 5,
            entries: b.clone(),
        };
        assert_eq!(
            choose([va.clone(), vb.clone()]).0,
            Chosen::Copy {
                copy: 1,
                seq: 5,
                entries: b.clone()
            }
        );
        let (c, other) = choose([va.clone(), Copy::Damaged("x".into())]);
        assert_eq!(
            c,
            Chosen::Copy {
                copy: 0,
                seq: 4,
                entries: a
            }
        );
        assert_eq!(other.as_deref(), Some("x"));
        assert_eq!(choose([Copy::Empty, Copy::Empty]).0, Chosen::Never);
        assert!(matches!(
            choose([Copy::Damaged("x".into()), Copy::Empty]).0,
            Chosen::Lost(_)
        ));
        assert_eq!(
            choose([Copy::Empty, vb]).0,
            Chosen::Copy {
                copy: 1,
                seq: 5,
                entries: b
            }
        );
    }

    #[test]
    fn writes_alternate_copies() {
        let mut m = PageMap::new(ENTRIES_PER_BLOCK as u64 + 1);
        assert_eq!(m.blocks.len(), 2);
        assert_eq!(m.pages_of(1), ENTRIES_PER_BLOCK..ENTRIES_PER_BLOCK + 1);
        assert_eq!(m.next_write(0), (0, 1));
        m.blocks[0] = Some((0, 1));
        assert_eq!(m.next_write(0), (1, 2));
    }

    #[test]
    fn a_version_is_judged_by_the_index() {
        let bytes = vec![7u8; 64];
        let e = Entry::of(10, &bytes);
        assert_eq!(verify(e, Some((10, &bytes))), Verdict::Agrees);
        assert_eq!(verify(Entry::default(), None), Verdict::Agrees);
        // Older than the index: the newer write was lost.
        assert!(matches!(verify(e, Some((8, &bytes))), Verdict::Damaged(_)));
        // None where the index names one: lost, or overwritten by junk.
        assert!(matches!(verify(e, None), Verdict::Damaged(_)));
        // The same LSN with other bytes.
        assert!(matches!(verify(e, Some((10, &[1u8; 64][..]))), Verdict::Damaged(_)));
        // Newer: the index is behind, and takes it.
        assert_eq!(verify(e, Some((12, &bytes))), Verdict::Behind(Entry::of(12, &bytes)));
        assert_eq!(verify(UNKNOWN, None), Verdict::Behind(Entry::default()));
    }
}
