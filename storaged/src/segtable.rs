//! The segment table: which segments a node holds and what of each must
//! survive a restart outside the log (epoch, PGMRPL, the PG's membership).
//!
//! Two copies in the metadata area, both written on every change, one after
//! the other: version `v` goes first into slot `v mod 2`, durably, then into
//! the other slot, durably, and only then is the change acted on. So the
//! last change acted on is always in both slots, and a damaged slot is never
//! a rollback: the other slot holds the newest version, or the one before a
//! write the node never acted on. Which slot a crash may have torn follows
//! from the order: only the first slot of the next version, which is the
//! second slot of the one the other slot holds. A damaged slot anywhere
//! else is damage. A table is valid only if every one of its blocks is
//! valid and carries the same version. It is small (rewritten whole on a
//! change) because it changes rarely: a new segment, an epoch bump, a
//! PGMRPL advance, the start and the end of a coalescing round.
//!
//! With the page store's versions it is also the node's checkpoint: an
//! entry says up to which LSN the segment's chain is in page versions
//! (`coalesced_lsn`), so start-up replays only the log after it, whatever
//! the size of the page store.

use crate::io::{AlignedBuf, BLOCK_SIZE, BlockIo, Durability, IoError};
use crate::log::format::{BlockHeader, BlockKind, DeviceId, PAYLOAD_MAX_BYTES, decode_block_at, encode_block};
use crate::log::layout::block_offset;
use crate::membership::{MEMBERSHIP_BYTES, Membership};
use crate::record::SegmentId;
use crate::segment::{ANNULLED_RANGES_MAX, LsnRange};

/// First block of each slot, and the blocks a slot spans.
pub const SLOT_BLOCKS: [u64; 2] = [8, 64];
pub const SLOT_LEN_BLOCKS: u64 = 56;
/// The fields up to the truncation ranges (144 bytes), the membership at
/// [`MEMBERSHIP_AT`], and reserved bytes to a multiple of 8.
const ENTRY_BYTES: usize = 376;
const MEMBERSHIP_AT: usize = 144;
const BLOCK_HEADER_BYTES: usize = 8;
const ENTRIES_PER_BLOCK: usize = (PAYLOAD_MAX_BYTES - BLOCK_HEADER_BYTES) / ENTRY_BYTES;
/// Segments a node can hold (10 entries a block, since entries carry the
/// PG's membership).
pub const SEGMENTS_MAX: usize = ENTRIES_PER_BLOCK * SLOT_LEN_BLOCKS as usize;

#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The PG's membership as the writer last set it (None: never set).
    /// Gossip serves and takes records only from its members.
    pub membership: Option<Membership>,
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
    #[error(
        "neither slot of the segment table holds a whole table ({0}): which segments this node holds, \
         and at which epochs, is lost. Do not serve from this device: keep it for analysis, and rebuild \
         its segments from their peers on a freshly formatted device"
    )]
    Unreadable(String),
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

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotRead {
    /// Its first block is all zeros: format left it so and no table was
    /// written there since.
    Never,
    Valid(SegmentTable),
    /// Written, but not a whole table: why.
    Damaged(String),
}

/// A slot that does not hold the table it should.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFinding {
    pub slot: usize,
    /// Byte offset of the slot's first block on the device.
    pub offset: u64,
    pub what: String,
}

/// What [`read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRead {
    pub table: SegmentTable,
    pub slots: [SlotRead; 2],
    /// A slot that fails its checks where only damage explains it (the
    /// table is whole in the other slot).
    pub damaged: Option<SlotFinding>,
    /// A slot that fails its checks where a write cut short by a crash may
    /// have torn it (or damage: the two look alike; nothing is lost either way).
    pub maybe_torn: Option<SlotFinding>,
}

impl TableRead {
    /// The slots do not both hold the table: write it again so that they do
    /// before acting on it (an acknowledged state must never rest on one copy).
    pub fn needs_rewrite(&self) -> bool {
        self.table.version > 0
            && self
                .slots
                .iter()
                .any(|s| !matches!(s, SlotRead::Valid(t) if *t == self.table))
    }
}

/// The slots version `v` is written to, in order.
pub fn write_order(version: u64) -> [usize; 2] {
    let first = (version % 2) as usize;
    [first, 1 - first]
}

/// Read both slots and decide which holds the table (see [`judge`]).
pub async fn read<D: BlockIo>(dev: &D, device_id: &DeviceId) -> Result<TableRead, TableError> {
    let mut slots = [SlotRead::Never, SlotRead::Never];
    for (i, slot) in SLOT_BLOCKS.into_iter().enumerate() {
        let buf = AlignedBuf::zeroed_blocks(SLOT_LEN_BLOCKS as usize);
        let (buf, result) = dev.read(block_offset(slot), buf).await;
        result?;
        slots[i] = decode_slot(&buf, device_id, slot);
    }
    judge(slots)
}

/// Which slot holds the table, and what the other one is. Version `v` is
/// written to slot `v mod 2` and then to the other slot (see the module
/// comment), so:
/// - both valid: the higher version, which is in both slots unless a crash
///   came between its two writes (then it is in its first slot only);
/// - one valid, one damaged: the valid one. A crash may have torn the
///   damaged one only if it is the first slot of the next version;
/// - one valid with version 1 in slot 1, slot 0 never written: the first
///   table, the crash came before its second write;
/// - slot 1 damaged, slot 0 never written: the first table's first write,
///   torn (never acted on): no table yet;
/// - anything else has no whole table the node can trust, and is refused.
pub fn judge(slots: [SlotRead; 2]) -> Result<TableRead, TableError> {
    let finding = |slot: usize, what: String| SlotFinding {
        slot,
        offset: block_offset(SLOT_BLOCKS[slot]),
        what,
    };
    let mut damaged = None;
    let mut maybe_torn = None;
    let table = match &slots {
        [SlotRead::Never, SlotRead::Never] => SegmentTable::default(),
        [SlotRead::Valid(a), SlotRead::Valid(b)] => {
            let (newer, older) = if b.version > a.version { (1, 0) } else { (0, 1) };
            let [n, o] = [newer, older].map(|i| match &slots[i] {
                SlotRead::Valid(t) => t,
                _ => unreachable!("both valid"),
            });
            let between_writes = n.version == o.version + 1 && write_order(n.version)[0] == newer;
            if n.version != o.version && !between_writes {
                damaged = Some(finding(
                    older,
                    format!(
                        "holds version {} while slot {newer} holds {}: a write of this slot was lost",
                        o.version, n.version
                    ),
                ));
            }
            n.clone()
        }
        [SlotRead::Valid(t), other] | [other, SlotRead::Valid(t)] => {
            let valid = if matches!(slots[0], SlotRead::Valid(_)) { 0 } else { 1 };
            let x = 1 - valid;
            match other {
                SlotRead::Never if t.version == 1 && valid == write_order(1)[0] => {}
                SlotRead::Never => {
                    damaged = Some(finding(
                        x,
                        format!(
                            "is all zeros while slot {valid} holds version {}: a write of this slot was lost, or it was wiped",
                            t.version
                        ),
                    ))
                }
                SlotRead::Damaged(why) if x == write_order(t.version + 1)[0] => {
                    maybe_torn = Some(finding(
                        x,
                        format!(
                            "{why} (the next version's first write: torn by a crash, or damaged; slot {valid} holds version {})",
                            t.version
                        ),
                    ))
                }
                SlotRead::Damaged(why) => {
                    damaged = Some(finding(
                        x,
                        format!(
                            "{why}; no write of this slot can have been cut short (slot {valid} holds version {})",
                            t.version
                        ),
                    ))
                }
                SlotRead::Valid(_) => unreachable!("matched above"),
            }
            t.clone()
        }
        [SlotRead::Never, SlotRead::Damaged(why)] => {
            // The first table's first write (slot 1), cut short: never acted on.
            maybe_torn = Some(finding(
                1,
                format!("{why} (the first table's first write, torn by a crash)"),
            ));
            SegmentTable::default()
        }
        [a, b] => {
            let say = |slot: usize, s: &SlotRead| match s {
                SlotRead::Never => format!("slot {slot} (offset {}) is all zeros", block_offset(SLOT_BLOCKS[slot])),
                SlotRead::Damaged(why) => format!("slot {slot} (offset {}): {why}", block_offset(SLOT_BLOCKS[slot])),
                SlotRead::Valid(t) => format!("slot {slot} holds version {}", t.version),
            };
            return Err(TableError::Unreadable(format!("{}; {}", say(0, a), say(1, b))));
        }
    };
    Ok(TableRead {
        table,
        slots,
        damaged,
        maybe_torn,
    })
}

fn decode_slot(buf: &AlignedBuf, device_id: &DeviceId, slot: u64) -> SlotRead {
    // Format zeroes the metadata area: anything else in a slot was written
    // (here, or misdirected here) and must be a whole table.
    if buf.block(0).iter().all(|&b| b == 0) {
        return SlotRead::Never;
    }
    match decode_table(buf, device_id, slot) {
        Ok(t) => SlotRead::Valid(t),
        Err(why) => SlotRead::Damaged(why),
    }
}

fn decode_table(buf: &AlignedBuf, device_id: &DeviceId, slot: u64) -> Result<SegmentTable, String> {
    let mut version = None;
    let mut entries = Vec::new();
    let mut total = 1usize;
    let mut i = 0usize;
    while i < total {
        let offset = block_offset(slot + i as u64);
        let (h, p) = decode_block_at(buf.block(i), BlockKind::SegmentTable, device_id, offset)
            .map_err(|e| format!("block {i} (offset {offset}): {e}"))?;
        let first = *version.get_or_insert(h.seq);
        if first != h.seq {
            return Err(format!(
                "block {i} (offset {offset}) holds version {}, block 0 version {first}",
                h.seq
            ));
        }
        if p.len() < BLOCK_HEADER_BYTES {
            return Err(format!("block {i} (offset {offset}): a payload of {} bytes", p.len()));
        }
        let index = u16::from_le_bytes([p[0], p[1]]) as usize;
        total = u16::from_le_bytes([p[2], p[3]]) as usize;
        let count = u32::from_le_bytes([p[4], p[5], p[6], p[7]]) as usize;
        let body = &p[BLOCK_HEADER_BYTES..];
        if index != i
            || total == 0
            || total > SLOT_LEN_BLOCKS as usize
            || count > ENTRIES_PER_BLOCK
            || body.len() != count * ENTRY_BYTES
        {
            return Err(format!(
                "block {i} (offset {offset}) says it is block {index} of {total} with {count} entries in {} bytes",
                body.len()
            ));
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
                        return Err(format!(
                            "block {i} (offset {offset}): an entry with {n} truncation ranges"
                        ));
                    }
                    n as u8
                },
                annulled: std::array::from_fn(|i| (u64_at(80 + 16 * i), u64_at(88 + 16 * i))),
                // Checked like every other field: a membership that does not
                // decode is damage, never "no membership" (gossip would then
                // refuse the PG's members, or worse, serve a stranger).
                membership: Membership::decode(&e[MEMBERSHIP_AT..MEMBERSHIP_AT + MEMBERSHIP_BYTES]).map_err(|why| {
                    format!(
                        "block {i} (offset {offset}): the entry of volume {} pg {} has a bad membership: {why}",
                        u64_at(0),
                        u32_at(8)
                    )
                })?,
            });
        }
        i += 1;
    }
    Ok(SegmentTable {
        version: version.unwrap_or(0),
        entries,
    })
}

/// Write `table` as the next version, durably, into both slots, one after
/// the other (first slot `version mod 2`). On success `table.version` is
/// the new version. The second write starts only once the first is
/// durable: a crash tears one slot at most, and the other holds a whole table.
pub async fn write<D: BlockIo>(dev: &D, device_id: DeviceId, table: &mut SegmentTable) -> Result<(), TableError> {
    if table.entries.len() > SEGMENTS_MAX {
        return Err(TableError::TooMany(table.entries.len()));
    }
    let version = table.version + 1;
    for slot in write_order(version) {
        write_slot(dev, device_id, table, version, SLOT_BLOCKS[slot]).await?;
    }
    table.version = version;
    Ok(())
}

async fn write_slot<D: BlockIo>(
    dev: &D,
    device_id: DeviceId,
    table: &SegmentTable,
    version: u64,
    slot: u64,
) -> Result<(), TableError> {
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
            let start = p.len();
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
            debug_assert_eq!(p.len() - start, MEMBERSHIP_AT);
            match &e.membership {
                Some(m) => m.encode(&mut p),
                // All zeros is "none" (Membership::decode).
                None => p.resize(p.len() + MEMBERSHIP_BYTES, 0),
            }
            p.resize(start + ENTRY_BYTES, 0); // reserved
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
    Ok(())
}

const _: () = assert!(SLOT_BLOCKS[0] + SLOT_LEN_BLOCKS <= SLOT_BLOCKS[1]);
const _: () = assert!(SLOT_BLOCKS[1] + SLOT_LEN_BLOCKS <= 128, "below superblock copy 1");
const _: () = assert!(ENTRIES_PER_BLOCK * ENTRY_BYTES + BLOCK_HEADER_BYTES <= BLOCK_SIZE);
const _: () = assert!(MEMBERSHIP_AT + MEMBERSHIP_BYTES <= ENTRY_BYTES);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::sim::{SimDisk, SimFaults};
    use crate::log::format::{decode_block, seal_block};
    use crate::membership::Member;

    const DEV: DeviceId = [9; 16];

    fn membership(epoch: u64) -> Membership {
        let members = (1..=6)
            .map(|id| Member {
                id,
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], 7000 + id as u16)),
            })
            .collect();
        Membership::single(epoch, members)
    }

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
            // Every other entry has one, so entries with and without sit side by side.
            membership: (pg % 2 == 0).then(|| membership(u64::from(pg) + 1)),
        }
    }

    async fn table(disk: &SimDisk) -> SegmentTable {
        read(disk, &DEV).await.unwrap().table
    }

    #[tokio::test(start_paused = true)]
    async fn roundtrip_in_both_slots() {
        let disk = SimDisk::new(1 << 20, 1, SimFaults::none());
        let fresh = read(&disk, &DEV).await.unwrap();
        assert_eq!(fresh.table, SegmentTable::default());
        assert!(!fresh.needs_rewrite() && fresh.damaged.is_none() && fresh.maybe_torn.is_none());
        let mut t = SegmentTable::default();
        for pg in 0..300 {
            t.upsert(entry(pg));
        }
        write(&disk, DEV, &mut t).await.unwrap();
        let back = read(&disk, &DEV).await.unwrap();
        assert_eq!(back.table, t);
        assert_eq!(back.slots, [SlotRead::Valid(t.clone()), SlotRead::Valid(t.clone())]);
        assert!(!back.needs_rewrite());
        assert_eq!(back.table.get(entry(4).id).unwrap().membership, Some(membership(5)));
        assert_eq!(back.table.get(entry(5).id).unwrap().membership, None);
        t.upsert(SegmentEntry { epoch: 99, ..entry(5) });
        write(&disk, DEV, &mut t).await.unwrap();
        assert_eq!(table(&disk).await, t);
        // Another device's table is not a table this node can trust.
        assert!(matches!(read(&disk, &[1; 16]).await, Err(TableError::Unreadable(_))));
    }

    /// A bit flipped in either slot, in any block, after a table was written
    /// once, twice, many times: the table read is the last one written, and
    /// the damage is reported for what it is.
    #[tokio::test(start_paused = true)]
    async fn a_damaged_slot_never_rolls_the_table_back() {
        for writes in 1..=4u64 {
            for (slot, slot_block) in SLOT_BLOCKS.into_iter().enumerate() {
                for block in [0, 1] {
                    let disk = SimDisk::new(1 << 20, 1, SimFaults::none());
                    let mut t = SegmentTable::default();
                    for pg in 0..40 {
                        t.upsert(entry(pg));
                    }
                    for w in 0..writes {
                        t.upsert(SegmentEntry {
                            epoch: 10 + w,
                            ..entry(3)
                        });
                        write(&disk, DEV, &mut t).await.unwrap();
                    }
                    disk.flip_bit(block_offset(slot_block + block) + 700, 2);
                    let back = read(&disk, &DEV).await.unwrap();
                    let at = format!("{writes} writes, slot {slot} block {block}");
                    assert_eq!(back.table, t, "{at}");
                    assert_eq!(back.table.get(entry(3).id).unwrap().epoch, 9 + writes, "{at}");
                    assert!(back.needs_rewrite(), "{at}");
                    // The last write's slots were both written whole: the
                    // first slot of the next version is the only one a
                    // crash could have torn.
                    let torn_possible = slot == write_order(writes + 1)[0];
                    let found = back.damaged.as_ref().or(back.maybe_torn.as_ref()).unwrap();
                    assert_eq!(found.slot, slot, "{at}");
                    assert_eq!(back.maybe_torn.is_some(), torn_possible, "{at}: {back:?}");
                    assert_eq!(back.damaged.is_some(), !torn_possible, "{at}");
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_between_the_two_writes_or_in_one_keeps_a_whole_table() {
        let disk = SimDisk::new(1 << 20, 1, SimFaults::none());
        let mut t = SegmentTable::default();
        t.upsert(entry(1));
        // The first table's first write torn: no table yet.
        let mut first = t.clone();
        write_slot(&disk, DEV, &first, 1, SLOT_BLOCKS[1]).await.unwrap();
        disk.flip_bit(block_offset(SLOT_BLOCKS[1]) + 3000, 0);
        let back = read(&disk, &DEV).await.unwrap();
        assert_eq!(back.table, SegmentTable::default());
        assert!(back.maybe_torn.is_some() && back.damaged.is_none());
        // Its first write whole, the second not begun: the table is there.
        write_slot(&disk, DEV, &first, 1, SLOT_BLOCKS[1]).await.unwrap();
        let back = read(&disk, &DEV).await.unwrap();
        assert_eq!(back.table.version, 1);
        assert!(back.needs_rewrite() && back.damaged.is_none() && back.maybe_torn.is_none());
        first.version = 1;
        write(&disk, DEV, &mut first).await.unwrap();
        // Version 3's first slot (1) written, the second (0) still at 2.
        let mut next = first.clone();
        next.upsert(entry(2));
        write_slot(&disk, DEV, &next, 3, SLOT_BLOCKS[1]).await.unwrap();
        let back = read(&disk, &DEV).await.unwrap();
        assert_eq!(back.table.version, 3);
        assert_eq!(back.table.entries.len(), 2);
        assert!(back.needs_rewrite() && back.damaged.is_none());
        // A lost write: the second slot newer than the first.
        let disk = SimDisk::new(1 << 20, 1, SimFaults::none());
        let mut t = SegmentTable::default();
        t.upsert(entry(1));
        write(&disk, DEV, &mut t).await.unwrap();
        write_slot(&disk, DEV, &t, 2, SLOT_BLOCKS[1]).await.unwrap();
        let back = read(&disk, &DEV).await.unwrap();
        assert_eq!(back.table.version, 2);
        assert_eq!(back.damaged.as_ref().map(|d| d.slot), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn both_slots_damaged_is_refused() {
        let disk = SimDisk::new(1 << 20, 1, SimFaults::none());
        let mut t = SegmentTable::default();
        t.upsert(entry(1));
        write(&disk, DEV, &mut t).await.unwrap();
        write(&disk, DEV, &mut t).await.unwrap();
        disk.flip_bit(block_offset(SLOT_BLOCKS[0]) + 100, 1);
        disk.flip_bit(block_offset(SLOT_BLOCKS[1]) + 100, 1);
        let err = read(&disk, &DEV).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TableError::Unreadable(_)));
        assert!(msg.contains("offset 32768") && msg.contains("offset 262144"), "{msg}");
        // Slot 0 damaged and slot 1 wiped: slot 0 is only ever written
        // after slot 1, so nothing whole is left either.
        let disk = SimDisk::new(1 << 20, 1, SimFaults::none());
        write(&disk, DEV, &mut t).await.unwrap();
        disk.write_raw(block_offset(SLOT_BLOCKS[1]), &[0; BLOCK_SIZE]);
        disk.flip_bit(block_offset(SLOT_BLOCKS[0]) + 100, 1);
        assert!(matches!(read(&disk, &DEV).await, Err(TableError::Unreadable(_))));
    }

    /// A membership field that does not decode, in a block whose CRC is
    /// right (written so by a bug, or by another program): the slot is
    /// damaged, never read as a segment without a membership.
    #[tokio::test(start_paused = true)]
    async fn a_bad_membership_field_is_damage() {
        let disk = SimDisk::new(1 << 20, 1, SimFaults::none());
        let mut t = SegmentTable::default();
        for pg in 0..3 {
            t.upsert(entry(pg));
        }
        write(&disk, DEV, &mut t).await.unwrap();
        write(&disk, DEV, &mut t).await.unwrap();
        // Slot 0 is not the first slot of version 3: nothing but damage explains it.
        let at = block_offset(SLOT_BLOCKS[0]);
        let mut block = disk.read_raw(at, BLOCK_SIZE);
        let header = decode_block(&block).unwrap().0;
        // Entry 0's member count: 9, past the most a membership has.
        let count_at = crate::log::format::HEADER_BYTES + BLOCK_HEADER_BYTES + MEMBERSHIP_AT + 8;
        block[count_at] = 9;
        seal_block(&mut block, &header);
        disk.write_raw(at, &block);
        let back = read(&disk, &DEV).await.unwrap();
        assert_eq!(back.table, t);
        let damaged = back.damaged.expect("slot 0 is damaged");
        assert_eq!(damaged.slot, 0);
        assert!(damaged.what.contains("bad membership"), "{}", damaged.what);
        assert!(matches!(&back.slots[0], SlotRead::Damaged(_)));
        // Both slots so: no table to trust, and the node refuses to start.
        let at = block_offset(SLOT_BLOCKS[1]);
        let mut block = disk.read_raw(at, BLOCK_SIZE);
        let header = decode_block(&block).unwrap().0;
        block[count_at] = 9;
        seal_block(&mut block, &header);
        disk.write_raw(at, &block);
        let err = read(&disk, &DEV).await.unwrap_err();
        assert!(err.to_string().contains("bad membership"), "{err}");
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
