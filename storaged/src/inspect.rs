//! Offline inspection of a device: what `storctl inspect` prints.
//!
//! Reads, never writes. Reports the superblock copies, the anchor slots, the
//! live log (tail, head, entries, records), the segments with their page
//! store extents, and the result of a CRC check of every block of the
//! metadata area and the log region that is not all zeros, and of every page
//! version slot of every segment's extent.
//!
//! What counts as corruption: a bad superblock copy, a non-zero reserved
//! metadata block, an entry in the live log that is not a valid record, and an
//! invalid log block inside the live log. Past its end, torn blocks are the
//! expected debris of writes a crash cut short (they were never
//! acknowledged), and any other invalid block in the part of the log that
//! holds nothing is counted, not corruption: no record can be lost there. The log's damage is judged by the node's own scan
//! (`log::recovery::scan_log`), so both tell a torn write from damage by the
//! same rules; a segment table slot damaged where no crash can have torn it,
//! or a table neither slot of which holds (`segtable::judge`); and a damaged
//! page version slot, judged as the node judges it (`pagestore::current`): a
//! torn write only where a round open at the last crash wrote, damage
//! everywhere else (and a damaged current version is a page the node will
//! not serve); a page-version index copy that does not verify, and a
//! current version the index says is not the current one
//! (`pagemap::verify`: a lost or overwritten write).

use std::sync::Arc;

use serde::Serialize;

use crate::io::{AlignedBuf, BLOCK_SIZE, BlockIo};
use crate::log::core::INFLIGHT_BLOCKS_MAX;
use crate::log::format::{BlockError, BlockKind, DeviceId, decode_block, decode_block_at};
use crate::log::layout::{ANCHOR_BLOCKS, METADATA_BLOCKS, SCRUB_STATE_BLOCKS, SUPERBLOCK_BLOCKS, block_offset};
use crate::log::recovery::{OpenError, read_anchor, read_superblock, scan_log};
use crate::pagemap::{self, Entry, PageMap, Verdict};
use crate::pagestore::{self, Current, Extent, Slot};
use crate::record::{LogEntry, SegmentId};
use crate::segtable;

/// What `segtable::judge` made of a table slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableSlot {
    Valid,
    MaybeTorn,
    Damaged,
}

/// Problems listed one by one, at most; the counts are always complete.
pub const PROBLEMS_LISTED_MAX: usize = 100;
const CHECK_CHUNK_BLOCKS: usize = 256;

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub superblock: SuperblockInfo,
    pub anchor: AnchorInfo,
    pub log: LogInfo,
    pub pages: PagesInfo,
    pub segments: Vec<SegmentInfo>,
    pub check: CheckInfo,
    /// "clean" or "corrupt".
    pub status: &'static str,
    /// The writer that had the device open while it was read (`null` if
    /// none): the report is then a snapshot of a device being written.
    pub in_use_by: Option<InUseBy>,
}

/// Who held the device's write lock when `storctl inspect` opened it.
#[derive(Debug, Serialize)]
pub struct InUseBy {
    /// `null` where the holder's pid is not visible to the reader.
    pub pid: Option<u32>,
    pub command: Option<String>,
    /// The same, as a sentence: "pid 1234 (storaged)".
    pub holder: String,
}

impl From<&crate::io::lock::LockHolder> for InUseBy {
    fn from(h: &crate::io::lock::LockHolder) -> InUseBy {
        InUseBy {
            pid: h.pid,
            command: h.command.clone(),
            holder: h.to_string(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SuperblockInfo {
    pub device_id: String,
    pub node_id: u64,
    pub device_bytes: u64,
    pub block_bytes: usize,
    pub log_start_block: u64,
    pub log_blocks: u64,
    pub pages_start_block: u64,
    pub pages_blocks: u64,
    pub created_unix_secs: u64,
    /// "ok" or why the copy is not.
    pub copies: [String; 2],
}

#[derive(Debug, Serialize)]
pub struct AnchorInfo {
    pub generation: u32,
    pub tail_seq: u64,
    pub counter: u64,
    pub slots: [String; 2],
}

#[derive(Debug, Serialize)]
pub struct LogInfo {
    /// Oldest block still owned.
    pub tail_seq: u64,
    /// First block after the valid log (where the next write goes).
    pub head_seq: u64,
    pub blocks_live: u64,
    pub bytes_live: u64,
    pub end: String,
    pub entries: u64,
    pub records: u64,
    pub incomplete_tail_bytes: usize,
    /// Damaged blocks inside the live log (the scan went on past them).
    pub damaged_blocks: u64,
    /// Valid blocks dropped past a torn write at the end (never acknowledged).
    pub dropped_past_torn: u64,
}

#[derive(Debug, Serialize)]
pub struct SegmentInfo {
    pub volume: u64,
    pub pg: u32,
    pub epoch: u64,
    /// The epoch whose truncation the segment applied (below `epoch` while sealed).
    pub installed_epoch: u64,
    /// LSN ranges annulled by recoveries, `[lo, hi]` inclusive.
    pub annulled: Vec<(u64, u64)>,
    pub pgmrpl: u64,
    pub page_bytes: u32,
    pub pg_pages: u64,
    pub extent_start_block: u64,
    pub extent_blocks: u64,
    pub coalesced_lsn: u64,
    pub round_lsn: u64,
    /// Pages with a stored version.
    pub page_count: u64,
    /// The PG's membership epoch as the writer last set it (0: never set),
    /// and its members' node ids.
    pub membership_epoch: u64,
    pub members: Vec<u64>,
}

#[derive(Debug, Serialize)]
pub struct PagesInfo {
    /// Pages with a stored version, over every segment.
    pub page_count: u64,
    /// Version slots read and checked.
    pub slots_checked: u64,
}

#[derive(Debug, Serialize)]
pub struct CheckInfo {
    pub blocks_checked: u64,
    pub blocks_never_written: u64,
    pub blocks_valid: u64,
    /// Invalid blocks just past the log's end: torn by a crash, never acknowledged.
    pub blocks_torn_tail: u64,
    /// Invalid blocks in the part of the log that holds nothing (released,
    /// or never reached): no record can be lost there, and the log
    /// overwrites them when it next passes. Not corruption.
    pub blocks_damaged_free: u64,
    pub problems_found: u64,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Serialize, Clone)]
pub struct Problem {
    pub offset: u64,
    pub what: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ok_or<T, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

struct Problems {
    found: u64,
    listed: Vec<Problem>,
}

impl Problems {
    fn add(&mut self, offset: u64, what: String) {
        self.found += 1;
        if self.listed.len() < PROBLEMS_LISTED_MAX {
            self.listed.push(Problem { offset, what });
        }
    }
}

/// Inspect `dev`. An `Err` is an operational failure (unreadable,
/// unformatted, no usable superblock or anchor); corruption found in a
/// readable device is in the report.
pub async fn inspect<D: BlockIo>(dev: &Arc<D>) -> Result<InspectReport, OpenError> {
    let sb_read = read_superblock(dev.as_ref()).await?;
    let sb = sb_read.superblock;
    let anchor_read = read_anchor(dev.as_ref(), &sb).await?;
    let anchor = anchor_read.anchor;
    let mut problems = Problems {
        found: 0,
        listed: Vec::new(),
    };
    for (copy, block) in sb_read.copies.iter().zip(SUPERBLOCK_BLOCKS) {
        if let Err(e) = copy {
            problems.add(block_offset(block), format!("superblock copy: {e}"));
        }
    }

    // Judged as the node judges it; a table the node would refuse is
    // reported, and the rest of the device still checked.
    let mut table_slots = [TableSlot::Damaged; 2];
    let table = match segtable::read(dev.as_ref(), &sb.device_id).await {
        Ok(found) => {
            for (slot, s) in found.slots.iter().enumerate() {
                if matches!(s, segtable::SlotRead::Valid(_)) {
                    table_slots[slot] = TableSlot::Valid;
                }
            }
            if let Some(d) = &found.maybe_torn {
                table_slots[d.slot] = TableSlot::MaybeTorn;
            }
            if let Some(d) = &found.damaged {
                problems.add(d.offset, format!("segment table slot {}: {}", d.slot, d.what));
            }
            found.table
        }
        Err(segtable::TableError::Io(e)) => return Err(OpenError::Io(e)),
        Err(e) => {
            problems.add(block_offset(segtable::SLOT_BLOCKS[0]), e.to_string());
            segtable::SegmentTable::default()
        }
    };
    let mut records = 0u64;
    let log_start_block = sb.log_start_block;
    let log_blocks = sb.log_blocks;
    let scan = scan_log(dev, &sb, anchor_read.clone(), |start, entry| {
        match LogEntry::decode(&entry) {
            Ok(LogEntry::Record(_)) => records += 1,
            Ok(LogEntry::Annulment(_)) => {}
            Err(e) => {
                let offset = block_offset(log_start_block + (start - 1) % log_blocks);
                problems.add(
                    offset,
                    format!("log entry starting in block seq {start} is not a valid record: {e}"),
                );
            }
        }
    })
    .await?;
    for d in &scan.damaged {
        problems.add(
            d.offset,
            format!(
                "damaged log blocks inside the live log: {d}; the entries in them are lost \
                 (the node keeps the entries after them and reports what its segments lack as holes)"
            ),
        );
    }
    if let Some((seq, found)) = scan.future_generation {
        problems.add(
            block_offset(sb.log_start_block + (seq - 1) % sb.log_blocks),
            format!(
                "log block seq {seq} carries generation {found}, above the anchor's {}: \
                 a newer anchor was lost, and the node refuses to start",
                anchor.generation
            ),
        );
    }
    // Region positions of the damaged blocks, reported above once per run.
    let damaged_pos: std::collections::HashSet<u64> = scan
        .damaged
        .iter()
        .flat_map(|d| (d.first_seq..d.first_seq + d.blocks).map(|s| (s - 1) % sb.log_blocks))
        .collect();
    let mut cut_evidence = scan.next_seq < scan.durable_floor;
    if cut_evidence {
        problems.add(
            block_offset(sb.log_start_block + (scan.next_seq - 1) % sb.log_blocks),
            format!(
                "the log ends at seq {} ({}), below seq {} up to which every block was durable: \
                 a damaged block cut the log, and the records after it are lost here",
                scan.next_seq, scan.end, scan.durable_floor
            ),
        );
    }

    let mut check = CheckInfo {
        blocks_checked: 0,
        blocks_never_written: 0,
        blocks_valid: 0,
        blocks_torn_tail: 0,
        blocks_damaged_free: 0,
        problems_found: 0,
        problems: Vec::new(),
    };
    // Positions (in the log region) just past the end, where torn blocks are
    // expected: what an incarnation could have had in flight when it crashed.
    // A torn block's generation is unknown, so the widest window applies.
    let head_pos = (scan.next_seq - 1) % sb.log_blocks;
    let free_blocks = sb.log_blocks - scan.blocks;
    let in_torn_window =
        |pos: u64| (pos + sb.log_blocks - head_pos) % sb.log_blocks < INFLIGHT_BLOCKS_MAX.min(free_blocks);
    // Positions the live log (tail up to the end) covers.
    let tail_pos = (scan.next_seq - scan.blocks).saturating_sub(1) % sb.log_blocks;
    let live = |pos: u64| (pos + sb.log_blocks - tail_pos) % sb.log_blocks < scan.blocks;
    let mut stop_block_torn = false;
    // Valid blocks further past the end than their incarnation could have had
    // in flight continue a log that a bad block cut short.
    let current_window = anchor.inflight_blocks.min(INFLIGHT_BLOCKS_MAX);
    let mut cut_blocks = 0u64;
    let mut cut_first: Option<u64> = None;

    let end_block = sb.log_start_block + sb.log_blocks;
    let mut buf = AlignedBuf::zeroed_blocks(CHECK_CHUNK_BLOCKS);
    let mut block = 0u64;
    while block < end_block {
        let n = (CHECK_CHUNK_BLOCKS as u64).min(end_block - block) as usize;
        buf.set_blocks(n);
        let (b, result) = dev.read(block_offset(block), buf).await;
        buf = b;
        result.map_err(OpenError::Io)?;
        for i in 0..n {
            let here = block + i as u64;
            let offset = block_offset(here);
            let bytes = buf.block(i);
            check.blocks_checked += 1;
            if bytes.iter().all(|&x| x == 0) {
                check.blocks_never_written += 1;
                continue;
            }
            if SUPERBLOCK_BLOCKS.contains(&here) {
                // Judged above, copy by copy.
                check.blocks_valid += u64::from(decode_block(bytes).is_ok());
                continue;
            }
            if let Some(slot) = ANCHOR_BLOCKS.iter().position(|&a| a == here) {
                match &anchor_read.slots[slot] {
                    Ok(_) => check.blocks_valid += 1,
                    // The slot being written when power failed: the other holds.
                    Err(_) => check.blocks_torn_tail += 1,
                }
                continue;
            }
            if let Some(slot) = segtable::SLOT_BLOCKS
                .iter()
                .position(|&s| (s..s + segtable::SLOT_LEN_BLOCKS).contains(&here))
            {
                match (
                    decode_block_at(bytes, BlockKind::SegmentTable, &sb.device_id, offset),
                    table_slots[slot],
                ) {
                    (Ok(_), _) => check.blocks_valid += 1,
                    // Only the next version's first slot can hold a write a
                    // crash cut short (segtable::judge).
                    (Err(_), TableSlot::MaybeTorn) => check.blocks_torn_tail += 1,
                    // Reported above, once for the slot.
                    (Err(_), TableSlot::Damaged) => {}
                    (Err(e), TableSlot::Valid) => problems.add(offset, format!("segment table block: {e}")),
                }
                continue;
            }
            if SCRUB_STATE_BLOCKS.contains(&here) {
                // The scrubber's progress: two slots written in turn, so one
                // may be a torn write; losing both only restarts a pass.
                match decode_block_at(bytes, BlockKind::ScrubState, &sb.device_id, offset) {
                    Ok(_) => check.blocks_valid += 1,
                    Err(_) => check.blocks_torn_tail += 1,
                }
                continue;
            }
            if here < METADATA_BLOCKS {
                problems.add(offset, "reserved metadata block is not zero".into());
                continue;
            }
            if damaged_pos.contains(&(here - sb.log_start_block)) {
                continue;
            }
            match decode_block_at(bytes, BlockKind::Log, &sb.device_id, offset) {
                Ok((h, _)) => {
                    check.blocks_valid += 1;
                    let window = if h.generation == anchor.generation {
                        current_window
                    } else {
                        INFLIGHT_BLOCKS_MAX
                    };
                    let beyond = h.seq >= scan.next_seq.saturating_add(window)
                        && h.seq < scan.next_seq.saturating_add(sb.log_blocks);
                    if beyond && h.generation <= anchor.generation {
                        cut_blocks += 1;
                        cut_first = Some(cut_first.map_or(h.seq, |s: u64| s.min(h.seq)));
                    }
                }
                // A torn write leaves a new header over old sectors: a CRC
                // mismatch. Nothing else (foreign, misplaced) is crash debris.
                Err(BlockError::BadCrc { .. }) if in_torn_window(here - sb.log_start_block) => {
                    check.blocks_torn_tail += 1;
                    stop_block_torn |= here - sb.log_start_block == head_pos;
                }
                Err(_) if !live(here - sb.log_start_block) => check.blocks_damaged_free += 1,
                Err(e) => problems.add(offset, format!("log block: {e}")),
            }
        }
        block += n as u64;
    }
    if let Some(first) = cut_first {
        cut_evidence = true;
        let end_offset = block_offset(sb.log_start_block + head_pos);
        problems.add(
            end_offset,
            format!(
                "the log ends at seq {} ({}), but {cut_blocks} valid blocks follow beyond what could have been \
                 in flight (from seq {first}): a bad block cut the log, and entries after it are lost",
                scan.next_seq, scan.end
            ),
        );
    }
    if cut_evidence && stop_block_torn {
        // The block the log stopped at is the damage, not crash debris.
        check.blocks_torn_tail -= 1;
        problems.add(
            block_offset(sb.log_start_block + head_pos),
            "log block where the log was cut: CRC mismatch".into(),
        );
    }
    let mut segments = Vec::new();
    let mut pages = PagesInfo {
        page_count: 0,
        slots_checked: 0,
    };
    for e in &table.entries {
        let extent = e.extent();
        // A round open at the last crash may have torn a slot of a page it wrote.
        let torn_after = (e.round_lsn > e.coalesced_lsn).then_some(e.coalesced_lsn);
        let index = read_index(dev.as_ref(), &sb.device_id, e.id, &extent, &mut check, &mut problems).await?;
        let slot_blocks = extent.slot_blocks() as usize;
        let mut page_count = 0;
        let pages_per_read = (CHECK_CHUNK_BLOCKS / (2 * slot_blocks)).max(1) as u64;
        let mut local = 0;
        while local < e.pg_pages {
            let n = pages_per_read.min(e.pg_pages - local);
            // Slot 0 of each page, then slot 1 of each: a stretch each.
            let mut halves = Vec::with_capacity(2);
            for slot in 0..2 {
                let at = extent.slot_block(local, slot);
                let half = AlignedBuf::zeroed_blocks(n as usize * slot_blocks);
                let (half, result) = dev.read(block_offset(at), half).await;
                result.map_err(OpenError::Io)?;
                halves.push(half);
            }
            for i in 0..n {
                let l = local + i;
                let page = e.id.pg as u64 * e.pg_pages + l;
                let slot_bytes = slot_blocks * BLOCK_SIZE;
                let base = i as usize * slot_bytes;
                let slots = [0, 1].map(|s| {
                    let bytes = &halves[s][base..base + slot_bytes];
                    pagestore::decode_slot(bytes, &sb.device_id, &extent, e.id, page, extent.slot_block(l, s))
                });
                pages.slots_checked += 2;
                let blocks = slot_blocks as u64;
                check.blocks_checked += 2 * blocks;
                for slot in &slots {
                    match slot {
                        Slot::Empty => check.blocks_never_written += blocks,
                        Slot::Version(_) => check.blocks_valid += blocks,
                        Slot::Damaged(_) => {}
                    }
                }
                let where_ = |s: usize| {
                    (
                        block_offset(extent.slot_block(l, s)),
                        format!("page {page} (volume {} pg {}) version slot {s}", e.id.volume, e.id.pg),
                    )
                };
                let damaged_slot = slots.iter().position(|s| matches!(s, Slot::Damaged(_))).unwrap_or(0);
                // The node's rule: a page not written since the crash.
                match pagestore::current(slots, torn_after) {
                    Ok(chosen) => {
                        if let Current::Version { .. } = chosen.current {
                            page_count += 1;
                        }
                        let (found, other_slot) = match &chosen.current {
                            Current::Never => (None, pagestore::FIRST_SLOT),
                            Current::Version { slot, version } => (Some((version.lsn, &version.bytes[..])), 1 - slot),
                        };
                        let entry = index[l as usize];
                        match pagemap::verify(entry, found) {
                            Verdict::Agrees => {}
                            Verdict::Damaged(why) => {
                                let (offset, what) = where_(other_slot);
                                problems.add(offset, format!("{what}: {why}; the page is not served"));
                            }
                            Verdict::Behind(found) => {
                                let in_round = torn_after.is_some_and(|c| found.lsn > c);
                                if !in_round && entry != pagemap::UNKNOWN {
                                    let block = pagemap::copy_block(extent.map_start_block(), PageMap::block_of(l), 0);
                                    problems.add(
                                        block_offset(block),
                                        format!(
                                            "page-version index of volume {} pg {}: page {page} at LSN {}, its version is at LSN {} (a lost index write)",
                                            e.id.volume, e.id.pg, entry.lsn, found.lsn
                                        ),
                                    );
                                }
                            }
                        }
                        match chosen.other {
                            None => {}
                            Some(o) if o.maybe_torn => check.blocks_torn_tail += blocks,
                            Some(o) => {
                                let (offset, what) = where_(o.slot);
                                problems.add(
                                    offset,
                                    format!("{what}: {} (an older version; the other slot is current)", o.error),
                                );
                            }
                        }
                    }
                    Err(why) => {
                        let (offset, what) = where_(damaged_slot);
                        problems.add(
                            offset,
                            format!("{what}: {why}; the page's current version is damaged, and not served"),
                        );
                    }
                }
            }
            local += n;
        }
        pages.page_count += page_count;
        segments.push(SegmentInfo {
            volume: e.id.volume,
            pg: e.id.pg,
            epoch: e.epoch,
            installed_epoch: e.installed_epoch,
            annulled: e.annulled().to_vec(),
            pgmrpl: e.pgmrpl,
            page_bytes: e.page_bytes,
            pg_pages: e.pg_pages,
            extent_start_block: e.extent_start_block,
            extent_blocks: extent.blocks(),
            coalesced_lsn: e.coalesced_lsn,
            round_lsn: e.round_lsn,
            membership_epoch: e.membership.as_ref().map_or(0, |m| m.epoch),
            members: e
                .membership
                .as_ref()
                .map_or(Vec::new(), |m| m.members.iter().map(|m| m.id).collect()),
            page_count,
        });
    }
    check.problems_found = problems.found;
    check.problems = problems.listed;

    let status = if check.problems_found == 0 { "clean" } else { "corrupt" };
    Ok(InspectReport {
        superblock: SuperblockInfo {
            device_id: hex(&sb.device_id),
            node_id: sb.node_id,
            device_bytes: sb.device_bytes,
            block_bytes: BLOCK_SIZE,
            log_start_block: sb.log_start_block,
            log_blocks: sb.log_blocks,
            pages_start_block: sb.pages_start_block,
            pages_blocks: sb.pages_blocks,
            created_unix_secs: sb.created_unix_secs,
            copies: [ok_or(&sb_read.copies[0]), ok_or(&sb_read.copies[1])],
        },
        anchor: AnchorInfo {
            generation: anchor.generation,
            tail_seq: anchor.tail_seq,
            counter: anchor.counter,
            slots: [ok_or(&anchor_read.slots[0]), ok_or(&anchor_read.slots[1])],
        },
        log: LogInfo {
            tail_seq: anchor.tail_seq,
            head_seq: scan.next_seq,
            blocks_live: scan.blocks,
            bytes_live: scan.blocks * BLOCK_SIZE as u64,
            end: scan.end.to_string(),
            entries: scan.entries,
            records,
            incomplete_tail_bytes: scan.incomplete_tail_bytes,
            damaged_blocks: scan.damaged.iter().map(|d| d.blocks).sum(),
            dropped_past_torn: scan.dropped_past_torn,
        },
        pages,
        segments,
        check,
        status,
        in_use_by: None,
    })
}

impl InspectReport {
    /// The human form: a few aligned lines, problems last.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let sb = &self.superblock;
        if let Some(u) = &self.in_use_by {
            let _ = writeln!(
                s,
                "in use         by {}: a writer has the device open, so this is a snapshot of a device being written",
                u.holder
            );
        }
        let _ = writeln!(s, "device id      {}", sb.device_id);
        let _ = writeln!(s, "node id        {}", sb.node_id);
        let _ = writeln!(
            s,
            "size           {} bytes ({} blocks of {})",
            sb.device_bytes,
            sb.device_bytes / BLOCK_SIZE as u64,
            sb.block_bytes
        );
        let _ = writeln!(s, "superblocks    copy 0: {}; copy 1: {}", sb.copies[0], sb.copies[1]);
        let _ = writeln!(
            s,
            "log region     blocks {}..{} ({} MiB)",
            sb.log_start_block,
            sb.log_start_block + sb.log_blocks,
            (sb.log_blocks * BLOCK_SIZE as u64) >> 20
        );
        let _ = writeln!(
            s,
            "page store     blocks {}..{}; {} pages stored, {} version slots checked",
            sb.pages_start_block,
            sb.pages_start_block + sb.pages_blocks,
            self.pages.page_count,
            self.pages.slots_checked
        );
        let _ = writeln!(s, "segments       {}", self.segments.len());
        for seg in &self.segments {
            let _ = writeln!(
                s,
                "  volume {} pg {}: epoch {}{}, pgmrpl {}, coalesced through {}{}; {} of {} pages of {} bytes stored (extent at block {}, {} blocks){}",
                seg.volume,
                seg.pg,
                seg.epoch,
                if seg.installed_epoch < seg.epoch {
                    format!(" (sealed; installed {})", seg.installed_epoch)
                } else {
                    String::new()
                },
                seg.pgmrpl,
                seg.coalesced_lsn,
                if seg.round_lsn == u64::MAX {
                    " (rebuild from peers under way)".to_string()
                } else if seg.round_lsn > seg.coalesced_lsn {
                    format!(" (round to {} under way)", seg.round_lsn)
                } else {
                    String::new()
                },
                seg.page_count,
                seg.pg_pages,
                seg.page_bytes,
                seg.extent_start_block,
                seg.extent_blocks,
                if seg.membership_epoch > 0 {
                    format!("; membership epoch {}, members {:?}", seg.membership_epoch, seg.members)
                } else {
                    String::new()
                }
            );
        }
        let a = &self.anchor;
        let _ = writeln!(
            s,
            "anchor         generation {}, counter {}; slot 0: {}; slot 1: {}",
            a.generation, a.counter, a.slots[0], a.slots[1]
        );
        let l = &self.log;
        let _ = writeln!(
            s,
            "log            tail seq {}, head seq {}, {} blocks live ({} damaged), {} entries, {} records",
            l.tail_seq, l.head_seq, l.blocks_live, l.damaged_blocks, l.entries, l.records
        );
        let _ = writeln!(s, "log end        {}", l.end);
        let c = &self.check;
        let _ = writeln!(
            s,
            "check          {} blocks read: {} valid, {} never written, {} torn past the end, {} damaged where the log holds nothing; {} problems",
            c.blocks_checked,
            c.blocks_valid,
            c.blocks_never_written,
            c.blocks_torn_tail,
            c.blocks_damaged_free,
            c.problems_found
        );
        for p in &c.problems {
            let _ = writeln!(s, "  offset {:>12}: {}", p.offset, p.what);
        }
        if c.problems_found as usize > c.problems.len() {
            let _ = writeln!(s, "  ... and {} more", c.problems_found as usize - c.problems.len());
        }
        let _ = writeln!(s, "status         {}", self.status);
        s
    }
}

/// A segment's page-version index as the node would load it: the entries
/// (`pagemap::UNKNOWN` for a block both copies of which are damaged), each
/// damaged copy reported.
async fn read_index<D: BlockIo>(
    dev: &D,
    device_id: &DeviceId,
    id: SegmentId,
    extent: &Extent,
    check: &mut CheckInfo,
    problems: &mut Problems,
) -> Result<Vec<Entry>, OpenError> {
    let mut entries = vec![Entry::default(); extent.pg_pages as usize];
    let start = extent.map_start_block();
    let blocks = extent.map_blocks() * pagemap::COPIES;
    let buf = AlignedBuf::zeroed_blocks(blocks as usize);
    let (buf, result) = dev.read(block_offset(start), buf).await;
    result.map_err(OpenError::Io)?;
    let map = PageMap::new(extent.pg_pages);
    for index in 0..extent.map_blocks() {
        let pages = map.pages_of(index);
        let at = |c: usize| pagemap::copy_block(start, index, c);
        let copies = [0, 1].map(|c| {
            let o = (at(c) - start) as usize * BLOCK_SIZE;
            pagemap::decode_block(&buf[o..o + BLOCK_SIZE], device_id, id, index, at(c), pages.len())
        });
        check.blocks_checked += pagemap::COPIES;
        for c in &copies {
            match c {
                pagemap::Copy::Empty => check.blocks_never_written += 1,
                pagemap::Copy::Valid { .. } => check.blocks_valid += 1,
                pagemap::Copy::Damaged(_) => {}
            }
        }
        let what = format!("page-version index block {index} of volume {} pg {}", id.volume, id.pg);
        let damaged_copy = copies
            .iter()
            .position(|c| matches!(c, pagemap::Copy::Damaged(_)))
            .unwrap_or(0);
        match pagemap::choose(copies) {
            (pagemap::Chosen::Never, _) => {}
            (pagemap::Chosen::Copy { copy, entries: e, .. }, other) => {
                entries[pages].copy_from_slice(&e);
                if let Some(error) = other {
                    problems.add(block_offset(at(1 - copy)), format!("{what} copy {}: {error}", 1 - copy));
                }
            }
            (pagemap::Chosen::Lost(error), _) => {
                entries[pages].fill(pagemap::UNKNOWN);
                problems.add(
                    block_offset(at(damaged_copy)),
                    format!("{what}: both copies damaged ({error}); lost writes among its pages cannot be told"),
                );
            }
        }
    }
    Ok(entries)
}
