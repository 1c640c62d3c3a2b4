//! The scrub core driven by a deterministic simulation of a device (the log
//! and segment extents, page versions at LSNs with their CRCs), its peers
//! and restarts; and the shell over a fake node and fake peers.
//!
//! `SCRUB_SIM_SEEDS=N` runs N seeds (default a few dozen, to keep the
//! debug test run short); `SCRUB_SIM_SEED=S` runs only seed S.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::time::Duration;

use super::core::{
    Action, BACKGROUND_FACTOR_MIN, BLOCK_BYTES, CopyOutcome, Millis, PERSIST_INTERVAL_MS, PRIORITY_FACTOR_MIN,
    RANGE_BLOCKS_MAX, RANGES_INFLIGHT_DEFAULT, RANGES_INFLIGHT_LIMIT, REPAIRS_INFLIGHT_MAX, ScrubConfig, ScrubCore,
    pick_peer,
};
use super::progress;
use super::{Area, Checked, Damaged, Filter, Finding, Layout, NeedCopy, PassReport, Peer};
use crate::io::BLOCK_SIZE;
use crate::log::layout::SCRUB_STATE_BLOCKS;
use crate::record::SegmentId;

const DEV: [u8; 16] = [3; 16];
const SEEDS_DEFAULT: u64 = 64;

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SCRUB_SIM_SEED") {
        return vec![s.parse().expect("SCRUB_SIM_SEED is a number")];
    }
    let n = std::env::var("SCRUB_SIM_SEEDS")
        .ok()
        .map(|s| s.parse().expect("SCRUB_SIM_SEEDS is a number"))
        .unwrap_or(SEEDS_DEFAULT);
    (1..=n).collect()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn seg(pg: u32) -> SegmentId {
    SegmentId { volume: 1, pg }
}

/// A page version's bytes: what its CRC is of.
fn page_bytes(id: SegmentId, page: u64, lsn: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    for i in 0..8u64 {
        b.extend_from_slice(&(u64::from(id.pg) ^ page.rotate_left(17) ^ lsn.rotate_left(31) ^ i).to_le_bytes());
    }
    b
}

/// What a peer holds of a damaged page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerCopy {
    Good,
    /// Bits flipped: its CRC does not match.
    Damaged,
    /// A later version only (or none): the peer has nothing at the LSN.
    Absent,
    /// Does not answer in time.
    Slow,
}

#[derive(Debug, Clone)]
enum Kind {
    /// A live log block; `in_memory`: the node still holds its records and
    /// rewrites it; `freed`: released while it is read (not damage).
    Log { in_memory: bool, freed: bool },
    /// An older slot of a page: the node rewrites it alone.
    OlderSlot { page: u64 },
    /// A page's current version.
    Page {
        id: SegmentId,
        page: u64,
        lsn: u64,
        peers: Vec<PeerCopy>,
    },
}

#[derive(Debug, Clone)]
struct Damage {
    block: u64,
    kind: Kind,
    how: &'static str,
    injected_at: Millis,
    fixed: bool,
    gone: bool,
    /// Times a read found it.
    found: u32,
}

impl Damage {
    fn repairable(&self) -> bool {
        match &self.kind {
            Kind::Log { in_memory, .. } => *in_memory,
            Kind::OlderSlot { .. } => true,
            Kind::Page { peers, .. } => peers.contains(&PeerCopy::Good),
        }
    }
}

/// The fake device: areas, and the damage on it by block.
struct Model {
    layout: Layout,
    damage: BTreeMap<u64, Damage>,
    /// Every scrub_range call's outcome fails with this chance (an I/O error).
    read_error_percent: u64,
    /// Copies installed: (block, bytes, the page's good bytes).
    installed: Vec<(u64, Vec<u8>, Vec<u8>)>,
}

impl Model {
    fn area_of(&self, block: u64) -> Option<(Area, Range<u64>)> {
        if self.layout.log.contains(&block) {
            return Some((Area::Log, self.layout.log.clone()));
        }
        self.layout
            .segments
            .iter()
            .find(|(_, r)| r.contains(&block))
            .map(|(id, r)| (Area::Segment(*id), r.clone()))
    }

    fn blocks(&self) -> BTreeSet<u64> {
        let mut all: BTreeSet<u64> = self.layout.log.clone().collect();
        for (_, r) in &self.layout.segments {
            all.extend(r.clone());
        }
        all
    }

    fn scrub_range(&mut self, rng: &mut Rng, area: Area, range: Range<u64>) -> Result<Checked, String> {
        let Some((a, extent)) = self.area_of(range.start) else {
            return Err("no such area".into());
        };
        assert_eq!(a, area, "a range of {area:?} that is not in it");
        assert!(
            range.end <= extent.end,
            "range {range:?} crosses the end of {area:?} {extent:?}"
        );
        assert!(range.end - range.start <= RANGE_BLOCKS_MAX && range.start < range.end);
        if rng.chance(self.read_error_percent) {
            return Err("I/O error (injected)".into());
        }
        let mut c = Checked {
            blocks: range.end - range.start,
            pages: if area == Area::Log { 0 } else { range.end - range.start },
            ..Checked::default()
        };
        for (_, d) in self.damage.range_mut(range.clone()) {
            if d.fixed || d.gone {
                continue;
            }
            let offset = d.block * BLOCK_BYTES;
            match d.kind.clone() {
                Kind::Log { freed: true, .. } => {
                    // Released while it was read: the store says nothing.
                    d.gone = true;
                }
                Kind::Log { in_memory, .. } => {
                    d.found += 1;
                    d.fixed = in_memory;
                    c.found.push(Finding {
                        offset,
                        what: Damaged::LogBlock,
                        error: d.how.into(),
                        repaired: in_memory,
                    });
                }
                Kind::OlderSlot { page } => {
                    d.found += 1;
                    d.fixed = true;
                    c.found.push(Finding {
                        offset,
                        what: Damaged::OlderSlot { page },
                        error: d.how.into(),
                        repaired: true,
                    });
                }
                Kind::Page { id, page, lsn, .. } => {
                    d.found += 1;
                    c.found.push(Finding {
                        offset,
                        what: Damaged::PageVersion { page, lsn },
                        error: d.how.into(),
                        repaired: false,
                    });
                    c.need_copy.push(NeedCopy {
                        segment: id,
                        page,
                        lsn,
                        crc: crc32c::crc32c(&page_bytes(id, page, lsn)),
                        offset,
                    });
                }
            }
        }
        Ok(c)
    }

    fn peers(&self, id: SegmentId) -> Vec<Peer> {
        (0..5u64)
            .map(|i| (u64::from(id.pg) * 10 + i, ([127, 0, 0, 1], 7000 + i as u16).into()))
            .collect()
    }

    /// What `peer` answers for the page, and the installing of it.
    fn fetch(&mut self, need: NeedCopy, peer: Peer) -> CopyOutcome {
        let block = need.offset / BLOCK_BYTES;
        let Some(d) = self.damage.get(&block) else {
            return CopyOutcome::Failed("no such page".into());
        };
        let Kind::Page { id, page, lsn, peers } = &d.kind else {
            panic!("a copy asked for block {block}, which is not a page");
        };
        assert_eq!((need.segment, need.page, need.lsn), (*id, *page, *lsn));
        let index = (peer.0 - u64::from(id.pg) * 10) as usize;
        let bytes = match peers[index] {
            PeerCopy::Good => page_bytes(*id, *page, *lsn),
            PeerCopy::Damaged => {
                let mut b = page_bytes(*id, *page, *lsn);
                b[5] ^= 0x04;
                b
            }
            PeerCopy::Absent => return CopyOutcome::Failed(format!("no version of page {page} at LSN {lsn}")),
            PeerCopy::Slow => return CopyOutcome::Failed("did not answer in time".into()),
        };
        // install_copy: only a copy that verifies is written.
        if crc32c::crc32c(&bytes) != need.crc {
            return CopyOutcome::Failed("CRC mismatch".into());
        }
        let good = page_bytes(*id, *page, *lsn);
        let d = self.damage.get_mut(&block).expect("present");
        d.fixed = true;
        self.installed.push((block, bytes, good));
        CopyOutcome::Installed
    }
}

/// A layout: the log after the metadata area, then segment extents with
/// gaps between them, of uneven sizes (not multiples of a range).
fn make_layout(rng: &mut Rng, segments: u32) -> Layout {
    let log = 256..256 + 300 + rng.below(500);
    let mut at = log.end + rng.below(40);
    let mut segs = Vec::new();
    for pg in 0..segments {
        let len = 1 + rng.below(700);
        segs.push((seg(pg), at..at + len));
        at += len + rng.below(30);
    }
    // Not in device order: the core sorts.
    let n = segs.len();
    if n > 1 {
        let i = rng.below(n as u64) as usize;
        segs.swap(0, i);
    }
    Layout { log, segments: segs }
}

/// Damage of every kind at random places; at most 2 of a page's 6 copies
/// damaged (this node's and one peer's), unless no peer is to have a good one.
fn inject(rng: &mut Rng, model: &mut Model, count: usize, now: Millis) {
    let blocks: Vec<u64> = model.blocks().into_iter().collect();
    let hows = ["bit flip", "lost write", "misdirected write"];
    for _ in 0..count {
        let block = blocks[rng.below(blocks.len() as u64) as usize];
        if model.damage.get(&block).is_some_and(|d| !d.fixed && !d.gone) {
            continue;
        }
        let how = hows[rng.below(3) as usize];
        let (area, extent) = model.area_of(block).expect("in the layout");
        let kind = match area {
            Area::Log => Kind::Log {
                in_memory: rng.chance(40),
                freed: rng.chance(15),
            },
            Area::Segment(id) => {
                let page = block - extent.start;
                if rng.chance(20) {
                    Kind::OlderSlot { page }
                } else {
                    let mut peers = vec![PeerCopy::Good; 5];
                    if rng.chance(30) {
                        // No good copy anywhere: gone, slow, or one damaged.
                        for p in peers.iter_mut() {
                            *p = if rng.chance(50) {
                                PeerCopy::Absent
                            } else {
                                PeerCopy::Slow
                            };
                        }
                        peers[rng.below(5) as usize] = PeerCopy::Damaged;
                    } else {
                        // One damaged copy at most; some peers lack it or are slow.
                        let good = rng.below(5) as usize;
                        for (i, p) in peers.iter_mut().enumerate() {
                            if i != good && rng.chance(30) {
                                *p = if rng.chance(50) {
                                    PeerCopy::Absent
                                } else {
                                    PeerCopy::Slow
                                };
                            }
                        }
                        let bad = rng.below(5) as usize;
                        if bad != good && rng.chance(60) {
                            peers[bad] = PeerCopy::Damaged;
                        }
                    }
                    Kind::Page {
                        id,
                        page,
                        lsn: 1000 + rng.below(1 << 20),
                        peers,
                    }
                }
            }
        };
        model.damage.insert(
            block,
            Damage {
                block,
                kind,
                how,
                injected_at: now,
                fixed: false,
                gone: false,
                found: 0,
            },
        );
    }
}

enum Event {
    Scrubbed(u64, Result<Checked, String>),
    Copy(u64, CopyOutcome),
    Persisted,
}

/// One scrub issued: when, for which pass, what.
#[derive(Debug, Clone)]
struct Issued {
    at: Millis,
    pass: u64,
    range: Range<u64>,
}

/// The simulated node: a core, its device, its peers, its clock, restarts.
struct Sim {
    rng: Rng,
    config: ScrubConfig,
    core: ScrubCore,
    model: Model,
    now: Millis,
    events: Vec<(Millis, u64, Event)>,
    event_seq: u64,
    meta: [Vec<u8>; 2],
    counter: u64,
    /// The write out: (counter, block, bytes).
    persist_out: Option<(u64, u64, Vec<u8>)>,
    restarts: u32,
    restart_percent: u64,
    issued: Vec<Issued>,
    /// Ranges whose outcome came back, per pass (what the pass read).
    done: HashMap<u64, Vec<Range<u64>>>,
    /// Ranges out by id: (pass, range).
    out: HashMap<u64, (u64, Range<u64>)>,
    /// Blocks whose range's outcome the core took (read, or passed
    /// over), per pass.
    delivered: HashMap<u64, BTreeSet<u64>>,
    /// Ranges out at once, at most.
    out_max: usize,
    /// Check every progress kept against what was read (with a layout
    /// that does not change: an area added behind the cursor is not read
    /// in the pass).
    check_kept: bool,
    finished: Vec<PassReport>,
    left: Vec<(Area, Finding)>,
    repaired: Vec<(Area, Finding)>,
    /// Peers asked per repair (of an incarnation), in order.
    asked: HashMap<(u32, u64), Vec<u64>>,
    fetches_out: usize,
    /// Time the first range of each pass went out.
    pass_started: BTreeMap<u64, Millis>,
    /// Restarts while each pass ran.
    pass_restarts: HashMap<u64, u32>,
    running: Option<u64>,
}

impl Sim {
    fn new(seed: u64, config: ScrubConfig, model: Model) -> Sim {
        let mut core = ScrubCore::new(config.clone(), seed, 0, 1_700_000_000_000);
        core.restore(0, progress::Progress::default());
        Sim {
            rng: Rng(seed),
            config,
            core,
            model,
            now: 0,
            events: Vec::new(),
            event_seq: 0,
            meta: [vec![0; BLOCK_SIZE], vec![0; BLOCK_SIZE]],
            counter: 0,
            persist_out: None,
            restarts: 0,
            restart_percent: 0,
            issued: Vec::new(),
            done: HashMap::new(),
            out: HashMap::new(),
            delivered: HashMap::new(),
            out_max: 0,
            check_kept: false,
            finished: Vec::new(),
            left: Vec::new(),
            repaired: Vec::new(),
            asked: HashMap::new(),
            fetches_out: 0,
            pass_started: BTreeMap::new(),
            pass_restarts: HashMap::new(),
            running: None,
        }
    }

    fn schedule(&mut self, after: Millis, e: Event) {
        self.event_seq += 1;
        self.events.push((self.now + after, self.event_seq, e));
    }

    fn take(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Scrub { id, pass, area, range } => {
                    self.pass_started.entry(pass).or_insert(self.now);
                    self.issued.push(Issued {
                        at: self.now,
                        pass,
                        range: range.clone(),
                    });
                    assert!(
                        self.out.insert(id, (pass, range.clone())).is_none(),
                        "range {id} out twice at once"
                    );
                    self.out_max = self.out_max.max(self.out.len());
                    assert!(
                        self.out.len() <= self.config.ranges_inflight_max,
                        "{} ranges out, at most {} allowed",
                        self.out.len(),
                        self.config.ranges_inflight_max
                    );
                    let result = self.model.scrub_range(&mut self.rng, area, range.clone());
                    if result.is_ok() {
                        self.done.entry(pass).or_default().push(range);
                    }
                    // Now and then a slow read: the ranges after it come
                    // back before it.
                    let latency = if self.rng.chance(5) {
                        1_000 + self.rng.below(10_000)
                    } else {
                        1 + self.rng.below(30)
                    };
                    self.schedule(latency, Event::Scrubbed(id, result));
                }
                Action::Fetch {
                    repair,
                    need,
                    start,
                    attempt,
                } => {
                    self.fetches_out += 1;
                    assert!(
                        self.fetches_out <= REPAIRS_INFLIGHT_MAX,
                        "more copies out than the bound"
                    );
                    let peers = self.model.peers(need.segment);
                    let outcome = match pick_peer(&peers, start, attempt) {
                        None => CopyOutcome::NoMorePeers,
                        Some(peer) => {
                            let asked = self.asked.entry((self.restarts, repair)).or_default();
                            assert!(!asked.contains(&peer.0), "peer {} asked twice for one page", peer.0);
                            asked.push(peer.0);
                            self.model.fetch(need, peer)
                        }
                    };
                    let latency = match &outcome {
                        CopyOutcome::Failed(e) if e.contains("in time") => 10_000,
                        _ => 1 + self.rng.below(50),
                    };
                    self.schedule(latency, Event::Copy(repair, outcome));
                }
                Action::Persist(p) => {
                    assert!(self.persist_out.is_none(), "two progress writes out at once");
                    self.check_kept(&p);
                    let counter = self.counter + 1;
                    let (block, bytes) = progress::encode(&p, &DEV, counter);
                    self.persist_out = Some((counter, block, bytes));
                    let latency = 1 + self.rng.below(5);
                    self.schedule(latency, Event::Persisted);
                }
                Action::Repaired { area, finding } => self.repaired.push((area, finding)),
                Action::Left { area, finding } => self.left.push((area, finding)),
                // Passed over after retries: the pass is done with it.
                Action::Unread { pass, range, .. } => {
                    self.delivered.entry(pass).or_default().extend(range.clone());
                    self.done.entry(pass).or_default().push(range);
                }
                Action::Finished(report) => {
                    self.finished.push(report);
                    self.running = None;
                }
            }
        }
    }

    fn slot(block: u64) -> usize {
        SCRUB_STATE_BLOCKS.iter().position(|&b| b == block).expect("a slot")
    }

    /// The node stops at once: what is out is lost, a progress write out
    /// lands whole, not at all, or torn.
    fn crash(&mut self) {
        if std::env::var("SCRUB_SIM_DEBUG").is_ok() {
            eprintln!("{} crash while {:?} runs", self.now, self.running);
        }
        self.restarts += 1;
        if let Some(pass) = self.running {
            *self.pass_restarts.entry(pass).or_default() += 1;
        }
        self.events.clear();
        self.out.clear();
        self.fetches_out = 0;
        if let Some((_, block, bytes)) = self.persist_out.take() {
            let i = Self::slot(block);
            match self.rng.below(3) {
                0 => {}
                1 => self.meta[i] = bytes,
                _ => {
                    let cut = 1 + self.rng.below(BLOCK_SIZE as u64 - 1) as usize;
                    self.meta[i][..cut].copy_from_slice(&bytes[..cut]);
                }
            }
        }
        let (loaded, _) = progress::choose([Some(&self.meta[0][..]), Some(&self.meta[1][..])], &DEV);
        self.counter = loaded.counter;
        let seed = self.rng.next();
        self.core = ScrubCore::new(self.config.clone(), seed, self.now, 1_700_000_000_000 + self.now);
        self.core.restore(self.now, loaded.progress);
        // The pass resumed may be an earlier one (its end was not kept yet).
        let resumed = self.core.status().running.map(|r| r.pass);
        if let Some(pass) = resumed.filter(|p| Some(*p) != self.running) {
            *self.pass_restarts.entry(pass).or_default() += 1;
        }
        self.running = resumed;
    }

    fn deliver(&mut self, e: Event) {
        match e {
            Event::Scrubbed(id, result) => {
                let (pass, range) = self.out.remove(&id).expect("an outcome of a range out");
                if result.is_ok() {
                    self.delivered.entry(pass).or_default().extend(range);
                }
                let a = self.core.on_scrubbed(self.now, id, result);
                self.take(a);
            }
            Event::Copy(repair, outcome) => {
                self.fetches_out -= 1;
                let a = self.core.on_copy(repair, outcome);
                self.take(a);
            }
            Event::Persisted => {
                let (counter, block, bytes) = self.persist_out.take().expect("a write out");
                self.meta[Self::slot(block)] = bytes;
                self.counter = counter;
                self.core.on_persisted(self.now, Ok(()));
            }
        }
    }

    /// Run until `until` (simulated ms) or `stop` says so.
    fn run(&mut self, until: Millis, mut stop: impl FnMut(&Sim) -> bool) {
        let mut sampled_at = 0;
        let mut steps = 0u64;
        while self.now < until && !stop(self) {
            steps += 1;
            assert!(steps < 10_000_000, "the simulation does not move on");
            if self.now >= sampled_at + 200 {
                sampled_at = self.now;
                // The foreground: calm mostly, now and then slow.
                let appends = self.rng.below(50);
                let mean = if self.rng.chance(10) {
                    3000
                } else {
                    500 + self.rng.below(100)
                };
                self.core.observe_foreground(appends, appends * mean);
            }
            let layout = self.model.layout.clone();
            let a = self.core.poll(self.now, &layout);
            self.take(a);
            if self.running.is_none() {
                self.running = self.core.status().running.map(|r| r.pass);
            }
            if self.restart_percent > 0 && self.rng.below(1000) < self.restart_percent {
                self.crash();
                continue;
            }
            let wake = self.core.wake_at(self.now).max(self.now + 1);
            let next_event = self.events.iter().map(|(t, s, _)| (*t, *s)).min();
            match next_event {
                Some((t, seq)) if t <= wake => {
                    self.now = self.now.max(t);
                    let i = self.events.iter().position(|(_, s, _)| *s == seq).expect("present");
                    let (_, _, e) = self.events.swap_remove(i);
                    self.deliver(e);
                }
                _ => self.now = wake,
            }
        }
    }

    /// Progress about to be kept never passes a block whose range's
    /// outcome is not in: every block of the layout on the tour before the
    /// kept cursor was read (or passed over) in that pass.
    fn check_kept(&self, p: &progress::Progress) {
        let Some(t) = p.tour.as_ref().filter(|_| self.check_kept) else {
            return;
        };
        let empty = BTreeSet::new();
        let delivered = self.delivered.get(&t.pass).unwrap_or(&empty);
        let before = |b: u64| {
            if t.wrapped {
                b >= t.start_block || b < t.cursor
            } else {
                b >= t.start_block && b < t.cursor
            }
        };
        for b in self.model.blocks() {
            assert!(
                !before(b) || delivered.contains(&b),
                "progress of pass {} kept with its cursor at {} ({}), past block {b}, not read yet",
                t.pass,
                t.cursor,
                if t.wrapped { "second leg" } else { "first leg" }
            );
        }
    }

    /// Bytes issued in any window of time exceed `rate` × its length by
    /// at most `burst`.
    fn check_pace(&self, issued: &[Issued], rate_bytes_per_s: f64, burst: u64) {
        for i in 0..issued.len() {
            let mut bytes = 0u64;
            for j in i..issued.len() {
                bytes += (issued[j].range.end - issued[j].range.start) * BLOCK_BYTES;
                let window_ms = issued[j].at - issued[i].at;
                let allowed = rate_bytes_per_s * window_ms as f64 / 1000.0 + burst as f64 + 1.0;
                assert!(
                    bytes as f64 <= allowed,
                    "{bytes} bytes issued from {} ms to {} ms, at most {allowed} allowed",
                    issued[i].at,
                    issued[j].at
                );
            }
        }
    }
}

fn config(period_s: u64, rate: u64) -> ScrubConfig {
    ScrubConfig {
        pass_period: Duration::from_secs(period_s),
        rate_bytes_per_s_max: rate,
        enabled: true,
        ranges_inflight_max: RANGES_INFLIGHT_DEFAULT,
    }
}

fn blocks_of(ranges: &[Range<u64>]) -> Vec<u64> {
    let mut v: Vec<u64> = ranges.iter().flat_map(|r| r.clone()).collect();
    v.sort_unstable();
    v
}

/// `got` and `want` hold the same blocks; says which differ if not.
fn same_blocks(got: &[u64], want: &[u64], what: &str) {
    if got != want {
        let g: BTreeSet<u64> = got.iter().copied().collect();
        let w: BTreeSet<u64> = want.iter().copied().collect();
        let missing: Vec<&u64> = w.difference(&g).take(8).collect();
        let extra: Vec<&u64> = g.difference(&w).take(8).collect();
        panic!(
            "{what}: {} blocks, {} wanted; missing {missing:?}..., extra {extra:?}..., repeated {}",
            got.len(),
            want.len(),
            got.len() - g.len()
        );
    }
}

/// Damage found within one pass, repaired if anything could repair it,
/// left and reported with its location otherwise; pace kept; every block
/// read once a pass; with restarts at random moments.
#[test]
fn background_passes_find_and_repair_damage_across_restarts() {
    let mut overlapped = 0;
    for seed in seeds() {
        let mut rng = Rng(seed);
        let segments = 2 + rng.below(6) as u32;
        let layout = make_layout(&mut rng, segments);
        let mut model = Model {
            layout,
            damage: BTreeMap::new(),
            read_error_percent: if rng.chance(30) { 5 } else { 0 },
            installed: Vec::new(),
        };
        let count = 4 + rng.below(20) as usize;
        inject(&mut rng, &mut model, count, 0);
        let total_bytes = model.blocks().len() as u64 * BLOCK_BYTES;
        // A pass in about 40 s unless the ceiling is lower.
        // The ceiling binds in a third of the seeds (several ranges out).
        let ceiling = match rng.below(3) {
            0 => 1 << 20,
            1 => 64 << 20,
            _ => (total_bytes / 80).max(BLOCK_BYTES),
        };
        let mut cfg = config(40, ceiling);
        // Any depth a config may set, the default's among them.
        cfg.ranges_inflight_max = 1 + rng.below(RANGES_INFLIGHT_LIMIT as u64) as usize;
        let mut sim = Sim::new(seed, cfg.clone(), model);
        sim.check_kept = true;
        sim.restart_percent = if rng.chance(70) { 1 + rng.below(3) } else { 0 };
        // Damage arrives now and then while passes run.
        let mut injected_at = 0;
        while sim.finished.len() < 3 && sim.now < 3_600_000 {
            let until = sim.now + 5_000;
            sim.run(until, |s| s.finished.len() >= 3);
            if sim.finished.len() < 2 && sim.now >= injected_at + 20_000 {
                injected_at = sim.now;
                let count = 1 + rng.below(4) as usize;
                let now = sim.now;
                inject(&mut rng, &mut sim.model, count, now);
            }
        }
        assert!(
            sim.finished.len() >= 3,
            "seed {seed}: 3 passes did not finish in an hour"
        );
        // Then no more restarts or read errors: a last pass to see every
        // outcome settle.
        sim.restart_percent = 0;
        sim.model.read_error_percent = 0;
        let want = sim.finished.len() + 2;
        sim.run(u64::MAX, |s| s.finished.len() >= want);

        let blocks: Vec<u64> = sim.model.blocks().into_iter().collect();
        for report in &sim.finished {
            assert!(!report.priority);
            // Every block of the layout read in the pass, and a bounded
            // amount read again after each restart.
            let done = blocks_of(&sim.done[&report.pass]);
            let mut unique = done.clone();
            unique.dedup();
            same_blocks(&unique, &blocks, &format!("seed {seed}: pass {}", report.pass));
            let restarts = u64::from(sim.pass_restarts.get(&report.pass).copied().unwrap_or(0));
            let reread = (done.len() - unique.len()) as u64 * BLOCK_BYTES;
            // What was read since the last kept progress, twice (a torn
            // write loses one), plus the ranges out and those done past
            // the kept cursor.
            let ranges = 1 + cfg.ranges_inflight_max as u64;
            let per_restart = 2
                * (ceiling.min(total_bytes / 40 + 1) * PERSIST_INTERVAL_MS / 1000
                    + ranges * RANGE_BLOCKS_MAX * BLOCK_BYTES);
            if reread > restarts * per_restart && std::env::var("SCRUB_SIM_DEBUG").is_ok() {
                let mut seen = BTreeSet::new();
                for i in sim.issued.iter().filter(|i| i.pass == report.pass) {
                    let dup = i.range.clone().any(|b| !seen.insert(b));
                    eprintln!("{} {:?}{}", i.at, i.range, if dup { " again" } else { "" });
                }
            }
            assert!(
                reread <= restarts * per_restart,
                "seed {seed}: pass {} read {reread} bytes again over {restarts} restarts",
                report.pass
            );
        }
        // Found within one pass: damage there before a pass's first range
        // was found by its end (unless freed meanwhile).
        let last_start = *sim.pass_started.values().last().expect("passes");
        for d in sim.model.damage.values() {
            if d.gone {
                continue;
            }
            if d.injected_at < last_start {
                assert!(d.found > 0, "seed {seed}: {d:?} never found");
            }
        }
        // Repaired where anything could repair it, else left with its location.
        for d in sim.model.damage.values() {
            if d.gone || d.found == 0 {
                continue;
            }
            if d.repairable() {
                assert!(d.fixed, "seed {seed}: {d:?} was repairable and is not repaired");
            } else {
                assert!(!d.fixed);
                let offset = d.block * BLOCK_BYTES;
                let left = sim.left.iter().find(|(_, f)| f.offset == offset);
                let Some((area, f)) = left else {
                    panic!("seed {seed}: {d:?} not reported as left");
                };
                assert_eq!(Some(*area), sim.model.area_of(d.block).map(|(a, _)| a));
                if let Kind::Page { page, lsn, .. } = d.kind {
                    assert_eq!(f.what, Damaged::PageVersion { page, lsn });
                    assert!(f.error.contains("no peer has a good copy"), "{}", f.error);
                }
                // The last pass lists it (few enough to be listed).
                let last = sim.finished.last().expect("a pass");
                let listed = last
                    .areas
                    .iter()
                    .any(|(_, r)| r.left.iter().any(|f| f.offset == offset));
                assert!(listed, "seed {seed}: the last pass does not list {d:?}");
            }
        }
        // Only copies that verify were installed.
        for (block, bytes, good) in &sim.model.installed {
            assert_eq!(bytes, good, "seed {seed}: a bad copy installed at block {block}");
        }
        // Left now: what the last pass left, and no more.
        let status = sim.core.status();
        let left_last: u64 = sim
            .finished
            .last()
            .expect("a pass")
            .areas
            .iter()
            .map(|(_, r)| r.found - r.repaired)
            .sum();
        let unfixed = sim
            .model
            .damage
            .values()
            .filter(|d| !d.gone && !d.fixed && d.found > 0)
            .count() as u64;
        assert_eq!(left_last, unfixed, "seed {seed}");
        assert!(
            status.left_now >= unfixed,
            "seed {seed}: left_now {} < {unfixed}",
            status.left_now
        );
        // Pace: never above the background rate (a range saved up at
        // most; as many as may be out where the ceiling binds).
        let rate = (ceiling as f64).min(total_bytes as f64 / 40.0);
        let burst = if total_bytes as f64 / 40.0 >= ceiling as f64 {
            cfg.ranges_inflight_max as u64
        } else {
            1
        };
        sim.check_pace(&sim.issued, rate, burst * RANGE_BLOCKS_MAX * BLOCK_BYTES);
        if sim.out_max > 1 {
            overlapped += 1;
        }
    }
    // The seeds cover ranges out at once (outcomes out of order).
    assert!(
        overlapped > 0 || seeds().len() < 16,
        "no seed had two ranges out at once"
    );
}

/// A priority pass reads the log and the chosen segments, each block once,
/// at the ceiling; the background pass waits and resumes where it was.
#[test]
fn priority_pass_covers_exactly_its_filter_and_the_background_resumes() {
    for seed in seeds() {
        let mut rng = Rng(seed ^ 0xabc);
        let layout = make_layout(&mut rng, 5);
        let model = Model {
            layout: layout.clone(),
            damage: BTreeMap::new(),
            read_error_percent: 0,
            installed: Vec::new(),
        };
        let ceiling = 4 << 20;
        let mut cfg = config(600, ceiling);
        // Any depth a config may set, the default's among them.
        cfg.ranges_inflight_max = 1 + rng.below(RANGES_INFLIGHT_LIMIT as u64) as usize;
        let mut sim = Sim::new(seed, cfg.clone(), model);
        // The background pass gets going.
        let t = 1_000 + rng.below(60_000);
        sim.run(t, |_| false);
        let background = sim.core.status().running.expect("a background pass").pass;
        let chosen = vec![seg(1), seg(3)];
        let n = sim.core.request(Filter::Segments(chosen.clone())).expect("loaded");
        assert!(n > background);
        // Covered by the running (or about to run) pass: its number.
        assert_eq!(sim.core.request(Filter::Segments(vec![seg(3)])), Some(n));
        let issued_before = sim.issued.len();
        sim.run(u64::MAX, |s| s.finished.iter().any(|r| r.pass == n));
        // Asked while it runs and not covered: one pass after it.
        let report = sim.finished.iter().find(|r| r.pass == n).expect("finished").clone();
        assert!(report.priority);
        let mut want: Vec<u64> = layout.log.clone().collect();
        for (id, r) in &layout.segments {
            if chosen.contains(id) {
                want.extend(r.clone());
            }
        }
        want.sort_unstable();
        same_blocks(&blocks_of(&sim.done[&n]), &want, &format!("seed {seed}: priority pass"));
        let areas: Vec<Area> = report.areas.iter().map(|(a, _)| *a).collect();
        assert!(
            areas
                .iter()
                .all(|a| *a == Area::Log || chosen.iter().any(|id| *a == Area::Segment(*id)))
        );
        assert_eq!(report.bytes_read, want.len() as u64 * BLOCK_BYTES);
        // No background range while it ran (the one out may finish).
        let last_p = sim.issued.iter().rposition(|i| i.pass == n).expect("issued");
        let during: Vec<&Issued> = sim.issued[issued_before..=last_p]
            .iter()
            .filter(|i| i.pass == background)
            .collect();
        assert!(
            during.is_empty(),
            "seed {seed}: background read while a priority pass ran"
        );
        // Priority at the ceiling, never above.
        let prio: Vec<Issued> = sim.issued.iter().filter(|i| i.pass == n).cloned().collect();
        sim.check_pace(
            &prio,
            ceiling as f64,
            cfg.ranges_inflight_max as u64 * RANGE_BLOCKS_MAX * BLOCK_BYTES,
        );
        // The background pass goes on and reads every block once.
        sim.run(u64::MAX, |s| s.finished.iter().any(|r| r.pass == background));
        let mut all: Vec<u64> = sim.model.blocks().into_iter().collect();
        all.sort_unstable();
        same_blocks(
            &blocks_of(&sim.done[&background]),
            &all,
            &format!("seed {seed}: background pass"),
        );
    }
}

#[test]
fn requests_while_a_priority_pass_runs_join_one_queued_pass() {
    let mut rng = Rng(5);
    let layout = make_layout(&mut rng, 4);
    let model = Model {
        layout,
        damage: BTreeMap::new(),
        read_error_percent: 0,
        installed: Vec::new(),
    };
    let mut sim = Sim::new(5, config(600, 1 << 20), model);
    sim.run(10, |_| false);
    let a = sim.core.request(Filter::Segments(vec![seg(0)])).expect("loaded");
    sim.run(sim.now + 5, |_| false);
    assert_eq!(sim.core.status().running.expect("running").pass, a);
    assert_eq!(sim.core.request(Filter::Segments(vec![seg(0)])), Some(a));
    let b = sim.core.request(Filter::Segments(vec![seg(1)])).expect("loaded");
    assert_eq!(b, a + 1);
    assert_eq!(sim.core.request(Filter::Segments(vec![seg(2)])), Some(b));
    // All covers everything; it joins the queued pass too.
    assert_eq!(sim.core.request(Filter::All), Some(b));
    sim.run(u64::MAX, |s| s.finished.iter().any(|r| r.pass == b));
    let all: Vec<u64> = {
        let mut v: Vec<u64> = sim.model.blocks().into_iter().collect();
        v.sort_unstable();
        v
    };
    same_blocks(&blocks_of(&sim.done[&b]), &all, "the queued pass");
    // Not loaded: no number.
    let mut fresh = ScrubCore::new(config(600, 1 << 20), 1, 0, 0);
    assert_eq!(fresh.request(Filter::All), None);
}

/// A segment gone mid-pass is dropped from it; one added ahead is read.
#[test]
fn segments_come_and_go_mid_pass() {
    for seed in seeds() {
        let mut rng = Rng(seed ^ 0x5e9);
        let layout = make_layout(&mut rng, 4);
        let model = Model {
            layout,
            damage: BTreeMap::new(),
            read_error_percent: 0,
            installed: Vec::new(),
        };
        let mut sim = Sim::new(seed, config(60, 64 << 20), model);
        let k = 1 + rng.below(10) as usize;
        sim.run(u64::MAX, |s| s.issued.len() >= k);
        let pass = sim.issued.last().expect("issued").pass;
        assert_eq!(sim.core.status().running.map(|r| r.pass), Some(pass));
        let issued: Vec<&Issued> = sim.issued.iter().filter(|i| i.pass == pass).collect();
        let start = issued[0].range.start;
        let wrapped = issued.iter().any(|i| i.range.start < start);
        // The first leg read to its end: the tour may have turned already.
        let first_leg: Vec<u64> = sim.model.blocks().into_iter().filter(|&b| b >= start).collect();
        let turning = sim.done.get(&pass).is_some_and(|d| {
            let d = blocks_of(d);
            first_leg.iter().all(|b| d.binary_search(b).is_ok())
        });
        let end = sim
            .model
            .layout
            .segments
            .iter()
            .map(|(_, r)| r.end)
            .max()
            .unwrap_or(0)
            .max(sim.model.layout.log.end);
        let removed = sim.model.layout.segments.remove(rng.below(4) as usize);
        let added = (seg(99), end + 10..end + 300);
        sim.model.layout.segments.push(added.clone());
        let before: BTreeSet<u64> = sim
            .done
            .get(&pass)
            .map(|d| blocks_of(d))
            .unwrap_or_default()
            .into_iter()
            .collect();
        sim.run(u64::MAX, |s| s.finished.iter().any(|r| r.pass == pass));
        let done = blocks_of(&sim.done[&pass]);
        let mut unique = done.clone();
        unique.dedup();
        assert_eq!(unique.len(), done.len(), "seed {seed}: a block read twice");
        for b in &done {
            if removed.1.contains(b) {
                assert!(
                    before.contains(b),
                    "seed {seed}: block {b} of a removed segment read after it went"
                );
            }
        }
        for b in sim.model.blocks() {
            if !added.1.contains(&b) {
                assert!(done.binary_search(&b).is_ok(), "seed {seed}: block {b} not read");
            }
        }
        // `added` lies after every other area: ahead of the cursor unless
        // the pass was already on its second leg.
        let read = added.1.clone().filter(|b| done.binary_search(b).is_ok()).count() as u64;
        let all = added.1.end - added.1.start;
        if wrapped {
            assert_eq!(read, 0, "seed {seed}: read behind the cursor");
        } else if turning {
            assert!(read == 0 || read == all, "seed {seed}: {read} of {all}");
        } else {
            assert_eq!(read, all, "seed {seed}: the segment added ahead not read");
        }
    }
}

#[test]
fn pace_backs_off_on_foreground_latency_and_recovers() {
    let layout = Layout {
        log: 256..1256,
        segments: vec![(seg(0), 2000..10_000)],
    };
    let ceiling = 64 << 20;
    let mut core = ScrubCore::new(config(10, ceiling), 1, 0, 0);
    core.restore(0, progress::Progress::default());
    let _ = core.poll(0, &layout);
    let full = core.rate_bytes_per_s();
    let background = (9000 * BLOCK_BYTES) as f64 / 10.0;
    assert!((full - background).abs() < 1.0, "{full} {background}");
    // The baseline, then the foreground slows: halve, down to the floor.
    core.observe_foreground(100, 100 * 500);
    for _ in 0..20 {
        core.observe_foreground(100, 100 * 1000);
    }
    assert!((core.rate_bytes_per_s() - full * BACKGROUND_FACTOR_MIN).abs() < 1.0);
    // A priority pass backs off too, never below an eighth of the ceiling.
    let n = core.request(Filter::All).expect("loaded");
    let actions = core.poll(1, &layout);
    assert!(
        actions
            .iter()
            .all(|a| !matches!(a, Action::Scrub { pass, .. } if *pass != n))
    );
    assert!((core.rate_bytes_per_s() - ceiling as f64 * PRIORITY_FACTOR_MIN).abs() < 1.0);
    // Calm again: back up step by step.
    let mut previous = core.rate_bytes_per_s();
    let mut steps = 0;
    while core.rate_bytes_per_s() < ceiling as f64 {
        core.observe_foreground(100, 100 * 500);
        assert!(core.rate_bytes_per_s() >= previous);
        previous = core.rate_bytes_per_s();
        steps += 1;
        assert!(steps < 100);
    }
    assert!(steps > 1, "recovered at once");
}

#[test]
fn a_read_that_fails_is_tried_again_then_passed_over() {
    let layout = Layout {
        log: 256..300,
        segments: vec![],
    };
    let mut core = ScrubCore::new(config(1, 64 << 20), 1, 0, 0);
    core.restore(0, progress::Progress::default());
    let mut now = 0;
    let mut unread = 0;
    let mut scrubs = 0;
    for _ in 0..10_000 {
        let actions = core.poll(now, &layout);
        for a in actions {
            match a {
                Action::Scrub { id, .. } => {
                    scrubs += 1;
                    for b in core.on_scrubbed(now, id, Err("I/O error".into())) {
                        if matches!(b, Action::Unread { .. }) {
                            unread += 1;
                        }
                    }
                }
                Action::Persist(_) => core.on_persisted(now, Ok(())),
                Action::Finished(_) => {
                    assert!(unread >= 1 && scrubs >= 3, "{unread} {scrubs}");
                    return;
                }
                _ => {}
            }
        }
        now = core.wake_at(now).max(now + 1);
    }
    panic!("the pass never ended");
}

/// The ranges a step sent out: (id, range).
fn scrubs(actions: &[Action]) -> Vec<(u64, Range<u64>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Scrub { id, range, .. } => Some((*id, range.clone())),
            _ => None,
        })
        .collect()
}

fn read_clean(blocks: &Range<u64>) -> Result<Checked, String> {
    Ok(Checked {
        blocks: blocks.end - blocks.start,
        ..Checked::default()
    })
}

/// At full speed the device reads the next ranges while the node verifies
/// one: four out at once (by default), not more; one at a pace, and one
/// while the foreground is slowed down.
#[test]
fn four_ranges_are_out_at_full_speed_and_one_at_a_pace() {
    assert_eq!(ScrubConfig::default().ranges_inflight_max, 4);
    let layout = Layout {
        log: 256..4352,
        segments: vec![(seg(0), 5000..9000)],
    };
    // A priority pass at a ceiling that does not bind.
    let mut core = ScrubCore::new(config(86_400, 64 << 30), 1, 0, 0);
    core.restore(0, progress::Progress::default());
    let n = core.request(Filter::All).expect("loaded");
    // The bucket fills at the pass's rate from when it starts.
    assert!(scrubs(&core.poll(0, &layout)).is_empty());
    let out = scrubs(&core.poll(10, &layout));
    assert_eq!(out.len(), 4, "{out:?}");
    for pair in out.windows(2) {
        assert_eq!(pair[0].1.end, pair[1].1.start, "each follows the one before");
    }
    assert!(scrubs(&core.poll(20, &layout)).is_empty(), "a fifth while four are out");
    // The second back first: it holds its place until the first is back
    // (a window), then two more go out, after the last.
    let _ = core.on_scrubbed(20, out[1].0, read_clean(&out[1].1));
    assert!(scrubs(&core.poll(21, &layout)).is_empty());
    let _ = core.on_scrubbed(22, out[0].0, read_clean(&out[0].1));
    let more = scrubs(&core.poll(23, &layout));
    assert_eq!(more.len(), 2, "{more:?}");
    assert_eq!(more[0].1.start, out[3].1.end);
    assert_eq!(core.status().running.map(|r| r.pass), Some(n));

    // The foreground slows down: one at a time.
    core.observe_foreground(100, 100 * 500);
    core.observe_foreground(100, 100 * 1000);
    for (id, range) in out[2..].iter().chain(&more) {
        let _ = core.on_scrubbed(30, *id, read_clean(range));
    }
    let slow = scrubs(&core.poll(1_000, &layout));
    assert_eq!(slow.len(), 1, "{slow:?}");
    assert!(scrubs(&core.poll(2_000, &layout)).is_empty());

    // The background pass at its pace (the device in a day): one out, even
    // with time to have saved up many.
    let mut core = ScrubCore::new(config(86_400, 256 << 20), 2, 0, 0);
    core.restore(0, progress::Progress::default());
    let mut now = 0;
    let mut out = Vec::new();
    while out.is_empty() {
        now += 60_000;
        out = scrubs(&core.poll(now, &layout));
    }
    assert_eq!(out.len(), 1);
    assert!(scrubs(&core.poll(now + 3_600_000, &layout)).is_empty());

    // Configured to one: one at full speed too.
    let mut cfg = config(86_400, 64 << 30);
    cfg.ranges_inflight_max = 1;
    let mut core = ScrubCore::new(cfg, 3, 0, 0);
    core.restore(0, progress::Progress::default());
    core.request(Filter::All).expect("loaded");
    let _ = core.poll(0, &layout);
    assert_eq!(scrubs(&core.poll(10, &layout)).len(), 1);
    assert!(scrubs(&core.poll(20, &layout)).is_empty());
}

/// Outcomes back out of order: the progress kept never passes a range
/// still out, nor one waiting to be read again after a failure.
#[test]
fn the_kept_cursor_never_passes_a_range_still_out() {
    // 80 MB read in a second: the ceiling binds, two go out (at most two).
    let layout = Layout {
        log: 256..20_256,
        segments: vec![],
    };
    let mut cfg = config(1, 64 << 20);
    cfg.ranges_inflight_max = 2;
    let mut core = ScrubCore::new(cfg, 9, 0, 0);
    core.restore(0, progress::Progress::default());
    let out = scrubs(&core.poll(100, &layout));
    assert_eq!(out.len(), 2, "{out:?}");
    let ((a, ra), (b, rb)) = (out[0].clone(), out[1].clone());
    let kept = |core: &ScrubCore| core.progress().tour.expect("a pass");
    let start = kept(&core).cursor;
    assert_eq!(start, ra.start);
    // The second is done: the cursor stays before the first.
    let _ = core.on_scrubbed(101, b, read_clean(&rb));
    assert_eq!(kept(&core).cursor, start);
    assert_eq!(kept(&core).bytes_done, 0);
    // The first fails: it is read again later, the cursor still waits,
    // and no third range takes its place meanwhile.
    let _ = core.on_scrubbed(102, a, Err("EIO".into()));
    assert_eq!(kept(&core).cursor, start);
    assert!(scrubs(&core.poll(103, &layout)).is_empty());
    let again = scrubs(&core.poll(1_200, &layout));
    assert_eq!(again, vec![(a, ra.clone())]);
    assert_eq!(kept(&core).cursor, start);
    // Both done: the cursor passes both, their bytes counted once.
    let _ = core.on_scrubbed(1_201, a, read_clean(&ra));
    let k = kept(&core);
    assert_eq!(k.cursor, rb.end);
    assert_eq!(k.bytes_done, (ra.end - ra.start + rb.end - rb.start) * BLOCK_BYTES);
}

/// Progress kept and read back through the slots: the pass goes on.
#[test]
fn progress_round_trips_through_the_core() {
    let layout = Layout {
        log: 256..1256,
        segments: vec![(seg(0), 2000..3000)],
    };
    let mut core = ScrubCore::new(config(10, 64 << 20), 7, 0, 1_700_000_000_000);
    core.restore(0, progress::Progress::default());
    let mut now = 0;
    while core.status().running.map_or(0, |r| r.bytes_done) < 100 * BLOCK_BYTES {
        for a in core.poll(now, &layout) {
            match a {
                Action::Scrub { id, .. } => {
                    let _ = core.on_scrubbed(now, id, Ok(Checked::default()));
                }
                Action::Persist(_) => core.on_persisted(now, Ok(())),
                _ => {}
            }
        }
        now = core.wake_at(now).max(now + 1);
    }
    let kept = core.progress();
    let tour = kept.tour.clone().expect("a tour");
    let (block, bytes) = progress::encode(&kept, &DEV, 3);
    let (_, back) = progress::decode(&bytes, &DEV, block).expect("valid");
    let mut again = ScrubCore::new(config(10, 64 << 20), 8, now, 1_700_000_000_000 + now);
    again.restore(now, back);
    // The bucket starts empty: nothing is read at once.
    let actions = again.poll(now, &layout);
    assert!(
        actions.iter().all(|a| !matches!(a, Action::Scrub { .. })),
        "{actions:?}"
    );
    let running = again.status().running.expect("resumed");
    assert_eq!(running.pass, tour.pass);
    assert_eq!(running.bytes_done, tour.bytes_done);
    assert_eq!(running.bytes_total, 2000 * BLOCK_BYTES);
    // The next range starts at the cursor.
    let actions = again.poll(now + 60_000, &layout);
    let first = actions.iter().find_map(|a| match a {
        Action::Scrub { range, .. } => Some(range.start),
        _ => None,
    });
    assert_eq!(first, Some(tour.cursor));
    // A new pass after it gets the next number.
    assert_eq!(again.request(Filter::All), Some(tour.pass + 1));
}

/// A device that refuses progress writes is asked again now and then, not
/// in a loop; the pass goes on meanwhile and the next write that works
/// keeps where it is.
#[test]
fn a_failed_progress_write_is_tried_again_later() {
    let layout = Layout {
        log: 256..2256,
        segments: vec![],
    };
    let mut core = ScrubCore::new(config(100, 64 << 20), 3, 0, 0);
    core.restore(0, progress::Progress::default());
    let mut now = 0;
    let mut writes = 0;
    let mut kept = None;
    while now < 30_000 {
        let mut actions = core.poll(now, &layout);
        while let Some(a) = actions.pop() {
            match a {
                Action::Scrub { id, .. } => actions.extend(core.on_scrubbed(now, id, Ok(Checked::default()))),
                Action::Persist(p) => {
                    writes += 1;
                    if now < 20_000 {
                        core.on_persisted(now, Err("EIO".into()));
                    } else {
                        kept = Some(p);
                        core.on_persisted(now, Ok(()));
                    }
                }
                _ => {}
            }
        }
        now = core.wake_at(now).max(now + 1);
    }
    // About one a second while it fails, then few.
    assert!((15..=30).contains(&writes), "{writes} writes");
    let kept = kept.expect("a write that worked");
    assert!(kept.tour.expect("a pass").bytes_done > 0);
}

/// With the tour disabled, a pass kept from before waits (and is kept);
/// priority passes still run.
#[test]
fn a_disabled_tour_keeps_its_pass_and_priority_passes_run() {
    let layout = Layout {
        log: 256..1256,
        segments: vec![(seg(0), 2000..2500)],
    };
    let kept = progress::Progress {
        passes: 7,
        tour: Some(progress::TourProgress {
            pass: 7,
            start_block: 600,
            cursor: 900,
            ..progress::TourProgress::default()
        }),
        last: None,
    };
    let mut cfg = config(100, 64 << 20);
    cfg.enabled = false;
    let mut core = ScrubCore::new(cfg, 3, 0, 0);
    core.restore(0, kept);
    let mut now = 0;
    let mut priority_read = 0;
    let mut finished = Vec::new();
    while now < 60_000 {
        for a in core.poll(now, &layout) {
            match a {
                Action::Scrub { id, pass, range, .. } => {
                    assert_eq!(pass, 8, "the disabled tour read {range:?}");
                    priority_read += range.end - range.start;
                    let _ = core.on_scrubbed(now, id, Ok(Checked::default()));
                }
                Action::Persist(p) => {
                    assert_eq!(p.tour.as_ref().map(|t| (t.pass, t.cursor)), Some((7, 900)));
                    core.on_persisted(now, Ok(()));
                }
                Action::Finished(r) => finished.push(r.pass),
                _ => {}
            }
        }
        if now == 0 {
            assert_eq!(core.status().running, None);
            assert_eq!(core.request(Filter::All), Some(8));
        }
        now = core.wake_at(now).max(now + 1);
    }
    assert_eq!(finished, vec![8]);
    assert_eq!(priority_read, 1500);
    assert_eq!(core.status().running, None);
}

mod shell {
    //! The shell over a fake node and fake peers.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::super::bufs::BufPool;
    use super::super::shell::{ScrubConfig, spawn};
    use super::super::{Area, Checked, Damaged, Filter, Finding, Layout, NeedCopy, Peer, Peers, Store, progress};
    use super::{DEV, page_bytes, seg};
    use crate::io::BLOCK_SIZE;
    use crate::record::SegmentId;

    struct FakeStore {
        layout: Layout,
        /// Damaged pages by block: (segment, page, lsn).
        damaged: Mutex<HashMap<u64, (SegmentId, u64, u64)>>,
        meta: Mutex<HashMap<u64, Vec<u8>>>,
        installs_refused: AtomicU64,
        ranges: AtomicU64,
        /// This many reads of the progress slots fail first.
        meta_read_failures: AtomicU64,
    }

    impl Store for FakeStore {
        fn layout(&self) -> Layout {
            self.layout.clone()
        }
        async fn scrub_range(
            &self,
            _area: Area,
            range: std::ops::Range<u64>,
            _bufs: &BufPool,
        ) -> Result<Checked, String> {
            self.ranges.fetch_add(1, Ordering::Relaxed);
            let mut c = Checked {
                blocks: range.end - range.start,
                ..Checked::default()
            };
            for (&block, &(id, page, lsn)) in self.damaged.lock().unwrap().iter() {
                if range.contains(&block) {
                    let offset = block * 4096;
                    c.found.push(Finding {
                        offset,
                        what: Damaged::PageVersion { page, lsn },
                        error: "CRC mismatch".into(),
                        repaired: false,
                    });
                    c.need_copy.push(NeedCopy {
                        segment: id,
                        page,
                        lsn,
                        crc: crc32c::crc32c(&page_bytes(id, page, lsn)),
                        offset,
                    });
                }
            }
            Ok(c)
        }
        async fn install_copy(&self, need: NeedCopy, bytes: Vec<u8>) -> Result<(), String> {
            if crc32c::crc32c(&bytes) != need.crc {
                self.installs_refused.fetch_add(1, Ordering::Relaxed);
                return Err("CRC mismatch".into());
            }
            self.damaged.lock().unwrap().remove(&(need.offset / 4096));
            Ok(())
        }
        fn peers(&self, _id: SegmentId) -> Option<(Vec<Peer>, u64, u64)> {
            Some(((1..=3).map(|i| (i, ([127, 0, 0, 1], 7000).into())).collect(), 1, 1))
        }
        async fn read_meta_block(&self, block: u64) -> Result<Vec<u8>, String> {
            let failing = self
                .meta_read_failures
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            if failing.is_ok() {
                return Err("EIO".into());
            }
            Ok(self
                .meta
                .lock()
                .unwrap()
                .get(&block)
                .cloned()
                .unwrap_or_else(|| vec![0; BLOCK_SIZE]))
        }
        async fn write_meta_block(&self, block: u64, bytes: Vec<u8>) -> Result<(), String> {
            assert_eq!(bytes.len(), BLOCK_SIZE);
            self.meta.lock().unwrap().insert(block, bytes);
            Ok(())
        }
        fn foreground_totals(&self) -> (u64, u64) {
            (0, 0)
        }
    }

    /// Peer 1 has a damaged copy of everything, peer 2 none, peer 3 a good
    /// one, except of page 7, which nobody has.
    #[derive(Default)]
    struct FakePeers {
        damaged_sent: AtomicU64,
    }

    impl Peers for FakePeers {
        async fn page_at(
            &self,
            peer: Peer,
            id: SegmentId,
            _e: (u64, u64),
            page: u64,
            lsn: u64,
        ) -> Result<Vec<u8>, String> {
            match (peer.0, page) {
                (_, 7) | (2, _) => Err("no such version".into()),
                (1, _) => {
                    self.damaged_sent.fetch_add(1, Ordering::Relaxed);
                    let mut b = page_bytes(id, page, lsn);
                    b[0] ^= 1;
                    Ok(b)
                }
                _ => Ok(page_bytes(id, page, lsn)),
            }
        }
    }

    #[tokio::test]
    async fn shell_runs_a_priority_pass_repairs_keeps_progress_and_stops() {
        let store = Arc::new(FakeStore {
            layout: Layout {
                log: 256..512,
                segments: vec![(seg(0), 600..1100), (seg(1), 1200..1300)],
            },
            damaged: Mutex::new(HashMap::from([
                (610, (seg(0), 10, 500)),
                (607, (seg(0), 7, 501)),
                (1250, (seg(1), 50, 502)),
            ])),
            meta: Mutex::new(HashMap::new()),
            installs_refused: AtomicU64::new(0),
            ranges: AtomicU64::new(0),
            meta_read_failures: AtomicU64::new(0),
        });
        let config = ScrubConfig {
            pass_period: Duration::from_secs(3600),
            rate_bytes_per_s_max: 64 << 20,
            enabled: false,
            ..ScrubConfig::default()
        };
        let peers = Arc::new(FakePeers::default());
        let run = async {
            let handle = spawn(store.clone(), peers.clone(), config.clone(), DEV);
            handle.ready().await;
            let n = handle.request(Filter::Segments(vec![seg(0)]));
            assert_eq!(n, 1);
            let report = loop {
                let status = handle.status();
                if let Some(last) = status.last.filter(|l| l.pass == n) {
                    break last;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            assert!(report.priority);
            assert_eq!(report.bytes_read, (256 + 500) * 4096);
            let seg0 = &report
                .areas
                .iter()
                .find(|(a, _)| *a == Area::Segment(seg(0)))
                .expect("segment 0")
                .1;
            assert_eq!((seg0.found, seg0.repaired), (2, 1));
            assert_eq!(seg0.left.len(), 1);
            assert_eq!(seg0.left[0].offset, 607 * 4096);
            assert!(
                report.areas.iter().all(|(a, _)| *a != Area::Segment(seg(1))),
                "segment 1 not asked for"
            );
            let status = handle.status();
            assert_eq!((status.found_total, status.repaired_total, status.left_now), (2, 1, 1));
            handle.stop().await;
            // Each damaged copy sent was refused; the good one was taken.
            let refused = store.installs_refused.load(Ordering::Relaxed);
            assert_eq!(refused, peers.damaged_sent.load(Ordering::Relaxed));
            assert!(!store.damaged.lock().unwrap().contains_key(&610));
            // Progress kept: a new shell numbers on.
            let handle = spawn(store.clone(), peers.clone(), config.clone(), DEV);
            handle.ready().await;
            assert_eq!(handle.status().last.map(|l| l.pass), Some(n));
            let summary = handle.last_summary().expect("kept");
            assert_eq!(
                (summary.pass, summary.found, summary.repaired, summary.left),
                (n, 2, 1, 1)
            );
            assert_eq!(handle.request(Filter::All), n + 1);
            handle.stop().await;
        };
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the shell test took too long");
        let meta = store.meta.lock().unwrap();
        let slots = [meta.get(&4).map(|v| &v[..]), meta.get(&5).map(|v| &v[..])];
        let (loaded, _) = progress::choose(slots, &DEV);
        assert!(loaded.progress.passes >= 2);
    }

    /// A progress slot that fails to read once is read again: the pass
    /// numbers go on from what was kept.
    #[tokio::test]
    async fn a_slot_that_fails_to_read_once_is_read_again() {
        let kept = progress::Progress {
            passes: 41,
            tour: None,
            last: None,
        };
        let (block, bytes) = progress::encode(&kept, &DEV, 9);
        let store = Arc::new(FakeStore {
            layout: Layout {
                log: 256..300,
                segments: vec![],
            },
            damaged: Mutex::new(HashMap::new()),
            meta: Mutex::new(HashMap::from([(block, bytes)])),
            installs_refused: AtomicU64::new(0),
            ranges: AtomicU64::new(0),
            meta_read_failures: AtomicU64::new(2),
        });
        let config = ScrubConfig {
            enabled: false,
            ..ScrubConfig::default()
        };
        let run = async {
            let handle = spawn(store.clone(), Arc::new(FakePeers::default()), config, DEV);
            handle.ready().await;
            assert_eq!(handle.request(Filter::All), 42);
            handle.stop().await;
        };
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the shell test took too long");
    }
}
