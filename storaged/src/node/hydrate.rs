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
//! Runs of slots. The extent holds slot 0 of every page, then slot 1 of
//! every page (`pagestore`), so each slot of a run of consecutive pages is
//! one stretch of blocks. A donor reads the slots its pages are current in
//! with one I/O a stretch (a PG written once is one stretch), or both
//! halves of the run when the pages switch slots often. The segment being
//! rebuilt reads both halves of a run, encodes each version into its
//! page's slot that does not hold the current version, and writes each
//! half back with one I/O. The slots it does not change are written back
//! with the bytes just read, so a crash that tears or loses that write
//! changes nothing in them (a sector lands whole or not at all): the only
//! slots a crash can touch are those a version goes to, as with one write
//! a page. A run whose pages are all known never written (a new segment,
//! a replaced disk) is not read: each version goes to its page's first
//! slot (`pagestore::FIRST_SLOT`), and a run of them is one write of only
//! their bytes, every other slot left never written. What bounds a
//! hydration on a disk is the I/Os it does a second as much as its bytes.
//! A page whose slots are not both whole or empty in the run's read
//! (damaged, torn by a crash) is taken page by page; one that holds no
//! version gets its first with the other slot written back to never
//! written, so nothing a crash tore is left beside it. Decoding and
//! sealing run off the node's runtime thread.
//!
//! The donor's floor. While a peer asks a segment for versions, and then
//! pulls the chain above its floor, the segment does not coalesce past the
//! floor it served the peer first (a hold). It is let go once the peer has
//! not asked for [`HOLD_IDLE`], after [`HOLD_MAX`], or at the peer's next
//! ask when the node's log is three quarters full or its hot records over
//! three quarters of their bound (the foreground comes first); a pull
//! moves the hold up to what it asks above. So the chain above the floor
//! is still there to pull when the versions are taken. Known limit: when
//! the donor is under that pressure it coalesces on, the pull is refused
//! (`ReadPointBelowPgmrpl`) and hydration starts again, fetching only the
//! pages that changed since.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use tokio::time::{Duration, Instant};

use super::{Node, NodeError, SegState, SlotState};
use crate::io::{AlignedBuf, BLOCK_SIZE};
use crate::log::format::DeviceId;
use crate::log::layout::block_offset;
use crate::pagestore::{self, Current, Extent, PageVersion, Slot};
use crate::proto::WirePageVersion;
use crate::record::SegmentId;
use crate::segtable::SegmentEntry;

/// `round_lsn` while a rebuild of the segment is under way.
pub(super) const REBUILD_UNDER_WAY: u64 = u64::MAX;
/// Pages one `page_versions` call looks at, at most: a batch of a sparse
/// segment ends there (fewer versions, `next_page` says where to go on).
const PAGES_LOOKED_AT_MAX: u64 = 4096;
/// Page reads or read-and-writes in flight at once, where pages are taken
/// one by one (a page whose slots are not both whole, or a version copied
/// into its other slot at the end).
const IO_PARALLEL: usize = 32;
/// Bytes of both slots of a run's pages, at most: a read or write of one
/// half of the run (its pages' slots 0 or slots 1) is then at most half
/// of it, which is as much as repair keeps in flight on a node by default
/// (16 × 32 KiB: see `io::uring`); a larger one would go alone and put
/// more before the foreground's writes.
const RUN_BYTES_MAX: usize = 1 << 20;
/// Runs read (or copied) at once, at most: a segment's changed pages are
/// scattered, and one page's run at a time left the device waiting on
/// round trips (a hydration that fetches only what changed ran at a tenth
/// of a full one's rate).
const RUNS_PARALLEL: usize = 32;
/// Bytes of slots those runs cover at once, at most (the buffers they
/// take while a peer is served).
const RUNS_PARALLEL_BYTES: usize = 8 << 20;
/// Pages a hydrating run may rewrite as they are, between two pages it
/// takes versions of, rather than start another run.
const RUN_GAP_PAGES_MAX: u64 = 16;
/// Pages one write of a new segment's hydration covers, at most
/// ([`Node::hydrate_new_run`]): 252 KiB of 8 KiB pages' slots, so two
/// are in flight within repair's default bound and the device never
/// waits for the next one to be submitted.
const NEW_WRITE_PAGES_MAX: usize = 21;

/// `runs` cut into groups taken at once: consecutive, at most
/// [`RUNS_PARALLEL`] runs and [`RUNS_PARALLEL_BYTES`] (by `bytes`) a group,
/// and at least one run.
fn parallel_groups<T>(runs: &[T], bytes: impl Fn(&T) -> usize) -> impl Iterator<Item = &[T]> {
    let mut rest = runs;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut total = 0;
        let mut n = 0;
        while n < rest.len() && n < RUNS_PARALLEL && (n == 0 || total + bytes(&rest[n]) <= RUNS_PARALLEL_BYTES) {
            total += bytes(&rest[n]);
            n += 1;
        }
        let (group, after) = rest.split_at(n);
        rest = after;
        Some(group)
    })
}

/// The next group of `rest` to read at once: as [`parallel_groups`], and
/// at most `pages_max` pages (at least one), the run that would pass it
/// cut there and its remainder left first in `rest`.
fn take_group(rest: &mut std::collections::VecDeque<Run>, pages_max: u64, bytes: impl Fn(&Run) -> usize) -> Vec<Run> {
    let pages_max = pages_max.max(1);
    let mut group = Vec::new();
    let (mut total, mut pages) = (0, 0);
    while let Some(&run) = rest.front() {
        if group.len() == RUNS_PARALLEL
            || pages >= pages_max
            || (!group.is_empty() && total + bytes(&run) > RUNS_PARALLEL_BYTES)
        {
            break;
        }
        let take = run.pages.min(pages_max - pages);
        let taken = Run {
            first_local: run.first_local,
            pages: take,
        };
        if take == run.pages {
            rest.pop_front();
        } else if let Some(front) = rest.front_mut() {
            front.first_local += take;
            front.pages -= take;
        }
        total += bytes(&taken);
        pages += take;
        group.push(taken);
    }
    group
}

/// Consecutive pages of a segment: slot 0 of each is one stretch of the
/// extent, and slot 1 of each another ([`Halves`]).
#[derive(Debug, Clone, Copy)]
struct Run {
    first_local: u64,
    pages: u64,
}

impl Run {
    /// Pages in a run of at most [`RUN_BYTES_MAX`] (at least one).
    fn pages_max(extent: &Extent) -> u64 {
        let page = (pagestore::SLOTS_PER_PAGE * extent.slot_blocks()) as usize * BLOCK_SIZE;
        (RUN_BYTES_MAX / page).max(1) as u64
    }

    /// Blocks of both slots of its pages.
    fn blocks(&self, extent: &Extent) -> u64 {
        self.pages * pagestore::SLOTS_PER_PAGE * extent.slot_blocks()
    }

    /// Where a slot of the page with local index `local` is in the run's
    /// half of that slot.
    fn slot_bytes(&self, extent: &Extent, local: u64) -> std::ops::Range<usize> {
        let len = extent.slot_blocks() as usize * BLOCK_SIZE;
        let start = (local - self.first_local) as usize * len;
        start..start + len
    }
}

/// Both slots of a run's pages as read: slot 0 of each page, in page
/// order, then slot 1 of each.
type Halves = [AlignedBuf; 2];

/// What [`Node::read_current_slots`] read: both halves of the run, or each
/// stretch of pages current in the same slot, in page order.
enum Read {
    Halves(Halves),
    Stretches(Vec<AlignedBuf>),
}

/// A hydration in progress on one segment.
#[derive(Debug, Default)]
pub(super) struct Hydration {
    /// Pages a peer sent a version of, and the LSN of the version the
    /// segment holds for each since (the peer's, or its own if not older).
    pages: BTreeMap<u64, u64>,
}

/// How long a segment keeps its floor for a peer hydrating from it after
/// that peer last asked it for versions or records.
const HOLD_IDLE: Duration = Duration::from_secs(3);
/// How long it keeps it for one hydration at most, however often asked:
/// a bound on a peer that keeps asking for ever. Long enough for a
/// segment of gigabytes at tens of MB/s: a hydration that outlives its
/// hold finds the chain above its floor freed and starts again. The
/// foreground does not wait on it: pressure ends a hold at once.
const HOLD_MAX: Duration = Duration::from_secs(300);

/// A peer hydrating from this segment, and the LSN coalescing here keeps at
/// or below for it (see the module comment).
#[derive(Debug, Clone, Copy)]
struct Hold {
    peer: u64,
    lsn: u64,
    since: Instant,
    last: Instant,
}

impl Hold {
    fn live(&self, now: Instant) -> bool {
        now.duration_since(self.last) < HOLD_IDLE && now.duration_since(self.since) < HOLD_MAX
    }
}

/// The peers hydrating from a segment (at most one hold a member).
#[derive(Debug, Default)]
pub(super) struct Holds {
    holds: Vec<Hold>,
}

impl SegState {
    /// The node's log or memory is under pressure: every hold ends, and
    /// the peers' pulls above their floors may be refused after (they
    /// hydrate again, only the pages changed since).
    fn let_go_of_holds(&mut self) {
        if !self.holds.holds.is_empty() {
            let peers: Vec<u64> = self.holds.holds.iter().map(|h| h.peer).collect();
            tracing::info!(
                ?peers,
                floor = self.coalesced_lsn,
                "log or memory under pressure: coalescing goes on past the floor served to hydrating peers"
            );
            self.holds.holds.clear();
        }
    }

    /// Coalescing goes no higher while a peer hydrates from the segment.
    pub(super) fn hold_target(&self) -> u64 {
        let now = Instant::now();
        (self.holds.holds.iter())
            .filter(|h| h.live(now))
            .map(|h| h.lsn)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Peer `peer` is served versions at `floor`: the floor is kept for it
    /// (the one of its first batch, while it keeps asking), unless the
    /// node needs coalescing to free log or memory (`pressure`): every
    /// hold is let go then, and the foreground goes first.
    fn hold_for(&mut self, peer: u64, floor: u64, pressure: bool) {
        let now = Instant::now();
        self.holds.holds.retain(|h| h.live(now));
        if pressure {
            self.let_go_of_holds();
            return;
        }
        match self.holds.holds.iter_mut().find(|h| h.peer == peer) {
            Some(h) => h.last = now,
            None => self.holds.holds.push(Hold {
                peer,
                lsn: floor,
                since: now,
                last: now,
            }),
        }
    }

    /// Peer `peer` pulls the chain above `after`: a hold for it moves up
    /// to there (it holds everything at or below).
    pub(super) fn hold_moves_to(&mut self, peer: u64, after: u64, pressure: bool) {
        let now = Instant::now();
        if pressure {
            self.let_go_of_holds();
        }
        if let Some(h) = self.holds.holds.iter_mut().find(|h| h.peer == peer && h.live(now)) {
            h.lsn = h.lsn.max(after);
            h.last = now;
        }
    }

    /// Whether page `local` may hold a version above `changed_after` (so a
    /// peer asking for changes after it must be sent the page): false for
    /// a page known never written, and for one whose version is at or
    /// below it by the page-version index, where the node has read the
    /// page's slots (judged by the index) or written them since start-up.
    /// Those pages' entries in memory are what their slots hold: a judged
    /// read takes a newer version into the index, and every writer sets
    /// the entry. A page not read since start-up is read: its entry comes
    /// from the device, where a lost write of the index block would leave
    /// it behind the slots (a read finds that; skipping would not).
    ///
    /// The look is made after the floor was read: a version written since
    /// then is above the floor (a round writes above the coalesced LSN it
    /// started from), and what it holds above the peer's floor comes with
    /// the chain above this segment's floor.
    fn may_have_changed_after(&self, local: u64, changed_after: u64) -> bool {
        match self.slot_state(local) {
            SlotState::Never => false,
            SlotState::Slot0 | SlotState::Slot1 => {
                let entry = self.index_entry(local);
                entry == crate::pagemap::UNKNOWN || entry.lsn > changed_after
            }
            SlotState::Unknown | SlotState::Damaged => true,
        }
    }

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
        let pressure = self.hold_pressure();
        let (floor, extent, geometry) = {
            let mut st = self.state();
            let pressure = pressure || self.hold_hot_pressure(st.hot_bytes);
            let s = st.seg_mut(id)?;
            if s.hydration.is_some() {
                return Err(NodeError::Rebuilding);
            }
            // While the peer asks, coalescing here stays at this floor, so
            // the chain above it is still here to pull when its versions
            // are taken (bounded by time and by the foreground's needs).
            s.hold_for(from, s.coalesced_lsn, pressure);
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
        let run_pages = Run::pages_max(&extent);
        // Pages known never written are not read: runs of the others.
        let runs: Vec<Run> = {
            let st = self.state();
            let s = st.seg(id)?;
            let mut runs: Vec<Run> = Vec::new();
            for local in first_page - first..stop - first {
                if !s.may_have_changed_after(local, changed_after) {
                    continue;
                }
                match runs.last_mut() {
                    Some(run) if run.first_local + run.pages == local && run.pages < run_pages => run.pages += 1,
                    _ => runs.push(Run {
                        first_local: local,
                        pages: 1,
                    }),
                }
            }
            runs
        };
        let mut versions = Vec::new();
        let mut bytes = 0;
        // Runs are read RUNS_PARALLEL at once (one read a page would leave
        // the device idle between them), without the pages' stripes. A run
        // whose pages' current slots are all known is read slot by slot,
        // only those (half the bytes of both); any other run is read whole,
        // both slots with one I/O, and a page whose slots are both whole
        // (or empty) is served from that read. A page whose read does not
        // give what the page-version index names is read again as GetPage
        // reads it (see `whole_current`). Versions are taken in page order
        // until the byte bound. A group reads no more pages than the bound
        // has room for: pages read past it would be read again by the
        // asker's next batch (a full group past a batch's end read a third
        // more than it served).
        let mut rest: std::collections::VecDeque<Run> = runs.into();
        while !rest.is_empty() {
            let room = (max_bytes.saturating_sub(bytes) / page_bytes).max(1) as u64;
            let group = take_group(&mut rest, room, |run| run.blocks(&extent) as usize * BLOCK_SIZE);
            let (device_id, extent) = (self.device_id, extent);
            let reads = join_all(group.iter().map(|&run| async move {
                if let Some(slots) = self.current_slots(id, &run) {
                    return self.read_current_slots(id, &extent, &run, slots).await;
                }
                let halves = self.read_run(&extent, &run).await?;
                off_runtime(move || decode_run(&device_id, &extent, id, &run, &halves)).await
            }))
            .await;
            for (run, decoded) in group.iter().zip(reads) {
                let mut never = Vec::new();
                for (local, current) in (run.first_local..).zip(decoded?) {
                    let p = first + local;
                    // Read without the stripe and not judged by the index:
                    // a version the index does not name (a lost or junk
                    // write) goes the locked way, which reports it.
                    let current = current.filter(|c| self.index_agrees(id, local, c));
                    let current = match current {
                        Some(Current::Never) => {
                            never.push(local);
                            continue;
                        }
                        Some(current) => current,
                        None => self.current_version(id, &extent, local, p).await?,
                    };
                    if let Current::Version { version, .. } = current
                        && version.lsn > changed_after
                    {
                        if !versions.is_empty() && bytes + page_bytes > max_bytes {
                            self.known_never(id, first, &never).await;
                            return Ok((floor, p, versions));
                        }
                        bytes += page_bytes;
                        versions.push(WirePageVersion {
                            page: p,
                            lsn: version.lsn,
                            bytes: version.bytes,
                        });
                    }
                }
                self.known_never(id, first, &never).await;
            }
            // Full: the batch ends where the next group would have begun.
            if !versions.is_empty()
                && bytes + page_bytes > max_bytes
                && let Some(next) = rest.front()
            {
                return Ok((floor, first + next.first_local, versions));
            }
        }
        Ok((floor, stop, versions))
    }

    /// The page-version index names what `current` holds for page `local`.
    fn index_agrees(&self, id: SegmentId, local: u64, current: &Current) -> bool {
        let found = match current {
            Current::Never => None,
            Current::Version { version, .. } => Some((version.lsn, &version.bytes[..])),
        };
        let st = self.state();
        st.seg(id)
            .is_ok_and(|s| crate::pagemap::verify(s.index_entry(local), found) == crate::pagemap::Verdict::Agrees)
    }

    /// Pages (local indices) a read without their stripes found never
    /// written are known as such, so the next look skips them, unless
    /// their slot state is known already. Under each page's stripe: every
    /// writer of a slot holds it for writing and sets the page's slot state
    /// before it lets go, so a page still `Unknown` under it was not
    /// written since that read (a write under way then has ended, and set
    /// its state, before the stripe is had), and one written after sees
    /// `Never` and writes its first version to its first slot, as it
    /// would have.
    async fn known_never(&self, id: SegmentId, first: u64, locals: &[u64]) {
        if locals.is_empty() {
            return;
        }
        let stripes = self.stripes_of(id, locals.iter().map(|l| first + l));
        let mut held = Vec::with_capacity(stripes.len());
        for s in &stripes {
            held.push(s.read().await);
        }
        if let Ok(s) = self.state().seg_mut(id) {
            for &l in locals {
                if s.slot_state(l) == SlotState::Unknown {
                    s.set_slot_state(l, SlotState::Never);
                }
            }
        }
    }

    /// The log is three quarters full: a hold gives way, and coalescing
    /// frees it, whoever hydrates (as it does for memory, which the caller
    /// checks under its lock: [`Node::hold_hot_pressure`]). Not at half
    /// full, where coalescing itself stops waiting for a backlog: a log
    /// left over half full by a long outage's load held nothing back from
    /// the foreground, yet letting go there made the peer hydrate a second
    /// time (the chain above the floor it was served was freed); from
    /// three quarters on, appends are a quarter of a log from waiting.
    pub(super) fn hold_pressure(&self) -> bool {
        let log = self.log.stats();
        log.free_blocks < log.log_blocks / 4
    }

    /// Records above the coalesced LSN take over three quarters of their
    /// bound in memory (`hot_bytes`, read under the state's lock): a hold
    /// gives way, as for the log ([`Node::hold_pressure`]).
    pub(super) fn hold_hot_pressure(&self, hot_bytes: usize) -> bool {
        hot_bytes > self.config.hot_bytes_max / 4 * 3
    }

    /// The slot holding each page's current version, for a run whose pages
    /// all have one known (read or written since start-up, not damaged).
    fn current_slots(&self, id: SegmentId, run: &Run) -> Option<Vec<usize>> {
        let st = self.state();
        let s = st.seg(id).ok()?;
        (run.first_local..run.first_local + run.pages)
            .map(|l| match s.slot_state(l) {
                SlotState::Slot0 => Some(0),
                SlotState::Slot1 => Some(1),
                _ => None,
            })
            .collect()
    }

    /// The current version of each page of `run`, read from `slots` and
    /// decoded off the runtime thread; None for a page whose slot does not
    /// hold a whole version there. Consecutive pages current in the same
    /// slot are one stretch, read with one I/O (a PG written once is one
    /// stretch); past two stretches, both halves of the run are read, two
    /// I/Os of twice the bytes rather than many.
    async fn read_current_slots(
        &self,
        id: SegmentId,
        extent: &Extent,
        run: &Run,
        slots: Vec<usize>,
    ) -> Result<Vec<Option<Current>>, NodeError> {
        let slot_blocks = extent.slot_blocks();
        let stretches = adjacent_slots(extent, run.first_local, &slots);
        let read = if stretches.len() > 2 {
            Read::Halves(self.read_run(extent, run).await?)
        } else {
            let reads = stretches.iter().map(|&(at, count)| async move {
                let buf = AlignedBuf::zeroed_blocks(count * slot_blocks as usize);
                let (buf, result) = self.io.read_background(block_offset(at), buf).await;
                result.map(|_| buf)
            });
            let mut bufs = Vec::with_capacity(stretches.len());
            for read in join_all(reads).await {
                bufs.push(read?);
            }
            Read::Stretches(bufs)
        };
        let (device_id, extent, run) = (self.device_id, *extent, *run);
        off_runtime(move || {
            let first_page = u64::from(id.pg) * extent.pg_pages;
            let slot_bytes = slot_blocks as usize * BLOCK_SIZE;
            // Each page's current slot, in page order.
            let each_slot: Box<dyn Iterator<Item = &[u8]>> = match &read {
                Read::Halves(halves) => Box::new(
                    (run.first_local..)
                        .zip(&slots)
                        .map(|(local, &slot)| &halves[slot][run.slot_bytes(&extent, local)]),
                ),
                Read::Stretches(bufs) => Box::new(bufs.iter().flat_map(|buf| buf.chunks_exact(slot_bytes))),
            };
            (run.first_local..)
                .zip(slots.iter().zip(each_slot))
                .map(|(local, (&slot, bytes))| {
                    let at = extent.slot_block(local, slot);
                    match pagestore::decode_slot(bytes, &device_id, &extent, id, first_page + local, at) {
                        Slot::Version(version) => Some(Current::Version { slot, version }),
                        _ => None,
                    }
                })
                .collect()
        })
        .await
    }

    /// Both slots of every page of `run`: a read of each half, at once.
    async fn read_run(&self, extent: &Extent, run: &Run) -> Result<Halves, NodeError> {
        let blocks = (run.pages * extent.slot_blocks()) as usize;
        let halves = [AlignedBuf::zeroed_blocks(blocks), AlignedBuf::zeroed_blocks(blocks)];
        self.read_slot_halves(extent, run.first_local, halves, true).await
    }

    /// Write back the stretch of each half of `run` (as read, with the
    /// versions encoded into it) from the first page to the last whose
    /// slot in that half `written` names, each stretch with one I/O, both
    /// at once. The slots between that did not change are written back
    /// with the bytes read: a crash that tears the write leaves them as
    /// they were (a sector lands whole or not at all).
    async fn write_run_back(
        &self,
        extent: &Extent,
        run: &Run,
        halves: Halves,
        written: &[(u64, usize)],
    ) -> Result<(), NodeError> {
        let writes = halves.into_iter().enumerate().filter_map(|(slot, half)| {
            let locals = written.iter().filter(|w| w.1 == slot).map(|w| w.0);
            let (lo, hi) = (locals.clone().min()?, locals.max()?);
            let bytes = run.slot_bytes(extent, lo).start..run.slot_bytes(extent, hi).end;
            let out = if bytes.len() == half.len() {
                half
            } else {
                let mut out = AlignedBuf::zeroed(bytes.len());
                out.copy_from_slice(&half[bytes]);
                out
            };
            Some(self.io.write_volatile(block_offset(extent.slot_block(lo, slot)), out))
        });
        for (_, result) in join_all(writes).await {
            result?;
        }
        Ok(())
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
            s.hydrated = Some(crate::proto::Hydration {
                under_way: true,
                ..Default::default()
            });
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
        // In page order, one version a page (the newest, should a page come
        // twice: a version never goes back), cut into runs.
        let mut versions = versions;
        versions.sort_by_key(|v| (v.page, v.lsn));
        versions.dedup_by(|next, kept| {
            let same = next.page == kept.page;
            if same {
                std::mem::swap(next, kept);
            }
            same
        });
        let run_pages = Run::pages_max(&extent);
        let mut runs: Vec<Vec<WirePageVersion>> = Vec::new();
        for v in versions {
            match runs.last_mut() {
                Some(run)
                    if v.page - run[0].page < run_pages
                        && v.page - run[run.len() - 1].page <= RUN_GAP_PAGES_MAX + 1 =>
                {
                    run.push(v)
                }
                _ => runs.push(vec![v]),
            }
        }
        // A batch's runs at once: their pages are apart.
        for done in join_all(
            runs.into_iter()
                .map(|run| self.hydrate_run(id, &extent, coalesced, run)),
        )
        .await
        {
            done?;
        }
        Ok(())
    }

    /// The versions of a run of pages (ascending, one a page): both slots
    /// of the run are read (an I/O of each half), each version is encoded
    /// into its page's slot that does not hold the current version (as
    /// [`Node::hydrate_page`] decides), and each half is written back with
    /// one I/O. The slots that do not change are written back with the
    /// bytes just read: a write torn or lost by a crash leaves every sector
    /// of them as it was (a sector lands whole or not at all), so the only
    /// slots a crash can touch are the ones a version goes to, exactly as
    /// with one write a page. Nothing else writes the segment's slots
    /// between the read and the write: coalescing is off while it is
    /// rebuilt, and calls of one hydration that overlap (its streams) take
    /// disjoint pages. A page whose slots are not both whole or empty goes
    /// the page-by-page way, after the run's write.
    async fn hydrate_run(
        &self,
        id: SegmentId,
        extent: &Extent,
        coalesced: u64,
        versions: Vec<WirePageVersion>,
    ) -> Result<(), NodeError> {
        let (Some(first), Some(last)) = (versions.first(), versions.last()) else {
            return Ok(());
        };
        let local = |page| extent.local(id.pg, page).unwrap_or(0);
        let run = Run {
            first_local: local(first.page),
            pages: local(last.page) - local(first.page) + 1,
        };
        let (index, all_never) = {
            let st = self.state();
            let s = st.seg(id)?;
            let locals = run.first_local..run.first_local + run.pages;
            let index: Vec<crate::pagemap::Entry> = locals.clone().map(|l| s.index_entry(l)).collect();
            (index, locals.into_iter().all(|l| s.slot_state(l) == SlotState::Never))
        };
        // A run of pages known never written (a new segment's, a
        // replaced disk's) is not read: its slots read as never written,
        // as zeros do, and only the slots versions go to are written.
        if all_never {
            let one_by_one = self.hydrate_new_run(id, extent, &run, index, versions).await?;
            return self.hydrate_one_by_one(id, extent, coalesced, one_by_one).await;
        }
        let halves = self.read_run(extent, &run).await?;
        let (device_id, extent_copy) = (self.device_id, *extent);
        let (halves, held, one_by_one) =
            off_runtime(move || plan_hydrate_run(&device_id, &extent_copy, id, &run, halves, &index, versions)).await?;
        let written = || held.iter().filter(|h| h.4.is_some()).map(|h| h.1);
        // Durable at `hydrate_end`'s flush, before the table says the
        // rebuild is over; until then a crash leaves the rebuild marked,
        // where a torn or lost slot is a torn write. As coalescing: no
        // reader sees the slots change under it (one that began before the
        // rebuild may still be reading), and the slot state and index
        // entry change with the slot, under its page's stripe.
        if let (Some(lo), Some(hi)) = (written().min(), written().max()) {
            // Only the stretch from the first page written to the last.
            let stripes = self.stripes_of(id, (lo..=hi).map(|l| l + u64::from(id.pg) * extent.pg_pages));
            let _held = join_stripes(&stripes).await;
            let slots: Vec<(u64, usize)> = held.iter().filter(|h| h.4.is_some()).map(|h| (h.1, h.2)).collect();
            self.write_run_back(extent, &run, halves, &slots).await?;
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            for &(_, l, slot, _, entry) in &held {
                if let Some(entry) = entry {
                    s.set_slot_state(l, SlotState::holding(slot));
                    // In memory only until `hydrate_end` writes the index,
                    // after its flush.
                    s.index_set(l, entry);
                }
            }
        }
        {
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            for &(page, _, _, lsn, _) in &held {
                if let Some(h) = s.hydration.as_mut() {
                    h.pages.insert(page, lsn);
                }
            }
        }
        self.hydrate_one_by_one(id, extent, coalesced, one_by_one).await
    }

    /// The versions of a run of pages every one of which is known never
    /// written: each is encoded straight into the buffer of a write (no
    /// read) of its page's first slot, slot 0. Consecutive pages' slots 0
    /// are one stretch, so up to [`NEW_WRITE_PAGES_MAX`] consecutive pages
    /// are one write, under their stripes. Every other slot stays never
    /// written as it is: a new segment is rebuilt with the bytes of its
    /// versions, in few writes. Returns the versions to take one by one:
    /// those whose page's index entry names a version (a lost write),
    /// judged as a read judges them.
    async fn hydrate_new_run(
        &self,
        id: SegmentId,
        extent: &Extent,
        run: &Run,
        index: Vec<crate::pagemap::Entry>,
        versions: Vec<WirePageVersion>,
    ) -> Result<Vec<WirePageVersion>, NodeError> {
        let (device_id, extent_copy, first_local) = (self.device_id, *extent, run.first_local);
        let (writes, one_by_one) =
            off_runtime(move || encode_new_slots(&device_id, &extent_copy, id, first_local, &index, versions)).await?;
        // Durable at `hydrate_end`'s flush, before the table says the
        // rebuild is over; until then a crash leaves the rebuild marked,
        // where a torn or lost slot is a torn write (`pagestore::current`).
        // The slot states and index entries change with the slots, under
        // their pages' stripes.
        let writes = writes.into_iter().map(|new| async move {
            let stripes = self.stripes_of(id, new.slots.iter().map(|n| n.page));
            let _held = join_stripes(&stripes).await;
            let (_, result) = self.io.write_volatile(block_offset(new.at), new.buf).await;
            result?;
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            for n in &new.slots {
                s.set_slot_state(n.local, SlotState::holding(n.slot));
                // In memory only until `hydrate_end` writes the index, after
                // its flush.
                s.index_set(n.local, n.entry);
                if let Some(h) = s.hydration.as_mut() {
                    h.pages.insert(n.page, n.entry.lsn);
                }
            }
            Ok::<(), NodeError>(())
        });
        for done in join_all(writes).await {
            done?;
        }
        Ok(one_by_one)
    }

    /// Versions a run could not take whole, IO_PARALLEL pages at a time:
    /// each is a read and a write.
    async fn hydrate_one_by_one(
        &self,
        id: SegmentId,
        extent: &Extent,
        coalesced: u64,
        one_by_one: Vec<WirePageVersion>,
    ) -> Result<(), NodeError> {
        let mut rest = one_by_one.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<WirePageVersion> = rest.by_ref().take(IO_PARALLEL).collect();
            let pages: Vec<u64> = chunk.iter().map(|v| v.page).collect();
            let done = join_all(chunk.into_iter().map(|v| self.hydrate_page(id, extent, coalesced, v))).await;
            let mut st = self.state();
            for (page, done) in pages.into_iter().zip(done) {
                if let (Some(lsn), Some(h)) = (done?, st.seg_mut(id)?.hydration.as_mut()) {
                    h.pages.insert(page, lsn);
                }
            }
        }
        Ok(())
    }

    /// The stripes of `pages`, each once, in one order every caller that
    /// takes more than one keeps (their addresses): two such callers never
    /// wait on each other, and every other holds one stripe at a time.
    fn stripes_of(&self, id: SegmentId, pages: impl Iterator<Item = u64>) -> Vec<&tokio::sync::RwLock<()>> {
        let mut stripes: Vec<&tokio::sync::RwLock<()>> = pages.map(|p| self.stripe(id, p)).collect();
        stripes.sort_by_key(|s| *s as *const _ as usize);
        stripes.dedup_by_key(|s| *s as *const _ as usize);
        stripes
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
            Ok(Current::Never) => {
                // The other slot may hold what a crash tore (a paired write
                // of a new segment, `hydrate_new_run`): it is cleared with
                // the version's write, one I/O, or the torn slot would stay
                // beside the version, as damage, once the rebuild is over.
                self.write_first_version(id, extent, page, local, &version).await?;
                self.state()
                    .seg_mut(id)?
                    .set_slot_state(local, SlotState::holding(pagestore::FIRST_SLOT));
                return Ok(Some(version.lsn));
            }
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
        // Durable at `hydrate_end`'s flush, before the table says the
        // rebuild is over; until then a crash leaves the rebuild marked,
        // where a torn or lost slot is a torn write.
        self.write_slot(id, extent, page, local, slot, version, crate::io::Durability::Volatile)
            .await?;
        // In memory only until `hydrate_end` writes the index, after its
        // flush (the index is never ahead of a durable version).
        let entry = crate::pagemap::Entry::of(version.lsn, &version.bytes);
        self.state().seg_mut(id)?.index_set(local, entry);
        Ok(())
    }

    /// Write `version` of a page that holds none into its first slot, and
    /// the other back to never written, with one I/O (see
    /// [`Node::hydrate_page`]).
    async fn write_first_version(
        &self,
        id: SegmentId,
        extent: &Extent,
        page: u64,
        local: u64,
        version: &PageVersion,
    ) -> Result<(), NodeError> {
        // Durable at `hydrate_end`'s flush, as `write_version`'s.
        self.write_first_slots(id, extent, page, local, version, crate::io::Durability::Volatile)
            .await?;
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
            let run_pages = Run::pages_max(&extent);
            let mut runs: Vec<Vec<u64>> = Vec::new();
            for page in above {
                match runs.last_mut() {
                    Some(run) if page - run[0] < run_pages && page - run[run.len() - 1] <= RUN_GAP_PAGES_MAX + 1 => {
                        run.push(page)
                    }
                    _ => runs.push(vec![page]),
                }
            }
            let slots_bytes = |run: &Vec<u64>| {
                let span = run[run.len() - 1] - run[0] + 1;
                (span * 2 * extent.slot_blocks()) as usize * BLOCK_SIZE
            };
            for group in parallel_groups(&runs, slots_bytes) {
                for done in join_all(
                    group
                        .iter()
                        .cloned()
                        .map(|run| self.copy_run_to_both_slots(id, &extent, run)),
                )
                .await
                {
                    done?;
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
            if let Some(h) = s.hydrated.as_mut() {
                h.under_way = false;
            }
            let scl = s.seg.scl();
            st.hot_bytes -= freed;
            scl
        };
        self.log.release(self.release_point());
        self.coalesce_wake.notify_one();
        Ok(scl)
    }

    /// [`Node::copy_to_both_slots`] for a run of pages (ascending), with
    /// a read and a write of each half, as [`Node::hydrate_run`] writes: the
    /// slots that hold the current versions are written back with the bytes
    /// just read, so a crash can touch only the slots the copies go to.
    async fn copy_run_to_both_slots(&self, id: SegmentId, extent: &Extent, pages: Vec<u64>) -> Result<(), NodeError> {
        let (Some(&first), Some(&last)) = (pages.first(), pages.last()) else {
            return Ok(());
        };
        let local = |page| extent.local(id.pg, page).unwrap_or(0);
        let run = Run {
            first_local: local(first),
            pages: local(last) - local(first) + 1,
        };
        let halves = self.read_run(extent, &run).await?;
        let (device_id, extent_copy) = (self.device_id, *extent);
        let (halves, copied, one_by_one) =
            off_runtime(move || plan_copy_run(&device_id, &extent_copy, id, &run, halves, pages)).await?;
        if !copied.is_empty() {
            let stripes = self.stripes_of(
                id,
                (run.first_local..run.first_local + run.pages).map(|l| l + u64::from(id.pg) * extent.pg_pages),
            );
            let _held = join_stripes(&stripes).await;
            let written: Vec<(u64, usize)> = copied.iter().map(|&(l, slot)| (l, 1 - slot)).collect();
            self.write_run_back(extent, &run, halves, &written).await?;
            let mut st = self.state();
            let s = st.seg_mut(id)?;
            for (l, slot) in copied {
                s.set_slot_state(l, SlotState::holding(slot));
            }
        }
        for chunk in one_by_one.chunks(IO_PARALLEL) {
            for done in join_all(chunk.iter().map(|&page| self.copy_to_both_slots(id, extent, page))).await {
                done?;
            }
        }
        Ok(())
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
            if let Some(h) = s.hydrated.as_mut() {
                h.under_way = false;
            }
        }
    }

    /// The hydration under way of segment `id` wrote `bytes` of page
    /// versions and went through `pages` more of its pages: what its status
    /// reports (the gossip shell counts them batch by batch).
    pub fn hydration_progress(&self, id: SegmentId, bytes: u64, pages: u64) {
        if let Some(h) = (self.state().segments.get_mut(&id))
            .filter(|s| s.hydration.is_some())
            .and_then(|s| s.hydrated.as_mut())
        {
            h.bytes += bytes;
            h.pages += pages;
        }
    }
}

/// Every stripe of `stripes` for writing, in their order.
async fn join_stripes<'a>(stripes: &[&'a tokio::sync::RwLock<()>]) -> Vec<tokio::sync::RwLockWriteGuard<'a, ()>> {
    let mut held = Vec::with_capacity(stripes.len());
    for s in stripes {
        held.push(s.write().await);
    }
    held
}

/// Decoding and sealing megabytes of slots is done off the node's one
/// runtime thread, which goes on serving the foreground meanwhile.
async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, NodeError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => Ok(done),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(NodeError::Io(crate::io::IoError::Closed)),
    }
}

/// Every page of `run` as [`whole_current`] reads it from `halves`, in order.
fn decode_run(
    device_id: &DeviceId,
    extent: &Extent,
    id: SegmentId,
    run: &Run,
    halves: &Halves,
) -> Vec<Option<Current>> {
    let first = u64::from(id.pg) * extent.pg_pages;
    (run.first_local..run.first_local + run.pages)
        .map(|local| whole_current(device_id, extent, id, run, halves, local, first + local))
        .collect()
}

/// A page [`Node::hydrate_run`] took a version of: (page, local index, the
/// slot holding its version, that version's LSN, and its index entry if it
/// is written).
type Taken = (u64, u64, usize, u64, Option<crate::pagemap::Entry>);

/// What [`Node::hydrate_run`] writes: each version encoded into `halves`
/// (the run's slots as read) where it goes; returns the run's slots, the
/// pages taken, and the versions to take one by one.
fn plan_hydrate_run(
    device_id: &DeviceId,
    extent: &Extent,
    id: SegmentId,
    run: &Run,
    mut halves: Halves,
    index: &[crate::pagemap::Entry],
    versions: Vec<WirePageVersion>,
) -> (Halves, Vec<Taken>, Vec<WirePageVersion>) {
    let mut held = Vec::with_capacity(versions.len());
    let mut one_by_one = Vec::new();
    for v in versions {
        let (page, l) = (v.page, extent.local(id.pg, v.page).unwrap_or(0));
        // A page whose slots are not whole, or not what the page-version
        // index names (a lost or junk write), goes the page-by-page way,
        // which judges it as a read does.
        let entry = index[(l - run.first_local) as usize];
        let Some(current) = whole_current(device_id, extent, id, run, &halves, l, page).filter(|c| {
            let found = match c {
                Current::Never => None,
                Current::Version { version, .. } => Some((version.lsn, &version.bytes[..])),
            };
            crate::pagemap::verify(entry, found) == crate::pagemap::Verdict::Agrees
        }) else {
            one_by_one.push(v);
            continue;
        };
        let slot = match current {
            Current::Never => pagestore::FIRST_SLOT,
            Current::Version { slot, version } if version.lsn >= v.lsn => {
                // Never back: see `hydrate_page`.
                held.push((page, l, slot, version.lsn, None));
                continue;
            }
            Current::Version { slot, .. } => 1 - slot,
        };
        let entry = crate::pagemap::Entry::of(v.lsn, &v.bytes);
        let version = PageVersion {
            lsn: v.lsn,
            bytes: v.bytes,
        };
        let at = extent.slot_block(l, slot);
        let bytes = run.slot_bytes(extent, l);
        pagestore::encode_version(&mut halves[slot][bytes], *device_id, extent, id, page, at, &version);
        held.push((page, l, slot, version.lsn, Some(entry)));
    }
    (halves, held, one_by_one)
}

/// A version of a page never written, and the slot it goes to.
struct NewSlot {
    page: u64,
    local: u64,
    slot: usize,
    entry: crate::pagemap::Entry,
}

/// The reads of the current `slots` of consecutive pages from
/// `first_local`, in page order: (first block, slots), one for each run
/// of consecutive pages current in the same slot (adjacent).
fn adjacent_slots(extent: &Extent, first_local: u64, slots: &[usize]) -> Vec<(u64, usize)> {
    let mut reads: Vec<(u64, usize)> = Vec::with_capacity(slots.len());
    for (local, &slot) in (first_local..).zip(slots) {
        let at = extent.slot_block(local, slot);
        match reads.last_mut() {
            Some((start, count)) if *start + *count as u64 * extent.slot_blocks() == at => *count += 1,
            _ => reads.push((at, 1)),
        }
    }
    reads
}

/// One write of [`Node::hydrate_new_run`]: consecutive pages' versions,
/// each into its first slot, from block `at`.
struct NewWrite {
    at: u64,
    slots: Vec<NewSlot>,
    buf: AlignedBuf,
}

/// What [`Node::hydrate_new_run`] writes: the versions (ascending, one a
/// page, every page of the run never written) encoded into the slots they
/// go to, neighbours paired; and the versions whose page's index entry
/// does not agree that the page was never written, to take one by one.
fn encode_new_slots(
    device_id: &DeviceId,
    extent: &Extent,
    id: SegmentId,
    first_local: u64,
    index: &[crate::pagemap::Entry],
    versions: Vec<WirePageVersion>,
) -> (Vec<NewWrite>, Vec<WirePageVersion>) {
    let mut new = Vec::with_capacity(versions.len());
    let mut one_by_one = Vec::new();
    for v in versions {
        let local = extent.local(id.pg, v.page).unwrap_or(0);
        let entry = index[(local - first_local) as usize];
        if crate::pagemap::verify(entry, None) != crate::pagemap::Verdict::Agrees {
            one_by_one.push(v);
        } else {
            new.push((local, v));
        }
    }
    let slot_blocks = extent.slot_blocks() as usize;
    let mut writes = Vec::with_capacity(new.len().div_ceil(NEW_WRITE_PAGES_MAX));
    let mut new = new.into_iter().peekable();
    while let Some(first) = new.next() {
        let mut versions = vec![first];
        while versions.len() < NEW_WRITE_PAGES_MAX
            && let Some(next) = new.next_if(|(local, _)| *local == versions[versions.len() - 1].0 + 1)
        {
            versions.push(next);
        }
        let slot = pagestore::FIRST_SLOT;
        let at = extent.slot_block(versions[0].0, slot);
        let mut buf = AlignedBuf::zeroed_blocks(versions.len() * slot_blocks);
        let mut slots = Vec::with_capacity(versions.len());
        for (i, (local, v)) in versions.into_iter().enumerate() {
            let entry = crate::pagemap::Entry::of(v.lsn, &v.bytes);
            let version = PageVersion {
                lsn: v.lsn,
                bytes: v.bytes,
            };
            let bytes = &mut buf[i * slot_blocks * BLOCK_SIZE..(i + 1) * slot_blocks * BLOCK_SIZE];
            pagestore::encode_version(
                bytes,
                *device_id,
                extent,
                id,
                v.page,
                extent.slot_block(local, slot),
                &version,
            );
            slots.push(NewSlot {
                page: v.page,
                local,
                slot,
                entry,
            });
        }
        writes.push(NewWrite { at, slots, buf });
    }
    (writes, one_by_one)
}

/// What [`Node::copy_run_to_both_slots`] writes: each page's current
/// version encoded into its other slot in `halves`; returns the run's
/// slots, (local index, current slot) of each copied, and the pages to
/// copy one by one.
fn plan_copy_run(
    device_id: &DeviceId,
    extent: &Extent,
    id: SegmentId,
    run: &Run,
    mut halves: Halves,
    pages: Vec<u64>,
) -> (Halves, Vec<(u64, usize)>, Vec<u64>) {
    let mut copied = Vec::with_capacity(pages.len());
    let mut one_by_one = Vec::new();
    for page in pages {
        let l = extent.local(id.pg, page).unwrap_or(0);
        match whole_current(device_id, extent, id, run, &halves, l, page) {
            Some(Current::Version { slot, version }) => {
                let at = extent.slot_block(l, 1 - slot);
                let bytes = run.slot_bytes(extent, l);
                pagestore::encode_version(&mut halves[1 - slot][bytes], *device_id, extent, id, page, at, &version);
                copied.push((l, slot));
            }
            Some(Current::Never) => {}
            None => one_by_one.push(page),
        }
    }
    (halves, copied, one_by_one)
}

/// The current version of `page` from its two slots as `halves` (a read
/// of `run`) hold them, if each is a whole version or empty; None if either
/// is not (damaged on the device, torn by a crash, or caught mid-write):
/// the caller reads the page again under its stripe, which tells those
/// apart and reports damage.
///
/// Read without the page's stripe, the newer of two whole slots is the
/// version that was current when the read began, or a newer one: a page's
/// versions go up in LSN, a version is written only into the slot that
/// does not hold the current one, and a slot caught mid-write is not whole
/// (each block names its version's LSN and carries a CRC). So the slot that
/// held the current version reads as it or as a newer version, never as an
/// older one, and a slot is never emptied.
fn whole_current(
    device_id: &DeviceId,
    extent: &Extent,
    id: SegmentId,
    run: &Run,
    halves: &Halves,
    local: u64,
    page: u64,
) -> Option<Current> {
    let slots = [0, 1].map(|slot| {
        let at = extent.slot_block(local, slot);
        pagestore::decode_slot(
            &halves[slot][run.slot_bytes(extent, local)],
            device_id,
            extent,
            id,
            page,
            at,
        )
    });
    if slots.iter().any(|s| matches!(s, Slot::Damaged(_))) {
        return None;
    }
    pagestore::current(slots, None).ok().map(|chosen| chosen.current)
}

fn not_hydrating(id: SegmentId) -> NodeError {
    NodeError::BadPageVersion(format!(
        "segment (volume {}, pg {}) is not being hydrated: begin first",
        id.volume, id.pg
    ))
}

#[cfg(test)]
mod parallel_groups_tests {
    use super::*;

    #[test]
    fn groups_keep_order_and_bounds_and_always_take_one() {
        let runs: Vec<usize> = vec![1 << 20; 70];
        let groups: Vec<&[usize]> = parallel_groups(&runs, |b| *b).collect();
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), 70);
        assert!(
            groups
                .iter()
                .all(|g| g.len() == RUNS_PARALLEL_BYTES >> 20 || g.len() == 70 % 8)
        );
        let small: Vec<usize> = vec![4096; 70];
        let sizes: Vec<usize> = parallel_groups(&small, |b| *b).map(<[usize]>::len).collect();
        assert_eq!(sizes, vec![RUNS_PARALLEL, RUNS_PARALLEL, 70 - 2 * RUNS_PARALLEL]);
        let huge = vec![RUNS_PARALLEL_BYTES * 2; 2];
        assert_eq!(
            parallel_groups(&huge, |b| *b).count(),
            2,
            "a run past the bound goes alone"
        );
        assert_eq!(parallel_groups(&Vec::<usize>::new(), |b| *b).count(), 0);
    }

    #[test]
    fn consecutive_pages_current_in_the_same_slot_are_one_read() {
        let extent = Extent {
            start_block: 100,
            page_bytes: 8192,
            pg_pages: 64,
        };
        let sb = extent.slot_blocks();
        // Pages 4 to 9, each written once (its first slot), but page 7
        // twice (slot 1).
        let slots: Vec<usize> = (4..10)
            .map(|l| if l == 7 { 1 } else { pagestore::FIRST_SLOT })
            .collect();
        assert_eq!(slots, vec![0, 0, 0, 1, 0, 0]);
        let reads = adjacent_slots(&extent, 4, &slots);
        assert_eq!(
            reads,
            vec![
                (extent.slot_block(4, 0), 3),
                (extent.slot_block(7, 1), 1),
                (extent.slot_block(8, 0), 2),
            ]
        );
        assert_eq!(extent.slot_block(4, 0) + sb, extent.slot_block(5, 0));
        assert_eq!(
            reads.iter().map(|r| r.1).sum::<usize>(),
            slots.len(),
            "every slot read once"
        );
        assert!(adjacent_slots(&extent, 0, &[]).is_empty());
        // A page's slot 0 then its neighbour's slot 1 are never one stretch.
        assert_eq!(adjacent_slots(&extent, 1, &[0, 1]).len(), 2);
        assert_eq!(adjacent_slots(&extent, 1, &[1, 1]).len(), 1);
    }

    #[test]
    fn a_group_reads_no_more_pages_than_the_batch_has_room_for() {
        let run = |first_local, pages| Run { first_local, pages };
        let mut rest: std::collections::VecDeque<Run> = vec![run(0, 85), run(85, 85), run(200, 10)].into();
        let group = take_group(&mut rest, 100, |r| r.pages as usize * 4096);
        let taken: Vec<(u64, u64)> = group.iter().map(|r| (r.first_local, r.pages)).collect();
        assert_eq!(taken, vec![(0, 85), (85, 15)], "the run past the room is cut there");
        let left: Vec<(u64, u64)> = rest.iter().map(|r| (r.first_local, r.pages)).collect();
        assert_eq!(left, vec![(100, 70), (200, 10)], "its remainder is read next");
        let group = take_group(&mut rest, 0, |r| r.pages as usize * 4096);
        assert_eq!(group.len(), 1, "always one page at least");
        assert_eq!((group[0].first_local, group[0].pages), (100, 1));
        let group = take_group(&mut rest, 1000, |r| r.pages as usize * 4096);
        let taken: Vec<(u64, u64)> = group.iter().map(|r| (r.first_local, r.pages)).collect();
        assert_eq!(taken, vec![(101, 69), (200, 10)]);
        assert!(rest.is_empty());
        let mut many: std::collections::VecDeque<Run> = (0..100).map(|i| run(i * 2, 1)).collect();
        assert_eq!(take_group(&mut many, 1000, |_| 4096).len(), RUNS_PARALLEL);
        let mut big: std::collections::VecDeque<Run> = (0..4).map(|i| run(i * 1000, 100)).collect();
        assert_eq!(
            take_group(&mut big, 1000, |_| RUNS_PARALLEL_BYTES / 2).len(),
            2,
            "and the bytes bound still holds"
        );
    }
}
