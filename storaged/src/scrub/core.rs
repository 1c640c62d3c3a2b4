//! The scrubber's sans-IO core: which range to verify next and when, what
//! to fetch from peers, what to keep durably, and the reports. The shell
//! ([`super::shell`]) feeds it the node's [`Layout`] at every step, the
//! time (milliseconds on a monotonic clock), the foreground's latency and
//! the outcome of each request, and carries out the [`Action`]s it returns.
//!
//! - **The tour.** The areas of the layout (the log, each segment's
//!   extent) in device order. A background pass starts at a random block,
//!   goes up to the end of the last area, then from the first area up to
//!   where it started, so each block is read once a pass; a segment that
//!   appears ahead of the cursor is read in this pass, one that goes is
//!   dropped from it. Ranges are at most [`RANGE_BLOCKS_MAX`] blocks and
//!   never cross an area's edge.
//! - **Ranges in flight.** At full speed (a priority pass, or a background
//!   pass the ceiling binds, and the foreground calm) up to
//!   [`ScrubConfig::ranges_inflight_max`] ranges are out at once, so the
//!   device reads one while the node verifies another; otherwise one.
//!   Outcomes may come back in any order; the limit is a window from the
//!   cursor (a range done past one still out holds its place).
//! - **Progress.** The cursor moves over a range only once it and every
//!   range before it on the tour are done, so it never passes a range that
//!   is still out (or waiting to be tried again); it is kept durably every
//!   [`PERSIST_BYTES`] or [`PERSIST_INTERVAL_MS`] and at a pass's end: a
//!   restart reads again at most what was read since.
//! - **Pace.** A token bucket (at most the ranges that may be in flight
//!   saved up) filled at the least of the ceiling and what reads the whole
//!   layout in one period; halved while the foreground's appends take more
//!   than [`SLOWDOWN`] times the lowest recent mean, down to
//!   [`BACKGROUND_FACTOR_MIN`], and grown back step by step.
//! - **Priority passes.** Asked for by an operator: the log and the chosen
//!   segments, from their start, at the ceiling (still backing off, never
//!   below [`PRIORITY_FACTOR_MIN`]). The background pass waits meanwhile
//!   and goes on where it was. A request covered by the running priority
//!   pass gets its number; otherwise it joins the one queued pass (their
//!   filters merged), which starts when the running one ends.
//! - **Copies.** A page the node cannot repair alone is asked of the
//!   segment's peers one after another, from a random one, until a copy
//!   installs; at most [`REPAIRS_INFLIGHT_MAX`] at once, and the tour waits
//!   while [`REPAIRS_QUEUED_MAX`] wait. What no peer can give is left, and
//!   reported with its location.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::time::Duration;

use super::progress::{PassSummary, Progress, TourProgress};
use super::{
    Area, AreaReport, Checked, Damaged, Filter, Finding, LEFT_LISTED_MAX, Layout, NeedCopy, PassReport, Peer, Running,
    Status,
};

/// Milliseconds on the shell's monotonic clock.
pub type Millis = u64;

pub const BLOCK_BYTES: u64 = crate::io::BLOCK_SIZE as u64;
/// Blocks one [`Action::Scrub`] covers at most (1 MiB).
pub const RANGE_BLOCKS_MAX: u64 = 256;
const RANGE_BYTES_MAX: u64 = RANGE_BLOCKS_MAX * BLOCK_BYTES;
/// Progress is kept after this many bytes read ...
pub const PERSIST_BYTES: u64 = 64 << 20;
/// ... or this long, whichever first.
pub const PERSIST_INTERVAL_MS: Millis = 10_000;
/// [`ScrubConfig::ranges_inflight_max`] by default: the device reads the
/// next ranges while the node verifies one. Four read a device at fio's
/// sequential rate where two reached four fifths of it and eight did no
/// better (docs/performance.md, "Scrub").
pub const RANGES_INFLIGHT_DEFAULT: usize = 4;
/// The most [`ScrubConfig::ranges_inflight_max`] may be: each range out
/// holds a 1 MiB buffer, and a deeper queue only lengthens the foreground's
/// waits behind the scrubber's reads.
pub const RANGES_INFLIGHT_LIMIT: usize = 8;
/// A range whose read fails is tried this many times, then passed over.
const SCRUB_ATTEMPTS_MAX: u32 = 3;
const SCRUB_RETRY_MS: Millis = 1_000;
/// A progress write that failed is tried again after this long.
const PERSIST_RETRY_MS: Millis = 1_000;
/// Peer copies being fetched or installed at once.
pub const REPAIRS_INFLIGHT_MAX: usize = 2;
/// Pages waiting for a copy; the tour waits beyond.
pub const REPAIRS_QUEUED_MAX: usize = 256;
/// Peers asked for one page at most (a PG has five besides this node).
const REPAIR_ATTEMPTS_MAX: u32 = 16;
/// Locations of damage left that [`Status::left_now`] follows; more are
/// counted but not followed.
const LEFT_TRACKED_MAX: usize = 1 << 16;
/// Foreground samples the lowest recent mean is taken over.
const LATENCY_WINDOW: usize = 64;
/// The foreground's mean latency above the lowest recent × this halves the pace.
pub const SLOWDOWN: f64 = 1.5;
pub const BACKGROUND_FACTOR_MIN: f64 = 1.0 / 16.0;
pub const PRIORITY_FACTOR_MIN: f64 = 1.0 / 8.0;
/// The pace grows back by this factor per calm sample.
const RECOVER: f64 = 1.25;
/// How long the core sleeps with nothing to do (the layout may change).
const IDLE_MS: Millis = 1_000;

/// Pace and switch of the scrubber (`storaged run`'s config file:
/// `scrub_pass_period_s`, `scrub_rate_bytes_per_s`, `scrub_enabled`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubConfig {
    /// A background pass reads everything in about this long (not faster).
    pub pass_period: Duration,
    /// Ceiling on bytes read per second; priority passes run at it.
    pub rate_bytes_per_s_max: u64,
    /// The background tour runs; priority passes run either way.
    pub enabled: bool,
    /// Ranges read at once at full speed (1 to [`RANGES_INFLIGHT_LIMIT`]);
    /// one at a slower pace.
    pub ranges_inflight_max: usize,
}

impl Default for ScrubConfig {
    fn default() -> Self {
        ScrubConfig {
            pass_period: Duration::from_secs(24 * 3600),
            rate_bytes_per_s_max: 256 << 20,
            enabled: true,
            ranges_inflight_max: RANGES_INFLIGHT_DEFAULT,
        }
    }
}

impl ScrubConfig {
    /// Refuse a pace that would stop the scrubber.
    pub fn validate(&self) -> Result<(), String> {
        if self.pass_period < Duration::from_secs(1) {
            return Err("scrub_pass_period_s must be at least 1".into());
        }
        if self.rate_bytes_per_s_max < BLOCK_BYTES {
            return Err(format!(
                "scrub_rate_bytes_per_s must be at least {BLOCK_BYTES} (a block a second)"
            ));
        }
        if !(1..=RANGES_INFLIGHT_LIMIT).contains(&self.ranges_inflight_max) {
            return Err(format!(
                "the scrubber's ranges in flight must be 1 to {RANGES_INFLIGHT_LIMIT}, not {}",
                self.ranges_inflight_max
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Verify `range` of `area` ([`super::Store::scrub_range`]); report
    /// with [`ScrubCore::on_scrubbed`], naming `id`.
    Scrub {
        id: u64,
        pass: u64,
        area: Area,
        range: Range<u64>,
    },
    /// Ask the peer [`pick_peer`] names for `need`'s page, and hand what
    /// comes back to [`super::Store::install_copy`]; report with
    /// [`ScrubCore::on_copy`].
    Fetch {
        repair: u64,
        need: NeedCopy,
        start: u32,
        attempt: u32,
    },
    /// Write this durably ([`super::progress`]); report with
    /// [`ScrubCore::on_persisted`].
    Persist(Progress),
    /// Damage repaired (locally or from a peer).
    Repaired { area: Area, finding: Finding },
    /// Damage nothing could repair.
    Left { area: Area, finding: Finding },
    /// A range that could not be read, passed over after retries.
    Unread {
        pass: u64,
        area: Area,
        range: Range<u64>,
        error: String,
    },
    /// A pass ended.
    Finished(PassReport),
}

/// What became of one [`Action::Fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The copy verified and is written.
    Installed,
    /// The peer had none, did not answer in time, or its copy did not
    /// verify: ask the next.
    Failed(String),
    /// Every peer was asked (or the segment has none now).
    NoMorePeers,
}

/// The peer to ask on `attempt` (from 0) of a fetch starting at `start`:
/// each once, in turn; None when all were asked.
pub fn pick_peer(peers: &[Peer], start: u32, attempt: u32) -> Option<Peer> {
    if attempt as usize >= peers.len() {
        return None;
    }
    Some(peers[(start as usize + attempt as usize) % peers.len()])
}

/// Where a tour is: see [`TourProgress`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tour {
    start: u64,
    cursor: u64,
    wrapped: bool,
}

impl Tour {
    /// The next range from the cursor, or None when the tour is done. Only
    /// the leg may change: the cursor moves when a range is done.
    fn next(&mut self, areas: &[(Area, Range<u64>)]) -> Option<(Area, Range<u64>)> {
        loop {
            if self.wrapped && self.cursor >= self.start {
                return None;
            }
            let limit = if self.wrapped { self.start } else { u64::MAX };
            let found = areas.iter().find(|(_, r)| r.end > self.cursor && r.start < limit);
            if let Some((area, r)) = found {
                let from = r.start.max(self.cursor);
                let to = r.end.min(from + RANGE_BLOCKS_MAX).min(limit);
                return Some((*area, from..to));
            }
            if self.wrapped {
                return None;
            }
            self.wrapped = true;
            self.cursor = 0;
        }
    }

    /// Everything of the tour up to `end` on the leg `wrapped` is done.
    fn advance(&mut self, wrapped: bool, end: u64) {
        if wrapped && !self.wrapped {
            self.wrapped = true;
            self.cursor = end;
        } else if wrapped == self.wrapped {
            self.cursor = self.cursor.max(end);
        }
    }

    /// Blocks of `areas` the tour has still to read.
    fn remaining_blocks(&self, areas: &[(Area, Range<u64>)]) -> u64 {
        let span = |from: u64, to: u64| -> u64 {
            areas
                .iter()
                .map(|(_, r)| r.end.min(to).saturating_sub(r.start.max(from)))
                .sum()
        };
        if self.wrapped {
            span(self.cursor, self.start)
        } else {
            span(self.cursor.max(self.start), u64::MAX) + span(0, self.start)
        }
    }
}

#[derive(Debug)]
struct Pass {
    number: u64,
    /// None: the background tour (every area).
    filter: Option<Filter>,
    /// Everything before its cursor is done: what is kept durably.
    tour: Tour,
    /// Where the next range starts: at `tour`, or past the ranges out.
    ahead: Tour,
    started_unix_secs: u64,
    bytes_done: u64,
    areas: BTreeMap<Area, AreaReport>,
    /// Counts from before a restart (their areas are not known).
    carried_found: u64,
    carried_repaired: u64,
    carried_left: u64,
    repairs_pending: usize,
}

impl Pass {
    fn priority(&self) -> bool {
        self.filter.is_some()
    }

    fn covers(&self, area: Area) -> bool {
        match (&self.filter, area) {
            (None, _) | (Some(Filter::All), _) | (_, Area::Log) => true,
            (Some(Filter::Segments(ids)), Area::Segment(id)) => ids.contains(&id),
        }
    }

    fn areas_of(&self, layout: &[(Area, Range<u64>)]) -> Vec<(Area, Range<u64>)> {
        layout.iter().filter(|(a, _)| self.covers(*a)).cloned().collect()
    }

    fn counts(&self) -> (u64, u64, u64) {
        let mut found = self.carried_found;
        let mut repaired = self.carried_repaired;
        for r in self.areas.values() {
            found += r.found;
            repaired += r.repaired;
        }
        // Pending copies count as left until they come (a pass ends
        // with none pending).
        (found, repaired, found.saturating_sub(repaired))
    }

    fn report(&self, ended_unix_secs: u64) -> PassReport {
        PassReport {
            pass: self.number,
            priority: self.priority(),
            started_unix_secs: self.started_unix_secs,
            ended_unix_secs,
            bytes_read: self.bytes_done,
            areas: self.areas.iter().map(|(a, r)| (*a, r.clone())).collect(),
        }
    }

    fn tour_progress(&self) -> TourProgress {
        let (found, repaired, left) = self.counts();
        TourProgress {
            pass: self.number,
            start_block: self.tour.start,
            cursor: self.tour.cursor,
            wrapped: self.tour.wrapped,
            bytes_done: self.bytes_done,
            started_unix_secs: self.started_unix_secs,
            found,
            repaired,
            left,
        }
    }
}

/// A range out, or done while one before it on its pass's tour is not.
#[derive(Debug, Clone)]
struct Inflight {
    id: u64,
    pass: u64,
    area: Area,
    range: Range<u64>,
    /// On the tour's second leg.
    wrapped: bool,
    attempts: u32,
    /// Waiting to be tried again (after a failed read) from this time.
    retry_at: Option<Millis>,
    /// Its outcome is in (or it was passed over): what it adds to its
    /// pass's counts, taken when the cursor moves over it, so counts kept
    /// durably are always those of the ranges before the kept cursor.
    done: Option<Counted>,
}

/// What a done range adds to its pass.
#[derive(Debug, Clone, Default)]
struct Counted {
    /// Read (not passed over): its area shows in the pass's report.
    read: bool,
    bytes: u64,
    blocks: u64,
    pages: u64,
    found: u64,
    repaired: u64,
}

#[derive(Debug, Clone)]
struct Repair {
    id: u64,
    pass: u64,
    area: Area,
    /// The range whose read found it.
    range_id: u64,
    need: NeedCopy,
    finding: Finding,
    start: u32,
    attempt: u32,
    last_error: Option<String>,
}

/// See the module header.
#[derive(Debug)]
pub struct ScrubCore {
    config: ScrubConfig,
    rng: u64,
    /// Unix time in ms = monotonic ms + this.
    unix_offset_ms: i128,
    /// Progress taken ([`ScrubCore::restore`]); nothing runs before.
    loaded: bool,
    passes: u64,
    /// Passes completed since start (the metrics' counter).
    passes_completed: u64,
    background: Option<Pass>,
    priority: Option<Pass>,
    /// The next priority pass: its number and filter.
    queued: Option<(u64, Filter)>,
    /// Ranges out or done-but-not-passed, of any pass, in the order they
    /// went out (each pass's in its tour's order).
    ranges: VecDeque<Inflight>,
    range_next_id: u64,
    repairs_waiting: VecDeque<Repair>,
    repairs_out: BTreeMap<u64, Repair>,
    repair_next_id: u64,
    layout: Vec<(Area, Range<u64>)>,
    tokens: f64,
    tokens_at: Millis,
    factor: f64,
    latencies: VecDeque<f64>,
    persist_out: bool,
    persist_due: bool,
    /// No write before this (the last one failed).
    persist_retry_at: Millis,
    persisted_at: Millis,
    persisted_bytes: u64,
    last: Option<PassReport>,
    last_summary: Option<PassSummary>,
    found_total: u64,
    repaired_total: u64,
    /// Byte offsets of damage left, until a later read finds them well.
    left_tracked: BTreeMap<u64, ()>,
    left_untracked: u64,
    /// Left before a restart, until a background pass reads everything again.
    left_restored: u64,
}

impl ScrubCore {
    /// `now` on the monotonic clock is `unix_ms` on the wall clock (for the
    /// reports' times); `seed` chooses where passes start.
    pub fn new(config: ScrubConfig, seed: u64, now: Millis, unix_ms: u64) -> ScrubCore {
        ScrubCore {
            config,
            rng: seed ^ 0x9e37_79b9_7f4a_7c15,
            unix_offset_ms: i128::from(unix_ms) - i128::from(now),
            loaded: false,
            passes: 0,
            passes_completed: 0,
            background: None,
            priority: None,
            queued: None,
            ranges: VecDeque::new(),
            range_next_id: 1,
            repairs_waiting: VecDeque::new(),
            repairs_out: BTreeMap::new(),
            repair_next_id: 1,
            layout: Vec::new(),
            tokens: 0.0,
            tokens_at: now,
            factor: 1.0,
            latencies: VecDeque::new(),
            persist_out: false,
            persist_due: false,
            persist_retry_at: 0,
            persisted_at: now,
            persisted_bytes: 0,
            last: None,
            last_summary: None,
            found_total: 0,
            repaired_total: 0,
            left_tracked: BTreeMap::new(),
            left_untracked: 0,
            left_restored: 0,
        }
    }

    /// Take the progress read from the device (default: a fresh start).
    pub fn restore(&mut self, now: Millis, progress: Progress) {
        self.loaded = true;
        self.passes = self.passes.max(progress.passes);
        if let Some(t) = progress.tour {
            self.passes = self.passes.max(t.pass);
            self.left_restored += t.left;
            self.background = Some(Pass {
                number: t.pass,
                filter: None,
                tour: Tour {
                    start: t.start_block,
                    cursor: t.cursor,
                    wrapped: t.wrapped,
                },
                ahead: Tour {
                    start: t.start_block,
                    cursor: t.cursor,
                    wrapped: t.wrapped,
                },
                started_unix_secs: t.started_unix_secs,
                bytes_done: t.bytes_done,
                areas: BTreeMap::new(),
                carried_found: t.found,
                carried_repaired: t.repaired,
                carried_left: t.left,
                repairs_pending: 0,
            });
            self.persisted_bytes = t.bytes_done;
        }
        if let Some(l) = progress.last {
            self.passes = self.passes.max(l.pass);
            self.left_restored += l.left;
            self.last = Some(PassReport {
                pass: l.pass,
                priority: l.priority,
                started_unix_secs: l.started_unix_secs,
                ended_unix_secs: l.ended_unix_secs,
                bytes_read: l.bytes_read,
                areas: Vec::new(),
            });
            self.last_summary = Some(l);
        }
        self.persisted_at = now;
        self.tokens_at = now;
    }

    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// Passes completed since start, background and priority.
    pub fn passes_completed(&self) -> u64 {
        self.passes_completed
    }

    /// The last completed pass's counts (also after a restart, when
    /// [`Status::last`] has no areas).
    pub fn last_summary(&self) -> Option<&PassSummary> {
        self.last_summary.as_ref()
    }

    /// Ask for a priority pass over `filter` (and the log); returns its
    /// number. None until the progress is restored (numbers are durable).
    pub fn request(&mut self, filter: Filter) -> Option<u64> {
        if !self.loaded {
            return None;
        }
        if let Some(p) = &self.priority
            && filter_covers(p.filter.as_ref().unwrap_or(&Filter::All), &filter)
        {
            return Some(p.number);
        }
        if let Some((number, queued)) = &mut self.queued {
            *queued = filter_union(queued, &filter);
            return Some(*number);
        }
        self.passes += 1;
        self.persist_due = true;
        self.queued = Some((self.passes, filter));
        Some(self.passes)
    }

    /// The foreground's appends since the last sample: how many, and their
    /// summed latency.
    pub fn observe_foreground(&mut self, appends: u64, latency_us_sum: u64) {
        if appends == 0 {
            self.factor = (self.factor * RECOVER).min(1.0);
            return;
        }
        let mean = latency_us_sum as f64 / appends as f64;
        if self.latencies.len() == LATENCY_WINDOW {
            self.latencies.pop_front();
        }
        self.latencies.push_back(mean);
        let lowest = self.latencies.iter().copied().fold(f64::INFINITY, f64::min);
        if mean > lowest * SLOWDOWN {
            self.factor = (self.factor / 2.0).max(BACKGROUND_FACTOR_MIN);
        } else {
            self.factor = (self.factor * RECOVER).min(1.0);
        }
    }

    /// Bytes per second the running pass may read now.
    pub fn rate_bytes_per_s(&self) -> f64 {
        let ceiling = self.config.rate_bytes_per_s_max as f64;
        if self.priority.is_some() {
            return ceiling * self.factor.max(PRIORITY_FACTOR_MIN);
        }
        ceiling.min(self.background_rate()) * self.factor
    }

    /// What reads the whole layout in one period (a block a second at least).
    fn background_rate(&self) -> f64 {
        let bytes: u64 = self.layout.iter().map(|(_, r)| (r.end - r.start) * BLOCK_BYTES).sum();
        (bytes as f64 / self.config.pass_period.as_secs_f64()).max(BLOCK_BYTES as f64)
    }

    fn refill(&mut self, now: Millis) {
        if now > self.tokens_at {
            let rate = self.rate_bytes_per_s();
            // At most what may go out at once is saved up.
            let cap = (self.ranges_inflight_limit() as u64 * RANGE_BYTES_MAX) as f64;
            self.tokens = (self.tokens + rate * (now - self.tokens_at) as f64 / 1000.0).min(cap);
        }
        self.tokens_at = self.tokens_at.max(now);
    }

    fn unix_secs(&self, now: Millis) -> u64 {
        ((i128::from(now) + self.unix_offset_ms).max(0) / 1000) as u64
    }

    fn random(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn set_layout(&mut self, layout: &Layout) {
        let mut areas: Vec<(Area, Range<u64>)> = Vec::with_capacity(layout.segments.len() + 1);
        if layout.log.start < layout.log.end {
            areas.push((Area::Log, layout.log.clone()));
        }
        for (id, r) in &layout.segments {
            if r.start < r.end {
                areas.push((Area::Segment(*id), r.clone()));
            }
        }
        areas.sort_by_key(|(_, r)| r.start);
        if areas != self.layout {
            // Damage left in an area that went is nobody's to repair now.
            self.left_tracked
                .retain(|&offset, _| areas.iter().any(|(_, r)| r.contains(&(offset / BLOCK_BYTES))));
            self.layout = areas;
        }
    }

    /// The pass whose ranges are read now: a priority pass, else the
    /// background one if the tour is enabled (a pass kept from before it
    /// was disabled waits, kept, until it is enabled again).
    fn active(&mut self) -> Option<&mut Pass> {
        if self.priority.is_some() {
            self.priority.as_mut()
        } else {
            self.background.as_mut().filter(|_| self.config.enabled)
        }
    }

    fn active_ref(&self) -> Option<&Pass> {
        self.priority
            .as_ref()
            .or(self.background.as_ref().filter(|_| self.config.enabled))
    }

    fn pass_mut(&mut self, number: u64) -> Option<&mut Pass> {
        if self.priority.as_ref().is_some_and(|p| p.number == number) {
            return self.priority.as_mut();
        }
        if self.background.as_ref().is_some_and(|p| p.number == number) {
            return self.background.as_mut();
        }
        None
    }

    /// What to do now, given the node's layout as it is now.
    pub fn poll(&mut self, now: Millis, layout: &Layout) -> Vec<Action> {
        let mut out = Vec::new();
        self.set_layout(layout);
        self.refill(now);
        if !self.loaded {
            return out;
        }
        self.start_passes(now);
        self.finish_passes(now, &mut out);
        self.start_passes(now);
        // Copies from peers.
        while self.repairs_out.len() < REPAIRS_INFLIGHT_MAX
            && let Some(r) = self.repairs_waiting.pop_front()
        {
            out.push(Action::Fetch {
                repair: r.id,
                need: r.need,
                start: r.start,
                attempt: r.attempt,
            });
            self.repairs_out.insert(r.id, r);
        }
        self.next_range(now, &mut out);
        self.maybe_persist(now, &mut out);
        out
    }

    fn start_passes(&mut self, now: Millis) {
        if self.priority.is_none()
            && let Some((number, filter)) = self.queued.take()
        {
            self.priority = Some(Pass {
                number,
                filter: Some(filter),
                tour: Tour {
                    start: 0,
                    cursor: 0,
                    wrapped: false,
                },
                ahead: Tour {
                    start: 0,
                    cursor: 0,
                    wrapped: false,
                },
                started_unix_secs: self.unix_secs(now),
                bytes_done: 0,
                areas: BTreeMap::new(),
                carried_found: 0,
                carried_repaired: 0,
                carried_left: 0,
                repairs_pending: 0,
            });
        }
        if self.background.is_none() && self.config.enabled {
            let blocks: u64 = self.layout.iter().map(|(_, r)| r.end - r.start).sum();
            if blocks == 0 {
                return;
            }
            // The random start: the r-th block of the tour.
            let mut r = self.random() % blocks;
            let mut start = 0;
            for (_, range) in &self.layout {
                let len = range.end - range.start;
                if r < len {
                    start = range.start + r;
                    break;
                }
                r -= len;
            }
            self.passes += 1;
            self.persist_due = true;
            self.background = Some(Pass {
                number: self.passes,
                filter: None,
                tour: Tour {
                    start,
                    cursor: start,
                    wrapped: false,
                },
                ahead: Tour {
                    start,
                    cursor: start,
                    wrapped: false,
                },
                started_unix_secs: self.unix_secs(now),
                bytes_done: 0,
                areas: BTreeMap::new(),
                carried_found: 0,
                carried_repaired: 0,
                carried_left: 0,
                repairs_pending: 0,
            });
        }
    }

    /// End the active pass if its tour is done and nothing of it is out.
    fn finish_passes(&mut self, now: Millis, out: &mut Vec<Action>) {
        let layout = self.layout.clone();
        let Some(number) = self.active_ref().map(|p| p.number) else {
            return;
        };
        let ranges_out = self.ranges.iter().any(|r| r.pass == number);
        let Some(pass) = self.active() else { return };
        let areas = pass.areas_of(&layout);
        if pass.ahead.next(&areas).is_some() || ranges_out || pass.repairs_pending > 0 {
            return;
        }
        let priority = pass.priority();
        let ended = self.unix_secs(now);
        let pass = if priority {
            self.priority.take()
        } else {
            self.background.take()
        };
        let Some(pass) = pass else { return };
        let (found, repaired, left) = pass.counts();
        let report = pass.report(ended);
        if !priority {
            // Everything was read again since the restart: what was left
            // before it is either in this pass's findings or gone.
            self.left_restored = pass.carried_left;
        }
        self.last_summary = Some(PassSummary {
            pass: pass.number,
            priority,
            started_unix_secs: pass.started_unix_secs,
            ended_unix_secs: ended,
            bytes_read: pass.bytes_done,
            found,
            repaired,
            left,
        });
        self.last = Some(report.clone());
        self.passes_completed += 1;
        self.persist_due = true;
        out.push(Action::Finished(report));
    }

    /// Ranges that may be out at once now: more than one only at full
    /// speed (a priority pass, or a background pass whose rate the ceiling
    /// sets), and not while backing off, when the foreground needs the
    /// device's queue more than the scrubber does.
    fn ranges_inflight_limit(&self) -> usize {
        let full_speed = self.priority.is_some() || self.background_rate() >= self.config.rate_bytes_per_s_max as f64;
        if full_speed && self.factor >= 1.0 {
            self.config.ranges_inflight_max.max(1)
        } else {
            1
        }
    }

    /// The range read next (on the active pass's tour past what is out),
    /// without taking it.
    fn peek_range(&self) -> Option<(Area, Range<u64>)> {
        let pass = self.active_ref()?;
        let mut ahead = pass.ahead.clone();
        ahead.next(&pass.areas_of(&self.layout))
    }

    fn next_range(&mut self, now: Millis, out: &mut Vec<Action>) {
        // Ranges waiting to be tried again first: they hold the cursor back.
        for i in 0..self.ranges.len() {
            let r = &self.ranges[i];
            if r.done.is_some() || r.retry_at.is_none_or(|at| at > now) {
                continue;
            }
            // The area may have gone (or shrunk) since.
            let still = self
                .layout
                .iter()
                .any(|(a, l)| *a == r.area && l.start <= r.range.start && r.range.end <= l.end);
            if !still {
                let number = r.pass;
                self.ranges[i].done = Some(Counted::default());
                self.settle(number);
                // The queue changed under the index: the rest next time.
                return;
            }
            let bytes = (r.range.end - r.range.start) * BLOCK_BYTES;
            if self.tokens < bytes as f64 {
                return;
            }
            self.tokens -= bytes as f64;
            let r = &mut self.ranges[i];
            r.retry_at = None;
            out.push(Action::Scrub {
                id: r.id,
                pass: r.pass,
                area: r.area,
                range: r.range.clone(),
            });
        }
        // A window: a range done past one still out holds its place, so a
        // range that is slow or read again does not let the reads run on
        // ahead of the cursor (and a restart reads again at most these).
        let limit = self.ranges_inflight_limit();
        while self.ranges.len() < limit && self.repairs_waiting.len() < REPAIRS_QUEUED_MAX {
            let Some((_, range)) = self.peek_range() else { return };
            let bytes = (range.end - range.start) * BLOCK_BYTES;
            if self.tokens < bytes as f64 {
                return;
            }
            let layout = self.layout.clone();
            let Some(pass) = self.active() else { return };
            let areas = pass.areas_of(&layout);
            let Some((area, range)) = pass.ahead.next(&areas) else {
                return;
            };
            pass.ahead.cursor = range.end;
            let (number, wrapped) = (pass.number, pass.ahead.wrapped);
            self.tokens -= bytes as f64;
            let id = self.range_next_id;
            self.range_next_id += 1;
            self.ranges.push_back(Inflight {
                id,
                pass: number,
                area,
                range: range.clone(),
                wrapped,
                attempts: 0,
                retry_at: None,
                done: None,
            });
            out.push(Action::Scrub {
                id,
                pass: number,
                area,
                range,
            });
        }
    }

    /// Move pass `number`'s cursor over its done ranges at the front of
    /// the queue, taking their counts; it stops at the first one not done.
    fn settle(&mut self, number: u64) {
        while let Some(i) = self.ranges.iter().position(|r| r.pass == number) {
            let Some(counted) = self.ranges[i].done.clone() else {
                break;
            };
            let Some(r) = self.ranges.remove(i) else { break };
            let Some(p) = self.pass_mut(number) else {
                debug_assert!(false, "a range out for pass {number}, which is gone");
                continue;
            };
            p.tour.advance(r.wrapped, r.range.end);
            p.bytes_done += counted.bytes;
            if counted.read {
                let a = p.areas.entry(r.area).or_default();
                a.blocks_checked += counted.blocks;
                a.pages_checked += counted.pages;
                a.found += counted.found;
                a.repaired += counted.repaired;
            }
        }
    }

    fn maybe_persist(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.persist_out || now < self.persist_retry_at {
            return;
        }
        let bytes = self.background.as_ref().map_or(0, |p| p.bytes_done);
        let moved = bytes != self.persisted_bytes;
        let due = self.persist_due
            || bytes.saturating_sub(self.persisted_bytes) >= PERSIST_BYTES
            || (moved && now >= self.persisted_at + PERSIST_INTERVAL_MS);
        if !due {
            return;
        }
        self.persist_due = false;
        self.persist_out = true;
        self.persisted_at = now;
        self.persisted_bytes = bytes;
        out.push(Action::Persist(self.progress()));
    }

    /// What [`Action::Persist`] would keep now.
    pub fn progress(&self) -> Progress {
        Progress {
            passes: self.passes,
            tour: self.background.as_ref().map(Pass::tour_progress),
            last: self.last_summary.clone(),
        }
    }

    /// The outcome of the last [`Action::Persist`].
    pub fn on_persisted(&mut self, now: Millis, result: Result<(), String>) {
        self.persist_out = false;
        if result.is_err() {
            // Again a little later, not at once in a loop (a device that
            // refuses every write must not keep the shell busy).
            self.persist_due = true;
            self.persist_retry_at = now + PERSIST_RETRY_MS;
        }
    }

    /// When [`ScrubCore::poll`] has something to do next (at the latest;
    /// an outcome or a request may bring work sooner).
    pub fn wake_at(&self, now: Millis) -> Millis {
        let idle = now + IDLE_MS;
        if !self.loaded {
            return idle;
        }
        let mut at = idle;
        if !self.persist_out
            && (self.persist_due || self.background.as_ref().map_or(0, |p| p.bytes_done) != self.persisted_bytes)
        {
            at = at.min((self.persisted_at + PERSIST_INTERVAL_MS).max(now));
            if self.persist_due {
                at = at.min(now.max(self.persist_retry_at));
            }
        }
        if self.queued.is_some() && self.priority.is_none() {
            return now;
        }
        for r in &self.ranges {
            if let (None, Some(retry)) = (&r.done, r.retry_at) {
                let bytes = (r.range.end - r.range.start) * BLOCK_BYTES;
                at = at.min(retry.max(self.tokens_ready_at(now, bytes)));
            }
        }
        if self.ranges.len() < self.ranges_inflight_limit()
            && self.repairs_waiting.len() < REPAIRS_QUEUED_MAX
            && let Some(pass) = self.active_ref()
        {
            match self.peek_range() {
                Some((_, range)) => {
                    let bytes = (range.end - range.start) * BLOCK_BYTES;
                    at = at.min(self.tokens_ready_at(now, bytes));
                }
                // The pass ends at the next step (or when its last ranges
                // and copies are in: their outcomes wake the shell).
                None if pass.repairs_pending == 0 && !self.ranges.iter().any(|r| r.pass == pass.number) => {
                    at = at.min(now)
                }
                None => {}
            }
        }
        at
    }

    /// When the bucket holds `bytes` at the present rate (1 ms on at least,
    /// so a caller never spins).
    fn tokens_ready_at(&self, now: Millis, bytes: u64) -> Millis {
        let lack = bytes as f64 - self.tokens;
        let rate = self.rate_bytes_per_s().max(1.0);
        let wait = if lack <= 0.0 {
            0
        } else {
            (lack / rate * 1000.0).ceil() as Millis
        };
        now + wait.max(1)
    }

    /// The outcome of the [`Action::Scrub`] `id`.
    pub fn on_scrubbed(&mut self, now: Millis, id: u64, result: Result<Checked, String>) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(i) = self
            .ranges
            .iter()
            .position(|r| r.id == id && r.done.is_none() && r.retry_at.is_none())
        else {
            return out;
        };
        let checked = match result {
            Ok(c) => c,
            Err(error) => {
                let r = &mut self.ranges[i];
                r.attempts += 1;
                if r.attempts < SCRUB_ATTEMPTS_MAX {
                    r.retry_at = Some(now + SCRUB_RETRY_MS);
                } else {
                    r.done = Some(Counted::default());
                    let (number, area, range) = (r.pass, r.area, r.range.clone());
                    self.settle(number);
                    out.push(Action::Unread {
                        pass: number,
                        area,
                        range,
                        error,
                    });
                }
                return out;
            }
        };
        let (number, area, range) = (self.ranges[i].pass, self.ranges[i].area, self.ranges[i].range.clone());
        // What was left in this range and is not found again is gone
        // (what is found again stays left until it is repaired).
        let (lo, hi) = (range.start * BLOCK_BYTES, range.end * BLOCK_BYTES);
        let still = |o: &u64| {
            checked.found.iter().any(|f| f.offset == *o && !f.repaired)
                || checked.need_copy.iter().any(|n| n.offset == *o)
        };
        let gone: Vec<u64> = self
            .left_tracked
            .range(lo..hi)
            .map(|(&o, _)| o)
            .filter(|o| !still(o))
            .collect();
        for o in gone {
            self.left_tracked.remove(&o);
        }
        let mut repairs = Vec::new();
        let mut needs = checked.need_copy.clone();
        let mut findings = checked.found.clone();
        // A page needing a copy the store did not also list as found.
        for n in &checked.need_copy {
            let listed = checked.found.iter().any(|f| f.offset == n.offset && !f.repaired);
            if !listed {
                findings.push(Finding {
                    offset: n.offset,
                    what: Damaged::PageVersion {
                        page: n.page,
                        lsn: n.lsn,
                    },
                    error: "the current version does not verify".into(),
                    repaired: false,
                });
            }
        }
        let mut report = Counted {
            read: true,
            bytes: (range.end - range.start) * BLOCK_BYTES,
            blocks: checked.blocks,
            pages: checked.pages,
            ..Counted::default()
        };
        let mut left = Vec::new();
        for f in findings {
            report.found += 1;
            self.found_total += 1;
            if f.repaired {
                report.repaired += 1;
                self.repaired_total += 1;
                out.push(Action::Repaired { area, finding: f });
                continue;
            }
            if let Some(i) = needs.iter().position(|n| n.offset == f.offset) {
                let need = needs.swap_remove(i);
                let start = self.random() as u32;
                repairs.push(Repair {
                    id: self.repair_next_id,
                    pass: number,
                    area,
                    range_id: id,
                    need,
                    finding: f,
                    start,
                    attempt: 0,
                    last_error: None,
                });
                self.repair_next_id += 1;
                continue;
            }
            left.push(f);
        }
        let pending = repairs.len();
        self.repairs_waiting.extend(repairs);
        match self.pass_mut(number) {
            Some(p) => p.repairs_pending += pending,
            None => debug_assert!(false, "a range out for pass {number}, which is gone"),
        }
        self.ranges[i].done = Some(report);
        self.settle(number);
        for f in left {
            self.leave(number, area, f, &mut out);
        }
        out
    }

    fn leave(&mut self, pass: u64, area: Area, finding: Finding, out: &mut Vec<Action>) {
        if self.left_tracked.len() < LEFT_TRACKED_MAX {
            self.left_tracked.insert(finding.offset, ());
        } else {
            self.left_untracked += 1;
        }
        if let Some(p) = self.pass_mut(pass) {
            let r = p.areas.entry(area).or_default();
            if r.left.len() < LEFT_LISTED_MAX {
                r.left.push(finding.clone());
            }
        }
        out.push(Action::Left { area, finding });
    }

    /// The outcome of an [`Action::Fetch`].
    pub fn on_copy(&mut self, repair: u64, outcome: CopyOutcome) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(mut r) = self.repairs_out.remove(&repair) else {
            return out;
        };
        match outcome {
            CopyOutcome::Installed => {
                self.left_tracked.remove(&r.finding.offset);
                r.finding.repaired = true;
                self.repaired_total += 1;
                // Counted with its finding: in the range's counts while
                // the cursor has not passed it yet.
                let unsettled = self
                    .ranges
                    .iter_mut()
                    .find(|i| i.id == r.range_id)
                    .and_then(|i| i.done.as_mut());
                let counted = match unsettled {
                    Some(c) => {
                        c.repaired += 1;
                        true
                    }
                    None => false,
                };
                if let Some(p) = self.pass_mut(r.pass) {
                    p.repairs_pending -= 1;
                    if !counted {
                        p.areas.entry(r.area).or_default().repaired += 1;
                    }
                }
                out.push(Action::Repaired {
                    area: r.area,
                    finding: r.finding,
                });
            }
            CopyOutcome::Failed(e) if r.attempt + 1 < REPAIR_ATTEMPTS_MAX => {
                r.attempt += 1;
                r.last_error = Some(e);
                // Next peer first: one page's copies one after another.
                self.repairs_waiting.push_front(r);
            }
            other => {
                let why = match (&other, &r.last_error) {
                    (CopyOutcome::Failed(e), _) => e.clone(),
                    (_, Some(e)) => e.clone(),
                    (_, None) => "the segment has no peers".into(),
                };
                r.finding.error = format!(
                    "{}; no peer has a good copy at LSN {} ({} asked; last: {why})",
                    r.finding.error,
                    r.need.lsn,
                    r.attempt + u32::from(matches!(other, CopyOutcome::Failed(_)))
                );
                if let Some(p) = self.pass_mut(r.pass) {
                    p.repairs_pending -= 1;
                }
                self.leave(r.pass, r.area, r.finding, &mut out);
            }
        }
        out
    }

    /// What `ScrubStatus` answers.
    pub fn status(&self) -> Status {
        let running = self.active_ref().map(|p| {
            let areas = p.areas_of(&self.layout);
            let mut tour = p.tour.clone();
            // The leg turns only when the first is done; count from where it is.
            let _ = tour.next(&areas);
            // Ranges done past the cursor count as done, not as to read.
            let done_ahead: u64 = self
                .ranges
                .iter()
                .filter(|r| r.pass == p.number)
                .filter_map(|r| r.done.as_ref())
                .map(|c| c.bytes)
                .sum();
            let remaining = (tour.remaining_blocks(&areas) * BLOCK_BYTES).saturating_sub(done_ahead);
            Running {
                pass: p.number,
                priority: p.priority(),
                bytes_done: p.bytes_done + done_ahead,
                bytes_total: p.bytes_done + done_ahead + remaining,
            }
        });
        Status {
            running,
            last: self.last.clone(),
            found_total: self.found_total,
            repaired_total: self.repaired_total,
            left_now: self.left_tracked.len() as u64 + self.left_untracked + self.left_restored,
        }
    }
}

/// `a` reads everything `b` asks for.
pub fn filter_covers(a: &Filter, b: &Filter) -> bool {
    match (a, b) {
        (Filter::All, _) => true,
        (Filter::Segments(_), Filter::All) => false,
        (Filter::Segments(a), Filter::Segments(b)) => b.iter().all(|id| a.contains(id)),
    }
}

fn filter_union(a: &Filter, b: &Filter) -> Filter {
    match (a, b) {
        (Filter::Segments(a), Filter::Segments(b)) => {
            let mut ids = a.clone();
            for id in b {
                if !ids.contains(id) {
                    ids.push(*id);
                }
            }
            Filter::Segments(ids)
        }
        _ => Filter::All,
    }
}
