//! Hydration: a segment that lacks records its peers have already coalesced
//! into page versions and released (its device was reformatted, it is a
//! new replacement, or it was down for long) takes a peer's current page
//! versions as its base, then pulls the chain above them.
//!
//! The donor serves its versions in batches ([`Node::page_versions`]). Each
//! batch carries its `floor`, the donor's coalesced LSN read before any of
//! its versions: every version served holds every change to its page at or
//! below the floor (it may be at a higher LSN: coalescing went on between).
//! The segment being rebuilt:
//! 1. [`Node::hydrate_begin`]: stops serving pages (`Rebuilding`) and
//!    coalescing, and marks the rebuild in the segment table;
//! 2. [`Node::hydrate_pages`]: writes each version durably into the slot
//!    that does not hold the page's current version, unless the segment
//!    already holds a version at that LSN or above (a version never goes back);
//! 3. [`Node::hydrate_end`] with the lowest floor of the batches: the
//!    segment now holds every change at or below it in page versions, so
//!    its coalesced LSN and SCL rise to it, the records it held at or below
//!    it are dropped, and those it holds above that link to it join the
//!    chain. The chain above the floor is then pulled like any other gap.
//!
//! What it guarantees: the SCL never covers a change the segment does not
//! hold (in a version, or as a record above the coalesced LSN), and a page
//! is never served wrong, before, during, after or across a crash in any of
//! these steps. A version is the page with every change at or below its
//! LSN; a record at or below the LSN of the version it would apply to is
//! never applied again (`HotRecords::page_at` starts above the version).
//! While a rebuild is marked, the coalesced LSN does not move, so every
//! record above it up to the SCL is held: any version a read finds (the
//! new one, or the older one when a crash tore the new one's write) is a
//! complete base for the records above it, and one above the read point is
//! refused. Once the rebuild ends, a version taken at an LSN above the new
//! coalesced LSN has no older version left beside it (it is copied into
//! both slots first): an older one would lack changes the segment no
//! longer holds, and start-up's torn-write rule must never pick it.
//!
//! The rebuild mark is `round_lsn = u64::MAX` in the segment table (no
//! format change: "a round may be under way above `coalesced_lsn`", which
//! makes start-up treat a slot torn by a crash for what it is). It stays
//! after an abort or a crash until a hydration ends, and keeps coalescing
//! off the segment meanwhile (the point above).
//!
//! Known limit: if the donor coalesces and releases records past the floor
//! before the chain above it is pulled, the pull is refused
//! (`ReadPointBelowPgmrpl`) and hydration starts again; under a heavy load
//! it may repeat.

use std::collections::BTreeMap;

use futures_util::future::join_all;

use super::{Node, NodeError, SegState, SlotState};
use crate::io::AlignedBuf;
use crate::log::layout::block_offset;
use crate::pagestore::{self, Current, Extent, PageVersion};
use crate::proto::WirePageVersion;
use crate::record::SegmentId;
use crate::segtable::SegmentEntry;

/// `round_lsn` while a rebuild of the segment is under way.
pub(super) const REBUILD_UNDER_WAY: u64 = u64::MAX;
/// Pages one `page_versions` call looks at, at most: a batch of a sparse
/// segment ends there (fewer versions, `next_page` says where to go on).
const PAGES_LOOKED_AT_MAX: u64 = 4096;
/// Page reads (serving) or read-and-writes (hydrating) in flight at once.
const IO_PARALLEL: usize = 32;

/// A hydration in progress on one segment.
#[derive(Debug, Default)]
pub(super) struct Hydration {
    /// Pages a peer sent a version of, and the LSN of the version the
    /// segment holds for each since (the peer's, or its own if not older).
    pages: BTreeMap<u64, u64>,
}

impl SegState {
    /// Coalescing keeps off: a hydration is under way, or one was begun and
    /// has not ended (see the module comment).
    pub(super) fn rebuilding(&self) -> bool {
        self.hydration.is_some() || self.round_lsn == REBUILD_UNDER_WAY
    }
}

impl Node {
    /// Serve a peer the current page versions of segment `id` from
    /// `first_page` on: `(floor, next_page, versions)`. `floor` is the
    /// coalesced LSN, read before any version, so each version holds every
    /// change to its page at or below it. Pages never written are skipped;
    /// at most `max_bytes` of page bytes (at least one version), and at
    /// most [`PAGES_LOOKED_AT_MAX`] pages looked at; `next_page` is where to
    /// go on, the segment's end when done.
    pub async fn page_versions(
        &self,
        id: SegmentId,
        from: u64,
        installed_epoch: u64,
        membership_epoch: u64,
        first_page: u64,
        max_bytes: usize,
    ) -> Result<(u64, u64, Vec<WirePageVersion>), NodeError> {
        self.page_versions_changed_after(id, from, installed_epoch, membership_epoch, first_page, max_bytes, 0)
            .await
    }

    /// [`Node::page_versions`], leaving out versions at or below
    /// `changed_after`: the asker holds every change up to it, so a segment
    /// that was only briefly behind (or hydrates again) fetches only the
    /// pages that changed since.
    #[allow(clippy::too_many_arguments)]
    pub async fn page_versions_changed_after(
        &self,
        id: SegmentId,
        from: u64,
        installed_epoch: u64,
        membership_epoch: u64,
        first_page: u64,
        max_bytes: usize,
        changed_after: u64,
    ) -> Result<(u64, u64, Vec<WirePageVersion>), NodeError> {
        self.check_gossip_peer(id, from, installed_epoch, membership_epoch, true)?;
        let (floor, extent, geometry) = {
            let st = self.state();
            let s = st.seg(id)?;
            if s.hydration.is_some() {
                return Err(NodeError::Rebuilding);
            }
            (s.coalesced_lsn, s.extent, s.geometry)
        };
        let first = u64::from(id.pg) * geometry.pg_pages;
        let end = first + geometry.pg_pages;
        if first_page != end {
            geometry.local(id.pg, first_page)?;
        }
        let Some(extent) = extent else {
            // Not in the table yet: no version was ever written.
            return Ok((floor, end, Vec::new()));
        };
        let page_bytes = geometry.page_bytes as usize;
        let stop = end.min(first_page.saturating_add(PAGES_LOOKED_AT_MAX));
        let mut versions = Vec::new();
        let mut bytes = 0;
        let mut page = first_page;
        // Pages are read IO_PARALLEL at a time (one read each would leave
        // the device idle between them); a chunk's versions are taken in
        // page order until the byte bound.
        'chunks: while page < stop {
            let chunk: Vec<u64> = (page..stop.min(page + IO_PARALLEL as u64)).collect();
            let reads = join_all(chunk.iter().map(|&p| self.current_version(id, &extent, p - first, p))).await;
            for (p, current) in chunk.into_iter().zip(reads) {
                if let Current::Version { version, .. } = current?
                    && version.lsn > changed_after
                {
                    if !versions.is_empty() && bytes + page_bytes > max_bytes {
                        break 'chunks;
                    }
                    bytes += page_bytes;
                    versions.push(WirePageVersion {
                        page: p,
                        lsn: version.lsn,
                        bytes: version.bytes,
                    });
                }
                page = p + 1;
            }
        }
        Ok((floor, page, versions))
    }

    /// The current version of `page` (local index `local`), read as GetPage
    /// reads it: the version stays current while it is read.
    async fn current_version(
        &self,
        id: SegmentId,
        extent: &Extent,
        local: u64,
        page: u64,
    ) -> Result<Current, NodeError> {
        let _stripe = self.stripe(id, page).read().await;
        let (known, torn_after) = {
            let st = self.state();
            let s = st.seg(id)?;
            (s.slot_state(local), s.torn_after(local))
        };
        let current = self.read_current(id, extent, page, local, known, torn_after).await?;
        self.state().seg_mut(id)?.set_slot_state(local, SlotState::of(&current));
        Ok(current)
    }

    /// Begin rebuilding segment `id` from a peer's page versions: its pages
    /// are refused (`Rebuilding`) and it is not coalesced until
    /// [`Node::hydrate_end`] or [`Node::hydrate_abort`]; the rebuild is
    /// marked in the segment table (durable when this returns). A second
    /// begin while one is under way is refused (`Rebuilding`).
    pub async fn hydrate_begin(&self, id: SegmentId) -> Result<(), NodeError> {
        let (marked, epoch) = {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            if s.hydration.is_some() {
                return Err(NodeError::Rebuilding);
            }
            s.hydration = Some(Hydration::default());
            (s.round_lsn == REBUILD_UNDER_WAY, s.seg.epoch())
        };
        let result = async {
            // Versions an earlier, abandoned hydration wrote without a flush
            // become durable first: this one may write over the other slot
            // of those pages, which must not be the only durable version.
            self.io.flush().await?;
            // A segment known only in memory gets its table entry and extent.
            self.ensure_durable(id, epoch).await?;
            if !marked {
                // Under the table's lock, so a coalescing round ending now
                // either moved the coalesced LSN before the mark or sees it.
                self.update_entry(id, |e, _| {
                    let e = e.ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
                    Ok(SegmentEntry {
                        round_lsn: REBUILD_UNDER_WAY,
                        ..e.clone()
                    })
                })
                .await?;
                self.state().seg_mut(id)?.round_lsn = REBUILD_UNDER_WAY;
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            self.hydrate_abort(id);
        }
        result
    }

    /// Take a batch of a peer's page versions as the segment's (after
    /// [`Node::hydrate_begin`]). Each is checked first (its page in the
    /// segment, its bytes a page); a bad one refuses the batch whole and
    /// writes nothing. Each is written durably into the slot that does not
    /// hold the page's current version, unless that version is at the same
    /// LSN or above.
    pub async fn hydrate_pages(&self, id: SegmentId, versions: Vec<WirePageVersion>) -> Result<(), NodeError> {
        let (extent, geometry, coalesced) = {
            let st = self.state();
            let s = st.seg(id)?;
            if s.hydration.is_none() {
                return Err(not_hydrating(id));
            }
            let extent = s.extent.ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
            (extent, s.geometry, s.coalesced_lsn)
        };
        for v in &versions {
            geometry.local(id.pg, v.page)?;
            if v.bytes.len() != geometry.page_bytes as usize {
                return Err(NodeError::BadPageVersion(format!(
                    "page {}: a version of {} bytes; the segment's pages are {} bytes",
                    v.page,
                    v.bytes.len(),
                    geometry.page_bytes
                )));
            }
            if v.lsn == 0 {
                return Err(NodeError::BadPageVersion(format!(
                    "page {}: a version at LSN 0 (a page never written has none)",
                    v.page
                )));
            }
        }
        // IO_PARALLEL pages at a time: each is a read and a durable write.
        let mut versions = versions.into_iter().peekable();
        while versions.peek().is_some() {
            let chunk: Vec<WirePageVersion> = versions.by_ref().take(IO_PARALLEL).collect();
            let pages: Vec<u64> = chunk.iter().map(|v| v.page).collect();
            let held = join_all(chunk.into_iter().map(|v| self.hydrate_page(id, &extent, coalesced, v))).await;
            let mut st = self.state();
            for (page, held) in pages.into_iter().zip(held) {
                if let (Some(lsn), Some(h)) = (held?, st.seg_mut(id)?.hydration.as_mut()) {
                    h.pages.insert(page, lsn);
                }
            }
        }
        Ok(())
    }

    /// One version of [`Node::hydrate_pages`]; returns the LSN of the
    /// version the page holds now (None: left damaged).
    async fn hydrate_page(
        &self,
        id: SegmentId,
        extent: &Extent,
        coalesced: u64,
        v: WirePageVersion,
    ) -> Result<Option<u64>, NodeError> {
        let (page, local) = (v.page, extent.local(id.pg, v.page).unwrap_or(0));
        let version = PageVersion {
            lsn: v.lsn,
            bytes: v.bytes,
        };
        // As coalescing: no reader or round sees the slots change under it.
        let _stripe = self.stripe(id, page).write().await;
        let (known, torn_after) = {
            let st = self.state();
            let s = st.seg(id)?;
            (s.slot_state(local), s.torn_after(local))
        };
        let slot = match self.read_current(id, extent, page, local, known, torn_after).await {
            Ok(Current::Never) => 0,
            Ok(Current::Version { slot, version: held }) => {
                self.state()
                    .seg_mut(id)?
                    .set_slot_state(local, SlotState::holding(slot));
                if held.lsn >= version.lsn {
                    // Never back: the held version has every change the
                    // peer's has, and the records above it are applied on it.
                    return Ok(Some(held.lsn));
                }
                1 - slot
            }
            // The page's version here is damaged: the peer's replaces it
            // if it holds every change this segment has coalesced (a
            // version above the coalesced LSN does); else the page stays
            // damaged (refused to readers, reported) and the rest goes on.
            Err(NodeError::PageDamaged { offset, .. }) if version.lsn > coalesced => {
                let damaged = usize::from(offset == block_offset(extent.slot_block(local, 1)));
                self.write_version(id, extent, page, local, damaged, &version).await?;
                self.state().seg_mut(id)?.set_slot_state(local, SlotState::Unknown);
                match self
                    .read_current(id, extent, page, local, SlotState::Unknown, None)
                    .await
                {
                    Ok(current) => {
                        self.state().seg_mut(id)?.set_slot_state(local, SlotState::of(&current));
                        return Ok(match current {
                            Current::Never => None,
                            Current::Version { version, .. } => Some(version.lsn),
                        });
                    }
                    // The other slot is damaged too, and may name a newer
                    // LSN: neither is a version, both take the peer's.
                    Err(NodeError::PageDamaged { .. }) => 1 - damaged,
                    Err(e) => return Err(e),
                }
            }
            Err(NodeError::PageDamaged { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        self.write_version(id, extent, page, local, slot, &version).await?;
        self.state()
            .seg_mut(id)?
            .set_slot_state(local, SlotState::holding(slot));
        Ok(Some(version.lsn))
    }

    /// Write `version` of `page` durably into slot `slot`.
    async fn write_version(
        &self,
        id: SegmentId,
        extent: &Extent,
        page: u64,
        local: u64,
        slot: usize,
        version: &PageVersion,
    ) -> Result<(), NodeError> {
        let at = extent.slot_block(local, slot);
        let mut buf = AlignedBuf::zeroed_blocks(extent.slot_blocks() as usize);
        pagestore::encode_version(&mut buf, self.device_id, extent, id, page, at, version);
        // Durable at `hydrate_end`'s flush, before the table says the
        // rebuild is over; until then a crash leaves the rebuild marked,
        // where a torn or lost slot is a torn write.
        let (_, result) = self.io.write_volatile(block_offset(at), buf).await;
        result?;
        // In memory only until `hydrate_end` writes the index, after its
        // flush (the index is never ahead of a durable version).
        let entry = crate::pagemap::Entry::of(version.lsn, &version.bytes);
        self.state().seg_mut(id)?.index_set(local, entry);
        Ok(())
    }

    /// Every page version of the peer is taken; `floor` is the lowest floor
    /// of the batches. The segment holds every change at or below it in
    /// page versions: its coalesced LSN and SCL rise to it (one table
    /// write), the records it held at or below it are forgotten and their
    /// log released, and the records above that link to it join the chain.
    /// Returns the SCL.
    pub async fn hydrate_end(&self, id: SegmentId, floor: u64) -> Result<u64, NodeError> {
        let (extent, above) = {
            let st = self.state();
            let s = st.seg(id)?;
            let Some(h) = &s.hydration else {
                return Err(not_hydrating(id));
            };
            let coalesced = s.coalesced_lsn.max(floor);
            let above: Vec<u64> = (h.pages.iter())
                .filter(|&(_, &lsn)| lsn > coalesced)
                .map(|(&page, _)| page)
                .collect();
            (s.extent, above)
        };
        // The versions written are made durable before their pages' other
        // slots are written: until then the other slot holds the only
        // durable version of each.
        self.io.flush().await?;
        // A version above the new coalesced LSN must not rest on an older
        // one beside it: that one lacks changes the segment will no longer
        // hold, and a torn write of a later round would make start-up pick
        // it. Both slots get the version (a crash before the table write
        // below leaves the rebuild marked, where either slot is safe).
        if let Some(extent) = extent {
            for chunk in above.chunks(IO_PARALLEL) {
                for copied in join_all(chunk.iter().map(|&page| self.copy_to_both_slots(id, &extent, page))).await {
                    copied?;
                }
            }
        }
        // Every version written since `hydrate_begin` is durable before the
        // table ends the rebuild, and the index names them before that too.
        self.io.flush().await?;
        self.write_index(id, true).await?;
        let entry = self
            .update_entry(id, |e, _| {
                let e = e.ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
                let coalesced = e.coalesced_lsn.max(floor);
                Ok(SegmentEntry {
                    coalesced_lsn: coalesced,
                    // The rebuild is over, and no round is under way.
                    round_lsn: coalesced,
                    ..e.clone()
                })
            })
            .await?;
        let scl = {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            s.coalesced_lsn = s.coalesced_lsn.max(entry.coalesced_lsn);
            s.round_lsn = s.coalesced_lsn;
            s.seg.hydrated(s.coalesced_lsn);
            let before = s.hot.bytes();
            s.hot.remove_through(s.coalesced_lsn);
            let freed = before - s.hot.bytes();
            s.hydration = None;
            let scl = s.seg.scl();
            st.hot_bytes -= freed;
            scl
        };
        self.log.release(self.release_point());
        self.coalesce_wake.notify_one();
        Ok(scl)
    }

    /// Write the current version of `page` into its other slot too.
    async fn copy_to_both_slots(&self, id: SegmentId, extent: &Extent, page: u64) -> Result<(), NodeError> {
        let Some(local) = extent.local(id.pg, page) else {
            return Ok(());
        };
        let _stripe = self.stripe(id, page).write().await;
        let (known, torn_after) = {
            let st = self.state();
            let s = st.seg(id)?;
            (s.slot_state(local), s.torn_after(local))
        };
        if let Current::Version { slot, version } =
            self.read_current(id, extent, page, local, known, torn_after).await?
        {
            self.write_version(id, extent, page, local, 1 - slot, &version).await?;
            self.state()
                .seg_mut(id)?
                .set_slot_state(local, SlotState::holding(slot));
        }
        Ok(())
    }

    /// Give up a hydration: pages are served again. The versions written
    /// stay: each is a valid version of its page (every change at or below
    /// its LSN), and the rebuild stays marked, so the coalesced LSN does not
    /// move and every record above it is still held; a read combines any
    /// version with them correctly, or is refused when the version is
    /// above its read point. The next hydration goes on from them.
    pub fn hydrate_abort(&self, id: SegmentId) {
        if let Some(s) = self.state().segments.get_mut(&id) {
            s.hydration = None;
        }
    }
}

fn not_hydrating(id: SegmentId) -> NodeError {
    NodeError::BadPageVersion(format!(
        "segment (volume {}, pg {}) is not being hydrated: begin first",
        id.volume, id.pg
    ))
}
