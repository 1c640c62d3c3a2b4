//! The node's side of scrub (`crate::scrub`): reading a range of the log or
//! of a segment's extent again, verifying every block and every current
//! page version, and repairing what the node can alone; installing a
//! peer's copy of a damaged page version once it verifies; serving such a
//! copy to a peer.
//!
//! - A log block is checked only while the node needs it (its seq at or
//!   above the release point and durable); one freed or rewritten while it
//!   was read is not damage. A damaged live block is repaired by writing
//!   again, at the log's head, every record the node holds whose log block
//!   is at or before it (their bodies are in memory, verified when they
//!   came in); then the log lets go of the damaged block.
//! - A page found wrong in a bulk read is read again under its page's lock
//!   before it counts: coalescing may have rewritten it meanwhile. Then its
//!   current version is judged by the slots and the page-version index as
//!   a read judges it. A damaged older slot is overwritten with the current
//!   version; an index behind a valid version takes it; a damaged current
//!   version (or one the index says is not current) needs a peer's copy of
//!   the page at the indexed LSN, used only if its CRC32C is the indexed one.
//! - An index block is checked against the copy the node holds current in
//!   memory; a damaged copy, or a current copy that is not what the node
//!   last wrote (a lost write), is written again.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{Node, NodeError, SlotState};
use crate::io::{AlignedBuf, BLOCK_SIZE, Durability};
use crate::log::format::{BlockKind, DeviceId, decode_block_at};
use crate::log::layout::block_offset;
use crate::pagemap::{self, Chosen, Verdict};
use crate::pagestore::{self, Current, Extent, PageVersion};
use crate::record::{RedoRecord, SegmentId};
use crate::scrub::bufs::BufPool;
use crate::scrub::{Area, Checked, Damaged, Finding, Layout, NeedCopy, Peer};

impl Node {
    pub fn scrub_layout(&self) -> Layout {
        let log_blocks = self.log.stats().log_blocks;
        let st = self.state();
        let mut segments: Vec<(SegmentId, Range<u64>)> = st
            .segments
            .iter()
            .filter_map(|(&id, s)| s.extent.map(|e| (id, e.start_block..e.end_block())))
            .collect();
        segments.sort_by_key(|(_, r)| r.start);
        Layout {
            log: self.log_start_block..self.log_start_block + log_blocks,
            segments,
        }
    }

    /// Verify `range` of `area` in buffers of its own; see the module comment.
    pub async fn scrub_range(&self, area: Area, range: Range<u64>) -> Result<Checked, NodeError> {
        self.scrub_range_in(area, range, &BufPool::new(0, 0)).await
    }

    /// Verify `range` of `area`, reading into buffers from `bufs`. The
    /// checksums are computed off the runtime thread, which serves the
    /// foreground (and reads the next range) meanwhile.
    pub async fn scrub_range_in(&self, area: Area, range: Range<u64>, bufs: &BufPool) -> Result<Checked, NodeError> {
        match area {
            Area::Log => self.scrub_log(range, bufs).await,
            Area::Segment(id) => self.scrub_extent(id, range, bufs).await,
        }
    }

    /// The seq the log block at device block `block` holds while live, if
    /// the live log (tail up to the durable mark) reaches it.
    fn live_seq_at(&self, block: u64) -> Option<u64> {
        self.live_seqs_below(block..block + 1, self.log.stats().durable_seq)[0]
    }

    /// As [`Node::live_seq_at`] for each block of `blocks`, counting only
    /// seqs below `durable`.
    fn live_seqs_below(&self, blocks: Range<u64>, durable: u64) -> Vec<Option<u64>> {
        let log = self.log.stats();
        let l = log.log_blocks;
        let limit = log.durable_seq.min(durable);
        let mut seqs = Vec::with_capacity((blocks.end - blocks.start) as usize);
        for block in blocks {
            let seq = block.checked_sub(self.log_start_block).and_then(|i| {
                // Block i holds the seqs s with (s - 1) mod l = i.
                let s = log.tail_seq + (i + l - (log.tail_seq - 1) % l) % l;
                (s < limit).then_some(s)
            });
            seqs.push(seq);
        }
        seqs
    }

    async fn scrub_log(&self, range: Range<u64>, bufs: &BufPool) -> Result<Checked, NodeError> {
        let mut out = Checked::default();
        let n = (range.end - range.start) as usize;
        // Only blocks durable before the read began are judged: one written
        // while it was read may show its old contents.
        let durable = self.log.stats().durable_seq;
        let (buf, result) = self.io.read(block_offset(range.start), bufs.take(n)).await;
        if let Err(e) = result {
            bufs.give(buf);
            return Err(e.into());
        }
        out.blocks = n as u64;
        let seqs = self.live_seqs_below(range.clone(), durable);
        let (device_id, start) = (self.device_id, range.start);
        let (buf, damaged) = off_runtime(move || {
            let mut damaged = Vec::new();
            for (i, block) in buf.chunks_exact(BLOCK_SIZE).enumerate() {
                let Some(seq) = seqs[i] else { continue };
                let at = start + i as u64;
                let error = match decode_block_at(block, BlockKind::Log, &device_id, block_offset(at)) {
                    Ok((h, _)) if h.seq == seq => continue,
                    Ok((h, _)) => format!("block of seq {} where seq {seq} belongs (a lost write)", h.seq),
                    Err(e) => e.to_string(),
                };
                damaged.push((at, seq, error));
            }
            (buf, damaged)
        })
        .await?;
        bufs.give(buf);
        // Seqs the repair of an earlier block let go of: a record whose
        // entry spans that block and the next is written again whole, so
        // the next one, damaged too, is repaired by the same stroke.
        let mut freed_by_repair = 0..0;
        for (at, seq, error) in damaged {
            let repaired = if seq < self.release_point() || self.live_seq_at(at) != Some(seq) {
                // Freed since (the release point passed it) or rewritten:
                // not damage, unless a repair here freed it.
                if !freed_by_repair.contains(&seq) {
                    continue;
                }
                true
            } else {
                let from = self.release_point();
                match self.relog_through(seq).await {
                    Ok(()) => {
                        freed_by_repair = from..self.release_point();
                        true
                    }
                    Err(e) => {
                        tracing::error!(offset = block_offset(at), seq, error = %e, "a damaged log block could not be written again");
                        false
                    }
                }
            };
            out.found.push(Finding {
                offset: block_offset(at),
                what: Damaged::LogBlock,
                error,
                repaired,
            });
        }
        Ok(out)
    }

    /// Write again every record held whose log block is at or before
    /// `seq`, so the log no longer needs that block, and let it go.
    async fn relog_through(&self, seq: u64) -> Result<(), NodeError> {
        // No truncation between taking the records and writing them again:
        // a copy written after its annulment's entry would be taken for a
        // re-send at start-up, and an annulled record would come back.
        let _fencing = self.fencing.lock().await;
        let batches: Vec<(SegmentId, Vec<u64>, Vec<Vec<u8>>)> = {
            let st = self.state();
            let mut out = Vec::new();
            for (&id, s) in &st.segments {
                let mut lsns = Vec::new();
                let mut entries = Vec::new();
                for (lsn, meta) in s.seg.logged_through(seq) {
                    let body = s.hot.get(meta.page, lsn).ok_or_else(|| {
                        NodeError::BadTruncation(format!("record {lsn} is held but its body is not in memory"))
                    })?;
                    let record = RedoRecord {
                        segment: id,
                        lsn,
                        prev_lsn_pg: meta.prev_lsn_pg,
                        prev_lsn_page: meta.prev_lsn_page,
                        page: meta.page,
                        cpl: meta.cpl,
                        body: body.clone(),
                    };
                    lsns.push(lsn);
                    entries.push(record.encode());
                }
                if !lsns.is_empty() {
                    out.push((id, lsns, entries));
                }
            }
            out
        };
        for (id, lsns, entries) in batches {
            let written = self.log.append_many(entries).await?;
            let mut st = self.state();
            if let Some(s) = st.segments.get_mut(&id) {
                s.seg.relogged(&lsns, written);
            }
        }
        self.log.release(self.release_point());
        if self.release_point() <= seq {
            return Err(NodeError::BadTruncation(format!(
                "the log still needs seq {seq} after its records were written again"
            )));
        }
        Ok(())
    }

    async fn scrub_extent(&self, id: SegmentId, range: Range<u64>, bufs: &BufPool) -> Result<Checked, NodeError> {
        let mut out = Checked::default();
        let (extent, rebuilding) = {
            let st = self.state();
            let Some(s) = st.segments.get(&id) else {
                return Ok(out);
            };
            let Some(extent) = s.extent else { return Ok(out) };
            (extent, s.rebuilding())
        };
        if rebuilding {
            // Hydration rewrites every page; it is checked once it ends.
            return Ok(out);
        }
        let (slot_blocks, pair) = (extent.slot_blocks(), 2 * extent.slot_blocks());
        let map_start = extent.map_start_block();
        // Pages whose slot 0 lies in the range (the extent's first half),
        // both slots of each: a range of the second half has none.
        let first = range.start.saturating_sub(extent.start_block).div_ceil(slot_blocks);
        let end = (range.end.min(map_start).saturating_sub(extent.start_block)).div_ceil(slot_blocks);
        let mut local = first;
        while local < end.min(extent.pg_pages) {
            let n = (256 / pair).max(1).min(end.min(extent.pg_pages) - local);
            self.scrub_pages(id, &extent, local, n, &mut out, bufs).await?;
            local += n;
        }
        out.blocks += range
            .end
            .min(map_start)
            .saturating_sub(range.start.max(extent.start_block));
        // Index blocks whose first copy lies in the range.
        let lo = range.start.max(map_start) - map_start;
        let hi = range.end.saturating_sub(map_start);
        if hi > lo {
            let (first, last) = (lo.div_ceil(pagemap::COPIES), hi.div_ceil(pagemap::COPIES));
            for index in first..last.min(extent.map_blocks()) {
                self.scrub_index_block(id, &extent, index, &mut out).await?;
            }
            out.blocks += hi - lo;
        }
        Ok(out)
    }

    /// Pages `local .. local + n` of segment `id`: one read of each half
    /// (their slots 0, their slots 1), then a closer look at any that does not verify.
    async fn scrub_pages(
        &self,
        id: SegmentId,
        extent: &Extent,
        local: u64,
        n: u64,
        out: &mut Checked,
        bufs: &BufPool,
    ) -> Result<(), NodeError> {
        let slot_blocks = extent.slot_blocks() as usize;
        let halves = [0, 1].map(|_| bufs.take(n as usize * slot_blocks));
        let halves = self.read_slot_halves(extent, local, halves, false).await?;
        // The index as it stands once the pages are read.
        let known: Vec<(pagemap::Entry, Option<u64>)> = {
            let st = self.state();
            let Some(s) = st.segments.get(&id) else {
                drop(st);
                halves.into_iter().for_each(|h| bufs.give(h));
                return Ok(());
            };
            (local..local + n)
                .map(|l| (s.index_entry(l), s.torn_after(l)))
                .collect()
        };
        let written: Vec<bool> = known.iter().map(|(entry, _)| entry.lsn > 0).collect();
        let (device_id, extent_of) = (self.device_id, *extent);
        let (halves, fine) = off_runtime(move || {
            let slot_bytes = slot_blocks * BLOCK_SIZE;
            let mut fine = Vec::with_capacity(known.len());
            for (i, &(entry, torn_after)) in known.iter().enumerate() {
                let l = local + i as u64;
                let slots = [0, 1].map(|s| &halves[s][i * slot_bytes..(i + 1) * slot_bytes]);
                fine.push(page_verifies(&device_id, &extent_of, id, l, slots, entry, torn_after));
            }
            (halves, fine)
        })
        .await?;
        halves.into_iter().for_each(|h| bufs.give(h));
        for (i, fine) in fine.into_iter().enumerate() {
            let l = local + i as u64;
            let page = id.pg as u64 * extent.pg_pages + l;
            if written[i] || !fine {
                out.pages += 1;
            }
            if !fine {
                self.scrub_page_closely(id, extent, page, l, out).await?;
            }
        }
        Ok(())
    }

    /// A page that did not verify in a bulk read, read again under its lock.
    async fn scrub_page_closely(
        &self,
        id: SegmentId,
        extent: &Extent,
        page: u64,
        local: u64,
        out: &mut Checked,
    ) -> Result<(), NodeError> {
        let _stripe = self.stripe(id, page).write().await;
        let slots = self.read_page_slots(id, extent, page, local).await?;
        let damaged_slot = slots.iter().position(|s| matches!(s, pagestore::Slot::Damaged(_)));
        let (entry, torn_after) = {
            let st = self.state();
            let s = st.seg(id)?;
            (s.index_entry(local), s.torn_after(local))
        };
        let need_copy = |out: &mut Checked, slot: usize, error: String| {
            let offset = block_offset(extent.slot_block(local, slot));
            tracing::error!(volume = id.volume, pg = id.pg, page, offset, lsn = entry.lsn, %error, "scrub: page version damaged");
            out.found.push(Finding {
                offset,
                what: Damaged::PageVersion { page, lsn: entry.lsn },
                error,
                repaired: false,
            });
            if entry != pagemap::UNKNOWN && entry.lsn > 0 {
                out.need_copy.push(NeedCopy {
                    segment: id,
                    page,
                    lsn: entry.lsn,
                    crc: entry.crc,
                    offset,
                });
            }
        };
        let chosen = match pagestore::current(slots, torn_after) {
            Ok(chosen) => chosen,
            Err(e) => {
                self.mark_damaged(id, local);
                need_copy(out, damaged_slot.unwrap_or(0), e.to_string());
                return Ok(());
            }
        };
        let (found, holding) = match &chosen.current {
            Current::Never => (None, None),
            Current::Version { slot, version } => (Some((version.lsn, &version.bytes[..])), Some(*slot)),
        };
        match pagemap::verify(entry, found) {
            Verdict::Agrees => {}
            Verdict::Behind(newer) => {
                let offset = block_offset(pagemap::copy_block(
                    extent.map_start_block(),
                    pagemap::PageMap::block_of(local),
                    0,
                ));
                let in_round = torn_after.is_some_and(|c| newer.lsn > c);
                self.state().seg_mut(id)?.index_set(local, newer);
                let written = self.write_index(id, false).await;
                if !in_round && entry != pagemap::UNKNOWN {
                    out.found.push(Finding {
                        offset,
                        what: Damaged::PageMap {
                            first_page: page - page % pagemap::ENTRIES_PER_BLOCK as u64,
                        },
                        error: format!(
                            "the index named LSN {} for page {page}, its version is at LSN {}",
                            entry.lsn, newer.lsn
                        ),
                        repaired: written.is_ok(),
                    });
                }
                written?;
            }
            Verdict::Damaged(why) => {
                self.mark_damaged(id, local);
                need_copy(out, holding.map_or(pagestore::FIRST_SLOT, |s| 1 - s), why);
                return Ok(());
            }
        }
        if let (Some(other), Current::Version { slot, version }) = (chosen.other, chosen.current) {
            // An older slot that does not verify: the current version goes
            // there too (the next version would overwrite it anyway).
            let offset = block_offset(extent.slot_block(local, other.slot));
            let written = self
                .write_slot(id, extent, page, local, other.slot, &version, Durability::Durable)
                .await;
            if other.maybe_torn {
                // A crash's torn write, not damage.
                return written;
            }
            tracing::warn!(volume = id.volume, pg = id.pg, page, offset, error = %other.error, "scrub: older page version slot damaged; rewritten");
            out.found.push(Finding {
                offset,
                what: Damaged::OlderSlot { page },
                error: other.error.to_string(),
                repaired: written.is_ok(),
            });
            written?;
            self.state()
                .seg_mut(id)?
                .set_slot_state(local, SlotState::holding(slot));
        }
        Ok(())
    }

    fn mark_damaged(&self, id: SegmentId, local: u64) {
        if let Ok(s) = self.state().seg_mut(id) {
            s.set_slot_state(local, SlotState::Damaged);
        }
    }

    async fn scrub_index_block(
        &self,
        id: SegmentId,
        extent: &Extent,
        index: u64,
        out: &mut Checked,
    ) -> Result<(), NodeError> {
        let start = extent.map_start_block();
        let at = pagemap::copy_block(start, index, 0);
        // No index write between the read and the comparison with what the
        // node holds: one under way would show as a copy that disagrees.
        let writes = self.index_writes.lock().await;
        let buf = AlignedBuf::zeroed_blocks(pagemap::COPIES as usize);
        let (buf, result) = self.io.read(block_offset(at), buf).await;
        result?;
        let (held, entries, count, dirty) = {
            let st = self.state();
            let Some(s) = st.segments.get(&id) else { return Ok(()) };
            let pages = s.index.pages_of(index);
            (
                s.index.blocks[index as usize],
                s.index.entries[pages.clone()].to_vec(),
                pages.len(),
                s.index_dirty.contains(&index),
            )
        };
        if dirty {
            // Being changed: the next write replaces it anyway.
            return Ok(());
        }
        let copies = [0, 1].map(|c| {
            pagemap::decode_block(
                &buf[c * BLOCK_SIZE..(c + 1) * BLOCK_SIZE],
                &self.device_id,
                id,
                index,
                pagemap::copy_block(start, index, c),
                count,
            )
        });
        let damaged = copies.iter().position(|c| matches!(c, pagemap::Copy::Damaged(_)));
        let error = match (pagemap::choose(copies.clone()), held) {
            ((Chosen::Never, _), None) => None,
            ((Chosen::Copy { copy, seq, entries: e }, other), Some((hc, hs)))
                if copy == hc && seq == hs && e == entries =>
            {
                other.map(|o| (1 - copy, o))
            }
            ((Chosen::Lost(e), _), _) => Some((damaged.unwrap_or(0), e)),
            (_, held) => Some((
                held.map_or(0, |(c, _)| c),
                "the copy the node wrote last is not the current one (a lost write)".to_string(),
            )),
        };
        drop(writes);
        let Some((copy, error)) = error else { return Ok(()) };
        // The block is written again from memory, into the copy that is
        // not current (a lost or damaged one); once more if it was the
        // current one that did not hold, so both copies are whole.
        self.state().seg_mut(id)?.index_dirty.insert(index);
        let mut written = self.write_index(id, false).await;
        if written.is_ok() && copies.iter().any(|c| matches!(c, pagemap::Copy::Damaged(_))) {
            self.state().seg_mut(id)?.index_dirty.insert(index);
            written = self.write_index(id, false).await;
        }
        let offset = block_offset(pagemap::copy_block(start, index, copy));
        tracing::warn!(volume = id.volume, pg = id.pg, offset, %error, "scrub: page-version index copy damaged; rewritten");
        out.found.push(Finding {
            offset,
            what: Damaged::PageMap {
                first_page: id.pg as u64 * extent.pg_pages + index * pagemap::ENTRIES_PER_BLOCK as u64,
            },
            error,
            repaired: written.is_ok(),
        });
        written
    }

    /// A peer's copy of a damaged page version (see [`NeedCopy`]): used only
    /// if it is the page the index names (CRC32C), written into a slot that
    /// does not hold a valid version, read back, and judged again.
    pub async fn install_copy(&self, need: NeedCopy, bytes: Vec<u8>) -> Result<(), NodeError> {
        let id = need.segment;
        let refuse = |why: String| Err(NodeError::BadPageVersion(why));
        let (extent, local) = {
            let st = self.state();
            let s = st.seg(id)?;
            let Some(extent) = s.extent else {
                return refuse("the segment has no page store extent".into());
            };
            let Some(local) = extent.local(id.pg, need.page) else {
                return refuse(format!("page {} is not in the segment", need.page));
            };
            let entry = s.index_entry(local);
            if (entry.lsn, entry.crc) != (need.lsn, need.crc) {
                return refuse(format!(
                    "the index now names LSN {} for page {}, not {}",
                    entry.lsn, need.page, need.lsn
                ));
            }
            (extent, local)
        };
        if bytes.len() != extent.page_bytes as usize || crc32c::crc32c(&bytes) != need.crc {
            return refuse(format!(
                "the copy of page {} at LSN {} does not verify ({} bytes, CRC {:#010x}; the index says {:#010x})",
                need.page,
                need.lsn,
                bytes.len(),
                crc32c::crc32c(&bytes),
                need.crc
            ));
        }
        let version = PageVersion { lsn: need.lsn, bytes };
        {
            let _stripe = self.stripe(id, need.page).write().await;
            // Out of place: into a slot that holds no valid version, else
            // into the one with the older version.
            let held = self
                .read_page_slots(id, &extent, need.page, local)
                .await?
                .map(|slot| match slot {
                    pagestore::Slot::Version(v) => Some(v.lsn),
                    _ => None,
                });
            let slot = match held {
                // Neither slot holds a version: the copy goes to the page's
                // first slot and the other is written back to never
                // written with it, so no damage is left beside the copy
                // (a damaged slot may name the copy's own LSN).
                [None, None] => None,
                [None, _] => Some(0),
                [_, None] => Some(1),
                [Some(a), Some(b)] => Some(usize::from(b < a)),
            };
            match slot {
                Some(slot) => {
                    self.write_slot(id, &extent, need.page, local, slot, &version, Durability::Durable)
                        .await?
                }
                None => {
                    self.write_first_slots(id, &extent, need.page, local, &version, Durability::Durable)
                        .await?
                }
            }
            self.state().seg_mut(id)?.set_slot_state(local, SlotState::Unknown);
            let torn_after = self.state().seg(id)?.torn_after(local);
            // Read back and judged as any read: only a whole, indexed version passes.
            let current = self
                .read_current(id, &extent, need.page, local, SlotState::Unknown, torn_after)
                .await?;
            self.state().seg_mut(id)?.set_slot_state(local, SlotState::of(&current));
        }
        // Coalescing stopped below the damaged page's records: it may go on
        // once no page of the segment is damaged.
        {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            if s.damaged_pages == 0 {
                s.damaged_from = None;
            }
        }
        self.coalesce_wake.notify_one();
        tracing::warn!(
            volume = id.volume,
            pg = id.pg,
            page = need.page,
            lsn = need.lsn,
            "scrub: page version repaired from a peer's copy"
        );
        Ok(())
    }

    /// The segment's peers and the epochs a request to them carries.
    pub fn scrub_peers(&self, id: SegmentId) -> Option<(Vec<Peer>, u64, u64)> {
        let st = self.state();
        let s = st.segments.get(&id)?;
        let m = s.membership.as_ref()?;
        let peers = m
            .members
            .iter()
            .filter(|p| p.id != self.node_id)
            .map(|p| (p.id, p.addr))
            .collect();
        Some((peers, s.seg.installed_epoch(), m.epoch))
    }

    /// Page `page` of segment `id` as of exactly `lsn` (every change at or
    /// below it), for a peer's repair (the server checked the peer): from the version at or below
    /// `lsn` plus the records above it, or the older slot's version if it is
    /// at `lsn`. `NotHeld` when this segment can build neither.
    pub(super) async fn page_exactly_at(&self, id: SegmentId, page: u64, lsn: u64) -> Result<Vec<u8>, NodeError> {
        let _stripe = self.stripe(id, page).read().await;
        let (extent, local, known, torn_after, page_bytes, scl) = {
            let st = self.state();
            let s = st.seg(id)?;
            if s.hydration.is_some() || s.rebuilding() {
                return Err(NodeError::Rebuilding);
            }
            let local = s.geometry.local(id.pg, page)?;
            (
                s.extent,
                local,
                s.slot_state(local),
                s.torn_after(local),
                s.geometry.page_bytes as usize,
                s.seg.scl(),
            )
        };
        let not_held = |why: String| {
            NodeError::from(super::ScrubError::NotHeld {
                volume: id.volume,
                pg: id.pg,
                page,
                lsn,
                why,
            })
        };
        if lsn > scl {
            return Err(not_held(format!("LSN {lsn} is above this segment's SCL {scl}")));
        }
        let Some(extent) = extent else {
            return Err(not_held("the segment has no page store extent".into()));
        };
        let current = self.read_current(id, &extent, page, local, known, torn_after).await?;
        let base = match current {
            Current::Never => None,
            Current::Version { version, .. } if version.lsn <= lsn => Some((version.lsn, version.bytes)),
            Current::Version { slot, .. } => {
                // Coalesced past it: the older slot may hold exactly it.
                let at = extent.slot_block(local, 1 - slot);
                let buf = AlignedBuf::zeroed_blocks(extent.slot_blocks() as usize);
                let (buf, result) = self.io.read(block_offset(at), buf).await;
                result?;
                return match pagestore::decode_slot(&buf, &self.device_id, &extent, id, page, at) {
                    pagestore::Slot::Version(v) if v.lsn == lsn => Ok(v.bytes),
                    _ => Err(not_held(format!("page {page} is coalesced past LSN {lsn} here"))),
                };
            }
        };
        let st = self.state();
        let s = st.seg(id)?;
        s.hot
            .page_at(page, lsn, base, page_bytes)
            .map(|(bytes, _)| bytes)
            .map_err(|source| NodeError::BadRecord { lsn, source })
    }

    /// The foreground's appends since start-up: count and summed latency (µs).
    pub fn foreground_totals(&self) -> (u64, u64) {
        (
            self.fg_total_appends.load(Ordering::Relaxed),
            self.fg_total_us.load(Ordering::Relaxed),
        )
    }

    pub async fn read_meta_block(&self, block: u64) -> Result<Vec<u8>, NodeError> {
        let (buf, result) = self.io.read(block_offset(block), AlignedBuf::zeroed_blocks(1)).await;
        result?;
        Ok(buf.to_vec())
    }

    pub async fn write_meta_block(&self, block: u64, bytes: Vec<u8>) -> Result<(), NodeError> {
        if bytes.len() != BLOCK_SIZE || block >= crate::log::layout::METADATA_BLOCKS {
            return Err(NodeError::BadPageVersion(format!(
                "a metadata block write of {} bytes at block {block}",
                bytes.len()
            )));
        }
        let mut buf = AlignedBuf::zeroed_blocks(1);
        buf.copy_from_slice(&bytes);
        let (_, result) = self.io.write(block_offset(block), buf).await;
        result?;
        Ok(())
    }
}

/// Whether page `local`'s two slots (`bytes`, as read) hold a current
/// version the index agrees with, and no damaged older one: what a bulk
/// read lets pass without a closer look.
fn page_verifies(
    device_id: &DeviceId,
    extent: &Extent,
    id: SegmentId,
    local: u64,
    slots: [&[u8]; 2],
    entry: pagemap::Entry,
    torn_after: Option<u64>,
) -> bool {
    let page = id.pg as u64 * extent.pg_pages + local;
    let slots =
        [0, 1].map(|s| pagestore::decode_slot(slots[s], device_id, extent, id, page, extent.slot_block(local, s)));
    match pagestore::current(slots, torn_after) {
        Ok(chosen) if chosen.other.is_none() => {
            let found = match &chosen.current {
                Current::Never => None,
                Current::Version { version, .. } => Some((version.lsn, &version.bytes[..])),
            };
            pagemap::verify(entry, found) == Verdict::Agrees
        }
        _ => false,
    }
}

/// Checksums of a megabyte are computed off the node's one runtime thread,
/// which goes on serving the foreground meanwhile.
async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, NodeError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => Ok(done),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(NodeError::Io(crate::io::IoError::Closed)),
    }
}

impl crate::scrub::Store for Node {
    fn layout(&self) -> Layout {
        self.scrub_layout()
    }

    async fn scrub_range(&self, area: Area, range: Range<u64>, bufs: &BufPool) -> Result<Checked, String> {
        let checked = Node::scrub_range_in(self, area, range, bufs)
            .await
            .map_err(|e| e.to_string())?;
        self.counters.scrubbed(checked.blocks, checked.pages);
        Ok(checked)
    }

    async fn install_copy(&self, need: NeedCopy, bytes: Vec<u8>) -> Result<(), String> {
        Node::install_copy(self, need, bytes).await.map_err(|e| e.to_string())
    }

    fn peers(&self, id: SegmentId) -> Option<(Vec<Peer>, u64, u64)> {
        self.scrub_peers(id)
    }

    async fn read_meta_block(&self, block: u64) -> Result<Vec<u8>, String> {
        Node::read_meta_block(self, block).await.map_err(|e| e.to_string())
    }

    async fn write_meta_block(&self, block: u64, bytes: Vec<u8>) -> Result<(), String> {
        Node::write_meta_block(self, block, bytes)
            .await
            .map_err(|e| e.to_string())
    }

    fn foreground_totals(&self) -> (u64, u64) {
        Node::foreground_totals(self)
    }
}

#[cfg(test)]
impl Node {
    /// Page `page` of the test segment's current version, as a read finds it.
    pub(super) async fn read_current_for_test(&self, page: u64) -> Current {
        let id = super::tests::SEG;
        let extent = self.state().seg(id).unwrap().extent.unwrap();
        let local = extent.local(id.pg, page).unwrap();
        self.read_current(id, &extent, page, local, SlotState::Unknown, None)
            .await
            .unwrap()
    }
}
