//! Coalescing: turning each page's redo into a new page version in the page
//! store, so the log behind it can be freed.
//!
//! Work goes in rounds, one segment at a time. A round takes the segment's
//! chain from its `coalesced_lsn` up to at most `min(PGMRPL, SCL)` (and at
//! most `coalesce_round_pages_max` pages), and:
//! 1. records its intent (`round_lsn`) in the segment table, so that a slot
//!    torn by a crash in this round is known for what it is at start-up;
//! 2. for each page: builds the page at the round's LSN from its current
//!    version and its hot records, and writes it durably into the slot that
//!    does not hold the current version;
//! 3. records `coalesced_lsn` in the segment table: start-up now replays the
//!    log only after it;
//! 4. forgets the records it covered and frees the log up to the oldest
//!    record still needed by any segment.
//!
//! A page whose current version is damaged is never built on: the round
//! ends below that page's first record, and coalescing of the segment stops
//! there, keeping the page's records in memory and in the log (the page is
//! refused to readers with `PageDamaged` until it is repaired).
//!
//! Only records at or below PGMRPL are coalesced. Every reader's read point
//! is at or above it, so a version never hides a state a reader needs, the
//! one older version a page keeps is never needed again once the new one is
//! durable (that is the garbage collection of page versions), and nothing
//! coalesced can later be annulled by a writer's recovery (it truncates only
//! above VDL, and PGMRPL is at most VDL).
//!
//! Background work yields to the foreground: without pressure (the log or
//! the hot-record memory over half full) coalescing waits until the log or
//! the memory is a quarter full (a backlog), or the node has taken no
//! append for a tick; a round then waits for a quiet moment (bounded) and
//! the rate of page writes is capped. A page version costs a page read and
//! a durable page write however many records it folds in: coalescing as
//! soon as PGMRPL allowed, under a steady load spread over many pages,
//! wrote a version for every few records and took more of a node's CPU and
//! device than the appends did. Letting a quarter of the log accumulate
//! first folds more records into each version.

use std::collections::BTreeSet;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;
use tracing::Instrument;

use super::hydrate::REBUILD_UNDER_WAY;
use super::{Node, NodeError, SlotState};
use crate::pagestore::{self, Current, Extent, PageVersion};
use crate::record::SegmentId;
use crate::segtable::SegmentEntry;

/// How often the coalescer looks for work without being woken.
const TICK: Duration = Duration::from_millis(100);
/// Without pressure, a round waits while appends keep arriving: checks this
/// often, at most `QUIET_CHECKS_MAX` times.
const QUIET_CHECK: Duration = Duration::from_millis(1);
const QUIET_CHECKS_MAX: u32 = 20;
/// Page versions written at once in a round.
const WRITES_INFLIGHT_MAX: usize = 8;

pub(super) async fn run(node: Weak<Node>) {
    let mut appends_seen = None;
    loop {
        let Some(n) = node.upgrade() else { return };
        if n.stopping.load(Ordering::Relaxed) {
            return;
        }
        // Idle: no append since the last look.
        let appends = n.appends.load(Ordering::Relaxed);
        let idle = appends_seen == Some(appends);
        appends_seen = Some(appends);
        let pages = match n.coalesce_some(idle).await {
            Ok(pages) => pages,
            Err(e) => {
                tracing::warn!(error = %e, "coalescing round failed; will retry");
                0
            }
        };
        if pages == 0 {
            let _ = tokio::time::timeout(TICK, n.coalesce_wake.notified()).await;
            continue;
        }
        let rate = n.config.coalesce_pages_per_sec_max;
        if rate > 0 && !n.pressure() {
            let pause = Duration::from_secs_f64(pages as f64 / rate as f64);
            drop(n);
            tokio::time::sleep(pause).await;
        }
    }
}

impl Node {
    /// The log or the hot-record memory is over half full: coalesce now.
    fn pressure(&self) -> bool {
        let log = self.log.stats();
        log.free_blocks < log.log_blocks / 2 || self.state().hot_bytes > self.config.hot_bytes_max / 2
    }

    /// The log or the hot-record memory is over a quarter full: worth a
    /// round even while appends arrive.
    fn backlog(&self) -> bool {
        let log = self.log.stats();
        log.free_blocks < log.log_blocks - log.log_blocks / 4 || self.state().hot_bytes > self.config.hot_bytes_max / 4
    }

    /// One round for the segment with the most hot bytes that has work
    /// worth a round now. Returns the pages written (0: nothing to do).
    async fn coalesce_some(&self, idle: bool) -> Result<usize, NodeError> {
        if !idle && !self.backlog() {
            return Ok(0);
        }
        let pick = {
            let st = self.state();
            st.segments
                .iter()
                .filter(|(_, s)| {
                    // (Not while a rejoining node drops what it held.)
                    s.extent.is_some() && !s.rebuilding() && !s.forgetting && s.coalesce_target() > s.coalesced_lsn
                })
                .max_by_key(|(_, s)| s.hot.bytes())
                .map(|(&id, _)| id)
        };
        let Some(id) = pick else { return Ok(0) };
        if !self.pressure() {
            let mut seen = self.appends.load(Ordering::Relaxed);
            for _ in 0..QUIET_CHECKS_MAX {
                tokio::time::sleep(QUIET_CHECK).await;
                let now = self.appends.load(Ordering::Relaxed);
                if now == seen || self.stopping.load(Ordering::Relaxed) {
                    break;
                }
                seen = now;
            }
        }
        let span = tracing::debug_span!("coalesce", node = self.node_id, volume = id.volume, pg = id.pg);
        self.round(id).instrument(span).await
    }

    async fn round(&self, id: SegmentId) -> Result<usize, NodeError> {
        let (extent, pages, upto, intent_known) = {
            let st = self.state();
            let s = st.seg(id)?;
            let Some(extent) = s.extent else { return Ok(0) };
            let target = s.coalesce_target();
            let mut pages = BTreeSet::new();
            let mut upto = s.coalesced_lsn;
            for (lsn, page) in s.seg.chain_between(s.coalesced_lsn, target) {
                if !pages.contains(&page) && pages.len() >= self.config.coalesce_round_pages_max {
                    break;
                }
                pages.insert(page);
                upto = lsn;
            }
            if upto == s.coalesced_lsn {
                return Ok(0);
            }
            (extent, pages, upto, s.round_lsn >= upto)
        };
        if !intent_known {
            self.update_entry(id, |e, _| {
                let e = e.ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
                Ok(SegmentEntry {
                    round_lsn: e.round_lsn.max(upto),
                    ..e.clone()
                })
            })
            .await?;
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            s.round_lsn = s.round_lsn.max(upto);
        }
        let pages: Vec<u64> = pages.into_iter().collect();
        let mut damaged = BTreeSet::new();
        for chunk in pages.chunks(WRITES_INFLIGHT_MAX) {
            for result in join_all(chunk.iter().map(|&page| self.coalesce_page(id, &extent, page, upto))).await {
                match result {
                    Ok(()) => {}
                    // Logged where found; the round goes on below it.
                    Err(NodeError::PageDamaged { page, .. }) => {
                        damaged.insert(page);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let upto = if damaged.is_empty() {
            upto
        } else {
            self.stop_below_damage(id, &damaged, upto)?
        };
        // The index names the versions written, now durable, before the
        // table says they are coalesced (see `index`).
        self.write_index(id, false).await?;
        let coalesced = self.state().seg(id)?.coalesced_lsn;
        if upto <= coalesced {
            return Ok(pages.len() - damaged.len());
        }
        let ended = self
            .update_entry(id, |e, _| {
                let e = e.ok_or(NodeError::UnknownSegment(id.volume, id.pg))?;
                if e.round_lsn == REBUILD_UNDER_WAY {
                    // A rebuild began during the round: the coalesced LSN stays
                    // (see `hydrate`); the versions written are valid ones.
                    return Err(NodeError::Rebuilding);
                }
                Ok(SegmentEntry {
                    coalesced_lsn: e.coalesced_lsn.max(upto),
                    // An older, larger intent (a round cut short by a crash) stays
                    // open until coalescing passes it.
                    round_lsn: e.round_lsn.max(upto),
                    ..e.clone()
                })
            })
            .await;
        match ended {
            Ok(_) => {}
            Err(NodeError::Rebuilding) => return Ok(pages.len() - damaged.len()),
            Err(e) => return Err(e),
        }
        {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            s.coalesced_lsn = s.coalesced_lsn.max(upto);
            s.seg.forget_through(upto);
            let before = s.hot.bytes();
            s.hot.remove_through(upto);
            let freed = before - s.hot.bytes();
            st.hot_bytes -= freed;
        }
        self.log.release(self.release_point());
        tracing::debug!(pages = pages.len(), upto, "coalesced");
        Ok(pages.len())
    }

    /// Pages in `damaged` cannot be built on: coalescing of segment `id`
    /// stops below the first of their records (from now on, until they are
    /// repaired). Returns how far this round may still go.
    fn stop_below_damage(&self, id: SegmentId, damaged: &BTreeSet<u64>, upto: u64) -> Result<u64, NodeError> {
        let mut st = self.state();
        let s = st.seg_mut(id)?;
        let first = s
            .seg
            .chain_between(s.coalesced_lsn, upto)
            .find(|(_, page)| damaged.contains(page))
            .map(|(lsn, _)| lsn);
        if let Some(lsn) = first {
            s.damaged_from = Some(s.damaged_from.map_or(lsn, |d| d.min(lsn)));
        }
        tracing::error!(
            pages = ?damaged,
            from_lsn = ?s.damaged_from,
            "page versions damaged: coalescing of the segment stops below their records, which stay in the log"
        );
        // The round ends at its last record below the damage: the chain
        // continues after `coalesced_lsn` at start-up, so it must be a
        // record's LSN (after a truncation, the LSN below may be none).
        let stop = s.damaged_from.unwrap_or(u64::MAX);
        let end = s
            .seg
            .chain_between(s.coalesced_lsn, upto)
            .take_while(|&(lsn, _)| lsn < stop)
            .last()
            .map_or(s.coalesced_lsn, |(lsn, _)| lsn);
        Ok(end)
    }

    /// Write `page` as of `upto` into the slot that does not hold its
    /// current version.
    async fn coalesce_page(&self, id: SegmentId, extent: &Extent, page: u64, upto: u64) -> Result<(), NodeError> {
        let Some(local) = extent.local(id.pg, page) else {
            // Appends check the range; a record outside it never got in.
            debug_assert!(false, "page {page} outside segment {id:?}");
            return Ok(());
        };
        let _stripe = self.stripe(id, page).write().await;
        let (known, torn_after) = {
            let st = self.state();
            let s = st.seg(id)?;
            (s.slot_state(local), s.torn_after(local))
        };
        // A damaged current version is an error here: nothing is built on it.
        let current = self.read_current(id, extent, page, local, known, torn_after).await?;
        let first = matches!(current, Current::Never);
        let (slot, base) = match current {
            Current::Never => (pagestore::FIRST_SLOT, None),
            Current::Version { slot, version } => (1 - slot, Some((version.lsn, version.bytes))),
        };
        let base_lsn = base.as_ref().map_or(0, |b| b.0);
        let (bytes, lsn) = {
            let st = self.state();
            st.seg(id)?
                .hot
                .page_at(page, upto, base, extent.page_bytes as usize)
                .map_err(|source| NodeError::BadRecord { lsn: upto, source })?
        };
        if lsn == base_lsn {
            // Already in the current version (a round redone after a crash).
            return Ok(());
        }
        let entry = crate::pagemap::Entry::of(lsn, &bytes);
        let version = PageVersion { lsn, bytes };
        if first && torn_after.is_some() {
            // A round open at the last crash may have left a write of this
            // page torn in the other slot: both slots are written, so
            // nothing torn stays beside the version.
            self.write_first_slots(id, extent, page, local, &version, crate::io::Durability::Durable)
                .await?;
        } else {
            self.write_slot(id, extent, page, local, slot, &version, crate::io::Durability::Durable)
                .await?;
        }
        let mut st = self.state();
        let s = st.seg_mut(id)?;
        s.set_slot_state(local, SlotState::holding(slot));
        s.index_set(local, entry);
        Ok(())
    }
}
