//! The segment table: which segments a node holds and what of each must
//! survive a restart outside the log (epoch, PGMRPL).
//!
//! Two slots in the metadata area, written alternately with a rising
//! version, like the log anchor: a torn write of one leaves the other. A
//! table is valid only if every one of its blocks is valid and carries the
//! same version. It is small (rewritten whole on a change) because it changes
//! rarely: a new segment, an epoch bump, a PGMRPL advance, the start and the
//! end of a coalescing round.
//!
//! With the page store's versions it is also the node's checkpoint: an
//! entry says up to which LSN the segment's chain is in page versions
//! (`coalesced_lsn`), so start-up replays only the log after it, whatever
//! the size of the page store.

use crate::io::{AlignedBuf, BLOCK_SIZE, BlockIo, Durability, IoError};
use crate::log::format::{BlockHeader, BlockKind, DeviceId, PAYLOAD_MAX_BYTES, decode_block_at, encode_block};
use crate::log::layout::block_offset;
use crate::record::SegmentId;
use crate::segment::{ANNULLED_RANGES_MAX, LsnRange};

/// First block of each slot, and the blocks a slot spans.
pub const SLOT_BLOCKS: [u64; 2] = [8, 64];
pub const SLOT_LEN_BLOCKS: u64 = 56;
const ENTRY_BYTES: usize = 144;
const BLOCK_HEADER_BYTES: usize = 8;
const ENTRIES_PER_BLOCK: usize = (PAYLOAD_MAX_BYTES - BLOCK_HEADER_BYTES) / ENTRY_BYTES;
/// Segments a node can hold.
pub const SEGMENTS_MAX: usize = ENTRIES_PER_BLOCK * SLOT_LEN_BLOCKS as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentEntry {
    pub id: SegmentId,
    pub epoch: u64,
    pub pgmrpl: u64,
    /// The segment's pages: `page_bytes` each, `pg_pages` of them, whose
    /// versions live in the page store from `extent_start_block`.
    pub page_bytes: u32,
    pub pg_pages: u64,
    pub extent_start_block: u64,
    /// Every record of the chain at or below this LSN is in page versions
    /// (and may be gone from the log). 0: nothing coalesced yet.
    pub coalesced_lsn: u64,
    /// A coalescing round writing versions up to this LSN may be under way;
    /// equal to `coalesced_lsn` when none is. Slots damaged while it is
    /// above are a crash's torn writes, not damage (see `pagestore::current`).
    pub round_lsn: u64,
    /// The epoch whose truncation the segment applied (`epoch` is the
    /// highest seen; above this one while a recovering writer has sealed it).
    pub installed_epoch: u64,
    /// Truncation ranges: records in them are annulled, and start-up skips
    /// them in the log. The first `annulled_count` are used.
    pub annulled: [LsnRange; ANNULLED_RANGES_MAX],
    pub annulled_count: u8,
}

impl SegmentEntry {
    pub fn annulled(&self) -> &[LsnRange] {
        &self.annulled[..usize::from(self.annulled_count).min(ANNULLED_RANGES_MAX)]
    }

    pub fn set_annulled(&mut self, ranges: &[LsnRange]) {
        let n = ranges.len().min(ANNULLED_RANGES_MAX);
        self.annulled = [(0, 0); ANNULLED_RANGES_MAX];
        self.annulled[..n].copy_from_slice(&ranges[..n]);
        self.annulled_count = n as u8;
    }

    pub fn extent(&self) -> crate::pagestore::Extent {
        crate::pagestore::Extent {
            start_block: self.extent_start_block,
            page_bytes: self.page_bytes,
            pg_pages: self.pg_pages,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentTable {
    pub version: u64,
    pub entries: Vec<SegmentEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("device I/O failed: {0}")]
    Io(#[from] IoError),
    #[error("{0} segments exceed the {SEGMENTS_MAX} a node can hold")]
    TooMany(usize),
}

impl SegmentTable {
    pub fn get(&self, id: SegmentId) -> Option<&SegmentEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Insert or replace the entry of `e.id`.
    pub fn upsert(&mut self, e: SegmentEntry) {
        match self.entries.iter_mut().find(|x| x.id == e.id) {
            Some(x) => *x = e,
            None => self.entries.push(e),
        }
    }

    fn blocks(&self) -> usize {
        self.entries.len().div_ceil(ENTRIES_PER_BLOCK).max(1)
    }
}

/// Read both slots; the valid one with the higher version wins. A device
/// that never had a table (fresh) reads as the empty table, version 0.
pub async fn read<D: BlockIo>(dev: &D, device_id: &DeviceId) -> Result<SegmentTable, IoError> {
    let mut best = SegmentTable::default();
    for slot in SLOT_BLOCKS {
        let buf = AlignedBuf::zeroed_blocks(SLOT_LEN_BLOCKS as usize);
        let (buf, result) = dev.read(block_offset(slot), buf).await;
        result?;
        if let Some(t) = decode_slot(&buf, device_id, slot)
            && t.version > best.version
        {
            best = t;
        }
    }
    Ok(best)
}

fn decode_slot(buf: &AlignedBuf, device_id: &DeviceId, slot: u64) -> Option<SegmentTable> {
    let mut version = None;
    let mut entries = Vec::new();
    let mut total = 1usize;
    let mut i = 0usize;
    while i < total {
        let offset = block_offset(slot + i as u64);
        let (h, p) = decode_block_at(buf.block(i), BlockKind::SegmentTable, device_id, offset).ok()?;
        if *version.get_or_insert(h.seq) != h.seq || p.len() < BLOCK_HEADER_BYTES {
            return None;
        }
        let index = u16::from_le_bytes([p[0], p[1]]) as usize;
        total = u16::from_le_bytes([p[2], p[3]]) as usize;
        let count = u32::from_le_bytes(p[4..8].try_into().ok()?) as usize;
        if index != i || total == 0 || total > SLOT_LEN_BLOCKS as usize || count > ENTRIES_PER_BLOCK {
            return None;
        }
        let body = &p[BLOCK_HEADER_BYTES..];
        if body.len() != count * ENTRY_BYTES {
            return None;
        }
        for e in body.chunks_exact(ENTRY_BYTES) {
            let u64_at = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().expect("8 bytes"));
            let u32_at = |o: usize| u32::from_le_bytes(e[o..o + 4].try_into().expect("4 bytes"));
            entries.push(SegmentEntry {
                id: SegmentId {
                    volume: u64_at(0),
                    pg: u32_at(8),
                },
                page_bytes: u32_at(12),
                epoch: u64_at(16),
                pgmrpl: u64_at(24),
                pg_pages: u64_at(32),
                extent_start_block: u64_at(40),
                coalesced_lsn: u64_at(48),
                round_lsn: u64_at(56),
                installed_epoch: u64_at(64),
                annulled_count: {
                    let n = u32_at(72);
                    if n as usize > ANNULLED_RANGES_MAX {
                        return None;
                    }
                    n as u8
                },
                annulled: std::array::from_fn(|i| (u64_at(80 + 16 * i), u64_at(88 + 16 * i))),
            });
        }
        i += 1;
    }
    Some(SegmentTable {
        version: version?,
        entries,
    })
}

/// Write `table` as the next version, durably, into the slot the current
/// version is not in. On success `table.version` is the new version.
pub async fn write<D: BlockIo>(dev: &D, device_id: DeviceId, table: &mut SegmentTable) -> Result<(), TableError> {
    if table.entries.len() > SEGMENTS_MAX {
        return Err(TableError::TooMany(table.entries.len()));
    }
    let version = table.version + 1;
    let slot = SLOT_BLOCKS[(version % 2) as usize];
    let blocks = table.blocks();
    let mut buf = AlignedBuf::zeroed_blocks(blocks);
    let mut chunks = table.entries.chunks(ENTRIES_PER_BLOCK);
    for i in 0..blocks {
        let chunk = chunks.next().unwrap_or(&[]);
        let mut p = Vec::with_capacity(BLOCK_HEADER_BYTES + chunk.len() * ENTRY_BYTES);
        p.extend_from_slice(&(i as u16).to_le_bytes());
        p.extend_from_slice(&(blocks as u16).to_le_bytes());
        p.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        for e in chunk {
            p.extend_from_slice(&e.id.volume.to_le_bytes());
            p.extend_from_slice(&e.id.pg.to_le_bytes());
            p.extend_from_slice(&e.page_bytes.to_le_bytes());
            p.extend_from_slice(&e.epoch.to_le_bytes());
            p.extend_from_slice(&e.pgmrpl.to_le_bytes());
            p.extend_from_slice(&e.pg_pages.to_le_bytes());
            p.extend_from_slice(&e.extent_start_block.to_le_bytes());
            p.extend_from_slice(&e.coalesced_lsn.to_le_bytes());
            p.extend_from_slice(&e.round_lsn.to_le_bytes());
            p.extend_from_slice(&e.installed_epoch.to_le_bytes());
            p.extend_from_slice(&u32::from(e.annulled_count).to_le_bytes());
            p.extend_from_slice(&[0; 4]); // reserved
            for (lo, hi) in e.annulled {
                p.extend_from_slice(&lo.to_le_bytes());
                p.extend_from_slice(&hi.to_le_bytes());
            }
        }
        let offset = block_offset(slot + i as u64);
        let header = BlockHeader {
            kind: BlockKind::SegmentTable,
            device_id,
            offset,
            seq: version,
            generation: 0,
            payload_len: p.len() as u32,
            flags: 0,
        };
        encode_block(buf.block_mut(i), &header, &p);
    }
    let (_, result) = dev.write(block_offset(slot), buf, Durability::Durable).await;
    result?;
    table.version = version;
    Ok(())
}

const _: () = assert!(SLOT_BLOCKS[0] + SLOT_LEN_BLOCKS <= SLOT_BLOCKS[1]);
const _: () = assert!(SLOT_BLOCKS[1] + SLOT_LEN_BLOCKS <= 128, "below superblock copy 1");
const _: () = assert!(ENTRIES_PER_BLOCK * ENTRY_BYTES + BLOCK_HEADER_BYTES <= BLOCK_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sim::{SimDisk, SimFaults};

    const DEV: DeviceId = [9; 16];

    fn entry(pg: u32) -> SegmentEntry {
        SegmentEntry {
            id: SegmentId { volume: 7, pg },
            epoch: u64::from(pg) + 1,
            pgmrpl: u64::from(pg) * 10,
            page_bytes: 8192,
            pg_pages: 64,
            extent_start_block: 1000 + u64::from(pg) * 384,
            coalesced_lsn: u64::from(pg) * 9,
            round_lsn: u64::from(pg) * 9 + 1,
            installed_epoch: u64::from(pg),
            annulled: [(u64::from(pg) + 5, u64::from(pg) + 6), (100, 200), (0, 0), (0, 0)],
            annulled_count: 2,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn roundtrip_alternating_slots_and_torn_writes() {
        let disk = SimDisk::new(1 << 20, 1, SimFaults::none());
        assert_eq!(read(&disk, &DEV).await.unwrap(), SegmentTable::default());
        let mut t = SegmentTable::default();
        for pg in 0..300 {
            t.upsert(entry(pg));
        }
        write(&disk, DEV, &mut t).await.unwrap();
        assert_eq!(read(&disk, &DEV).await.unwrap(), t);
        t.upsert(SegmentEntry { epoch: 99, ..entry(5) });
        write(&disk, DEV, &mut t).await.unwrap();
        assert_eq!(read(&disk, &DEV).await.unwrap(), t);
        // Damage the newest slot's second block: the previous version wins.
        let newest = SLOT_BLOCKS[(t.version % 2) as usize];
        disk.flip_bit(block_offset(newest + 1) + 100, 3);
        let back = read(&disk, &DEV).await.unwrap();
        assert_eq!(back.version, t.version - 1);
        assert_eq!(back.get(SegmentId { volume: 7, pg: 5 }).unwrap().epoch, 6);
        // Another device's table is not ours.
        assert_eq!(read(&disk, &[1; 16]).await.unwrap(), SegmentTable::default());
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_segments_is_an_error() {
        let disk = SimDisk::new(1 << 20, 1, SimFaults::none());
        let mut t = SegmentTable::default();
        for pg in 0..=SEGMENTS_MAX as u32 {
            t.entries.push(entry(pg));
        }
        assert!(matches!(write(&disk, DEV, &mut t).await, Err(TableError::TooMany(_))));
    }
}
